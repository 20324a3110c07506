//! The one shared test-support module (with `images` and `upstream`): an in-process registry, the real
//! server binary, dockerd and skopeo, and an HTTP client, each started on
//! first use and stopped by `teardown`.

pub mod gcs;
pub mod images;
pub mod sumdb;
pub mod upstream;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use kontain::config::{Config, Origin};
use kontain::registry::Registry;
use libtest_mimic::Trial;

/// A trial whose body returns `anyhow::Result`, its error printed in full.
pub fn trial(name: &str, test: fn() -> anyhow::Result<()>) -> Trial {
    trial_with(name, test)
}

/// As [`trial`], for a body that carries its own values (one test run
/// against several backends, say).
pub fn trial_with(name: &str, test: impl FnOnce() -> anyhow::Result<()> + Send + 'static) -> Trial {
    Trial::test(name, move || test().map_err(|e| format!("{e:?}").into()))
}

/// The async runtime every trial shares.
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// A compiled plugin from `plugins/` (fixtures included).
pub fn plugin_path(crate_name: &str) -> PathBuf {
    Path::new(env!("KONTAIN_PLUGINS_DIR")).join(format!("{}.wasm", crate_name.replace('-', "_")))
}

/// Every manifest type the suite's clients accept, as docker sends them.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// A config with filesystem storage in `data` and only `random`.
pub const RANDOM: &str = "[storage]\nbackend = \"filesystem\"\npath = \"data\"\n\
    [generators.random]\nsource = \"builtin:random\"\ngrants = [\"random\"]\n";

/// The error codes of the distribution spec v1.1; no answer has another.
pub const SPEC_CODES: [&str; 14] = [
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
];

pub struct Reply {
    /// What was asked, `METHOD path`, for failure messages.
    pub request: String,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("body is not JSON: {:?}", self.body))
    }

    /// The first OCI error's code and message. Every error any trial reads
    /// is checked here: its code is one of the spec's, and a 405 says what
    /// is allowed.
    pub fn error(&self) -> anyhow::Result<(String, String)> {
        let v = self.json()?;
        let e = &v["errors"][0];
        let code = e["code"].as_str().context("no error code")?.to_owned();
        ensure!(
            SPEC_CODES.contains(&code.as_str()),
            "{}: error code {code} is not one of the distribution spec's",
            self.request
        );
        ensure!(
            self.status != StatusCode::METHOD_NOT_ALLOWED || self.headers.contains_key("allow"),
            "{}: a 405 without Allow",
            self.request
        );
        Ok((
            code,
            e["message"]
                .as_str()
                .context("no error message")?
                .to_owned(),
        ))
    }

    /// The message of an OCI error answer; an error unless the status and
    /// the first error's code are the ones given.
    pub fn expect_error(&self, status: StatusCode, code: &str) -> anyhow::Result<String> {
        ensure!(
            self.status == status,
            "{}: status {} where {status} was expected: {:?}",
            self.request,
            self.status,
            self.body
        );
        let (got, message) = self.error()?;
        ensure!(
            got == code,
            "{}: error code {got} where {code} was expected: {message}",
            self.request
        );
        Ok(message)
    }
}

/// A registry built from a config, answering requests without a socket.
pub struct InProcess {
    pub registry: Arc<Registry>,
    /// Holds the storage directory for as long as the registry lives.
    _dir: tempfile::TempDir,
}

impl InProcess {
    /// `generators` is TOML for the `[generators.*]` tables; storage goes in a
    /// temporary directory and `kontain.test` is the routing domain.
    pub fn new(generators: &str) -> anyhow::Result<InProcess> {
        let dir = tempfile::tempdir()?;
        let text = format!(
            "[server]\ndomains = [\"kontain.test\"]\n[storage]\nbackend = \"filesystem\"\npath = {:?}\n{generators}",
            dir.path().join("data")
        );
        let config = Config::parse(&text, Origin::BuiltIn)?;
        let registry = rt().block_on(kontain::build(&config))?.registry;
        Ok(InProcess {
            registry,
            _dir: dir,
        })
    }

    /// The built-in `random` generator as the default config has it.
    pub fn random() -> anyhow::Result<InProcess> {
        InProcess::new("[generators.random]\nsource = \"builtin:random\"\ngrants = [\"random\"]\n")
    }

