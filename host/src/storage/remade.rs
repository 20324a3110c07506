//! Blobs kept as a recipe instead of bytes: a capability whose blobs are a
//! pure function of a few parameters (random layers, of a seed) stores
//! those, and registers a [`Remake`] that streams the bytes again on every
//! read. The store answers for such a blob like any other (its size, its
//! bytes or a range of them, expiry); it is never offered as a download
//! location, since there is no object to download.
//!
//! Object: `recipes/<algorithm>/<hex>` holding `<kind>\n<size>\n<recipe>`.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;

use super::content::ContentStore;
use super::{BlobContent, ByteRange, StorageError};
use crate::oci::Digest;

/// Recipes are small: a seed and a few numbers.
const MAX_RECIPE: u64 = 4096;

/// Makes a blob's bytes again from its recipe.
pub trait Remake: Send + Sync + 'static {
    /// The bytes of the blob `recipe` describes, `range` of them or all.
    fn remake(
        &self,
        recipe: &[u8],
        range: Option<ByteRange>,
    ) -> Result<BoxStream<'static, std::io::Result<Bytes>>, String>;
}

pub(crate) fn recipe_key(digest: &Digest) -> String {
    format!("recipes/{}/{}", digest.algorithm_name(), digest.hex())
}

/// A recipe as stored.
pub(crate) struct Recipe {
    pub kind: String,
    pub size: u64,
    pub body: Bytes,
}

fn parse(object: &Bytes) -> Option<Recipe> {
    let first = object.iter().position(|b| *b == b'\n')?;
    let second = first + 1 + object[first + 1..].iter().position(|b| *b == b'\n')?;
    Some(Recipe {
        kind: std::str::from_utf8(&object[..first]).ok()?.to_owned(),
        size: std::str::from_utf8(&object[first + 1..second])
            .ok()?
            .parse()
            .ok()?,
        body: object.slice(second + 1..),
    })
}

impl ContentStore {
    /// Whether blobs that can be kept as recipes should be: not where
    /// clients download blobs from the backend, which has no bytes of a
    /// recipe to give them (the replica would have to make and stream
    /// every one).
    pub fn keeps_recipes(&self) -> bool {
        !self.driver().serves_downloads()
    }

    /// Lets blobs of recipe `kind` be read: `remake` makes their bytes.
    pub fn remake_with(&self, kind: &str, remake: Arc<dyn Remake>) {
        self.remakers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(kind.to_owned(), remake);
    }

    /// Stores blob `digest` of `size` bytes as a recipe of `kind` (unless
    /// it is stored already, either way).
    pub async fn put_recipe(
        &self,
        digest: &Digest,
        size: u64,
        kind: &str,
        recipe: &[u8],
    ) -> Result<(), StorageError> {
        let mut object = format!("{kind}\n{size}\n").into_bytes();
        object.extend_from_slice(recipe);
        let n = object.len() as u64;
        self.driver()
            .create(&recipe_key(digest), Bytes::from(object))
            .await?;
        self.wrote(n);
        Ok(())
    }

    /// The recipe of blob `digest`, if it is kept as one (and marks it used).
    pub(crate) async fn recipe(&self, digest: &Digest) -> Result<Option<Recipe>, StorageError> {
        let key = recipe_key(digest);
        let Some((object, stat)) = self.driver().read_small(&key, MAX_RECIPE).await? else {
            return Ok(None);
        };
        self.mark(&key, stat.used).await;
        Ok(parse(&object))
    }

    /// Blob `digest` made again from `recipe`, `range` of it or all.
    pub(crate) fn remade(
        &self,
        digest: &Digest,
        recipe: &Recipe,
        range: Option<ByteRange>,
    ) -> Result<BlobContent, StorageError> {
        let remake = self
            .remakers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&recipe.kind)
            .cloned();
        let failed = |message: String| StorageError::Remote {
            operation: format!("remake blob {digest}"),
            message,
        };
        let remake =
            remake.ok_or_else(|| failed(format!("no maker of {:?} blobs", recipe.kind)))?;
        let body = remake.remake(&recipe.body, range).map_err(failed)?;
        let len = range.map_or(recipe.size, |r| r.len());
        Ok(BlobContent {
            len,
            body: exactly(body, len),
        })
    }
}

/// `body`, ending with an error unless it gave exactly `len` bytes: a maker
/// that stops early (a panic on its thread) must not look like a clean end
/// of a shorter blob.
fn exactly(
    body: BoxStream<'static, std::io::Result<Bytes>>,
    len: u64,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    use futures_util::StreamExt;
    let checked =
        futures_util::stream::unfold((Some(body), 0u64), move |(body, sent)| async move {
            let mut body = body?;
            match body.next().await {
                Some(Ok(chunk)) => {
                    let sent = sent + chunk.len() as u64;
                    Some((Ok(chunk), (Some(body), sent)))
                }
                Some(Err(e)) => Some((Err(e), (None, sent))),
                None if sent == len => None,
                None => Some((
                    Err(std::io::Error::other(format!(
                        "a remade blob ended after {sent} of {len} bytes"
                    ))),
                    (None, sent),
                )),
            }
        });
    checked.boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_round_trip() {
        let recipe = parse(&Bytes::from_static(b"random-v1\n1234\n{\"seed\":\"ab\"}")).unwrap();
        assert_eq!(recipe.kind, "random-v1");
        assert_eq!(recipe.size, 1234);
        assert_eq!(&recipe.body[..], b"{\"seed\":\"ab\"}");
        assert!(parse(&Bytes::from_static(b"nonsense")).is_none());
    }
}
