//! `kontain.toml`: parsed strictly (unknown keys are errors that name the file
//! and the key), then validated into settings the rest of the server trusts.
//!
//! Where the config comes from: `--config <file>`, else `./kontain.toml` if it
//! exists, else the built-in default (the repository's own `kontain.toml`,
//! embedded at build time). Relative paths inside a file are relative to that
//! file's directory; inside the built-in default, to the working directory.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// The built-in default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("../../kontain.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {origin}: {source}")]
    Parse {
        origin: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("config {origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// Where a config came from, for messages.
#[derive(Clone, Debug)]
pub enum Origin {
    File(PathBuf),
    BuiltIn,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::BuiltIn => f.write_str("(built-in default)"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub origin: Origin,
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub upstream: UpstreamConfig,
    pub go: GoConfig,
    pub buildpack: BuildpackConfig,
    pub generators: BTreeMap<String, GeneratorConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: ServerConfig,
    #[serde(default)]
    storage: StorageConfig,
    #[serde(default)]
    upstream: UpstreamConfig,
    #[serde(default)]
    go: GoConfig,
    #[serde(default)]
    buildpack: BuildpackConfig,
    #[serde(default)]
    generators: BTreeMap<String, GeneratorConfig>,
}

/// Go builds (capability `go`): where modules come from, and the limits of
/// one build.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GoConfig {
    /// Module proxies, tried in order; the next is asked only when one
    /// answers 404 or 410 (GOPROXY's `,` semantics). `https://…` proxies are
    /// reached through the upstream client's address checks; `file:///dir`
    /// reads a directory in proxy layout. `go build` gets the same list for
    /// dependencies, and never `direct`.
    pub proxies: Vec<url::Url>,
    /// Checksum database that `go` verifies dependencies against (GOSUMDB);
    /// `"off"` to disable.
    pub sumdb: String,
    /// The `go` command; looked up on PATH unless it is a path.
    pub command: PathBuf,
    /// Largest module zip fetched, and largest total of its unpacked files.
    pub max_module_bytes: ByteSize,
    /// Largest binary one build may produce.
    pub max_binary_bytes: ByteSize,
    /// Wall time for one `go build` (one platform).
    #[serde(with = "humantime_serde_compat")]
    pub build_timeout: Duration,
    /// Where modules are unpacked and builds run, with the shared module and
    /// build caches. Default: `go/` in the filesystem storage directory.
    pub scratch: Option<PathBuf>,
}

/// Cloud Native Buildpacks builds (capability `buildpack`): where sources
/// come from and how buildpacks are confined.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuildpackConfig {
    /// Git URL of a request's `<owner>/<repo>`: `{owner}` and `{repo}` are
    /// replaced. https:// URLs go through the upstream policy (allowlist and
    /// address checks, the address pinned for git); `file://` reads local
    /// repositories.
    pub git_url: String,
    /// The git command; looked up on PATH unless it is a path.
    pub git_command: PathBuf,
    /// The sandbox every `bin/detect` and `bin/build` runs in.
    pub bwrap_command: PathBuf,
    /// Run buildpacks without a sandbox when bubblewrap cannot start. Only
    /// for builders you trust completely.
    pub allow_unsandboxed: bool,
    /// Give buildpacks the network (off: they see only loopback). On means
    /// the host's network namespace: loopback and private addresses too.
    pub network: bool,
    /// Run bubblewrap as this host uid (and gid) instead of the server's
    /// own, so that the sandbox's user is nobody on the host. Needs a server
    /// running as root, and the scratch directory reachable by that user.
    pub sandbox_user: Option<u32>,
    /// Wall time for one buildpack's detect or build.
    #[serde(with = "humantime_serde_compat")]
    pub step_timeout: Duration,
    /// Largest checkout (the commit's files) and largest app + layers.
    pub max_source_bytes: ByteSize,
    /// Where builders are unpacked and builds run. Default: `buildpack/` in
    /// the filesystem storage directory.
    pub scratch: Option<PathBuf>,
}

impl Default for BuildpackConfig {
    fn default() -> Self {
        BuildpackConfig {
            git_url: "https://github.com/{owner}/{repo}".to_owned(),
            git_command: PathBuf::from("git"),
            bwrap_command: PathBuf::from("bwrap"),
            allow_unsandboxed: false,
            network: false,
            sandbox_user: None,
            step_timeout: Duration::from_secs(600),
            max_source_bytes: ByteSize(1 << 30),
            scratch: None,
        }
    }
}

impl Default for GoConfig {
    fn default() -> Self {
        GoConfig {
            proxies: vec![url::Url::parse("https://proxy.golang.org").expect("a valid URL")],
            sumdb: "sum.golang.org".to_owned(),
            command: PathBuf::from("go"),
            max_module_bytes: ByteSize(500 << 20),
            max_binary_bytes: ByteSize(500 << 20),
            build_timeout: Duration::from_secs(600),
            scratch: None,
        }
    }
}

/// Other registries: where kontain may connect, named upstreams, credentials.
#[derive(Clone, Debug, Deserialize)]
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

#[derive(Clone, Debug, Deserialize)]
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

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    pub username: String,
    /// The password itself, or `password_env` naming the variable holding it.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. The `PORT` environment variable replaces the port.
    pub listen: SocketAddr,
    /// Subdomain routing: `<generator>.<domain>` reaches that generator.
    pub domains: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            domains: vec!["localhost".to_owned()],
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Where blobs and manifests live.
    #[serde(default)]
    pub backend: Backend,
    /// The filesystem backend keeps everything here; with `gcs`, only local
    /// working files (uploads being written, compiled plugins, Go and
    /// buildpack scratch).
    #[serde(default = "default_storage_path")]
    pub path: PathBuf,
    /// What is not used for this long is removed: manifests first, then
    /// the blobs no remaining manifest refers to. Serving a manifest
    /// counts as use. `"0s"` keeps everything. (GCS: a bucket lifecycle
    /// rule does this; see the README.)
    #[serde(default = "default_ttl", with = "humantime_serde_compat")]
    pub ttl: Duration,
    /// How often the collector looks.
    #[serde(default = "default_collect_every", with = "humantime_serde_compat")]
    pub collect_every: Duration,
    /// Settings of the `gcs` backend.
    pub gcs: Option<GcsConfig>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Filesystem,
    Gcs,
}

