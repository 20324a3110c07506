//! The module proxy `go build` talks to: kontain itself, on a loopback port
//! (started with the first build). `go` gets `GOPROXY=<this>/b/<token>` and
//! never a proxy of its own, so every module and checksum-database request
//! it makes is one kontain makes for it, through the configured proxies in
//! order (`file://` ones included), the upstream client and its connection
//! policy. The proxy protocol's `/sumdb/<name>/` paths reach the configured
//! checksum database the same way. Each build has its own token, so that a
//! request the policy refuses fails that build as DENIED, saying which rule
//! refused it, rather than as a compile error.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::proxy::{self, Answer};
use super::{GoError, Settings};
use crate::upstream::{Client, Refusal};
use tracing::Instrument;

type Body = BoxBody<Bytes, std::io::Error>;

/// The loopback proxy, the builds running now (by token) and what it
/// refused for each.
pub struct ModuleServer {
    addr: SocketAddr,
    builds: Arc<Mutex<HashMap<String, Running>>>,
}

/// One build's view of the proxy: its `GOPROXY`, and what was refused for
/// it. Forgotten when dropped.
pub struct BuildProxy<'a> {
    server: &'a ModuleServer,
    token: String,
}

impl ModuleServer {
    /// Starts serving on a loopback port, for as long as the process runs.
    pub async fn start(
        settings: Arc<ArcSwap<Settings>>,
        client: Arc<Client>,
    ) -> std::io::Result<ModuleServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let builds: Arc<Mutex<HashMap<String, Running>>> = Arc::default();
        let state = Arc::new(State {
            settings,
            client,
            builds: builds.clone(),
        });
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors and the like: wait, don't spin.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.answer(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        tracing::info!(%addr, "module proxy for go is serving");
        Ok(ModuleServer { addr, builds })
    }

    /// A token and `GOPROXY` for one build; the proxy answers only tokens
    /// of builds running now.
    pub fn for_build(&self) -> BuildProxy<'_> {
        let token = hex::encode(rand::random::<[u8; 16]>());
        let mut builds = self.builds.lock().unwrap_or_else(|p| p.into_inner());
        builds.insert(
            token.clone(),
            Running {
                refusal: None,
                span: tracing::Span::current(),
            },
        );
        drop(builds);
        BuildProxy {
            server: self,
            token,
        }
    }
}

impl BuildProxy<'_> {
    /// What `go` gets as `GOPROXY`.
    pub fn goproxy(&self) -> String {
        format!("http://{}/b/{}", self.server.addr, self.token)
    }

    /// What the policy refused while this build ran, if anything.
    pub fn refusal(&self) -> Option<Refusal> {
        let builds = self.server.builds.lock().unwrap_or_else(|p| p.into_inner());
        builds.get(&self.token).and_then(|b| b.refusal.clone())
    }
}

impl Drop for BuildProxy<'_> {
    fn drop(&mut self) {
        let mut builds = self.server.builds.lock().unwrap_or_else(|p| p.into_inner());
        builds.remove(&self.token);
    }
}

/// A build the proxy serves: the first refusal it met, and the span of the
/// request that started it (so that its proxy lines carry that request's
/// id).
struct Running {
    refusal: Option<Refusal>,
    span: tracing::Span,
}

struct State {
    settings: Arc<ArcSwap<Settings>>,
    client: Arc<Client>,
    builds: Arc<Mutex<HashMap<String, Running>>>,
}

