//! The OCI distribution API, pull side, over HTTP: routes, handlers, and the
//! mapping of every failure to an OCI error response (`response`).
//!
//! Sees generators only through the `generator::Generators` trait (and its
//! one error type, whose kinds `response` maps to statuses and OCI codes)
//! and storage only through the content store; knows nothing of wasm or of
//! any capability.

mod endpoint;
mod response;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::generator::{ErrorKind, Generators, ResolveRequest};
use crate::oci::{Digest, Reference, RepositoryName};
use crate::storage::{BlobContent, ByteRange, ContentStore, StoredManifest};
use endpoint::Endpoint;
pub use response::{ApiError, Body};
use response::{empty, full, stream};

const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

const LANDING: &str = "kontain: a registry that generates images when you pull them.\n\n\
    docker pull <this host>/random:4x100   # 4 layers of 100 random bytes\n";

pub struct Registry {
    storage: Arc<ContentStore>,
    generators: Arc<dyn Generators>,
}

impl Registry {
    pub fn new(storage: Arc<ContentStore>, generators: Arc<dyn Generators>) -> Self {
        Registry {
            storage,
            generators,
        }
    }

    /// Answers one request. Never fails: errors become OCI error responses.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Body> {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let span = tracing::info_span!(
            "request",
            %method,
            %path,
            repository = tracing::field::Empty,
            reference = tracing::field::Empty
        );
        async {
            let head = method == Method::HEAD;
            let mut headers = request.headers().clone();
            // HTTP/2 carries the host in the URI's authority, not a Host header.
            if !headers.contains_key(header::HOST)
                && let Some(authority) = request.uri().authority()
                && let Ok(value) = authority.as_str().parse()
            {
                headers.insert(header::HOST, value);
            }
            let mut response = match self.dispatch(&method, &path, &headers).await {
                Ok(response) => response,
                Err(error) => error.into_response(head),
            };
            response
                .headers_mut()
                .insert(API_VERSION.0, http::HeaderValue::from_static(API_VERSION.1));
            tracing::info!(status = response.status().as_u16(), elapsed = ?started.elapsed(), "served");
            response
        }
        .instrument(span)
        .await
    }

    async fn dispatch(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Response<Body>, ApiError> {
        let readable = method == Method::GET || method == Method::HEAD;
        match endpoint::parse(path) {
            Endpoint::Outside if readable && path == "/" => Ok(Response::builder()
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(full(LANDING))
                .unwrap_or_else(|_| Response::new(empty()))),
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
            Endpoint::TagsList | Endpoint::Catalog if readable => Err(ApiError::Unsupported(
                "listing is not supported: kontain generates tags on demand",
            )),
            Endpoint::Unknown => Err(ApiError::NotFound(format!(
                "{path} is not part of the registry API"
            ))),
            _ => Err(ApiError::Unsupported(
                "kontain is a pull-only registry: pushing and deleting are not supported",
            )),
        }
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
        Ok((name, route))
    }

    /// `GET|HEAD /v2/<name>/manifests/<reference>`
    async fn manifest(
        &self,
        name: &str,
        reference: &str,
        headers: &HeaderMap,
        head: bool,
    ) -> Result<Response<Body>, ApiError> {
        let (name, route) = self.route(name, headers)?;
        let reference: Reference =
            reference
                .parse()
                .map_err(|e| match reference.contains(':') {
                    true => ApiError::DigestInvalid(e),
                    false => ApiError::TagInvalid(e),
                })?;
        record(&name, &reference);
        if let Reference::Digest(digest) = &reference
            && let Some(stored) = self.storage.manifest(digest).await?
        {
            return Ok(manifest_response(stored, head));
        }
        let request = ResolveRequest {
            route,
            reference: reference.clone(),
            accept: accept_list(headers),
        };
        let stored = self.generators.resolve(request).await?;
        // A generator asked for a digest must produce exactly that content.
        if let Reference::Digest(wanted) = &reference
            && *wanted != stored.digest
        {
            return Err(ApiError::ManifestUnknown {
                name,
                reference: reference.to_string(),
            });
        }
        Ok(manifest_response(stored, head))
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
        let size = match self.storage.blob_size(&digest).await? {
            Some(size) => size,
            // Not stored: a mirror fetches it now; others have nothing more.
            None => match self.generators.fetch_blob(route, digest.clone()).await {
                Ok(info) if info.digest == digest => info.size,
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
        if let Some(url) = self.storage.blob_location(&digest).await? {
            return Ok(Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header(header::LOCATION, url)
                .header("docker-content-digest", digest.to_string())
                .header(header::CONTENT_LENGTH, 0)
                .body(empty())
                .unwrap_or_else(|_| Response::new(empty())));
        }
        match self.storage.read_blob(&digest, range).await? {
            Some(BlobContent { body, .. }) => Ok(builder
                .body(stream(body))
                .unwrap_or_else(|_| Response::new(empty()))),
            // Removed between the size check and the read.
            None => Err(ApiError::BlobUnknown(digest)),
        }
    }
}

/// Names the repository and reference in the request's span.
fn record(name: &RepositoryName, reference: &dyn std::fmt::Display) {
    let span = tracing::Span::current();
    span.record("repository", tracing::field::display(name));
    span.record("reference", tracing::field::display(reference));
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
/// connections finish (for at most `grace`).
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, don't spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let registry = registry.clone();
                let service = service_fn(move |request| {
                    let registry = registry.clone();
                    async move { Ok::<_, Infallible>(registry.handle(request).await) }
                });
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(%peer, error = %e, "connection closed with an error");
                    }
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
