//! Referrers: which stored manifests name another as their `subject` (an
//! SBOM of an image, say), kept as one small object per pair under
//! `referrers/<subject>/<referrer>` holding the referrer's descriptor, so
//! that listing a subject's referrers is one `list` and reads no manifest.
//! Expiry keeps a referrer as long as its subject lives (see `expiry`).

use bytes::Bytes;
use serde_json::Value;

use super::{ContentStore, StorageError};
use crate::oci::Digest;

/// A descriptor is a few hundred bytes; annotations make it longer.
const MAX_DESCRIPTOR: u64 = 16 * 1024;

pub(crate) fn subject_prefix(subject: &Digest) -> String {
    format!("referrers/{}/{}/", subject.algorithm_name(), subject.hex())
}

fn referrer_key(subject: &Digest, referrer: &Digest) -> String {
    format!(
        "{}{}/{}",
        subject_prefix(subject),
        referrer.algorithm_name(),
        referrer.hex()
    )
}

/// The subject and referrer a key of `referrers/` names.
pub(crate) fn pair_of_key(key: &str) -> Option<(Digest, Digest)> {
    let mut parts = key.strip_prefix("referrers/")?.split('/');
    let subject = format!("{}:{}", parts.next()?, parts.next()?)
        .parse()
        .ok()?;
    let referrer = format!("{}:{}", parts.next()?, parts.next()?)
        .parse()
        .ok()?;
    parts.next().is_none().then_some((subject, referrer))
}

impl ContentStore {
    /// Records that the stored manifest `descriptor` describes (its
    /// `digest`, `mediaType`, `size`, `artifactType`, `annotations`) names
    /// `subject` as its subject.
    pub async fn put_referrer(
        &self,
        subject: &Digest,
        descriptor: &Value,
    ) -> Result<(), StorageError> {
        let referrer: Digest = descriptor["digest"]
            .as_str()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| StorageError::CorruptMetadata {
                digest: subject.clone(),
            })?;
        let bytes = Bytes::from(descriptor.to_string());
        self.driver()
            .put(&referrer_key(subject, &referrer), bytes)
            .await
    }

    /// The descriptors of the stored manifests whose subject is `subject`,
    /// ordered by digest; those whose manifest is gone are left out.
    pub async fn referrers(&self, subject: &Digest) -> Result<Vec<Value>, StorageError> {
        let driver = self.driver();
        let mut listed = driver.list(&subject_prefix(subject)).await?;
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        let mut found = Vec::new();
        for entry in listed {
            let Some((_, referrer)) = pair_of_key(&entry.key) else {
                continue;
            };
            // Too large (not ours) or gone: left out, not an error.
            let Ok(Some((bytes, _))) = driver.read_small(&entry.key, MAX_DESCRIPTOR).await else {
                continue;
            };
            let Ok(descriptor) = serde_json::from_slice::<Value>(&bytes) else {
                continue;
            };
            if descriptor["digest"].as_str() != Some(&referrer.to_string()) {
                continue;
            }
            if driver
                .stat(&super::content::manifest_key(&referrer))
                .await?
                .is_some()
            {
                found.push(descriptor);
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_both_digests() {
        let (s, r) = (Digest::sha256(b"s"), Digest::sha256(b"r"));
        assert_eq!(pair_of_key(&referrer_key(&s, &r)), Some((s, r)));
        assert_eq!(pair_of_key("referrers/sha256/00"), None);
    }
}
