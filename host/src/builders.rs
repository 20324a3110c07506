//! Native work that plugins ask the host to do: making layers and assembling
//! images. Everything here streams (bytes flow from a source through tar, gzip
//! and hashing into storage without ever being held whole) and runs CPU-bound
//! work on blocking threads, at most one per core at a time.
//!
//! Must not depend on wasmtime (`runtime`) or HTTP (`registry`): plugins reach
//! these functions through the runtime, which translates handles.

pub mod buildpack;
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
use crate::storage::{Storage, StorageError, StoredManifest};

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
    #[error(transparent)]
    Buildpack(Box<crate::buildpack::BuildpackError>),
    #[error("the request was cancelled")]
    Cancelled,
    /// A deterministic failure of the same build a moment ago.
    #[error("{message} (the same build failed less than {}s ago; it is not retried before then)", FAILURE_MEMORY.as_secs())]
    Remembered { message: String, refused: bool },
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
    /// Local work (unpacking a builder image) done once per process.
    locks: Arc<crate::locks::KeyedLocks>,
    /// Concurrent requests for the same image build it once, across
    /// replicas sharing the storage too.
    builds: Arc<crate::locks::Exclusive>,
    failures: Arc<Failures>,
}

/// How long a build that failed on its inputs (a compile error, no
/// detected group, a refused module) is answered from memory: anyone can
/// ask for a broken program over and over, and each ask would otherwise
/// cost a full build.
const FAILURE_MEMORY: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Default)]
struct Failures(
    std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, String, bool)>>,
);

impl Failures {
    fn recent(&self, key: &str) -> Option<BuildError> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (at, _, _)| at.elapsed() < FAILURE_MEMORY);
        map.get(key)
            .map(|(_, message, refused)| BuildError::Remembered {
                message: message.clone(),
                refused: *refused,
            })
    }

    /// Remembers `error` if the same inputs would fail the same way again.
    fn record(&self, key: &str, error: &BuildError) {
        use crate::buildpack::BuildpackError as B;
        use crate::golang::GoError as G;
        let refused = match error {
            BuildError::Go(e) => match **e {
                G::BuildFailed { .. } => false,
                G::UnsafeModule { .. } | G::BadOptions { .. } => true,
                _ => return,
            },
            BuildError::Buildpack(e) => match **e {
                B::NoGroupPassed { .. } | B::BuildpackFailed { .. } => false,
                _ => return,
            },
            _ => return,
        };
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            map.clear();
        }
        map.insert(
            key.to_owned(),
            (std::time::Instant::now(), error.to_string(), refused),
        );
    }
}

impl From<crate::buildpack::BuildpackError> for BuildError {
    fn from(e: crate::buildpack::BuildpackError) -> Self {
        BuildError::Buildpack(Box::new(e))
    }
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
            builds: Arc::new(crate::locks::Exclusive::new(storage.clone())),
            storage,
            cpu: Arc::new(Semaphore::new(cores)),
            locks: Default::default(),
            failures: Default::default(),
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

/// A layer being written: tar, hashed for the diff id, gzipped into storage.
pub(crate) type LayerTar = tar::Builder<
    crate::oci::Sha256Writer<flate2::write::GzEncoder<Box<dyn crate::storage::BlobWriter>>>,
>;

/// Writes a layer from `fill` into storage (from a blocking thread).
pub(crate) fn write_layer(
    storage: &dyn Storage,
    fill: impl FnOnce(&mut LayerTar) -> Result<(), BuildError>,
) -> Result<LayerBlob, BuildError> {
    let blob = storage.blob_writer(u64::MAX)?;
    let mut tar = tar::Builder::new(crate::oci::Sha256Writer::new(
        flate2::write::GzEncoder::new(blob, flate2::Compression::fast()),
    ));
    fill(&mut tar)?;
    let hashed = tar.into_inner().map_err(io_error("finishing a layer"))?;
    let (diff_id, _, gzip) = hashed.finish();
    let blob = gzip.finish().map_err(io_error("finishing gzip"))?;
    publish_layer(diff_id, blob)
}

/// A tar header with everything that would make a layer irreproducible
/// fixed: owner, mtime, and the given mode.
pub(crate) fn fixed_header(
    kind: tar::EntryType,
    mode: u32,
    owner: (u32, u32),
    mtime: u64,
    size: u64,
) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_mtime(mtime);
    h.set_uid(owner.0.into());
    h.set_gid(owner.1.into());
    h.set_size(size);
    h
}

