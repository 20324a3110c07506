//! Which generator a request reaches: by `Host` (subdomain mode:
//! `random.<domain>`, or a host listed for a generator) first, then by the
//! first path segment (`/v2/random/...`). Pure lookup, built from config.

use std::collections::HashMap;

use crate::generator::Route;
use crate::oci::RepositoryName;

#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    /// Exact host names (lowercase, without port) → generator.
    hosts: HashMap<String, String>,
    /// First path segment → generator.
    prefixes: HashMap<String, String>,
}

impl RouteTable {
    /// `generators` lists, per generator: its name, the hosts it answers
    /// (subdomains of `domains` are added here), and its path prefix.
    pub fn new<'a>(
        domains: &[String],
        generators: impl IntoIterator<Item = (&'a str, &'a [String], Option<&'a str>)>,
    ) -> Self {
        let mut table = RouteTable::default();
        for (name, hosts, prefix) in generators {
            for host in hosts {
                table
                    .hosts
                    .insert(host.to_ascii_lowercase(), name.to_owned());
            }
            for domain in domains {
                let host = format!("{name}.{}", domain.to_ascii_lowercase());
                table.hosts.entry(host).or_insert_with(|| name.to_owned());
            }
            if let Some(prefix) = prefix {
                table.prefixes.insert(prefix.to_owned(), name.to_owned());
            }
        }
        table
    }

    pub fn route(&self, host: Option<&str>, name: &RepositoryName) -> Option<Route> {
        if let Some(generator) = host.and_then(|h| self.hosts.get(&strip_port(h))) {
            return Some(Route {
                generator: generator.clone(),
                repository: name.as_str().to_owned(),
            });
        }
        let (first, rest) = name.split_first();
        self.prefixes.get(first).map(|generator| Route {
            generator: generator.clone(),
            repository: rest.unwrap_or_default().to_owned(),
        })
    }
}

fn strip_port(host: &str) -> String {
    let host = host.trim().trim_end_matches('.');
    let without_port = match host.rsplit_once(':') {
        // `[::1]:8080` or `name:8080`; a bare IPv6 address has more colons.
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    without_port.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let mirror_hosts = ["registry.example.org".to_owned()];
        RouteTable::new(
            &["kontain.example".to_owned()],
            [
                ("random", &[][..], Some("random")),
                ("mirror", &mirror_hosts[..], Some("mirror")),
                ("hidden", &[][..], None),
            ],
        )
    }

    fn name(s: &str) -> RepositoryName {
        s.parse().unwrap()
    }

    fn route(g: &str, r: &str) -> Option<Route> {
        Some(Route {
            generator: g.into(),
            repository: r.into(),
        })
    }

    #[test]
    fn routes_by_subdomain_host_and_path() {
        let t = table();
        for (host, repo, want) in [
            (
                Some("random.kontain.example"),
                "foo",
                route("random", "foo"),
            ),
            (
                Some("RANDOM.kontain.example:8080"),
                "foo",
                route("random", "foo"),
            ),
            (
                Some("registry.example.org"),
                "library/busybox",
                route("mirror", "library/busybox"),
            ),
            (Some("localhost:8080"), "random", route("random", "")),
            (
                None,
                "mirror/library/busybox",
                route("mirror", "library/busybox"),
            ),
            (Some("hidden.kontain.example"), "x", route("hidden", "x")),
            (Some("localhost:8080"), "hidden/x", None),
            (Some("localhost"), "nothing/here", None),
            (Some("[::1]:8080"), "random", route("random", "")),
        ] {
            assert_eq!(t.route(host, &name(repo)), want, "{host:?} {repo}");
        }
    }
}
