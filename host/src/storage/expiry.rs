//! Expiry, once for every driver: a mark and sweep over the store.
//!
//! Roots are the manifests and values (tags) used within the TTL; everything
//! they reach (index children, configs, layers) is kept, whatever its age.
//! Then manifests nothing reaches go, then blobs nothing reaches that are
//! themselves older than the TTL (younger ones may belong to an image being
//! made right now), then values unused for the TTL. Serving a manifest or
//! reading a tag marks it used, so a blob of an image people pull is never
//! removed before its manifest, and a blob that a newer image shares lives as
//! long as that image.
//!
//! Nothing is deleted on the strength of the listing alone: each victim is
//! looked at again just before it goes, and one used meanwhile (a manifest
//! served, a blob asked for or written again for a new image) stays, with
//! what it reaches. A new image that starts using an old blob in the moment
//! between that last look and the delete can still lose it; its next pull
//! or rebuild puts it back (mirrors fetch it again, builds are
//! reproducible).
//!
//! Replicas sharing a bucket take turns: a collection holds the store's lease
//! on expiry and is skipped if another replica ran one moments ago.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::content::{blob_key, manifest_key};
use super::referrers::pair_of_key;
use super::remade::recipe_key;
use super::{ContentStore, Listed, Stat, StorageError};
use crate::oci::Digest;

/// The value recording when the last collection finished (Unix seconds).
const LAST_RUN: &str = "kontain expiry last run";

/// Values longer than this are not tags (a digest is 71 bytes).
const MAX_TAG_VALUE: u64 = 256;

/// What one collection removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub manifests: usize,
    pub blobs: usize,
    pub values: usize,
    pub bytes: u64,
}

/// `sha256:<hex>` from the last two components of a key
/// (`manifests/sha256/<hex>`).
pub(super) fn digest_of_key(key: &str) -> Option<Digest> {
    let mut parts = key.rsplit('/');
    let (hex, algorithm) = (parts.next()?, parts.next()?);
    format!("{algorithm}:{hex}").parse().ok()
}

/// What the store holds: counts and bytes, and the stored manifests'
/// digests (most recently used first), for the landing page.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub blobs: u64,
    pub manifests: u64,
    pub bytes: u64,
    pub manifest_digests: Vec<Digest>,
}

impl ContentStore {
    /// Lists the store (one listing of blobs and one of manifests).
    pub async fn usage(&self) -> Result<Usage, StorageError> {
        let driver = self.driver();
        // Blobs kept as recipes count as blobs (of a few hundred bytes).
        let mut blobs = driver.list("blobs/").await?;
        blobs.extend(driver.list("recipes/").await?);
        let mut manifests = driver.list("manifests/").await?;
        manifests.sort_by_key(|m| std::cmp::Reverse(m.stat.used));
        let bytes = blobs.iter().chain(&manifests).map(|o| o.stat.size).sum();
        Ok(Usage {
            blobs: blobs.len() as u64,
            manifests: manifests.len() as u64,
            bytes,
            manifest_digests: manifests
                .iter()
                .filter_map(|m| digest_of_key(&m.key))
                .collect(),
        })
    }