/// The `Env` list of an image config.
pub(crate) fn config_env(config: &serde_json::Value) -> Vec<String> {
    config["config"]["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl Builders {
    /// Runs `build` for `key` unless the same build failed deterministically
    /// within [`FAILURE_MEMORY`]; remembers such a failure.
    pub(crate) async fn unless_failed_recently<T>(
        &self,
        key: &str,
        build: impl std::future::Future<Output = Result<T, BuildError>>,
    ) -> Result<T, BuildError> {
        if let Some(failure) = self.failures.recent(key) {
            return Err(failure);
        }
        let result = build.await;
        if let Err(e) = &result {
            self.failures.record(key, e);
        }
        result
    }

    /// The manifest a build remembered under `key`, if it and everything it
    /// refers to are still stored. Expiry on a bucket (a lifecycle rule) can
    /// remove a shared blob before a manifest that uses it; a rebuild, which
    /// is reproducible, puts it back under the same digest.
    pub(crate) async fn cached(&self, key: &str) -> Result<Option<StoredManifest>, BuildError> {
        let Some(digest) = self.storage.tag(key).await? else {
            return Ok(None);
        };
        let Some(manifest) = self.storage.manifest(&digest).await? else {
            return Ok(None);
        };
        Ok(self.complete(&manifest, 2).await?.then_some(manifest))
    }

    /// Whether every blob `manifest` refers to is stored, and for an index
    /// every child manifest and its blobs (indexes nested `depth` deep).
    async fn complete(&self, manifest: &StoredManifest, depth: u8) -> Result<bool, BuildError> {
        let document: serde_json::Value =
            serde_json::from_slice(&manifest.bytes).map_err(|e| invalid(e.to_string()))?;
        let digests = |v: &serde_json::Value| -> Vec<Digest> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d["digest"].as_str()?.parse().ok())
                .collect()
        };
        for child in digests(&document["manifests"]) {
            let stored = match self.storage.manifest(&child).await? {
                Some(stored) if depth > 0 => stored,
                _ => return Ok(false),
            };
            if !Box::pin(self.complete(&stored, depth - 1)).await? {
                return Ok(false);
            }
        }
        let config = document["config"]["digest"]
            .as_str()
            .and_then(|d| d.parse().ok());
        for blob in config.into_iter().chain(digests(&document["layers"])) {
            if self.storage.blob_size(&blob).await?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Stores `config` and a manifest that is `base` (a document of
    /// `base_type`) with `layers` appended, typed like the base's layers;
    /// `annotate` may edit the manifest last.
    pub(crate) async fn extend_image(
        &self,
        base_type: &crate::oci::MediaType,
        mut manifest: serde_json::Value,
        config: &serde_json::Value,
        layers: &[&LayerBlob],
        annotate: impl FnOnce(&mut serde_json::Value),
    ) -> Result<StoredManifest, BuildError> {
        use crate::oci::MediaType;
        use serde_json::json;
        let config_bytes = canonical(config)?;
        let config_blob = {
            let storage = self.storage.clone();
            let bytes = config_bytes.clone();
            self.run_blocking(move |_| Ok(crate::storage::write_blob(storage.as_ref(), &bytes)?))
                .await?
        };
        let layer_type = if base_type.as_str() == MediaType::DOCKER_MANIFEST {
            MediaType::DOCKER_LAYER_GZIP
        } else {
            MediaType::OCI_LAYER_GZIP
        };
        manifest["config"]["digest"] = json!(config_blob.digest.to_string());
        manifest["config"]["size"] = json!(config_bytes.len());
        let list = manifest["layers"]
            .as_array_mut()
            .ok_or_else(|| invalid("a base manifest without layers"))?;
        for layer in layers {
            list.push(json!({
                "mediaType": layer_type,
                "digest": layer.digest.to_string(),
                "size": layer.size,
            }));
        }
        annotate(&mut manifest);
        Ok(self
            .storage
            .put_manifest(base_type, canonical(&manifest)?)
            .await?)
    }
}
