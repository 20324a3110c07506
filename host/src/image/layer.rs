//! Writing layers: a tar, hashed on the way for its diff id, gzipped into a
//! blob writer, published when finished. Trees from the local disk are
//! written in a fixed (sorted) order with owners, modes and times fixed, so
//! that the same tree always gives the same layer.

use std::path::Path;

use flate2::Compression;

use super::gzip::ParallelGzip;
use super::offload::Offload;
use super::{ImageError, LayerBlob, io_error};
use crate::oci::{Digest, Sha256Writer};
use crate::storage::{BlobWriter, ContentStore};

/// A layer being written: tar, hashed for the diff id, gzipped into storage.
pub type LayerTar = tar::Builder<Sha256Writer<ParallelGzip<Offload<BlobWriter>>>>;

/// Publishes a finished layer blob whose uncompressed tar hashed to `diff_id`.
pub fn publish(diff_id: Digest, blob: BlobWriter) -> Result<LayerBlob, ImageError> {
    let info = blob.commit(None)?;
    Ok(LayerBlob {
        digest: info.digest,
        diff_id,
        size: info.size,
    })
}

/// Writes a layer from `fill` into storage (from a blocking thread).
pub fn write_layer(
    store: &ContentStore,
    fill: impl FnOnce(&mut LayerTar) -> Result<(), ImageError>,
) -> Result<LayerBlob, ImageError> {
    let mut tar = layer_tar(store)?;
    fill(&mut tar)?;
    finish(tar)
}

/// A new layer's tar: level 1 (zlib-rs's quick strategy) on every core;
/// the blob is hashed and written on a thread of its own.
pub fn layer_tar(store: &ContentStore) -> Result<LayerTar, ImageError> {
    let blob =
        Offload::new(store.blob_writer(u64::MAX)?).map_err(io_error("starting a layer writer"))?;
    Ok(tar::Builder::new(Sha256Writer::new(ParallelGzip::new(
        blob,
        Compression::fast(),
    ))))
}

/// Ends the tar and the gzip stream, and publishes the layer.
pub fn finish(tar: LayerTar) -> Result<LayerBlob, ImageError> {
    let hashed = tar.into_inner().map_err(io_error("finishing a layer"))?;
    let (diff_id, _, gzip) = hashed.finish();
    let blob = gzip
        .finish()
        .and_then(Offload::finish)
        .map_err(io_error("finishing gzip"))?;
    publish(diff_id, blob)
}

/// A tar header with everything that would make a layer irreproducible
/// fixed: owner, mtime, and the given mode.
pub fn fixed_header(
    kind: tar::EntryType,
    mode: u32,
    owner: (u32, u32),
    mtime: u64,
    size: u64,
) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_mtime(mtime);
    h.set_uid(owner.0.into());
    h.set_gid(owner.1.into());
    h.set_size(size);
    h
}

/// How the entries of a tree from disk are written: fixed owner and time,
/// modes normalised, symlinks kept or left out.
#[derive(Clone, Copy, Debug)]
pub struct Fixed {
    pub owner: (u32, u32),
    pub mtime: u64,
    pub dir_mode: u32,
    /// A regular file's mode, from whether it is executable on disk.
    pub file_mode: fn(executable: bool) -> u32,
    pub symlinks: bool,
}

impl Fixed {
    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        fixed_header(kind, mode, self.owner, self.mtime, size)
    }

    /// A directory entry at `path`.
    pub fn add_dir(&self, tar: &mut LayerTar, path: &str) -> Result<(), ImageError> {
        let mut header = self.header(tar::EntryType::Directory, self.dir_mode, 0);
        tar.append_data(&mut header, format!("{path}/"), std::io::empty())
            .map_err(io_error("writing a layer"))
    }

    /// A regular file at `path` holding `bytes`, mode as a non-executable
    /// file's.
    pub fn add_bytes(
        &self,
        tar: &mut LayerTar,
        path: &str,
        bytes: &[u8],
    ) -> Result<(), ImageError> {
        let mode = (self.file_mode)(false);
        let mut header = self.header(tar::EntryType::Regular, mode, bytes.len() as u64);
        tar.append_data(&mut header, path, bytes)
            .map_err(io_error("writing a layer"))
    }

    /// The regular file `file` at `path`.
    pub fn add_file(&self, tar: &mut LayerTar, path: &str, file: &Path) -> Result<(), ImageError> {
        use std::os::unix::fs::PermissionsExt;
        let f = std::fs::File::open(file).map_err(io_error("reading a file for a layer"))?;
        let meta = f.metadata().map_err(io_error("reading a file"))?;
        let mode = (self.file_mode)(meta.permissions().mode() & 0o111 != 0);
        let mut header = self.header(tar::EntryType::Regular, mode, meta.len());
        tar.append_data(&mut header, path, f)
            .map_err(io_error("writing a layer"))
    }

    /// The tree at `dir` under `prefix` (not itself written), entries in
    /// name order, never following a symlink.
    pub fn add_tree(&self, tar: &mut LayerTar, dir: &Path, prefix: &str) -> Result<(), ImageError> {
        let mut entries = std::fs::read_dir(dir)
            .map_err(io_error("reading a layer directory"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_error("reading a layer directory"))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = format!("{prefix}/{name}");
            let kind = entry.file_type().map_err(io_error("reading a layer"))?;
            if kind.is_dir() {
                self.add_dir(tar, &path)?;
                self.add_tree(tar, &entry.path(), &path)?;
            } else if kind.is_symlink() && self.symlinks {
                let target =
                    std::fs::read_link(entry.path()).map_err(io_error("reading a link"))?;
                let mut header = self.header(tar::EntryType::Symlink, 0o777, 0);
                tar.append_link(&mut header, &path, &target)
                    .map_err(io_error("writing a layer"))?;
            } else if kind.is_file() {
                self.add_file(tar, &path, &entry.path())?;
            }
        }
        Ok(())
    }
}
