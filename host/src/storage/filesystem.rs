//! The filesystem backend: `blobs/<algorithm>/<hex>` holds bytes,
//! `manifests/<algorithm>/<hex>` marks a blob as a manifest and holds its media
//! type, `values/<sha256 of key>` holds small named values (tag digests, plugin caches), `tmp/`
//! holds files being written. Publishing is a `rename` within one
//! filesystem, so readers see a whole, verified blob or nothing.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use tempfile::NamedTempFile;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::{
    BlobContent, BlobInfo, BlobWriter, ByteRange, Collected, Spool, Storage, StorageError,
    StoredManifest,
};
use crate::oci::{Digest, MediaType};

/// Read blobs in chunks this large: big enough that per-chunk overhead
/// disappears, small enough that many concurrent downloads stay cheap.
const READ_CHUNK: usize = 256 * 1024;

pub struct FilesystemStorage {
    root: PathBuf,
    /// Reading a manifest or value older than this marks it used again
    /// (sets its mtime), so that expiry keeps what is being served. `None`:
    /// nothing expires, nothing is touched.
    refresh_after: Option<Duration>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_owned(),
        source,
    }
}

impl FilesystemStorage {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        for dir in ["blobs/sha256", "manifests/sha256", "values", "tmp"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(io_err(&path))?;
        }
        let storage = FilesystemStorage {
            root,
            refresh_after: None,
        };
        super::remove_abandoned_temporaries(&storage.tmp_dir());
        Ok(storage)
    }

    /// Expiry after `ttl` of disuse: reads refresh what they read (at most
    /// every tenth of `ttl`, to keep writes rare). Zero turns expiry off.
    pub fn refreshing(mut self, ttl: Duration) -> Self {
        self.refresh_after = (!ttl.is_zero()).then(|| ttl / 10);
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Marks `path` used now, if it was last marked long enough ago.
    async fn refresh(&self, path: &Path) {
        let Some(after) = self.refresh_after else {
            return;
        };
        let path = path.to_owned();
        let _ = tokio::task::spawn_blocking(move || {
            let stale = fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() > after);
            if stale && let Ok(f) = fs::File::open(&path) {
                let _ = f.set_modified(SystemTime::now());
            }
        })
        .await;
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm_name())
            .join(digest.hex())
    }

    fn manifest_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("manifests")
            .join(digest.algorithm_name())
            .join(digest.hex())
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Runs blocking file work off the async threads.
    async fn blocking(
        &self,
        work: impl FnOnce() -> Result<(), StorageError> + Send + 'static,
    ) -> Result<(), StorageError> {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| StorageError::Io {
                path: self.root.clone(),
                source: io::Error::other(e),
            })?
    }

    fn value_path(&self, key: &str) -> PathBuf {
        // Keys are arbitrary text; hashing makes them safe file names.
        self.root
            .join("values")
            .join(Digest::sha256(key.as_bytes()).hex())
    }
}

/// Writes `content` to `path` by way of a temporary file in `tmp_dir`, so
/// that readers see the old file or the whole new one.
fn write_atomically(tmp_dir: &Path, path: &Path, content: &[u8]) -> Result<(), StorageError> {
    let mut tmp = NamedTempFile::new_in(tmp_dir).map_err(io_err(tmp_dir))?;
    tmp.write_all(content).map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| StorageError::Io {
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

struct FileBlobWriter {
    spool: Spool,
    blobs_dir: PathBuf,
}

impl Write for FileBlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.spool.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.spool.flush()
    }
}

impl BlobWriter for FileBlobWriter {
    fn written(&self) -> u64 {
        self.spool.written()
    }

    fn commit(self: Box<Self>, expected: Option<&Digest>) -> Result<BlobInfo, StorageError> {
        let (info, tmp) = self.spool.finish(expected)?;
        let path = self.blobs_dir.join(info.digest.hex());
        // Blobs are immutable: if another writer published the same digest
        // first, its bytes are identical and this copy is simply dropped.
        if !path.exists() {
            tmp.persist(&path).map_err(|e| StorageError::Io {
                path: path.clone(),
                source: e.error,
            })?;
        }
        Ok(info)
    }
}

