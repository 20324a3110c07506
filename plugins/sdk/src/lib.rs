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
        world: "kontain:generator/plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "::kontain_sdk::bindings",
        runtime_path: "::kontain_sdk::__wit_bindgen::rt",
    });
}

pub use bindings::exports::kontain::generator::generator::Request;
pub use bindings::kontain::generator::images::{
    self, Config, History, Layer, Manifest, ManifestFormat, Platform,
};
pub use bindings::kontain::generator::random;
pub use bindings::kontain::generator::types::Error;

/// A generator: turns a request for a tag (or an unknown digest) into a
/// manifest the host has stored.
pub trait Generator {
    fn resolve(request: Request) -> Result<Manifest, Error>;
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
        }

        $crate::bindings::__export_plugin!(__KontainGenerator with_types_in $crate::bindings);
    };
}
