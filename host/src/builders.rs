//! Native work that plugins ask the host to do: making layers and assembling
//! images. Everything here streams (bytes flow from a source through tar, gzip
//! and hashing into storage without ever being held whole) and runs CPU-bound
//! work on blocking threads, at most one per core at a time.
//!
//! Must not depend on wasmtime (`runtime`) or HTTP (`registry`): plugins reach
//! these functions through the runtime, which translates handles.

pub mod flatten;
pub mod gzip;
pub mod image;
pub mod ko;
pub mod random;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Semaphore;

use crate::oci::Digest;
use crate::storage::{Storage, StorageError};

pub use image::{HistoryEntry, ImageSpec, ManifestFormat, Platform};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("this request would produce {requested} bytes, over the generator's limit of {limit}")]
    LimitExceeded { requested: u64, limit: u64 },
    #[error("invalid image: {0}")]
    InvalidImage(String),
    #[error("{what}: more than the limit of {limit} bytes")]
    TooLarge { what: &'static str, limit: u64 },
    #[error(transparent)]
    Upstream(Box<crate::upstream::UpstreamError>),
    #[error(transparent)]
    Go(Box<crate::golang::GoError>),
    #[error("the request was cancelled")]
    Cancelled,
    #[error("a build task failed: {0}")]
    TaskFailed(String),
}

/// A layer blob in storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerBlob {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
}

/// Shared entry point for native builds: storage plus a bound on how much
/// CPU-heavy work runs at once.
#[derive(Clone)]
pub struct Builders {
    storage: Arc<dyn Storage>,
    cpu: Arc<Semaphore>,
    /// Concurrent requests for the same result build it once.
    locks: Arc<crate::upstream::KeyedLocks>,
}

impl From<crate::golang::GoError> for BuildError {
    fn from(e: crate::golang::GoError) -> Self {
        BuildError::Go(Box::new(e))
    }
}

impl From<crate::upstream::UpstreamError> for BuildError {
    fn from(e: crate::upstream::UpstreamError) -> Self {
        BuildError::Upstream(Box::new(e))
    }
}

impl Builders {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Builders {
            storage,
            cpu: Arc::new(Semaphore::new(cores)),
            locks: Default::default(),
        }
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Runs `work` on a blocking thread once a core is free. If the returned
    /// future is dropped (the request timed out or the client left), `work`
    /// sees its [`Cancel`] flag set and should stop early.
    pub async fn run_blocking<T, F>(&self, work: F) -> Result<T, BuildError>
    where
        T: Send + 'static,
        F: FnOnce(&Cancel) -> Result<T, BuildError> + Send + 'static,
    {
        let permit = self
            .cpu
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| BuildError::TaskFailed(e.to_string()))?;
        let cancel = Cancel::default();
        let guard = cancel.clone().on_drop();
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(&cancel)
        })
        .await
        .map_err(|e| BuildError::TaskFailed(e.to_string()))?;
        guard.disarm();
        result
    }
}

/// A flag long-running blocking work polls so that abandoned requests stop
/// consuming CPU and disk.
#[derive(Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn check(&self) -> Result<(), BuildError> {
        if self.0.load(Ordering::Relaxed) {
            Err(BuildError::Cancelled)
        } else {
            Ok(())
        }
    }

    fn on_drop(self) -> CancelOnDrop {
        CancelOnDrop(Some(self))
    }
}

struct CancelOnDrop(Option<Cancel>);

impl CancelOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.0.store(true, Ordering::Relaxed);
        }
    }
}

/// Publishes a finished layer blob whose uncompressed tar hashed to `diff_id`.
pub(crate) fn publish_layer(
    diff_id: Digest,
    blob: Box<dyn crate::storage::BlobWriter>,
) -> Result<LayerBlob, BuildError> {
    let info = blob.commit(None)?;
    Ok(LayerBlob {
        digest: info.digest,
        diff_id,
        size: info.size,
    })
}

pub(crate) fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> BuildError {
    move |source| BuildError::Io { what, source }
}

pub(crate) fn invalid(message: impl Into<String>) -> BuildError {
    BuildError::InvalidImage(message.into())
}

/// The digest of an image descriptor (`{"digest": …}`).
pub(crate) fn digest_of(v: &serde_json::Value) -> Result<Digest, BuildError> {
    v["digest"]
        .as_str()
        .ok_or_else(|| invalid("a descriptor without a digest"))?
        .parse()
        .map_err(|e| invalid(format!("a descriptor with a bad digest: {e}")))
}

/// JSON bytes with sorted keys (`serde_json::Value` maps are sorted), so the
/// same document always has the same digest.
pub(crate) fn canonical(v: &serde_json::Value) -> Result<bytes::Bytes, BuildError> {
    serde_json::to_vec(v)
        .map(bytes::Bytes::from)
        .map_err(|e| invalid(e.to_string()))
}
