//! Turning what a user writes after a generator's prefix into a registry and
//! a repository: `busybox` is Docker Hub's `library/busybox`, a first
//! component with a dot (`ghcr.io/org/app`) is a registry host, and a first
//! component naming a configured upstream (`local/app`) is that upstream —
//! the only way to reach a registry with a port, since `:` cannot appear in
//! a repository name.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use url::Url;

use crate::oci::RepositoryName;

/// Docker Hub's API host, which `docker.io` names stand for.
pub const DOCKER_HUB: &str = "registry-1.docker.io";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// A registry the client can talk to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// How users and logs name it: `docker.io`, `ghcr.io`, `local`.
    pub name: String,
    /// `scheme://host[:port]`, without a path.
    pub base: Url,
    pub credentials: Option<Credentials>,
}

#[derive(Clone, Debug)]
pub struct UpstreamImage {
    pub endpoint: Arc<Endpoint>,
    /// The repository on that registry: `library/busybox`.
    pub repository: String,
}

impl UpstreamImage {
    /// `<base>/v2/<repository>/<kind>/<reference>`
    pub fn url(&self, kind: &str, reference: &str) -> Result<Url, url::ParseError> {
        self.endpoint
            .base
            .join(&format!("/v2/{}/{kind}/{reference}", self.repository))
    }

    /// A stable key for caches: registry base plus repository.
    pub fn cache_key(&self) -> String {
        format!("{}{}", self.endpoint.base, self.repository)
    }
}

impl fmt::Display for UpstreamImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.endpoint.name, self.repository)
    }
}

/// Named upstreams and per-host credentials, from `kontain.toml`.
#[derive(Clone, Debug, Default)]
pub struct Registries {
    named: HashMap<String, Arc<Endpoint>>,
    credentials: HashMap<String, Credentials>,
}

impl Registries {
    pub fn new(
        named: HashMap<String, Arc<Endpoint>>,
        credentials: HashMap<String, Credentials>,
    ) -> Self {
        Registries { named, credentials }
    }

    pub fn parse(&self, image: &str) -> Result<UpstreamImage, String> {
        let name: RepositoryName = image
            .parse()
            .map_err(|e| format!("{image:?} is not an image name: {e}"))?;
        let (first, rest) = name.split_first();
        if let Some(endpoint) = self.named.get(first) {
            let repository = rest.ok_or_else(|| {
                format!("{image:?} names the upstream {first:?} but no repository in it")
            })?;
            return Ok(UpstreamImage {
                endpoint: endpoint.clone(),
                repository: repository.to_owned(),
            });
        }
        let (host, repository) = match rest {
            Some(rest) if first.contains('.') || first == "localhost" => (first, rest.to_owned()),
            _ => ("docker.io", name.as_str().to_owned()),
        };
        let (display, api_host) = match host {
            "docker.io" | "index.docker.io" | DOCKER_HUB => ("docker.io", DOCKER_HUB),
            other => (other, other),
        };
        let repository = if api_host == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let base = Url::parse(&format!("https://{api_host}/"))
            .map_err(|e| format!("{host:?} is not a registry host: {e}"))?;
        Ok(UpstreamImage {
            endpoint: Arc::new(Endpoint {
                name: display.to_owned(),
                credentials: self.credentials.get(api_host).cloned(),
                base,
            }),
            repository,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registries() -> Registries {
        let local = Arc::new(Endpoint {
            name: "local".into(),
            base: Url::parse("http://127.0.0.1:5000/").unwrap(),
            credentials: None,
        });
        Registries::new([("local".to_owned(), local)].into(), HashMap::new())
    }

    #[test]
    fn follows_docker_naming_and_named_upstreams() {
        let r = registries();
        for (image, want) in [
            (
                "busybox",
                "https://registry-1.docker.io/v2/library/busybox/manifests/latest",
            ),
            (
                "library/busybox",
                "https://registry-1.docker.io/v2/library/busybox/manifests/latest",
            ),
            (
                "docker.io/busybox",
                "https://registry-1.docker.io/v2/library/busybox/manifests/latest",
            ),
            (
                "grafana/grafana",
                "https://registry-1.docker.io/v2/grafana/grafana/manifests/latest",
            ),
            (
                "ghcr.io/org/app",
                "https://ghcr.io/v2/org/app/manifests/latest",
            ),
            ("local/app", "http://127.0.0.1:5000/v2/app/manifests/latest"),
            ("local/a/b", "http://127.0.0.1:5000/v2/a/b/manifests/latest"),
            ("localhost/app", "https://localhost/v2/app/manifests/latest"),
        ] {
            let img = r.parse(image).unwrap();
            assert_eq!(
                img.url("manifests", "latest").unwrap().as_str(),
                want,
                "{image}"
            );
        }
        assert_eq!(
            r.parse("busybox").unwrap().to_string(),
            "docker.io/library/busybox"
        );
    }

    #[test]
    fn rejects_names_that_are_not_repositories() {
        let r = registries();
        for bad in ["", "local", "Busybox", "a/../b", "ghcr.io:443/x"] {
            assert!(r.parse(bad).is_err(), "{bad}");
        }
    }
}
