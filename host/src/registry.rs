//! The OCI distribution API, pull side, over HTTP: routes, handlers, the
//! mapping of every failure to an OCI error response (`response`), which
//! names answer from storage (`admitted`), and the connections it keeps and
//! sheds (`connections`).
//!
//! Sees generators only through the `generator::Generators` trait (and its
//! one error type, whose kinds `response` maps to statuses and OCI codes)
//! and storage only through the content store; knows nothing of wasm or of
//! any capability.

mod admitted;
mod connections;
mod endpoint;
mod page;
mod referrers;
mod response;
mod tags;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::generator::{ErrorKind, GeneratorError, Generators, ResolveRequest};
use crate::oci::{Digest, Reference, RepositoryName};
use crate::storage::{BlobContent, ByteRange, ContentStore, StoredManifest};
pub use connections::Limits;
use endpoint::Endpoint;
pub use page::About;
pub use response::{ApiError, Body};
use response::{empty, full, stream};

const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

/// The header naming a request in the logs: the client's (or its load
/// balancer's) if it sent a sensible one, else one of ours.
const REQUEST_ID: &str = "x-request-id";

/// The address a request came from, put in its extensions by `serve`.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

/// The request's id: the client's `X-Request-Id` when it is short and plain,
/// else 16 random hex digits.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
}