    pub fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let asked = format!("{method} {path}");
        let mut builder = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        // HTTP/1.1 requires one Host; the trial names one when it matters.
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            builder = builder.header("host", "127.0.0.1");
        }
        let request = builder.body(())?;
        rt().block_on(async {
            let response = self.registry.handle(request).await;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok(Reply {
                request: asked,
                status: parts.status,
                headers: parts.headers,
                body,
            })
        })
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.request(Method::GET, path, &[])
    }

    pub fn head(&self, path: &str) -> anyhow::Result<Reply> {
        self.request(Method::HEAD, path, &[])
    }

    /// `GET` that must be refused: see [`Reply::expect_error`].
    pub fn refused(&self, path: &str, status: StatusCode, code: &str) -> anyhow::Result<String> {
        self.get(path)?.expect_error(status, code)
    }
}

/// An HTTP/1.1 request to a real server.
pub fn http(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    http_with_body(addr, method, path, headers, Bytes::new())
}

/// `GET` accepting every manifest type.
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Reply> {
    http(addr, Method::GET, path, &[("accept", ACCEPT_ALL)])
}

/// [`get`] that must be refused: see [`Reply::expect_error`].
pub fn refused(
    addr: SocketAddr,
    path: &str,
    status: StatusCode,
    code: &str,
) -> anyhow::Result<String> {
    get(addr, path)?.expect_error(status, code)
}

/// As [`http`], sending `body`.
pub fn http_with_body(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<Reply> {
    let asked = format!("{method} {path}");
    rt().block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string());
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let response = sender.send_request(builder.body(Full::new(body))?).await?;
        let (parts, body) = response.into_parts();
        Ok(Reply {
            request: asked,
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await?.to_bytes(),
        })
    })
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn wait_for_port(addr: SocketAddr, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status} before listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not listen on {addr} within 60s")
}

/// The real `kontain` binary, stopped when dropped.
pub struct Server {
    pub addr: SocketAddr,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Server {
    /// Starts the binary in a fresh directory. With `config`, that TOML is
    /// written to `kontain.toml` there (and found as `./kontain.toml`);
    /// without, the built-in default is used. `PORT` picks the port.
    pub fn start(config: Option<&str>) -> anyhow::Result<Server> {
        Server::start_with_env(config, &[])
    }

    /// As [`Server::start`], with `env` added to the server's environment.
    pub fn start_with_env(config: Option<&str>, env: &[(&str, &str)]) -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        if let Some(config) = config {
            std::fs::write(dir.path().join("kontain.toml"), config)?;
        }
        Server::start_in(dir, env)
    }

    /// Stops the server and starts it again in the same directory (same
    /// config, same storage), with a fresh log.
    pub fn restart(self) -> anyhow::Result<Server> {
        self.restart_after(|_| Ok(()))
    }