/// `[storage.gcs]`: a Google Cloud Storage bucket shared by every replica.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcsConfig {
    pub bucket: String,
    /// Prepended to every object name (`kontain/` keeps a shared bucket tidy).
    #[serde(default)]
    pub prefix: String,
    /// The JSON API endpoint; set only for an emulator.
    pub endpoint: Option<Url>,
    /// A service-account key (JSON) to authenticate and sign URLs with.
    /// Without it: Application Default Credentials (on Cloud Run, the
    /// service's account; signing then goes through the IAM API).
    pub credentials: Option<PathBuf>,
    /// Send requests without credentials (an emulator); `credentials` is
    /// then used only to sign URLs.
    #[serde(default)]
    pub anonymous: bool,
    /// How blob downloads reach clients.
    #[serde(default)]
    pub redirect: RedirectMode,
    /// Base of public object URLs (`redirect = "public"`):
    /// `<public_url>/<bucket>/<object>`.
    #[serde(default = "default_public_url")]
    pub public_url: Url,
    /// How long a signed URL stays valid. Long enough to start a download.
    #[serde(default = "default_signed_url_ttl", with = "humantime_serde_compat")]
    pub signed_url_ttl: Duration,
    /// A replica that stops renewing its lease on a piece of work (it died)
    /// loses it after this long, and another replica takes the work over.
    #[serde(default = "default_lease_ttl", with = "humantime_serde_compat")]
    pub lease_ttl: Duration,
    /// Uploads larger than this are resumable (in chunks); smaller ones are
    /// one request.
    #[serde(default = "default_resumable_threshold")]
    pub resumable_upload_threshold: ByteSize,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedirectMode {
    /// `307` to a V4 signed URL: the bucket stays private.
    #[default]
    Signed,
    /// `307` to the object's public URL (a bucket readable by allUsers).
    Public,
    /// kontain streams the bytes itself.
    None,
}

