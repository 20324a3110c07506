//! The pages people read, outside the API: `/` says what this registry
//! serves (each generator with a `docker pull` written for the host the
//! visitor used), the builds running now and the last ones, and storage;
//! `/i/<name>:<tag>` (or `@<digest>`) shows an image: its manifest, its
//! layers and sizes, and which other stored images share each layer.
//!
//! Server-rendered HTML, no script. Everything shown is escaped; nothing
//! names a server path (storage is described by backend and figures only).

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::activity::{Ended, Running};
use crate::generator::{Listed, Site};
use crate::oci::Digest;
use crate::storage::{ContentStore, StorageError, StoredManifest, Usage};

/// How storage is set up, as the landing page describes it.
#[derive(Clone, Debug, Default)]
pub struct About {
    pub backend: &'static str,
    pub ttl: Duration,
    pub collect_every: Duration,
}

/// How long a listing of storage is shown again before it is made anew
/// (listing a big bucket is not free, and anyone may load the page).
const LISTING_FOR: Duration = Duration::from_secs(30);

/// Stored manifests read to find which share a layer, most recently used
/// first.
const MAX_SHARING_SCAN: usize = 300;

/// Other images named per layer at most.
const MAX_SHARERS: usize = 5;

#[derive(Default)]
pub struct Pages {
    pub about: About,
    /// The last listing, or that it failed, and when.
    listing: tokio::sync::Mutex<Option<(Instant, Option<Arc<Listing>>)>>,
}

/// A listing of storage: usage, and for each blob, the stored manifests
/// that refer to it.
#[derive(Clone, Default)]
struct Listing {
    usage: Usage,
    users: HashMap<Digest, Vec<Digest>>,
}

impl Pages {
    pub fn new(about: About) -> Self {
        Pages {
            about,
            listing: Default::default(),
        }
    }

    /// A listing of storage made within [`LISTING_FOR`] (`None` if it
    /// failed then: a failure is not retried at every visit either).
    async fn listing(&self, store: &ContentStore) -> Option<Arc<Listing>> {
        let mut cached = self.listing.lock().await;
        if let Some((at, listing)) = &*cached
            && at.elapsed() < LISTING_FOR
        {
            return listing.clone();
        }
        let listing = match Self::list(store).await {
            Ok(listing) => Some(Arc::new(listing)),
            Err(e) => {
                tracing::warn!(error = %e, "listing storage for the pages failed");
                None
            }
        };
        *cached = Some((Instant::now(), listing.clone()));
        listing
    }

    async fn list(store: &ContentStore) -> Result<Listing, StorageError> {
        let usage = store.usage().await?;
        let mut users: HashMap<Digest, Vec<Digest>> = HashMap::new();
        for digest in usage.manifest_digests.iter().take(MAX_SHARING_SCAN) {
            if let Some(stored) = store.peek_manifest(digest).await? {
                for blob in crate::oci::references(&stored.bytes) {
                    users.entry(blob).or_default().push(digest.clone());
                }
            }
        }
        Ok(Listing { usage, users })
    }

    /// `/`, for a visitor who reached us as `host`.
    pub async fn landing(&self, store: &ContentStore, site: &Site, host: Option<&str>) -> String {
        let (running, ended) = crate::activity::snapshot();
        let listing = self.listing(store).await;
        let mut page = String::new();
        head(&mut page, "kontain");
        page.push_str(
            "<h1>kontain</h1>\n<p>A container registry that makes images when you pull them.</p>\n",
        );
        page.push_str("<h2>What it serves</h2>\n");
        if site.generators.is_empty() {
            page.push_str("<p>No generator is loaded.</p>\n");
        }
        for generator in &site.generators {
            generator_section(&mut page, generator, &site.domains, host);
        }
        builds(&mut page, &running, &ended);
        page.push_str("<h2>Storage</h2>\n<p>");
        match listing.as_deref() {
            Some(Listing { usage, .. }) => {
                let _ = write!(
                    page,
                    "{} blobs and {} manifests, {} in all, on {}.",
                    usage.blobs,
                    usage.manifests,
                    bytes(usage.bytes),
                    self.about.backend
                );
            }
            None => {
                let _ = write!(
                    page,
                    "On {}; it could not be listed just now.",
                    self.about.backend
                );
            }
        }
        match self.about.ttl.is_zero() {
            true => page.push_str(" Nothing expires.</p>\n"),
            false => {
                let _ = writeln!(
                    page,
                    " Content unused for {} is removed (checked every {}).</p>",
                    humantime::format_duration(self.about.ttl),
                    humantime::format_duration(self.about.collect_every)
                );
            }
        }
        page.push_str(
            "<p class=small>The API is at <code>/v2/</code>; <code>/i/&lt;image&gt;</code> shows an image \
             (e.g. <code>/i/random:2x100</code>).</p>\n",
        );
        foot(&mut page);
        page
    }

