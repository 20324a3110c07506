//! The filesystem driver: every key is a file under one root, `tmp/` holds
//! files being written, and publishing is a `rename` (or a link, where the
//! key must not be replaced) within that filesystem, so readers see a whole
//! object or nothing. A file's modification time is its last use.
//!
//! Leases are `flock`s on files under `leases/`, so that processes sharing
//! the directory do a piece of work once, as replicas sharing a bucket do.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use tempfile::NamedTempFile;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::{BlobContent, ByteRange, Driver, Lease, Listed, Stat, StorageError};
use crate::oci::Digest;

/// Read blobs in chunks this large: big enough that per-chunk overhead
/// disappears, small enough that many concurrent downloads stay cheap.
const READ_CHUNK: usize = 256 * 1024;

/// How often a waiting process asks for a lease another process holds.
const LEASE_POLL: Duration = Duration::from_millis(25);

pub struct FilesystemDriver {
    root: PathBuf,
    tmp: PathBuf,
}

fn stat_of(meta: &fs::Metadata) -> Stat {
    Stat {
        size: meta.len(),
        used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StorageError::Io {
            path: path.to_owned(),
            source: io::Error::other(e),
        })?
}

impl FilesystemDriver {
    /// Opens (creating if needed) a store rooted at `root`, and removes what
    /// a crashed process left half-written.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        Self::open_with(root.into(), super::spool::ABANDONED_AFTER)
    }

    /// As [`FilesystemDriver::open`], by the directory's owner (see
    /// `storage::owner`): every temporary left is a dead process's.
    pub fn open_owned(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        Self::open_with(root.into(), Duration::ZERO)
    }

    fn open_with(root: PathBuf, abandoned_after: Duration) -> Result<Self, StorageError> {
        for dir in [
            "blobs/sha256",
            "manifests/sha256",
            "values",
            "leases",
            "tmp",
        ] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(StorageError::io(&path))?;
        }
        let tmp = root.join("tmp");
        super::spool::remove_abandoned(&tmp, abandoned_after);
        Ok(FilesystemDriver { root, tmp })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Writes `bytes` beside `path`, then moves it into place: replacing
    /// what is there, or (with `keep`) leaving an existing file alone.
    fn write(tmp: &Path, path: &Path, bytes: &[u8], keep: bool) -> Result<(), StorageError> {
        if keep && written_again(path) {
            return Ok(());
        }
        let mut file = NamedTempFile::new_in(tmp).map_err(StorageError::io(tmp))?;
        file.write_all(bytes).map_err(StorageError::io(path))?;
        let publish = |file: NamedTempFile| match keep {
            true => file.persist_noclobber(path),
            false => file.persist(path),
        };
        // The first object under a new directory (a subject's referrers); a
        // delete emptying that directory at the same moment makes it retry.
        let mut persisted = publish(file);
        for _ in 0..3 {
            match persisted {
                Err(e) if e.error.kind() == io::ErrorKind::NotFound => {
                    if let Some(parent) = path.parent() {
                        fs::create_dir_all(parent).map_err(StorageError::io(parent))?;
                    }
                    persisted = publish(e.file);
                }
                _ => break,
            }
        }
        match persisted {
            Ok(_) => Ok(()),
            // Another writer published the same key first: objects of one
            // key are equal.
            Err(e) if keep && e.error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(StorageError::Io {
                path: path.to_owned(),
                source: e.error,
            }),
        }
    }
}

/// Whether `path` exists already; if so, writing it again is a use (a new
/// image made of old parts), and its time says so.
fn written_again(path: &Path) -> bool {
    match fs::File::open(path) {
        Ok(file) => {
            let _ = file.set_modified(SystemTime::now());
            true
        }
        Err(_) => false,
    }
}

