//! Image documents as JSON: written canonically (sorted keys, so the same
//! document always has the same digest), read with errors that say what was
//! being read.

use bytes::Bytes;
use serde_json::Value;

use super::{ImageError, invalid};
use crate::oci::Digest;
use crate::storage::ContentStore;

/// Image configs larger than this are refused.
const MAX_CONFIG_BYTES: u64 = 1 << 22;

/// JSON bytes with sorted keys (`serde_json::Value` maps are sorted).
pub fn canonical(v: &Value) -> Result<Bytes, ImageError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| invalid(e.to_string()))
}

/// `bytes` as JSON; `what` names the document in the error.
pub fn parse(bytes: &[u8], what: &str) -> Result<Value, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| invalid(format!("{what} is not JSON: {e}")))
}

/// The digest of an image descriptor (`{"digest": …}`).
pub fn digest_of(v: &Value) -> Result<Digest, ImageError> {
    v["digest"]
        .as_str()
        .ok_or_else(|| invalid("a descriptor without a digest"))?
        .parse()
        .map_err(|e| invalid(format!("a descriptor with a bad digest: {e}")))
}

/// The `Env` list of an image config.
pub fn config_env(config: &Value) -> Vec<String> {
    config["config"]["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The config blob `digest` (already stored), parsed.
pub async fn read_config(
    store: &ContentStore,
    digest: &Digest,
    what: &str,
) -> Result<Value, ImageError> {
    let bytes = store
        .small_blob(digest, MAX_CONFIG_BYTES)
        .await
        .map_err(|e| match e {
            crate::storage::StorageError::TooLarge { limit } => ImageError::TooLarge {
                what: "an image config",
                limit,
            },
            other => other.into(),
        })?
        .ok_or_else(|| invalid(format!("blob {digest} is not stored")))?;
    parse(&bytes, what)
}

/// The `config` object of an image config (entrypoint, env, user…),
/// created if the config has none; `what` names the config in errors.
pub fn inner_config<'a>(
    config: &'a mut Value,
    what: &str,
) -> Result<&'a mut serde_json::Map<String, Value>, ImageError> {
    let root = config
        .as_object_mut()
        .ok_or_else(|| invalid(format!("{what} is not an object")))?;
    let inner = root
        .entry("config")
        .or_insert_with(|| Value::Object(Default::default()));
    if !inner.is_object() {
        *inner = Value::Object(Default::default());
    }
    inner
        .as_object_mut()
        .ok_or_else(|| invalid(format!("{what} has no config object")))
}
