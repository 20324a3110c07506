//! The SBOMs of a buildpack image, attached as OCI 1.1 artifacts whose
//! subject is the image: the buildpacks' own SBOM files, as the CNB
//! buildpack API lets them write them (`<layers>/launch.sbom.<ext>` and
//! `<layers>/<layer>.sbom.<ext>` for each launch layer; CycloneDX, SPDX or
//! Syft JSON), one artifact each, and an SPDX document of what kontain
//! knows: the app's commit, each buildpack with its version, and the run
//! image.
//!
//! Buildpacks are untrusted and wrote these files: a file is read only if it
//! and its buildpack's layers directory are what they seem (a directory and
//! a regular file, not symlinks; no buildpack process is alive by then, so
//! nothing can swap them), and at most [`MAX_FILE`] bytes each.

use std::path::Path;

use bytes::Bytes;
use serde_json::Value;

use super::BuildpackError;
use super::lifecycle::{self, BuildOutput};
use crate::image::json::canonical;
use crate::image::sbom::{self, oci_purl, package, relationship};
use crate::oci::Digest;
use crate::storage::{ContentStore, StoredManifest};

/// The largest SBOM file a buildpack may contribute.
const MAX_FILE: u64 = 8 * 1024 * 1024;

/// The extensions the buildpack API defines, with their media types.
const FORMATS: [(&str, &str); 3] = [
    ("cdx.json", "application/vnd.cyclonedx+json"),
    ("spdx.json", sbom::SPDX_JSON),
    ("syft.json", "application/vnd.syft+json"),
];

/// One SBOM file a buildpack wrote: its media type and bytes.
pub struct File {
    pub media_type: &'static str,
    pub bytes: Bytes,
}

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

/// The SBOM files found at `places` under `layers`, in that order, each
/// stem's by format.
pub fn files(layers: &Path, places: &[(String, Vec<String>)]) -> Vec<File> {
    let mut found = Vec::new();
    for (bp, stems) in places {
        let dir = layers.join(bp);
        if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        for stem in stems {
            for (ext, media_type) in FORMATS {
                let path = dir.join(format!("{stem}.sbom.{ext}"));
                let Ok(meta) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if !meta.is_file() || meta.len() > MAX_FILE {
                    tracing::warn!(buildpack = %bp, file = %format!("{stem}.sbom.{ext}"), "SBOM file left out: not a regular file, or too large");
                    continue;
                }
                if let Ok(bytes) = std::fs::read(&path) {
                    found.push(File {
                        media_type,
                        bytes: Bytes::from(bytes),
                    });
                }
            }
        }
    }
    found
}

/// How an SBOM names the repository of `url`: its last two path parts
/// (`owner/repo`), never the server's own path or credentials.
pub fn repository_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let mut parts = path.trim_end_matches('/').rsplit('/');
    let repo = parts.next().unwrap_or_default().trim_end_matches(".git");
    let owner = parts.next().unwrap_or_default();
    format!("{owner}/{repo}")
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

/// Attaches kontain's document and every buildpack SBOM file to `image`.
pub async fn attach(
    store: &std::sync::Arc<ContentStore>,
    image: &StoredManifest,
    document: &Value,
    files: Vec<File>,
) -> Result<(), BuildpackError> {
    let bytes = canonical(document)?;
    sbom::attach(store, image, sbom::SPDX_JSON, bytes).await?;
    for file in files {
        sbom::attach(store, image, file.media_type, file.bytes).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_are_named_without_server_paths() {
        for (url, want) in [
            ("https://github.com/acme/app", "acme/app"),
            ("https://github.com/acme/app.git", "acme/app"),
            ("file:///srv/git/acme/app/", "acme/app"),
            ("https://user:secret@git.example/acme/app?x=1", "acme/app"),
        ] {
            assert_eq!(repository_name(url), want, "{url}");
        }
    }
}
