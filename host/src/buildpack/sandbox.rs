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
//!
//! The steps of one build share one sandbox (a [`Session`]) when the
//! builder has a shell: as in pack's lifecycle, where every step of a build
//! runs in the same container. Between steps every process of the sandbox
//! is killed, so the host never reads a step's files while it still runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use super::BuildpackError;
use crate::process::RunError;

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
        let cmd = self.confined(mounts, &step.env, &step.program, &step.args);
        self.spawn(cmd, &step.what).await
    }

    /// bubblewrap running `program` confined, with `mounts` and only `env`.
    fn confined(
        &self,
        mounts: &Mounts<'_>,
        env: &[(String, String)],
        program: &str,
        args: &[String],
    ) -> tokio::process::Command {
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
        cmd
    }

    /// One sandbox for every step of a build, when the builder has a shell
    /// to run them (every real builder does): a sandbox costs ~4 ms to
    /// start, a step in a running one a fork and an exec. `None`: run each
    /// step in a sandbox of its own.
    pub async fn session(&self, mounts: &Mounts<'_>) -> Option<Session> {
        if self.unsandboxed || std::fs::symlink_metadata(mounts.rootfs.join("bin/sh")).is_err() {
            return None;
        }
        let mut cmd = self.confined(mounts, &[], SHELL, &[]);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().ok()?;
        let group = kill_on_drop(child.id());
        let mut session = Session {
            stdin: child.stdin.take()?,
            lines: tokio::io::BufReader::new(child.stdout.take()?).lines(),
            _child: child,
            _group: group,
            timeout: self.timeout,
            io: mounts.io.to_owned(),
        };
        // The shell answers, or the builder's shell cannot run steps.
        // `kill` must be the shell's own: the cleanup after each step
        // relies on it.
        match session
            .exchange("[ \"$(command -v kill)\" = kill ]", "starting the sandbox")
            .await
        {
            Ok(0) => Some(session),
            _ => None,
        }
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
        let done = match crate::process::run(&mut cmd, self.timeout, MAX_OUTPUT).await {
            Ok(done) => done,
            Err(RunError::Spawn(e)) => {
                return Err(BuildpackError::io(format!("starting {what}"), e));
            }
            Err(RunError::Wait(e)) => return Err(BuildpackError::io(format!("running {what}"), e)),
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

/// The builder's shell, which runs the steps of a [`Session`].
const SHELL: &str = "/bin/sh";

/// A sandbox that runs the steps of one build, one after the other: the
/// builder's shell reads one command per step from us, runs the step with
/// its environment, its output to a file in its plan directory, then kills
/// every other process in the sandbox (its pid namespace) before it
/// answers with the exit code. So, as with a sandbox per step, nothing of
/// a step is running while the host reads what it left.
pub struct Session {
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    _child: tokio::process::Child,
    /// Kills the whole sandbox when the session goes.
    _group: crate::process::OnDrop<Box<dyn FnOnce() + Send>>,
    timeout: Duration,
    /// The host directory mounted at [`IO`].
    io: PathBuf,
}

fn kill_on_drop(id: Option<u32>) -> crate::process::OnDrop<Box<dyn FnOnce() + Send>> {
    crate::process::OnDrop::new(Box::new(move || crate::process::kill_group(id)))
}

/// `s` as one shell word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Whether the shell can `export` `name`.
fn exportable(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Session {
    /// Whether the session can run `step`: every variable name exportable,
    /// no NUL anywhere (a sandbox of its own then reports the step).
    pub fn can_run(&self, step: &Step) -> bool {
        let plain = |s: &str| !s.contains('\0');
        step.env.iter().all(|(k, v)| exportable(k) && plain(v))
            && plain(&step.program)
            && step.args.iter().all(|a| plain(a))
    }

    /// Runs `step` with its output in `<IO>/<dir>/output`.
    pub async fn run(&mut self, step: &Step, dir: &str) -> Result<Outcome, BuildpackError> {
        let mut command = String::from("(");
        for (k, v) in &step.env {
            command.push_str(&format!("export {k}={}; ", quote(v)));
        }
        command.push_str("exec");
        for word in std::iter::once(&step.program).chain(&step.args) {
            command.push(' ');
            command.push_str(&quote(word));
        }
        command.push_str(&format!(
            ") </dev/null >{} 2>&1",
            quote(&format!("{IO}/{dir}/output"))
        ));
        let code = match self.exchange(&command, &step.what).await {
            Ok(code) => code,
            Err(None) => {
                return Err(BuildpackError::Timeout {
                    what: step.what.clone(),
                    seconds: self.timeout.as_secs(),
                });
            }
            Err(Some(e)) => return Err(BuildpackError::io(format!("running {}", step.what), e)),
        };
        Ok(Outcome {
            code: Some(code),
            output: read_output(&self.io, dir),
        })
    }

    /// Sends `command` (one line of shell), then the cleanup, and waits for
    /// the exit status. `Err(None)`: the time limit passed.
    async fn exchange(&mut self, command: &str, what: &str) -> Result<i32, Option<std::io::Error>> {
        use tokio::io::AsyncWriteExt;
        let nonce = format!("kontain-{:016x}", rand::random::<u64>());
        // `kill -1` reaches every process of the sandbox but its init and
        // the shell; it fails once there is none left.
        let line =
            format!("{command}\ns=$?; while kill -9 -1 2>/dev/null; do :; done; echo {nonce} $s\n");
        let gone = || {
            Some(std::io::Error::other(format!(
                "the sandbox ended during {what}"
            )))
        };
        let answer = async {
            self.stdin.write_all(line.as_bytes()).await.map_err(Some)?;
            self.stdin.flush().await.map_err(Some)?;
            loop {
                let Some(got) = self.lines.next_line().await.map_err(Some)? else {
                    return Err(gone());
                };
                if let Some(code) = got.strip_prefix(&nonce) {
                    return code.trim().parse::<i32>().map_err(|_| gone());
                }
            }
        };
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(result) => result,
            Err(_) => Err(None),
        }
    }
}

/// The end of a step's output file, never through a symlink the step may
/// have left in place of its directory or the file.
fn read_output(io: &Path, dir: &str) -> String {
    use std::io::{Read, Seek};
    let dir = io.join(dir);
    let file = dir.join("output");
    let plain = |p: &Path, want_dir: bool| {
        std::fs::symlink_metadata(p).is_ok_and(|m| if want_dir { m.is_dir() } else { m.is_file() })
    };
    if !plain(&dir, true) || !plain(&file, false) {
        return String::new();
    }
    let Ok(mut f) = std::fs::File::open(&file) else {
        return String::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let _ = f.seek(std::io::SeekFrom::Start(
        len.saturating_sub(MAX_OUTPUT as u64),
    ));
    let mut bytes = Vec::new();
    let _ = f.take(MAX_OUTPUT as u64).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The last `n` lines of `output`, for error messages.
pub fn tail(output: &str, n: usize) -> String {
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_words_reach_the_shell_unchanged() {
        for word in ["plain", "", "it's", "a b\nc", "$(id) `id` \\ \" '' *"] {
            let out = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("printf %s {}", quote(word)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), word);
        }
    }

    #[test]
    fn only_shell_names_are_exported() {
        assert!(exportable("CNB_LAYERS_DIR") && exportable("_x1"));
        for name in ["", "1A", "A-B", "A B", "A;id", "Ä"] {
            assert!(!exportable(name), "{name:?}");
        }
    }
}
