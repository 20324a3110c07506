//! The `buildpack` capability: git repositories built with Cloud Native
//! Buildpacks, natively and daemonless. Sources from git (`git`), builder
//! images unpacked once (`builder`), buildpack executables confined by
//! bubblewrap (`sandbox`), the platform's detect and build phases
//! (`lifecycle`, with build plans in `plan`), the launch environment
//! (`env`), and the export onto the run image (`export`). Its config
//! section is `[buildpack]` (`config`), which reloads live; its WIT host
//! implementation is `wit`.
//!
//! Depends on `upstream` (its policy, for git's https URLs, and images
//! through the generator's scoped upstream), `image` and `storage`; knows
//! nothing of wasm or HTTP serving.

mod builder;
pub mod config;
pub mod env;
mod export;
mod git;
mod launcher;
pub mod lifecycle;
mod plan;
mod project;
pub mod sandbox;
mod sbom;
pub mod wit;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use config::BuildpackConfig;
pub use export::BuildpackBuild;
pub use git::Source;

use crate::generator::{Classify, ErrorKind};
use crate::image::once::{DirCache, Recent};
use crate::image::{Builds, ImageError};
use crate::upstream::{Refusal, Upstream, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum BuildpackError {
    #[error("{0}")]
    InvalidName(String),
    #[error(transparent)]
    Refused(Refusal),
    #[error("{url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("there is no repository {what}")]
    UnknownRepository { what: String },
    #[error("{url} has no branch, tag or commit {revision:?}")]
    UnknownRevision { url: String, revision: String },
    #[error("git {what} failed: {message}")]
    Git { what: String, message: String },
    #[error("{tool} cannot be run: {message}")]
    Tool { tool: String, message: String },
    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error("{what} has more than {limit} files")]
    TooManyFiles { what: String, limit: usize },
    #[error("the builder image cannot be used: {0}")]
    BadBuilder(String),
    #[error("the app's project.toml cannot be used: {0}")]
    Project(String),
    /// What this server's configuration does not allow a build to do.
    #[error("{0}")]
    NotAllowed(String),
    #[error("no buildpack group passed detection ({tried})")]
    NoGroupPassed { tried: String },
    #[error("buildpack {buildpack} failed in {phase} (exit {code}):\n{tail}")]
    BuildpackFailed {
        buildpack: String,
        phase: &'static str,
        code: i32,
        tail: String,
    },
    #[error("{what} took longer than the limit of {seconds}s")]
    Timeout { what: String, seconds: u64 },
    #[error(
        "the buildpack sandbox (bubblewrap) cannot start: {message}. Install bubblewrap (in a container, give it user namespaces and a /proc of its own: see docs/deploy.md), or set [buildpack] allow_unsandboxed = true in kontain.toml to run buildpacks without it (only for builders you trust)"
    )]
    SandboxUnavailable { message: String },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl Classify for BuildpackError {
    fn kind(&self) -> ErrorKind {
        match self {
            BuildpackError::InvalidName(_) => ErrorKind::InvalidName,
            BuildpackError::UnknownRevision { .. } | BuildpackError::UnknownRepository { .. } => {
                ErrorKind::NotFound
            }
            BuildpackError::Refused(_) | BuildpackError::NotAllowed(_) => ErrorKind::Denied,
            BuildpackError::TooLarge { .. }
            | BuildpackError::TooManyFiles { .. }
            | BuildpackError::Timeout { .. } => ErrorKind::LimitExceeded,
            // The source cannot be built as it is: the request cannot
            // succeed, and retrying will not help.
            BuildpackError::NoGroupPassed { .. }
            | BuildpackError::BuildpackFailed { .. }
            | BuildpackError::Project(_) => ErrorKind::BuildFailed,
            // The configured builder is the operator's to fix.
            BuildpackError::BadBuilder(_) => ErrorKind::Misconfigured,
            BuildpackError::Unreachable { .. }
            | BuildpackError::Git { .. }
            | BuildpackError::Tool { .. }
            | BuildpackError::SandboxUnavailable { .. } => ErrorKind::Unavailable,
            BuildpackError::Upstream(e) => e.kind(),
            BuildpackError::Image(e) => e.kind(),
        }
    }
}

