//! What image manifests and indexes refer to, by the image spec's
//! descriptors: a config, layers, and (for an index) child manifests.

use super::Digest;

/// Every digest a manifest or index document refers to: its config, its
/// layers and its child manifests. Descriptors without a valid digest are
/// skipped; a document that is not JSON refers to nothing.
pub fn references(document: &[u8]) -> Vec<Digest> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(document) else {
        return Vec::new();
    };
    let digest = |v: &serde_json::Value| v["digest"].as_str()?.parse().ok();
    let lists = ["layers", "manifests"]
        .into_iter()
        .flat_map(|key| doc[key].as_array().into_iter().flatten());
    std::iter::once(&doc["config"])
        .chain(lists)
        .filter_map(digest)
        .collect()
}

/// The blobs an image manifest names (its config and layers) with the
/// sizes it declares for them; child manifests of an index are left out.
pub fn blob_sizes(document: &[u8]) -> Vec<(Digest, u64)> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(document) else {
        return Vec::new();
    };
    let sized =
        |v: &serde_json::Value| Some((v["digest"].as_str()?.parse().ok()?, v["size"].as_u64()?));
    std::iter::once(&doc["config"])
        .chain(doc["layers"].as_array().into_iter().flatten())
        .filter_map(sized)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_config_layers_and_children() {
        let a = Digest::sha256(b"a");
        let b = Digest::sha256(b"b");
        let c = Digest::sha256(b"c");
        let image = format!(
            r#"{{"config":{{"digest":"{a}"}},"layers":[{{"digest":"{b}"}},{{"digest":"bad"}}]}}"#
        );
        assert_eq!(references(image.as_bytes()), vec![a, b]);
        let index = format!(r#"{{"manifests":[{{"digest":"{c}"}}]}}"#);
        assert_eq!(references(index.as_bytes()), vec![c]);
        assert!(references(b"not json").is_empty());
        let (a, b) = (Digest::sha256(b"a"), Digest::sha256(b"b"));
        let sized =
            format!(r#"{{"config":{{"digest":"{a}","size":7}},"layers":[{{"digest":"{b}"}}]}}"#);
        assert_eq!(blob_sizes(sized.as_bytes()), vec![(a, 7)]);
    }
}
