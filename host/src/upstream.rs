//! Other registries: a client (`client`) that speaks the distribution API and
//! its token dance, a connection policy (`policy`) against SSRF, the naming
//! rules for upstream images (`image`), and [`Mirror`], the caching front that
//! generators use — manifests cached by digest, tags re-resolved with `HEAD`
//! and served stale when the upstream is down, blobs streamed into storage
//! and verified, concurrent requests for one thing sharing one fetch.
//!
//! Depends on `oci` and `storage`; knows nothing of wasm or HTTP serving.

mod client;
mod image;
mod policy;

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;

use crate::locks::Exclusive;
use crate::oci::{Digest, MediaType, Reference};
use crate::storage::{BlobInfo, Storage, StorageError, StoredManifest};
pub use client::{Client, PlainError};
pub use image::{Credentials, DOCKER_HUB, Endpoint, Registries, UpstreamImage, split_reference};
pub use policy::{HostPattern, Policy, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid image: {0}")]
    InvalidImage(String),
    #[error(transparent)]
    Refused(Refusal),
    #[error("{image}:{reference} was not found upstream")]
    NotFound { image: String, reference: String },
    #[error(
        "the upstream registry refused access to {image} (check the credentials for it in kontain.toml)"
    )]
    Unauthorized { image: String },
    #[error("the upstream registry answered {status} for {image}")]
    Failing { image: String, status: u16 },
    #[error("the upstream registry for {image} is unreachable: {message}")]
    Unreachable { image: String, message: String },
    #[error(
        "the upstream registry sent content with digest {actual} for {image}@{expected}; nothing was cached"
    )]
    DigestMismatch {
        image: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what} of {image} is larger than the limit of {limit} bytes")]
    TooLarge {
        image: String,
        what: &'static str,
        limit: u64,
    },
    #[error(transparent)]
    Storage(StorageError),
}

impl UpstreamError {
    /// The upstream is down or throttling: a cached tag may be served instead.
    fn upstream_down(&self) -> bool {
        match self {
            UpstreamError::Unreachable { .. } => true,
            UpstreamError::Failing { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

impl From<StorageError> for UpstreamError {
    fn from(e: StorageError) -> Self {
        UpstreamError::Storage(e)
    }
}

/// The caching front of the upstream client.
pub struct Mirror {
    client: Arc<Client>,
    registries: Registries,
    storage: Arc<dyn Storage>,
    locks: Exclusive,
    max_blob_bytes: u64,
}

impl Mirror {
    pub fn new(
        client: Arc<Client>,
        registries: Registries,
        storage: Arc<dyn Storage>,
        max_blob_bytes: u64,
    ) -> Self {
        Mirror {
            client,
            registries,
            locks: Exclusive::new(storage.clone()),
            storage,
            max_blob_bytes,
        }
    }

    /// The policy-checked HTTP client, for other protocols (Go module proxies).
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    pub fn parse(&self, image: &str) -> Result<UpstreamImage, UpstreamError> {
        self.registries
            .parse(image)
            .map_err(UpstreamError::InvalidImage)
    }

    /// The manifest of `image` at `reference`, from cache or upstream.
    pub async fn manifest(
        &self,
        image: &str,
        reference: &str,
        accept: &[String],
    ) -> Result<StoredManifest, UpstreamError> {
        let upstream = self.parse(image)?;
        let reference: Reference = reference
            .parse()
            .map_err(|e| UpstreamError::InvalidImage(format!("{reference:?}: {e}")))?;
        match reference {
            Reference::Digest(digest) => self.manifest_by_digest(&upstream, &digest, accept).await,
            Reference::Tag(tag) => {
                let key = tag_key(&upstream, tag.as_str(), accept);
                match self.resolve_tag(&upstream, tag.as_str(), accept).await {
                    Ok(stored) => {
                        if let Err(e) = self.storage.put_tag(&key, &stored.digest).await {
                            tracing::warn!(%upstream, error = %e, "could not remember the tag");
                        }
                        Ok(stored)
                    }
                    Err(e) if e.upstream_down() => match self.stale(&key).await? {
                        Some(stored) => {
                            tracing::warn!(%upstream, %tag, digest = %stored.digest, error = %e, "upstream down: serving the cached tag");
                            Ok(stored)
                        }
                        None => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
        }
    }

    async fn stale(&self, key: &str) -> Result<Option<StoredManifest>, UpstreamError> {
        let Some(digest) = self.storage.tag(key).await? else {
            return Ok(None);
        };
        Ok(self.storage.manifest(&digest).await?)
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
        if let Some(stored) = self.storage.manifest(digest).await? {
            return Ok(stored);
        }
        let _guard = self.locks.lock(format!("manifest {digest}")).await?;
        if let Some(stored) = self.storage.manifest(digest).await? {
            return Ok(stored);
        }
        let (bytes, media_type) = self
            .client
            .get_manifest(upstream, &digest.to_string(), accept)
            .await?;
        self.store_manifest(upstream, Some(digest), bytes, &media_type)
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
        Ok(self.storage.put_manifest(&media_type, bytes).await?)
    }

    /// A blob of `image`, from storage or streamed from upstream into it.
    pub async fn blob(&self, image: &str, digest: &str) -> Result<BlobInfo, UpstreamError> {
        let upstream = self.parse(image)?;
        let digest: Digest = digest
            .parse()
            .map_err(|e| UpstreamError::InvalidImage(format!("{digest:?}: {e}")))?;
        if let Some(size) = self.storage.blob_size(&digest).await? {
            return Ok(BlobInfo { digest, size });
        }
        let _guard = self.locks.lock(format!("blob {digest}")).await?;
        if let Some(size) = self.storage.blob_size(&digest).await? {
            return Ok(BlobInfo { digest, size });
        }
        self.download(&upstream, digest).await
    }

    async fn download(
        &self,
        upstream: &UpstreamImage,
        digest: Digest,
    ) -> Result<BlobInfo, UpstreamError> {
        let too_large = || UpstreamError::TooLarge {
            image: upstream.to_string(),
            what: "a blob",
            limit: self.max_blob_bytes,
        };
        let mut response = self.client.get_blob(upstream, &digest).await?;
        if response
            .content_length()
            .is_some_and(|n| n > self.max_blob_bytes)
        {
            return Err(too_large());
        }
        let mut writer = self.storage.blob_writer(self.max_blob_bytes)?;
        // Bytes arrive on the async side; hashing and writing happen on a
        // blocking thread. `None` on the channel means "abandon".
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(32);
        let expected = digest.clone();
        let writing = tokio::task::spawn_blocking(move || -> Result<BlobInfo, WriteFailure> {
            while let Some(chunk) = rx.blocking_recv() {
                let Some(chunk) = chunk else {
                    return Err(WriteFailure::Abandoned);
                };
                writer.write_all(&chunk).map_err(WriteFailure::Io)?;
            }
            writer
                .commit(Some(&expected))
                .map_err(WriteFailure::Storage)
        });
        let mut transfer_error = None;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
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
