//! Directory trees on the local disk: copying, measuring, owning and
//! removing them without ever following a symlink (the trees come from
//! untrusted sources), and expiring cache directories.

use std::io;
use std::path::Path;

/// Copies directories, regular files, and symlinks as symlinks.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Bytes of the regular files under `dir`.
pub fn tree_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += tree_size(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// Gives a tree to `owner` (without following symlinks): work directories
/// a sandbox running as an unprivileged user must be able to write.
pub fn chown_tree(dir: &Path, owner: (u32, u32)) -> io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(owner.0), Some(owner.1))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            chown_tree(&entry.path(), owner)?;
        } else {
            std::os::unix::fs::lchown(entry.path(), Some(owner.0), Some(owner.1))?;
        }
    }
    Ok(())
}

/// A real directory at `path` (not a symlink, not a file), created if
/// missing; whatever else was there is removed first.
pub fn fresh_dir(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(m) if m.file_type().is_symlink() || m.is_file() => std::fs::remove_file(path)?,
        Ok(_) => std::fs::remove_file(path)?,
        Err(_) => {}
    }
    std::fs::create_dir(path)
}

/// A path inside `root` with no component that is a symlink (so that host
/// reads and writes cannot be sent elsewhere) and no `..`.
pub fn inside(root: &Path, rel: &str) -> Option<std::path::PathBuf> {
    let mut path = root.to_owned();
    for part in rel.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return None;
        }
        path.push(part);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return None;
        }
    }
    Some(path)
}

/// Removes whatever is at `path` (a tree, a file, a symlink, not what it
/// points to); nothing there is not an error.
pub fn remove(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// A temporary directory (a build's work tree) that is removed, when
/// dropped, on a blocking thread: it may be large.
pub struct Scratch(Option<tempfile::TempDir>);

impl Scratch {
    pub fn new(dir: tempfile::TempDir) -> Self {
        Scratch(Some(dir))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().map_or(Path::new(""), |d| d.path())
    }

    /// Keeps the directory: it is no longer removed when dropped.
    pub fn keep(mut self) -> Option<std::path::PathBuf> {
        self.0.take().map(tempfile::TempDir::keep)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let Some(dir) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || drop(dir));
            }
            Err(_) => drop(dir),
        }
    }
}

/// Whether `path` is a real directory (a symlink to one is not).
pub fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// The marker a finished cache directory holds; its mtime is the last use.
pub const COMPLETE: &str = "complete";

/// Removes the cache directories under `parent` (unpacked modules, builder
/// filesystems, checkouts) whose [`COMPLETE`] marker was last used more than
/// `ttl` ago; returns how many went.
pub fn expire_dirs(parent: &Path, ttl: std::time::Duration) -> usize {
    let Some(cutoff) = std::time::SystemTime::now().checked_sub(ttl) else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let old = std::fs::metadata(entry.path().join(COMPLETE))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < cutoff);
        if old {
            // Go's module cache is read-only by design; so may checkouts be.
            make_writable(&entry.path());
            if std::fs::remove_dir_all(entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// Removes the entries of `parent` last modified more than `age` ago:
/// what a process that died mid-work left, and not what one sharing the
/// directory is working in now.
pub fn remove_abandoned(parent: &Path, age: std::time::Duration) {
    let Some(cutoff) = std::time::SystemTime::now().checked_sub(age) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < cutoff);
        if old {
            make_writable(&entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            make_writable(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_paths_never_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cnb")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("cnb/buildpacks")).unwrap();
        assert!(inside(dir.path(), "cnb/buildpacks/x").is_none());
        assert!(inside(dir.path(), "cnb/../etc").is_none());
        assert!(inside(dir.path(), "cnb/order.toml").is_some());
    }

    #[test]
    fn copies_without_following_links() {
        let from = tempfile::tempdir().unwrap();
        std::fs::create_dir(from.path().join("d")).unwrap();
        std::fs::write(from.path().join("d/f"), b"12345").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", from.path().join("link")).unwrap();
        let to = tempfile::tempdir().unwrap();
        copy_tree(from.path(), &to.path().join("copy")).unwrap();
        let link = to.path().join("copy/link");
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(tree_size(&to.path().join("copy")).unwrap(), 5);
    }
}
