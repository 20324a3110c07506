//! The registry protocol, client side: manifests and blobs over HTTP(S), the
//! `401` → Bearer token exchange (anonymous, or with configured credentials),
//! Basic auth, and every URL — redirects and token realms included — checked
//! by the [`Policy`] before a connection is made.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use url::Url;

use super::UpstreamError;
use super::image::UpstreamImage;
use super::policy::{CheckedResolver, Policy, Refusal, SharedPolicy};
use crate::oci::{Digest, MAX_MANIFEST_BYTES, Tag};

const MAX_REDIRECTS: usize = 10;
/// Token responses are small JSON documents; anything bigger is hostile.
const MAX_TOKEN_RESPONSE: u64 = 64 * 1024;
/// Only the start of an upstream's error body is read (for its message).
const MAX_ERROR_BODY: u64 = 16 * 1024;
/// Tokens without `expires_in` last 60 s per the token spec; renew a little early.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(50);

/// The most tags read from one repository, the largest page read, and the
/// most pages followed.
pub const MAX_TAGS: usize = 10_000;
const MAX_TAGS_PAGE: u64 = 1024 * 1024;
const MAX_TAG_PAGES: usize = 100;

#[derive(Clone)]
enum Auth {
    Bearer(String),
    Basic { username: String, password: String },
}

pub struct Client {
    http: reqwest::Client,
    policy: SharedPolicy,
    tokens: Mutex<HashMap<String, (Auth, Instant)>>,
}

/// What a manifest `HEAD` told us.
pub struct ManifestHead {
    pub digest: Option<Digest>,
}

