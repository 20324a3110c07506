//! `flatten`: any image, squashed to one layer.
//!
//! `flatten/busybox`, `flatten/ghcr.io/org/app:tag`, `flatten/<named upstream>/app`:
//! the source comes through the host's upstream client (same names, allowlist
//! and cache as `mirror`); the host merges the layers natively.

use kontain_sdk::{Error, Generator, Manifest, Request, flatten, upstream};

struct Flatten;

impl Generator for Flatten {
    fn resolve(request: Request) -> Result<Manifest, Error> {
        if request.repository.is_empty() {
            return Err(Error::InvalidName(
                "name the image to flatten after the prefix, e.g. flatten/busybox".into(),
            ));
        }
        if request.is_digest() {
            // Flattened images are stored by their own digest when made; a
            // digest that is not stored names no flattened image.
            return Err(Error::NotFound(format!(
                "{} is not a flattened image this server made; pull by tag",
                request.reference
            )));
        }
        let source =
            upstream::fetch_manifest(&request.repository, &request.reference, &request.accept)?;
        flatten::image(&request.repository, &source, &request.accept)
    }

    /// Every tag of the source can be flattened.
    fn tags(repository: String) -> Result<Vec<String>, Error> {
        if repository.is_empty() {
            return Ok(Vec::new());
        }
        upstream::list_tags(&repository)
    }
}

kontain_sdk::export_generator!(Flatten);
