//! The caching front of the upstream client: manifests cached by digest,
//! tags re-resolved with `HEAD` and served stale when the upstream is down,
//! blobs streamed into storage and verified, each fetched once however many
//! ask at once (`image::once`).

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;

use super::client::Client;
use super::{Upstream, UpstreamError, UpstreamImage};
use crate::image::once;
use crate::oci::{Digest, MediaType, Reference};
use crate::storage::{BlobInfo, ContentStore, StorageError, StoredManifest};

impl Upstream {
    /// The manifest of `upstream` at `reference`, from cache or upstream.
    pub(super) async fn manifest(
        &self,
        upstream: &UpstreamImage,
        reference: &str,
        accept: &[String],
    ) -> Result<StoredManifest, UpstreamError> {
        let reference: Reference = reference
            .parse()
            .map_err(|e| UpstreamError::InvalidImage(format!("{reference:?}: {e}")))?;
        let accept = &manifest_types(accept);
        let stored = self.manifest_at(upstream, reference, accept).await?;
        self.note_sizes(&stored.bytes);
        Ok(stored)
    }

    /// Remembers the blob sizes a manifest declares, for `download`.
    fn note_sizes(&self, manifest: &[u8]) {
        let sizes = crate::oci::blob_sizes(manifest);
        if sizes.is_empty() {
            return;
        }
        let mut declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
        if declared.len() + sizes.len() > MAX_DECLARED {
            declared.clear();
        }
        for (digest, size) in sizes {
            // Never lower: a hostile manifest must not make a blob that
            // others declare rightly undownloadable.
            let entry = declared.entry(digest).or_insert(size);
            *entry = (*entry).max(size);
        }
    }

    async fn manifest_at(
        &self,
        upstream: &UpstreamImage,
        reference: Reference,
        accept: &[String],
    ) -> Result<StoredManifest, UpstreamError> {
        match reference {
            Reference::Digest(digest) => self.manifest_by_digest(upstream, &digest, accept).await,
            Reference::Tag(tag) => {
                let key = tag_key(upstream, tag.as_str(), accept);
                // Only a resolution made while this request waited answers it:
                // a tag is looked up afresh for every pull, not every second.
                let asked = std::time::Instant::now();
                let _flight = self.tag_flights.lock(key.clone()).await;
                if let Some(stored) = self.tags_resolved.get_since(&key, asked) {
                    return Ok((*stored).clone());
                }
                // An upstream that was down a moment ago, for those who
                // waited: each of them asking again would wait its timeouts.
                if let Some(message) = self.tags_down.get_since(&key, asked) {
                    return Err(UpstreamError::Unreachable {
                        image: upstream.to_string(),
                        message: (*message).clone(),
                    });
                }
                match self.resolve_tag(upstream, tag.as_str(), accept).await {
                    Ok(stored) => {
                        self.tags_resolved.put(key.clone(), stored.clone());
                        if let Err(e) = self.store.put_tag(&key, &stored.digest).await {
                            tracing::warn!(%upstream, error = %e, "could not remember the tag");
                        }
                        Ok(stored)
                    }
                    Err(e) if e.upstream_down() => match self.stale(&key).await? {
                        Some(stored) => {
                            tracing::warn!(%upstream, %tag, digest = %stored.digest, error = %e, "upstream down: serving the cached tag");
                            self.tags_resolved.put(key.clone(), stored.clone());
                            Ok(stored)
                        }
                        None => {
                            self.tags_down.put(key.clone(), e.to_string());
                            Err(e)
                        }
                    },
                    Err(e) => Err(e),
                }
            }
        }
    }

    async fn stale(&self, key: &str) -> Result<Option<StoredManifest>, UpstreamError> {
        let Some(digest) = self.store.tag(key).await? else {
            return Ok(None);
        };
        Ok(self.store.manifest(&digest).await?)
    }