impl Client {
    pub fn new(policy: SharedPolicy) -> Result<Client, String> {
        // reqwest is built without a default crypto provider; pick ring once
        // per process (a second install is harmlessly refused).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let redirect_policy = policy.clone();
        let http = reqwest::Client::builder()
            .no_proxy()
            .user_agent(concat!("kontain/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .dns_resolver(Arc::new(CheckedResolver {
                policy: policy.clone(),
            }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
                }
                let policy = redirect_policy.current();
                let checked = match attempt.previous().first() {
                    Some(origin) => policy.check_from(origin, attempt.url()),
                    None => policy.check_url(attempt.url()),
                };
                match checked {
                    Ok(()) => attempt.follow(),
                    Err(refusal) => attempt.error(refusal),
                }
            }))
            .build()
            .map_err(|e| format!("cannot build the upstream HTTP client: {e}"))?;
        Ok(Client {
            http,
            policy,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// `HEAD` a manifest by tag or digest.
    pub async fn head_manifest(
        &self,
        image: &UpstreamImage,
        reference: &str,
        accept: &[String],
    ) -> Result<ManifestHead, UpstreamError> {
        let response = self
            .fetch(image, Method::HEAD, "manifests", reference, accept)
            .await?;
        let digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok(ManifestHead { digest })
    }

    /// `GET` a manifest's exact bytes and media type (at most 4 MiB).
    pub async fn get_manifest(
        &self,
        image: &UpstreamImage,
        reference: &str,
        accept: &[String],
    ) -> Result<(Bytes, String), UpstreamError> {
        let response = self
            .fetch(image, Method::GET, "manifests", reference, accept)
            .await?;
        let header_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
        let body = read_capped(response, MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| self.transport(image, e))?
            .ok_or_else(|| UpstreamError::TooLarge {
                image: image.to_string(),
                what: "manifest",
                limit: MAX_MANIFEST_BYTES,
            })?;
        // Registries must send the type; fall back to the document's own
        // `mediaType` for those that send `application/json`.
        let media_type = match header_type {
            Some(t) if t != "application/json" && !t.is_empty() => t,
            _ => serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
                .unwrap_or_else(|| crate::oci::MediaType::OCI_MANIFEST.to_owned()),
        };
        Ok((body, media_type))
    }

    /// Every tag of `image`, following the registry's `Link` pages (at most
    /// [`MAX_TAGS`]; the rest are left out).
    pub async fn list_tags(&self, image: &UpstreamImage) -> Result<Vec<String>, UpstreamError> {
        #[derive(serde::Deserialize)]
        struct Page {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let first = image.url("tags", "list").map_err(|e| invalid(image, e))?;
        let mut next = Some(first.clone());
        let mut tags = Vec::new();
        let mut seen = std::collections::HashSet::new();
        while let Some(url) = next.take() {
            // The upstream names the next page; follow it only to the same
            // list on the same registry (credentials go with each request),
            // never twice, and not forever.
            if !same_list(&first, &url) || !seen.insert(url.clone()) || seen.len() > MAX_TAG_PAGES {
                break;
            }
            let response = self.send(image, Method::GET, url.clone(), &[]).await?;
            let response = check_status(image, "tags/list", response).await?;
            next = next_page(&url, response.headers());
            let body = read_capped(response, MAX_TAGS_PAGE)
                .await
                .map_err(|e| self.transport(image, e))?
                .ok_or_else(|| UpstreamError::TooLarge {
                    image: image.to_string(),
                    what: "a page of the tag list",
                    limit: MAX_TAGS_PAGE,
                })?;
            let page: Page =
                serde_json::from_slice(&body).map_err(|e| UpstreamError::Unreachable {
                    image: image.to_string(),
                    message: format!("its tag list is not the JSON the spec defines: {e}"),
                })?;
            let page = page.tags.unwrap_or_default();
            if page.is_empty() {
                break;
            }
            // Only names a client could pull: this also bounds their size.
            tags.extend(page.into_iter().filter(|t| t.parse::<Tag>().is_ok()));
            if tags.len() >= MAX_TAGS {
                tags.truncate(MAX_TAGS);
                break;
            }
        }
        Ok(tags)
    }

    /// The descriptors of the manifests of `image` whose subject is
    /// `digest`: the referrers API, else the spec's fallback tag
    /// (`<algorithm>-<hex>`, an index), else none. At most [`MAX_REFERRERS`].
    pub async fn referrers(
        &self,
        image: &UpstreamImage,
        digest: &Digest,
    ) -> Result<Vec<serde_json::Value>, UpstreamError> {
        let accept = [crate::oci::MediaType::OCI_INDEX.to_owned()];
        let url = image
            .url("referrers", &digest.to_string())
            .map_err(|e| invalid(image, e))?;
        let response = self.send(image, Method::GET, url, &accept).await?;
        let index = match response.status() {
            // A registry without the API: the tag schema, as clients do.
            StatusCode::NOT_FOUND => {
                // `<alg>-<ref>`, the reference cut to 64 characters (the spec).
                let hex = digest.hex();
                let tag = format!("{}-{}", digest.algorithm_name(), &hex[..hex.len().min(64)]);
                match self.get_manifest(image, &tag, &accept).await {
                    Ok((bytes, _)) => bytes,
                    Err(UpstreamError::NotFound { .. }) => return Ok(Vec::new()),
                    Err(e) => return Err(e),
                }
            }
            _ => {
                let response = check_status(image, "referrers", response).await?;
                read_capped(response, MAX_MANIFEST_BYTES)
                    .await
                    .map_err(|e| self.transport(image, e))?
                    .ok_or_else(|| UpstreamError::TooLarge {
                        image: image.to_string(),
                        what: "the referrers index",
                        limit: MAX_MANIFEST_BYTES,
                    })?
            }
        };
        let index: serde_json::Value =
            serde_json::from_slice(&index).map_err(|e| UpstreamError::Unreachable {
                image: image.to_string(),
                message: format!("its referrers index is not JSON: {e}"),
            })?;
        Ok(index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(referrer)
            .take(MAX_REFERRERS)
            .collect())
    }

    /// `GET` a blob; the body is left to stream.
    pub async fn get_blob(
        &self,
        image: &UpstreamImage,
        digest: &Digest,
    ) -> Result<Response, UpstreamError> {
        self.fetch(image, Method::GET, "blobs", &digest.to_string(), &[])
            .await
    }

    /// `<method> /v2/<repository>/<kind>/<reference>`, answered with a
    /// success (anything else is an error saying what it was).
    async fn fetch(
        &self,
        image: &UpstreamImage,
        method: Method,
        kind: &str,
        reference: &str,
        accept: &[String],
    ) -> Result<Response, UpstreamError> {
        let url = image.url(kind, reference).map_err(|e| invalid(image, e))?;
        let response = self.send(image, method, url, accept).await?;
        check_status(image, reference, response).await
    }

    /// Sends a request, answering one authentication challenge.
    async fn send(
        &self,
        image: &UpstreamImage,
        method: Method,
        url: Url,
        accept: &[String],
    ) -> Result<Response, UpstreamError> {
        self.policy
            .current()
            .check_url(&url)
            .map_err(UpstreamError::Refused)?;
        let scope = format!("repository:{}:pull", image.repository);
        let key = format!("{} {scope}", image.endpoint.base);
        let mut auth = self.cached(&key);
        for attempt in 0..2 {
            let mut request = self.http.request(method.clone(), url.clone());
            if !accept.is_empty() {
                request = request.header(ACCEPT, accept.join(", "));
            }
            request = match &auth {
                Some(Auth::Bearer(token)) => {
                    request.header(AUTHORIZATION, format!("Bearer {token}"))
                }
                Some(Auth::Basic { username, password }) => {
                    request.basic_auth(username, Some(password))
                }
                None => request,
            };
            let response =
                counted(&url, request.send().await).map_err(|e| self.transport(image, e))?;
            if response.status() != StatusCode::UNAUTHORIZED || attempt > 0 {
                return Ok(response);
            }
            let challenge = response
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            auth = Some(self.authenticate(image, &challenge, &scope, &key).await?);
        }
        Err(UpstreamError::Unauthorized {
            image: image.to_string(),
        })
    }

    fn cached(&self, key: &str) -> Option<Auth> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .get(key)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(auth, _)| auth.clone())
    }

    async fn authenticate(
        &self,
        image: &UpstreamImage,
        challenge: &str,
        scope: &str,
        key: &str,
    ) -> Result<Auth, UpstreamError> {
        let (scheme, params) = parse_challenge(challenge);
        let credentials = image.endpoint.credentials.clone();
        let unauthorized = || UpstreamError::Unauthorized {
            image: image.to_string(),
        };
        let (auth, lifetime) = match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let c = credentials.ok_or_else(unauthorized)?;
                let auth = Auth::Basic {
                    username: c.username,
                    password: c.password,
                };
                (auth, Duration::from_secs(3600))
            }
            "bearer" => {
                let realm = params.get("realm").ok_or_else(unauthorized)?;
                let mut realm = Url::parse(realm).map_err(|_| unauthorized())?;
                // The token service is a connection like any other.
                self.policy
                    .current()
                    .check_from(&image.endpoint.base, &realm)
                    .map_err(UpstreamError::Refused)?;
                {
                    let mut query = realm.query_pairs_mut();
                    if let Some(service) = params.get("service") {
                        query.append_pair("service", service);
                    }
                    query.append_pair("scope", params.get("scope").map_or(scope, String::as_str));
                }
                let mut request = self.http.get(realm);
                if let Some(c) = &credentials {
                    request = request.basic_auth(&c.username, Some(&c.password));
                }
                let response = request.send().await.map_err(|e| self.transport(image, e))?;
                if !response.status().is_success() {
                    return Err(unauthorized());
                }
                let body = read_capped(response, MAX_TOKEN_RESPONSE)
                    .await
                    .map_err(|e| self.transport(image, e))?
                    .ok_or_else(unauthorized)?;
                let body: serde_json::Value =
                    serde_json::from_slice(&body).map_err(|_| unauthorized())?;
                let token = body["token"]
                    .as_str()
                    .or_else(|| body["access_token"].as_str())
                    .ok_or_else(unauthorized)?
                    .to_owned();
                let lifetime = body["expires_in"]
                    .as_u64()
                    .map(|s| Duration::from_secs(s.saturating_sub(10).max(10)))
                    .unwrap_or(DEFAULT_TOKEN_LIFETIME);
                (Auth::Bearer(token), lifetime)
            }
            _ => return Err(unauthorized()),
        };
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.insert(key.to_owned(), (auth.clone(), Instant::now() + lifetime));
        Ok(auth)
    }

    /// Classifies a failed exchange: a policy refusal anywhere in the chain
    /// (resolver, redirect) is `Refused`; anything else means unreachable.
    fn transport(&self, image: &UpstreamImage, error: reqwest::Error) -> UpstreamError {
        match plain_error(error) {
            PlainError::Refused(refusal) => UpstreamError::Refused(refusal),
            PlainError::Transport(message) => UpstreamError::Unreachable {
                image: image.to_string(),
                message,
            },
        }
    }

    /// The connection policy in force, for tools that connect on their own
    /// (git).
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.current()
    }

    /// A plain `GET` of `url` for other protocols that share this client's
    /// connection policy (Go module proxies): the response once its status
    /// is in. The URL, every redirect and every resolved address are checked
    /// as for registries.
    pub async fn get(&self, url: Url) -> Result<Response, PlainError> {
        self.policy
            .current()
            .check_url(&url)
            .map_err(PlainError::Refused)?;
        let response = self.http.get(url.clone()).send().await;
        counted(&url, response).map_err(plain_error)
    }
}