fn default_public_url() -> Url {
    Url::parse("https://storage.googleapis.com").expect("a valid URL")
}

fn default_signed_url_ttl() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(30)
}

fn default_resumable_threshold() -> ByteSize {
    ByteSize(16 << 20)
}

fn default_ttl() -> Duration {
    Duration::from_secs(10 * 24 * 3600)
}

fn default_collect_every() -> Duration {
    Duration::from_secs(3600)
}

fn default_storage_path() -> PathBuf {
    PathBuf::from("kontain-data")
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Filesystem,
            path: default_storage_path(),
            ttl: default_ttl(),
            collect_every: default_collect_every(),
            gcs: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
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
    /// Host capabilities this plugin may use.
    #[serde(default)]
    pub grants: Vec<Capability>,
    /// With the `upstream` grant: the registries this generator may reach,
    /// by the names image references use (`docker.io`, `ghcr.io`, a named
    /// upstream such as `local`). Absent: any that `[upstream]` allows.
    #[serde(default)]
    pub upstreams: Option<Vec<String>>,
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
    #[serde(with = "humantime_serde_compat")]
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

/// A host capability a plugin can be granted; each is one WIT interface.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// `kontain:generator/random`: layers of random bytes.
    Random,
    /// `kontain:generator/upstream`: other registries, through the allowlist.
    Upstream,
    /// `kontain:generator/flatten`: images squashed to one layer.
    Flatten,
    /// `kontain:generator/cache`: a private key-value store.
    Cache,
    /// `kontain:generator/go`: Go modules fetched and built natively.
    Go,
    /// `kontain:generator/buildpack`: git sources built with CNB buildpacks.
    Buildpack,
}

impl Capability {
    pub const ALL: &'static [Capability] = &[
        Capability::Random,
        Capability::Upstream,
        Capability::Flatten,
        Capability::Cache,
        Capability::Go,
        Capability::Buildpack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Capability::Random => "random",
            Capability::Upstream => "upstream",
            Capability::Flatten => "flatten",
            Capability::Cache => "cache",
            Capability::Go => "go",
            Capability::Buildpack => "buildpack",
        }
    }

    /// The WIT interface (without package) this capability grants.
    pub fn interface(self) -> &'static str {
        self.name()
    }
}

/// A size in bytes, written as a number or with a unit (`64MiB`, `10GB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{s:?} is not a size like 512MiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1000,
            "KiB" => 1 << 10,
            "MB" => 1000 * 1000,
            "MiB" => 1 << 20,
            "GB" => 1000 * 1000 * 1000,
            "GiB" => 1 << 30,
            "TB" => 1000u64.pow(4),
            "TiB" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

mod humantime_serde_compat {
    use std::time::Duration;

    use serde::Deserialize;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like 30s: {e}")))
    }
}

