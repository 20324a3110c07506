//! `[generators.<name>]`: which plugin, how requests reach it, its limits,
//! grants and settings. Every generator reloads live.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::Invalid;
use super::units::{ByteSize, duration};
use crate::capabilities::Capability;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    /// `builtin:<name>` or a path to a `.wasm` component.
    pub source: Source,
    /// Exact host names that reach this generator, besides `<name>.<domain>`.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// First path segment that reaches this generator; defaults to the name,
    /// `""` turns path routing off for it.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    /// What one client may ask of this generator.
    #[serde(default)]
    pub budget: Budget,
    /// Host capabilities this plugin may use.
    #[serde(default)]
    pub grants: Vec<Capability>,
    /// With the `upstream` grant: the registries this generator may reach,
    /// by the names image references use (`docker.io`, `ghcr.io`, a named
    /// upstream such as `local`). Absent: any that `[upstream]` allows.
    #[serde(default)]
    pub upstreams: Option<Vec<String>>,
    /// An image to pull, for the landing page: what follows the generator's
    /// path, `":4x100"` for an empty repository (`<host>/random:4x100`).
    #[serde(default)]
    pub example: Option<String>,
    /// One line on what the generator serves, for the landing page.
    #[serde(default)]
    pub about: Option<String>,
    /// Free-form settings the plugin reads with `settings.get` (a default
    /// base image, say). Not secrets: plugins may log them.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

impl GeneratorConfig {
    /// The path prefix in effect for generator `name`.
    pub fn path_prefix<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        match self.path.as_deref() {
            None => Some(name),
            Some("") => None,
            Some(p) => Some(p),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    BuiltIn(String),
    File(PathBuf),
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.strip_prefix("builtin:") {
            Some(name) => Source::BuiltIn(name.to_owned()),
            None => Source::File(PathBuf::from(s)),
        })
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Linear memory the plugin may use.
    pub memory: ByteSize,
    /// Wall time for one request, host work included.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Bytes of blobs one request may produce.
    pub max_bytes: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: ByteSize(64 << 20),
            timeout: Duration::from_secs(60),
            max_bytes: ByteSize(1 << 30),
        }
    }
}

/// What one client (an address; see `[server] trusted_proxies`) may ask of
/// a generator; 0 turns a budget off. A client over one is answered 429
/// with `Retry-After`. What is stored already costs only requests.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    /// Requests a minute.
    pub requests: u64,
    /// Bytes made an hour: random layers, blobs fetched from upstreams.
    pub generated_bytes: ByteSize,
    /// Builds started an hour (ko, buildpack, flatten).
    pub builds: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            // A docker pull of a big image is ~100 requests; a CI fleet
            // behind one NAT makes many.
            requests: 3000,
            generated_bytes: ByteSize(10_000_000_000),
            builds: 60,
        }
    }
}

/// Checks names, limits, and that no path or host routes to two generators.
pub fn validate(generators: &BTreeMap<String, GeneratorConfig>) -> Result<(), Invalid> {
    let mut prefixes = BTreeMap::new();
    let mut hosts = BTreeMap::new();
    for (name, g) in generators {
        let key = format!("generators.{name}");
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-');
        if !valid_name {
            return Err(Invalid::new(&key, "generator names use a-z, 0-9 and -"));
        }
        if let Some(prefix) = g.path_prefix(name) {
            let ok = prefix.parse::<crate::oci::RepositoryName>().is_ok() && !prefix.contains('/');
            if !ok {
                return Err(Invalid::new(
                    format!("{key}.path"),
                    format!("{prefix:?} is not a single repository path component"),
                ));
            }
            if let Some(other) = prefixes.insert(prefix.to_owned(), name) {
                return Err(Invalid::new(
                    format!("{key}.path"),
                    format!("path {prefix:?} is already routed to generator {other:?}"),
                ));
            }
        }
        for host in &g.hosts {
            if let Some(other) = hosts.insert(host.to_ascii_lowercase(), name) {
                return Err(Invalid::new(
                    format!("{key}.hosts"),
                    format!("host {host:?} is already routed to generator {other:?}"),
                ));
            }
        }
        if g.limits.timeout.is_zero() {
            return Err(Invalid::new(
                format!("{key}.limits.timeout"),
                "must be more than zero",
            ));
        }
        if g.limits.memory.0 < (1 << 20) {
            return Err(Invalid::new(
                format!("{key}.limits.memory"),
                "must be at least 1MiB",
            ));
        }
    }
    Ok(())
}

/// Component files are relative to the config file.
pub fn resolve_paths(generators: &mut BTreeMap<String, GeneratorConfig>, base: &Path) {
    for g in generators.values_mut() {
        if let Source::File(p) = &mut g.source {
            super::resolve(p, base);
        }
    }
}
