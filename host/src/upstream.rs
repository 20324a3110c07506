//! The `upstream` capability: other registries. A client (`client`) that
//! speaks the distribution API and its token dance, a connection policy
//! (`policy`) against SSRF, the naming rules for upstream images (`image`),
//! and the caching front generators use (`mirror`): manifests cached by
//! digest, tags re-resolved with `HEAD` and served stale when the upstream
//! is down, blobs streamed into storage and verified, concurrent requests
//! for one thing sharing one fetch. Its config section is `[upstream]`
//! (`config`), which reloads live; its WIT host implementation is `wit`.
//!
//! `flatten`, `go` and `buildpack` fetch their images through a [`Scoped`]
//! upstream, so a generator's own registry list (`upstreams`) is checked
//! in one place for all of them. Depends on `oci`, `storage` and `image`;
//! knows nothing of wasm or HTTP serving.

mod client;
pub mod config;
mod image;
mod mirror;
mod policy;
pub mod wit;

use std::collections::HashMap;
use std::sync::Arc;

use std::time::Duration;

use arc_swap::ArcSwap;

use crate::image::once::Recent;

use crate::generator::{Classify, ErrorKind};
use crate::oci::Digest;
use crate::storage::{BlobInfo, ContentStore, StorageError, StoredManifest};
pub use client::{Client, PlainError};
use config::{CredentialsConfig, UpstreamConfig};
pub use image::{Credentials, DOCKER_HUB, Endpoint, Registries, UpstreamImage};
pub use policy::{HostPattern, Policy, Refusal, SharedPolicy};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid image: {0}")]
    InvalidImage(String),
    #[error(transparent)]
    Refused(Refusal),
    #[error(
        "generator {generator} may not reach the registry {registry:?} (its `upstreams` in kontain.toml: {})",
        allowed.join(", ")
    )]
    NotForGenerator {
        generator: String,
        registry: String,
        allowed: Vec<String>,
    },
    #[error("{image}:{reference} was not found upstream")]
    NotFound { image: String, reference: String },
    #[error(
        "the upstream registry refused access to {image} (check the credentials for it in kontain.toml)"
    )]
    Unauthorized { image: String },
    #[error("the upstream registry answered {status} for {image}")]
    Failing { image: String, status: u16 },
    #[error("the upstream registry refused {image}:{reference} with {status}{said}")]
    Rejected {
        image: String,
        reference: String,
        status: u16,
        said: String,
    },
    #[error(
        "the upstream registry sent more than the {declared} bytes declared for {digest} of {image} (read {read} before stopping); nothing was cached"
    )]
    LongerThanDeclared {
        image: String,
        digest: Digest,
        declared: u64,
        read: u64,
    },
    #[error("the upstream registry for {image} is unreachable: {message}")]
    Unreachable { image: String, message: String },
    #[error(
        "the upstream registry sent content with digest {actual} for {image}@{expected}; nothing was cached"
    )]
    DigestMismatch {
        image: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what} of {image} is larger than the limit of {limit} bytes")]
    TooLarge {
        image: String,
        what: &'static str,
        limit: u64,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl UpstreamError {
    /// The upstream is down or throttling: a cached tag may be served instead.
    fn upstream_down(&self) -> bool {
        match self {
            UpstreamError::Unreachable { .. } => true,
            UpstreamError::Failing { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

impl Classify for UpstreamError {
    fn kind(&self) -> ErrorKind {
        match self {
            UpstreamError::InvalidImage(_) => ErrorKind::InvalidName,
            UpstreamError::Refused(_)
            | UpstreamError::NotForGenerator { .. }
            | UpstreamError::Unauthorized { .. } => ErrorKind::Denied,
            UpstreamError::NotFound { .. } => ErrorKind::NotFound,
            UpstreamError::Rejected { .. } => ErrorKind::InvalidReference,
            UpstreamError::TooLarge { .. } => ErrorKind::LimitExceeded,
            UpstreamError::Failing { .. }
            | UpstreamError::Unreachable { .. }
            | UpstreamError::DigestMismatch { .. }
            | UpstreamError::LongerThanDeclared { .. } => ErrorKind::Unavailable,
            UpstreamError::Storage(e) => e.kind(),
        }
    }
}

/// What `[upstream]` (with the hosts other sections need) decides.
struct Settings {
    registries: Registries,
    max_blob_bytes: u64,
}

/// Other registries, as the `upstream` capability offers them: the
/// policy-checked client, the registries `kontain.toml` names, and the
/// store their manifests and blobs are cached in.
pub struct Upstream {
    client: Arc<Client>,
    policy: SharedPolicy,
    settings: ArcSwap<Settings>,
    store: Arc<ContentStore>,
    /// Blob sizes the manifests served so far declare: a download reads no
    /// more than that (`mirror`).
    declared: std::sync::Mutex<HashMap<Digest, u64>>,
    /// Tag lists read lately, by registry and repository.
    tag_lists: Recent<Vec<String>>,
    /// Referrers read lately, by registry, repository and digest: a client
    /// asking again (every HEAD) does not cost the upstream a request.
    referrers: Recent<Vec<serde_json::Value>>,
    /// One tag resolution at a time per tag: requests for a tag that is
    /// being resolved wait for that resolution and take its answer.
    tag_flights: crate::storage::KeyedLocks,
    tags_resolved: Recent<StoredManifest>,
    tags_down: Recent<String>,
}

/// How long a tag's resolution is kept for the requests that waited for it:
/// pulls of one tag come in bursts (a deployment's nodes), and those that
/// arrive while it is resolved need no `HEAD` of their own.
const TAG_FLIGHT_TTL: Duration = Duration::from_secs(60);

/// How long a tag list (or a referrers list) is answered from memory: they
/// change, but a client paging through one must see the same list on every
/// page.
const TAG_LIST_TTL: Duration = Duration::from_secs(60);

/// The policy and settings `config` describes; `extra` are hosts other
/// sections need reached (module proxies, the git host), each allowed as
/// exactly itself.
fn settings(config: &UpstreamConfig, extra: &[HostPattern]) -> Result<(Policy, Settings), String> {
    let password = |c: &CredentialsConfig| -> Result<Credentials, String> {
        let password = match (&c.password, &c.password_env) {
            (Some(p), _) => p.clone(),
            (None, Some(var)) => std::env::var(var)
                .map_err(|e| format!("reading the upstream password from ${var}: {e}"))?,
            (None, None) => String::new(),
        };
        Ok(Credentials {
            username: c.username.clone(),
            password,
        })
    };
    let mut allow: Vec<HostPattern> = config.allow.iter().map(|p| HostPattern::new(p)).collect();
    allow.extend(extra.iter().cloned());
    let mut private_ok = Vec::new();
    let mut named = HashMap::new();
    for (name, u) in &config.registries {
        let Some(pattern) = HostPattern::exactly(&u.url) else {
            continue;
        };
        if u.allow_private {
            private_ok.push(pattern);
        } else {
            allow.push(pattern);
        }
        let endpoint = Endpoint {
            name: name.clone(),
            base: u.url.clone(),
            credentials: u.credentials().as_ref().map(password).transpose()?,
        };
        named.insert(name.clone(), Arc::new(endpoint));
    }
    let by_host = config
        .credentials
        .iter()
        .map(|(host, c)| Ok((host.clone(), password(c)?)))
        .collect::<Result<HashMap<_, _>, String>>()?;
    Ok((
        Policy::new(allow, private_ok),
        Settings {
            registries: Registries::new(named, by_host),
            max_blob_bytes: config.max_blob_bytes.0,
        },
    ))
}

impl Upstream {
    pub fn new(
        config: &UpstreamConfig,
        extra: &[HostPattern],
        store: Arc<ContentStore>,
    ) -> Result<Self, String> {
        let (policy, settings) = settings(config, extra)?;
        let policy = SharedPolicy::new(policy);
        let client = Arc::new(Client::new(policy.clone())?);
        Ok(Upstream {
            client,
            policy,
            settings: ArcSwap::from_pointee(settings),
            store,
            declared: Default::default(),
            tag_lists: Recent::new(TAG_LIST_TTL),
            referrers: Recent::new(TAG_LIST_TTL),
            tag_flights: Default::default(),
            tags_resolved: Recent::new(TAG_FLIGHT_TTL),
            tags_down: Recent::new(TAG_FLIGHT_TTL),
        })
    }

    /// Applies a changed `[upstream]`: requests from now on use the new
    /// allowlist, named upstreams, credentials and limits.
    pub fn reconfigure(
        &self,
        config: &UpstreamConfig,
        extra: &[HostPattern],
    ) -> Result<(), String> {
        let (policy, settings) = settings(config, extra)?;
        self.policy.replace(policy);
        self.settings.store(Arc::new(settings));
        Ok(())
    }

    /// The policy-checked HTTP client, for other protocols (Go module proxies).
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    pub fn parse(&self, image: &str) -> Result<UpstreamImage, UpstreamError> {
        self.settings
            .load()
            .registries
            .parse(image)
            .map_err(UpstreamError::InvalidImage)
    }

    /// This upstream as `generator` may use it: only the registries
    /// `allowed` names, if it names any.
    pub fn scoped<'a>(&'a self, generator: &'a str, allowed: Option<&'a [String]>) -> Scoped<'a> {
        Scoped {
            upstream: self,
            generator,
            allowed,
        }
    }
}

/// The upstream as one generator may use it.
#[derive(Clone, Copy)]
pub struct Scoped<'a> {
    upstream: &'a Upstream,
    generator: &'a str,
    allowed: Option<&'a [String]>,
}

impl Scoped<'_> {
    /// `image` parsed, if this generator may reach its registry.
    pub fn check(&self, image: &str) -> Result<UpstreamImage, UpstreamError> {
        let parsed = self.upstream.parse(image)?;
        // Checked here too, not only when connecting: what is already cached
        // is answered only for registries the policy allows today.
        self.upstream
            .policy
            .current()
            .check_url(&parsed.endpoint.base)
            .map_err(UpstreamError::Refused)?;
        match self.allowed {
            Some(allowed) if !allowed.contains(&parsed.endpoint.name) => {
                Err(UpstreamError::NotForGenerator {
                    generator: self.generator.to_owned(),
                    registry: parsed.endpoint.name.clone(),
                    allowed: allowed.to_vec(),
                })
            }
            _ => Ok(parsed),
        }
    }

    /// The manifest of `image` at `reference` (a tag or a digest), from
    /// cache or upstream.
    pub async fn manifest(
        &self,
        image: &str,
        reference: &str,
        accept: &[String],
    ) -> Result<StoredManifest, UpstreamError> {
        let upstream = self.check(image)?;
        self.upstream.manifest(&upstream, reference, accept).await
    }

    /// The tags of `image`, sorted, from a recent read or upstream.
    pub async fn tags(&self, image: &str) -> Result<Arc<Vec<String>>, UpstreamError> {
        let upstream = self.check(image)?;
        let key = upstream.cache_key();
        if let Some(tags) = self.upstream.tag_lists.get(&key) {
            return Ok(tags);
        }
        let mut tags = self.upstream.client.list_tags(&upstream).await?;
        tags.sort();
        tags.dedup();
        Ok(self.upstream.tag_lists.put(key, tags))
    }

    /// The upstream's descriptors of the manifests of `image` whose subject
    /// is `digest`.
    pub async fn referrers(
        &self,
        image: &str,
        digest: &str,
    ) -> Result<Vec<serde_json::Value>, UpstreamError> {
        let upstream = self.check(image)?;
        let digest: Digest = digest
            .parse()
            .map_err(|e| UpstreamError::InvalidImage(format!("{digest:?}: {e}")))?;
        let key = format!("{} {digest}", upstream.cache_key());
        if let Some(found) = self.upstream.referrers.get(&key) {
            return Ok(found.to_vec());
        }
        let found = self.upstream.client.referrers(&upstream, &digest).await?;
        Ok(self.upstream.referrers.put(key, found).to_vec())
    }

    /// A blob of `image`, stored: from storage or fetched into it.
    pub async fn blob(&self, image: &str, digest: &str) -> Result<BlobInfo, UpstreamError> {
        self.fetch_blob(image, digest, false).await
    }

    /// A blob of `image`, stored or arriving: answered as soon as its bytes
    /// start to come in, for a client to read as they do (a mirror's pull).
    pub async fn streamed_blob(
        &self,
        image: &str,
        digest: &str,
    ) -> Result<BlobInfo, UpstreamError> {
        self.fetch_blob(image, digest, true).await
    }

    async fn fetch_blob(
        &self,
        image: &str,
        digest: &str,
        streaming: bool,
    ) -> Result<BlobInfo, UpstreamError> {
        let upstream = self.check(image)?;
        let digest: Digest = digest
            .parse()
            .map_err(|e| UpstreamError::InvalidImage(format!("{digest:?}: {e}")))?;
        self.upstream.blob(&upstream, digest, streaming).await
    }

    /// The store images are cached in.
    pub fn store(&self) -> &Arc<ContentStore> {
        &self.upstream.store
    }
}