/// Counts a request to an upstream by host and outcome.
fn counted(
    url: &Url,
    response: Result<Response, reqwest::Error>,
) -> Result<Response, reqwest::Error> {
    let status = response.as_ref().ok().map(|r| r.status().as_u16());
    crate::metrics::upstream(url.host_str().unwrap_or_default(), status);
    response
}

/// Why a plain `GET` failed.
#[derive(Debug)]
pub enum PlainError {
    Refused(Refusal),
    Transport(String),
}

fn plain_error(error: reqwest::Error) -> PlainError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = source {
        if let Some(refusal) = e.downcast_ref::<Refusal>() {
            return PlainError::Refused(refusal.clone());
        }
        source = e.source();
    }
    PlainError::Transport(error_chain(&error))
}

/// The whole body, or `None` if it is longer than `cap` bytes (reading stops
/// there: a hostile server cannot make us buffer more).
async fn read_capped(mut response: Response, cap: u64) -> Result<Option<Bytes>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > cap) {
        return Ok(None);
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if (body.len() + chunk.len()) as u64 > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        message.push_str(": ");
        message.push_str(&e.to_string());
        source = e.source();
    }
    message
}

fn invalid(image: &UpstreamImage, e: url::ParseError) -> UpstreamError {
    UpstreamError::InvalidImage(format!("{image}: {e}"))
}

