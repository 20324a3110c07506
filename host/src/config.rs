//! `kontain.toml`: parsed strictly (unknown keys are errors that name the file
//! and the key), then validated into settings the rest of the server trusts.
//! Each section's types and validation live beside what reads it:
//! `[server]` (`server`), `[generators.*]` (`generators`), `[storage]`
//! (`storage::config`), `[upstream]` (`upstream::config`), `[go]`
//! (`go::config`), `[buildpack]` (`buildpack::config`); this module puts them
//! together, applies the environment, and says which changes of a running
//! server need a restart.
//!
//! Where the config comes from: `--config <file>`, else `./kontain.toml` if it
//! exists, else the built-in default (the repository's own `kontain.toml`,
//! embedded at build time). Relative paths inside a file are relative to that
//! file's directory; inside the built-in default, to the working directory.

pub mod generators;
pub mod server;
pub mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::buildpack::config::BuildpackConfig;
use crate::go::config::GoConfig;
use crate::storage::config::StorageConfig;
use crate::upstream::config::UpstreamConfig;
pub use generators::{GeneratorConfig, Limits, Source};
pub use server::ServerConfig;
pub use units::ByteSize;

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

/// A section's verdict on a value: the key it is at, and what is wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Makes a relative `path` relative to `base` (the config file's directory).
pub(crate) fn resolve(path: &mut PathBuf, base: &Path) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

/// Where a config came from, for messages.
#[derive(Clone, Debug, PartialEq)]
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

#[derive(Clone, Debug, PartialEq)]
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
        if let Some(metrics) = var("KONTAIN_METRICS_LISTEN") {
            self.server.metrics_listen = server::parse_optional_address(&metrics)
                .map_err(|m| invalid("KONTAIN_METRICS_LISTEN", m))?;
        }
        if let Some(port) = var("PORT") {
            let port = port
                .parse::<u16>()
                .map_err(|_| invalid("PORT", format!("{port:?} is not a port number")))?;
            self.server.listen.set_port(port);
        }
        Ok(())
    }

    /// What of `next` differs from this config and takes effect only at the
    /// next start, by name; everything else a reload applies.
    pub fn needs_restart(&self, next: &Config) -> Vec<&'static str> {
        [
            ("server.listen", self.server.listen != next.server.listen),
            (
                "server.metrics_listen",
                self.server.metrics_listen != next.server.metrics_listen,
            ),
            (
                "server trusted_proxies, forwarded_header, concurrent_builds and queued_builds",
                (
                    &self.server.trusted_proxies,
                    self.server.forwarded_header,
                    self.server.concurrent_builds,
                    self.server.queued_builds,
                ) != (
                    &next.server.trusted_proxies,
                    next.server.forwarded_header,
                    next.server.concurrent_builds,
                    next.server.queued_builds,
                ),
            ),
            (
                "server timeouts, hold and max_connections",
                (
                    self.server.header_timeout,
                    self.server.idle_timeout,
                    self.server.hold,
                    self.server.max_connections,
                ) != (
                    next.server.header_timeout,
                    next.server.idle_timeout,
                    next.server.hold,
                    next.server.max_connections,
                ),
            ),
            ("storage", self.storage != next.storage),
            ("go.scratch", self.go.scratch != next.go.scratch),
            (
                "buildpack.scratch",
                self.buildpack.scratch != next.buildpack.scratch,
            ),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.server
            .validate()
            .and_then(|()| self.storage.validate())
            .and_then(|()| generators::validate(&self.generators))
            .and_then(|()| self.upstream.validate())
            .and_then(|()| self.go.validate())
            .and_then(|()| self.buildpack.validate())
            .map_err(|Invalid { key, message }| ConfigError::Invalid {
                origin: self.origin.to_string(),
                key,
                message,
            })
    }

    fn resolve_paths(&mut self) {
        let Origin::File(file) = &self.origin else {
            return;
        };
        let base = file.parent().unwrap_or(Path::new(".")).to_owned();
        self.storage.resolve_paths(&base);
        self.go.resolve_paths(&base);
        self.buildpack.resolve_paths(&base);
        generators::resolve_paths(&mut self.generators, &base);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capabilities::Capability;
    use crate::storage::config::RedirectMode;
    use std::time::Duration;

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
