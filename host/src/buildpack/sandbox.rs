//! Running a buildpack's `bin/detect` or `bin/build`, confined.
//!
//! bubblewrap gives each step new mount, pid, ipc, uts, user, cgroup and
//! (unless `network = true`) network namespaces; the builder's filesystem
//! read-only as `/`; only the app (`/workspace`), the layers (`/layers`),
//! the platform dir (`/platform`, read-only) and a plan dir (`/kontain`)
//! mounted from the host; a fresh `/tmp`, `/proc` and `/dev`; the builder's
//! CNB user; no capabilities; a time limit that kills the process group.
//! With `sandbox_user` set (and the server root), bubblewrap itself runs as
//! that unprivileged host user, so the sandbox's CNB user is nobody on the
//! host; otherwise the CNB user maps to the server's own user, which only
//! matters for what the sandbox can reach: its own mounts, and with
//! `network = true` the host's network. Whether
//! bubblewrap can start is probed once; if it cannot, builds fail saying so,
//! unless the config explicitly allows running unsandboxed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::BuildpackError;
use crate::process::RunError;

/// Host directories a step sees, and where.
pub struct Mounts<'a> {
    pub rootfs: &'a Path,
    pub app: &'a Path,
    pub layers: &'a Path,
    pub platform: &'a Path,
    pub io: &'a Path,
    /// A buildpack the app carries: mounted read-only at [`IO`]`/`[`OWN`]
    /// (a directory the host made in `io`).
    pub own: Option<PathBuf>,
}

/// Mount points inside the sandbox.
pub const APP: &str = "/workspace";
pub const LAYERS: &str = "/layers";
pub const PLATFORM: &str = "/platform";
pub const IO: &str = "/kontain";
/// Where, in [`IO`], a buildpack the app carries is mounted.
pub const OWN: &str = "buildpack";

pub struct Sandbox {
    pub bwrap: PathBuf,
    /// Run steps on the host: only when bubblewrap cannot start and the
    /// config explicitly allows it ([`probe`] decides).
    pub unsandboxed: bool,
    pub network: bool,
    pub timeout: Duration,
    /// The CNB user inside the sandbox.
    pub uid: u32,
    pub gid: u32,
    /// The host user bubblewrap runs as: an unprivileged one when the server
    /// is root, so that the sandbox's user maps to nobody on the host.
    pub host_user: Option<(u32, u32)>,
    /// The largest file a step may write (`max_source_bytes`: the app and
    /// its layers are bounded in all after the build, this stops one file
    /// from filling the disk before).
    pub max_file: u64,
}

/// The host user for sandboxes: `configured` (uid = gid) when the server
/// runs as root and can switch to it; otherwise the server's own.
pub fn host_user(configured: Option<u32>) -> Option<(u32, u32)> {
    configured
        .filter(|_| rustix::process::geteuid().is_root())
        .map(|id| (id, id))
}

/// Whether bubblewrap can start here (as `user`), asked once per process
/// with a step that does nothing; `Err` says why not.
pub async fn probe(bwrap: &Path, user: Option<(u32, u32)>) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(bwrap);
    cmd.env_clear().args([
        "--unshare-all",
        "--die-with-parent",
        "--ro-bind",
        "/",
        "/",
        "--",
        "true",
    ]);
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    match crate::process::run(&mut cmd, Duration::from_secs(20), 4096).await {
        Ok(done) if done.status.success() => Ok(()),
        Ok(done) => Err(String::from_utf8_lossy(&done.stderr).trim().to_owned()),
        Err(RunError::Spawn(e)) => Err(format!("{}: {e}", bwrap.display())),
        Err(RunError::Wait(e)) => Err(e.to_string()),
        Err(RunError::Overflow) => Err("it printed too much".into()),
        Err(RunError::Timeout) => Err("it did not answer within 20s".into()),
    }
}

/// One run of a buildpack executable: a path inside the sandbox, its
/// arguments and environment, and how errors name it.
pub struct Step {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub what: String,
}

/// What a step did.
pub struct Outcome {
    pub code: Option<i32>,
    /// The first part of stdout, then the last part of stderr.
    pub output: String,
}

const MAX_OUTPUT: usize = 256 * 1024;

impl Sandbox {
    /// Runs `step` confined, with `mounts`.
    pub async fn run(&self, mounts: &Mounts<'_>, step: &Step) -> Result<Outcome, BuildpackError> {
        if self.unsandboxed {
            return self.run_unsandboxed(mounts, step).await;
        }
        let mut cmd = tokio::process::Command::new(&self.bwrap);
        if let Some((uid, gid)) = self.host_user {
            cmd.uid(uid).gid(gid);
        }
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
            .arg(IO);
        if let Some(own) = &mounts.own {
            cmd.arg("--ro-bind").arg(own).arg(format!("{IO}/{OWN}"));
        }
        cmd.args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"])
            .arg("--uid")
            .arg(self.uid.to_string())
            .arg("--gid")
            .arg(self.gid.to_string())
            .args(["--chdir", APP, "--clearenv"]);
        for (k, v) in &step.env {
            cmd.arg("--setenv").arg(k).arg(v);
        }
        cmd.arg("--").arg(&step.program).args(&step.args);
        self.spawn(cmd, &step.what).await
    }

    /// The same step on the host, paths mapped to the host directories.
    /// Only with `allow_unsandboxed`.
    async fn run_unsandboxed(
        &self,
        mounts: &Mounts<'_>,
        step: &Step,
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
        let mut cmd = tokio::process::Command::new(map(&step.program));
        cmd.env_clear()
            .current_dir(mounts.app)
            .args(step.args.iter().map(|a| map(a)))
            .envs(step.env.iter().map(|(k, v)| {
                let v = v.split(':').map(map).collect::<Vec<_>>().join(":");
                (k.clone(), v)
            }));
        self.spawn(cmd, &step.what).await
    }

    async fn spawn(
        &self,
        mut cmd: tokio::process::Command,
        what: &str,
    ) -> Result<Outcome, BuildpackError> {
        // No core dumps of a crashing step either.
        crate::process::limit_file_size(&mut cmd, self.max_file);
        let done = match crate::process::run(&mut cmd, self.timeout, MAX_OUTPUT).await {
            Ok(done) => done,
            Err(RunError::Spawn(e)) => {
                return Err(BuildpackError::io(format!("starting {what}"), e));
            }
            Err(RunError::Wait(e)) => return Err(BuildpackError::io(format!("running {what}"), e)),
            // `run` keeps what fits and reads on; it never stops a step.
            Err(RunError::Overflow) => {
                let e = std::io::ErrorKind::FileTooLarge.into();
                return Err(BuildpackError::io(format!("running {what}"), e));
            }
            Err(RunError::Timeout) => {
                return Err(BuildpackError::Timeout {
                    what: what.to_owned(),
                    seconds: self.timeout.as_secs(),
                });
            }
        };
        let mut text = String::from_utf8_lossy(&done.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&done.stderr));
        Ok(Outcome {
            code: done.status.code(),
            output: text,
        })
    }
}

/// The last `n` lines of `output`, for error messages.
pub fn tail(output: &str, n: usize) -> String {
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
