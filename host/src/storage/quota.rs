//! A storage quota (`[storage] max_bytes`): when an image completes and the
//! store holds more than the quota, the least recently used images go, with
//! what only they use, until it fits; the image just made, images served in
//! the last moments (a pull in progress fetches their blobs next) and young
//! blobs no manifest names yet (an image being made) never go. If those
//! alone pass the quota, new work is refused (507) until space frees; what
//! is stored is still served.
//!
//! The store's size is a listing's total plus what was written since; every
//! eviction lists again, so the estimate never drifts far.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::content::{blob_key, manifest_key};
use super::expiry::{Graph, digest_of_key, index};
use super::referrers::pair_of_key;
use super::remade::recipe_key;
use super::{ContentStore, StorageError};
use crate::oci::Digest;

/// What was used this recently is being pulled: never evicted. Short: a
/// client asks for blobs right after the manifest, and a download in
/// progress is tracked by itself until its last byte (which, while it
/// lasts, keeps its whole image).
const IN_USE: Duration = Duration::from_secs(2);

/// A blob no stored manifest names may belong to an image being made (a
/// build writes its layers long before its manifest): kept this long after
/// it was written or last used, the longest a build may run by default.
const UNNAMED_GRACE: Duration = Duration::from_secs(30 * 60);

/// Eviction frees down to this share of the quota, so that not every new
/// image has to evict again.
const LOW_WATER: f64 = 0.9;

/// While the store is full of images in use, new work re-checks at most
/// this often (each check lists the store).
const FULL_RECHECK: Duration = Duration::from_secs(5);

/// Uses remembered in memory at most (finer than the stored marks, which
/// are refreshed only every tenth of the TTL).
const MAX_REMEMBERED: usize = 100_000;

pub(crate) struct Quota {
    max: u64,
    /// The last listing's total.
    listed: AtomicU64,
    /// Bytes written since (shared with blob writers).
    pub(super) added: Arc<AtomicU64>,
    /// Set when eviction could not get under the quota.
    full: AtomicBool,
    /// When a full store was last checked again.
    rechecked: Mutex<Option<Instant>>,
    evicting: tokio::sync::Mutex<()>,
    /// When each key was last used by this process.
    used: Mutex<HashMap<String, Instant>>,
    /// Blobs being read now (a download in progress), by key.
    reading: Arc<Mutex<HashMap<String, usize>>>,
}

/// A blob read in progress: counted while it lives.
pub(crate) struct Reading {
    key: String,
    reading: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Reading {
    fn drop(&mut self) {
        let mut reading = self.reading.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = reading.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                reading.remove(&self.key);
            }
        }
    }
}

impl Quota {
    pub(crate) fn new(max: u64) -> Self {
        Quota {
            max,
            listed: AtomicU64::new(0),
            added: Arc::default(),
            full: AtomicBool::new(false),
            rechecked: Mutex::default(),
            evicting: tokio::sync::Mutex::new(()),
            used: Mutex::default(),
            reading: Arc::default(),
        }
    }

    /// Counts a read of `key` in progress until the guard is dropped.
    pub(super) fn reading(&self, key: &str) -> Reading {
        let mut reading = self.reading.lock().unwrap_or_else(|p| p.into_inner());
        *reading.entry(key.to_owned()).or_default() += 1;
        Reading {
            key: key.to_owned(),
            reading: self.reading.clone(),
        }
    }

    fn being_read(&self, key: &str) -> bool {
        self.reading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(key)
    }

    fn estimate(&self) -> u64 {
        self.listed.load(Ordering::Relaxed) + self.added.load(Ordering::Relaxed)
    }