pub struct Registry {
    storage: Arc<ContentStore>,
    generators: Arc<dyn Generators>,
    admitted: admitted::Admitted,
    pages: page::Pages,
    fair: Arc<crate::fair::Fairness>,
    /// How long a manifest request waits for its build (`[server] hold`).
    hold: Duration,
    /// Resolutions that outlasted `hold`, by request: the clients told to
    /// come back join them.
    held: Arc<Mutex<HashMap<String, futures_util::future::Shared<Resolution>>>>,
    /// The last readiness answer and when it was found.
    readiness: tokio::sync::Mutex<Option<(Instant, Result<(), &'static str>)>>,
}

/// A manifest being resolved in a task of its own.
type Resolution = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<StoredManifest, GeneratorError>> + Send>,
>;

/// How long a readiness answer is given again, and how long a storage probe
/// may take.
const READY_FOR: Duration = Duration::from_secs(2);

/// The `Retry-After` of a request answered before its build ended: short,
/// since containers/image (podman, skopeo) waits exactly that long before
/// it asks again, and each ask waits up to `hold` once more.
const HOLD_RETRY: Duration = Duration::from_secs(10);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl Registry {
    pub fn new(storage: Arc<ContentStore>, generators: Arc<dyn Generators>) -> Self {
        Registry {
            storage,
            generators,
            admitted: Default::default(),
            pages: Default::default(),
            fair: Arc::new(crate::fair::Fairness::new(&Default::default())),
            hold: crate::config::server::ServerConfig::default().hold,
            held: Default::default(),
            readiness: Default::default(),
        }
    }

    /// This registry, holding clients to budgets and queueing builds with
    /// `fair`.
    pub fn with_fairness(mut self, fair: crate::fair::Fairness) -> Self {
        self.fair = Arc::new(fair);
        self
    }

    /// This registry, answering manifest requests whose build takes longer
    /// than `hold` with 429 and `Retry-After` (zero: never).
    pub fn with_hold(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    /// This registry, describing its storage as `about` on the landing page.
    pub fn with_about(mut self, about: About) -> Self {
        self.pages = page::Pages::new(about);
        self
    }

    /// Answers one request. Never fails: errors become OCI error responses.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Body> {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let request_id = request_id(request.headers());
        let query = request.uri().query().unwrap_or_default().to_owned();
        // At error level, so that a filter that keeps only warnings still
        // keeps the request's fields on them.
        let span = tracing::error_span!(
            "request",
            %request_id,
            %method,
            %path,
            %query,
            generator = tracing::field::Empty,
            repository = tracing::field::Empty,
            reference = tracing::field::Empty
        );
        let client = request
            .extensions()
            .get::<Peer>()
            .map(|p| self.fair.client(p.0.ip(), request.headers()));
        let handled = async {
            if let Some(client) = client {
                crate::activity::set_client(client);
            }
            let head = method == Method::HEAD;
            let mut headers = request.headers().clone();
            // HTTP/2 carries the host in the URI's authority, not a Host header.
            if !headers.contains_key(header::HOST)
                && let Some(authority) = request.uri().authority()
                && let Ok(value) = authority.as_str().parse()
            {
                headers.insert(header::HOST, value);
            }
            // RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host; which
            // generator answers may depend on it.
            let hosts = request.headers().get_all(header::HOST).iter().count();
            let query = request.uri().query().unwrap_or_default();
            let result = match request.version() == http::Version::HTTP_11 && hosts != 1 {
                true => Err(ApiError::BadRequest(match hosts {
                    0 => "the request has no Host header".into(),
                    _ => "the request has more than one Host header".into(),
                })),
                false => self.dispatch(&method, &path, query, &headers).await,
            };
            let mut response = match result {
                Ok(response) => response,
                Err(error) => error.into_response(head, endpoint::parse(&path).subject()),
            };
            response
                .headers_mut()
                .insert(API_VERSION.0, http::HeaderValue::from_static(API_VERSION.1));
            if let Ok(id) = http::HeaderValue::from_str(&request_id) {
                response.headers_mut().insert(REQUEST_ID, id);
            }
            // The access line: one per request, when its headers go out (a
            // streamed body's size is the one it declares).
            let bytes = match head {
                true => 0,
                false => http_body::Body::size_hint(response.body())
                    .exact()
                    .or_else(|| {
                        response
                            .headers()
                            .get(header::CONTENT_LENGTH)
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                    })
                    .unwrap_or_default(),
            };
            let status = response.status().as_u16();
            let latency_seconds = started.elapsed().as_secs_f64();
            crate::metrics::request(
                &crate::activity::generator(),
                &method,
                status,
                latency_seconds,
            );
            let user_agent = headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let remote_ip = request
                .extensions()
                .get::<Peer>()
                .map(|p| p.0.ip().to_string())
                .unwrap_or_default();
            // Probes come every few seconds: kept out of the default log.
            if path == "/healthz" || path == "/readyz" {
                tracing::debug!(
                    access = true,
                    status,
                    bytes,
                    latency_seconds,
                    user_agent,
                    remote_ip,
                    "served"
                );
            } else {
                tracing::info!(
                    access = true,
                    status,
                    bytes,
                    latency_seconds,
                    user_agent,
                    remote_ip,
                    "served"
                );
            }
            response
        }
        .instrument(span);
        crate::activity::scope(handled).await
    }

    async fn dispatch(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
    ) -> Result<Response<Body>, ApiError> {
        let readable = method == Method::GET || method == Method::HEAD;
        match endpoint::parse(path) {
            Endpoint::Outside if readable && path == "/" => {
                let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
                let site = self.generators.site();
                let page = self.pages.landing(&self.storage, &site, host).await;
                Ok(html(StatusCode::OK, page))
            }
            Endpoint::Outside if readable && path.starts_with("/i/") => {
                Ok(self.image_page(&path["/i/".len()..], headers).await)
            }
            // Health, outside the API: alive, and able to serve.
            Endpoint::Outside if readable && path == "/healthz" => {
                Ok(plain(StatusCode::OK, "ok\n"))
            }
            Endpoint::Outside if readable && path == "/readyz" => Ok(match self.ready().await {
                Ok(()) => plain(StatusCode::OK, "ready\n"),
                Err(why) => plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            }),
            Endpoint::Outside => Err(ApiError::NotFound(format!(
                "{path} is not part of the registry API"
            ))),
            Endpoint::Base if readable => Ok(json_ok(b"{}")),
            Endpoint::Manifest { name, reference } if readable => {
                self.manifest(name, reference, headers, method == Method::HEAD)
                    .await
            }
            Endpoint::Blob { name, digest } if readable => {
                self.blob(name, digest, headers, method == Method::HEAD)
                    .await
            }
            Endpoint::TagsList { name } if readable => {
                self.tags(name, query, headers, method == Method::HEAD)
                    .await
            }
            Endpoint::Referrers { name, digest } if readable => {
                self.referrers(name, digest, query, headers, method == Method::HEAD)
                    .await
            }
            Endpoint::Catalog if readable => Err(ApiError::NotFound(
                "the catalog is not served: kontain generates repositories on demand; \
                 list a repository's tags instead"
                    .into(),
            )),
            Endpoint::Unknown => Err(ApiError::NotFound(format!(
                "{path} is not part of the registry API"
            ))),
            Endpoint::Upload => Err(ApiError::MethodNotAllowed {
                message: "kontain is a pull-only registry: pushing is not supported",
                allow: "",
            }),
            _ => Err(ApiError::MethodNotAllowed {
                message: "kontain is a pull-only registry: pushing and deleting are not supported",
                allow: "GET, HEAD",
            }),
        }
    }

    /// `GET|HEAD /v2/<name>/tags/list[?n=<count>&last=<tag>]`: the tags the
    /// generator lists, in lexical order, a page at a time.
    async fn tags(
        &self,
        name: &str,
        query: &str,
        headers: &HeaderMap,
        head: bool,
    ) -> Result<Response<Body>, ApiError> {
        let (name, route) = self.route(name, headers)?;
        let page = tags::Page::parse(query).map_err(ApiError::BadRequest)?;
        let all = tags::sorted(self.generators.tags(route).await?);
        let (tags, next) = page.of(&all);
        let body = serde_json::json!({ "name": name.to_string(), "tags": tags });
        let bytes = Bytes::from(body.to_string());
        let mut builder = Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, bytes.len());
        if let Some(next) = next {
            builder = builder.header(header::LINK, next.link(&name));
        }
        let body = if head { empty() } else { full(bytes) };
        Ok(builder
            .body(body)
            .unwrap_or_else(|_| Response::new(empty())))
    }

