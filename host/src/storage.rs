//! Storage in two layers, as distribution's storage drivers are:
//!
//! - a [`Driver`] is a dumb store of named objects: create one if absent,
//!   replace one, read it (or a range), stat, list by prefix, delete, mark
//!   used, take a lease, and say where clients may download it themselves.
//!   Two drivers: a local directory ([`filesystem`]) and a Google Cloud
//!   Storage bucket shared by many replicas ([`gcs`]).
//! - the [`ContentStore`] above it owns everything else, once for both:
//!   digests and their verification, manifests, tags and values, use marks,
//!   work done once across replicas, and expiry ([`expiry`]).
//!
//! Invariants: a blob is visible only once it is complete and its digest
//! verified (spooled aside, hashed on the way, then published); manifests are
//! stored by digest with their media type and re-hashed when read, so a
//! `HEAD` by tag followed by a `GET` by digest returns the same bytes.
//!
//! Depends on `oci`, and on `config` for the units its section is written
//! in; nothing else.

mod arriving;
pub mod config;
mod content;
pub mod expiry;
pub mod filesystem;
pub mod gcs;
mod measured;
mod owner;
mod quota;
mod referrers;
mod remade;
mod spool;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::stream::BoxStream;

use crate::oci::{Digest, MediaType};

pub use arriving::Arrival;
use config::{Backend, StorageConfig};
pub use content::{BlobEntry, BlobWriter, ContentStore, Held, KeyedLocks};
pub use expiry::{Collected, Usage};
pub use remade::Remake;
pub use spool::{ABANDONED_AFTER, Spool};

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
    #[error(
        "another kontain server (pid {pid}) is using the storage directory {}; give each server its own [storage] path (the lock is {})",
        path.display(), owner::lock_path(path).display()
    )]
    InUse { path: PathBuf, pid: String },
    #[error(
        "storage is at its quota of {max} bytes ([storage] max_bytes) and holds nothing that may be evicted: only images in use"
    )]
    QuotaFull { max: u64 },
}

/// Whether an I/O error means the disk (or the quota on it) is full.
pub fn out_of_space(error: &io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    error.kind() == io::ErrorKind::StorageFull
        || error.kind() == io::ErrorKind::QuotaExceeded
        || matches!(error.raw_os_error(), Some(ENOSPC | EDQUOT))
}

impl StorageError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
        move |source| StorageError::Io {
            path: path.to_owned(),
            source,
        }
    }
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

/// What a driver knows of an object besides its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    /// When it was created or last marked used, whichever is later.
    pub used: SystemTime,
}

/// One object of a listing.
#[derive(Clone, Debug)]
pub struct Listed {
    /// The object's key, e.g. `blobs/sha256/<hex>`.
    pub key: String,
    pub stat: Stat,
}

/// A held lease: kept alive while it exists, released when dropped.
pub trait Lease: Send + Sync {}

/// A store of named objects. Keys are relative, `/`-separated paths made by
/// the content store (`blobs/sha256/<hex>`, `manifests/sha256/<hex>`,
/// `values/<hex>`); a driver maps them to files or object names and knows
/// nothing of what they hold.
#[async_trait::async_trait]
pub trait Driver: Send + Sync + 'static {
    /// A local directory for spooling blobs before they are published.
    fn spool_dir(&self) -> &Path;

    /// Publishes a spooled file as `key` unless `key` exists (objects of
    /// one key are equal, so an existing one is success). Runs on a
    /// blocking thread.
    fn publish(&self, key: &str, file: tempfile::NamedTempFile) -> Result<(), StorageError>;

    /// Creates `key` holding `bytes` unless it exists.
    async fn create(&self, key: &str, bytes: Bytes) -> Result<(), StorageError>;

    /// Sets `key` to `bytes`, replacing what it held, atomically.
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError>;

    /// The object's size and last use, or `None`.
    async fn stat(&self, key: &str) -> Result<Option<Stat>, StorageError>;

    /// The object's bytes, all or `range` of them.
    async fn read(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobContent>, StorageError>;

    /// A small object whole (refused past `cap` bytes), with its stat.
    async fn read_small(&self, key: &str, cap: u64) -> Result<Option<(Bytes, Stat)>, StorageError>;

    /// Marks `key` used now (expiry keeps what was used within its TTL).
    async fn touch(&self, key: &str) -> Result<(), StorageError>;

    /// Every object whose key starts with `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StorageError>;

    /// Removes `key`; an absent key is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;

    /// Waits until this process holds the lease on `key` among every process
    /// sharing this store, so that work asked of many at once is done once.
    async fn lease(&self, key: &str) -> Result<Box<dyn Lease>, StorageError>;

    /// Whether clients download blobs from the backend itself
    /// ([`Driver::location`]): then blobs are better stored as bytes than
    /// as recipes, which the replica would have to stream.
    fn serves_downloads(&self) -> bool {
        false
    }

    /// Where clients may download `key` themselves (a `307` to a signed
    /// bucket URL), or `None` to have the bytes streamed by kontain.
    async fn location(&self, key: &str) -> Result<Option<String>, StorageError> {
        let _ = key;
        Ok(None)
    }
}

/// The content store `config` describes: its driver, and its TTL.
///
/// The directory is this process's alone (`owner`), so what a dead process
/// left half-written in it is removed at once.
pub async fn open(config: &StorageConfig) -> Result<ContentStore, StorageError> {
    let owner = owner::Owner::take(&config.path)?;
    let driver: Arc<dyn Driver> = match (config.backend, &config.gcs) {
        (Backend::Gcs, Some(gcs)) => {
            Arc::new(gcs::GcsDriver::open(gcs, &config.path, config.ttl).await?)
        }
        _ => Arc::new(filesystem::FilesystemDriver::open_owned(&config.path)?),
    };
    let backend = match config.backend {
        Backend::Gcs => "gcs",
        Backend::Filesystem => "filesystem",
    };
    let driver = Arc::new(measured::Measured::new(driver, backend));
    let mut store = ContentStore::new(driver, config.ttl).owned(owner);
    if let Some(max) = config.max_bytes.filter(|m| m.0 > 0) {
        store = store.with_quota(max.0);
        // Counts what is stored (and keeps to the quota if it was lowered).
        store.evict(None).await?;
    }
    Ok(store)
}

/// A content store on a fresh filesystem driver under `dir`, for tests.
#[cfg(test)]
pub(crate) fn test_store(dir: &Path) -> Arc<ContentStore> {
    let driver = filesystem::FilesystemDriver::open(dir).expect("a store in a temporary directory");
    Arc::new(ContentStore::new(
        Arc::new(driver),
        std::time::Duration::ZERO,
    ))
}

/// All of a stored blob (or `range` of it), for tests.
#[cfg(test)]
pub(crate) async fn read_all(
    store: &ContentStore,
    digest: &Digest,
    range: Option<ByteRange>,
) -> Vec<u8> {
    use futures_util::StreamExt;
    let BlobContent { body, .. } = store
        .read_blob(digest, range)
        .await
        .expect("a readable store")
        .expect("a stored blob");
    let chunks: Vec<_> = body.collect().await;
    chunks
        .into_iter()
        .flat_map(|c| c.expect("a readable blob").to_vec())
        .collect()
}