impl BuildpackError {
    pub(crate) fn io(what: String, source: std::io::Error) -> BuildpackError {
        BuildpackError::Image(ImageError::io(what, source))
    }
}

/// What `[buildpack]` decides, replaced as a whole on reload; builds that
/// started keep the settings they started with.
struct Settings {
    git: git::Git,
    config: BuildpackConfig,
    /// Whether bubblewrap works with these settings, probed on first use.
    sandbox: tokio::sync::OnceCell<Result<(), String>>,
}

impl Settings {
    fn new(config: &BuildpackConfig) -> Settings {
        Settings {
            git: git::Git {
                command: config.git_command.clone(),
                template: config.git_url.clone(),
                timeout: config.step_timeout,
                max_bytes: config.max_source_bytes.0,
            },
            config: config.clone(),
            sandbox: tokio::sync::OnceCell::new(),
        }
    }
}

/// Buildpack builds, as the `buildpack` capability offers them.
pub struct Buildpacks {
    settings: ArcSwap<Settings>,
    upstream: Arc<Upstream>,
    builds: Arc<Builds>,
    scratch: PathBuf,
    /// Checkouts, by URL and commit.
    sources: DirCache,
    /// Builder filesystems, by builder digest.
    builders: DirCache,
    /// Branch and tag lists read lately, by URL.
    refs: Recent<Vec<String>>,
    /// Abbreviated commits resolved lately (`<url> <short>` → the commit):
    /// finding one fetches the history, which must not happen every pull.
    abbreviations: Recent<String>,
    /// Revisions a repository did not have lately, by `<url> <revision>`.
    unknown: Recent<()>,
}

/// How long an abbreviated commit's resolution is kept (a longer one would
/// only matter once the repository grows a commit sharing its prefix).
const ABBREVIATION_TTL: Duration = Duration::from_secs(3600);

/// How long a revision a repository did not have is answered from memory,
/// as failed builds are.
const UNKNOWN_TTL: Duration = Duration::from_secs(300);

/// How long a repository's branch and tag list is answered from memory.
const REFS_TTL: Duration = Duration::from_secs(60);

