//! `[buildpack]`: where sources come from and how buildpacks are confined.
//! Reloads live, but for `scratch`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::Invalid;
use crate::config::units::{ByteSize, duration};
use crate::upstream::HostPattern;

/// Cloud Native Buildpacks builds (capability `buildpack`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
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
    #[serde(with = "duration")]
    pub step_timeout: Duration,
    /// Largest fetch (the pack), checkout (the commit's files) and app +
    /// layers after the build.
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

impl BuildpackConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if !self.git_url.contains("{repo}") {
            return Err(Invalid::new("buildpack.git_url", "must contain {repo}"));
        }
        if self.step_timeout.is_zero() {
            return Err(Invalid::new(
                "buildpack.step_timeout",
                "must be more than zero",
            ));
        }
        Ok(())
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(scratch) = &mut self.scratch {
            crate::config::resolve(scratch, base);
        }
    }

    /// The hosts the upstream client must reach for these settings: the git
    /// host, as exactly itself.
    pub fn upstream_hosts(&self) -> Vec<HostPattern> {
        let url = self.git_url.replace("{owner}", "o").replace("{repo}", "r");
        url::Url::parse(&url)
            .ok()
            .as_ref()
            .and_then(HostPattern::exactly)
            .into_iter()
            .collect()
    }
}