    /// Whether the server can serve: storage takes a write and gives it
    /// back, and generators are loaded. The reason when not (the details,
    /// which may name paths, go to the log only).
    async fn ready(&self) -> Result<(), &'static str> {
        if self.generators.loaded() == 0 {
            return Err("no generator is loaded");
        }
        // Anyone may ask, and each probe writes to storage: callers within
        // a moment share one answer, and a probe that hangs is a failure.
        let mut last = self.readiness.lock().await;
        if let Some((at, answer)) = *last
            && at.elapsed() < READY_FOR
        {
            return answer;
        }
        let answer = match tokio::time::timeout(PROBE_TIMEOUT, self.storage.probe()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "not ready: storage failed a probe");
                Err("storage is not writable or not reachable")
            }
            Err(_) => {
                tracing::warn!(timeout = ?PROBE_TIMEOUT, "not ready: a storage probe did not finish");
                Err("storage did not answer in time")
            }
        };
        *last = Some((Instant::now(), answer));
        answer
    }

    /// This registry, if storage has room for new content (not at its
    /// quota with only images in use).
    async fn room_for_new(&self) -> Result<&Self, ApiError> {
        self.storage.room().await?;
        Ok(self)
    }

    /// Parses and routes a repository name.
    fn route(
        &self,
        name: &str,
        headers: &HeaderMap,
    ) -> Result<(RepositoryName, crate::generator::Route), ApiError> {
        let name: RepositoryName = name.parse().map_err(ApiError::NameInvalid)?;
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let route = self
            .generators
            .route(host, &name)
            .ok_or_else(|| ApiError::NameUnknown(name.clone()))?;
        tracing::Span::current().record("generator", route.generator.as_str());
        crate::activity::set_generator(&route.generator);
        let site = self.generators.site();
        if let Some(listed) = site.generators.iter().find(|g| g.name == route.generator)
            && let Some(client) = crate::activity::client()
        {
            crate::activity::set_budget(self.fair.clone(), listed.budget.clone());
            self.fair
                .request(&route.generator, client, &listed.budget)
                .map_err(|d| ApiError::Throttled(crate::activity::denied(d)))?;
        }
        Ok((name, route))
    }

    /// `/i/<name>[:<tag>|@<digest>]`: a page about that image.
    async fn image_page(&self, image: &str, headers: &HeaderMap) -> Response<Body> {
        let (name, reference) = match image.rsplit_once('@') {
            Some((name, digest)) => (name, digest),
            None => match image.rsplit_once(':') {
                Some((name, tag)) if !tag.contains('/') => (name, tag),
                _ => (image, "latest"),
            },
        };
        match self.resolve_manifest(name, reference, headers).await {
            Ok(stored) => {
                let page = self
                    .pages
                    .image(&self.storage, name, reference, &stored)
                    .await;
                html(StatusCode::OK, page)
            }
            Err(error) => {
                let message = error.to_string();
                // Logged (and classified) as for the API.
                let status = error
                    .into_response(true, response::Subject::Manifest)
                    .status();
                let message = match status.is_server_error() {
                    true => "the registry could not produce this image just now; its log has the details".to_owned(),
                    false => message,
                };
                html(status, self.pages.failed(image, status, &message))
            }
        }
    }

    /// `GET|HEAD /v2/<name>/manifests/<reference>`
    async fn manifest(
        &self,
        name: &str,
        reference: &str,
        headers: &HeaderMap,
        head: bool,
    ) -> Result<Response<Body>, ApiError> {
        let stored = self.resolve_manifest(name, reference, headers).await?;
        Ok(manifest_response(stored, head))
    }

    /// The manifest `reference` names in `name`: from storage when it is a
    /// stored digest, else from its generator.
    async fn resolve_manifest(
        &self,
        name: &str,
        reference: &str,
        headers: &HeaderMap,
    ) -> Result<StoredManifest, ApiError> {
        let (name, route) = self.route(name, headers)?;
        let reference: Reference =
            reference
                .parse()
                .map_err(|e| match reference.contains(':') {
                    true => ApiError::DigestInvalid(e),
                    false => ApiError::TagInvalid(e),
                })?;
        record(&name, &reference);
        crate::activity::set_image(match &reference {
            Reference::Digest(d) => format!("{name}@{d}"),
            Reference::Tag(t) => format!("{name}:{t}"),
        });
        if let Reference::Digest(digest) = &reference {
            let stored = match self.admitted.admits(&self.storage, &route).await {
                true => self.storage.manifest(digest).await?,
                false => None,
            };
            crate::metrics::cache(&route.generator, "manifest", stored.is_some());
            if let Some(stored) = stored {
                return Ok(stored);
            }
        }
        let request = ResolveRequest {
            route: route.clone(),
            reference: reference.clone(),
            accept: accept_list(headers),
        };
        let stored = self.resolve_detached(request).await?;
        // A generator asked for a digest must produce exactly that content.
        if let Reference::Digest(wanted) = &reference
            && *wanted != stored.digest
        {
            return Err(ApiError::ManifestUnknown {
                name,
                reference: reference.to_string(),
            });
        }
        self.admitted.admit(&self.storage, &route).await;
        Ok(stored)
    }

    /// What the generator resolves `request` to, worked out in a task of
    /// its own: a client that goes away does not stop the build others will
    /// pull, and a client that would wait longer than [`Registry::hold`] is
    /// told to come back while the work goes on.
    async fn resolve_detached(&self, request: ResolveRequest) -> Result<StoredManifest, ApiError> {
        let started = Instant::now();
        // A client told to come back joins the work it was told about (a
        // retrying client must not start another resolution each time).
        let key = format!(
            "{:?}",
            (&request.route, &request.reference, &request.accept)
        );
        let joined = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            match held.get(&key) {
                Some(work) if work.peek().is_none() => Some(work.clone()),
                Some(_) => {
                    held.remove(&key);
                    None
                }
                None => None,
            }
        };
        let work = match joined {
            Some(work) => work,
            None => {
                let generators = self.generators.clone();
                let (held, key) = (self.held.clone(), key.clone());
                let task = crate::activity::detach(async move {
                    let resolved = generators.resolve(request).await;
                    held.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                    resolved
                });
                futures_util::FutureExt::shared(Box::pin(async move {
                    match task.await {
                        Ok(Some(resolved)) => resolved,
                        Ok(None) => Err(GeneratorError {
                            kind: ErrorKind::Unavailable,
                            plugin: None,
                            message: "the registry is shutting down; pull again".into(),
                        }),
                        Err(e) => Err(GeneratorError {
                            kind: ErrorKind::Internal,
                            plugin: None,
                            message: format!("the generator's task failed: {e}"),
                        }),
                    }
                }) as Resolution)
            }
        };
        if self.hold.is_zero() {
            return Ok(work.await?);
        }
        match tokio::time::timeout(self.hold, work.clone()).await {
            Ok(resolved) => Ok(resolved?),
            Err(_) => {
                self.held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(key)
                    .or_insert(work);
                let working = crate::activity::still_working(started.elapsed(), HOLD_RETRY);
                tracing::info!(message = %working.message, "answered before the work ended");
                Err(ApiError::Working(working))
            }
        }
    }

    /// `GET|HEAD /v2/<name>/blobs/<digest>`
    async fn blob(
        &self,
        name: &str,
        digest: &str,
        headers: &HeaderMap,
        head: bool,
    ) -> Result<Response<Body>, ApiError> {
        let (name, route) = self.route(name, headers)?;
        let digest: Digest = digest
            .parse()
            .map_err(|e: crate::oci::DigestError| ApiError::DigestInvalid(e.into()))?;
        record(&name, &digest);
        let stored = match self.admitted.admits(&self.storage, &route).await {
            true => self.storage.blob_entry_or_arriving(&digest).await?,
            false => None,
        };
        crate::metrics::cache(&route.generator, "blob", stored.is_some());
        // A blob kept as a recipe, or still arriving, has no object to send
        // clients to.
        let (size, served_here) = match stored {
            Some(entry) => (entry.size, entry.served_here),
            // Not stored, or not yet under this name: a mirror fetches it
            // (after its policy admits the name, and its client's budget
            // of bytes made); others have nothing more.
            None => match crate::activity::may_generate()
                .map_err(ApiError::Throttled)
                .map(|()| self)?
                .room_for_new()
                .await?
                .generators
                .fetch_blob(route.clone(), digest.clone())
                .await
            {
                Ok(info) if info.digest == digest => {
                    crate::activity::generated(info.size);
                    self.storage.keep_to_quota().await;
                    self.admitted.admit(&self.storage, &route).await;
                    // Arriving (served from here as it comes), or stored;
                    // neither: its download failed just now.
                    let served_here = match self.storage.arrival(&digest) {
                        Some(_) => true,
                        None => match self.storage.blob_entry(&digest).await? {
                            Some(entry) => entry.served_here,
                            None => {
                                return Err(GeneratorError {
                                    kind: ErrorKind::Unavailable,
                                    plugin: None,
                                    message: format!(
                                        "the download of {digest} failed just now (the log says why); try again"
                                    ),
                                }
                                .into());
                            }
                        },
                    };
                    (info.size, served_here)
                }
                Ok(_) => return Err(ApiError::BlobUnknown(digest)),
                Err(e) if e.kind == ErrorKind::NotFound && e.plugin.is_some() => {
                    return Err(ApiError::BlobUnknown(digest));
                }
                Err(e) => return Err(e.into()),
            },
        };
        let range = match headers.get(header::RANGE).and_then(|r| r.to_str().ok()) {
            Some(r) => parse_range(r, size)?,
            None => None,
        };
        let builder = Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::ACCEPT_RANGES, "bytes")
            .header("docker-content-digest", digest.to_string())
            .header(header::ETAG, format!("\"{digest}\""))
            .header(header::CACHE_CONTROL, "max-age=31536000, immutable");
        let (builder, len) = match range {
            Some(r) => (
                builder.status(StatusCode::PARTIAL_CONTENT).header(
                    header::CONTENT_RANGE,
                    format!("bytes {}-{}/{size}", r.first, r.last),
                ),
                r.len(),
            ),
            None => (builder.status(StatusCode::OK), size),
        };
        let builder = builder.header(header::CONTENT_LENGTH, len);
        if head {
            return Ok(builder
                .body(empty())
                .unwrap_or_else(|_| Response::new(empty())));
        }
        // Clients download from the bucket themselves (Range included),
        // so a replica never carries blob bytes when storage can serve them.
        if !served_here && let Some(url) = self.storage.blob_location(&digest).await? {
            return Ok(Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header(header::LOCATION, url)
                .header("docker-content-digest", digest.to_string())
                .header(header::CONTENT_LENGTH, 0)
                .body(empty())
                .unwrap_or_else(|_| Response::new(empty())));
        }
        match self.storage.read_blob(&digest, range).await? {
            // A small blob goes out whole with its headers, in one write.
            // Not one still arriving: its headers go out at once.
            Some(BlobContent { body, .. })
                if len <= SMALL_BLOB && self.storage.arrival(&digest).is_none() =>
            {
                let bytes = collect(body).await.map_err(|e| {
                    ApiError::Storage(crate::storage::StorageError::Io {
                        path: format!("blob {digest}").into(),
                        source: e,
                    })
                })?;
                crate::metrics::blob_bytes(&route.generator, bytes.len() as u64);
                Ok(builder
                    .body(full(bytes))
                    .unwrap_or_else(|_| Response::new(empty())))
            }
            Some(BlobContent { body, .. }) => Ok(builder
                .body(stream(Box::pin(Counted {
                    inner: body,
                    generator: route.generator,
                    bytes: 0,
                })))
                .unwrap_or_else(|_| Response::new(empty()))),
            // Removed between the size check and the read.
            None => Err(ApiError::BlobUnknown(digest)),
        }
    }
}

