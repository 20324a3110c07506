//! Content-addressed storage for blobs and manifests, behind the [`Storage`]
//! trait so that backends (filesystem now, Google Cloud Storage later) are
//! interchangeable.
//!
//! Invariants every backend keeps: a blob is visible only once it is complete
//! and its digest verified (written aside, then published atomically); the
//! digest is computed while the bytes are written, never in a second pass;
//! manifests are stored by digest with their media type, so a `HEAD` by tag
//! followed by a `GET` by digest returns the same bytes.
//!
//! Depends only on `oci`.

pub mod filesystem;

use std::io::{self, Write};
use std::path::PathBuf;

use bytes::Bytes;
use futures_util::stream::BoxStream;

use crate::oci::{Digest, MediaType};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("content has digest {actual}, expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("content is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("{digest} is stored with an unreadable media type")]
    CorruptMetadata { digest: Digest },
    #[error("storage I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A blob that has been stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
}

/// A manifest as stored: exact bytes and the media type to serve them with.
#[derive(Clone, Debug)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: MediaType,
    pub bytes: Bytes,
}

/// An inclusive byte range within a blob, already checked against its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub first: u64,
    pub last: u64,
}

impl ByteRange {
    /// Never zero: a range holds at least its first byte.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }
}

/// How a blob's bytes reach the client.
pub enum BlobContent {
    /// The bytes themselves, streamed (`len` of them).
    Stream {
        len: u64,
        body: BoxStream<'static, io::Result<Bytes>>,
    },
    /// Somewhere the client can fetch them itself (a signed storage URL).
    Redirect(String),
}

/// Writes one blob. Bytes go to a private temporary location while their
/// digest is computed; [`BlobWriter::commit`] verifies and publishes them.
/// Dropping a writer without committing discards everything written.
///
/// The writer is synchronous on purpose: the work feeding it (tar, gzip,
/// hashing) is CPU-bound and runs on a blocking thread.
pub trait BlobWriter: Write + Send {
    /// Bytes written so far.
    fn written(&self) -> u64;

    /// Publishes the blob. With `expected`, a different digest is an error and
    /// nothing is published.
    fn commit(self: Box<Self>, expected: Option<&Digest>) -> Result<BlobInfo, StorageError>;
}

#[async_trait::async_trait]
pub trait Storage: Send + Sync + 'static {
    /// The size of a stored blob, or `None`.
    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError>;

    /// The blob's bytes, all or `range` of them; `None` if it is not stored.
    async fn read_blob(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobContent>, StorageError>;

    /// A writer for a new blob of at most `limit` bytes.
    fn blob_writer(&self, limit: u64) -> Result<Box<dyn BlobWriter>, StorageError>;

    /// Stores a manifest's exact bytes and its media type.
    async fn put_manifest(
        &self,
        media_type: &MediaType,
        bytes: Bytes,
    ) -> Result<StoredManifest, StorageError>;

    /// A stored manifest, or `None`.
    async fn manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, StorageError>;

    /// Sets a small named value (a tag's digest, a plugin's cache entry),
    /// replacing what it held before, atomically.
    async fn put_value(&self, key: &str, value: &str) -> Result<(), StorageError>;

    /// The value last set for `key`.
    async fn value(&self, key: &str) -> Result<Option<String>, StorageError>;

    /// Remembers that `key` (a tag, in a generator's own naming) pointed at
    /// `digest`, replacing what it pointed at before.
    async fn put_tag(&self, key: &str, digest: &Digest) -> Result<(), StorageError> {
        self.put_value(key, &digest.to_string()).await
    }

    /// What `key` last pointed at.
    async fn tag(&self, key: &str) -> Result<Option<Digest>, StorageError> {
        Ok(self.value(key).await?.and_then(|v| v.trim().parse().ok()))
    }

    /// Removes what has not been used for `ttl`, never a blob that a kept
    /// manifest refers to. Backends that expire objects themselves (a
    /// bucket lifecycle rule) keep this default.
    async fn collect(&self, ttl: std::time::Duration) -> Result<Collected, StorageError> {
        let _ = ttl;
        Ok(Collected::default())
    }
}

/// What one collection removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub manifests: usize,
    pub blobs: usize,
    pub values: usize,
    pub bytes: u64,
}

/// Stores `bytes` as one blob from a blocking context.
pub fn write_blob(storage: &dyn Storage, bytes: &[u8]) -> Result<BlobInfo, StorageError> {
    let mut w = storage.blob_writer(bytes.len() as u64)?;
    w.write_all(bytes).map_err(|source| StorageError::Io {
        path: PathBuf::from("<blob writer>"),
        source,
    })?;
    w.commit(None)
}
