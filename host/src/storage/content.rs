//! The content store: content addressing, verification, manifests, values,
//! use marks and work done once, written once above every [`Driver`].
//!
//! Keys: `blobs/sha256/<hex>` (a blob's bytes), `manifests/sha256/<hex>`
//! (a manifest: its media type, a newline, its exact bytes), `values/<sha256
//! of key>` (tags, plugin caches, remembered resolutions). Drivers keep
//! leases where they like.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::OwnedMutexGuard;

use super::arriving::{Arrival, Arrivals, Arriving};
use super::{BlobContent, BlobInfo, ByteRange, Driver, Lease, Spool, StorageError, StoredManifest};
use crate::oci::{Digest, MAX_MANIFEST_BYTES, MediaType};

/// Values are small (a digest, a plugin's cache entry).
const MAX_VALUE_BYTES: u64 = 1 << 20;

/// Room for a manifest object's first line, the media type.
const MAX_MEDIA_TYPE_LINE: u64 = 256;

pub(crate) fn blob_key(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm_name(), digest.hex())
}

pub(crate) fn manifest_key(digest: &Digest) -> String {
    format!("manifests/{}/{}", digest.algorithm_name(), digest.hex())
}

/// The value the readiness probe writes and reads back.
const PROBE: &str = "kontain readiness probe";

pub(crate) fn value_key(key: &str) -> String {
    // Keys are arbitrary text; hashing makes them safe names.
    format!("values/{}", Digest::sha256(key.as_bytes()).hex())
}

/// A stored blob: its size, and whether only this process can serve it
/// (its bytes are made again on each read from a recipe, or are still
/// arriving), so that clients are not sent to the storage for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobEntry {
    pub size: u64,
    pub served_here: bool,
}

pub struct ContentStore {
    driver: Arc<dyn Driver>,
    /// Reading a manifest or value last marked used longer ago than this
    /// marks it used again, so that expiry keeps what is being served.
    /// `None`: nothing expires, nothing is marked.
    refresh_after: Option<Duration>,
    locks: KeyedLocks,
    /// The storage quota, if any (see `quota`).
    pub(super) quota: Option<super::quota::Quota>,
    /// Who makes blobs kept as recipes, by recipe kind (see `remade`).
    pub(super) remakers: std::sync::RwLock<HashMap<String, Arc<dyn super::Remake>>>,
    /// Blobs being downloaded into the store, readable as they arrive.
    arrivals: Arc<Arrivals>,
    /// The storage directory's lock, held while the store lives.
    _owner: Option<super::owner::Owner>,
}

impl ContentStore {
    /// A store on `driver` whose unused content expires after `ttl` (zero:
    /// never). Marks are refreshed at most every tenth of the TTL, to keep
    /// writes rare.
    pub fn new(driver: Arc<dyn Driver>, ttl: Duration) -> Self {
        ContentStore {
            driver,
            refresh_after: (!ttl.is_zero()).then(|| ttl / 10),
            locks: KeyedLocks::default(),
            remakers: Default::default(),
            arrivals: Default::default(),
            quota: None,
            _owner: None,
        }
    }

    /// This store, keeping to `max` bytes (see `quota`).
    pub(crate) fn with_quota(mut self, max: u64) -> Self {
        self.quota = Some(super::quota::Quota::new(max));
        self
    }

