//! Flattening: an image's layers merged into one, as the container runtime
//! would see the filesystem, with the config kept and the rootfs replaced.
//!
//! The merge streams, in two passes over the layers with bounded memory (one
//! entry name per path, never file contents): top-down to find which layer's
//! version of each path survives the whiteouts (`.wh.<name>` deletes a path
//! and what is under it, `.wh..wh..opq` hides everything lower in its
//! directory, a non-directory hides what was under the same path), then
//! bottom-up to write the survivors, so that directories come before their
//! contents; hardlinks are written last, after every target they may name
//! (a link to a path an upper layer replaced then shares the new content; one
//! to a path an upper layer deleted is dropped, since it could not unpack).
//! Paths that would escape the root (`..`) are dropped. Decompressed bytes are
//! capped against tar bombs; a layer that is not a valid (gzipped) tar is an
//! invalid image, not a server error.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};

use flate2::Compression;
use flate2::write::GzEncoder;

use crate::image::layer::publish;
use crate::image::read::{LayerInput, Whiteout, clean, open_layer, whiteout};
use crate::image::{Cancel, ImageError, LayerBlob, io_error};
use crate::oci::Sha256Writer;
use crate::storage::ContentStore;

/// Counts bytes read through it, failing once `limit` is passed.
struct Capped<R> {
    inner: R,
    read: u64,
    limit: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "unpacked size over the limit",
            ));
        }
        Ok(n)
    }
}

/// What the layers above have removed.
#[derive(Default)]
struct Hidden {
    /// Deleted paths: the path and everything under it.
    deleted: HashSet<String>,
    /// Opaque directories and non-directories: everything under them.
    below: HashSet<String>,
}

impl Hidden {
    fn hides(&self, path: &str) -> bool {
        if self.deleted.contains(path) {
            return true;
        }
        let mut rest = path;
        while let Some((parent, _)) = rest.rsplit_once('/') {
            if self.deleted.contains(parent) || self.below.contains(parent) {
                return true;
            }
            rest = parent;
        }
        false
    }
}

fn tar_error(e: io::Error) -> ImageError {
    if e.kind() == io::ErrorKind::FileTooLarge {
        return ImageError::TooLarge {
            what: "the unpacked layers",
            limit: 0,
        };
    }
    match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof => {
            ImageError::Invalid(format!("a layer is not a valid tar stream: {e}"))
        }
        _ => ImageError::io("reading a layer", e),
    }
}

/// One pass over the layers: what every read needs, and the bytes unpacked
/// so far across the layers, against `limit`.
struct Pass<'a> {
    store: &'a ContentStore,
    handle: &'a tokio::runtime::Handle,
    limit: u64,
    cancel: &'a Cancel,
    unpacked: u64,
}

impl Pass<'_> {
    /// Reads one layer's entries in order, calling `visit` with each entry
    /// whose path stays inside the root.
    fn entries(
        &mut self,
        layer: &LayerInput,
        mut visit: impl FnMut(
            String,
            tar::Entry<'_, &mut Capped<Box<dyn Read>>>,
        ) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let limit = self.limit;
        let over = |e: ImageError| match e {
            ImageError::TooLarge { what, .. } => ImageError::TooLarge { what, limit },
            other => other,
        };
        let mut reader = Capped {
            inner: open_layer(self.store, self.handle, layer)?,
            read: self.unpacked,
            limit,
        };
        let mut archive = tar::Archive::new(&mut reader);
        for entry in archive.entries().map_err(|e| over(tar_error(e)))? {
            self.cancel.check()?;
            let entry = entry.map_err(|e| over(tar_error(e)))?;
            if let Some(path) = entry.path().ok().and_then(|p| clean(&p)) {
                visit(path, entry).map_err(over)?;
            }
        }
        self.unpacked = reader.read;
        Ok(())
    }
}

