//! The Go checksum database, client side: the `h1:` hash of a module zip
//! checked against the database's record, the record proven to be in the
//! tree whose head the database signed (RFC 6962 hashing, read from the
//! log's tiles), the head's signature checked with the configured key (the
//! `note` format). A module version kontain builds is the one everybody
//! else's `go` gets. Every request goes through the upstream client and its
//! connection policy.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest as _, Sha256};
use url::Url;

use super::GoError;
use crate::upstream::{Client, PlainError};

/// The public database, whose key `go` knows too.
const GO_SUMDB: &str = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8";

/// Lookups and tiles are small; anything bigger is not a checksum database.
const MAX_RESPONSE: u64 = 256 * 1024;

/// Tiles are 2^8 hashes wide, as `go` reads them.
const TILE_HEIGHT: u32 = 8;

type Hash = [u8; 32];

/// A checksum database: its name, its verifier key, where it is.
#[derive(Clone, Debug)]
pub struct SumDb {
    /// `sum.golang.org`: what `GOSUMDB` and the note signatures name.
    pub name: String,
    /// The whole verifier key, as `GOSUMDB` takes it.
    pub key: String,
    key_hash: [u8; 4],
    public: Vec<u8>,
    pub url: Url,
}

impl SumDb {
    /// `[go] sumdb`: `off`, a known name (`sum.golang.org`), or a verifier
    /// key `<name>+<hash>+<key>`, either followed by the database's URL
    /// (default `https://<name>`).
    pub fn parse(setting: &str) -> Result<Option<SumDb>, String> {
        let mut words = setting.split_whitespace();
        let key = match words.next() {
            None | Some("off") => return Ok(None),
            Some("sum.golang.org") => GO_SUMDB,
            Some(key) => key,
        };
        let url = words.next();
        if words.next().is_some() {
            return Err(format!("{setting:?}: expected a key and at most a URL"));
        }
        let mut parts = key.splitn(3, '+');
        let (Some(name), Some(hash), Some(encoded)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "{key:?} is not a known database nor a verifier key <name>+<hash>+<key>"
            ));
        };
        let raw = BASE64
            .decode(encoded)
            .map_err(|e| format!("{key:?}: the key is not base64: {e}"))?;
        // Algorithm 1 is Ed25519.
        let [1, public @ ..] = raw.as_slice() else {
            return Err(format!("{key:?}: not an Ed25519 key"));
        };
        if public.len() != 32 {
            return Err(format!("{key:?}: not an Ed25519 key"));
        }
        let key_hash = key_hash(name, public);
        if hex::encode(key_hash) != hash {
            return Err(format!("{key:?}: the key does not match its hash"));
        }
        let url = match url {
            Some(u) => u.to_owned(),
            None => format!("https://{name}"),
        };
        let mut url = Url::parse(&url).map_err(|e| format!("{url:?}: {e}"))?;
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        Ok(Some(SumDb {
            name: name.to_owned(),
            key: key.to_owned(),
            key_hash,
            public: public.to_vec(),
            url,
        }))
    }

    /// Checks that the database records `h1` for `module@version`, in a tree
    /// it signed.
    pub async fn verify(
        &self,
        client: &Client,
        module: &str,
        version: &str,
        h1: &str,
    ) -> Result<(), GoError> {
        let path = format!(
            "lookup/{}@{}",
            super::modpath::escape(module),
            super::modpath::escape(version)
        );
        let body = self.fetch(client, &path).await?;
        let refuse = |reason: String| GoError::SumDb {
            module: format!("{module}@{version}"),
            reason,
        };
        let text =
            String::from_utf8(body).map_err(|_| refuse("a lookup that is not text".into()))?;
        let (id, rest) = text
            .split_once('\n')
            .ok_or_else(|| refuse("an empty lookup".into()))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| refuse(format!("a record id {id:?}")))?;
        let (record, note) = rest
            .split_once("\n\n")
            .ok_or_else(|| refuse("a lookup without a tree".into()))?;
        let record = format!("{record}\n");
        let recorded = record.lines().find_map(|line| {
            let mut words = line.split(' ');
            match (words.next(), words.next(), words.next()) {
                (Some(m), Some(v), Some(hash)) if m == module && v == version => Some(hash),
                _ => None,
            }
        });
        let recorded = recorded.ok_or_else(|| refuse("no record of it in the lookup".into()))?;
        let (size, root) = self.verify_note(note).map_err(refuse)?;
        if id >= size {
            return Err(refuse(format!("record {id} is not in the tree of {size}")));
        }
        let leaf = record_hash(record.as_bytes());
        let mut tiles = Tiles {
            db: self,
            client,
            size,
            cache: HashMap::new(),
        };
        let computed = tiles.root_with(id, 0, size, leaf).await?;
        if computed != root {
            return Err(refuse(
                "the record is not in the tree the database signed".into(),
            ));
        }
        if recorded != h1 {
            return Err(GoError::Mismatch {
                module: format!("{module}@{version}"),
                recorded: recorded.to_owned(),
                actual: h1.to_owned(),
                db: self.name.clone(),
            });
        }
        Ok(())
    }

    /// The signed tree head: its size and root hash, if this key signed it.
    fn verify_note(&self, note: &str) -> Result<(u64, Hash), String> {
        let (text, signatures) = note
            .split_once("\n\n")
            .ok_or("a tree head without signatures")?;
        let text = format!("{text}\n");
        let signed = signatures.lines().any(|line| {
            let Some(rest) = line.strip_prefix("\u{2014} ") else {
                return false;
            };
            let Some((name, sig)) = rest.split_once(' ') else {
                return false;
            };
            let Ok(sig) = BASE64.decode(sig) else {
                return false;
            };
            name == self.name
                && sig.len() == 68
                && sig[..4] == self.key_hash
                && ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.public)
                    .verify(text.as_bytes(), &sig[4..])
                    .is_ok()
        });
        if !signed {
            return Err(format!("the tree head is not signed by {}", self.key));
        }
        let mut lines = text.lines();
        if lines.next() != Some("go.sum database tree") {
            return Err("not a go.sum database tree head".into());
        }
        let size = lines
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or("a tree head without a size")?;
        let root = lines
            .next()
            .and_then(|h| BASE64.decode(h).ok())
            .and_then(|h| Hash::try_from(h).ok())
            .ok_or("a tree head without a hash")?;
        Ok((size, root))
    }

    /// `path` from the database (a lookup, a tile, the latest head).
    pub async fn fetch(&self, client: &Client, path: &str) -> Result<Vec<u8>, GoError> {
        let url = self
            .url
            .join(path)
            .map_err(|e| GoError::InvalidPath(e.to_string()))?;
        let unreachable = |message: String| GoError::Unreachable {
            proxy: self.url.to_string(),
            message,
        };
        let mut response = match client.get(url).await {
            Ok(r) => r,
            Err(PlainError::Refused(refusal)) => return Err(GoError::Refused(refusal)),
            Err(PlainError::Transport(message)) => return Err(unreachable(message)),
        };
        if !response.status().is_success() {
            return Err(GoError::Failing {
                proxy: self.url.to_string(),
                what: path.to_owned(),
                status: response.status().as_u16(),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| unreachable(e.to_string()))?
        {
            body.extend_from_slice(&chunk);
            if body.len() as u64 > MAX_RESPONSE {
                return Err(GoError::TooLarge {
                    what: format!("{path} from {}", self.url),
                    limit: MAX_RESPONSE,
                });
            }
        }
        Ok(body)
    }
}

/// The 4 bytes that name a key in signatures.
pub fn key_hash(name: &str, public: &[u8]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n\x01");
    h.update(public);
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// A record's leaf hash (RFC 6962).
pub fn record_hash(data: &[u8]) -> Hash {
    Sha256::new()
        .chain_update([0u8])
        .chain_update(data)
        .finalize()
        .into()
}

/// An interior node's hash (RFC 6962).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    Sha256::new()
        .chain_update([1u8])
        .chain_update(left)
        .chain_update(right)
        .finalize()
        .into()
}

/// The path of tile `index` at `level`: the index in groups of three digits,
/// all but the last prefixed with `x`; `.p/<width>` for a partial tile.
pub fn tile_path(level: u32, index: u64, width: u64) -> String {
    let mut groups = vec![format!("{:03}", index % 1000)];
    let mut rest = index / 1000;
    while rest > 0 {
        groups.push(format!("x{:03}", rest % 1000));
        rest /= 1000;
    }
    groups.reverse();
    let mut path = format!("tile/{TILE_HEIGHT}/{level}/{}", groups.join("/"));
    if width < 1 << TILE_HEIGHT {
        path.push_str(&format!(".p/{width}"));
    }
    path
}

/// The log's hashes, read from its tiles (each fetched once).
struct Tiles<'a> {
    db: &'a SumDb,
    client: &'a Client,
    size: u64,
    cache: HashMap<String, Vec<u8>>,
}