/// The most referrers taken from an upstream for one digest.
pub const MAX_REFERRERS: usize = 1000;

/// An upstream's descriptor of a referrer, rebuilt from the fields the
/// referrers API defines (anything else, or anything malformed, dropped).
fn referrer(d: &serde_json::Value) -> Option<serde_json::Value> {
    let digest: Digest = d["digest"].as_str()?.parse().ok()?;
    let mut out = serde_json::json!({
        "mediaType": d["mediaType"].as_str()?,
        "digest": digest.to_string(),
        "size": d["size"].as_u64()?,
    });
    if let Some(kind) = d["artifactType"].as_str() {
        out["artifactType"] = kind.into();
    }
    if let Some(annotations) = d["annotations"].as_object() {
        let strings: serde_json::Map<_, _> = annotations
            .iter()
            .filter(|(_, v)| v.is_string())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out["annotations"] = strings.into();
    }
    Some(out)
}

/// Whether `next` is a page of the same tag list as `first`: same scheme,
/// host, port and path (only the query may differ).
fn same_list(first: &Url, next: &Url) -> bool {
    first.scheme() == next.scheme()
        && first.host_str() == next.host_str()
        && first.port_or_known_default() == next.port_or_known_default()
        && first.path() == next.path()
        && next.username().is_empty()
        && next.password().is_none()
}