    /// `/i/<image>`: the image `name` at `reference`, as `stored`.
    pub async fn image(
        &self,
        store: &ContentStore,
        name: &str,
        reference: &str,
        stored: &StoredManifest,
    ) -> String {
        let at = match reference.contains(':') {
            true => format!("{name}@{reference}"),
            false => format!("{name}:{reference}"),
        };
        let document: serde_json::Value = serde_json::from_slice(&stored.bytes).unwrap_or_default();
        let listing = self.listing(store).await.unwrap_or_default();
        let users = &listing.users;
        let mut page = String::new();
        head(&mut page, &at);
        let _ = writeln!(
            page,
            "<p><a href=\"/\">kontain</a></p>\n<h1>{}</h1>\n<p><code>{}</code><br>{} · {}</p>",
            escape(&at),
            escape(&stored.digest.to_string()),
            escape(stored.media_type.as_str()),
            bytes(stored.bytes.len() as u64)
        );
        if let Some(children) = document["manifests"].as_array() {
            page.push_str("<h2>Platforms</h2>\n<table><tr><th>platform</th><th>manifest</th><th>size</th></tr>\n");
            for child in children {
                let digest = child["digest"].as_str().unwrap_or_default();
                let platform = &child["platform"];
                let platform = [
                    &platform["os"],
                    &platform["architecture"],
                    &platform["variant"],
                ]
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join("/");
                let kind = child["artifactType"].as_str().unwrap_or("");
                let _ = writeln!(
                    page,
                    "<tr><td>{}</td><td><a href=\"/i/{}@{}\"><code>{}</code></a></td><td>{}</td></tr>",
                    escape(if platform.is_empty() { kind } else { &platform }),
                    escape(name),
                    escape(digest),
                    escape(short(digest)),
                    bytes(child["size"].as_u64().unwrap_or_default())
                );
            }
            page.push_str("</table>\n");
        } else {
            page.push_str("<h2>Layers</h2>\n<table><tr><th>#</th><th>layer</th><th>size</th><th>also in</th></tr>\n");
            let layers = document["layers"].as_array().cloned().unwrap_or_default();
            let mut total = 0;
            for (n, layer) in layers.iter().enumerate() {
                let digest = layer["digest"].as_str().unwrap_or_default();
                let size = layer["size"].as_u64().unwrap_or_default();
                total += size;
                let others: Vec<&Digest> = digest
                    .parse::<Digest>()
                    .ok()
                    .and_then(|d| users.get(&d))
                    .into_iter()
                    .flatten()
                    .filter(|m| **m != stored.digest)
                    .collect();
                let shared = match others.len() {
                    0 => "—".to_owned(),
                    n => {
                        let mut names: Vec<String> = others
                            .iter()
                            .take(MAX_SHARERS)
                            .map(|d| format!("<code>{}</code>", escape(short(&d.to_string()))))
                            .collect();
                        if n > MAX_SHARERS {
                            names.push(format!("and {} more", n - MAX_SHARERS));
                        }
                        names.join(", ")
                    }
                };
                let _ = writeln!(
                    page,
                    "<tr><td>{}</td><td><code title=\"{}\">{}</code><br><span class=small>{}</span></td><td>{}</td><td>{}</td></tr>",
                    n + 1,
                    escape(digest),
                    escape(short(digest)),
                    escape(layer["mediaType"].as_str().unwrap_or_default()),
                    bytes(size),
                    shared
                );
            }
            let _ = writeln!(
                page,
                "</table>\n<p>{} layers, {} compressed.</p>",
                layers.len(),
                bytes(total)
            );
        }
        let pretty = serde_json::to_string_pretty(&document).unwrap_or_default();
        let _ = writeln!(page, "<h2>Manifest</h2>\n<pre>{}</pre>", escape(&pretty));
        foot(&mut page);
        page
    }

    /// An error page for `/i/...`.
    pub fn failed(&self, what: &str, status: http::StatusCode, message: &str) -> String {
        let mut page = String::new();
        head(&mut page, what);
        let _ = writeln!(
            page,
            "<p><a href=\"/\">kontain</a></p>\n<h1>{}</h1>\n<p>{} {}</p>\n<p>{}</p>",
            escape(what),
            status.as_u16(),
            escape(status.canonical_reason().unwrap_or_default()),
            escape(message)
        );
        foot(&mut page);
        page
    }
}

fn generator_section(
    page: &mut String,
    generator: &Listed,
    domains: &[String],
    host: Option<&str>,
) {
    let _ = writeln!(
        page,
        "<section class=generator id=\"g-{0}\"><h3>{0}</h3>",
        escape(&generator.name)
    );
    if let Some(about) = &generator.about {
        let _ = writeln!(page, "<p>{}</p>", escape(about));
    }
    for pull in examples(generator, domains, host) {
        let _ = writeln!(page, "<pre class=pull>docker pull {}</pre>", escape(&pull));
    }
    page.push_str("</section>\n");
}

