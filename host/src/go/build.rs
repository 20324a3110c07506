//! Running `go build` on untrusted source.
//!
//! Go compiles without running module code (no build scripts; cgo is off), so
//! the dangers are in what a module's `.ko.yaml` may ask for: flags and
//! variables that run other programs (`-toolexec`, `CC`, an external linker)
//! or read files outside the module (`-overlay`, `-modfile`). Those are
//! refused by allowlist. Each build gets a cleared environment, a private
//! HOME and GOPATH, `GOWORK=off`, `GOTOOLCHAIN=local`, the configured
//! proxies only (never `direct`), a time limit that kills the whole process
//! group, and a cap on the binary's size. The module and build caches are
//! shared: both are content-addressed and verified by `go` itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{GoError, Module};
use crate::process::RunError;

/// Compiler output kept for error messages.
const MAX_OUTPUT: usize = 256 * 1024;

/// How `go build` is called, as a module's `.ko.yaml` asks.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BuildOptions {
    pub env: Vec<String>,
    pub flags: Vec<String>,
    pub ldflags: Vec<String>,
}

/// Environment variables a build may set: code generation tuning only.
const ALLOWED_ENV: &[&str] = &[
    "GOAMD64",
    "GOARM",
    "GOARM64",
    "GO386",
    "GOMIPS",
    "GOMIPS64",
    "GOPPC64",
    "GORISCV64",
    "GOEXPERIMENT",
];

/// Checked options: `go build` arguments (before the package) and extra
/// environment variables.
pub struct Checked {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl BuildOptions {
    pub fn checked(&self) -> Result<Checked, String> {
        let mut env = Vec::new();
        for entry in &self.env {
            let (key, value) = entry
                .split_once('=')
                .ok_or_else(|| format!("env entry {entry:?} is not KEY=value"))?;
            if key == "CGO_ENABLED" {
                if value != "0" {
                    return Err("cgo is not available: CGO_ENABLED must be 0".into());
                }
                continue;
            }
            if !ALLOWED_ENV.contains(&key) {
                return Err(format!(
                    "env {key} is not allowed (allowed: {}, CGO_ENABLED=0)",
                    ALLOWED_ENV.join(", ")
                ));
            }
            check_plain(value)?;
            env.push((key.to_owned(), value.to_owned()));
        }
        let mut args = Vec::new();
        let mut flags = self.flags.iter();
        while let Some(flag) = flags.next() {
            check_plain(flag)?;
            if !flag.starts_with('-') {
                return Err(format!("{flag:?} is not a flag (flags start with -)"));
            }
            let name = flag.trim_start_matches('-');
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (name, None),
            };
            match (name, inline) {
                ("trimpath" | "a", None) => {}
                ("tags", Some(_)) => {}
                ("tags", None) => {
                    let value = flags.next().ok_or("-tags needs a value")?;
                    check_plain(value)?;
                    args.push(format!("-tags={value}"));
                    continue;
                }
                ("buildmode", Some("exe" | "pie" | "default")) => {}
                _ => {
                    return Err(format!(
                        "go build flag {flag:?} is not allowed (allowed: -tags, -trimpath, -a, -buildmode=exe|pie)"
                    ));
                }
            }
            args.push(flag.clone());
        }
        let mut ld = Vec::new();
        let mut tokens = self.ldflags.iter().flat_map(|l| l.split_whitespace());
        while let Some(token) = tokens.next() {
            check_plain(token)?;
            match token {
                "-s" | "-w" => ld.push(token.to_owned()),
                "-X" => {
                    let value = tokens.next().ok_or("-X needs importpath.name=value")?;
                    check_plain(value)?;
                    ld.push(format!("-X={value}"));
                }
                t if t.starts_with("-X=") || t.starts_with("-buildid=") => ld.push(t.to_owned()),
                t => {
                    return Err(format!(
                        "linker flag {t:?} is not allowed (allowed: -s, -w, -X, -buildid)"
                    ));
                }
            }
        }
        if !ld.is_empty() {
            args.push(format!("-ldflags={}", ld.join(" ")));
        }
        Ok(Checked { args, env })
    }
}

