//! Media types, and the ones kontain reads and writes.

use std::fmt;
use std::str::FromStr;

/// A media type such as `application/vnd.oci.image.manifest.v1+json`:
/// `type/subtype` of RFC 6838 restricted-name characters, parameters dropped.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MediaType(String);

impl MediaType {
    pub const DOCKER_MANIFEST: &'static str =
        "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &'static str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_CONFIG: &'static str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER_GZIP: &'static str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const OCI_MANIFEST: &'static str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &'static str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &'static str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER_GZIP: &'static str = "application/vnd.oci.image.layer.v1.tar+gzip";

    /// Every manifest and index type kontain reads: the `Accept` list for
    /// fetching images it builds on.
    pub const MANIFESTS: [&'static str; 4] = [
        Self::OCI_INDEX,
        Self::OCI_MANIFEST,
        Self::DOCKER_MANIFEST_LIST,
        Self::DOCKER_MANIFEST,
    ];

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A known-good constant; only for the literals above.
    pub(crate) fn from_static(s: &'static str) -> Self {
        MediaType(s.to_owned())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("media type {0:?} is not of the form type/subtype")]
pub struct InvalidMediaType(String);

impl FromStr for MediaType {
    type Err = InvalidMediaType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let essence = s.split(';').next().unwrap_or_default().trim();
        let restricted = |p: &str| {
            !p.is_empty()
                && p.len() <= 127
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        match essence.split_once('/') {
            Some((t, st)) if restricted(t) && restricted(st) => {
                Ok(MediaType(essence.to_ascii_lowercase()))
            }
            _ => Err(InvalidMediaType(s.to_owned())),
        }
    }
}

impl fmt::Display for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_media_types_and_drops_parameters() {
        let m: MediaType = "application/vnd.oci.image.manifest.v1+json; charset=utf-8"
            .parse()
            .unwrap();
        assert_eq!(m.as_str(), MediaType::OCI_MANIFEST);
        for bad in ["", "json", "a/", "/b", "a/b/c", "a/b c"] {
            assert!(bad.parse::<MediaType>().is_err(), "accepted {bad:?}");
        }
    }
}