    /// Counts `n` bytes just written towards the quota.
    pub(super) fn wrote(&self, n: u64) {
        if let Some(q) = &self.quota {
            q.added.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// This store, holding its directory's lock for as long as it lives.
    pub(crate) fn owned(mut self, owner: super::owner::Owner) -> Self {
        self._owner = Some(owner);
        self
    }

    pub(crate) fn driver(&self) -> &Arc<dyn Driver> {
        &self.driver
    }

    /// The size of a stored blob, or `None`. Asking marks it used: a blob
    /// someone pulls, or a new image reuses, is not expired under them.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        Ok(self.blob_entry(digest).await?.map(|e| e.size))
    }

    /// A stored blob's size and whether it is kept as a recipe (made again
    /// on each read), or `None`. Asking marks it used.
    pub async fn blob_entry(&self, digest: &Digest) -> Result<Option<BlobEntry>, StorageError> {
        let key = blob_key(digest);
        if let Some(stat) = self.driver.stat(&key).await? {
            self.mark(&key, stat.used).await;
            return Ok(Some(BlobEntry {
                size: stat.size,
                served_here: false,
            }));
        }
        Ok(self.recipe(digest).await?.map(|r| BlobEntry {
            size: r.size,
            served_here: true,
        }))
    }

    /// As [`ContentStore::blob_entry`], counting a blob still arriving
    /// (whose bytes [`ContentStore::read_blob`] sends as they come).
    pub async fn blob_entry_or_arriving(
        &self,
        digest: &Digest,
    ) -> Result<Option<BlobEntry>, StorageError> {
        if let Some(entry) = self.blob_entry(digest).await? {
            return Ok(Some(entry));
        }
        Ok(self.arrival(digest).map(|a| BlobEntry {
            size: a.size,
            served_here: true,
        }))
    }

    /// The blob `digest` if it is arriving now.
    pub fn arrival(&self, digest: &Digest) -> Option<Arc<Arrival>> {
        self.arrivals.get(digest)
    }

    /// Where clients should download a stored blob themselves, if anywhere
    /// (never for a blob kept as a recipe: ask [`ContentStore::blob_entry`]).
    pub async fn blob_location(&self, digest: &Digest) -> Result<Option<String>, StorageError> {
        self.driver.location(&blob_key(digest)).await
    }

    /// The blob's bytes, all or `range` of them; `None` if it is not stored.
    pub async fn read_blob(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobContent>, StorageError> {
        let key = blob_key(digest);
        let content = match self.driver.read(&key, range).await? {
            Some(content) => content,
            None => match self.arrival(digest) {
                Some(arrival) => arrival.read(range),
                None => match self.recipe(digest).await? {
                    Some(recipe) => self.remade(digest, &recipe, range)?,
                    // Stored just now, between the first look and the second.
                    None => match self.driver.read(&key, range).await? {
                        Some(content) => content,
                        None => return Ok(None),
                    },
                },
            },
        };
        // A download in progress keeps its image from eviction.
        Ok(Some(match &self.quota {
            Some(quota) => {
                let reading = quota.reading(&key);
                let BlobContent { len, body } = content;
                let body = futures_util::StreamExt::boxed(futures_util::StreamExt::map(
                    body,
                    move |chunk| {
                        let _ = &reading;
                        chunk
                    },
                ));
                BlobContent { len, body }
            }
            None => content,
        }))
    }

    /// A small blob's bytes (a config), refused past `cap`.
    pub async fn small_blob(
        &self,
        digest: &Digest,
        cap: u64,
    ) -> Result<Option<Bytes>, StorageError> {
        Ok(self
            .driver
            .read_small(&blob_key(digest), cap)
            .await?
            .map(|(bytes, _)| bytes))
    }

    /// A writer for a new blob of at most `limit` bytes. Synchronous, for
    /// the blocking threads that feed it (tar, gzip, hashing).
    pub fn blob_writer(&self, limit: u64) -> Result<BlobWriter, StorageError> {
        Ok(BlobWriter {
            spool: Spool::new(self.driver.spool_dir(), limit)?,
            driver: self.driver.clone(),
            added: self.quota.as_ref().map(|q| q.added.clone()),
            arriving: None,
        })
    }

    /// A writer for the blob `digest`, expected to be `size` bytes, that
    /// clients may read while it is written (see `arriving`): what
    /// [`BlobWriter::grew`] announces is readable at once.
    pub fn arriving_writer(
        &self,
        limit: u64,
        digest: &Digest,
        size: u64,
    ) -> Result<BlobWriter, StorageError> {
        let mut writer = self.blob_writer(limit)?;
        let dir = self.driver.spool_dir();
        let file = writer.spool.reader().map_err(StorageError::io(dir))?;
        writer.arriving = Some(self.arrivals.start(digest.clone(), size, file));
        Ok(writer)
    }

    /// Stores `bytes` as one blob (from a blocking context).
    pub fn write_blob(&self, bytes: &[u8]) -> Result<BlobInfo, StorageError> {
        let mut w = self.blob_writer(bytes.len() as u64)?;
        w.write_all(bytes)
            .map_err(StorageError::io(&PathBuf::from("<blob writer>")))?;
        w.commit(None)
    }

    /// Stores `bytes` as one blob, off the async threads.
    pub async fn put_blob(self: &Arc<Self>, bytes: Bytes) -> Result<BlobInfo, StorageError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.write_blob(&bytes))
            .await
            .map_err(|e| StorageError::Io {
                path: PathBuf::from("<blob writer>"),
                source: io::Error::other(e),
            })?
    }