#[async_trait::async_trait]
impl Storage for FilesystemStorage {
    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        let path = self.blob_path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    async fn read_blob(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobContent>, StorageError> {
        let path = self.blob_path(digest);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let (start, len) = match range {
            Some(r) => (r.first, r.len()),
            None => (0, file.metadata().await.map_err(io_err(&path))?.len()),
        };
        if start > 0 {
            file.seek(io::SeekFrom::Start(start))
                .await
                .map_err(io_err(&path))?;
        }
        let body = ReaderStream::with_capacity(file.take(len), READ_CHUNK).boxed();
        Ok(Some(BlobContent { len, body }))
    }

    fn blob_writer(&self, limit: u64) -> Result<Box<dyn BlobWriter>, StorageError> {
        Ok(Box::new(FileBlobWriter {
            spool: Spool::new(&self.tmp_dir(), limit)?,
            blobs_dir: self.root.join("blobs").join("sha256"),
        }))
    }

    async fn put_manifest(
        &self,
        media_type: &MediaType,
        bytes: Bytes,
    ) -> Result<StoredManifest, StorageError> {
        let digest = super::manifest_digest(&bytes)?;
        let blob_path = self.blob_path(&digest);
        let manifest_path = self.manifest_path(&digest);
        let tmp_dir = self.tmp_dir();
        let media = media_type.as_str().to_owned();
        let body = bytes.clone();
        // Blob first, then the marker: a manifest is visible only when its
        // bytes already are.
        self.blocking(move || {
            for (path, content) in [(&blob_path, &body[..]), (&manifest_path, media.as_bytes())] {
                if !path.exists() {
                    write_atomically(&tmp_dir, path, content)?;
                }
            }
            Ok(())
        })
        .await?;
        Ok(StoredManifest {
            digest,
            media_type: media_type.clone(),
            bytes,
        })
    }

    async fn manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, StorageError> {
        let marker = self.manifest_path(digest);
        let media = match tokio::fs::read_to_string(&marker).await {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&marker)(e)),
        };
        let media_type = media
            .parse::<MediaType>()
            .map_err(|_| StorageError::CorruptMetadata {
                digest: digest.clone(),
            })?;
        let path = self.blob_path(digest);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => Bytes::from(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        self.refresh(&marker).await;
        Ok(Some(StoredManifest {
            digest: digest.clone(),
            media_type,
            bytes,
        }))
    }

    async fn put_value(&self, key: &str, value: &str) -> Result<(), StorageError> {
        let path = self.value_path(key);
        let tmp_dir = self.tmp_dir();
        let content = value.to_owned();
        // Replacing is atomic: readers see the old value or the new one.
        self.blocking(move || write_atomically(&tmp_dir, &path, content.as_bytes()))
            .await
    }

    async fn collect(&self, ttl: Duration) -> Result<Collected, StorageError> {
        if ttl.is_zero() {
            return Ok(Collected::default());
        }
        let this = FilesystemStorage {
            root: self.root.clone(),
            refresh_after: self.refresh_after,
        };
        tokio::task::spawn_blocking(move || this.collect_now(ttl))
            .await
            .map_err(|e| StorageError::Io {
                path: self.root.clone(),
                source: io::Error::other(e),
            })
    }

    async fn value(&self, key: &str) -> Result<Option<String>, StorageError> {
        let path = self.value_path(key);
        match tokio::fs::read_to_string(&path).await {
            Ok(s) => {
                self.refresh(&path).await;
                Ok(Some(s))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
}

/// Files in `dir` with their modification times.
fn files_with_mtime(dir: &Path) -> Vec<(PathBuf, String, SystemTime, u64)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            let name = e.file_name().to_str()?.to_owned();
            Some((e.path(), name, meta.modified().ok()?, meta.len()))
        })
        .collect()
}

/// Digests an image manifest or index refers to: config, layers, children.
fn references(bytes: &[u8]) -> Vec<Digest> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut add = |v: &serde_json::Value| {
        if let Some(d) = v["digest"].as_str().and_then(|d| d.parse().ok()) {
            out.push(d);
        }
    };
    add(&doc["config"]);
    for key in ["layers", "manifests"] {
        for v in doc[key].as_array().into_iter().flatten() {
            add(v);
        }
    }
    out
}

