//! The interface between the HTTP registry and whatever produces manifests:
//! the registry routes a request and asks for a manifest through the
//! [`Generators`] trait; the plugin runtime implements it. Neither side knows
//! the other's internals (in particular, nothing here knows about wasm).

use std::fmt;
use std::time::Duration;

use crate::builders::BuildError;
use crate::oci::{Digest, Reference, RepositoryName};
use crate::storage::{BlobInfo, StorageError, StoredManifest};
use crate::upstream::UpstreamError;

/// Which generator a request reaches, and the repository name it sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub generator: String,
    /// What is left of the name after routing: `""` for `random:4x100`,
    /// `"library/busybox"` for `mirror/library/busybox`.
    pub repository: String,
}

#[derive(Clone, Debug)]
pub struct ResolveRequest {
    pub route: Route,
    pub reference: Reference,
    /// Media types from the client's `Accept` headers.
    pub accept: Vec<String>,
}

#[async_trait::async_trait]
pub trait Generators: Send + Sync + 'static {
    /// The generator for a request with this `Host` header and name, if any.
    fn route(&self, host: Option<&str>, name: &RepositoryName) -> Option<Route>;

    /// The manifest for a tag, or for a digest storage did not have.
    async fn resolve(&self, request: ResolveRequest) -> Result<StoredManifest, GeneratorError>;

    /// A blob storage did not have, if the generator can produce it.
    async fn fetch_blob(&self, route: Route, digest: Digest) -> Result<BlobInfo, GeneratorError>;
}

/// A plugin, named the way its errors and logs name it: the configured name
/// and the start of its content digest, which identifies the exact build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginId {
    pub name: String,
    pub version: String,
}

impl fmt::Display for PluginId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// The errors a plugin reports: the WIT `error` variant, host-side.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    #[error("{0}")]
    InvalidReference(String),
    #[error("{0}")]
    InvalidName(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

#[derive(Debug, thiserror::Error)]
pub enum GeneratorError {
    /// No generator of that name is loaded (it was removed by a reload).
    #[error("no generator named {0:?} is loaded")]
    NotLoaded(String),
    /// The plugin answered with an error of its own.
    #[error("{plugin}: {error}")]
    Reported { plugin: PluginId, error: GuestError },
    /// The plugin trapped: a panic, an out-of-bounds access, memory past its limit.
    #[error("{plugin} crashed: {message}")]
    Trapped { plugin: PluginId, message: String },
    /// The plugin did not answer within its wall-time limit.
    #[error("{plugin} did not finish within its limit of {}", humantime::format_duration(*.limit))]
    DeadlineExceeded { plugin: PluginId, limit: Duration },
    /// The host failed while doing work for the plugin.
    #[error("{plugin}: {source}")]
    Host {
        plugin: PluginId,
        #[source]
        source: BuildError,
    },
    /// The host failed while talking to another registry for the plugin.
    #[error("{plugin}: {source}")]
    Upstream {
        plugin: PluginId,
        #[source]
        source: Box<UpstreamError>,
    },
    /// The plugin returned a manifest that storage no longer has.
    #[error(transparent)]
    Storage(#[from] StorageError),
}
