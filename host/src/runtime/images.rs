//! The `images` interface, always linked: layer, blob and manifest handles,
//! and `assemble`, which writes a config and manifest over stored layers.

use std::sync::Arc;

use super::bindings::kontain::generator::images;
use super::host::{Ctx, HostResult, Resource, Trap};
use crate::image::{HistoryEntry, ImageSpec, LayerBlob, ManifestFormat, Platform};
use crate::storage::{BlobInfo, ContentStore, StoredManifest};

/// A layer a plugin holds.
pub struct LayerHandle(pub LayerBlob);

/// A manifest a plugin holds (and may return).
pub struct ManifestHandle(pub StoredManifest);

/// Any other blob a plugin holds (and may return).
pub struct BlobHandle(pub BlobInfo);

type Images<'a> = Ctx<'a, Arc<ContentStore>>;

impl images::HostLayer for Images<'_> {
    async fn digest(&mut self, this: Resource<LayerHandle>) -> Trap<String> {
        Ok(self.get(&this)?.0.digest.to_string())
    }

    async fn diff_id(&mut self, this: Resource<LayerHandle>) -> Trap<String> {
        Ok(self.get(&this)?.0.diff_id.to_string())
    }

    async fn size(&mut self, this: Resource<LayerHandle>) -> Trap<u64> {
        Ok(self.get(&this)?.0.size)
    }

    async fn drop(&mut self, this: Resource<LayerHandle>) -> Trap<()> {
        self.take(this).map(drop)
    }
}

impl images::HostManifest for Images<'_> {
    async fn digest(&mut self, this: Resource<ManifestHandle>) -> Trap<String> {
        Ok(self.get(&this)?.0.digest.to_string())
    }

    async fn media_type(&mut self, this: Resource<ManifestHandle>) -> Trap<String> {
        Ok(self.get(&this)?.0.media_type.to_string())
    }

    async fn size(&mut self, this: Resource<ManifestHandle>) -> Trap<u64> {
        Ok(self.get(&this)?.0.bytes.len() as u64)
    }

    async fn drop(&mut self, this: Resource<ManifestHandle>) -> Trap<()> {
        self.take(this).map(drop)
    }
}

impl images::HostBlob for Images<'_> {
    async fn digest(&mut self, this: Resource<BlobHandle>) -> Trap<String> {
        Ok(self.get(&this)?.0.digest.to_string())
    }

    async fn size(&mut self, this: Resource<BlobHandle>) -> Trap<u64> {
        Ok(self.get(&this)?.0.size)
    }

    async fn drop(&mut self, this: Resource<BlobHandle>) -> Trap<()> {
        self.take(this).map(drop)
    }
}

impl From<images::Config> for ImageSpec {
    fn from(config: images::Config) -> Self {
        ImageSpec {
            platform: Platform {
                os: config.platform.os,
                architecture: config.platform.architecture,
                variant: config.platform.variant,
            },
            env: config.env,
            entrypoint: config.entrypoint,
            cmd: config.cmd,
            working_dir: config.working_dir,
            user: config.user,
            labels: config.labels,
            history: config
                .history
                .into_iter()
                .map(|h| HistoryEntry {
                    created_by: h.created_by,
                    comment: h.comment,
                    empty_layer: h.empty_layer,
                })
                .collect(),
            created: config.created,
        }
    }
}

impl images::Host for Images<'_> {
    async fn assemble(
        &mut self,
        format: images::ManifestFormat,
        config: images::Config,
        layers: Vec<Resource<LayerHandle>>,
        annotations: Vec<(String, String)>,
    ) -> HostResult<Resource<ManifestHandle>> {
        let blobs = layers
            .iter()
            .map(|l| Ok(self.get(l)?.0.clone()))
            .collect::<Trap<Vec<_>>>()?;
        let format = match format {
            images::ManifestFormat::Docker => ManifestFormat::Docker,
            images::ManifestFormat::Oci => ManifestFormat::Oci,
        };
        let spec = ImageSpec::from(config);
        let manifest =
            crate::image::assemble::assemble(self.service, format, &spec, &blobs, &annotations)
                .await?;
        self.push(ManifestHandle(manifest))
    }
}