impl Tiles<'_> {
    /// The root of leaves `[lo, hi)` with leaf `m` replaced by `leaf`: equal
    /// to the signed root only if `leaf` is the tree's leaf `m`.
    async fn root_with(&mut self, m: u64, lo: u64, hi: u64, leaf: Hash) -> Result<Hash, GoError> {
        if hi - lo == 1 {
            return Ok(leaf);
        }
        let k = split(hi - lo);
        if m < lo + k {
            let left = Box::pin(self.root_with(m, lo, lo + k, leaf)).await?;
            let right = Box::pin(self.subtree(lo + k, hi)).await?;
            Ok(node_hash(&left, &right))
        } else {
            let left = Box::pin(self.subtree(lo, lo + k)).await?;
            let right = Box::pin(self.root_with(m, lo + k, hi, leaf)).await?;
            Ok(node_hash(&left, &right))
        }
    }

    /// The hash of leaves `[lo, hi)`.
    async fn subtree(&mut self, lo: u64, hi: u64) -> Result<Hash, GoError> {
        let n = hi - lo;
        if n.is_power_of_two() && lo.is_multiple_of(n) {
            return self
                .complete(n.trailing_zeros(), lo >> n.trailing_zeros())
                .await;
        }
        let k = split(n);
        let left = Box::pin(self.subtree(lo, lo + k)).await?;
        let right = Box::pin(self.subtree(lo + k, hi)).await?;
        Ok(node_hash(&left, &right))
    }

    /// The hash of the complete subtree at `level` and `index`, from the
    /// tile holding its level's bottom (hashing up within the tile).
    async fn complete(&mut self, level: u32, index: u64) -> Result<Hash, GoError> {
        let (tile_level, within) = (level / TILE_HEIGHT, level % TILE_HEIGHT);
        let first = index << within;
        let count = 1u64 << within;
        let tile = first >> TILE_HEIGHT;
        let stored = self.size >> (tile_level * TILE_HEIGHT);
        let width = (stored - (tile << TILE_HEIGHT)).min(1 << TILE_HEIGHT);
        let path = tile_path(tile_level, tile, width);
        if !self.cache.contains_key(&path) {
            let data = match self.db.fetch(self.client, &path).await {
                // The tile was completed meanwhile: the full one holds the
                // same hashes first.
                Err(GoError::Failing { status: 404, .. }) if width < 1 << TILE_HEIGHT => {
                    let full = tile_path(tile_level, tile, 1 << TILE_HEIGHT);
                    let mut data = self.db.fetch(self.client, &full).await?;
                    data.truncate(width as usize * 32);
                    data
                }
                fetched => fetched?,
            };
            self.cache.insert(path.clone(), data);
        }
        let data = &self.cache[&path];
        let offset = (first - (tile << TILE_HEIGHT)) as usize;
        let mut hashes: Vec<Hash> = (offset..offset + count as usize)
            .map(|i| {
                data.get(i * 32..i * 32 + 32)
                    .and_then(|h| Hash::try_from(h).ok())
            })
            .collect::<Option<_>>()
            .ok_or_else(|| GoError::SumDb {
                module: self.db.name.clone(),
                reason: format!("tile {path} is too short"),
            })?;
        while hashes.len() > 1 {
            hashes = hashes.chunks(2).map(|p| node_hash(&p[0], &p[1])).collect();
        }
        Ok(hashes[0])
    }
}