    /// HEAD the tag (HEADs do not count against Docker Hub's rate limit),
    /// then fetch by digest unless the digest is cached.
    async fn resolve_tag(
        &self,
        upstream: &UpstreamImage,
        tag: &str,
        accept: &[String],
    ) -> Result<StoredManifest, UpstreamError> {
        let head = self.client.head_manifest(upstream, tag, accept).await?;
        match head.digest {
            Some(digest) => self.manifest_by_digest(upstream, &digest, accept).await,
            None => {
                // A registry that does not say the digest: GET by tag instead.
                let (bytes, media_type) = self.client.get_manifest(upstream, tag, accept).await?;
                self.store_manifest(upstream, None, bytes, &media_type)
                    .await
            }
        }
    }

    async fn manifest_by_digest(
        &self,
        upstream: &UpstreamImage,
        digest: &Digest,
        accept: &[String],
    ) -> Result<StoredManifest, UpstreamError> {
        let find = || async move { Ok::<_, UpstreamError>(self.store.manifest(digest).await?) };
        once(
            &self.store,
            format!("manifest {digest}"),
            find,
            || async move {
                let (bytes, media_type) = self
                    .client
                    .get_manifest(upstream, &digest.to_string(), accept)
                    .await?;
                self.store_manifest(upstream, Some(digest), bytes, &media_type)
                    .await
            },
        )
        .await
    }

    async fn store_manifest(
        &self,
        upstream: &UpstreamImage,
        expected: Option<&Digest>,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<StoredManifest, UpstreamError> {
        let actual = Digest::sha256(&bytes);
        if let Some(expected) = expected
            && *expected != actual
        {
            return Err(UpstreamError::DigestMismatch {
                image: upstream.to_string(),
                expected: expected.clone(),
                actual,
            });
        }
        let media_type: MediaType = media_type
            .parse()
            .map_err(|e| UpstreamError::InvalidImage(format!("{upstream}: {e}")))?;
        Ok(self.store.put_manifest(&media_type, bytes).await?)
    }

    /// A blob of `upstream`, from storage or fetched into it. `streaming`:
    /// answered as soon as the blob's bytes start to arrive (readable from
    /// the store as they come, see `storage::arriving`), for a client that
    /// must see its first byte within its header timeout; otherwise once
    /// the blob is stored. The download is the server's, not the caller's:
    /// it goes on when the caller goes away, and is done once however many
    /// ask at once.
    pub(super) async fn blob(
        &self,
        upstream: &UpstreamImage,
        digest: Digest,
        streaming: bool,
    ) -> Result<BlobInfo, UpstreamError> {
        if let Some(arrival) = self.store.arrival(&digest) {
            if streaming {
                return Ok(BlobInfo {
                    digest,
                    size: arrival.size,
                });
            }
            // Stored once it ends, or failed (and fetched anew below).
            let _ = arrival.finished().await;
        }
        if let Some(size) = self.store.blob_size(&digest).await? {
            return Ok(BlobInfo { digest, size });
        }
        let (started, mut arriving) = tokio::sync::oneshot::channel();
        let fetch = Fetch {
            client: self.client.clone(),
            store: self.store.clone(),
            max_blob_bytes: self.settings.load().max_blob_bytes,
            declared: self
                .declared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&digest)
                .copied(),
            upstream: upstream.clone(),
            digest: digest.clone(),
            started: streaming.then_some(started),
        };
        let store = self.store.clone();
        let wanted = digest.clone();
        let mut task = crate::activity::detach(async move {
            let digest = &wanted;
            let find = || async {
                let size = store.blob_size(digest).await?;
                Ok::<_, UpstreamError>(size.map(|size| BlobInfo {
                    digest: digest.clone(),
                    size,
                }))
            };
            let fetched = once(&store, format!("blob {digest}"), find, || fetch.run()).await;
            // Its clients may have gone (or been streaming): the log says.
            if let Err(e) = &fetched {
                tracing::warn!(%digest, error = %e, "a blob download failed");
            }
            fetched
        });
        let done = |joined: Result<Option<Result<BlobInfo, UpstreamError>>, _>| match joined {
            Ok(Some(fetched)) => fetched,
            Ok(None) => Err(UpstreamError::Unreachable {
                image: upstream.to_string(),
                message: format!("the transfer of {digest} stopped: the registry is shutting down"),
            }),
            Err(e) => Err(UpstreamError::Storage(StorageError::Io {
                path: "blob download".into(),
                source: std::io::Error::other(e),
            })),
        };
        if !streaming {
            return done(task.await);
        }
        // Told nothing when the blob is stored before it is sent (small, or
        // of unknown size): then the task's end is the answer.
        let mut told = false;
        loop {
            tokio::select! {
                started = &mut arriving, if !told => match started {
                    Ok(info) => return Ok(info),
                    Err(_) => told = true,
                },
                joined = &mut task => return done(joined),
                // Another request's download of the same blob started first
                // (this one waits for its lock): read that one's bytes.
                () = tokio::time::sleep(JOIN_POLL) => {
                    if let Some(arrival) = self.store.arrival(&digest) {
                        return Ok(BlobInfo { digest, size: arrival.size });
                    }
                }
            }
        }
    }
}