/// A blob's body, counting the bytes that actually go out (a client may
/// hang up halfway) into the metrics when it ends.
struct Counted {
    inner: futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>,
    generator: String,
    bytes: u64,
}

impl futures_util::Stream for Counted {
    type Item = std::io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let polled = self.inner.as_mut().poll_next(cx);
        if let std::task::Poll::Ready(Some(Ok(chunk))) = &polled {
            self.bytes += chunk.len() as u64;
        }
        polled
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        crate::metrics::blob_bytes(&self.generator, self.bytes);
    }
}

/// Blobs up to this size are read whole before the answer is sent.
const SMALL_BLOB: u64 = 64 * 1024;

async fn collect(
    mut body: futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>,
) -> std::io::Result<Bytes> {
    use futures_util::StreamExt;
    let mut all = bytes::BytesMut::new();
    while let Some(chunk) = body.next().await {
        all.extend_from_slice(&chunk?);
    }
    Ok(all.freeze())
}

/// Names the repository and reference in the request's span.
fn record(name: &RepositoryName, reference: &dyn std::fmt::Display) {
    let span = tracing::Span::current();
    span.record("repository", tracing::field::display(name));
    span.record("reference", tracing::field::display(reference));
}

fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let body = body.into();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(body))
        .unwrap_or_else(|_| Response::new(empty()))
}

