//! Builder and run images: the platform image of an index this host runs,
//! an image's config and layers fetched into storage, the builder's
//! filesystem unpacked once per digest, and the run image a builder names.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{BuildpackError, Buildpacks, sandbox};
use crate::image::json::{digest_of, parse, read_config};
use crate::image::read::{LayerInput, unpack};
use crate::image::{invalid, io_error};
use crate::oci::{Digest, MediaType};
use crate::storage::StoredManifest;
use crate::upstream::Scoped;

/// The platform images are built for: the host's own (buildpacks run here).
pub(super) fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

/// An image manifest's parts: the document, its config, and its layers
/// (fetched into storage).
pub(super) struct Parts {
    pub document: Value,
    pub config: Value,
    pub layers: Vec<LayerInput>,
}

impl Buildpacks {
    /// The image manifest of `manifest` for this host's platform (itself, if
    /// it is not an index).
    pub(super) async fn for_host(
        &self,
        upstream: &Scoped<'_>,
        image: &str,
        manifest: &StoredManifest,
    ) -> Result<StoredManifest, BuildpackError> {
        match manifest.media_type.as_str() {
            MediaType::OCI_INDEX | MediaType::DOCKER_MANIFEST_LIST => {
                let (os, arch) = host_platform();
                let index = parse(&manifest.bytes, image)?;
                let child = index["manifests"]
                    .as_array()
                    .and_then(|m| {
                        m.iter().find(|d| {
                            d["platform"]["os"] == os && d["platform"]["architecture"] == arch
                        })
                    })
                    .ok_or_else(|| invalid(format!("{image} has no {os}/{arch} image")))?;
                let accept = MediaType::MANIFESTS.map(str::to_owned);
                Ok(upstream
                    .manifest(image, &digest_of(child)?.to_string(), &accept)
                    .await?)
            }
            _ => Ok(manifest.clone()),
        }
    }

    /// The config of an image manifest, and its layers fetched into storage.
    pub(super) async fn parts(
        &self,
        upstream: &Scoped<'_>,
        image: &str,
        manifest: &StoredManifest,
    ) -> Result<Parts, BuildpackError> {
        let document = parse(&manifest.bytes, image)?;
        let config_digest = digest_of(&document["config"])?;
        upstream.blob(image, &config_digest.to_string()).await?;
        let config = read_config(
            self.builds.store(),
            &config_digest,
            &format!("{image}: the config"),
        )
        .await?;
        let mut layers = Vec::new();
        for layer in document["layers"].as_array().cloned().unwrap_or_default() {
            let digest = digest_of(&layer)?;
            upstream.blob(image, &digest.to_string()).await?;
            let media_type = layer["mediaType"].as_str().unwrap_or_default();
            layers.push(LayerInput {
                digest,
                gzipped: media_type.ends_with("gzip"),
            });
        }
        Ok(Parts {
            document,
            config,
            layers,
        })
    }

    /// The builder's filesystem, unpacked once per builder digest, with the
    /// directories the sandbox mounts over made.
    pub(super) async fn rootfs(
        &self,
        digest: &Digest,
        layers: Vec<LayerInput>,
    ) -> Result<PathBuf, BuildpackError> {
        let dir = self
            .builders
            .get_or_make(digest.hex(), |dir: PathBuf| async move {
                let (store, target) = (self.builds.store().clone(), dir.join("rootfs"));
                let handle = tokio::runtime::Handle::current();
                self.builds
                    .cpu()
                    .run(move |cancel| {
                        unpack(&store, &handle, &layers, &target, "a builder layer", cancel)?;
                        prepare_mount_points(&target)
                    })
                    .await
            })
            .await?;
        Ok(dir.join("rootfs"))
    }
}

/// The run image a builder names: `/cnb/run.toml`, `/cnb/stack.toml`, or the
/// `io.buildpacks.builder.metadata` label.
pub(super) fn run_image_of(rootfs: &Path, config: &Value) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct RunToml {
        #[serde(default)]
        images: Vec<RunImage>,
    }
    #[derive(serde::Deserialize)]
    struct RunImage {
        image: String,
    }
    #[derive(serde::Deserialize)]
    struct StackToml {
        #[serde(rename = "run-image")]
        run_image: RunImage,
    }
    let read = |rel: &str| {
        crate::files::inside(rootfs, rel)
            .filter(|p| {
                std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() < 1 << 20)
            })
            .and_then(|p| std::fs::read_to_string(p).ok())
    };
    if let Some(r) = read("cnb/run.toml")
        .and_then(|t| toml::from_str::<RunToml>(&t).ok())
        .and_then(|r| r.images.into_iter().next())
    {
        return Some(r.image);
    }
    if let Some(s) = read("cnb/stack.toml").and_then(|t| toml::from_str::<StackToml>(&t).ok()) {
        return Some(s.run_image.image);
    }
    let label = config["config"]["Labels"]["io.buildpacks.builder.metadata"].as_str()?;
    let metadata: Value = serde_json::from_str(label).ok()?;
    metadata["stack"]["runImage"]["image"]
        .as_str()
        .map(str::to_owned)
}

/// The directories the sandbox mounts over must exist in the (read-only)
/// builder filesystem.
fn prepare_mount_points(rootfs: &Path) -> Result<(), BuildpackError> {
    for dir in [
        sandbox::APP,
        sandbox::LAYERS,
        sandbox::PLATFORM,
        sandbox::IO,
        "/tmp",
        "/proc",
        "/dev",
    ] {
        let path = rootfs.join(dir.trim_start_matches('/'));
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(BuildpackError::BadBuilder(format!(
                    "{dir} in the builder is not a directory"
                )));
            }
            Err(_) => std::fs::create_dir_all(&path).map_err(io_error("preparing the builder"))?,
        }
    }
    Ok(())
}
