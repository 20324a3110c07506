//! Running a buildpack's `bin/detect` or `bin/build`, confined.
//!
//! bubblewrap gives each step new mount, pid, ipc, uts, user, cgroup and
//! (unless `network = true`) network namespaces; the builder's filesystem
//! read-only as `/`; only the app (`/workspace`), the layers (`/layers`),
//! the platform dir (`/platform`, read-only) and a plan dir (`/kontain`)
//! mounted from the host; a fresh `/tmp`, `/proc` and `/dev`; the builder's
//! CNB user; no capabilities; a time limit that kills the process group.
//! If bubblewrap cannot start, the step fails saying so, unless the config
//! explicitly allows running unsandboxed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::BuildpackError;

/// Host directories a step sees, and where.
pub struct Mounts<'a> {
    pub rootfs: &'a Path,
    pub app: &'a Path,
    pub layers: &'a Path,
    pub platform: &'a Path,
    pub io: &'a Path,
}

/// Mount points inside the sandbox.
pub const APP: &str = "/workspace";
pub const LAYERS: &str = "/layers";
pub const PLATFORM: &str = "/platform";
pub const IO: &str = "/kontain";

pub struct Sandbox {
    pub bwrap: PathBuf,
    pub allow_unsandboxed: bool,
    pub network: bool,
    pub timeout: Duration,
    pub uid: u32,
    pub gid: u32,
}

/// What a step did.
pub struct Outcome {
    pub code: Option<i32>,
    /// stdout and stderr, interleaved per stream (stdout first), capped.
    pub output: String,
}

const MAX_OUTPUT: usize = 256 * 1024;

impl Sandbox {
    /// Runs `program` (a path inside the sandbox) with `args` and `env`.
    pub async fn run(
        &self,
        mounts: &Mounts<'_>,
        program: &str,
        args: &[String],
        env: &[(String, String)],
        what: &str,
    ) -> Result<Outcome, BuildpackError> {
        let mut cmd = tokio::process::Command::new(&self.bwrap);
        cmd.env_clear()
            .arg("--unshare-all")
            .arg("--die-with-parent")
            .arg("--new-session")
            .arg("--cap-drop")
            .arg("ALL");
        if self.network {
            cmd.arg("--share-net");
        }
        cmd.arg("--ro-bind")
            .arg(mounts.rootfs)
            .arg("/")
            .arg("--bind")
            .arg(mounts.app)
            .arg(APP)
            .arg("--bind")
            .arg(mounts.layers)
            .arg(LAYERS)
            .arg("--ro-bind")
            .arg(mounts.platform)
            .arg(PLATFORM)
            .arg("--bind")
            .arg(mounts.io)
            .arg(IO)
            .args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"])
            .arg("--uid")
            .arg(self.uid.to_string())
            .arg("--gid")
            .arg(self.gid.to_string())
            .args(["--chdir", APP, "--clearenv"]);
        for (k, v) in env {
            cmd.arg("--setenv").arg(k).arg(v);
        }
        cmd.arg("--").arg(program).args(args);
        match self.spawn(cmd, what).await {
            Err(BuildpackError::SandboxUnavailable { message }) if self.allow_unsandboxed => {
                tracing::warn!(%message, "bubblewrap cannot start: running {what} UNSANDBOXED, as kontain.toml allows");
                self.run_unsandboxed(mounts, program, args, env, what).await
            }
            other => other,
        }
    }

    /// The same step on the host, paths mapped to the host directories.
    /// Only with `allow_unsandboxed`.
    async fn run_unsandboxed(
        &self,
        mounts: &Mounts<'_>,
        program: &str,
        args: &[String],
        env: &[(String, String)],
        what: &str,
    ) -> Result<Outcome, BuildpackError> {
        let map = |s: &str| -> String {
            for (inside, outside) in [
                (APP, mounts.app),
                (LAYERS, mounts.layers),
                (PLATFORM, mounts.platform),
                (IO, mounts.io),
            ] {
                if let Some(rest) = s.strip_prefix(inside)
                    && (rest.is_empty() || rest.starts_with('/'))
                {
                    return format!("{}{rest}", outside.display());
                }
            }
            if s.starts_with("/cnb/") {
                return format!("{}{s}", mounts.rootfs.display());
            }
            s.to_owned()
        };
        let mut cmd = tokio::process::Command::new(map(program));
        cmd.env_clear()
            .current_dir(mounts.app)
            .args(args.iter().map(|a| map(a)))
            .envs(env.iter().map(|(k, v)| {
                let v = v.split(':').map(map).collect::<Vec<_>>().join(":");
                (k.clone(), v)
            }));
        self.spawn(cmd, what).await
    }

    async fn spawn(
        &self,
        mut cmd: tokio::process::Command,
        what: &str,
    ) -> Result<Outcome, BuildpackError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| BuildpackError::SandboxUnavailable {
                message: format!("{}: {e}", self.bwrap.display()),
            })?;
        let group = crate::golang::KillGroup::new(child.id());
        let output = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(r) => r.map_err(|e| BuildpackError::io(format!("running {what}"), e))?,
            Err(_) => {
                return Err(BuildpackError::Timeout {
                    what: what.to_owned(),
                    seconds: self.timeout.as_secs(),
                });
            }
        };
        group.disarm();
        let stderr = String::from_utf8_lossy(&output.stderr);
        // bubblewrap reports its own failures as "bwrap: ..." with exit 1
        // before the program starts.
        if output.status.code() == Some(1)
            && output.stdout.is_empty()
            && stderr.starts_with("bwrap:")
        {
            return Err(BuildpackError::SandboxUnavailable {
                message: stderr.trim().to_owned(),
            });
        }
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&stderr);
        if text.len() > MAX_OUTPUT {
            let cut = text.len() - MAX_OUTPUT;
            let cut = (cut..text.len())
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(text.len());
            text = text[cut..].to_owned();
        }
        Ok(Outcome {
            code: output.status.code(),
            output: text,
        })
    }
}

/// The last `n` lines of `output`, for error messages.
pub fn tail(output: &str, n: usize) -> String {
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
