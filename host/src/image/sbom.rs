//! SBOMs attached to stored images as OCI 1.1 artifacts: a manifest whose
//! `artifactType` is the document's type, whose config is the spec's empty
//! descriptor, whose one layer is the document, and whose `subject` is the
//! image; recorded as a referrer of the image so that the referrers API
//! lists it. Nothing here is time-dependent: the same document for the same
//! image gives the same artifact digest.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};

use super::ImageError;
use super::json::canonical;
use crate::oci::{Digest, MediaType};
use crate::storage::{ContentStore, StoredManifest};

/// SPDX documents in JSON, as `ko build --sbom=spdx` publishes them.
pub const SPDX_JSON: &str = "application/spdx+json";

/// The image spec's empty JSON config (`{}`), for artifacts without one.
const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";

/// The fixed creation time every SBOM states: the image's own, the epoch.
pub const EPOCH: &str = "1970-01-01T00:00:00Z";

/// Stores `document` (of media type `kind`) as an artifact about `subject`
/// and records it as a referrer; returns the artifact's manifest.
pub async fn attach(
    store: &Arc<ContentStore>,
    subject: &StoredManifest,
    kind: &str,
    document: Bytes,
) -> Result<StoredManifest, ImageError> {
    let empty = store.put_blob(Bytes::from_static(EMPTY)).await?;
    let size = document.len();
    let layer = store.put_blob(document).await?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MediaType::OCI_MANIFEST,
        "artifactType": kind,
        "config": { "mediaType": EMPTY_TYPE, "digest": empty.digest.to_string(), "size": EMPTY.len() },
        "layers": [{ "mediaType": kind, "digest": layer.digest.to_string(), "size": size }],
        "subject": {
            "mediaType": subject.media_type.as_str(),
            "digest": subject.digest.to_string(),
            "size": subject.bytes.len(),
        },
    });
    let media_type: MediaType = MediaType::OCI_MANIFEST
        .parse()
        .map_err(|e| super::invalid(format!("{e}")))?;
    let stored = store
        .put_manifest(&media_type, canonical(&manifest)?)
        .await?;
    store
        .put_referrer(&subject.digest, &descriptor(&stored, kind))
        .await?;
    Ok(stored)
}

/// The referrers API's descriptor of an artifact manifest.
fn descriptor(artifact: &StoredManifest, kind: &str) -> Value {
    json!({
        "mediaType": artifact.media_type.as_str(),
        "digest": artifact.digest.to_string(),
        "size": artifact.bytes.len(),
        "artifactType": kind,
    })
}

/// A document namespace unique to the described image, as SPDX asks, and
/// reproducible.
pub fn namespace(kind: &str, subject: &Digest) -> String {
    format!("https://kontain.dev/spdx/{kind}/{}", subject.hex())
}

/// An SPDX package: `id` (`SPDXRef-…`), name, version and purpose (one of
/// SPDX 2.3's, e.g. `CONTAINER`, `APPLICATION`, `LIBRARY`), with a purl
/// when there is one. Nothing is analysed file by file.
pub fn package(id: &str, name: &str, version: &str, purpose: &str, purl: Option<String>) -> Value {
    let mut p = json!({
        "SPDXID": id,
        "name": name,
        "versionInfo": version,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": purpose,
    });
    if let Some(purl) = purl {
        p["externalRefs"] = json!([{
            "referenceCategory": "PACKAGE-MANAGER",
            "referenceType": "purl",
            "referenceLocator": purl,
        }]);
    }
    p
}

/// An SPDX relationship: `from` `kind` `to`.
pub fn relationship(from: &str, kind: &str, to: &str) -> Value {
    json!({ "spdxElementId": from, "relationshipType": kind, "relatedSpdxElement": to })
}

/// The purl of an OCI image by digest (`pkg:oci/<last name part>@sha256%3A…`).
pub fn oci_purl(name: &str, digest: &Digest) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    format!("pkg:oci/{last}@{}", digest.to_string().replace(':', "%3A"))
}

/// An SPDX 2.3 document about the image `subject` (named `name`), made by
/// kontain's `kind` generator: the image as package `SPDXRef-Image`, which
/// the document describes, then `packages` and `relationships`.
pub fn spdx(
    kind: &str,
    name: &str,
    subject: &Digest,
    packages: Vec<Value>,
    relationships: Vec<Value>,
) -> Value {
    let image = package(
        "SPDXRef-Image",
        name,
        &subject.to_string(),
        "CONTAINER",
        Some(oci_purl(name, subject)),
    );
    let describes = relationship("SPDXRef-DOCUMENT", "DESCRIBES", "SPDXRef-Image");
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{name}@{subject}"),
        "documentNamespace": namespace(kind, subject),
        "creationInfo": {
            "created": EPOCH,
            "creators": [format!("Tool: kontain-{}", env!("CARGO_PKG_VERSION"))],
        },
        "packages": std::iter::once(image).chain(packages).collect::<Vec<_>>(),
        "relationships": std::iter::once(describes).chain(relationships).collect::<Vec<_>>(),
    })
}
