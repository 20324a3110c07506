//! The client side of the Go module proxy protocol (`GOPROXY`): small
//! documents (`.info`, `@latest`, `@v/list`) and module zips, from HTTP
//! proxies through the upstream client's connection policy or from a
//! `file://` directory in proxy layout.

use std::io::Write;
use std::path::{Path, PathBuf};

use url::Url;

use super::GoError;
use crate::upstream::{Client, PlainError};

/// Proxy documents other than zips are small JSON or text.
const MAX_DOCUMENT: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub enum Proxy {
    Http(Url),
    File(PathBuf),
}

impl Proxy {
    pub fn new(url: &Url) -> Result<Proxy, String> {
        match url.scheme() {
            "http" | "https" => {
                let mut base = url.clone();
                if !base.path().ends_with('/') {
                    base.set_path(&format!("{}/", base.path()));
                }
                Ok(Proxy::Http(base))
            }
            "file" => url
                .to_file_path()
                .map(Proxy::File)
                .map_err(|()| format!("{url} is not a file:///absolute/path")),
            other => Err(format!(
                "module proxies are http(s) or file URLs, not {other}"
            )),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Proxy::Http(url) => url.to_string(),
            Proxy::File(dir) => format!("file://{}", dir.display()),
        }
    }
}

/// What one proxy said about one path.
pub enum Answer<T> {
    Found(T),
    /// 404 or 410: ask the next proxy.
    Missing,
}

/// Fetches `path` (already escaped, relative to the proxy root) as a small
/// document.
pub async fn document(
    client: &Client,
    proxy: &Proxy,
    path: &str,
) -> Result<Answer<Vec<u8>>, GoError> {
    let mut body = Vec::new();
    match fetch(client, proxy, path, MAX_DOCUMENT, &mut body).await? {
        Answer::Found(()) => Ok(Answer::Found(body)),
        Answer::Missing => Ok(Answer::Missing),
    }
}

/// Streams `path` into `out`, failing once more than `cap` bytes arrive.
pub async fn fetch(
    client: &Client,
    proxy: &Proxy,
    path: &str,
    cap: u64,
    out: &mut (dyn Write + Send),
) -> Result<Answer<()>, GoError> {
    let too_large = || GoError::TooLarge {
        what: format!("{path} from {}", proxy.describe()),
        limit: cap,
    };
    match proxy {
        Proxy::File(dir) => {
            if !is_contained(Path::new(path)) {
                return Err(GoError::InvalidPath(format!("{path:?} leaves the proxy")));
            }
            let file = dir.join(path);
            // A local directory: read it off the async threads.
            tokio::task::block_in_place(|| {
                let mut f = match std::fs::File::open(&file) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Ok(Answer::Missing);
                    }
                    Err(e) => return Err(GoError::io(format!("reading {}", file.display()), e)),
                };
                let len = f
                    .metadata()
                    .map_err(|e| GoError::io(format!("reading {}", file.display()), e))?
                    .len();
                if len > cap {
                    return Err(too_large());
                }
                std::io::copy(&mut std::io::Read::take(&mut f, cap + 1), out)
                    .map_err(|e| GoError::io(format!("reading {}", file.display()), e))?;
                Ok(Answer::Found(()))
            })
        }
        Proxy::Http(base) => {
            let url = base
                .join(path)
                .map_err(|e| GoError::InvalidPath(e.to_string()))?;
            let unreachable = |message: String| GoError::Unreachable {
                proxy: proxy.describe(),
                message,
            };
            let mut response = match client.get(url).await {
                Ok(r) => r,
                Err(PlainError::Refused(refusal)) => return Err(GoError::Refused(refusal)),
                Err(PlainError::Transport(message)) => return Err(unreachable(message)),
            };
            let status = response.status().as_u16();
            if status == 404 || status == 410 {
                return Ok(Answer::Missing);
            }
            if !response.status().is_success() {
                return Err(GoError::Failing {
                    proxy: proxy.describe(),
                    what: path.to_owned(),
                    status,
                });
            }
            if response.content_length().is_some_and(|n| n > cap) {
                return Err(too_large());
            }
            let mut received = 0u64;
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| unreachable(e.to_string()))?
            {
                received += chunk.len() as u64;
                if received > cap {
                    return Err(too_large());
                }
                tokio::task::block_in_place(|| out.write_all(&chunk))
                    .map_err(|e| GoError::io(format!("saving {path}"), e))?;
            }
            Ok(Answer::Found(()))
        }
    }
}

/// The `.info` document's version.
pub fn info_version(body: &[u8], what: &str) -> Result<String, GoError> {
    #[derive(serde::Deserialize)]
    struct Info {
        #[serde(rename = "Version")]
        version: String,
    }
    let info: Info = serde_json::from_slice(body).map_err(|e| GoError::BadProxy {
        message: format!("{what}: not a version document: {e}"),
    })?;
    check_version(&info.version, what)?;
    Ok(info.version)
}

/// A version from a proxy ends up in paths and URLs: the same grammar as
/// queries, a leading `v`, and the `+incompatible` suffix allowed.
pub fn check_version(version: &str, what: &str) -> Result<(), GoError> {
    let plain = version.strip_suffix("+incompatible").unwrap_or(version);
    if !plain.starts_with('v') || super::modpath::check_query(plain).is_err() {
        return Err(GoError::BadProxy {
            message: format!("{what}: {version:?} is not a module version"),
        });
    }
    Ok(())
}

/// `<module>/<tail>`, the module path escaped.
pub fn path_of(module: &str, tail: &str) -> String {
    format!("{}/{tail}", super::modpath::escape(module))
}

/// `<module>/@v/<version>.<ext>`, both escaped.
pub fn version_path(module: &str, version: &str, ext: &str) -> String {
    format!(
        "{}/@v/{}.{ext}",
        super::modpath::escape(module),
        super::modpath::escape(version)
    )
}

/// Whether `p` stays inside a proxy directory. Paths are built from checked
/// import paths and versions; this is the belt to those braces.
fn is_contained(p: &Path) -> bool {
    p.components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
}