/// Every file under `dir`, with keys relative to `root`.
fn walk(root: &Path, dir: &Path, out: &mut Vec<Listed>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(root, &entry.path(), out)?;
        } else if kind.is_file() {
            let path = entry.path();
            let Some(key) = path.strip_prefix(root).ok().and_then(Path::to_str) else {
                continue;
            };
            // Removed since the directory was read: not listed.
            if let Ok(meta) = entry.metadata() {
                out.push(Listed {
                    key: key.to_owned(),
                    stat: stat_of(&meta),
                });
            }
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl Driver for FilesystemDriver {
    fn spool_dir(&self) -> &Path {
        &self.tmp
    }

    fn publish(&self, key: &str, file: NamedTempFile) -> Result<(), StorageError> {
        let path = self.path(key);
        // Immutable keys: if another writer published first, its bytes are
        // identical and this copy is simply dropped.
        if written_again(&path) {
            return Ok(());
        }
        file.persist(&path).map_err(|e| StorageError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        Ok(())
    }

    async fn create(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let (tmp, path) = (self.tmp.clone(), self.path(key));
        blocking(&self.root, move || Self::write(&tmp, &path, &bytes, true)).await
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let (tmp, path) = (self.tmp.clone(), self.path(key));
        blocking(&self.root, move || Self::write(&tmp, &path, &bytes, false)).await
    }

    async fn stat(&self, key: &str) -> Result<Option<Stat>, StorageError> {
        let path = self.path(key);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(stat_of(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::io(&path)(e)),
        }
    }

    async fn read(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobContent>, StorageError> {
        let path = self.path(key);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageError::io(&path)(e)),
        };
        let (start, len) = match range {
            Some(r) => (r.first, r.len()),
            None => (
                0,
                file.metadata()
                    .await
                    .map_err(StorageError::io(&path))?
                    .len(),
            ),
        };
        if start > 0 {
            file.seek(io::SeekFrom::Start(start))
                .await
                .map_err(StorageError::io(&path))?;
        }
        let body = ReaderStream::with_capacity(file.take(len), READ_CHUNK).boxed();
        Ok(Some(BlobContent { len, body }))
    }

    async fn read_small(&self, key: &str, cap: u64) -> Result<Option<(Bytes, Stat)>, StorageError> {
        let path = self.path(key);
        blocking(&self.root, move || {
            let mut file = match fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(StorageError::io(&path)(e)),
            };
            let meta = file.metadata().map_err(StorageError::io(&path))?;
            if meta.len() > cap {
                return Err(StorageError::TooLarge { limit: cap });
            }
            let mut bytes = Vec::with_capacity(meta.len() as usize);
            io::Read::read_to_end(&mut file, &mut bytes).map_err(StorageError::io(&path))?;
            Ok(Some((Bytes::from(bytes), stat_of(&meta))))
        })
        .await
    }

    async fn touch(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key);
        blocking(&self.root, move || {
            fs::File::open(&path)
                .and_then(|f| f.set_modified(SystemTime::now()))
                .map_err(StorageError::io(&path))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StorageError> {
        let root = self.root.clone();
        let dir = self.path(prefix);
        blocking(&self.root, move || {
            let mut out = Vec::new();
            walk(&root, &dir, &mut out).map_err(StorageError::io(&dir))?;
            Ok(out)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io(&path)(e)),
        }
        // Directories made for one key (a subject's referrers) go when they
        // empty; the fixed top-level ones stay. A writer racing this retries
        // (see `write`).
        if key.starts_with("referrers/") {
            for dir in path.ancestors().skip(1).take(3) {
                if tokio::fs::remove_dir(dir).await.is_err() {
                    break;
                }
            }
        }
        Ok(())
    }

    async fn lease(&self, key: &str) -> Result<Box<dyn Lease>, StorageError> {
        let path = self
            .root
            .join("leases")
            .join(Digest::sha256(key.as_bytes()).hex());
        loop {
            let attempt = path.clone();
            if let Some(lease) = blocking(&self.root, move || FileLease::try_take(attempt)).await? {
                return Ok(Box::new(lease));
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
    }
}

/// An exclusive `flock` on a lease file, which the holder removes when it
/// lets go, so that lease files do not pile up.
struct FileLease {
    path: PathBuf,
    _file: fs::File,
}

impl FileLease {
    /// The lease if no other process holds it. A lock taken on a file that
    /// its holder removed meanwhile is no lease: the path names a new file.
    fn try_take(path: PathBuf) -> Result<Option<FileLease>, StorageError> {
        let Ok(file) = super::owner::try_lock(&path)? else {
            return Ok(None);
        };
        let held = file.metadata().map_err(StorageError::io(&path))?;
        let current = fs::metadata(&path).ok();
        if current.is_some_and(|m| m.ino() == held.ino() && m.dev() == held.dev()) {
            Ok(Some(FileLease { path, _file: file }))
        } else {
            Ok(None)
        }
    }
}

impl Lease for FileLease {}

impl Drop for FileLease {
    fn drop(&mut self) {
        // Removed while still locked; closing the file then unlocks it.
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_removes_old_abandoned_temporaries_only() {
        let dir = tempfile::tempdir().unwrap();
        drop(FilesystemDriver::open(dir.path()).unwrap());
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
        drop(FilesystemDriver::open(dir.path()).unwrap());
        assert!(!old.exists());
        assert!(new.exists());
    }

    #[tokio::test]
    async fn a_lease_excludes_other_holders_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = FilesystemDriver::open(dir.path()).unwrap();
        let b = FilesystemDriver::open(dir.path()).unwrap();
        let held = a.lease("k").await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(200), b.lease("k")).await;
        assert!(waiting.is_err(), "a second holder got the lease");
        assert!(b.lease("other").await.is_ok(), "other keys are free");
        drop(held);
        let taken = tokio::time::timeout(Duration::from_secs(5), b.lease("k")).await;
        assert!(taken.is_ok(), "the lease was not handed on");
        drop(taken);
        assert_eq!(fs::read_dir(dir.path().join("leases")).unwrap().count(), 0);
    }
}