    /// Stores a manifest's exact bytes and its media type.
    pub async fn put_manifest(
        &self,
        media_type: &MediaType,
        bytes: Bytes,
    ) -> Result<StoredManifest, StorageError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(StorageError::TooLarge {
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let digest = Digest::sha256(&bytes);
        let mut object = BytesMut::with_capacity(media_type.as_str().len() + 1 + bytes.len());
        object.put_slice(media_type.as_str().as_bytes());
        object.put_u8(b'\n');
        object.put_slice(&bytes);
        let size = object.len() as u64;
        let key = manifest_key(&digest);
        self.driver.create(&key, object.freeze()).await?;
        self.wrote(size);
        if let Some(q) = &self.quota {
            q.used(&key);
        }
        // An image is complete: the moment to keep to the quota.
        self.after_write(Some(&digest)).await;
        Ok(StoredManifest {
            digest,
            media_type: media_type.clone(),
            bytes,
        })
    }

    /// A stored manifest, re-hashed against its digest; `None` if absent.
    /// Reading it marks it used.
    pub async fn manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, StorageError> {
        self.read_manifest(digest, true).await
    }

    /// As [`ContentStore::manifest`], without marking it used (a look at
    /// what is stored must not keep it from expiring).
    pub async fn peek_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>, StorageError> {
        self.read_manifest(digest, false).await
    }

    /// As [`ContentStore::manifest`]; marks the manifest used only if `mark`.
    pub(super) async fn read_manifest(
        &self,
        digest: &Digest,
        mark: bool,
    ) -> Result<Option<StoredManifest>, StorageError> {
        let key = manifest_key(digest);
        let cap = MAX_MANIFEST_BYTES + MAX_MEDIA_TYPE_LINE;
        let Some((object, stat)) = self.driver.read_small(&key, cap).await? else {
            return Ok(None);
        };
        let Some((media_type, bytes)) = self.decode_manifest(digest, object).await? else {
            return Ok(None);
        };
        // The storage is trusted less than the digest it is asked for.
        if Digest::sha256(&bytes) != *digest {
            return Err(StorageError::CorruptMetadata {
                digest: digest.clone(),
            });
        }
        if mark {
            self.mark(&key, stat.used).await;
        }
        Ok(Some(StoredManifest {
            digest: digest.clone(),
            media_type,
            bytes,
        }))
    }

    /// A manifest object's media type and bytes. Objects written before
    /// the one-object layout are read too: a bare media type beside the
    /// bytes in `blobs/` (filesystem), or the bytes alone (a bucket, which
    /// kept the type in object metadata; documents name their own type).
    async fn decode_manifest(
        &self,
        digest: &Digest,
        object: Bytes,
    ) -> Result<Option<(MediaType, Bytes)>, StorageError> {
        let corrupt = || StorageError::CorruptMetadata {
            digest: digest.clone(),
        };
        if Digest::sha256(&object) == *digest {
            let document: serde_json::Value =
                serde_json::from_slice(&object).map_err(|_| corrupt())?;
            // Docker's types are always named; only OCI documents may leave
            // the field out, and then their shape says which they are.
            let media_type = match document["mediaType"].as_str() {
                Some(named) => named,
                None if document["manifests"].is_array() => MediaType::OCI_INDEX,
                None => MediaType::OCI_MANIFEST,
            };
            return Ok(Some((media_type.parse().map_err(|_| corrupt())?, object)));
        }

        match object.iter().position(|b| *b == b'\n') {
            Some(newline) => {
                let head = std::str::from_utf8(&object[..newline]).map_err(|_| corrupt())?;
                let media_type = head.parse().map_err(|_| corrupt())?;
                Ok(Some((media_type, object.slice(newline + 1..))))
            }
            None => {
                let head = std::str::from_utf8(&object).map_err(|_| corrupt())?;
                let media_type = head.trim().parse().map_err(|_| corrupt())?;
                let bytes = self.small_blob(digest, MAX_MANIFEST_BYTES).await?;
                Ok(bytes.map(|b| (media_type, b)))
            }
        }
    }

    /// Sets a small named value (a tag's digest, a plugin's cache entry),
    /// replacing what it held before, atomically.
    pub async fn put_value(&self, key: &str, value: &str) -> Result<(), StorageError> {
        self.driver
            .put(&value_key(key), Bytes::copy_from_slice(value.as_bytes()))
            .await
    }

    /// Writes a small value, reads it back and removes it: whether storage
    /// works now. Each probe has its own key, so probes at once (replicas
    /// sharing a bucket) never see each other's.
    pub async fn probe(&self) -> Result<(), StorageError> {
        let stamp = format!("{:032x}", rand::random::<u128>());
        let key = value_key(&format!("{PROBE} {stamp}"));
        self.driver
            .put(&key, Bytes::copy_from_slice(stamp.as_bytes()))
            .await?;
        let read = self.driver.read_small(&key, MAX_VALUE_BYTES).await;
        self.driver.delete(&key).await?;
        match read? {
            Some((bytes, _)) if bytes == stamp.as_bytes() => Ok(()),
            _ => Err(StorageError::CorruptMetadata {
                digest: Digest::sha256(PROBE.as_bytes()),
            }),
        }
    }

    /// The value last set for `key`. Reading it marks it used.
    pub async fn value(&self, key: &str) -> Result<Option<String>, StorageError> {
        let key = value_key(key);
        let Some((bytes, stat)) = self.driver.read_small(&key, MAX_VALUE_BYTES).await? else {
            return Ok(None);
        };
        self.mark(&key, stat.used).await;
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Remembers that `key` (a tag, in a generator's own naming) pointed at
    /// `digest`, replacing what it pointed at before.
    pub async fn put_tag(&self, key: &str, digest: &Digest) -> Result<(), StorageError> {
        self.put_value(key, &digest.to_string()).await
    }

    /// What `key` last pointed at.
    pub async fn tag(&self, key: &str) -> Result<Option<Digest>, StorageError> {
        Ok(self.value(key).await?.and_then(|v| v.trim().parse().ok()))
    }

    /// Marks `key` used now if its last mark is older than a tenth of the
    /// TTL. A failed mark is only logged: the read itself succeeded.
    pub(super) async fn mark(&self, key: &str, used: SystemTime) {
        if let Some(q) = &self.quota {
            q.used(key);
        }
        let Some(after) = self.refresh_after else {
            return;
        };
        let stale = SystemTime::now().duration_since(used).unwrap_or_default() > after;
        if stale && let Err(e) = self.driver.touch(key).await {
            tracing::debug!(%key, error = %e, "could not mark content used");
        }
    }

    /// Waits for `key`: first behind other requests of this process (so one
    /// of them at a time asks the driver), then for the driver's lease, so
    /// that replicas sharing the storage meet too.
    pub async fn lock(&self, key: String) -> Result<Held, StorageError> {
        let local = self.locks.lock(key.clone()).await;
        let lease = self.driver.lease(&key).await?;
        Ok(Held {
            _lease: lease,
            _local: local,
        })
    }
}

/// A blob being written: spooled aside and hashed, published by
/// [`BlobWriter::commit`]; dropped without committing, it leaves nothing.
pub struct BlobWriter {
    /// The quota's count of bytes written, if there is a quota.
    added: Option<Arc<std::sync::atomic::AtomicU64>>,
    spool: Spool,
    driver: Arc<dyn Driver>,
    /// Readers following the bytes as they are written, if any.
    arriving: Option<Arriving>,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.spool.written()
    }

    /// Publishes the blob. With `expected`, a different digest is an error
    /// and nothing is published.
    pub fn commit(mut self, expected: Option<&Digest>) -> Result<BlobInfo, StorageError> {
        let arriving = self.arriving.take();
        let published = self.spool.finish(expected).and_then(|(info, file)| {
            if let Some(arriving) = &arriving {
                arriving
                    .verified(info.size)
                    .map_err(|message| StorageError::Io {
                        path: PathBuf::from("<blob writer>"),
                        source: io::Error::other(message),
                    })?;
            }
            self.driver.publish(&blob_key(&info.digest), file)?;
            Ok(info)
        });
        match published {
            Ok(info) => {
                if let Some(added) = &self.added {
                    added.fetch_add(info.size, std::sync::atomic::Ordering::Relaxed);
                }
                if let Some(arriving) = arriving {
                    arriving.end(Ok(()));
                }
                Ok(info)
            }
            Err(e) => {
                if let Some(arriving) = arriving {
                    arriving.end(Err(format!("{e}; nothing was stored")));
                }
                Err(e)
            }
        }
    }

    /// Makes what is written so far readable to the blob's readers (a
    /// writer from [`ContentStore::arriving_writer`]; a no-op otherwise).
    pub fn grew(&mut self) -> io::Result<()> {
        if let Some(arriving) = &self.arriving {
            self.spool.flush()?;
            arriving.grew(self.spool.written());
        }
        Ok(())
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.spool.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.spool.flush()
    }
}

/// One lock per key, so that concurrent requests for the same manifest,
/// blob or directory do the work once while the others wait for it.
#[derive(Default)]
pub struct KeyedLocks(Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>);

impl KeyedLocks {
    pub async fn lock(&self, key: String) -> OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 4096 {
                map.retain(|_, w| w.strong_count() > 0);
            }
            match map.get(&key).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key, Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}

/// Held while the work for one key is done; dropping it lets the next in.
pub struct Held {
    // Field order is drop order: the lease goes (and is released) before
    // the next local waiter asks for it.
    _lease: Box<dyn Lease>,
    _local: OwnedMutexGuard<()>,
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::storage::{read_all, test_store};

    #[tokio::test]
    async fn stores_blobs_under_their_digest_and_reads_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_store(dir.path());
        let info = s.write_blob(b"0123456789abcdefghij").unwrap();
        assert_eq!(info.digest, Digest::sha256(b"0123456789abcdefghij"));
        assert_eq!(s.blob_size(&info.digest).await.unwrap(), Some(20));
        assert_eq!(
            read_all(&s, &info.digest, None).await,
            b"0123456789abcdefghij"
        );
        let r = ByteRange {
            first: 10,
            last: 19,
        };
        assert_eq!(read_all(&s, &info.digest, Some(r)).await, b"abcdefghij");
    }

    #[tokio::test]
    async fn a_blob_with_the_wrong_digest_is_never_published() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_store(dir.path());
        let mut w = s.blob_writer(100).unwrap();
        w.write_all(b"corrupt").unwrap();
        let expected = Digest::sha256(b"original");
        let err = w.commit(Some(&expected)).unwrap_err();
        assert!(matches!(err, StorageError::DigestMismatch { .. }));
        assert_eq!(s.blob_size(&expected).await.unwrap(), None);
        assert_eq!(
            s.blob_size(&Digest::sha256(b"corrupt")).await.unwrap(),
            None
        );
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn an_abandoned_writer_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_store(dir.path());
        let mut w = s.blob_writer(100).unwrap();
        w.write_all(b"partial").unwrap();
        drop(w);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(
            fs::read_dir(dir.path().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn tags_point_at_the_last_digest_put() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_store(dir.path());
        assert_eq!(s.tag("mirror x:latest").await.unwrap(), None);
        s.put_tag("mirror x:latest", &Digest::sha256(b"1"))
            .await
            .unwrap();
        s.put_tag("mirror x:latest", &Digest::sha256(b"2"))
            .await
            .unwrap();
        assert_eq!(
            s.tag("mirror x:latest").await.unwrap(),
            Some(Digest::sha256(b"2"))
        );
    }

    #[tokio::test]
    async fn writers_refuse_bytes_past_their_limit() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_store(dir.path());
        let mut w = s.blob_writer(4).unwrap();
        assert!(w.write_all(b"12345").is_err());
    }

    #[tokio::test]
    async fn manifests_round_trip_with_their_media_type() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_store(dir.path());
        let mt: MediaType = MediaType::DOCKER_MANIFEST.parse().unwrap();
        let stored = s
            .put_manifest(&mt, Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let got = s.manifest(&stored.digest).await.unwrap().expect("stored");
        assert_eq!(got.bytes, Bytes::from_static(b"{}"));
        assert_eq!(got.media_type, mt);
        assert!(
            s.manifest(&Digest::sha256(b"nope"))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn manifests_of_the_earlier_layouts_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_store(dir.path());
        // Filesystem: a bare media type, the bytes in `blobs/`.
        let bytes = br#"{"schemaVersion":2}"#;
        let info = s.write_blob(bytes).unwrap();
        let marker = dir.path().join(manifest_key(&info.digest));
        fs::write(&marker, MediaType::OCI_MANIFEST).unwrap();
        let got = s.manifest(&info.digest).await.unwrap().expect("read");
        assert_eq!(got.media_type.as_str(), MediaType::OCI_MANIFEST);
        assert_eq!(&got.bytes[..], bytes);
        // A bucket: the bytes alone; the document names its type, or its
        // shape does.
        for (doc, want) in [
            (
                &br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#[..],
                MediaType::DOCKER_MANIFEST,
            ),
            (
                br#"{"schemaVersion":2,"manifests":[]}"#,
                MediaType::OCI_INDEX,
            ),
            (
                br#"{"schemaVersion":2,"layers":[]}"#,
                MediaType::OCI_MANIFEST,
            ),
        ] {
            let digest = Digest::sha256(doc);
            fs::write(dir.path().join(manifest_key(&digest)), doc).unwrap();
            let got = s.manifest(&digest).await.unwrap().expect("read");
            assert_eq!(got.media_type.as_str(), want);
        }
        // Anything else is corrupt, never served as the digest's content.
        fs::write(&marker, "text/plain\nother bytes").unwrap();
        assert!(s.manifest(&info.digest).await.is_err());
    }
}
