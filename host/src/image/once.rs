//! Work done once: concurrent requests for the same manifest, blob or image
//! share one fetch or build, in this process and (through the storage's
//! lease) among every replica sharing the storage ([`once`], [`Builds`]).
//! For images built on request, a failure that asking again cannot fix is
//! answered from memory for a while. Trees on the local disk (unpacked
//! modules, builder filesystems, checkouts) are made once per process and
//! kept while used ([`DirCache`]). Answers that may change but are asked for
//! in bursts (a tag list paged through) are kept a short while ([`Recent`]).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Cpu, ImageError, io_error, work};
use crate::files::{COMPLETE, Scratch};
use crate::generator::{Classify, ErrorKind};
use crate::oci::Digest;
use crate::storage::{ContentStore, KeyedLocks, StorageError, StoredManifest};

/// How long a build that failed on its inputs (a compile error, no
/// detected group, a refused module) is answered from memory: anyone can
/// ask for a broken program over and over, and each ask would otherwise
/// cost a full build.
const FAILURE_MEMORY: Duration = Duration::from_secs(300);

/// How often a running build says how far it is, in the log.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// Failures remembered at most; past this the memory starts over.
const MAX_FAILURES: usize = 10_000;

/// `make`s the result for `key` unless `find` finds it: `find`, then,
/// holding the store's lock for `key`, `find` again, and only then `make`.
pub async fn once<T, E, Found, Made>(
    store: &ContentStore,
    key: String,
    find: impl Fn() -> Found,
    make: impl FnOnce() -> Made,
) -> Result<T, E>
where
    E: From<StorageError>,
    Found: Future<Output = Result<Option<T>, E>>,
    Made: Future<Output = Result<T, E>>,
{
    if let Some(found) = find().await? {
        return Ok(found);
    }
    let _held = store.lock(key).await?;
    if let Some(found) = find().await? {
        return Ok(found);
    }
    make().await
}

/// Values read lately, by key, answered from memory for `ttl`.
pub struct Recent<T> {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, Arc<T>)>>,
}

impl<T> Recent<T> {
    pub fn new(ttl: Duration) -> Self {
        Recent {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The value read for `key` within the last `ttl`.
    pub fn get(&self, key: &str) -> Option<Arc<T>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|(read, _)| read.elapsed() < self.ttl)
            .map(|(_, value)| value.clone())
    }

    /// The value read for `key` after `since` (and within the last `ttl`).
    pub fn get_since(&self, key: &str, since: Instant) -> Option<Arc<T>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|(read, _)| *read >= since && read.elapsed() < self.ttl)
            .map(|(_, value)| value.clone())
    }

    /// Keeps `value` as just read for `key` (and forgets stale ones).
    pub fn put(&self, key: String, value: T) -> Arc<T> {
        let value = Arc::new(value);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, (read, _)| read.elapsed() < self.ttl);
        entries.insert(key, (Instant::now(), value.clone()));
        value
    }
}

/// A failure of the same build a moment ago, answered from memory.
#[derive(Clone, Debug)]
pub struct Remembered {
    pub message: String,
    pub kind: ErrorKind,
    /// When the build failed.
    pub at: Instant,
}

/// A failure this fresh is the same pull's: docker asks `HEAD` then `GET`,
/// and its user must not read that the build failed before they asked.
const SAME_PULL: Duration = Duration::from_secs(15);

impl std::fmt::Display for Remembered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.at.elapsed() < SAME_PULL {
            true => f.write_str(&self.message),
            false => write!(
                f,
                "{} (this failure is remembered for {}s: asking again meanwhile answers it without another build)",
                self.message,
                FAILURE_MEMORY.as_secs()
            ),
        }
    }
}

impl std::error::Error for Remembered {}

impl Classify for Remembered {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// A build's own error, through [`once`]: what the store fails with becomes
/// an image error of the build's kind.
struct Failed<E>(E);

impl<E: From<ImageError>> From<StorageError> for Failed<E> {
    fn from(e: StorageError) -> Self {
        Failed(ImageError::from(e).into())
    }
}

/// Images built on request (ko, buildpack, flatten): the store they go to,
/// the CPU they are built on, each stored under a key that names everything
/// deciding the result.
pub struct Builds {
    store: Arc<ContentStore>,
    cpu: Cpu,
    failures: Mutex<HashMap<String, (Instant, Remembered)>>,
}

impl Builds {
    pub fn new(store: Arc<ContentStore>, cpu: Cpu) -> Self {
        Builds {
            store,
            cpu,
            failures: Mutex::default(),
        }
    }

