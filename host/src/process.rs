//! Running external tools (go, git, bubblewrap) on untrusted input: each in
//! its own process group that is killed as a whole on a timeout or when the
//! request goes away, with its output kept only up to a cap (a tool that
//! prints forever must not fill the server's memory).

use std::process::ExitStatus;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// What a finished tool left.
pub struct Finished {
    pub status: ExitStatus,
    /// The first `cap` bytes of stdout.
    pub stdout: Vec<u8>,
    /// The last `cap` bytes of stderr (where errors end up).
    pub stderr: Vec<u8>,
}

pub enum RunError {
    Spawn(std::io::Error),
    Wait(std::io::Error),
    Timeout,
    /// [`run_bounded`]: stdout passed its cap, and the tool was stopped.
    Overflow,
}

/// Makes `cmd` (and every process it starts) unable to write a file past
/// `bytes`: the kernel stops the writer with `SIGXFSZ`. This bounds what a
/// tool writes from untrusted input (a git pack from a hostile server)
/// while it writes, not after.
pub fn limit_file_size(cmd: &mut tokio::process::Command, bytes: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // Never above the server's own hard limit, which only root may raise.
    let bytes = getrlimit(Resource::Fsize)
        .maximum
        .map_or(bytes, |m| m.min(bytes));
    let limit = Rlimit {
        current: Some(bytes),
        maximum: Some(bytes),
    };
    // A writer stopped by SIGXFSZ would dump core by default: one core
    // file per hostile request, where cores are kept.
    let no_core = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    // SAFETY: the closure runs between fork and exec, where only
    // async-signal-safe work is allowed: it makes two `setrlimit` system
    // calls on values computed before the fork, and allocates nothing.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            setrlimit(Resource::Core, no_core)?;
            setrlimit(Resource::Fsize, limit)?;
            Ok(())
        });
    }
}

/// Spawns `cmd` (its stdio is set here) and waits up to `timeout`.
pub async fn run(
    cmd: &mut tokio::process::Command,
    timeout: Duration,
    cap: usize,
) -> Result<Finished, RunError> {
    run_with(cmd, timeout, cap, false).await
}

/// [`run`], but a tool whose stdout passes `cap` is stopped (its process
/// group killed) at once: for output that is only useful whole, from input
/// that could make it endless.
pub async fn run_bounded(
    cmd: &mut tokio::process::Command,
    timeout: Duration,
    cap: usize,
) -> Result<Finished, RunError> {
    run_with(cmd, timeout, cap, true).await
}

async fn run_with(
    cmd: &mut tokio::process::Command,
    timeout: Duration,
    cap: usize,
    bounded: bool,
) -> Result<Finished, RunError> {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let id = child.id();
    let group = OnDrop::new(move || kill_group(id));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    // The first error ends the wait (and the group guard kills the tool):
    // an overflowing tool is not waited for.
    let work = async {
        tokio::try_join!(
            read_capped(stdout, cap, false, bounded),
            read_capped(stderr, cap, true, false),
            child.wait()
        )
    };
    let (stdout, stderr, status) = match tokio::time::timeout(timeout, work).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::FileTooLarge => {
            return Err(RunError::Overflow);
        }
        Ok(Err(e)) => return Err(RunError::Wait(e)),
        Err(_) => return Err(RunError::Timeout),
    };
    group.disarm();
    Ok(Finished {
        status,
        stdout,
        stderr,
    })
}

/// Reads a pipe to its end, keeping the first (or, with `tail`, the last)
/// `cap` bytes; with `bounded`, more than `cap` is an error
/// (`FileTooLarge`).
async fn read_capped(
    pipe: Option<impl AsyncRead + Unpin>,
    cap: usize,
    tail: bool,
    bounded: bool,
) -> std::io::Result<Vec<u8>> {
    let Some(mut pipe) = pipe else {
        return Ok(Vec::new());
    };
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = pipe.read(&mut buf).await?;
        if n == 0 {
            return Ok(kept);
        }
        kept.extend_from_slice(&buf[..n]);
        if bounded && kept.len() > cap {
            return Err(std::io::ErrorKind::FileTooLarge.into());
        }
        if kept.len() > cap {
            if tail {
                kept.drain(..kept.len() - cap);
            } else {
                kept.truncate(cap);
            }
        }
    }
}

/// Runs a closure when dropped, unless disarmed: cleanup that must happen
/// however a future ends (killing a process group, cancelling work).
pub struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    pub fn new(f: F) -> Self {
        OnDrop(Some(f))
    }

    /// The work finished: nothing to clean up.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Kills the process group `id` leads.
pub(crate) fn kill_group(id: Option<u32>) {
    let pid = id
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Whether `s` is a plain word, safe in a URL path and on a tool's command
/// line: letters, digits, `-`, `_` and `.`, at most `max` bytes, starting
/// with neither `.` (a hidden or parent directory) nor `-` (a flag).
pub fn is_plain(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_is_capped_and_timeouts_kill() {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "yes | head -c 1000000; echo err >&2"]);
        let done = run(&mut cmd, Duration::from_secs(10), 1000)
            .await
            .ok()
            .unwrap();
        assert_eq!(done.stdout.len(), 1000);
        assert_eq!(done.stderr, b"err\n");
        let mut slow = tokio::process::Command::new("sh");
        slow.args(["-c", "sleep 5 & sleep 5"]);
        let start = std::time::Instant::now();
        assert!(matches!(
            run(&mut slow, Duration::from_millis(200), 100).await,
            Err(RunError::Timeout)
        ));
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_bounded_tool_printing_forever_is_stopped_at_its_cap() {
        let start = std::time::Instant::now();
        let mut cmd = tokio::process::Command::new("yes");
        let ran = run_bounded(&mut cmd, Duration::from_secs(30), 1 << 20).await;
        assert!(matches!(ran, Err(RunError::Overflow)));
        assert!(start.elapsed() < Duration::from_secs(10));
        // Unbounded, the same output is cut, not an error.
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "yes | head -c 3000000"]);
        let done = run(&mut cmd, Duration::from_secs(30), 1 << 20).await;
        assert!(matches!(done, Ok(f) if f.stdout.len() == 1 << 20));
    }
}
