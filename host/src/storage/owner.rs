//! One server per storage directory: a lock file (`kontain.lock`, an
//! exclusive `flock` holding the owner's pid) taken at start and held for
//! the life of the process. Two servers sharing a directory by mistake would
//! delete each other's half-written files; with the lock the second refuses
//! to start, and the first may remove every temporary it finds at once,
//! since whoever wrote them is dead.

use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::StorageError;

const LOCK_FILE: &str = "kontain.lock";

/// The held lock; dropping it (or the process ending, however it ends)
/// releases the directory.
#[derive(Debug)]
pub struct Owner {
    _file: fs::File,
}

impl Owner {
    /// Takes `dir` (created if missing) for this process.
    pub fn take(dir: &Path) -> Result<Owner, StorageError> {
        fs::create_dir_all(dir).map_err(StorageError::io(dir))?;
        let path = dir.join(LOCK_FILE);
        let mut file = match try_lock(&path)? {
            Ok(file) => file,
            Err(mut held) => {
                let mut pid = String::new();
                let _ = held.read_to_string(&mut pid);
                return Err(StorageError::InUse {
                    path: dir.to_owned(),
                    pid: pid.trim().chars().take(20).collect(),
                });
            }
        };
        let pid = std::process::id().to_string();
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()));
        written.map_err(StorageError::io(&path))?;
        Ok(Owner { _file: file })
    }
}

/// Opens (creating) `path` and takes an exclusive `flock` on it without
/// waiting: the locked file, or (`Err`) the file someone else holds.
pub(super) fn try_lock(path: &Path) -> Result<Result<fs::File, fs::File>, StorageError> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(StorageError::io(path))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Ok(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(Err(file)),
        Err(e) => Err(StorageError::io(path)(e.into())),
    }
}

/// The lock file of `dir`, for messages.
pub fn lock_path(dir: &Path) -> PathBuf {
    dir.join(LOCK_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = Owner::take(dir.path()).unwrap();
        let second = Owner::take(dir.path()).unwrap_err();
        let message = second.to_string();
        assert!(
            message.contains(&std::process::id().to_string()),
            "{message}"
        );
        drop(first);
        assert!(Owner::take(dir.path()).is_ok());
    }
}
