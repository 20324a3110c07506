//! The SBOMs of a buildpack image, attached as OCI 1.1 artifacts whose
//! subject is the image: the buildpacks' own SBOM files, as the CNB
//! buildpack API lets them write them (`<layers>/launch.sbom.<ext>` and
//! `<layers>/<layer>.sbom.<ext>` for each launch layer; CycloneDX, SPDX or
//! Syft JSON), one artifact each, and an SPDX document of what kontain
//! knows: the app's commit, each buildpack with its version, and the run
//! image. The buildpacks' files are also in the image, as the platform
//! spec's SBOM layer (`/layers/sbom/launch/<buildpack>/[<layer>/]sbom.<ext>`,
//! its diff ID in the lifecycle metadata label), which is where `pack sbom
//! download` and the lifecycle's own tools look.
//!
//! Buildpacks are untrusted and wrote these files: a file is read only if its
//! buildpack's layers directory is a directory (not a symlink) and the file,
//! opened without following a symlink, is a regular file of at most
//! [`MAX_FILE`] bytes; at most [`MAX_FILES`] files and [`MAX_TOTAL`] bytes
//! per build. In the sandbox no buildpack process outlives its step, so
//! nothing swaps a directory between the check and the open; with
//! `allow_unsandboxed` buildpacks already run as the server's user.

use std::path::Path;

use bytes::Bytes;
use serde_json::Value;

use super::BuildpackError;
use super::lifecycle::{self, BuildOutput};
use crate::image::json::canonical;
use crate::image::sbom::{self, oci_purl, package, relationship};
use crate::oci::Digest;
use crate::storage::{ContentStore, StoredManifest};

/// The largest SBOM file a buildpack may contribute, how many files a build
/// may attach, and how many bytes in all.
const MAX_FILE: u64 = 8 * 1024 * 1024;
const MAX_FILES: usize = 64;
const MAX_TOTAL: u64 = 32 * 1024 * 1024;

/// The extensions the buildpack API defines, with their media types.
const FORMATS: [(&str, &str); 3] = [
    ("cdx.json", "application/vnd.cyclonedx+json"),
    ("spdx.json", sbom::SPDX_JSON),
    ("syft.json", "application/vnd.syft+json"),
];

/// Where each buildpack may have left SBOM files: its layers directory's
/// name and the file stems (`launch`, then its launch layers by name).
pub fn places(output: &BuildOutput) -> Vec<(String, Vec<String>)> {
    output
        .buildpacks
        .iter()
        .map(|bp| {
            let stems = std::iter::once("launch".to_owned()).chain(
                bp.layers
                    .iter()
                    .filter(|(_, t)| t.launch)
                    .map(|(name, _)| name.clone()),
            );
            (lifecycle::escape_id(&bp.id), stems.collect())
        })
        .collect()
}

/// A buildpack's SBOM file, read.
pub struct SbomFile {
    /// The buildpack's layers directory name (its escaped id).
    pub buildpack: String,
    /// `launch`, or the launch layer the file describes.
    pub stem: String,
    /// `cdx.json`, `spdx.json` or `syft.json`.
    pub ext: &'static str,
    pub media_type: &'static str,
    pub bytes: Bytes,
}

impl SbomFile {
    /// Where the platform spec puts it in the image's SBOM layer.
    pub fn layer_path(&self) -> String {
        match self.stem.as_str() {
            "launch" => format!("layers/sbom/launch/{}/sbom.{}", self.buildpack, self.ext),
            layer => format!(
                "layers/sbom/launch/{}/{layer}/sbom.{}",
                self.buildpack, self.ext
            ),
        }
    }
}

/// The SBOM files at `places` under `layers`, in that order, each stem's by
/// format, read: at most [`MAX_FILES`] files and [`MAX_TOTAL`] bytes. Only
/// a buildpack directory that is a directory (not a symlink) is looked in.
pub fn collect(layers: &Path, places: &[(String, Vec<String>)]) -> Vec<SbomFile> {
    let mut found = Vec::new();
    let mut total = 0u64;
    for (bp, stems) in places {
        let dir = layers.join(bp);
        if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        for stem in stems {
            for (ext, media_type) in FORMATS {
                let path = dir.join(format!("{stem}.sbom.{ext}"));
                if std::fs::symlink_metadata(&path).is_err() {
                    continue;
                }
                if found.len() == MAX_FILES {
                    tracing::warn!(
                        kept = MAX_FILES,
                        "buildpacks left more SBOM files than are kept"
                    );
                    return found;
                }
                let Some(bytes) = read(&path) else {
                    continue;
                };
                total += bytes.len() as u64;
                if total > MAX_TOTAL {
                    tracing::warn!(
                        limit = MAX_TOTAL,
                        "the buildpacks' SBOM files pass the limit: the rest are left out"
                    );
                    return found;
                }
                found.push(SbomFile {
                    buildpack: bp.clone(),
                    stem: stem.clone(),
                    ext,
                    media_type,
                    bytes,
                });
            }
        }
    }
    found
}

/// A buildpack's SBOM file, if it is a regular file of at most [`MAX_FILE`]
/// bytes: opened without following a symlink or blocking on a FIFO, and
/// checked on the open file, so that what is read is what was checked.
fn read(path: &Path) -> Option<Bytes> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_FILE {
        tracing::warn!(file = %path.display(), "SBOM file left out: not a regular file, or too large");
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1).read_to_end(&mut bytes).ok()?;
    (bytes.len() as u64 <= MAX_FILE).then(|| Bytes::from(bytes))
}

/// What the build was made of, as the image's SPDX document.
pub fn document(
    name: &str,
    subject: &Digest,
    commit: &str,
    run: (&str, &Digest),
    output: &BuildOutput,
) -> Value {
    let mut packages = vec![
        package("SPDXRef-App", name, commit, "SOURCE", None),
        package(
            "SPDXRef-RunImage",
            run.0,
            &run.1.to_string(),
            "CONTAINER",
            Some(oci_purl(run.0, run.1)),
        ),
    ];
    let mut relationships = vec![
        relationship("SPDXRef-Image", "GENERATED_FROM", "SPDXRef-App"),
        relationship("SPDXRef-Image", "DESCENDANT_OF", "SPDXRef-RunImage"),
    ];
    for (n, bp) in output.buildpacks.iter().enumerate() {
        let id = format!("SPDXRef-Buildpack-{n}");
        packages.push(package(&id, &bp.id, &bp.version, "INSTALL", None));
        relationships.push(relationship(&id, "BUILD_TOOL_OF", "SPDXRef-Image"));
    }
    sbom::spdx("buildpack", name, subject, packages, relationships)
}

/// Attaches kontain's document, then the buildpacks' SBOM files, to
/// `image`, one artifact each.
pub async fn attach(
    store: &std::sync::Arc<ContentStore>,
    image: &StoredManifest,
    document: &Value,
    files: &[SbomFile],
) -> Result<(), BuildpackError> {
    let bytes = canonical(document)?;
    sbom::attach(store, image, sbom::SPDX_JSON, bytes).await?;
    for file in files {
        sbom::attach(store, image, file.media_type, file.bytes.clone()).await?;
    }
    Ok(())
}
