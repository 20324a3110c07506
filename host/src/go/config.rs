//! `[go]`: where modules come from, and the limits of one build. Reloads
//! live, but for `scratch`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::Invalid;
use crate::config::units::{ByteSize, duration};
use crate::upstream::HostPattern;

/// Go builds (capability `go`): where modules come from, and the limits of
/// one build.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GoConfig {
    /// Module proxies, tried in order; the next is asked only when one
    /// answers 404 or 410 (GOPROXY's `,` semantics). `https://…` proxies are
    /// reached through the upstream client's address checks; `file:///dir`
    /// reads a directory in proxy layout. `go build` gets the same list for
    /// dependencies, and never `direct`.
    pub proxies: Vec<url::Url>,
    /// Checksum database that main modules are checked against before a
    /// build, and `go` checks dependencies against: `sum.golang.org`, a
    /// verifier key `<name>+<hash>+<key>`, either followed by the database's
    /// URL (default `https://<name>`); `"off"` to disable.
    pub sumdb: String,
    /// The `go` command; looked up on PATH unless it is a path.
    pub command: PathBuf,
    /// Largest module zip fetched, and largest total of its unpacked files.
    pub max_module_bytes: ByteSize,
    /// Largest binary one build may produce.
    pub max_binary_bytes: ByteSize,
    /// Wall time for one `go build` (one platform).
    #[serde(with = "duration")]
    pub build_timeout: Duration,
    /// Where modules are unpacked and builds run, with the shared module and
    /// build caches. Default: `go/` in the filesystem storage directory.
    pub scratch: Option<PathBuf>,
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

impl GoConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        for (i, proxy) in self.proxies.iter().enumerate() {
            let ok = match proxy.scheme() {
                "https" | "http" => proxy.host_str().is_some(),
                "file" => proxy.to_file_path().is_ok(),
                _ => false,
            };
            if !ok {
                return Err(Invalid::new(
                    format!("go.proxies[{i}]"),
                    format!("{proxy} must be an http(s):// URL or file:///absolute/dir"),
                ));
            }
        }
        if self.proxies.is_empty() {
            return Err(Invalid::new("go.proxies", "name at least one module proxy"));
        }
        super::sumdb::SumDb::parse(&self.sumdb).map_err(|e| Invalid::new("go.sumdb", e))?;
        if self.build_timeout.is_zero() {
            return Err(Invalid::new("go.build_timeout", "must be more than zero"));
        }
        Ok(())
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(scratch) = &mut self.scratch {
            crate::config::resolve(scratch, base);
        }
        // A bare name is looked up on PATH; a relative path is the file's.
        if self.command.components().count() > 1 {
            crate::config::resolve(&mut self.command, base);
        }
    }

    /// The hosts the upstream client must reach for these settings: the
    /// module proxies and the checksum database, each as exactly itself.
    pub fn upstream_hosts(&self) -> Vec<HostPattern> {
        let sumdb = super::sumdb::SumDb::parse(&self.sumdb).ok().flatten();
        self.proxies
            .iter()
            .chain(sumdb.as_ref().map(|db| &db.url))
            .filter_map(HostPattern::exactly)
            .collect()
    }
}