    /// As [`Server::restart`], running `between` on the server's directory
    /// while it is stopped.
    pub fn restart_after(
        self,
        between: impl FnOnce(&std::path::Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<Server> {
        self.restart_after_with_env(&[], between)
    }

    /// As [`Server::restart_after`], the new process with `env` added.
    pub fn restart_after_with_env(
        mut self,
        env: &[(&str, &str)],
        between: impl FnOnce(&std::path::Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<Server> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::TempDir::new()?;
        let dir = std::mem::replace(&mut self.dir, dir);
        between(dir.path())?;
        Server::start_in(dir, env)
    }

    fn start_in(dir: tempfile::TempDir, env: &[(&str, &str)]) -> anyhow::Result<Server> {
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_kontain"))
            .current_dir(dir.path())
            .env("PORT", port.to_string())
            .env("RUST_LOG", "info")
            // Metrics listen on a fixed port by default: off, unless a
            // trial asks for them, so that servers can run side by side.
            .env("KONTAIN_METRICS_LISTEN", "")
            .envs(env.iter().copied())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting kontain")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if let Err(e) = wait_for_port(addr, &mut child, "kontain") {
            let _ = child.kill();
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            bail!("{e}\nserver log:\n{log}");
        }
        Ok(Server { addr, child, dir })
    }

    /// A server started some other way (see `hostile`).
    pub fn from_parts(addr: SocketAddr, child: Child, dir: tempfile::TempDir) -> Server {
        Server { addr, child, dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the server to exit (after a [`kill`]).
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn head(&self, path: &str) -> anyhow::Result<Reply> {
        http(self.addr, Method::HEAD, path, &[])
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server shared by one module's trials: started with `config()` on first
/// use, stopped at the end of the suite.
pub fn shared(
    cell: &'static OnceLock<Result<Server, String>>,
    config: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<&'static Server> {
    started_once(cell, || Server::start(Some(&config()?)), |s| kill(s.pid()))
}

/// Something held in a static and started on first use; a failure to start
/// is kept, so every trial that needs it reports it. Statics are never
/// dropped, so `stop` runs at the end of the suite instead.
pub fn started_once<T: Send + Sync + 'static>(
    cell: &'static OnceLock<Result<T, String>>,
    start: impl FnOnce() -> anyhow::Result<T>,
    stop: fn(&T),
) -> anyhow::Result<&'static T> {
    cell.get_or_init(|| {
        register_cleanup(Box::new(move || {
            if let Some(Ok(value)) = cell.get() {
                stop(value);
            }
        }));
        start().map_err(|e| format!("{e:?}"))
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// `kill <pid>`: SIGTERM, so that the process can shut down cleanly.
pub fn kill(pid: u32) {
    let _ = Command::new("kill").arg(pid.to_string()).status();
}

/// `GET` accepting every manifest type; an error (with the server's log)
/// unless the answer is 200.
pub fn get_ok(server: &Server, path: &str) -> anyhow::Result<Reply> {
    let reply = get(server.addr, path)?;
    anyhow::ensure!(
        reply.status == StatusCode::OK,
        "GET {path}: {} {:?}\nserver log:\n{}",
        reply.status,
        reply.body,
        server.log()
    );
    Ok(reply)
}

/// [`get_ok`] of the blob that `descriptor` (a manifest's `config`, or one
/// of its `layers`) names, from `repo` (the name after `/v2/`).
pub fn get_blob(
    server: &Server,
    repo: &str,
    descriptor: &serde_json::Value,
) -> anyhow::Result<Reply> {
    let digest = descriptor["digest"]
        .as_str()
        .with_context(|| format!("no digest in {descriptor}"))?;
    get_ok(server, &format!("/v2/{repo}/blobs/{digest}"))
}

/// One server with the built-in default config, shared by the pull trials.
pub fn shared_server() -> anyhow::Result<&'static Server> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    started_once(&SERVER, || Server::start(None), |s| kill(s.pid()))
}

/// A private dockerd, as the brief prescribes: vfs storage, no iptables, no
/// bridge, every path under a temporary directory.
pub struct Docker {
    dir: tempfile::TempDir,
    child: Mutex<Child>,
}

impl Docker {
    fn start() -> anyhow::Result<Docker> {
        let dir = tempfile::Builder::new()
            .prefix("kontain-dockerd")
            .tempdir()?;
        let d = dir.path();
        std::fs::write(d.join("daemon.json"), "{}")?;
        let log = std::fs::File::create(d.join("dockerd.log"))?;
        let mut child = Command::new("dockerd")
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .args([
                "--storage-driver=vfs",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
            ])
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd (apt-get install docker.io)")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let docker = loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(d.join("dockerd.log")).unwrap_or_default();
                bail!("dockerd exited with {status}:\n{log}");
            }
            let probe = Command::new("docker")
                .arg("-H")
                .arg(format!("unix://{}", d.join("docker.sock").display()))
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if probe.success() {
                break Docker {
                    dir,
                    child: Mutex::new(child),
                };
            }
            ensure!(
                Instant::now() < deadline,
                "dockerd did not come up within 60s"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        Ok(docker)
    }

    /// `docker` aimed at this daemon, to add arguments to.
    pub fn command(&self) -> Command {
        let mut command = Command::new("docker");
        command.arg("-H").arg(format!(
            "unix://{}",
            self.dir.path().join("docker.sock").display()
        ));
        command
    }

    /// Runs `docker <args>` against this daemon; its stdout, or an error with
    /// its stderr.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command().args(args).output()?;
        stdout_of(out, &format!("docker {}", args.join(" ")))
    }

    /// How many layers a pulled image has.
    pub fn layer_count(&self, image: &str) -> anyhow::Result<usize> {
        let n = self.run(&[
            "image",
            "inspect",
            "--format",
            "{{len .RootFS.Layers}}",
            image,
        ])?;
        Ok(n.trim().parse()?)
    }

    /// The error of a `docker pull` of `what` that must fail, printed too
    /// since it is what a user would read; an error if the pull succeeds.
    pub fn pull_error(&self, image: &str, what: &str) -> anyhow::Result<String> {
        let message = match self.run(&["pull", image]) {
            Ok(out) => bail!("docker pull of {what} succeeded where it must fail: {out}"),
            Err(e) => e.to_string(),
        };
        eprintln!("docker pull of {what}: {message}");
        Ok(message)
    }

    /// Runs `image` without a network, then removes it so that the daemon's
    /// storage does not grow with every trial; the container's stdout.
    pub fn run_image(&self, image: &str) -> anyhow::Result<String> {
        let output = self.run(&["run", "--rm", "--network", "none", image])?;
        self.run(&["rmi", image])?;
        Ok(output)
    }

    fn stop(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        kill(child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut stopped = false;
        while !stopped && Instant::now() < deadline {
            stopped = matches!(child.try_wait(), Ok(Some(_)));
            std::thread::sleep(Duration::from_millis(100));
        }
        if !stopped {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The daemon's images (gigabytes, with vfs) go with it: the static
        // holding this directory is never dropped.
        let _ = Command::new("umount")
            .arg(self.dir.path().join("exec/netns/default"))
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }
}

pub fn docker() -> anyhow::Result<&'static Docker> {
    static DOCKER: OnceLock<Result<Docker, String>> = OnceLock::new();
    started_once(&DOCKER, Docker::start, Docker::stop)
}

/// Runs `skopeo <args>`; its stdout, or an error with its stderr.
pub fn skopeo(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .context("running skopeo (apt-get install skopeo)")?;
    stdout_of(out, &format!("skopeo {}", args.join(" ")))
}

/// The tags `skopeo inspect` lists for `image` (`host/name:tag`), which it
/// reads from the registry's tag list, following its pages.
pub fn skopeo_repo_tags(image: &str) -> anyhow::Result<serde_json::Value> {
    let out = skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ])?;
    let out: serde_json::Value = serde_json::from_str(&out)?;
    Ok(out["RepoTags"].clone())
}

/// Checks an SPDX document with SPDX's own validator (spdx-tools, which
/// tests/run.sh installs).
pub fn validate_spdx(file: &Path) -> anyhow::Result<()> {
    run(Command::new("python3")
        .args(["-m", "spdx_tools.spdx.clitools.pyspdxtools", "--infile"])
        .arg(file))
    .map(drop)
}

/// A 30 MB tmpfs mounted on a temporary directory (needs root); unmounted
/// when dropped.
pub struct Tmpfs(pub tempfile::TempDir);

impl Tmpfs {
    pub fn mount() -> anyhow::Result<Tmpfs> {
        let dir = tempfile::tempdir()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=30m", "kontain-test"])
            .arg(dir.path())
            .status()?;
        ensure!(status.success(), "mounting a tmpfs (needs root)");
        Ok(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// Runs a command; its stdout, or an error with its stderr.
pub fn run(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    stdout_of(out, &format!("{command:?}"))
}

/// A finished command's stdout, or an error naming the command (`what`)
/// with its stderr.
fn stdout_of(out: std::process::Output, what: &str) -> anyhow::Result<String> {
    ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

type Cleanup = Box<dyn FnOnce() + Send>;

fn cleanups() -> &'static Mutex<Vec<Cleanup>> {
    static CLEANUPS: OnceLock<Mutex<Vec<Cleanup>>> = OnceLock::new();
    CLEANUPS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Runs `f` at the end of the suite: for processes held in statics, which
/// are never dropped.
pub fn register_cleanup(f: Cleanup) {
    cleanups().lock().unwrap_or_else(|p| p.into_inner()).push(f);
}

/// Stops everything the trials started.
pub fn teardown() {
    let list = std::mem::take(&mut *cleanups().lock().unwrap_or_else(|p| p.into_inner()));
    for f in list {
        f();
    }
}

/// sha256 of bytes, as `sha256:<hex>`.
pub fn sha256(bytes: &[u8]) -> String {
    kontain::oci::Digest::sha256(bytes).to_string()
}