fn html(status: StatusCode, page: String) -> Response<Body> {
    let body = Bytes::from(page);
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::CACHE_CONTROL, "no-store")
        .header(
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'",
        )
        .body(full(body))
        .unwrap_or_else(|_| Response::new(empty()))
}

fn json_ok(body: &'static [u8]) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(full(Bytes::from_static(body)))
        .unwrap_or_else(|_| Response::new(empty()))
}

fn manifest_response(stored: StoredManifest, head: bool) -> Response<Body> {
    let builder = Response::builder()
        .header(header::CONTENT_TYPE, stored.media_type.as_str())
        .header(header::CONTENT_LENGTH, stored.bytes.len())
        .header("docker-content-digest", stored.digest.to_string())
        .header(header::ETAG, format!("\"{}\"", stored.digest));
    let body = if head { empty() } else { full(stored.bytes) };
    builder
        .body(body)
        .unwrap_or_else(|_| Response::new(empty()))
}

/// Media types from every `Accept` header, parameters dropped.
fn accept_list(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|m| m.split(';').next())
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .collect()
}

/// A single `bytes=` range against a blob of `size` bytes. Forms servers may
/// ignore (several ranges, other units, garbage) give `None`: the whole blob.
fn parse_range(header: &str, size: u64) -> Result<Option<ByteRange>, ApiError> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let unsatisfiable = Err(ApiError::RangeNotSatisfiable { size });
    let (first, last) = match (first.trim(), last.trim()) {
        ("", "") => return Ok(None),
        ("", suffix) => match suffix.parse::<u64>() {
            Ok(0) => return unsatisfiable,
            Ok(n) if size > 0 => (size.saturating_sub(n), size - 1),
            Ok(_) => return unsatisfiable,
            Err(_) => return Ok(None),
        },
        (first, last) => {
            let Ok(first) = first.parse::<u64>() else {
                return Ok(None);
            };
            let last = match last {
                "" => size.saturating_sub(1),
                l => match l.parse::<u64>() {
                    Ok(l) if l >= first => l.min(size.saturating_sub(1)),
                    _ => return Ok(None),
                },
            };
            (first, last)
        }
    };
    if first >= size {
        return unsatisfiable;
    }
    Ok(Some(ByteRange { first, last }))
}

