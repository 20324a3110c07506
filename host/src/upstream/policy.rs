//! Where the upstream client may connect: hosts must be on the allowlist, and
//! whatever a name resolves to (or an address written literally) must not be
//! loopback, private, link-local, cloud metadata or otherwise special — unless
//! that exact host is configured with `allow_private`. Checked for the first
//! request, every redirect and every token realm, and at connect time after
//! DNS resolution, so a name that changes its answer cannot slip through.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use url::{Host, Url};

/// Why a connection was refused; the message names the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "refused to contact {host}: it is not on the upstream allowlist (`[upstream] allow` in kontain.toml)"
    )]
    NotAllowed { host: String },
    #[error(
        "refused to contact {host}: it resolves to {ip}, a loopback, private, link-local or metadata address (allow it with `allow_private` on a named upstream)"
    )]
    SpecialAddress { host: String, ip: IpAddr },
    #[error(
        "refused to contact {url}: a private upstream is reached only as itself, never through another registry's redirect or token realm"
    )]
    PrivateFromElsewhere { url: String },
    #[error("refused to contact {url}: only http and https URLs are allowed")]
    Scheme { url: String },
    #[error("refused to contact {url}: it names no host")]
    NoHost { url: String },
}

impl Refusal {
    /// The rule, as a metrics label.
    pub fn rule(&self) -> &'static str {
        match self {
            Refusal::NotAllowed { .. } => "not_allowed",
            Refusal::SpecialAddress { .. } => "special_address",
            Refusal::PrivateFromElsewhere { .. } => "private_from_elsewhere",
            Refusal::Scheme { .. } => "scheme",
            Refusal::NoHost { .. } => "no_host",
        }
    }

    fn count(&self) {
        crate::metrics::refused(self.rule());
    }
}

/// A host pattern: an exact name or address, `*.example.com` for any
/// subdomain, optionally with `:port` to allow only that port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern {
    host: String,
    port: Option<u16>,
}

impl HostPattern {
    pub fn new(pattern: &str) -> Self {
        let pattern = pattern.trim().to_ascii_lowercase();
        let (host, port) = match pattern.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => match p.parse() {
                Ok(port) => (h.to_owned(), Some(port)),
                Err(_) => (pattern.clone(), None),
            },
            _ => (pattern.clone(), None),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.');
        HostPattern {
            host: host.to_owned(),
            port,
        }
    }

    /// Exactly the host and port of an http(s) URL (a module proxy, a git
    /// host): allowed as itself, and nothing else on that name.
    pub fn exactly(url: &Url) -> Option<Self> {
        let (host, port) = (url.host_str()?, url.port_or_known_default()?);
        Some(HostPattern::new(&format!("{host}:{port}")))
    }

    fn matches_host(&self, host: &str) -> bool {
        match self.host.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host[..host.len() - suffix.len()].ends_with('.')
            }
            None => self.host == host,
        }
    }

    fn matches(&self, host: &str, port: Option<u16>) -> bool {
        self.matches_host(host) && (self.port.is_none() || self.port == port)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Policy {
    allow: Vec<HostPattern>,
    /// Exact hosts (with their port, if given) that may be special addresses.
    private_ok: Vec<HostPattern>,
}

fn normalise(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl Policy {
    /// `private_ok` hosts are allowed too, and may be special addresses.
    pub fn new(
        allow: impl IntoIterator<Item = HostPattern>,
        private_ok: impl IntoIterator<Item = HostPattern>,
    ) -> Self {
        let private_ok: Vec<HostPattern> = private_ok.into_iter().collect();
        let mut allow: Vec<HostPattern> = allow.into_iter().collect();
        allow.extend(private_ok.iter().cloned());
        Policy { allow, private_ok }
    }

    /// The allowlist, for messages and logs.
    pub fn allowed(&self) -> impl Iterator<Item = &HostPattern> {
        self.allow.iter()
    }

    /// May the client send a request to `url`? Names are checked again at
    /// connect time by [`Policy::check_address`]; literal addresses here.
    pub fn check_url(&self, url: &Url) -> Result<(), Refusal> {
        self.url_refusal(url).inspect_err(Refusal::count)
    }

    fn url_refusal(&self, url: &Url) -> Result<(), Refusal> {
        if url.scheme() != "https" && url.scheme() != "http" {
            return Err(Refusal::Scheme {
                url: url.to_string(),
            });
        }
        let (name, literal) = match url.host() {
            Some(Host::Domain(d)) => (normalise(d), None),
            Some(Host::Ipv4(ip)) => (ip.to_string(), Some(IpAddr::V4(ip))),
            Some(Host::Ipv6(ip)) => (ip.to_string(), Some(IpAddr::V6(ip))),
            None => {
                return Err(Refusal::NoHost {
                    url: url.to_string(),
                });
            }
        };
        let port = url.port_or_known_default();
        if !self.allow.iter().any(|p| p.matches(&name, port)) {
            return Err(Refusal::NotAllowed { host: name });
        }
        match literal {
            Some(ip)
                if is_special(ip) && !self.private_ok.iter().any(|p| p.matches(&name, port)) =>
            {
                Err(Refusal::SpecialAddress { host: name, ip })
            }
            _ => Ok(()),
        }
    }

    /// Whether `url` is one of the private upstreams allowed by exception.
    pub fn is_private_exception(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = normalise(host.trim_start_matches('[').trim_end_matches(']'));
        let port = url.port_or_known_default();
        self.private_ok.iter().any(|p| p.matches(&host, port))
    }

    /// Checks a URL reached from `origin` (a redirect or token realm): on top
    /// of [`Policy::check_url`], a private upstream may only be reached from
    /// itself, so a public registry cannot use kontain to read a private one.
    pub fn check_from(&self, origin: &Url, url: &Url) -> Result<(), Refusal> {
        self.check_url(url)?;
        let same_origin = origin.host_str() == url.host_str()
            && origin.port_or_known_default() == url.port_or_known_default();
        if self.is_private_exception(url) && !same_origin {
            let refusal = Refusal::PrivateFromElsewhere {
                url: url.to_string(),
            };
            refusal.count();
            return Err(refusal);
        }
        Ok(())
    }

    /// May the client connect to `ip`, which the name `host` resolved to?
    /// (The resolver does not know the port; the URL check already did.)
    pub fn check_address(&self, host: &str, ip: IpAddr) -> Result<(), Refusal> {
        let host = normalise(host);
        if is_special(ip) && !self.private_ok.iter().any(|p| p.matches_host(&host)) {
            return Err(Refusal::SpecialAddress { host, ip });
        }
        Ok(())
    }
}

/// Addresses no request from the internet should make us reach.
pub fn is_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_special_v4(v4),
        IpAddr::V6(v6) => is_special_v6(v6),
    }
}

