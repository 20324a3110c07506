//! `mirror`: a pull-through cache of other registries.
//!
//! `mirror/busybox`, `mirror/ghcr.io/org/app:tag`, `mirror/<named upstream>/app`:
//! the host's upstream client does the work (allowlist, tokens, caching,
//! verification, serving stale tags when the upstream is down); this recipe
//! only says which image is wanted.

use kontain_sdk::{Blob, BlobRequest, Error, Generator, Manifest, Referrer, Request, upstream};

struct Mirror;

impl Generator for Mirror {
    fn resolve(request: Request) -> Result<Manifest, Error> {
        if request.repository.is_empty() {
            return Err(Error::InvalidName(
                "name the image to mirror after the prefix, e.g. mirror/busybox or mirror/ghcr.io/org/app".into(),
            ));
        }
        upstream::fetch_manifest(&request.repository, &request.reference, &request.accept)
    }

    fn fetch_blob(request: BlobRequest) -> Result<Blob, Error> {
        upstream::fetch_blob(&request.repository, &request.digest)
    }

    /// The upstream's referrers (SBOMs, signatures) of one of its manifests.
    fn referrers(repository: String, digest: String) -> Result<Vec<Referrer>, Error> {
        if repository.is_empty() {
            return Ok(Vec::new());
        }
        upstream::referrers(&repository, &digest)
    }

    /// The upstream's own tags.
    fn tags(repository: String) -> Result<Vec<String>, Error> {
        if repository.is_empty() {
            return Ok(Vec::new());
        }
        upstream::list_tags(&repository)
    }
}

kontain_sdk::export_generator!(Mirror);