/// The largest power of two smaller than `n` (n > 1): where RFC 6962 splits.
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// `h1:` of a module zip (Go's dirhash "Hash1"): SHA-256 over the sorted
/// lines `<sha256 hex>  <name>\n`, one per file.
pub fn h1(mut files: Vec<(String, [u8; 32])>) -> String {
    files.sort();
    let mut summary = Sha256::new();
    for (name, digest) in files {
        summary.update(format!("{}  {name}\n", hex::encode(digest)));
    }
    format!("h1:{}", BASE64.encode(summary.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_key_parses_and_names_its_database() {
        let db = SumDb::parse("sum.golang.org").unwrap().unwrap();
        assert_eq!(db.name, "sum.golang.org");
        assert_eq!(db.url.as_str(), "https://sum.golang.org/");
        assert!(SumDb::parse("off").unwrap().is_none());
        assert!(
            SumDb::parse("sum.golang.org+00000000+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8")
                .is_err()
        );
        let with_url = SumDb::parse(&format!("{GO_SUMDB} http://127.0.0.1:1/db"))
            .unwrap()
            .unwrap();
        assert_eq!(with_url.url.as_str(), "http://127.0.0.1:1/db/");
    }

    #[test]
    fn tiles_are_named_as_go_names_them() {
        assert_eq!(tile_path(0, 5, 256), "tile/8/0/005");
        assert_eq!(tile_path(1, 1234567, 256), "tile/8/1/x001/x234/567");
        assert_eq!(tile_path(0, 0, 7), "tile/8/0/000.p/7");
        assert_eq!(split(5), 4);
        assert_eq!(split(2), 1);
        assert_eq!(split(9), 8);
    }
}