impl Buildpacks {
    pub fn new(
        config: &BuildpackConfig,
        scratch: PathBuf,
        upstream: Arc<Upstream>,
        builds: Arc<Builds>,
    ) -> Result<Buildpacks, String> {
        let scratch =
            std::path::absolute(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
        // Checkouts and builds a previous run left behind (a crash, a kill);
        // not those of another process sharing the scratch directory.
        for leftover in ["tmp", "work"] {
            crate::files::remove_abandoned(
                &scratch.join(leftover),
                crate::storage::ABANDONED_AFTER,
            );
        }
        Ok(Buildpacks {
            settings: ArcSwap::from_pointee(Settings::new(config)),
            upstream,
            builds,
            sources: DirCache::new(scratch.join("sources"), scratch.join("tmp")),
            builders: DirCache::new(scratch.join("builders"), scratch.join("tmp")),
            refs: Recent::new(REFS_TTL),
            abbreviations: Recent::new(ABBREVIATION_TTL),
            unknown: Recent::new(UNKNOWN_TTL),
            scratch,
        })
    }

    /// Applies a changed `[buildpack]` (but for `scratch`, which needs a
    /// restart): builds from now on use the new settings.
    pub fn reconfigure(&self, config: &BuildpackConfig) {
        self.settings.store(Arc::new(Settings::new(config)));
    }

    /// Where builder and run images come from.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Whether steps must run unsandboxed: only if bubblewrap cannot start
    /// and the config allows it; an error if it cannot start otherwise.
    async fn unsandboxed(&self, settings: &Settings) -> Result<bool, BuildpackError> {
        let config = &settings.config;
        let probe = settings
            .sandbox
            .get_or_init(|| {
                sandbox::probe(
                    &config.bwrap_command,
                    sandbox::host_user(config.sandbox_user),
                )
            })
            .await;
        match probe {
            Ok(()) => Ok(false),
            Err(message) if config.allow_unsandboxed => {
                tracing::warn!(%message, "bubblewrap cannot start: buildpacks run UNSANDBOXED, as kontain.toml allows");
                Ok(true)
            }
            Err(message) => Err(BuildpackError::SandboxUnavailable {
                message: message.clone(),
            }),
        }
    }

    /// Removes checkouts and unpacked builders unused for `ttl`.
    pub fn collect(&self, ttl: std::time::Duration) -> usize {
        // What a crashed run left (the sweep at start keeps what is younger
        // than an hour: it may be another process's).
        for leftover in ["tmp", "work"] {
            crate::files::remove_abandoned(
                &self.scratch.join(leftover),
                crate::storage::ABANDONED_AFTER,
            );
        }
        self.sources.expire(ttl) + self.builders.expire(ttl)
    }

    /// The branches and tags of `owner/repo`, from a recent read or git.
    pub async fn refs(&self, owner: &str, repo: &str) -> Result<Arc<Vec<String>>, BuildpackError> {
        let settings = self.settings.load_full();
        let url = settings.git.url(owner, repo)?;
        let key = url.to_string();
        if let Some(refs) = self.refs.get(&key) {
            return Ok(refs);
        }
        let policy = self.upstream.client().policy();
        let tmp = self.scratch.join("tmp");
        let mut refs = settings
            .git
            .refs(&url, &policy, &tmp)
            .await
            .map_err(|e| git::scrubbed(e, &url, &format!("{owner}/{repo}")))?;
        refs.sort();
        refs.dedup();
        Ok(self.refs.put(key, refs))
    }

    /// The commit `revision` names in `owner/repo`, checked out.
    pub async fn fetch(
        &self,
        owner: &str,
        repo: &str,
        revision: &str,
    ) -> Result<Source, BuildpackError> {
        let settings = self.settings.load_full();
        let url = settings.git.url(owner, repo)?;
        let policy = self.upstream.client().policy();
        let key = format!("{url} {revision}");
        if self.unknown.get(&key).is_some() {
            return Err(BuildpackError::UnknownRevision {
                url: format!("{owner}/{repo}"),
                revision: revision.to_owned(),
            });
        }
        // A commit found by its abbreviation before: fetched as by its id.
        let full = self.abbreviations.get(&key);
        let asked = full.as_deref().map_or(revision, String::as_str);
        let fetched = settings
            .git
            .fetch(
                &url,
                &format!("{owner}/{repo}"),
                asked,
                &policy,
                &self.sources,
                &self.scratch.join("tmp"),
            )
            .await;
        // Only what the history had to answer is kept: a branch or tag
        // that looks like a commit id moves.
        let abbreviation = git::is_abbreviation(revision);
        match fetched {
            Ok(source) => {
                if abbreviation
                    && full.is_none()
                    && source.commit.starts_with(&revision.to_ascii_lowercase())
                {
                    self.abbreviations.put(key, source.commit.clone());
                }
                Ok(source)
            }
            Err(BuildpackError::UnknownRevision { revision, .. }) => {
                if abbreviation {
                    self.unknown.put(key, ());
                }
                // Named as the client wrote it, not by the server's URL.
                Err(BuildpackError::UnknownRevision {
                    url: format!("{owner}/{repo}"),
                    revision,
                })
            }
            Err(e) => Err(git::scrubbed(e, &url, &format!("{owner}/{repo}"))),
        }
    }
}