fn answer(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(text.to_owned()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

/// A path `go` may ask for: plain, escaped elements (`!` for uppercase,
/// `+incompatible`), nothing that could leave the proxy or change its host.
fn plain(path: &str) -> bool {
    !path.is_empty()
        && path.split('/').all(|e| {
            !e.is_empty()
                && e != "."
                && e != ".."
                && e.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~!+@".contains(&b))
        })
}

impl State {
    async fn answer(&self, request: Request<hyper::body::Incoming>) -> Response<Body> {
        let path = request.uri().path().to_owned();
        let Some((token, rest)) = path.strip_prefix("/b/").and_then(|p| p.split_once('/')) else {
            return answer(StatusCode::NOT_FOUND, "not a build's proxy path");
        };
        if request.method() != http::Method::GET || !plain(rest) {
            return answer(StatusCode::NOT_FOUND, "not a module proxy path");
        }
        let span = {
            let builds = self.builds.lock().unwrap_or_else(|p| p.into_inner());
            builds.get(token).map(|b| b.span.clone())
        };
        let Some(span) = span else {
            return answer(StatusCode::NOT_FOUND, "no build of that token is running");
        };
        self.serve(token, rest).instrument(span).await
    }

    async fn serve(&self, token: &str, rest: &str) -> Response<Body> {
        tracing::info!(path = rest, "go asked kontain's module proxy");
        let settings = self.settings.load_full();
        let result = match rest.strip_prefix("sumdb/") {
            Some(db) => self.sumdb(&settings, db).await,
            None => self.module(&settings, rest).await,
        };
        match result {
            Ok(response) => response,
            Err(GoError::Refused(refusal)) => {
                let message = refusal.to_string();
                let mut builds = self.builds.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(Running {
                    refusal: first @ None,
                    ..
                }) = builds.get_mut(token)
                {
                    *first = Some(refusal);
                }
                answer(StatusCode::FORBIDDEN, &message)
            }
            Err(e) => {
                tracing::warn!(path = rest, error = %e, "the module proxy for go failed");
                answer(StatusCode::BAD_GATEWAY, &e.to_string())
            }
        }
    }

    /// `<module>/@v/…` or `<module>/@latest`, from the first proxy that has it.
    async fn module(&self, settings: &Settings, path: &str) -> Result<Response<Body>, GoError> {
        for p in &settings.proxies {
            let mut file = tempfile::tempfile()
                .map_err(|e| GoError::io("creating a temporary file".into(), e))?;
            if let Answer::Found(()) =
                proxy::fetch(&self.client, p, path, settings.max_module, &mut file).await?
            {
                return Ok(file_response(file));
            }
        }
        Ok(answer(
            StatusCode::NOT_FOUND,
            "not found on any configured proxy",
        ))
    }

    /// `sumdb/<name>/supported`, and `sumdb/<name>/<path>` passed to the
    /// configured database.
    async fn sumdb(&self, settings: &Settings, rest: &str) -> Result<Response<Body>, GoError> {
        let Some(db) = &settings.sumdb else {
            return Ok(answer(StatusCode::NOT_FOUND, "no checksum database"));
        };
        let Some(path) = rest.strip_prefix(&format!("{}/", db.name)) else {
            return Ok(answer(StatusCode::NOT_FOUND, "another checksum database"));
        };
        if path == "supported" {
            return Ok(answer(StatusCode::OK, ""));
        }
        let body = db.fetch(&self.client, path).await?;
        Ok(Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        ))
    }
}

/// A fetched file, streamed back from the start.
fn file_response(mut file: std::fs::File) -> Response<Body> {
    use std::io::Seek;
    if let Err(e) = file.rewind() {
        return answer(StatusCode::BAD_GATEWAY, &e.to_string());
    }
    let reader = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    let frames = futures_util::StreamExt::map(reader, |chunk| chunk.map(Frame::data));
    Response::new(BodyExt::boxed(StreamBody::new(frames)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_proxy_paths_pass() {
        for ok in [
            "example.com/m/@v/list",
            "example.com/!upper/@v/v1.0.0+incompatible.zip",
            "sumdb/sum.golang.org/tile/8/0/x001/234.p/5",
        ] {
            assert!(plain(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "a//b",
            "a/../b",
            "a/./b",
            "a b",
            "a%2fb",
            "a\\b",
        ] {
            assert!(!plain(bad), "{bad}");
        }
    }
}