    /// Remembers that `key` was used now.
    pub(super) fn used(&self, key: &str) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if used.len() >= MAX_REMEMBERED {
            // The oldest half goes (the stored marks still order them).
            let mut ages: Vec<Instant> = used.values().copied().collect();
            let (_, middle, _) = ages.select_nth_unstable(used.len() / 2);
            let middle = *middle;
            used.retain(|_, at| *at > middle);
        }
        used.insert(key.to_owned(), Instant::now());
    }

    /// When `key` was last used: the later of its stored mark and this
    /// process's memory.
    fn last_use(&self, key: &str, stored: SystemTime) -> SystemTime {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        match used.get(key) {
            Some(at) => stored.max(SystemTime::now() - at.elapsed()),
            None => stored,
        }
    }
}

/// The store is over its quota and nothing more can go.
pub(crate) fn quota_full(max: u64) -> StorageError {
    StorageError::QuotaFull { max }
}

impl ContentStore {
    /// Whether new content may be made: not while the store is over its
    /// quota with nothing left to evict.
    pub async fn room(&self) -> Result<(), StorageError> {
        let Some(quota) = &self.quota else {
            return Ok(());
        };
        if quota.full.load(Ordering::Relaxed) && quota.estimate() > quota.max {
            // Something may have stopped being in use meanwhile; looked at
            // again now and then, not at every request.
            let due = {
                let mut last = quota.rechecked.lock().unwrap_or_else(|p| p.into_inner());
                let due = last.is_none_or(|at| at.elapsed() >= FULL_RECHECK);
                if due {
                    *last = Some(Instant::now());
                }
                due
            };
            if due {
                self.evict(None).await?;
            }
            if quota.full.load(Ordering::Relaxed) {
                return Err(quota_full(quota.max));
            }
        }
        Ok(())
    }

    /// After `made` was stored: evicts if the store is over its quota.
    pub(super) async fn after_write(&self, made: Option<&Digest>) {
        let Some(quota) = &self.quota else {
            return;
        };
        if quota.estimate() <= quota.max {
            return;
        }
        if let Err(e) = self.evict(made).await {
            tracing::warn!(error = %e, "evicting to the storage quota failed");
        }
    }

    /// Keeps to the quota after content was added outside an image write
    /// (a blob fetched on its own).
    pub async fn keep_to_quota(&self) {
        self.after_write(None).await;
    }

