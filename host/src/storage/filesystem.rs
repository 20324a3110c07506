//! The filesystem backend: `blobs/<algorithm>/<hex>` holds bytes,
//! `manifests/<algorithm>/<hex>` marks a blob as a manifest and holds its media
//! type, `values/<sha256 of key>` holds small named values (tag digests, plugin caches), `tmp/`
//! holds files being written. Publishing is a `rename` within one
//! filesystem, so readers see a whole, verified blob or nothing.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use tempfile::NamedTempFile;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::{BlobContent, BlobInfo, BlobWriter, ByteRange, Storage, StorageError, StoredManifest};
use crate::oci::{Digest, MAX_MANIFEST_BYTES, MediaType, Sha256Writer};

/// Temporary files older than this were left by a process that died while
/// writing; younger ones may belong to another process sharing the directory.
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// Read blobs in chunks this large: big enough that per-chunk overhead
/// disappears, small enough that many concurrent downloads stay cheap.
const READ_CHUNK: usize = 256 * 1024;

pub struct FilesystemStorage {
    root: PathBuf,
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
        let storage = FilesystemStorage { root };
        storage.remove_abandoned_temporaries();
        Ok(storage)
    }

    /// Deletes half-written blobs that a crashed process left in `tmp/`.
    fn remove_abandoned_temporaries(&self) {
        let Ok(entries) = fs::read_dir(self.tmp_dir()) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > ABANDONED_AFTER);
            if old && fs::remove_file(entry.path()).is_ok() {
                tracing::info!(path = %entry.path().display(), "removed an abandoned temporary file");
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
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
    file: Sha256Writer<BufWriter<NamedTempFile>>,
    blobs_dir: PathBuf,
    limit: u64,
}

impl Write for FileBlobWriter {
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

impl BlobWriter for FileBlobWriter {
    fn written(&self) -> u64 {
        self.file.written()
    }

    fn commit(self: Box<Self>, expected: Option<&Digest>) -> Result<BlobInfo, StorageError> {
        let FileBlobWriter {
            file, blobs_dir, ..
        } = *self;
        let (digest, size, buffered) = file.finish();
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(StorageError::DigestMismatch {
                expected: expected.clone(),
                actual: digest,
            });
        }
        let tmp = buffered.into_inner().map_err(|e| StorageError::Io {
            path: blobs_dir.clone(),
            source: e.into_error(),
        })?;
        let path = blobs_dir.join(digest.hex());
        // Blobs are immutable: if another writer published the same digest
        // first, its bytes are identical and this copy is simply dropped.
        if !path.exists() {
            tmp.persist(&path).map_err(|e| StorageError::Io {
                path: path.clone(),
                source: e.error,
            })?;
        }
        Ok(BlobInfo { digest, size })
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
        Ok(Some(BlobContent::Stream { len, body }))
    }

    fn blob_writer(&self, limit: u64) -> Result<Box<dyn BlobWriter>, StorageError> {
        let tmp_dir = self.tmp_dir();
        let tmp = NamedTempFile::new_in(&tmp_dir).map_err(io_err(&tmp_dir))?;
        Ok(Box::new(FileBlobWriter {
            file: Sha256Writer::new(BufWriter::with_capacity(1 << 20, tmp)),
            blobs_dir: self.root.join("blobs").join("sha256"),
            limit,
        }))
    }

    async fn put_manifest(
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

    async fn value(&self, key: &str) -> Result<Option<String>, StorageError> {
        let path = self.value_path(key);
        match tokio::fs::read_to_string(&path).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
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
        match s.read_blob(d, r).await.unwrap().expect("stored") {
            BlobContent::Stream { body, .. } => {
                let chunks: Vec<_> = body.collect().await;
                chunks
                    .into_iter()
                    .flat_map(|c| c.unwrap().to_vec())
                    .collect()
            }
            BlobContent::Redirect(_) => panic!("filesystem never redirects"),
        }
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
