//! A blob on its way into storage: bytes go to a private temporary file,
//! hashed on the way and refused past a limit, before any driver sees them.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{BlobInfo, StorageError};
use crate::oci::{Digest, Sha256Writer};

/// Without the directory's lock (`storage::owner`), temporary files older
/// than this were left by a process that died while writing; younger ones
/// may belong to another process sharing the directory.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// Deletes half-written blobs that a crashed process left in `dir`: those
/// last written more than `after` ago.
pub fn remove_abandoned(dir: &Path, after: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= after);
        if old && std::fs::remove_file(entry.path()).is_ok() {
            tracing::info!(path = %entry.path().display(), "removed an abandoned temporary file");
        }
    }
}

/// A blob being written: a private temporary file, hashed on the way,
/// refused past the limit. Dropped unfinished, it leaves nothing behind.
pub struct Spool {
    file: Sha256Writer<BufWriter<tempfile::NamedTempFile>>,
    limit: u64,
}

impl Spool {
    pub fn new(dir: &Path, limit: u64) -> Result<Spool, StorageError> {
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(StorageError::io(dir))?;
        Ok(Spool {
            file: Sha256Writer::new(BufWriter::with_capacity(1 << 20, tmp)),
            limit,
        })
    }

    pub fn written(&self) -> u64 {
        self.file.written()
    }

    /// Another handle on the file being written, for readers of the bytes
    /// written (and flushed) so far; it stays readable after the file is
    /// published or deleted.
    pub fn reader(&self) -> io::Result<std::fs::File> {
        self.file.get_ref().get_ref().as_file().try_clone()
    }

    /// The finished file and what it holds; a digest other than `expected`
    /// is an error (and the file is deleted).
    pub fn finish(
        self,
        expected: Option<&Digest>,
    ) -> Result<(BlobInfo, tempfile::NamedTempFile), StorageError> {
        let (digest, size, buffered) = self.file.finish();
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(StorageError::DigestMismatch {
                expected: expected.clone(),
                actual: digest,
            });
        }
        let tmp = buffered.into_inner().map_err(|e| StorageError::Io {
            path: PathBuf::from("<blob writer>"),
            source: e.into_error(),
        })?;
        Ok((BlobInfo { digest, size }, tmp))
    }
}

impl Write for Spool {
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