fn is_special_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16, cloud metadata among them
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (100.100.100.200: Alibaba metadata)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn is_special_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_special_v4(v4);
    }
    let s = ip.segments();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local, fd00:ec2::254 (AWS metadata) among them
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        // Addresses that embed an IPv4 address: judge that address.
        || (s[0] == 0x0064 && s[1] == 0xff9b && is_special_v4(embedded_v4(s[6], s[7]))) // NAT64
        || (s[0] == 0x2002 && is_special_v4(embedded_v4(s[1], s[2]))) // 6to4
        || (s[..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible (deprecated)
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    let [a, b] = hi.to_be_bytes();
    let [c, d] = lo.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// The policy in force, replaced as a whole when the config reloads; every
/// check reads the one current at that moment.
#[derive(Clone, Default)]
pub struct SharedPolicy(Arc<ArcSwap<Policy>>);

impl SharedPolicy {
    pub fn new(policy: Policy) -> Self {
        SharedPolicy(Arc::new(ArcSwap::from_pointee(policy)))
    }

    pub fn current(&self) -> Arc<Policy> {
        self.0.load_full()
    }

    pub fn replace(&self, policy: Policy) {
        self.0.store(Arc::new(policy));
    }
}

/// A DNS resolver for the HTTP client that drops special addresses, so the
/// check happens on exactly the addresses that will be dialled.
pub struct CheckedResolver {
    pub policy: SharedPolicy,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.current();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| match policy.check_address(&host, a.ip()) {
                    Ok(()) => true,
                    Err(r) => {
                        refusal.get_or_insert(r);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refusal) {
                (true, Some(r)) => Err({
                    r.count();
                    Box::new(r) as Box<dyn std::error::Error + Send + Sync>
                }),
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_addresses_include_metadata_private_and_loopback() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            assert!(is_special(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "104.16.1.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
        ] {
            assert!(!is_special(ip.parse().unwrap()), "{ip}");
        }
    }

    fn policy() -> Policy {
        Policy::new(
            [
                HostPattern::new("ghcr.io"),
                HostPattern::new("*.docker.com"),
                HostPattern::new("localhost"),
            ],
            [HostPattern::new("127.0.0.1:5000")],
        )
    }

    fn check(url: &str) -> Result<(), Refusal> {
        policy().check_url(&Url::parse(url).unwrap())
    }

    #[test]
    fn urls_must_name_allowed_hosts() {
        assert_eq!(check("https://ghcr.io/v2/"), Ok(()));
        assert_eq!(check("https://production.cloudflare.docker.com/x"), Ok(()));
        assert_eq!(check("http://127.0.0.1:5000/v2/"), Ok(()));
        assert!(matches!(
            check("http://127.0.0.1:5001/v2/"),
            Err(Refusal::NotAllowed { .. })
        ));
        assert!(matches!(check("http://localhost:5001/v2/"), Ok(())));
        assert!(matches!(
            check("https://docker.com/"),
            Err(Refusal::NotAllowed { .. })
        ));
        assert!(matches!(
            check("https://evil-ghcr.io/"),
            Err(Refusal::NotAllowed { .. })
        ));
        assert!(matches!(
            check("http://169.254.169.254/latest"),
            Err(Refusal::NotAllowed { .. })
        ));
        assert!(matches!(
            check("http://127.0.0.2/"),
            Err(Refusal::NotAllowed { .. })
        ));
        assert!(matches!(
            check("file:///etc/passwd"),
            Err(Refusal::Scheme { .. })
        ));
        let private = Url::parse("http://127.0.0.1:5000/v2/x").unwrap();
        let public = Url::parse("https://ghcr.io/v2/x").unwrap();
        assert_eq!(policy().check_from(&private, &private), Ok(()));
        assert!(matches!(
            policy().check_from(&public, &private),
            Err(Refusal::PrivateFromElsewhere { .. })
        ));
    }

    #[test]
    fn allowed_names_may_not_resolve_to_special_addresses_unless_private_is_allowed() {
        let p = policy();
        assert!(
            p.check_address("localhost", "127.0.0.1".parse().unwrap())
                .is_err()
        );
        assert!(
            p.check_address("ghcr.io", "10.0.0.1".parse().unwrap())
                .is_err()
        );
        assert!(
            p.check_address("ghcr.io", "140.82.1.1".parse().unwrap())
                .is_ok()
        );
        assert!(
            p.check_address("127.0.0.1", "127.0.0.1".parse().unwrap())
                .is_ok()
        );
    }
}