impl FilesystemStorage {
    /// The collection itself (blocking): roots are manifests and tag values
    /// used within `ttl`; everything they reach (index children, configs,
    /// layers) is kept whatever its age; then unreached manifests go, then
    /// unreached blobs older than `ttl` (younger ones may belong to a
    /// manifest being made), then old values.
    fn collect_now(&self, ttl: Duration) -> Collected {
        let cutoff = SystemTime::now()
            .checked_sub(ttl)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut done = Collected::default();
        let manifests_dir = self.root.join("manifests/sha256");
        let blobs_dir = self.root.join("blobs/sha256");
        let values_dir = self.root.join("values");

        let manifests = files_with_mtime(&manifests_dir);
        let values = files_with_mtime(&values_dir);
        let mut live: HashSet<Digest> = HashSet::new();
        let mut queue: Vec<Digest> = manifests
            .iter()
            .filter(|(_, _, t, _)| *t >= cutoff)
            .filter_map(|(_, name, _, _)| format!("sha256:{name}").parse().ok())
            .collect();
        queue.extend(
            values
                .iter()
                .filter(|(_, _, t, _)| *t >= cutoff)
                .filter_map(|(path, _, _, _)| fs::read_to_string(path).ok())
                .filter_map(|v| v.trim().parse::<Digest>().ok()),
        );
        while let Some(digest) = queue.pop() {
            if !live.insert(digest.clone()) {
                continue;
            }
            if self.manifest_path(&digest).exists()
                && let Ok(bytes) = fs::read(self.blob_path(&digest))
            {
                queue.extend(references(&bytes));
            }
        }
        let remove = |path: &Path, size: u64, counter: &mut usize, bytes: &mut u64| {
            if fs::remove_file(path).is_ok() {
                *counter += 1;
                *bytes += size;
            }
        };
        for (path, name, _, size) in &manifests {
            let live = format!("sha256:{name}")
                .parse::<Digest>()
                .is_ok_and(|d| live.contains(&d));
            if !live {
                remove(path, *size, &mut done.manifests, &mut done.bytes);
            }
        }
        for (path, name, modified, size) in files_with_mtime(&blobs_dir) {
            let live = format!("sha256:{name}")
                .parse::<Digest>()
                .is_ok_and(|d| live.contains(&d));
            if !live && modified < cutoff {
                remove(&path, size, &mut done.blobs, &mut done.bytes);
            }
        }
        for (path, _, modified, size) in &values {
            if *modified < cutoff {
                remove(path, *size, &mut done.values, &mut done.bytes);
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::write_blob;

    fn store() -> (tempfile::TempDir, FilesystemStorage) {
        let dir = tempfile::tempdir().unwrap();
        let s = FilesystemStorage::open(dir.path()).unwrap();
        (dir, s)
    }

    async fn read_all(s: &FilesystemStorage, d: &Digest, r: Option<ByteRange>) -> Vec<u8> {
        let BlobContent { body, .. } = s.read_blob(d, r).await.unwrap().expect("stored");
        let chunks: Vec<_> = body.collect().await;
        chunks
            .into_iter()
            .flat_map(|c| c.unwrap().to_vec())
            .collect()
    }

    #[tokio::test]
    async fn stores_blobs_under_their_digest_and_reads_ranges() {
        let (_dir, s) = store();
        let info = write_blob(&s, b"0123456789abcdefghij").unwrap();
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
        let (dir, s) = store();
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
        let (dir, s) = store();
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
        let (_dir, s) = store();
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

    #[test]
    fn opening_removes_old_abandoned_temporaries_only() {
        let dir = tempfile::tempdir().unwrap();
        drop(FilesystemStorage::open(dir.path()).unwrap());
        let old = dir.path().join("tmp/old");
        let new = dir.path().join("tmp/new");
        fs::write(&old, b"x").unwrap();
        fs::write(&new, b"x").unwrap();
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        drop(FilesystemStorage::open(dir.path()).unwrap());
        assert!(!old.exists());
        assert!(new.exists());
    }

    #[tokio::test]
    async fn writers_refuse_bytes_past_their_limit() {
        let (_dir, s) = store();
        let mut w = s.blob_writer(4).unwrap();
        assert!(w.write_all(b"12345").is_err());
    }

    #[tokio::test]
    async fn manifests_round_trip_with_their_media_type() {
        let (_dir, s) = store();
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
}