    pub fn store(&self) -> &Arc<ContentStore> {
        &self.store
    }

    pub fn cpu(&self) -> &Cpu {
        &self.cpu
    }

    /// The image built for `key`: from storage if it was built before and
    /// everything it refers to is still there, else `build`, once, and
    /// remembered under `key`. A build that fails on its inputs is not
    /// retried for [`FAILURE_MEMORY`].
    pub async fn build<E, Built>(
        &self,
        key: &str,
        build: impl FnOnce() -> Built,
    ) -> Result<StoredManifest, E>
    where
        E: From<ImageError> + Classify,
        Built: Future<Output = Result<StoredManifest, E>>,
    {
        let find = || async move { Ok::<_, Failed<E>>(self.cached(key).await?) };
        let generator = crate::activity::generator();
        let missed = std::sync::atomic::AtomicBool::new(false);
        let made = once(&self.store, key.to_owned(), find, || async {
            missed.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(failure) = self.recent_failure(key) {
                return Err(Failed(ImageError::from(failure).into()));
            }
            // Nothing new while storage is full of images in use.
            self.store.room().await?;
            // The client's build budget, then its turn in the queue.
            let _turn = crate::activity::build_turn()
                .await
                .map_err(|d| Failed(ImageError::from(d).into()))?;
            let listed = crate::activity::build_started();
            match crate::activity::client() {
                Some(client) => tracing::info!(%client, "build started"),
                None => tracing::info!("build started"),
            }
            // A line every PROGRESS_EVERY while it runs: what it is doing.
            let progress = async {
                let first = tokio::time::Instant::now() + PROGRESS_EVERY;
                let mut every = tokio::time::interval_at(first, PROGRESS_EVERY);
                loop {
                    every.tick().await;
                    let (phase, elapsed) = listed.progress();
                    tracing::info!(
                        phase,
                        elapsed_seconds = elapsed.as_secs(),
                        "build in progress"
                    );
                }
            };
            let result = tokio::select! {
                result = build() => result,
                never = progress => match never {},
            };
            let seconds = listed.elapsed().as_secs_f64();
            match result {
                Ok(built) => {
                    self.store.put_tag(key, &built.digest).await?;
                    tracing::info!(digest = %built.digest, seconds, "build ended");
                    listed.finish(None);
                    Ok(built)
                }
                Err(e) => {
                    tracing::info!(error = %e, seconds, "build failed");
                    // Shown on the landing page: what a client would be told
                    // (server-side failures may name paths; the log has them).
                    listed.finish(Some(match e.kind() {
                        ErrorKind::Internal
                        | ErrorKind::OutOfSpace
                        | ErrorKind::Unavailable
                        | ErrorKind::Deadline => {
                            "failed on the server's side (its log has the details)".to_owned()
                        }
                        _ => e.to_string(),
                    }));
                    self.remember(key, &e);
                    Err(Failed(e))
                }
            }
        })
        .await;
        let missed = missed.load(std::sync::atomic::Ordering::Relaxed);
        crate::metrics::cache(&generator, "build", !missed);
        made.map_err(|Failed(e)| e)
    }

    fn recent_failure(&self, key: &str) -> Option<Remembered> {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (at, _)| at.elapsed() < FAILURE_MEMORY);
        map.get(key).map(|(_, failure)| failure.clone())
    }

    /// Remembers `error` if the same inputs would fail the same way again.
    fn remember(&self, key: &str, error: &impl Classify) {
        let kind = error.kind();
        if !kind.is_deterministic() {
            return;
        }
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > MAX_FAILURES {
            map.clear();
        }
        let message = error.to_string();
        let at = Instant::now();
        map.insert(key.to_owned(), (at, Remembered { message, kind, at }));
    }

