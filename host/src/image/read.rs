//! Reading stored layers back: as uncompressed tar streams, their paths
//! kept inside the root, their whiteouts understood, or unpacked in order
//! into a directory as a container runtime would.

use std::io::Read;
use std::path::{Component, Path};

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
/// `None` for paths that would leave the root.
pub fn clean(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(p) => parts.push(p.to_str()?),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
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
pub enum Whiteout {
    /// `<dir>/.wh..wh..opq`: everything lower in `dir`.
    Opaque(String),
    /// `<dir>/.wh.<name>`: `<dir>/<name>` and everything under it.
    Delete(String),
}

/// The whiteout a (clean) path is, if it is one. Every `.wh.` name is a
/// whiteout, never content; one naming `.`, `..` or nothing removes nothing.
pub fn whiteout(path: &str) -> Option<Whiteout> {
    let (dir, name) = parent_and_name(path);
    if name == ".wh..wh..opq" {
        return Some(Whiteout::Opaque(dir.to_owned()));
    }
    name.strip_prefix(".wh.")
        .map(|target| Whiteout::Delete(join(dir, target)))
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
