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
use std::path::{Component, Path};

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::{
    BuildError, Builders, Cancel, LayerBlob, canonical, digest_of, invalid, io_error, publish_layer,
};
use crate::oci::{Digest, MediaType, Sha256Writer};
use crate::storage::{BlobContent, Storage, StoredManifest};
use crate::upstream::Mirror;

/// A stored layer to merge, and whether it is gzipped.
pub(crate) struct LayerInput {
    pub digest: Digest,
    pub gzipped: bool,
}

impl Builders {
    /// Flattens `source` (an image manifest or an index of `image`, fetched
    /// through `mirror`) and stores the result. The same source always gives
    /// the same result, which is remembered under the source's digest.
    /// `limit` caps the bytes unpacked from each platform's layers.
    pub async fn flatten(
        &self,
        mirror: &Mirror,
        image: &str,
        source: &StoredManifest,
        accept: &[String],
        limit: u64,
    ) -> Result<StoredManifest, BuildError> {
        let key = format!("flatten {}", source.digest);
        let storage = self.storage();
        if let Some(done) = self.cached(&key).await? {
            return Ok(done);
        }
        let _guard = self.builds.lock(key.clone()).await?;
        if let Some(done) = self.cached(&key).await? {
            return Ok(done);
        }
        let document: Value =
            serde_json::from_slice(&source.bytes).map_err(|e| invalid(e.to_string()))?;
        let flattened = match source.media_type.as_str() {
            MediaType::OCI_INDEX | MediaType::DOCKER_MANIFEST_LIST => {
                self.flatten_index(mirror, image, source, document, accept, limit)
                    .await?
            }
            MediaType::OCI_MANIFEST | MediaType::DOCKER_MANIFEST => {
                self.flatten_manifest(mirror, image, source, document, limit)
                    .await?
            }
            other => return Err(invalid(format!("cannot flatten a {other}"))),
        };
        storage.put_tag(&key, &flattened.digest).await?;
        Ok(flattened)
    }

    /// Every platform child flattened; attestations (`unknown/unknown`) dropped;
    /// each child's platform and annotations kept, its digest and size new.
    async fn flatten_index(
        &self,
        mirror: &Mirror,
        image: &str,
        source: &StoredManifest,
        mut index: Value,
        accept: &[String],
        limit: u64,
    ) -> Result<StoredManifest, BuildError> {
        let children = index["manifests"].as_array().cloned().unwrap_or_default();
        let mut flattened = Vec::new();
        for mut child in children {
            let platform = &child["platform"];
            if platform["os"] == "unknown" || platform["architecture"] == "unknown" {
                continue;
            }
            let digest = digest_of(&child)?;
            let manifest = mirror.manifest(image, &digest.to_string(), accept).await?;
            let document: Value =
                serde_json::from_slice(&manifest.bytes).map_err(|e| invalid(e.to_string()))?;
            let done = self
                .flatten_manifest(mirror, image, &manifest, document, limit)
                .await?;
            child["mediaType"] = json!(done.media_type.as_str());
            child["digest"] = json!(done.digest.to_string());
            child["size"] = json!(done.bytes.len());
            flattened.push(child);
        }
        if flattened.is_empty() {
            return Err(invalid(format!(
                "{image}@{} has no platform images to flatten",
                source.digest
            )));
        }
        index["manifests"] = Value::Array(flattened);
        Ok(self
            .storage()
            .put_manifest(&source.media_type, canonical(&index)?)
            .await?)
    }