/// Merges `layers` (bottom first) into one gzipped layer in storage.
pub(super) fn merge(
    store: &ContentStore,
    handle: &tokio::runtime::Handle,
    layers: &[LayerInput],
    limit: u64,
    cancel: &Cancel,
) -> Result<LayerBlob, ImageError> {
    // Pass 1, top-down: which layer provides each surviving path.
    let mut winners: HashMap<String, usize> = HashMap::new();
    let mut hidden = Hidden::default();
    let pass = || Pass {
        store,
        handle,
        limit,
        cancel,
        unpacked: 0,
    };
    let mut top_down = pass();
    for (index, layer) in layers.iter().enumerate().rev() {
        let mut layer_hidden = Hidden::default();
        top_down.entries(layer, |path, entry| {
            match whiteout(&path) {
                Some(Whiteout::Opaque(dir)) => {
                    layer_hidden.below.insert(dir);
                }
                Some(Whiteout::Delete(target)) => {
                    layer_hidden.deleted.insert(target);
                }
                None if hidden.hides(&path) => {}
                None => {
                    if entry.header().entry_type() != tar::EntryType::Directory {
                        layer_hidden.below.insert(path.clone());
                    }
                    winners.entry(path).or_insert(index);
                }
            }
            Ok(())
        })?;
        hidden.deleted.extend(layer_hidden.deleted);
        hidden.below.extend(layer_hidden.below);
    }

    // Pass 2, bottom-up: write the survivors.
    let blob = store.blob_writer(u64::MAX)?;
    let mut out = tar::Builder::new(Sha256Writer::new(GzEncoder::new(blob, Compression::fast())));
    out.mode(tar::HeaderMode::Complete);
    let mut bottom_up = pass();
    let mut written: HashSet<String> = HashSet::new();
    let mut hardlinks: Vec<(tar::Header, String, String)> = Vec::new();
    for (index, layer) in layers.iter().enumerate() {
        bottom_up.entries(layer, |path, entry| {
            if winners.get(&path) != Some(&index) {
                return Ok(());
            }
            winners.remove(&path);
            if entry.header().entry_type() == tar::EntryType::Link {
                // Written last: the target's surviving copy may come from a
                // higher layer, and a link must follow its target in a tar.
                let target = entry.link_name().ok().flatten().and_then(|t| clean(&t));
                if let Some(target) = target {
                    hardlinks.push((entry.header().clone(), path, target));
                }
                return Ok(());
            }
            written.insert(path.clone());
            write_entry(&mut out, path, entry)
        })?;
    }
    for (mut header, path, target) in hardlinks {
        if written.contains(&target) {
            out.append_link(&mut header, &path, &target)
                .map_err(io_error("writing the layer"))?;
        } else {
            // Its target was deleted above it; the old content is gone from
            // the merged tree, so the link would not unpack.
            tracing::warn!(%path, %target, "dropped a hardlink whose target an upper layer removed");
        }
    }
    let tar = out.into_inner().map_err(io_error("finishing the layer"))?;
    let (diff_id, _, gzip) = tar.finish();
    let blob = gzip.finish().map_err(io_error("finishing gzip"))?;
    publish(diff_id, blob)
}

/// Copies one surviving entry into the merged layer.
fn write_entry<W: io::Write>(
    out: &mut tar::Builder<W>,
    path: String,
    entry: tar::Entry<'_, impl Read>,
) -> Result<(), ImageError> {
    let mut header = entry.header().clone();
    match header.entry_type() {
        tar::EntryType::Link | tar::EntryType::Symlink => {
            let Some(target) = entry.link_name().ok().flatten().map(|t| t.into_owned()) else {
                return Ok(());
            };
            let target = if header.entry_type() == tar::EntryType::Link {
                // A hardlink names a path in the image: keep it inside.
                match clean(&target) {
                    Some(t) => t.into(),
                    None => return Ok(()),
                }
            } else {
                // A symlink's target is resolved at run time, inside the
                // container's root; keep it as written.
                target
            };
            out.append_link(&mut header, &path, &target)
                .map_err(io_error("writing the layer"))
        }
        tar::EntryType::Regular
        | tar::EntryType::Continuous
        | tar::EntryType::Directory
        | tar::EntryType::Char
        | tar::EntryType::Block
        | tar::EntryType::Fifo => {
            let path = if header.entry_type() == tar::EntryType::Directory {
                format!("{path}/")
            } else {
                path
            };
            out.append_data(&mut header, &path, entry)
                .map_err(tar_error)
        }
        // Extended headers were folded into `entry` by the reader; anything
        // else has no place in a container filesystem.
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteouts_hide_paths_and_opaque_directories_hide_contents() {
        assert!(
            matches!(whiteout("etc/.wh.passwd"), Some(Whiteout::Delete(p)) if p == "etc/passwd")
        );
        assert!(matches!(whiteout(".wh.tmp"), Some(Whiteout::Delete(p)) if p == "tmp"));
        assert!(matches!(whiteout("var/.wh..wh..opq"), Some(Whiteout::Opaque(p)) if p == "var"));
        assert!(whiteout("etc/passwd").is_none());
        let mut h = Hidden::default();
        h.deleted.insert("etc/passwd".into());
        h.below.insert("var".into());
        assert!(h.hides("etc/passwd"));
        assert!(h.hides("etc/passwd/x"));
        assert!(!h.hides("etc/group"));
        assert!(h.hides("var/log"));
        assert!(!h.hides("var"));
    }
}
