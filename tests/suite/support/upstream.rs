//! The upstream side of mirror tests: Debian's `docker-registry` on loopback,
//! and a proxy in front of it that counts blob downloads and injects faults
//! (a flipped byte, a dead upstream, a redirect to somewhere forbidden).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::{free_port, rt, skopeo, wait_for_port};

/// A `docker-registry` process with its own storage, stopped when dropped.
pub struct UpstreamRegistry {
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl UpstreamRegistry {
    pub fn start() -> anyhow::Result<UpstreamRegistry> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry (apt-get install docker-registry)")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_for_port(addr, &mut child, "docker-registry")?;
        Ok(UpstreamRegistry {
            addr,
            child,
            _dir: dir,
        })
    }

    /// Pushes an OCI layout's `tag` as `repo:tag`; `format` is skopeo's
    /// `--format` (`oci` or `v2s2`), `None` keeps it as written (and copies
    /// every platform of an index).
    pub fn push(
        &self,
        layout: &std::path::Path,
        tag: &str,
        repo: &str,
        format: Option<&str>,
    ) -> anyhow::Result<()> {
        let src = format!("oci:{}:{tag}", layout.display());
        let dest = format!("docker://{}/{repo}:{tag}", self.addr);
        let mut args = vec!["copy", "--dest-tls-verify=false"];
        match format {
            Some(f) => args.extend(["--format", f]),
            None => args.extend(["--all", "--preserve-digests"]),
        }
        args.extend([src.as_str(), dest.as_str()]);
        skopeo(&args).map(drop)
    }
}

impl UpstreamRegistry {
    /// Uploads `bytes` as a blob of `repo` (the push API, monolithic); its
    /// digest.
    pub fn push_blob(&self, repo: &str, bytes: &[u8]) -> anyhow::Result<String> {
        let digest = crate::support::sha256(bytes);
        let start = crate::support::http_with_body(
            self.addr,
            http::Method::POST,
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Bytes::new(),
        )?;
        anyhow::ensure!(
            start.status == StatusCode::ACCEPTED,
            "upload: {}",
            start.status
        );
        let location = start.header("location");
        let path = match location.find("/v2/") {
            Some(at) => &location[at..],
            None => location,
        };
        let separator = if path.contains('?') { '&' } else { '?' };
        let put = crate::support::http_with_body(
            self.addr,
            http::Method::PUT,
            &format!("{path}{separator}digest={digest}"),
            &[("content-type", "application/octet-stream")],
            Bytes::copy_from_slice(bytes),
        )?;
        anyhow::ensure!(
            put.status == StatusCode::CREATED,
            "upload: {} {:?}",
            put.status,
            put.body
        );
        Ok(digest)
    }