/// How often a request waiting for another's download looks whether that
/// download's bytes have started to arrive.
const JOIN_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Blobs this small are not streamed: they are stored first, so that a
/// wrong one is refused with an error rather than an aborted body.
const STREAM_FROM: u64 = 64 * 1024;

/// Readers are told of new bytes at least every this many.
const GROW_EVERY: u64 = 1 << 20;

/// One blob downloaded into storage.
struct Fetch {
    client: Arc<Client>,
    store: Arc<ContentStore>,
    max_blob_bytes: u64,
    /// The size the image's manifest declares, if one was read.
    declared: Option<u64>,
    upstream: UpstreamImage,
    digest: Digest,
    /// Told the blob's size once its bytes start to arrive (and are
    /// readable from the store), if someone wants to stream it.
    started: Option<tokio::sync::oneshot::Sender<BlobInfo>>,
}

impl Fetch {
    async fn run(self) -> Result<BlobInfo, UpstreamError> {
        let Fetch {
            client,
            store,
            max_blob_bytes,
            declared,
            upstream,
            digest,
            started,
        } = self;
        let upstream = &upstream;
        let too_large = || UpstreamError::TooLarge {
            image: upstream.to_string(),
            what: "a blob",
            limit: max_blob_bytes,
        };
        let mut response = client.get_blob(upstream, &digest).await?;
        // Read no more than the manifest declares, or than the upstream says
        // it sends, whichever is known first.
        let longer = |read| UpstreamError::LongerThanDeclared {
            image: upstream.to_string(),
            digest: digest.clone(),
            declared: declared.unwrap_or_default(),
            read,
        };
        let length = response.content_length();
        if let (Some(declared), Some(length)) = (declared, length)
            && length > declared
        {
            return Err(longer(0));
        }
        // Only what the upstream says it sends is refused up front: a size a
        // manifest declares is anyone's word (a hostile manifest may name a
        // popular blob), so it only lowers the bound.
        if length.is_some_and(|n| n > max_blob_bytes) {
            return Err(too_large());
        }
        let limit = [declared, length, Some(max_blob_bytes)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(max_blob_bytes);
        // Readable as it arrives when the upstream says its length (a size
        // a manifest declares is anyone's word), whoever asked for it: a
        // client may come for it while a build fetches it.
        let size = length.filter(|n| *n >= STREAM_FROM);
        let mut writer = match size {
            Some(size) => store.arriving_writer(max_blob_bytes, &digest, size)?,
            None => store.blob_writer(max_blob_bytes)?,
        };
        if let (Some(started), Some(size)) = (started, size) {
            let _ = started.send(BlobInfo {
                digest: digest.clone(),
                size,
            });
        }
        // Bytes arrive on the async side; hashing and writing happen on a
        // blocking thread. `None` on the channel means "abandon".
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(32);
        let expected = digest.clone();
        let writing = tokio::task::spawn_blocking(move || -> Result<BlobInfo, WriteFailure> {
            let mut told = 0;
            while let Some(chunk) = rx.blocking_recv() {
                let Some(chunk) = chunk else {
                    return Err(WriteFailure::Abandoned);
                };
                writer.write_all(&chunk).map_err(WriteFailure::Io)?;
                // Readers see the bytes once nothing more is waiting to be
                // written, or every GROW_EVERY when the channel stays full.
                if rx.is_empty() || writer.written() - told >= GROW_EVERY {
                    writer.grew().map_err(WriteFailure::Io)?;
                    told = writer.written();
                }
            }
            writer
                .commit(Some(&expected))
                .map_err(WriteFailure::Storage)
        });
        let mut transfer_error = None;
        let mut read = 0u64;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    read += chunk.len() as u64;
                    if read > limit {
                        let _ = tx.send(None).await;
                        drop(response);
                        return Err(match declared {
                            Some(d) if d < max_blob_bytes => longer(read),
                            _ => too_large(),
                        });
                    }
                    if tx.send(Some(chunk)).await.is_err() {
                        break; // the writer failed; its error is reported below
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(None).await;
                    transfer_error = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let written = writing.await.map_err(|e| {
            UpstreamError::Storage(StorageError::Io {
                path: "blob writer".into(),
                source: std::io::Error::other(e),
            })
        })?;
        if let Some(e) = transfer_error {
            return Err(UpstreamError::Unreachable {
                image: upstream.to_string(),
                message: format!("the transfer of {digest} broke off: {e}"),
            });
        }
        match written {
            Ok(info) => {
                tracing::info!(%upstream, %digest, size = info.size, "cached a blob");
                Ok(info)
            }
            Err(WriteFailure::Storage(StorageError::DigestMismatch { expected, actual })) => {
                Err(UpstreamError::DigestMismatch {
                    image: upstream.to_string(),
                    expected,
                    actual,
                })
            }
            Err(WriteFailure::Io(e)) if e.kind() == std::io::ErrorKind::FileTooLarge => {
                Err(too_large())
            }
            Err(WriteFailure::Io(e)) => Err(UpstreamError::Storage(StorageError::Io {
                path: "blob writer".into(),
                source: e,
            })),
            Err(WriteFailure::Storage(e)) => Err(UpstreamError::Storage(e)),
            Err(WriteFailure::Abandoned) => Err(UpstreamError::Unreachable {
                image: upstream.to_string(),
                message: format!("the transfer of {digest} broke off"),
            }),
        }
    }
}

/// How many declared blob sizes are remembered (then forgotten at once).
const MAX_DECLARED: usize = 100_000;

/// The manifest types of a client's `Accept` list; all that kontain reads
/// when it names none (no header, `*/*`): an upstream asked without one may
/// refuse the request or answer with a type no client asked for.
fn manifest_types(accept: &[String]) -> Vec<String> {
    let known: Vec<String> = accept
        .iter()
        .filter(|t| MediaType::MANIFESTS.contains(&t.as_str()))
        .cloned()
        .collect();
    match known.is_empty() {
        true => MediaType::MANIFESTS.map(str::to_owned).to_vec(),
        false => known,
    }
}

enum WriteFailure {
    Abandoned,
    Io(std::io::Error),
    Storage(StorageError),
}

/// The storage key remembering what a tag resolved to. The client's `Accept`
/// list is part of it: a client that takes only single-platform manifests
/// must not make the tag look single-platform for everyone else.
fn tag_key(upstream: &UpstreamImage, tag: &str, accept: &[String]) -> String {
    let mut accept: Vec<&str> = accept.iter().map(String::as_str).collect();
    accept.sort_unstable();
    accept.dedup();
    format!(
        "mirror {}:{tag} accept={}",
        upstream.cache_key(),
        accept.join(",")
    )
}
