//! Content-addressed storage for blobs and manifests, behind the [`Storage`]
//! trait so that backends (a local directory, a Google Cloud Storage bucket
//! shared by many replicas) are interchangeable.
//!
//! Invariants every backend keeps: a blob is visible only once it is complete
//! and its digest verified (written aside, then published atomically); the
//! digest is computed while the bytes are written, never in a second pass;
//! manifests are stored by digest with their media type, so a `HEAD` by tag
//! followed by a `GET` by digest returns the same bytes.
//!
//! Depends only on `oci`.

pub mod filesystem;
pub mod gcs;

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::BoxStream;

use crate::oci::{Digest, MediaType, Sha256Writer};

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
    #[error("the storage service failed to {operation}: {message}")]
    Remote { operation: String, message: String },
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

/// A blob's bytes (`len` of them), streamed.
pub struct BlobContent {
    pub len: u64,
    pub body: BoxStream<'static, io::Result<Bytes>>,
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

    /// Where clients should download a stored blob themselves (a `307` to a
    /// signed bucket URL), or `None` to have the bytes streamed by kontain.
    async fn blob_location(&self, digest: &Digest) -> Result<Option<String>, StorageError> {
        let _ = digest;
        Ok(None)
    }

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

    /// Waits until this process holds the lease on `key` among every
    /// process sharing this storage, so that work asked of many replicas at
    /// once is done by one. Storage used by one process only needs no lease
    /// (the in-process locks of [`crate::locks`] suffice): the default.
    async fn lease(&self, key: &str) -> Result<Box<dyn Lease>, StorageError> {
        let _ = key;
        Ok(Box::new(NoLease))
    }

    /// Removes what has not been used for `ttl`, never a blob that a kept
    /// manifest refers to. Backends that expire objects themselves (a
    /// bucket lifecycle rule) keep this default.
    async fn collect(&self, ttl: std::time::Duration) -> Result<Collected, StorageError> {
        let _ = ttl;
        Ok(Collected::default())
    }
}

/// A held lease: kept alive while it exists, released when dropped.
pub trait Lease: Send + Sync {}

struct NoLease;

impl Lease for NoLease {}

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

/// Temporary files older than this were left by a process that died while
/// writing; younger ones may belong to another process sharing the directory.
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// Deletes half-written blobs that a crashed process left in `dir`.
fn remove_abandoned_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > ABANDONED_AFTER);
        if old && std::fs::remove_file(entry.path()).is_ok() {
            tracing::info!(path = %entry.path().display(), "removed an abandoned temporary file");
        }
    }
}

/// A blob being written: bytes go to a private temporary file, hashed on
/// the way, refused past the writer's limit.
struct Spool {
    file: Sha256Writer<BufWriter<tempfile::NamedTempFile>>,
    limit: u64,
}

impl Spool {
    fn new(dir: &Path, limit: u64) -> Result<Spool, StorageError> {
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|source| StorageError::Io {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Spool {
            file: Sha256Writer::new(BufWriter::with_capacity(1 << 20, tmp)),
            limit,
        })
    }

    fn written(&self) -> u64 {
        self.file.written()
    }

    /// The finished file and what it holds; a digest other than `expected`
    /// is an error (and the file is deleted).
    fn finish(
        self,
        expected: Option<&Digest>,
    ) -> Result<(BlobInfo, tempfile::NamedTempFile), StorageError> {
        let (digest, size, buffered) = self.file.finish();
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(StorageError::DigestMismatch {
                expected: expected.clone(),
                actual: digest,
            });
        }
        let tmp = buffered.into_inner().map_err(|e| StorageError::Io {
            path: PathBuf::from("<blob writer>"),
            source: e.into_error(),
        })?;
        Ok((BlobInfo { digest, size }, tmp))
    }
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.file.written() + buf.len() as u64 > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("blob exceeds the limit of {} bytes", self.limit),
            ));
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The digest of a manifest about to be stored; too large a one is refused.
fn manifest_digest(bytes: &[u8]) -> Result<Digest, StorageError> {
    if bytes.len() as u64 > crate::oci::MAX_MANIFEST_BYTES {
        return Err(StorageError::TooLarge {
            limit: crate::oci::MAX_MANIFEST_BYTES,
        });
    }
    Ok(Digest::sha256(bytes))
}