    /// Puts `manifest` (of `media_type`) as `repo:reference`; its digest.
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        manifest: &serde_json::Value,
    ) -> anyhow::Result<String> {
        let bytes = Bytes::from(serde_json::to_vec(manifest)?);
        let digest = crate::support::sha256(&bytes);
        let reference = if reference.is_empty() {
            digest.as_str()
        } else {
            reference
        };
        let put = crate::support::http_with_body(
            self.addr,
            http::Method::PUT,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("content-type", media_type)],
            bytes,
        )?;
        anyhow::ensure!(
            put.status == StatusCode::CREATED,
            "PUT {repo}:{reference}: {} {:?}",
            put.status,
            put.body
        );
        Ok(digest)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for UpstreamRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct ProxyState {
    blob_gets: Mutex<HashMap<String, usize>>,
    /// Manifest requests, by `<METHOD> <path>`.
    manifest_requests: Mutex<HashMap<String, usize>>,
    corrupt_blobs: AtomicBool,
    down: AtomicBool,
    redirect_blobs_to: Mutex<Option<String>>,
    /// Blob bodies trickle out in this many pieces this far apart.
    slow_blobs: Mutex<Option<(usize, std::time::Duration)>>,
    /// When the first piece of a trickled body went out.
    first_piece_at: Mutex<Option<std::time::Instant>>,
    /// Manifest requests are answered after this long.
    slow_manifests: Mutex<Option<std::time::Duration>>,
    /// When set, requests need `Bearer <TOKEN>`; 401s name this realm.
    token_realm: Mutex<Option<String>>,
    tokens_issued: AtomicUsize,
    /// Blob bodies go on with zeros for ever after the real bytes.
    endless_blobs: AtomicBool,
    /// Bytes of endless bodies sent so far.
    endless_sent: Arc<std::sync::atomic::AtomicU64>,
    /// Manifest requests are answered with this status and body.
    manifest_answer: Mutex<Option<(u16, &'static str)>>,
}

/// The one token the proxy's token service issues.
const TOKEN: &str = "kontain-test-token";

/// A loopback HTTP proxy in front of an upstream registry.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> anyhow::Result<Proxy> {
        let state = Arc::new(ProxyState::default());
        let listener = rt().block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let shared = state.clone();
        let task = rt().spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if shared.down.load(Ordering::SeqCst) {
                    drop(stream); // as good as a dead upstream
                    continue;
                }
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| forward(state.clone(), upstream, req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Proxy { addr, state, task })
    }

    /// How many times each blob digest was downloaded (GET) through the proxy.
    pub fn blob_gets(&self) -> HashMap<String, usize> {
        self.state
            .blob_gets
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// How many times each `<METHOD> <path>` of a manifest was asked for.
    pub fn manifest_requests(&self) -> HashMap<String, usize> {
        self.state
            .manifest_requests
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    pub fn set_corrupt_blobs(&self, on: bool) {
        self.state.corrupt_blobs.store(on, Ordering::SeqCst);
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Demand a Bearer token, obtained from `realm` (`None`: no auth). The
    /// proxy serves a token service itself at `/token`.
    pub fn require_token(&self, realm: Option<String>) {
        if let Ok(mut r) = self.state.token_realm.lock() {
            *r = realm;
        }
    }

    pub fn tokens_issued(&self) -> usize {
        self.state.tokens_issued.load(Ordering::SeqCst)
    }

    /// Send blob bodies in eight pieces, `pause` before each (`None`: at once).
    pub fn set_slow_blobs(&self, pause: Option<std::time::Duration>) {
        self.set_trickle(pause.map(|p| (8, p)));
    }

    /// Send blob bodies in `pieces`, `pause` before each (`None`: at once).
    pub fn set_trickle(&self, trickle: Option<(usize, std::time::Duration)>) {
        if let Ok(mut s) = self.state.slow_blobs.lock() {
            *s = trickle;
        }
    }

    /// Answer manifest requests after `pause` (`None`: at once).
    pub fn set_slow_manifests(&self, pause: Option<std::time::Duration>) {
        if let Ok(mut s) = self.state.slow_manifests.lock() {
            *s = pause;
        }
    }

    /// When the first piece of the last trickled body went out.
    pub fn first_piece_at(&self) -> Option<std::time::Instant> {
        self.state.first_piece_at.lock().ok().and_then(|t| *t)
    }

    /// Follow every blob body with zeros, for ever (a hostile upstream).
    pub fn set_endless_blobs(&self, on: bool) {
        self.state.endless_blobs.store(on, Ordering::SeqCst);
    }

    /// How many bytes of endless bodies the proxy has sent.
    pub fn endless_sent(&self) -> u64 {
        self.state.endless_sent.load(Ordering::SeqCst)
    }

    /// Answer manifest requests with `status` and `body` (`None`: forward).
    pub fn answer_manifests(&self, answer: Option<(u16, &'static str)>) {
        if let Ok(mut a) = self.state.manifest_answer.lock() {
            *a = answer;
        }
    }

    /// Answer blob GETs with a redirect to `base` + the original path.
    pub fn redirect_blobs_to(&self, base: Option<String>) {
        if let Ok(mut r) = self.state.redirect_blobs_to.lock() {
            *r = base;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    state: Arc<ProxyState>,
    upstream: SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> anyhow::Result<Response<BoxBody<Bytes, Infallible>>> {
    if state.down.load(Ordering::SeqCst) {
        // Also on connections opened before the upstream "went down".
        anyhow::bail!("upstream is down");
    }
    if req.uri().path() == "/token" {
        state.tokens_issued.fetch_add(1, Ordering::SeqCst);
        let body = format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#);
        return Ok(Response::new(Full::new(Bytes::from(body)).boxed()));
    }
    let realm = state.token_realm.lock().ok().and_then(|r| r.clone());
    let authorized = req
        .headers()
        .get("authorization")
        .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
    if let Some(realm) = realm
        && !authorized
    {
        return Ok(Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(
                "www-authenticate",
                format!(
                    r#"Bearer realm="{realm}",service="kontain-test",scope="repository:x:pull""#
                ),
            )
            .body(Full::new(Bytes::from_static(b"{}")).boxed())?);
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let is_blob_get = req.method() == http::Method::GET && path.contains("/blobs/sha256:");
    if path.contains("/manifests/") {
        if let Ok(mut counts) = state.manifest_requests.lock() {
            *counts
                .entry(format!("{} {path}", req.method()))
                .or_default() += 1;
        }
        let pause = state.slow_manifests.lock().ok().and_then(|p| *p);
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    let answer = state.manifest_answer.lock().ok().and_then(|a| *a);
    if let Some((status, body)) = answer
        && path.contains("/manifests/")
    {
        return Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())).boxed())?);
    }
    if is_blob_get {
        let redirect = state.redirect_blobs_to.lock().ok().and_then(|r| r.clone());
        if let Some(base) = redirect {
            return Ok(Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header("location", format!("{base}{path}"))
                .body(Full::new(Bytes::new()).boxed())?);
        }
        let digest = path.rsplit('/').next().unwrap_or_default().to_owned();
        if let Ok(mut counts) = state.blob_gets.lock() {
            *counts.entry(digest).or_default() += 1;
        }
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let stream = tokio::net::TcpStream::connect(upstream).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut out = Request::builder().method(parts.method).uri(&path);
    for (k, v) in &parts.headers {
        if k != "host" {
            out = out.header(k, v);
        }
    }
    let response = sender
        .send_request(
            out.header("host", upstream.to_string())
                .body(Full::new(body))?,
        )
        .await?;
    let (parts, body) = response.into_parts();
    let mut body = body.collect().await?.to_bytes().to_vec();
    if is_blob_get
        && parts.status == StatusCode::OK
        && state.corrupt_blobs.load(Ordering::SeqCst)
        && let Some(last) = body.last_mut()
    {
        *last ^= 0xff;
    }
    if is_blob_get && parts.status == StatusCode::OK && state.endless_blobs.load(Ordering::SeqCst) {
        let mut parts = parts;
        parts.headers.remove("content-length");
        let sent = state.endless_sent.clone();
        let zeros = Bytes::from(vec![0u8; 16 * 1024]);
        let head = futures_util::stream::once(async move { Bytes::from(body) });
        let tail = futures_util::stream::repeat(zeros);
        let stream = head.chain(tail).then(move |chunk| {
            let sent = sent.clone();
            async move {
                sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                tokio::task::yield_now().await;
                Ok::<_, Infallible>(Frame::data(chunk))
            }
        });
        return Ok(Response::from_parts(
            parts,
            BodyExt::boxed(StreamBody::new(stream)),
        ));
    }
    let slow = *state
        .slow_blobs
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    if is_blob_get
        && parts.status == StatusCode::OK
        && let Some((count, pause)) = slow
    {
        // Pieces, each after a pause: a download that is visibly in
        // progress for a while.
        let piece = body.len().div_ceil(count).max(1);
        let pieces: Vec<Bytes> = body.chunks(piece).map(Bytes::copy_from_slice).collect();
        let state = state.clone();
        let stream =
            futures_util::stream::iter(pieces.into_iter().enumerate()).then(move |(n, p)| {
                let state = state.clone();
                async move {
                    tokio::time::sleep(pause).await;
                    if n == 0
                        && let Ok(mut at) = state.first_piece_at.lock()
                    {
                        *at = Some(std::time::Instant::now());
                    }
                    Ok::<_, Infallible>(Frame::data(p))
                }
            });
        return Ok(Response::from_parts(
            parts,
            BodyExt::boxed(StreamBody::new(stream)),
        ));
    }
    Ok(Response::from_parts(
        parts,
        Full::new(Bytes::from(body)).boxed(),
    ))
}

/// A listener that only counts connections, to prove none were made.
pub struct ConnectionCounter {
    pub addr: SocketAddr,
    count: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectionCounter {
    pub fn start() -> anyhow::Result<ConnectionCounter> {
        let listener = rt().block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let count = Arc::new(AtomicUsize::new(0));
        let counted = count.clone();
        let task = rt().spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Ok(ConnectionCounter { addr, count, task })
    }

    pub fn connections(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for ConnectionCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}