    async fn flatten_manifest(
        &self,
        mirror: &Mirror,
        image: &str,
        source: &StoredManifest,
        mut manifest: Value,
        limit: u64,
    ) -> Result<StoredManifest, BuildError> {
        let docker = source.media_type.as_str() == MediaType::DOCKER_MANIFEST;
        let config_digest = digest_of(&manifest["config"])?;
        mirror.blob(image, &config_digest.to_string()).await?;
        let mut config: Value =
            serde_json::from_slice(&self.read_blob(&config_digest, 1 << 22).await?)
                .map_err(|e| invalid(format!("the image config is not JSON: {e}")))?;
        let mut inputs = Vec::new();
        for layer in manifest["layers"].as_array().cloned().unwrap_or_default() {
            let digest = digest_of(&layer)?;
            let media_type = layer["mediaType"].as_str().unwrap_or_default();
            let gzipped = match media_type {
                MediaType::OCI_LAYER_GZIP | MediaType::DOCKER_LAYER_GZIP => true,
                "application/vnd.oci.image.layer.v1.tar"
                | "application/vnd.docker.image.rootfs.diff.tar" => false,
                other => return Err(invalid(format!("cannot flatten a layer of type {other:?}"))),
            };
            mirror.blob(image, &digest.to_string()).await?;
            inputs.push(LayerInput { digest, gzipped });
        }

        let storage = self.storage().clone();
        let handle = tokio::runtime::Handle::current();
        let layer = self
            .run_blocking(move |cancel| merge(storage.as_ref(), &handle, &inputs, limit, cancel))
            .await?;

        let created = config["created"].clone();
        config["rootfs"] = json!({ "type": "layers", "diff_ids": [layer.diff_id.to_string()] });
        let mut history = json!({
            "created_by": "kontain flatten",
            "comment": format!("flattened from {image}@{}", source.digest),
        });
        if !created.is_null() {
            history["created"] = created;
        }
        config["history"] = json!([history]);
        let config_bytes = canonical(&config)?;
        let storage = self.storage().clone();
        let config_len = config_bytes.len();
        let config_blob = tokio::task::spawn_blocking(move || {
            crate::storage::write_blob(storage.as_ref(), &config_bytes)
        })
        .await
        .map_err(|e| BuildError::TaskFailed(e.to_string()))??;

        manifest["config"]["digest"] = json!(config_blob.digest.to_string());
        manifest["config"]["size"] = json!(config_len);
        let layer_type = if docker {
            MediaType::DOCKER_LAYER_GZIP
        } else {
            MediaType::OCI_LAYER_GZIP
        };
        manifest["layers"] = json!([{
            "mediaType": layer_type,
            "digest": layer.digest.to_string(),
            "size": layer.size,
        }]);
        Ok(self
            .storage()
            .put_manifest(&source.media_type, canonical(&manifest)?)
            .await?)
    }

    /// A small blob's bytes (at most `cap`).
    pub(super) async fn read_blob(&self, digest: &Digest, cap: u64) -> Result<Vec<u8>, BuildError> {
        let Some(BlobContent { len, mut body }) = self.storage().read_blob(digest, None).await?
        else {
            return Err(invalid(format!("blob {digest} is not stored")));
        };
        if len > cap {
            return Err(BuildError::TooLarge {
                what: "an image config",
                limit: cap,
            });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        while let Some(chunk) = body.next().await {
            bytes.extend_from_slice(&chunk.map_err(io_error("reading a blob"))?);
        }
        Ok(bytes)
    }
}

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

/// Opens a stored layer as an uncompressed tar stream (from a blocking thread).
pub(crate) fn open_layer(
    storage: &dyn Storage,
    handle: &tokio::runtime::Handle,
    layer: &LayerInput,
) -> Result<Box<dyn Read>, BuildError> {
    let content = handle.block_on(storage.read_blob(&layer.digest, None))?;
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
pub(crate) fn clean(path: &Path) -> Option<String> {
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

fn parent_and_name(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
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

enum Whiteout {
    Opaque(String),
    Delete(String),
}

fn whiteout(path: &str) -> Option<Whiteout> {
    let (dir, name) = parent_and_name(path);
    if name == ".wh..wh..opq" {
        return Some(Whiteout::Opaque(dir.to_owned()));
    }
    name.strip_prefix(".wh.")
        .map(|target| Whiteout::Delete(join(dir, target)))
}

fn tar_error(e: io::Error) -> BuildError {
    if e.kind() == io::ErrorKind::FileTooLarge {
        return BuildError::TooLarge {
            what: "the unpacked layers",
            limit: 0,
        };
    }
    match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof => {
            BuildError::InvalidImage(format!("a layer is not a valid tar stream: {e}"))
        }
        _ => BuildError::Io {
            what: "reading a layer",
            source: e,
        },
    }
}

/// One pass over the layers: what every read needs, and the bytes unpacked
/// so far across the layers, against `limit`.
struct Pass<'a> {
    storage: &'a dyn Storage,
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
        ) -> Result<(), BuildError>,
    ) -> Result<(), BuildError> {
        let limit = self.limit;
        let over = |e: BuildError| match e {
            BuildError::TooLarge { what, .. } => BuildError::TooLarge { what, limit },
            other => other,
        };
        let mut reader = Capped {
            inner: open_layer(self.storage, self.handle, layer)?,
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
fn merge(
    storage: &dyn Storage,
    handle: &tokio::runtime::Handle,
    layers: &[LayerInput],
    limit: u64,
    cancel: &Cancel,
) -> Result<LayerBlob, BuildError> {
    // Pass 1, top-down: which layer provides each surviving path.
    let mut winners: HashMap<String, usize> = HashMap::new();
    let mut hidden = Hidden::default();
    let pass = || Pass {
        storage,
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
    let blob = storage.blob_writer(u64::MAX)?;
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
    publish_layer(diff_id, blob)
}

/// Copies one surviving entry into the merged layer.
fn write_entry<W: io::Write>(
    out: &mut tar::Builder<W>,
    path: String,
    entry: tar::Entry<'_, impl Read>,
) -> Result<(), BuildError> {
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
