//! `GET /v2/<name>/referrers/<digest>[?artifactType=<type>]`: the stored
//! manifests whose `subject` is that digest (kontain's own SBOMs), as the
//! spec's OCI image index of descriptors. A digest with none, or unknown,
//! gets an empty index, as the spec asks.

use bytes::Bytes;
use http::{HeaderMap, Response, header};

use super::response::{Body, empty, full};
use super::{ApiError, Registry};
use crate::oci::{Digest, MediaType};

/// Tells the client that `artifactType` was applied (the spec's header).
const FILTERS_APPLIED: &str = "oci-filters-applied";

impl Registry {
    pub(super) async fn referrers(
        &self,
        name: &str,
        digest: &str,
        query: &str,
        headers: &HeaderMap,
        head: bool,
    ) -> Result<Response<Body>, ApiError> {
        let (name, route) = self.route(name, headers)?;
        let digest: Digest = digest
            .parse()
            .map_err(|e: crate::oci::DigestError| ApiError::DigestInvalid(e.into()))?;
        super::record(&name, &digest);
        let wanted = url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "artifactType")
            .map(|(_, v)| v.into_owned());
        // As for anything answered from storage: only under a name whose
        // generator has served a manifest.
        let mut manifests = match self.admitted.admits(&self.storage, &route).await {
            true => self.storage.referrers(&digest).await?,
            false => Vec::new(),
        };
        // Those the generator knows too (a mirror's upstream), once each.
        for found in self.generators.referrers(route, digest.clone()).await? {
            if !manifests.iter().any(|m| m["digest"] == found["digest"]) {
                manifests.push(found);
            }
        }
        if let Some(wanted) = &wanted {
            manifests.retain(|d| d["artifactType"].as_str() == Some(wanted.as_str()));
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MediaType::OCI_INDEX,
            "manifests": manifests,
        });
        let bytes = Bytes::from(index.to_string());
        let mut builder = Response::builder()
            .header(header::CONTENT_TYPE, MediaType::OCI_INDEX)
            .header(header::CONTENT_LENGTH, bytes.len());
        if wanted.is_some() {
            builder = builder.header(FILTERS_APPLIED, "artifactType");
        }
        let body = if head { empty() } else { full(bytes) };
        Ok(builder
            .body(body)
            .unwrap_or_else(|_| Response::new(empty())))
    }
}