    /// Removes what has not been used for `ttl` (see the module comment),
    /// unless another process sharing the store collected within the last
    /// half of `every`; then `None`. A zero `ttl` keeps everything.
    pub async fn collect(
        &self,
        ttl: Duration,
        every: Duration,
    ) -> Result<Option<Collected>, StorageError> {
        if ttl.is_zero() {
            return Ok(None);
        }
        let _turn = self.lock(LAST_RUN.to_owned()).await?;
        let now = SystemTime::now();
        let last = self
            .value(LAST_RUN)
            .await?
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|secs| UNIX_EPOCH + Duration::from_secs(secs));
        if last.is_some_and(|t| now.duration_since(t).unwrap_or_default() < every / 2) {
            return Ok(None);
        }
        let collected = self
            .collect_now(now.checked_sub(ttl).unwrap_or(UNIX_EPOCH))
            .await?;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.put_value(LAST_RUN, &secs.as_secs().to_string())
            .await?;
        Ok(Some(collected))
    }

    async fn collect_now(&self, cutoff: SystemTime) -> Result<Collected, StorageError> {
        let driver = self.driver();
        let manifests = driver.list("manifests/").await?;
        let values = driver.list("values/").await?;
        let pairs = driver.list("referrers/").await?;
        let (known, referrers) = index(&manifests, &pairs);
        let graph = Graph {
            known: &known,
            referrers: &referrers,
        };

        // Mark: from the roots, through every manifest they reach.
        let mut roots: Vec<Digest> = known
            .iter()
            .filter(|(_, m)| m.stat.used >= cutoff)
            .map(|(d, _)| d.clone())
            .collect();
        // A tag's value is a digest; longer values (plugin caches) are not.
        let tags = values
            .iter()
            .filter(|v| v.stat.used >= cutoff && v.stat.size <= MAX_TAG_VALUE);
        for value in tags {
            if let Ok(Some((bytes, _))) = driver.read_small(&value.key, MAX_TAG_VALUE).await
                && let Ok(digest) = String::from_utf8_lossy(&bytes).trim().parse()
            {
                roots.push(digest);
            }
        }
        let mut live: HashSet<Digest> = HashSet::new();
        self.reach(&graph, &mut live, roots).await;

        // Sweep. Each victim is looked at once more just before it goes:
        // one used since the listing (a manifest served, a blob asked for or
        // written again by a new image) stays, and so does what it reaches.
        let mut done = Collected::default();
        let mut spared = Vec::new();
        for (digest, m) in &known {
            if live.contains(digest) {
                continue;
            }
            let key = manifest_key(digest);
            if used_since(driver.stat(&key).await?, cutoff) {
                spared.push(digest.clone());
                continue;
            }
            driver.delete(&key).await?;
            done.manifests += 1;
            done.bytes += m.stat.size;
        }
        self.reach(&graph, &mut live, spared).await;
        // A pair goes with either of its manifests; a young one may belong to
        // an image written after the manifests were listed.
        for pair in &pairs {
            let Some((subject, referrer)) = pair_of_key(&pair.key) else {
                continue;
            };
            if (live.contains(&subject) && live.contains(&referrer)) || pair.stat.used >= cutoff {
                continue;
            }
            driver.delete(&pair.key).await?;
            done.bytes += pair.stat.size;
        }
        let mut blobs = driver.list("blobs/").await?;
        blobs.extend(driver.list("recipes/").await?);
        for blob in blobs {
            // Only keys of the store's own shape: a stray file in `blobs/`
            // (an editor's backup, say) is left alone.
            let Some(digest) = digest_of_key(&blob.key)
                .filter(|d| blob.key == blob_key(d) || blob.key == recipe_key(d))
            else {
                continue;
            };
            if live.contains(&digest)
                || blob.stat.used >= cutoff
                || used_since(driver.stat(&blob.key).await?, cutoff)
            {
                continue;
            }
            driver.delete(&blob.key).await?;
            done.blobs += 1;
            done.bytes += blob.stat.size;
        }
        for value in values.iter().filter(|v| v.stat.used < cutoff) {
            if used_since(driver.stat(&value.key).await?, cutoff) {
                continue;
            }
            driver.delete(&value.key).await?;
            done.values += 1;
            done.bytes += value.stat.size;
        }
        Ok(done)
    }

    /// Adds to `live` everything `roots` reach through the manifests known
    /// and their referrers.
    pub(super) async fn reach(
        &self,
        graph: &Graph<'_>,
        live: &mut HashSet<Digest>,
        mut queue: Vec<Digest>,
    ) {
        while let Some(digest) = queue.pop() {
            if !live.insert(digest.clone()) || !graph.known.contains_key(&digest) {
                continue;
            }
            if let Some(referrers) = graph.referrers.get(&digest) {
                queue.extend(referrers.iter().cloned());
            }
            // Unreadable manifests keep nothing alive and are swept.
            if let Ok(Some(manifest)) = self.read_manifest(&digest, false).await {
                queue.extend(crate::oci::references(&manifest.bytes));
            }
        }
    }
}

/// The manifests of a listing by digest, and the referrers of each (a
/// referrer, an image's SBOM, lives as long as its subject).
pub(super) fn index<'a>(
    manifests: &'a [Listed],
    pairs: &[Listed],
) -> (HashMap<Digest, &'a Listed>, HashMap<Digest, Vec<Digest>>) {
    let known = manifests
        .iter()
        .filter_map(|m| Some((digest_of_key(&m.key)?, m)))
        .collect();
    let mut referrers: HashMap<Digest, Vec<Digest>> = HashMap::new();
    for (subject, referrer) in pairs.iter().filter_map(|p| pair_of_key(&p.key)) {
        referrers.entry(subject).or_default().push(referrer);
    }
    (known, referrers)
}

/// What a collection found: the manifests stored, and the referrers of each.
pub(super) struct Graph<'a> {
    pub(super) known: &'a HashMap<Digest, &'a Listed>,
    pub(super) referrers: &'a HashMap<Digest, Vec<Digest>>,
}

/// Whether an object (if it is still there) was used at or after `cutoff`;
/// a vanished one counts as used, so nothing is deleted for it.
fn used_since(stat: Option<Stat>, cutoff: SystemTime) -> bool {
    stat.is_none_or(|s| s.used >= cutoff)
}
