//! The seam between the HTTP registry and whatever produces manifests: the
//! registry routes a request and asks for a manifest through the
//! [`Generators`] trait; the plugin runtime implements it.
//!
//! Failures cross the seam as one type, [`GeneratorError`], whose
//! [`ErrorKind`] says what kind of failure it is; the registry is the only
//! place that turns kinds into HTTP statuses and OCI codes. Capabilities
//! classify their own errors with [`Classify`].
//!
//! Depends on `oci` and `storage` (the stored values it hands over); imports
//! nothing from the capabilities, the runtime or the registry.

use std::fmt;

use crate::oci::{Digest, Reference, RepositoryName};
use crate::storage::{BlobInfo, StorageError, StoredManifest};

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

/// A loaded generator as visitors see it (the landing page).
#[derive(Clone, Debug, Default)]
pub struct Listed {
    pub name: String,
    /// The first path segment that reaches it, if path routing is on.
    pub path: Option<String>,
    pub about: Option<String>,
    pub example: Option<String>,
    /// What one client may ask of it.
    pub budget: crate::config::generators::Budget,
}

/// What the registry serves: the subdomain-routing domains and the loaded
/// generators, in name order.
#[derive(Clone, Debug, Default)]
pub struct Site {
    pub domains: Vec<String>,
    pub generators: Vec<Listed>,
}

#[async_trait::async_trait]
pub trait Generators: Send + Sync + 'static {
    /// What is served now (it changes with reloads).
    fn site(&self) -> std::sync::Arc<Site>;

    /// The generator for a request with this `Host` header and name, if any.
    fn route(&self, host: Option<&str>, name: &RepositoryName) -> Option<Route>;

    /// How many generators are loaded.
    fn loaded(&self) -> usize;

    /// The manifest for a tag, or for a digest storage did not have.
    async fn resolve(&self, request: ResolveRequest) -> Result<StoredManifest, GeneratorError>;

    /// A blob storage did not have, if the generator can produce it.
    async fn fetch_blob(&self, route: Route, digest: Digest) -> Result<BlobInfo, GeneratorError>;

    /// The tags the generator lists for a repository, unsorted.
    async fn tags(&self, route: Route) -> Result<Vec<String>, GeneratorError>;

    /// Descriptors (referrers-API JSON) of manifests whose subject is
    /// `digest` that the generator knows beyond what storage holds.
    async fn referrers(
        &self,
        route: Route,
        digest: Digest,
    ) -> Result<Vec<serde_json::Value>, GeneratorError>;
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

/// What kind of failure something is, whoever failed: a plugin, the host
/// work it asked for, or the runtime around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The repository name is not one this generator serves.
    InvalidName,
    /// The tag or digest is not one this generator serves.
    InvalidReference,
    /// No generator of that name is loaded (it was removed by a reload).
    NameUnknown,
    /// Nothing exists under this name or reference.
    NotFound,
    /// Not allowed: the upstream policy, a generator's registry list.
    Denied,
    /// A limit of the generator was reached: bytes, layers, time.
    LimitExceeded,
    /// The source named is refused for what it is (a module with symlinks,
    /// build options that could run programs). Asking again will not help.
    SourceRefused,
    /// The source named cannot be built as it is (a compile error, no
    /// buildpack group passed). Asking again will not help.
    BuildFailed,
    /// Something depended on is down or failing; retrying may help.
    Unavailable,
    /// The generator did not finish within its wall-time limit.
    Deadline,
    /// The server's storage is full: nothing new can be made until space
    /// is freed (what exists is still served).
    OutOfSpace,
    /// The server's own configuration cannot serve this (a configured
    /// builder that cannot be used): the operator has to change it, and the
    /// client should learn why.
    Misconfigured,
    /// The client has spent a budget, or the build queue is full: asking
    /// later will do (the response says when).
    Throttled,
    /// A bug, a crash or a server-side failure.
    Internal,
}

impl ErrorKind {
    /// Whether the same inputs would fail the same way again, so that the
    /// failure may be answered from memory instead of by another build.
    pub fn is_deterministic(self) -> bool {
        matches!(self, ErrorKind::BuildFailed | ErrorKind::SourceRefused)
    }
}

/// Errors that know what kind of failure they are.
pub trait Classify: std::error::Error {
    fn kind(&self) -> ErrorKind;
}

/// A failure to produce a manifest or blob, as the registry receives it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct GeneratorError {
    pub kind: ErrorKind,
    /// The plugin that answered (or crashed), when one did.
    pub plugin: Option<PluginId>,
    /// What a `docker pull` user reads, the plugin's name first.
    pub message: String,
}

impl GeneratorError {
    /// A failure of `plugin` (or of the host work it asked for).
    pub fn of(plugin: &PluginId, kind: ErrorKind, message: impl fmt::Display) -> Self {
        GeneratorError {
            kind,
            plugin: Some(plugin.clone()),
            message: format!("{plugin}: {message}"),
        }
    }

    /// A failure outside any plugin (storage, a generator that is gone).
    pub fn host(error: &(impl Classify + ?Sized)) -> Self {
        GeneratorError {
            kind: error.kind(),
            plugin: None,
            message: error.to_string(),
        }
    }
}

impl Classify for StorageError {
    fn kind(&self) -> ErrorKind {
        match self {
            // The bucket is unreachable or refusing: worth a retry.
            StorageError::Remote { .. } => ErrorKind::Unavailable,
            StorageError::QuotaFull { .. } => ErrorKind::OutOfSpace,
            StorageError::Io { source, .. } if crate::storage::out_of_space(source) => {
                ErrorKind::OutOfSpace
            }
            _ => ErrorKind::Internal,
        }
    }
}