    /// Counts the store, and removes least recently used images until it
    /// fits the quota (sparing `made` and what is in use).
    pub(super) async fn evict(&self, made: Option<&Digest>) -> Result<(), StorageError> {
        let Some(quota) = &self.quota else {
            return Ok(());
        };
        let _one = quota.evicting.lock().await;
        // Another eviction may have made room while this one waited.
        if made.is_some() && quota.estimate() <= quota.max {
            return Ok(());
        }
        // Writes from here on count on top of this listing.
        quota.added.store(0, Ordering::Relaxed);
        let driver = self.driver();
        let manifests = driver.list("manifests/").await?;
        let mut blobs = driver.list("blobs/").await?;
        blobs.extend(driver.list("recipes/").await?);
        let pairs = driver.list("referrers/").await?;
        let values = driver.list("values/").await?;
        let total: u64 = [&manifests, &blobs, &pairs, &values]
            .iter()
            .flat_map(|l| l.iter())
            .map(|o| o.stat.size)
            .sum();
        quota.listed.store(total, Ordering::Relaxed);
        if total <= quota.max {
            quota.full.store(false, Ordering::Relaxed);
            return Ok(());
        }
        let now = SystemTime::now();
        let in_use = |key: &str, stored: SystemTime| {
            quota.being_read(key)
                || now
                    .duration_since(quota.last_use(key, stored))
                    .unwrap_or_default()
                    < IN_USE
        };
        let blob_used: HashMap<Digest, SystemTime> = blobs
            .iter()
            .filter_map(|b| Some((digest_of_key(&b.key)?, b.stat.used)))
            .collect();
        // A blob of an image a client is pulling: being read, or just used.
        let blob_in_use = |d: &Digest| {
            blob_used
                .get(d)
                .is_some_and(|used| in_use(&blob_key(d), *used) || in_use(&recipe_key(d), *used))
        };
        let mut sizes: HashMap<Digest, u64> = HashMap::new();
        for object in manifests.iter().chain(&blobs) {
            if let Some(d) = digest_of_key(&object.key) {
                *sizes.entry(d).or_default() += object.stat.size;
            }
        }
        let (known, referrers) = index(&manifests, &pairs);
        let graph = Graph {
            known: &known,
            referrers: &referrers,
        };
        // What each image reaches, whether it is in use (just made, just
        // served, or a blob of it being downloaded), and when it was last
        // used; and everything any image reaches.
        let mut reaches = Vec::with_capacity(known.len());
        let mut named: HashSet<Digest> = HashSet::new();
        for (digest, m) in &known {
            let key = manifest_key(digest);
            let mut reached = HashSet::new();
            self.reach(&graph, &mut reached, vec![digest.clone()]).await;
            named.extend(reached.iter().cloned());
            let protected = made == Some(digest)
                || in_use(&key, m.stat.used)
                || reached.iter().any(&blob_in_use);
            reaches.push((protected, quota.last_use(&key, m.stat.used), reached));
        }
        // Images in use first, then the rest newest first: each is kept if
        // it is in use or what it adds still fits; from the first that does
        // not, the rest go.
        reaches.sort_by_key(|r| std::cmp::Reverse((r.0, r.1)));
        // Blobs no image names yet, written or used lately, belong to an
        // image being made: they stay, and take their room; so do values
        // and referrer pairs, which eviction leaves.
        let unnamed_young = |b: &super::Listed| {
            digest_of_key(&b.key).is_some_and(|d| !named.contains(&d))
                && now
                    .duration_since(quota.last_use(&b.key, b.stat.used))
                    .unwrap_or_default()
                    < UNNAMED_GRACE
        };
        let young: u64 = blobs
            .iter()
            .filter(|b| unnamed_young(b))
            .map(|b| b.stat.size)
            .sum();
        let kept: u64 = values.iter().chain(&pairs).map(|o| o.stat.size).sum();
        let room = ((quota.max as f64 * LOW_WATER) as u64).saturating_sub(young + kept);
        let mut live: HashSet<Digest> = HashSet::new();
        let mut live_bytes = 0;
        let mut exhausted = false;
        for (protected, _, reached) in reaches {
            let adds: u64 = reached
                .iter()
                .filter(|d| !live.contains(*d))
                .map(|d| sizes.get(d).copied().unwrap_or_default())
                .sum();
            if protected || (!exhausted && live_bytes + adds <= room) {
                live.extend(reached);
                live_bytes += adds;
            } else {
                exhausted = true;
            }
        }
        let mut freed = 0;
        let mut images = 0;
        for (digest, m) in &known {
            if !live.contains(digest) {
                driver.delete(&manifest_key(digest)).await?;
                freed += m.stat.size;
                images += 1;
            }
        }
        for pair in &pairs {
            if let Some((subject, referrer)) = pair_of_key(&pair.key)
                && !(live.contains(&subject) && live.contains(&referrer))
            {
                driver.delete(&pair.key).await?;
                freed += pair.stat.size;
            }
        }
        for blob in &blobs {
            let Some(digest) = digest_of_key(&blob.key)
                .filter(|d| blob.key == blob_key(d) || blob.key == recipe_key(d))
            else {
                continue;
            };
            if live.contains(&digest) || in_use(&blob.key, blob.stat.used) || unnamed_young(blob) {
                continue;
            }
            driver.delete(&blob.key).await?;
            freed += blob.stat.size;
        }
        let left = total.saturating_sub(freed);
        quota.listed.store(left, Ordering::Relaxed);
        let full = left > quota.max;
        quota.full.store(full, Ordering::Relaxed);
        tracing::info!(
            images,
            bytes = freed,
            stored = left,
            quota = quota.max,
            full,
            "evicted least recently used images to the storage quota"
        );
        crate::metrics::expiry(freed);
        Ok(())
    }
}
