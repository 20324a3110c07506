//! The `flatten` capability: any image squashed to one layer, as the
//! container runtime would see its filesystem (`merge`), with the config
//! kept and the rootfs replaced. An index is flattened per platform;
//! attestation children (`unknown/unknown`) are dropped. The same source
//! always gives the same digest, and results are built once and cached
//! under the source's digest (`image::Builds`). Images come through the
//! generator's [`Scoped`] upstream. No config section (a generator's
//! `max_bytes` caps what one platform may unpack); its WIT host
//! implementation is `wit`.

mod merge;
pub mod wit;

use std::sync::Arc;

use serde_json::{Value, json};

use crate::generator::{Classify, ErrorKind};
use crate::image::json::{canonical, digest_of, parse, read_config};
use crate::image::read::LayerInput;
use crate::image::{Builds, ImageError, invalid};
use crate::oci::MediaType;
use crate::storage::StoredManifest;
use crate::upstream::{Scoped, Upstream, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl Classify for FlattenError {
    fn kind(&self) -> ErrorKind {
        match self {
            FlattenError::Upstream(e) => e.kind(),
            FlattenError::Image(e) => e.kind(),
        }
    }
}

pub struct Flatten {
    upstream: Arc<Upstream>,
    builds: Arc<Builds>,
}

impl Flatten {
    pub fn new(upstream: Arc<Upstream>, builds: Arc<Builds>) -> Self {
        Flatten { upstream, builds }
    }

    /// Where its images come from.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Flattens `source` (an image manifest or an index of `image`, fetched
    /// through `upstream`) and stores the result. `limit` caps the bytes
    /// unpacked from each platform's layers.
    pub async fn image(
        &self,
        upstream: &Scoped<'_>,
        image: &str,
        source: &StoredManifest,
        accept: &[String],
        limit: u64,
    ) -> Result<StoredManifest, FlattenError> {
        // v2: images come with an SBOM naming their source.
        let key = format!("flatten v2 {}", source.digest);
        self.builds
            .build(&key, || async {
                crate::activity::phase("flattening");
                let document = parse(&source.bytes, "the image")?;
                match source.media_type.as_str() {
                    MediaType::OCI_INDEX | MediaType::DOCKER_MANIFEST_LIST => {
                        self.index(upstream, image, source, document, accept, limit)
                            .await
                    }
                    MediaType::OCI_MANIFEST | MediaType::DOCKER_MANIFEST => {
                        self.manifest(upstream, image, source, document, limit)
                            .await
                    }
                    other => Err(invalid(format!("cannot flatten a {other}")).into()),
                }
            })
            .await
    }

    /// Every platform child flattened; attestations (`unknown/unknown`) dropped;
    /// each child's platform and annotations kept, its digest and size new.
    async fn index(
        &self,
        upstream: &Scoped<'_>,
        image: &str,
        source: &StoredManifest,
        mut index: Value,
        accept: &[String],
        limit: u64,
    ) -> Result<StoredManifest, FlattenError> {
        let children = index["manifests"].as_array().cloned().unwrap_or_default();
        let mut flattened = Vec::new();
        for mut child in children {
            let platform = &child["platform"];
            if platform["os"] == "unknown" || platform["architecture"] == "unknown" {
                continue;
            }
            let digest = digest_of(&child)?;
            let manifest = upstream
                .manifest(image, &digest.to_string(), accept)
                .await?;
            let document = parse(&manifest.bytes, "a platform image")?;
            let done = self
                .manifest(upstream, image, &manifest, document, limit)
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
            ))
            .into());
        }
        index["manifests"] = Value::Array(flattened);
        let stored = self
            .builds
            .store()
            .put_manifest(&source.media_type, canonical(&index)?)
            .await
            .map_err(ImageError::from)?;
        self.attach_sbom(image, source, &stored).await?;
        Ok(stored)
    }

    /// Attaches an SPDX document saying that `flattened` was generated from
    /// `image` at `source`'s digest.
    async fn attach_sbom(
        &self,
        image: &str,
        source: &StoredManifest,
        flattened: &StoredManifest,
    ) -> Result<(), FlattenError> {
        use crate::image::sbom;
        let origin = sbom::package(
            "SPDXRef-Source",
            image,
            &source.digest.to_string(),
            "CONTAINER",
            Some(sbom::oci_purl(image, &source.digest)),
        );
        let document = sbom::spdx(
            "flatten",
            image,
            &flattened.digest,
            vec![origin],
            vec![sbom::relationship(
                "SPDXRef-Image",
                "GENERATED_FROM",
                "SPDXRef-Source",
            )],
        );
        sbom::attach(
            self.builds.store(),
            flattened,
            sbom::SPDX_JSON,
            canonical(&document)?,
        )
        .await?;
        Ok(())
    }

    async fn manifest(
        &self,
        upstream: &Scoped<'_>,
        image: &str,
        source: &StoredManifest,
        mut manifest: Value,
        limit: u64,
    ) -> Result<StoredManifest, FlattenError> {
        let config_digest = digest_of(&manifest["config"])?;
        upstream.blob(image, &config_digest.to_string()).await?;
        let mut config =
            read_config(self.builds.store(), &config_digest, "the image config").await?;
        let mut inputs = Vec::new();
        for layer in manifest["layers"].as_array().cloned().unwrap_or_default() {
            let digest = digest_of(&layer)?;
            let media_type = layer["mediaType"].as_str().unwrap_or_default();
            let gzipped = match media_type {
                MediaType::OCI_LAYER_GZIP | MediaType::DOCKER_LAYER_GZIP => true,
                "application/vnd.oci.image.layer.v1.tar"
                | "application/vnd.docker.image.rootfs.diff.tar" => false,
                other => {
                    return Err(invalid(format!("cannot flatten a layer of type {other:?}")).into());
                }
            };
            upstream.blob(image, &digest.to_string()).await?;
            inputs.push(LayerInput { digest, gzipped });
        }

        let store = self.builds.store().clone();
        let handle = tokio::runtime::Handle::current();
        let layer = self
            .builds
            .cpu()
            .run(move |cancel| merge::merge(&store, &handle, &inputs, limit, cancel))
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
        // The merged layer replaces every layer of the source.
        manifest["layers"] = json!([]);
        let flattened = crate::image::assemble::extend(
            self.builds.store(),
            &source.media_type,
            manifest,
            &config,
            &[&layer],
            |_| {},
        )
        .await?;
        self.attach_sbom(image, source, &flattened).await?;
        Ok(flattened)
    }
}
