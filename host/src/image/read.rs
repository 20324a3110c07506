//! Reading stored layers back: as uncompressed tar streams, their paths
//! kept inside the root, their whiteouts understood, or unpacked in order
//! into a directory as a container runtime would.

use std::io::Read;
use std::path::Path;

use flate2::read::MultiGzDecoder;
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::{Cancel, ImageError, invalid, io_error};
use crate::oci::Digest;
use crate::storage::{BlobContent, ContentStore};

/// A stored layer to read, and whether it is gzipped.
pub struct LayerInput {
    pub digest: Digest,
    pub gzipped: bool,
}

/// Opens a stored layer as an uncompressed tar stream (from a blocking thread).
pub fn open_layer(
    store: &ContentStore,
    handle: &tokio::runtime::Handle,
    layer: &LayerInput,
) -> Result<Box<dyn Read>, ImageError> {
    let content = handle.block_on(store.read_blob(&layer.digest, None))?;
    let Some(BlobContent { body, .. }) = content else {
        return Err(invalid(format!("layer {} is not stored", layer.digest)));
    };
    let reader = SyncIoBridge::new_with_handle(StreamReader::new(body), handle.clone());
    Ok(if layer.gzipped {
        Box::new(MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    })
}

/// A path inside the root: relative, no `.` or `..`, no trailing slash.
/// `None` for paths that would leave the root, or that are not UTF-8 (see
/// [`clean_bytes`] for names as Linux allows them).
pub fn clean(path: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    String::from_utf8(clean_bytes(path.as_os_str().as_bytes())?).ok()
}

/// [`clean`] for a name as raw bytes: any byte but `/` and NUL may be in a
/// Linux file name, so only what escapes the root is refused.
pub fn clean_bytes(path: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(path.len());
    for part in path.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return None,
            part => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(part);
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

pub fn parent_and_name(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// What a whiteout entry removes from the layers below it.
#[derive(Debug, PartialEq, Eq)]
pub enum Whiteout<P = String> {
    /// `<dir>/.wh..wh..opq`: everything lower in `dir`.
    Opaque(P),
    /// `<dir>/.wh.<name>`: `<dir>/<name>` and everything under it.
    Delete(P),
}

/// The whiteout a (clean) path is, if it is one. Every `.wh.` name is a
/// whiteout, never content; one naming `.`, `..` or nothing removes nothing.
pub fn whiteout(path: &str) -> Option<Whiteout> {
    Some(match whiteout_bytes(path.as_bytes())? {
        Whiteout::Opaque(p) => Whiteout::Opaque(String::from_utf8(p).ok()?),
        Whiteout::Delete(p) => Whiteout::Delete(String::from_utf8(p).ok()?),
    })
}

/// [`whiteout`] of a name as raw bytes.
pub fn whiteout_bytes(path: &[u8]) -> Option<Whiteout<Vec<u8>>> {
    let (dir, name) = match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&b""[..], path),
    };
    if name == b".wh..wh..opq" {
        return Some(Whiteout::Opaque(dir.to_vec()));
    }
    let target = name.strip_prefix(b".wh.")?;
    let mut joined = dir.to_vec();
    if !joined.is_empty() {
        joined.push(b'/');
    }
    joined.extend_from_slice(target);
    Some(Whiteout::Delete(joined))
}

/// Applies image layers, in order, to an empty directory: whiteouts remove
/// (never through a symlink), everything else unpacks inside `dest` only.
/// `what` names the layers in errors (`a builder layer`).
pub fn unpack(
    store: &ContentStore,
    handle: &tokio::runtime::Handle,
    layers: &[LayerInput],
    dest: &Path,
    what: &str,
    cancel: &Cancel,
) -> Result<(), ImageError> {
    std::fs::create_dir_all(dest).map_err(io_error("creating the rootfs"))?;
    for layer in layers {
        cancel.check()?;
        let reader = open_layer(store, handle, layer)?;
        let mut archive = tar::Archive::new(reader);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        let not_tar = |e: std::io::Error| invalid(format!("{what} is not a tar: {e}"));
        for entry in archive.entries().map_err(not_tar)? {
            let mut entry = entry.map_err(not_tar)?;
            let Some(path) = entry.path().ok().and_then(|p| clean(&p)) else {
                continue;
            };
            match whiteout(&path) {
                Some(Whiteout::Opaque(dir)) => {
                    let children =
                        crate::files::inside(dest, &dir).and_then(|d| std::fs::read_dir(d).ok());
                    for child in children.into_iter().flatten().flatten() {
                        crate::files::remove(&child.path());
                    }
                }
                Some(Whiteout::Delete(target)) => {
                    let (parent, name) = parent_and_name(&target);
                    if matches!(name, "" | "." | "..") {
                        continue;
                    }
                    if let Some(dir) = crate::files::inside(dest, parent) {
                        crate::files::remove(&dir.join(name));
                    }
                }
                None => {
                    entry.unpack_in(dest).map_err(|e| {
                        invalid(format!("{what} cannot be unpacked at {path}: {e}"))
                    })?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_paths_and_refuses_escapes() {
        for (p, want) in [
            ("./etc/passwd", Some("etc/passwd")),
            ("/etc/", Some("etc")),
            ("a/./b", Some("a/b")),
            ("../etc/passwd", None),
            ("a/../../b", None),
            (".", None),
        ] {
            assert_eq!(clean(Path::new(p)).as_deref(), want, "{p}");
        }
    }
}
