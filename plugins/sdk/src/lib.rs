//! The kontain plugin SDK: write a generator as a type implementing
//! [`Generator`] and export it with [`export_generator!`].
//!
//! ```ignore
//! use kontain_sdk::{Error, Generator, Manifest, Request};
//!
//! struct Hello;
//!
//! impl Generator for Hello {
//!     fn resolve(request: Request) -> Result<Manifest, Error> {
//!         Err(Error::NotFound(format!("no image {}", request.reference)))
//!     }
//! }
//!
//! kontain_sdk::export_generator!(Hello);
//! ```
//!
//! The WIT bindings are generated here, once, so that every plugin uses the
//! same types; plugins should not run `wit_bindgen::generate!` themselves.

// The generated bindings name this crate by its absolute path so that the
// export macro works from plugin crates; make that path resolve here too.
extern crate self as kontain_sdk;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "kontain:generator/tagged-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "::kontain_sdk::bindings",
        runtime_path: "::kontain_sdk::__wit_bindgen::rt",
    });
}

pub use bindings::exports::kontain::generator::generator::{BlobRequest, Request};
pub use bindings::kontain::generator::images::{
    self, Blob, Config, History, Layer, Manifest, ManifestFormat, Platform,
};
pub use bindings::kontain::generator::types::{Error, Referrer};
// Every interface of the world, by name: a capability added to the WIT is
// reachable as `kontain_sdk::<interface>` without an edit here.
pub use bindings::kontain::generator::*;

/// Every manifest and index media type: the `Accept` list for fetching an
/// image whole (an index, not just one platform of it).
pub const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// [`MANIFEST_TYPES`] as the owned list the upstream interface takes.
pub fn accept_all() -> Vec<String> {
    MANIFEST_TYPES.iter().map(|s| (*s).to_owned()).collect()
}

// The host's own copy, so that plugins and host split references alike.
#[path = "../../../host/src/oci/image_ref.rs"]
mod image_ref;
pub use image_ref::split_reference;

/// A generator: turns a request for a tag (or an unknown digest) into a
/// manifest the host has stored.
pub trait Generator {
    fn resolve(request: Request) -> Result<Manifest, Error>;

    /// A blob that one of this generator's manifests refers to but the host
    /// does not have. Generators that store every blob while making the
    /// manifest (most of them) keep this default.
    fn fetch_blob(request: BlobRequest) -> Result<Blob, Error> {
        Err(Error::NotFound(format!(
            "blob {} is not stored",
            request.digest
        )))
    }

    /// The tags `GET /v2/<name>/tags/list` shows for `repository`; the host
    /// sorts, deduplicates and pages them. The default lists none.
    fn tags(repository: String) -> Result<Vec<String>, Error> {
        let _ = repository;
        Ok(Vec::new())
    }

    /// Manifests whose subject is `digest` that the generator knows beyond
    /// those the host stored (a mirror's upstream); the default adds none.
    fn referrers(repository: String, digest: String) -> Result<Vec<Referrer>, Error> {
        let _ = (repository, digest);
        Ok(Vec::new())
    }
}

impl Request {
    /// Whether the reference is a digest (`algorithm:hex`) rather than a tag.
    /// Tags cannot contain `:`, so the host's grammar check makes this exact.
    pub fn is_digest(&self) -> bool {
        self.reference.contains(':')
    }
}

impl Config {
    /// A config for `os/architecture` with nothing else set.
    pub fn for_platform(os: &str, architecture: &str) -> Self {
        Config {
            platform: Platform {
                os: os.to_owned(),
                architecture: architecture.to_owned(),
                variant: None,
            },
            env: Vec::new(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            working_dir: String::new(),
            user: String::new(),
            labels: Vec::new(),
            history: Vec::new(),
            created: None,
        }
    }
}

/// The current time as RFC 3339 (`2026-11-27T21:30:00Z`), from the WASI
/// wall clock, for [`Config::created`]. Leave `created` unset instead when the
/// image should be reproducible.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

/// Formats Unix seconds as RFC 3339 UTC (proleptic Gregorian calendar).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date: H. Hinnant's algorithm, eras of 400 years.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_unix_seconds_as_rfc3339() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_798_400_000, "2026-12-27T19:33:20Z"),
            (4_107_542_399, "2100-02-28T23:59:59Z"),
        ] {
            assert_eq!(super::rfc3339(secs), want, "{secs}");
        }
    }
}

/// Exports `$ty` (which implements [`Generator`]) as this component's generator.
#[macro_export]
macro_rules! export_generator {
    ($ty:ty) => {
        #[doc(hidden)]
        pub struct __KontainGenerator;

        impl $crate::bindings::exports::kontain::generator::generator::Guest for __KontainGenerator {
            fn resolve(
                request: $crate::Request,
            ) -> ::core::result::Result<$crate::Manifest, $crate::Error> {
                <$ty as $crate::Generator>::resolve(request)
            }

            fn fetch_blob(
                request: $crate::BlobRequest,
            ) -> ::core::result::Result<$crate::Blob, $crate::Error> {
                <$ty as $crate::Generator>::fetch_blob(request)
            }
        }

        impl $crate::bindings::exports::kontain::generator::tags::Guest for __KontainGenerator {
            fn list(
                repository: ::std::string::String,
            ) -> ::core::result::Result<::std::vec::Vec<::std::string::String>, $crate::Error> {
                <$ty as $crate::Generator>::tags(repository)
            }
        }

        impl $crate::bindings::exports::kontain::generator::referrers::Guest for __KontainGenerator {
            fn list(
                repository: ::std::string::String,
                digest: ::std::string::String,
            ) -> ::core::result::Result<::std::vec::Vec<$crate::Referrer>, $crate::Error> {
                <$ty as $crate::Generator>::referrers(repository, digest)
            }
        }

        $crate::bindings::__export_plugin!(__KontainGenerator with_types_in $crate::bindings);
    };
}