/// The `docker pull` arguments for a generator's example, as a visitor at
/// `host` would write them: by path, and by subdomain when the visitor's
/// host is (a subdomain of) a routing domain.
fn examples(generator: &Listed, domains: &[String], host: Option<&str>) -> Vec<String> {
    let host = host.unwrap_or("localhost:8080").trim().to_ascii_lowercase();
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if !n.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => {
            (n.to_owned(), format!(":{p}"))
        }
        _ => (host.clone(), String::new()),
    };
    // No example configured: the shape of a name, for the visitor to fill.
    let example = generator.example.as_deref().unwrap_or("<repository>:<tag>");
    let mut pulls = Vec::new();
    let domain = domains.iter().map(|d| d.to_ascii_lowercase()).find(|d| {
        name == *d
            || name
                .strip_suffix(d.as_str())
                .is_some_and(|s| s.ends_with('.'))
    });
    let base = match &domain {
        // A visitor at `random.example.com` writes the other generators'
        // pulls against `example.com`.
        Some(d) => format!("{d}{port}"),
        None => host.clone(),
    };
    if let Some(path) = &generator.path {
        let joint = if example.starts_with(':') { "" } else { "/" };
        pulls.push(format!("{base}/{path}{joint}{example}"));
    }
    if let Some(d) = domain {
        let repository = if example.starts_with(':') {
            format!("{}{example}", generator.name)
        } else {
            example.to_owned()
        };
        pulls.push(format!("{}.{d}{port}/{repository}", generator.name));
    }
    pulls
}

fn builds(page: &mut String, running: &[Running], ended: &[Ended]) {
    page.push_str("<h2>Building now</h2>\n");
    if running.is_empty() {
        page.push_str("<p>Nothing.</p>\n");
    } else {
        page.push_str("<table id=running><tr><th>generator</th><th>image</th><th>phase</th><th>for</th></tr>\n");
        for r in running {
            let _ = writeln!(
                page,
                "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{:.0} s</td></tr>",
                escape(&r.generator),
                escape(&r.image),
                escape(&r.phase),
                r.started.elapsed().as_secs_f64()
            );
        }
        page.push_str("</table>\n");
    }
    page.push_str("<h2>Last builds</h2>\n");
    if ended.is_empty() {
        page.push_str("<p>None yet.</p>\n");
        return;
    }
    page.push_str("<table id=ended><tr><th>generator</th><th>image</th><th>took</th><th>ended</th><th>result</th></tr>\n");
    for e in ended {
        let ago = SystemTime::now()
            .duration_since(e.at)
            .unwrap_or_default()
            .as_secs();
        let result = match &e.failure {
            None => "built".to_owned(),
            Some(why) => format!("<span class=failed>failed:</span> {}", escape(why)),
        };
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td><code>{}</code></td><td>{:.1} s</td><td>{ago} s ago</td><td>{result}</td></tr>",
            escape(&e.generator),
            escape(&e.image),
            e.seconds
        );
    }
    page.push_str("</table>\n");
}

fn head(page: &mut String, title: &str) {
    let _ = write!(
        page,
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n",
        escape(title)
    );
}

fn foot(page: &mut String) {
    page.push_str("</body></html>\n");
}

const STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;max-width:52rem;margin:0 auto;padding:1rem;color:#222}\
    h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;margin-top:2rem}h3{margin-bottom:.2rem}\
    pre,code{font:14px ui-monospace,monospace}pre{background:#f4f4f4;padding:.5rem;overflow-x:auto}\
    table{border-collapse:collapse;width:100%;display:block;overflow-x:auto}\
    td,th{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #eee;vertical-align:top}\
    .small{font-size:13px;color:#666}.failed{color:#b00}p code{word-break:break-all}";

/// `sha256:0123456789ab` from a digest.
fn short(digest: &str) -> &str {
    let end = digest.find(':').map_or(12, |c| c + 13);
    digest.get(..end).unwrap_or(digest)
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

/// Text for HTML content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(name: &str, example: &str) -> Listed {
        Listed {
            name: name.into(),
            path: Some(name.into()),
            about: None,
            example: Some(example.into()),
            budget: Default::default(),
        }
    }

    #[test]
    fn examples_follow_the_host_the_visitor_used() {
        let domains = vec!["kontain.example".to_owned()];
        let random = listed("random", ":4x100");
        assert_eq!(
            examples(&random, &domains, Some("127.0.0.1:8080")),
            ["127.0.0.1:8080/random:4x100"]
        );
        assert_eq!(
            examples(&random, &domains, Some("kontain.example")),
            [
                "kontain.example/random:4x100",
                "random.kontain.example/random:4x100"
            ]
        );
        let mirror = listed("mirror", "busybox:latest");
        assert_eq!(
            examples(&mirror, &domains, Some("random.kontain.example:8080")),
            [
                "kontain.example:8080/mirror/busybox:latest",
                "mirror.kontain.example:8080/busybox:latest"
            ]
        );
        let hidden = Listed {
            path: None,
            ..listed("ko", "example.com/app")
        };
        assert!(examples(&hidden, &domains, Some("localhost")).is_empty());
    }

    #[test]
    fn text_is_escaped_and_sizes_are_readable() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_500_000), "1.5 MB");
        assert_eq!(short("sha256:0123456789abcdef"), "sha256:0123456789ab");
    }
}