    /// The manifest a build remembered under `key`, if it and everything it
    /// refers to are still stored. Expiry can remove a blob while something
    /// still names it (a tag of a manifest being collected); a rebuild, which
    /// is reproducible, puts it back under the same digest.
    async fn cached(&self, key: &str) -> Result<Option<StoredManifest>, StorageError> {
        let Some(digest) = self.store.tag(key).await? else {
            return Ok(None);
        };
        let Some(manifest) = self.store.manifest(&digest).await? else {
            return Ok(None);
        };
        Ok(self.complete(&manifest, 2).await?.then_some(manifest))
    }

    /// Whether every blob `manifest` refers to is stored, and for an index
    /// every child manifest and its blobs (indexes nested `depth` deep).
    async fn complete(&self, manifest: &StoredManifest, depth: u8) -> Result<bool, StorageError> {
        let document: serde_json::Value =
            serde_json::from_slice(&manifest.bytes).unwrap_or_default();
        let children: Vec<Digest> = document["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["digest"].as_str()?.parse().ok())
            .collect();
        for child in &children {
            let stored = match self.store.manifest(child).await? {
                Some(stored) if depth > 0 => stored,
                _ => return Ok(false),
            };
            if !Box::pin(self.complete(&stored, depth - 1)).await? {
                return Ok(false);
            }
        }
        for blob in crate::oci::references(&manifest.bytes) {
            if !children.contains(&blob) && self.store.blob_size(&blob).await?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Trees made once and kept while used: `<root>/<key>/` holds what `make`
/// wrote and a [`COMPLETE`] marker whose modification time is its last use.
/// A tree is made aside (under `tmp`) and renamed into place whole, so a
/// reader never sees half of one.
pub struct DirCache {
    root: PathBuf,
    tmp: PathBuf,
    locks: KeyedLocks,
}

impl DirCache {
    pub fn new(root: PathBuf, tmp: PathBuf) -> Self {
        DirCache {
            root,
            tmp,
            locks: KeyedLocks::default(),
        }
    }

    /// The directory for `key`, made by `make` (into an empty directory)
    /// the first time, once however many ask at once.
    pub async fn get_or_make<E, Made>(
        &self,
        key: &str,
        make: impl FnOnce(PathBuf) -> Made,
    ) -> Result<PathBuf, E>
    where
        E: From<ImageError> + Send + 'static,
        Made: Future<Output = Result<(), E>>,
    {
        let dir = self.root.join(key);
        if used(&dir) {
            return Ok(dir);
        }
        let _guard = self.locks.lock(key.to_owned()).await;
        if used(&dir) {
            return Ok(dir);
        }
        let tmp = self.tmp.clone();
        // Removed (off the async threads) if making it fails or is dropped.
        let entry = work::blocking(move || {
            std::fs::create_dir_all(&tmp).map_err(io_error("creating a cache directory"))?;
            tempfile::Builder::new()
                .prefix("make-")
                .tempdir_in(&tmp)
                .map(Scratch::new)
                .map_err(io_error("creating a cache directory"))
        })
        .await?;
        make(entry.path().to_owned()).await?;
        let finished = dir.clone();
        work::blocking(move || {
            std::fs::write(entry.path().join(COMPLETE), b"")
                .map_err(io_error("marking a cache directory complete"))?;
            if let Some(parent) = finished.parent() {
                std::fs::create_dir_all(parent).map_err(io_error("creating a cache directory"))?;
            }
            let Some(made) = entry.keep() else {
                return Err(ImageError::TaskFailed("a cache directory vanished".into()));
            };
            if let Err(e) = std::fs::rename(&made, &finished) {
                crate::files::remove(&made);
                // Another process sharing the scratch directory won.
                if !finished.join(COMPLETE).exists() {
                    return Err(io_error("moving a cache directory into place")(e));
                }
            }
            Ok::<_, ImageError>(())
        })
        .await?;
        Ok(dir)
    }

    /// Removes the trees unused for `ttl`; returns how many went.
    pub fn expire(&self, ttl: Duration) -> usize {
        crate::files::expire_dirs(&self.root, ttl)
    }
}

/// Whether `dir` is a finished tree; if so, marks it used now.
fn used(dir: &Path) -> bool {
    match std::fs::File::open(dir.join(COMPLETE)) {
        Ok(marker) => {
            let _ = marker.set_modified(std::time::SystemTime::now());
            true
        }
        Err(_) => false,
    }
}
