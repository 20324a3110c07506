//! Assembling an image: the config blob and the manifest over stored layers
//! ([`assemble`]), or a base image's manifest with layers added on top
//! ([`extend`]).
//!
//! JSON is written through `serde_json::Value`, whose maps are sorted, so the
//! same inputs always give the same bytes and the same digest (oci-spec keeps
//! labels and annotations in `HashMap`s, whose order changes per process).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use oci_spec::image::{
    Arch, ConfigBuilder, DescriptorBuilder, HistoryBuilder, ImageConfigurationBuilder,
    ImageManifestBuilder, Os, RootFsBuilder,
};

use serde_json::{Value, json};

use super::json::canonical;
use super::{ImageError, LayerBlob};
use crate::oci::{Digest, MediaType};
use crate::storage::{ContentStore, StoredManifest};

/// The creation time written when a generator gives none: fixed, so that
/// images are reproducible.
const EPOCH: &str = "1970-01-01T00:00:00Z";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestFormat {
    Docker,
    Oci,
}

impl ManifestFormat {
    fn manifest_type(self) -> &'static str {
        match self {
            ManifestFormat::Docker => MediaType::DOCKER_MANIFEST,
            ManifestFormat::Oci => MediaType::OCI_MANIFEST,
        }
    }
    fn config_type(self) -> &'static str {
        match self {
            ManifestFormat::Docker => MediaType::DOCKER_CONFIG,
            ManifestFormat::Oci => MediaType::OCI_CONFIG,
        }
    }
    fn layer_type(self) -> &'static str {
        match self {
            ManifestFormat::Docker => MediaType::DOCKER_LAYER_GZIP,
            ManifestFormat::Oci => MediaType::OCI_LAYER_GZIP,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistoryEntry {
    pub created_by: String,
    pub comment: String,
    pub empty_layer: bool,
}

/// What a generator decides about an image; the rootfs comes from the layers.
#[derive(Clone, Debug, Default)]
pub struct ImageSpec {
    pub platform: Platform,
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub labels: Vec<(String, String)>,
    pub history: Vec<HistoryEntry>,
    pub created: Option<String>,
}

fn invalid(e: impl std::fmt::Display) -> ImageError {
    ImageError::Invalid(e.to_string())
}

fn oci_digest(d: &Digest) -> Result<oci_spec::image::Digest, ImageError> {
    d.to_string().parse().map_err(invalid)
}

/// Serialises with sorted keys; see the module comment.
fn canonical_json<T: serde::Serialize>(value: &T) -> Result<Bytes, ImageError> {
    canonical(&serde_json::to_value(value).map_err(invalid)?)
}

fn non_empty(v: &[String]) -> Option<Vec<String>> {
    (!v.is_empty()).then(|| v.to_vec())
}

/// The config blob's bytes for `spec` over `layers`.
pub fn config_json(spec: &ImageSpec, layers: &[LayerBlob]) -> Result<Bytes, ImageError> {
    let layer_entries = spec.history.iter().filter(|h| !h.empty_layer).count();
    if !spec.history.is_empty() && layer_entries != layers.len() {
        return Err(ImageError::Invalid(format!(
            "{} history entries describe layers but the image has {} layers",
            layer_entries,
            layers.len()
        )));
    }
    if spec.platform.os.is_empty() || spec.platform.architecture.is_empty() {
        return Err(invalid("the platform needs an os and an architecture"));
    }
    let created = spec.created.clone().unwrap_or_else(|| EPOCH.to_owned());
    humantime::parse_rfc3339(&created)
        .map_err(|e| invalid(format!("created time {created:?}: {e}")))?;

    let mut config = ConfigBuilder::default();
    if let Some(env) = non_empty(&spec.env) {
        config = config.env(env);
    }
    if let Some(entrypoint) = non_empty(&spec.entrypoint) {
        config = config.entrypoint(entrypoint);
    }
    if let Some(cmd) = non_empty(&spec.cmd) {
        config = config.cmd(cmd);
    }
    if !spec.working_dir.is_empty() {
        config = config.working_dir(spec.working_dir.clone());
    }
    if !spec.user.is_empty() {
        config = config.user(spec.user.clone());
    }
    if !spec.labels.is_empty() {
        config = config.labels(spec.labels.iter().cloned().collect::<HashMap<_, _>>());
    }
    let history = spec
        .history
        .iter()
        .map(|h| {
            let mut b = HistoryBuilder::default()
                .created(created.clone())
                .created_by(h.created_by.clone());
            if !h.comment.is_empty() {
                b = b.comment(h.comment.clone());
            }
            if h.empty_layer {
                b = b.empty_layer(true);
            }
            b.build().map_err(invalid)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let diff_ids = layers
        .iter()
        .map(|l| l.diff_id.to_string())
        .collect::<Vec<_>>();
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(diff_ids)
        .build()
        .map_err(invalid)?;
    let mut image = ImageConfigurationBuilder::default()
        .created(created)
        .architecture(Arch::from(spec.platform.architecture.as_str()))
        .os(Os::from(spec.platform.os.as_str()))
        .config(config.build().map_err(invalid)?)
        .rootfs(rootfs);
    if let Some(variant) = &spec.platform.variant {
        image = image.variant(variant.clone());
    }
    if !history.is_empty() {
        image = image.history(history);
    }
    canonical_json(&image.build().map_err(invalid)?)
}

/// Stores the config blob and the manifest for `spec` over `layers`.
pub async fn assemble(
    store: &Arc<ContentStore>,
    format: ManifestFormat,
    spec: &ImageSpec,
    layers: &[LayerBlob],
    annotations: &[(String, String)],
) -> Result<StoredManifest, ImageError> {
    let config_bytes = config_json(spec, layers)?;
    let config_len = config_bytes.len() as u64;
    let config_blob = store.put_blob(config_bytes).await?;
    let config = DescriptorBuilder::default()
        .media_type(format.config_type())
        .digest(oci_digest(&config_blob.digest)?)
        .size(config_len)
        .build()
        .map_err(invalid)?;
    let layer_descriptors = layers
        .iter()
        .map(|l| {
            DescriptorBuilder::default()
                .media_type(format.layer_type())
                .digest(oci_digest(&l.digest)?)
                .size(l.size)
                .build()
                .map_err(invalid)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(format.manifest_type())
        .config(config)
        .layers(layer_descriptors);
    if !annotations.is_empty() {
        manifest = manifest.annotations(annotations.iter().cloned().collect::<HashMap<_, _>>());
    }
    let bytes = canonical_json(&manifest.build().map_err(invalid)?)?;
    let media_type = MediaType::from_static(format.manifest_type());
    Ok(store.put_manifest(&media_type, bytes).await?)
}

/// Adds `layers` on top of an image config: each one's diff id to the
/// rootfs, and its history entry.
pub fn add_layers<'a>(
    config: &mut Value,
    layers: impl IntoIterator<Item = (&'a LayerBlob, Value)>,
) -> Result<(), ImageError> {
    let (ids, entries): (Vec<Value>, Vec<Value>) = layers
        .into_iter()
        .map(|(layer, entry)| (json!(layer.diff_id.to_string()), entry))
        .unzip();
    let root = config
        .as_object_mut()
        .ok_or_else(|| invalid("an image config that is not an object"))?;
    root.entry("rootfs")
        .or_insert_with(|| json!({"type": "layers", "diff_ids": []}))
        .get_mut("diff_ids")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| invalid("an image config without rootfs.diff_ids"))?
        .extend(ids);
    let history = root.entry("history").or_insert_with(|| json!([]));
    match history.as_array_mut() {
        Some(history) => history.extend(entries),
        None => *history = Value::Array(entries),
    }
    Ok(())
}

/// Stores `config` and a manifest that is `manifest` (a base image's, of
/// `base_type`) with `layers` appended, typed like the base's layers and
/// listed in `config` already; `annotate` may edit the manifest last.
pub async fn extend(
    store: &Arc<ContentStore>,
    base_type: &MediaType,
    mut manifest: Value,
    config: &Value,
    layers: &[&LayerBlob],
    annotate: impl FnOnce(&mut Value),
) -> Result<StoredManifest, ImageError> {
    let config_bytes = canonical(config)?;
    let config_len = config_bytes.len();
    let config_blob = store.put_blob(config_bytes).await?;
    let layer_type = if base_type.as_str() == MediaType::DOCKER_MANIFEST {
        MediaType::DOCKER_LAYER_GZIP
    } else {
        MediaType::OCI_LAYER_GZIP
    };
    manifest["config"]["digest"] = json!(config_blob.digest.to_string());
    manifest["config"]["size"] = json!(config_len);
    let list = manifest["layers"]
        .as_array_mut()
        .ok_or_else(|| invalid("a base manifest without layers"))?;
    for layer in layers {
        list.push(json!({
            "mediaType": layer_type,
            "digest": layer.digest.to_string(),
            "size": layer.size,
        }));
    }
    annotate(&mut manifest);
    Ok(store.put_manifest(base_type, canonical(&manifest)?).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> LayerBlob {
        LayerBlob {
            digest: Digest::sha256(&[n]),
            diff_id: Digest::sha256(&[n, n]),
            size: 10,
        }
    }

    fn spec() -> ImageSpec {
        ImageSpec {
            platform: Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                variant: None,
            },
            labels: vec![
                ("b".into(), "2".into()),
                ("a".into(), "1".into()),
                ("c".into(), "3".into()),
            ],
            history: vec![HistoryEntry {
                created_by: "test".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn config_json_is_deterministic_and_lists_diff_ids() {
        let a = config_json(&spec(), &[layer(1)]).unwrap();
        for _ in 0..10 {
            assert_eq!(config_json(&spec(), &[layer(1)]).unwrap(), a);
        }
        let v: serde_json::Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["rootfs"]["diff_ids"][0], layer(1).diff_id.to_string());
        assert_eq!(v["os"], "linux");
        assert_eq!(v["created"], EPOCH);
    }

    #[test]
    fn rejects_history_that_does_not_match_the_layers() {
        let err = config_json(&spec(), &[layer(1), layer(2)]).unwrap_err();
        assert!(matches!(err, ImageError::Invalid(_)));
    }

    #[test]
    fn rejects_a_created_time_that_is_not_rfc3339() {
        let mut s = spec();
        s.created = Some("yesterday".into());
        assert!(config_json(&s, &[layer(1)]).is_err());
    }
}
