//! `[upstream]`: where the upstream client may connect, named upstreams and
//! credentials. Reloads live.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::Invalid;
use crate::config::units::ByteSize;

/// Other registries: where kontain may connect, named upstreams, credentials.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Hosts (`name`, `*.domain`, optionally `:port`) the upstream client may
    /// contact: registries, their token services and their blob CDNs.
    pub allow: Vec<String>,
    /// The largest blob that will be fetched and cached.
    pub max_blob_bytes: ByteSize,
    /// Named upstreams: `mirror/<name>/<repository>` reaches `url`.
    pub registries: BTreeMap<String, NamedUpstream>,
    /// Credentials per registry host (`registry-1.docker.io`, `ghcr.io`).
    pub credentials: BTreeMap<String, CredentialsConfig>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            allow: DEFAULT_UPSTREAMS.iter().map(|s| (*s).to_owned()).collect(),
            max_blob_bytes: ByteSize(10 << 30),
            registries: BTreeMap::new(),
            credentials: BTreeMap::new(),
        }
    }
}

/// Public registries, their token services and the CDNs they redirect blob
/// downloads to. Private and metadata addresses stay refused whatever a name
/// here resolves to.
pub const DEFAULT_UPSTREAMS: &[&str] = &[
    "registry-1.docker.io",
    "auth.docker.io",
    "production.cloudflare.docker.com",
    "*.r2.cloudflarestorage.com",
    "ghcr.io",
    "pkg-containers.githubusercontent.com",
    "quay.io",
    "*.quay.io",
    "gcr.io",
    "*.gcr.io",
    "*.pkg.dev",
    "storage.googleapis.com",
    "registry.k8s.io",
    "*.amazonaws.com",
    "public.ecr.aws",
    "*.cloudfront.net",
    "mcr.microsoft.com",
    "*.data.mcr.microsoft.com",
    "cgr.dev",
    "*.cgr.dev",
];

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NamedUpstream {
    /// `https://host[:port]` or `http://…` (plain HTTP, e.g. a local registry).
    pub url: url::Url,
    /// Allow this exact host (and port) even though it is a loopback or
    /// private address. Only for registries you run yourself.
    #[serde(default)]
    pub allow_private: bool,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
}

impl NamedUpstream {
    pub fn credentials(&self) -> Option<CredentialsConfig> {
        self.username.as_ref().map(|username| CredentialsConfig {
            username: username.clone(),
            password: self.password.clone(),
            password_env: self.password_env.clone(),
        })
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    pub username: String,
    /// The password itself, or `password_env` naming the variable holding it.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
}

impl UpstreamConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        for (name, upstream) in &self.registries {
            let key = format!("upstream.registries.{name}");
            if name.parse::<crate::oci::RepositoryName>().is_err() || name.contains('/') {
                return Err(Invalid::new(
                    &key,
                    "upstream names must be valid repository path components",
                ));
            }
            let url = &upstream.url;
            if !matches!(url.scheme(), "http" | "https")
                || url.host_str().is_none()
                || url.path() != "/"
            {
                return Err(Invalid::new(
                    format!("{key}.url"),
                    format!("{url} must be http(s)://host[:port] with no path"),
                ));
            }
        }
        let named = self.registries.iter().filter_map(|(name, u)| {
            u.credentials()
                .map(|c| (format!("upstream.registries.{name}"), c))
        });
        let by_host = self
            .credentials
            .iter()
            .map(|(host, c)| (format!("upstream.credentials.\"{host}\""), c.clone()));
        for (key, c) in by_host.chain(named) {
            if c.password.is_some() == c.password_env.is_some() {
                return Err(Invalid::new(
                    key,
                    "give exactly one of password and password_env",
                ));
            }
        }
        Ok(())
    }
}
