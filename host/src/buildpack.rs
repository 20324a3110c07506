//! Cloud Native Buildpacks, natively and daemonless: sources from git
//! (`git`), buildpack executables confined by bubblewrap (`sandbox`), the
//! platform's detect and build phases (`lifecycle`) and the launch
//! environment (`env`). `builders::buildpack` unpacks builder images and
//! exports the result onto the run image.
//!
//! Depends on `upstream` (its policy, for git's https URLs); knows nothing
//! of wasm or HTTP serving.

pub mod env;
mod git;
pub mod lifecycle;
pub mod sandbox;

use std::path::PathBuf;
use std::sync::Arc;

pub use git::Source;

use crate::config::BuildpackConfig;
use crate::upstream::{Client, Refusal};

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
    #[error("the builder image cannot be used: {0}")]
    BadBuilder(String),
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
        "the buildpack sandbox (bubblewrap) cannot start: {message}. Install bubblewrap, or set [buildpack] allow_unsandboxed = true in kontain.toml to run buildpacks without it (only for builders you trust)"
    )]
    SandboxUnavailable { message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl BuildpackError {
    pub(crate) fn io(what: String, source: std::io::Error) -> BuildpackError {
        BuildpackError::Io { what, source }
    }
}

pub struct Buildpacks {
    git: git::Git,
    client: Arc<Client>,
    pub scratch: PathBuf,
    pub config: BuildpackConfig,
    /// Whether bubblewrap works here, probed on first use.
    sandbox: tokio::sync::OnceCell<Result<(), String>>,
}

impl Buildpacks {
    pub fn new(
        config: &BuildpackConfig,
        scratch: PathBuf,
        client: Arc<Client>,
    ) -> Result<Buildpacks, String> {
        let scratch =
            std::path::absolute(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
        // Checkouts and builds a previous run left behind (a crash, a kill).
        for leftover in ["tmp", "work"] {
            let _ = std::fs::remove_dir_all(scratch.join(leftover));
        }
        Ok(Buildpacks {
            git: git::Git {
                command: config.git_command.clone(),
                template: config.git_url.clone(),
                timeout: config.step_timeout,
                max_bytes: config.max_source_bytes.0,
            },
            client,
            scratch,
            config: config.clone(),
            sandbox: tokio::sync::OnceCell::new(),
        })
    }

    /// Whether steps must run unsandboxed: only if bubblewrap cannot start
    /// and the config allows it; an error if it cannot start otherwise.
    pub async fn unsandboxed(&self) -> Result<bool, BuildpackError> {
        let probe = self
            .sandbox
            .get_or_init(|| {
                sandbox::probe(
                    &self.config.bwrap_command,
                    sandbox::host_user(self.config.sandbox_user),
                )
            })
            .await;
        match probe {
            Ok(()) => Ok(false),
            Err(message) if self.config.allow_unsandboxed => {
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
        crate::files::expire_dirs(&self.scratch.join("sources"), ttl)
            + crate::files::expire_dirs(&self.scratch.join("builders"), ttl)
    }

    /// The commit `revision` names in `owner/repo`, checked out.
    pub async fn fetch(
        &self,
        owner: &str,
        repo: &str,
        revision: &str,
    ) -> Result<Source, BuildpackError> {
        let url = self.git.url(owner, repo)?;
        self.git
            .fetch(&url, revision, self.client.policy(), &self.scratch)
            .await
    }
}