impl Config {
    /// Loads the config the command line and working directory select.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        match explicit {
            Some(path) => Config::from_file(path),
            None if Path::new("kontain.toml").is_file() => {
                Config::from_file(Path::new("kontain.toml"))
            }
            None => Config::parse(DEFAULT_CONFIG, Origin::BuiltIn),
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, Origin::File(path.to_owned()))
    }

    pub fn parse(text: &str, origin: Origin) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_string(),
            source,
        })?;
        let mut config = Config {
            origin,
            server: raw.server,
            storage: raw.storage,
            upstream: raw.upstream,
            go: raw.go,
            buildpack: raw.buildpack,
            generators: raw.generators,
        };
        config.validate()?;
        config.resolve_paths();
        Ok(config)
    }

    /// Applies the environment (`var` reads it): `KONTAIN_LISTEN` replaces
    /// the listen address (containers listen on `0.0.0.0`), then `PORT`, as
    /// platforms like Cloud Run set it, replaces the port.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: "environment".into(),
            key: key.into(),
            message,
        };
        if let Some(listen) = var("KONTAIN_LISTEN") {
            self.server.listen = listen.parse().map_err(|_| {
                invalid(
                    "KONTAIN_LISTEN",
                    format!("{listen:?} is not an address:port"),
                )
            })?;
        }
        if let Some(port) = var("PORT") {
            let port = port
                .parse::<u16>()
                .map_err(|_| invalid("PORT", format!("{port:?} is not a port number")))?;
            self.server.listen.set_port(port);
        }
        Ok(())
    }

    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_storage()?;
        let mut prefixes = BTreeMap::new();
        let mut hosts = BTreeMap::new();
        for (name, g) in &self.generators {
            let key = format!("generators.{name}");
            let valid_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !name.starts_with('-');
            if !valid_name {
                return Err(self.invalid(&key, "generator names use a-z, 0-9 and -"));
            }
            if let Some(prefix) = g.path_prefix(name) {
                let ok =
                    prefix.parse::<crate::oci::RepositoryName>().is_ok() && !prefix.contains('/');
                if !ok {
                    return Err(self.invalid(
                        format!("{key}.path"),
                        format!("{prefix:?} is not a single repository path component"),
                    ));
                }
                if let Some(other) = prefixes.insert(prefix.to_owned(), name) {
                    return Err(self.invalid(
                        format!("{key}.path"),
                        format!("path {prefix:?} is already routed to generator {other:?}"),
                    ));
                }
            }
            for host in &g.hosts {
                if let Some(other) = hosts.insert(host.to_ascii_lowercase(), name) {
                    return Err(self.invalid(
                        format!("{key}.hosts"),
                        format!("host {host:?} is already routed to generator {other:?}"),
                    ));
                }
            }
            if g.limits.timeout.is_zero() {
                return Err(self.invalid(format!("{key}.limits.timeout"), "must be more than zero"));
            }
            if g.limits.memory.0 < (1 << 20) {
                return Err(self.invalid(format!("{key}.limits.memory"), "must be at least 1MiB"));
            }
        }
        for (name, upstream) in &self.upstream.registries {
            let key = format!("upstream.registries.{name}");
            if name.parse::<crate::oci::RepositoryName>().is_err() || name.contains('/') {
                return Err(self.invalid(
                    &key,
                    "upstream names must be valid repository path components",
                ));
            }
            let url = &upstream.url;
            if !matches!(url.scheme(), "http" | "https")
                || url.host_str().is_none()
                || url.path() != "/"
            {
                return Err(self.invalid(
                    format!("{key}.url"),
                    format!("{url} must be http(s)://host[:port] with no path"),
                ));
            }
        }
        let credentials = self
            .upstream
            .credentials
            .iter()
            .map(|(host, c)| (format!("upstream.credentials.\"{host}\""), c))
            .map(|(key, c)| (key, c.clone()))
            .chain(self.upstream.registries.iter().filter_map(|(name, u)| {
                u.credentials()
                    .map(|c| (format!("upstream.registries.{name}"), c))
            }));
        for (i, proxy) in self.go.proxies.iter().enumerate() {
            let ok = match proxy.scheme() {
                "https" | "http" => proxy.host_str().is_some(),
                "file" => proxy.to_file_path().is_ok(),
                _ => false,
            };
            if !ok {
                return Err(self.invalid(
                    format!("go.proxies[{i}]"),
                    format!("{proxy} must be an http(s):// URL or file:///absolute/dir"),
                ));
            }
        }
        if self.go.proxies.is_empty() {
            return Err(self.invalid("go.proxies", "name at least one module proxy"));
        }
        if !self.buildpack.git_url.contains("{repo}") {
            return Err(self.invalid("buildpack.git_url", "must contain {repo}"));
        }
        if self.buildpack.step_timeout.is_zero() {
            return Err(self.invalid("buildpack.step_timeout", "must be more than zero"));
        }
        if self.go.build_timeout.is_zero() {
            return Err(self.invalid("go.build_timeout", "must be more than zero"));
        }
        for (key, c) in credentials {
            if c.password.is_some() == c.password_env.is_some() {
                return Err(self.invalid(key, "give exactly one of password and password_env"));
            }
        }
        Ok(())
    }

    fn validate_storage(&self) -> Result<(), ConfigError> {
        let storage = &self.storage;
        match (storage.backend, &storage.gcs) {
            (Backend::Gcs, None) => {
                Err(self.invalid("storage", "backend \"gcs\" needs a [storage.gcs] table"))
            }
            (Backend::Filesystem, Some(_)) => Err(self.invalid(
                "storage.gcs",
                "set backend = \"gcs\" to use the bucket, or remove the table",
            )),
            (Backend::Gcs, Some(gcs)) => {
                let valid_bucket = (3..=222).contains(&gcs.bucket.len())
                    && gcs.bucket.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)
                    });
                if !valid_bucket {
                    return Err(self.invalid("storage.gcs.bucket", "not a bucket name"));
                }
                // Renewals come every third of the TTL, and GCS takes about
                // one write per second to an object.
                if gcs.lease_ttl < Duration::from_secs(5) {
                    return Err(self.invalid("storage.gcs.lease_ttl", "at least 5s"));
                }
                // Never send Google credentials (or ask Google's IAM API to
                // sign) for a bucket served somewhere else.
                if gcs.endpoint.is_some() && !gcs.anonymous && gcs.credentials.is_none() {
                    return Err(self.invalid(
                        "storage.gcs.endpoint",
                        "with an endpoint, give `credentials` (a key) or set `anonymous`",
                    ));
                }
                if gcs.redirect == RedirectMode::Signed
                    && gcs.anonymous
                    && gcs.credentials.is_none()
                {
                    return Err(self.invalid(
                        "storage.gcs.redirect",
                        "signed URLs need `credentials` (a service-account key) when `anonymous` is set",
                    ));
                }
                Ok(())
            }
            (Backend::Filesystem, None) => Ok(()),
        }
    }

    fn resolve_paths(&mut self) {
        let Origin::File(file) = &self.origin else {
            return;
        };
        let base = file.parent().unwrap_or(Path::new(".")).to_owned();
        let path = &mut self.storage.path;
        if path.is_relative() {
            *path = base.join(&*path);
        }
        let key = self
            .storage
            .gcs
            .as_mut()
            .and_then(|g| g.credentials.as_mut());
        for scratch in [
            self.go.scratch.as_mut(),
            self.buildpack.scratch.as_mut(),
            key,
        ]
        .into_iter()
        .flatten()
        {
            if scratch.is_relative() {
                *scratch = base.join(&*scratch);
            }
        }
        if self.go.command.components().count() > 1 && self.go.command.is_relative() {
            self.go.command = base.join(&self.go.command);
        }
        for g in self.generators.values_mut() {
            if let Source::File(p) = &mut g.source
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_default_parses_and_serves_random() {
        let c = Config::parse(DEFAULT_CONFIG, Origin::BuiltIn).unwrap();
        let random = &c.generators["random"];
        assert_eq!(random.source, Source::BuiltIn("random".into()));
        assert!(random.grants.contains(&Capability::Random));
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn unknown_keys_are_errors_naming_file_and_key() {
        let err = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n",
            Origin::File("k.toml".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("k.toml") && err.contains("lisen"), "{err}");
    }

    #[test]
    fn duplicate_path_prefixes_are_refused() {
        let text = "[generators.a]\nsource = \"builtin:random\"\npath = \"x\"\n[generators.b]\nsource = \"builtin:random\"\npath = \"x\"\n";
        let err = Config::parse(text, Origin::BuiltIn)
            .unwrap_err()
            .to_string();
        assert!(err.contains("generators.b.path"), "{err}");
    }

    #[test]
    fn named_upstreams_need_a_bare_http_url() {
        let ok =
            "[upstream.registries.local]\nurl = \"http://127.0.0.1:5000\"\nallow_private = true\n";
        let c = Config::parse(ok, Origin::BuiltIn).unwrap();
        assert!(c.upstream.registries["local"].allow_private);
        assert!(c.upstream.allow.contains(&"ghcr.io".to_owned()));
        let bad = "[upstream.registries.local]\nurl = \"ftp://127.0.0.1/x\"\n";
        let err = Config::parse(bad, Origin::BuiltIn).unwrap_err().to_string();
        assert!(err.contains("upstream.registries.local.url"), "{err}");
        let creds = "[upstream.credentials.\"ghcr.io\"]\nusername = \"u\"\n";
        assert!(Config::parse(creds, Origin::BuiltIn).is_err());
    }

    #[test]
    fn sizes_parse_with_units() {
        for (s, n) in [
            ("10", 10),
            ("64MiB", 64 << 20),
            ("10GB", 10_000_000_000),
            ("1 KiB", 1024),
        ] {
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(n)), "{s}");
        }
        assert!("10XB".parse::<ByteSize>().is_err());
        assert!("99999999999TiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn port_from_the_environment_replaces_the_configured_one() {
        let mut c = Config::parse(DEFAULT_CONFIG, Origin::BuiltIn).unwrap();
        c.apply_env(|k| (k == "PORT").then(|| "9999".into()))
            .unwrap();
        assert_eq!(c.server.listen.port(), 9999);
        assert!(
            c.apply_env(|k| (k == "PORT").then(|| "nope".into()))
                .is_err()
        );
        c.apply_env(|k| match k {
            "KONTAIN_LISTEN" => Some("0.0.0.0:8080".into()),
            "PORT" => Some("9090".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:9090");
        assert!(
            c.apply_env(|k| (k == "KONTAIN_LISTEN").then(|| "x".into()))
                .is_err()
        );
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let text = "[storage]\nbackend = \"filesystem\"\npath = \"data\"\n[generators.w]\nsource = \"w.wasm\"\n";
        let c = Config::parse(text, Origin::File("/etc/kontain/kontain.toml".into())).unwrap();
        let path = &c.storage.path;
        assert_eq!(path, Path::new("/etc/kontain/data"));
        assert_eq!(
            c.generators["w"].source,
            Source::File("/etc/kontain/w.wasm".into())
        );
    }

    #[test]
    fn the_gcs_backend_needs_its_table_and_a_sound_bucket() {
        let parse = |t: &str| Config::parse(t, Origin::File("/k/kontain.toml".into()));
        let err = parse("[storage]\nbackend = \"gcs\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("[storage.gcs]"), "{err}");
        let err = parse("[storage.gcs]\nbucket = \"b-1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("backend = \"gcs\""), "{err}");
        let err = parse("[storage]\nbackend = \"gcs\"\n[storage.gcs]\nbucket = \"../x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a bucket name"), "{err}");
        let err = parse(
            "[storage]\nbackend = \"gcs\"\n[storage.gcs]\nbucket = \"b-1\"\nanonymous = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("signed URLs need"), "{err}");
        let err = parse(
            "[storage]\nbackend = \"gcs\"\n[storage.gcs]\nbucket = \"b-1\"\nendpoint = \"http://127.0.0.1:1\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("with an endpoint"), "{err}");
        let c = parse(
            "[storage]\nbackend = \"gcs\"\n[storage.gcs]\nbucket = \"b-1\"\ncredentials = \"sa.json\"\n",
        )
        .unwrap();
        let gcs = c.storage.gcs.unwrap();
        assert_eq!(gcs.credentials, Some(PathBuf::from("/k/sa.json")));
        assert_eq!(gcs.redirect, RedirectMode::Signed);
        assert_eq!(gcs.lease_ttl, Duration::from_secs(30));
    }
}