fn check_plain(value: &str) -> Result<(), String> {
    if value.contains("{{") {
        return Err(format!(
            "{value:?}: templates in .ko.yaml are not supported by this server"
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{value:?} contains control characters"));
    }
    Ok(())
}

/// A target platform, as an image index names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Target {
    fn env(&self) -> Result<Vec<(String, String)>, String> {
        // These end up in paths and the environment: plain words only.
        let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
        if !plain(&self.os)
            || !plain(&self.arch)
            || self.variant.as_deref().is_some_and(|v| !plain(v))
        {
            return Err(format!("{self} is not a platform Go can build for"));
        }
        let mut env = vec![
            ("GOOS".to_owned(), self.os.clone()),
            ("GOARCH".to_owned(), self.arch.clone()),
        ];
        if let Some(variant) = &self.variant {
            match self.arch.as_str() {
                "arm" => {
                    let n = variant.trim_start_matches('v');
                    if !matches!(n, "5" | "6" | "7") {
                        return Err(format!("{self}: GOARM must be 5, 6 or 7"));
                    }
                    env.push(("GOARM".into(), n.into()));
                }
                "amd64" if matches!(variant.as_str(), "v1" | "v2" | "v3" | "v4") => {
                    env.push(("GOAMD64".into(), variant.clone()));
                }
                _ => {}
            }
        }
        Ok(env)
    }
}

/// What every build shares: the command, the caches and the limits.
#[derive(Clone, Debug)]
pub struct Toolchain {
    pub command: PathBuf,
    pub goproxy: String,
    pub gosumdb: String,
    pub mod_cache: PathBuf,
    pub build_cache: PathBuf,
    pub timeout: Duration,
    pub max_binary: u64,
}

/// A private copy of a module to build from, removed when dropped.
pub struct Workspace {
    dir: crate::files::Scratch,
    module: Module,
}

impl Workspace {
    /// Copies `module` into a fresh directory under `work`.
    pub fn new(module: &Module, work: &Path) -> Result<Workspace, GoError> {
        std::fs::create_dir_all(work)
            .map_err(|e| GoError::io(format!("creating {}", work.display()), e))?;
        let dir = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(work)
            .map(crate::files::Scratch::new)
            .map_err(|e| GoError::io("creating a build directory".into(), e))?;
        for sub in ["home", "gopath", "tmp", "out"] {
            std::fs::create_dir(dir.path().join(sub))
                .map_err(|e| GoError::io(format!("creating {sub}"), e))?;
        }
        crate::files::copy_tree(&module.dir, &dir.path().join("src"))
            .map_err(|e| GoError::io("copying the module".into(), e))?;
        Ok(Workspace {
            dir,
            module: module.clone(),
        })
    }

    /// Builds `package` for `target`; returns the binary's path (inside the
    /// workspace).
    pub async fn build(
        &self,
        toolchain: &Toolchain,
        package: &super::ImportPath,
        target: &Target,
        options: &BuildOptions,
    ) -> Result<PathBuf, GoError> {
        let refuse = |reason: String| GoError::BadOptions {
            package: package.to_string(),
            reason,
        };
        let Checked {
            args,
            env: extra_env,
        } = options.checked().map_err(refuse)?;
        // Checked before the platform is used in the output's file name.
        let target_env = target.env().map_err(refuse)?;
        let rel = package
            .relative_to(&self.module.path)
            .ok_or_else(|| refuse(format!("it is not in module {}", self.module.path)))?;
        let root = self.dir.path();
        let out = root.join("out").join(format!(
            "{}-{}-{}",
            target.os,
            target.arch,
            target.variant.as_deref().unwrap_or("")
        ));
        let mut cmd = tokio::process::Command::new(&toolchain.command);
        cmd.current_dir(root.join("src"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", root.join("home"))
            .env("GOPATH", root.join("gopath"))
            .env("TMPDIR", root.join("tmp"))
            .env("GOMODCACHE", &toolchain.mod_cache)
            .env("GOCACHE", &toolchain.build_cache)
            .env("GOPROXY", &toolchain.goproxy)
            .env("GOSUMDB", &toolchain.gosumdb)
            .env("GONOSUMDB", "")
            .env("GOPRIVATE", "")
            .env("GOINSECURE", "")
            .env("GOFLAGS", "-mod=mod")
            .env("GOWORK", "off")
            .env("GOENV", "off")
            .env("GOTOOLCHAIN", "local")
            .env("GOTELEMETRY", "off")
            .env("CGO_ENABLED", "0")
            .envs(extra_env)
            .envs(target_env)
            .arg("build")
            .arg("-trimpath")
            .arg("-buildvcs=false")
            .arg("-o")
            .arg(&out)
            .args(&args)
            .arg(if rel.is_empty() {
                ".".to_owned()
            } else {
                format!("./{rel}")
            });
        let output = match crate::process::run(&mut cmd, toolchain.timeout, MAX_OUTPUT).await {
            Ok(done) => done,
            Err(RunError::Spawn(e)) => {
                return Err(GoError::NoGo {
                    command: toolchain.command.display().to_string(),
                    message: e.to_string(),
                });
            }
            Err(RunError::Wait(e)) => return Err(GoError::io("running go build".into(), e)),
            // `run` keeps what fits and reads on; it never stops a tool.
            Err(RunError::Overflow) => {
                let e = std::io::ErrorKind::FileTooLarge.into();
                return Err(GoError::io("running go build".into(), e));
            }
            Err(RunError::Timeout) => {
                return Err(GoError::Timeout {
                    package: package.to_string(),
                    target: target.to_string(),
                    seconds: toolchain.timeout.as_secs(),
                });
            }
        };
        if !output.status.success() {
            return Err(GoError::BuildFailed {
                package: package.to_string(),
                target: target.to_string(),
                output: first_errors(&output.stderr),
            });
        }
        let size = std::fs::metadata(&out)
            .map_err(|e| GoError::io("reading the built binary".into(), e))?
            .len();
        if size > toolchain.max_binary {
            return Err(GoError::TooLarge {
                what: format!("the binary of {package} ({target})"),
                limit: toolchain.max_binary,
            });
        }
        Ok(out)
    }

    pub fn module(&self) -> &Module {
        &self.module
    }
}

/// The compiler's first error lines, without `go: downloading` chatter.
fn first_errors(stderr: &[u8]) -> String {
    const MAX_LINES: usize = 20;
    const MAX_CHARS: usize = 4000;
    let text = String::from_utf8_lossy(stderr);
    let mut out = String::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with("go: downloading") && !l.trim().is_empty())
        .take(MAX_LINES)
    {
        if out.len() + line.len() > MAX_CHARS {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    if out.is_empty() {
        "go build failed without output".to_owned()
    } else {
        out.trim_end().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(env: &[&str], flags: &[&str], ldflags: &[&str]) -> BuildOptions {
        let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect();
        BuildOptions {
            env: v(env),
            flags: v(flags),
            ldflags: v(ldflags),
        }
    }

    #[test]
    fn harmless_options_pass() {
        let Checked { args, env } = opts(
            &["GOAMD64=v3", "CGO_ENABLED=0"],
            &["-tags", "netgo", "-trimpath"],
            &["-s -w", "-X main.version=1.2"],
        )
        .checked()
        .unwrap();
        assert_eq!(
            args,
            [
                "-tags=netgo",
                "-trimpath",
                "-ldflags=-s -w -X=main.version=1.2"
            ]
        );
        assert_eq!(env, [("GOAMD64".to_owned(), "v3".to_owned())]);
    }

    #[test]
    fn options_that_run_programs_or_read_files_are_refused() {
        for o in [
            opts(&[], &["-toolexec=/bin/sh"], &[]),
            opts(&[], &["--toolexec", "/bin/sh"], &[]),
            opts(&[], &["-overlay=/etc/overlay.json"], &[]),
            opts(&[], &["-modfile=/tmp/go.mod"], &[]),
            opts(&[], &["-gcflags=-importcfg=/etc/x"], &[]),
            opts(&["CC=/bin/sh"], &[], &[]),
            opts(&["GOFLAGS=-toolexec=/bin/sh"], &[], &[]),
            opts(&["CGO_ENABLED=1"], &[], &[]),
            opts(&[], &[], &["-linkmode=external -extld=/bin/sh"]),
            opts(&[], &[], &["-X main.v={{.Env.SECRET}}"]),
            opts(&[], &["trimpath"], &[]),
        ] {
            assert!(o.checked().is_err(), "{o:?}");
        }
    }

    #[test]
    fn arm_variants_set_goarm() {
        let t = Target {
            os: "linux".into(),
            arch: "arm".into(),
            variant: Some("v7".into()),
        };
        assert!(t.env().unwrap().contains(&("GOARM".into(), "7".into())));
        let bad = Target {
            os: "linux;rm".into(),
            arch: "amd64".into(),
            variant: None,
        };
        assert!(bad.env().is_err());
        let escaping = Target {
            os: "linux".into(),
            arch: "arm64".into(),
            variant: Some("x/../../../../etc/cron.d/p".into()),
        };
        assert!(escaping.env().is_err());
    }

    #[test]
    fn error_output_keeps_the_compiler_lines() {
        let stderr = b"go: downloading example.com/x v1.0.0\n# example.com/broken\n./main.go:5:2: undefined: nope\n";
        assert_eq!(
            first_errors(stderr),
            "# example.com/broken\n./main.go:5:2: undefined: nope"
        );
    }
}