/// Serves `registry` on `listener` until `shutdown` completes, then lets open
/// connections finish (for at most `grace`). `limits` bound how long and how
/// many connections stay open (see `connections`).
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let connections = connections::Connections::new(limits);
    let watchdog = tokio::spawn(connections.clone().watchdog());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) if connections::is_resource_exhaustion(&e) => {
                        // Shed idle connections; wait only if none could go.
                        if !connections.out_of_descriptors(&e) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        continue;
                    }
                };
                let Some((id, slot)) = connections.admit() else {
                    drop(stream);
                    continue;
                };
                // Small answers go out at once, not after the peer's delayed ACK.
                let _ = stream.set_nodelay(true);
                let (registry, tracker, on_request) = (registry.clone(), connections.clone(), slot.clone());
                let service = service_fn(move |mut request: Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(Peer(peer));
                    let busy = tracker.request_started(&on_request);
                    let registry = registry.clone();
                    async move {
                        let response = registry.handle(request).await;
                        Ok::<_, Infallible>(response.map(|body| connections::Guarded { body, _busy: busy }))
                    }
                });
                let io = TokioIo::new(connections.track(stream, slot.clone()));
                let connection = builder.serve_connection_with_upgrades(io, service);
                let connection = graceful.watch(connection.into_owned());
                let connections = connections.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        result = connection => {
                            if let Err(e) = result {
                                tracing::debug!(%peer, error = %e, "connection closed with an error");
                            }
                        }
                        () = slot.closed() => {}
                    }
                    connections.remove(id);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections were still open after the grace period");
    }
    watchdog.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_byte_ranges() {
        let r = |first, last| Some(ByteRange { first, last });
        for (h, want) in [
            ("bytes=10-19", r(10, 19)),
            ("bytes=10-", r(10, 99)),
            ("bytes=-5", r(95, 99)),
            ("bytes=90-200", r(90, 99)),
            ("bytes=0-0", r(0, 0)),
            ("bytes=5-1", None),
            ("bytes=1-2,4-5", None),
            ("items=1-2", None),
            ("bytes=a-b", None),
        ] {
            assert_eq!(parse_range(h, 100).ok().flatten(), want, "{h}");
        }
        assert!(matches!(
            parse_range("bytes=100-", 100),
            Err(ApiError::RangeNotSatisfiable { .. })
        ));
        assert!(matches!(
            parse_range("bytes=-0", 100),
            Err(ApiError::RangeNotSatisfiable { .. })
        ));
        assert!(matches!(
            parse_range("bytes=0-", 0),
            Err(ApiError::RangeNotSatisfiable { .. })
        ));
    }
}