/// The `rel="next"` target of a `Link` header, relative to `url`, if any.
fn next_page(url: &Url, headers: &reqwest::header::HeaderMap) -> Option<Url> {
    let link = headers.get(reqwest::header::LINK)?.to_str().ok()?;
    link.split(',').find_map(|entry| {
        let (target, params) = entry.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| matches!(p.trim(), "rel=\"next\"" | "rel=next"));
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| url.join(target).ok()).flatten()
    })
}

#[cfg(test)]
mod tag_pages {
    use super::*;

    #[test]
    fn next_pages_stay_on_the_same_list() {
        let first = Url::parse("http://reg.example:5000/v2/app/tags/list").unwrap();
        let mut headers = reqwest::header::HeaderMap::new();
        let mut next = |link: &str| {
            headers.insert(reqwest::header::LINK, link.parse().unwrap());
            next_page(&first, &headers)
        };
        let page = next("</v2/app/tags/list?n=100&last=b>; rel=\"next\"").unwrap();
        assert!(same_list(&first, &page));
        for elsewhere in [
            "<http://169.254.169.254/v2/app/tags/list>; rel=\"next\"",
            "<https://reg.example:5000/v2/app/tags/list>; rel=\"next\"",
            "</v2/other/tags/list>; rel=\"next\"",
            "<http://u:p@reg.example:5000/v2/app/tags/list>; rel=\"next\"",
        ] {
            let page = next(elsewhere).unwrap();
            assert!(!same_list(&first, &page), "{elsewhere}");
        }
        assert_eq!(next("</v2/app/tags/list?last=b>; rel=\"prev\""), None);
    }
}

async fn check_status(
    image: &UpstreamImage,
    reference: &str,
    response: Response,
) -> Result<Response, UpstreamError> {
    let status = response.status();
    match status {
        s if s.is_success() => Ok(response),
        StatusCode::NOT_FOUND => Err(UpstreamError::NotFound {
            image: image.to_string(),
            reference: reference.to_owned(),
        }),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(UpstreamError::Unauthorized {
            image: image.to_string(),
        }),
        // A redirect the client did not follow: its target was not a URL it
        // may follow (`file://`, no host), which the policy never saw.
        s if s.is_redirection() => Err(UpstreamError::Refused(Refusal::Scheme {
            url: response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("(no location)")
                .chars()
                .take(200)
                .collect(),
        })),
        // Throttling is worth a retry; other client errors are permanent,
        // and the upstream's own words say why.
        s if s.is_client_error() && s != StatusCode::TOO_MANY_REQUESTS => {
            let said = read_capped(response, MAX_ERROR_BODY)
                .await
                .ok()
                .flatten()
                .map(|body| error_message(&body))
                .filter(|m| !m.is_empty())
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            Err(UpstreamError::Rejected {
                image: image.to_string(),
                reference: reference.to_owned(),
                status: s.as_u16(),
                said,
            })
        }
        s => Err(UpstreamError::Failing {
            image: image.to_string(),
            status: s.as_u16(),
        }),
    }
}

/// The first OCI error of an error body, as `CODE: message`; else the body's
/// first line, if it is short text.
fn error_message(body: &[u8]) -> String {
    let parsed = serde_json::from_slice::<serde_json::Value>(body).ok();
    if let Some(e) = parsed.as_ref().map(|v| &v["errors"][0])
        && let Some(code) = e["code"].as_str()
    {
        let message = e["message"].as_str().unwrap_or_default();
        return format!("{code}: {message}").chars().take(300).collect();
    }
    String::from_utf8_lossy(body)
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect()
}

/// Parses `Bearer realm="…",service="…",scope="…"` into its scheme and
/// parameters; quoted values may contain commas.
fn parse_challenge(header: &str) -> (String, HashMap<String, String>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    (scheme.to_owned(), params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges_with_commas_in_quotes() {
        let (scheme, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        );
        assert_eq!(scheme, "Bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/busybox:pull,push");
        let (scheme, p) = parse_challenge(r#"Basic realm="basic-realm""#);
        assert_eq!(scheme, "Basic");
        assert_eq!(p["realm"], "basic-realm");
    }
}
