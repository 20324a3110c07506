//! Who a request comes from: the connection's peer, or, when the peer is a
//! trusted proxy (a load balancer, Cloud Run's front end), the address that
//! proxy says it forwarded for.

use std::net::{IpAddr, Ipv6Addr};

use http::HeaderMap;
use ipnet::IpNet;

/// A client, as budgets and the build queue count them: an IPv4 address,
/// or an IPv6 /64 (what one subscriber is usually given, so that hopping
/// addresses within it does not buy a new budget).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Client(IpAddr);

impl Client {
    pub fn of(address: IpAddr) -> Self {
        match address {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    Client(IpAddr::V6(Ipv6Addr::from(bits)))
                }
            },
            v4 => Client(v4),
        }
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            v4 => write!(f, "{v4}"),
        }
    }
}

/// Which header trusted proxies write the forwarding chain in. Only that
/// one is read: proxies append to their own header and pass the other
/// through as the client sent it, so reading both would let a client
/// choose its own address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (nginx, Envoy, Google's and AWS's load balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=...`.
    Forwarded,
}

/// The client of a request from `peer` with `headers`: the peer, unless it
/// is in `trusted`; then the nearest address in the forwarding chain of
/// `header` (read from the right) that is not itself trusted. Addresses a
/// client wrote further left are not believed: anyone can send those.
pub fn client_of(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    header: ForwardedHeader,
) -> Client {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return Client::of(peer);
    }
    let chain = match header {
        ForwardedHeader::XForwardedFor => x_forwarded_for(headers),
        ForwardedHeader::Forwarded => forwarded(headers),
    };
    let mut client = peer;
    for hop in chain.into_iter().rev() {
        client = hop;
        if !is_trusted(&hop) {
            break;
        }
    }
    Client::of(client)
}

/// The `for=` addresses of every `Forwarded` element, in order (RFC 7239).
fn forwarded(headers: &HeaderMap) -> Vec<IpAddr> {
    headers
        .get_all(http::header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (key, value) = pair.trim().split_once('=')?;
                key.eq_ignore_ascii_case("for").then(|| node(value))?
            })
        })
        .collect()
}

/// An RFC 7239 node: `192.0.2.1`, `"[2001:db8::1]:4711"`, `"192.0.2.1:80"`.
fn node(value: &str) -> Option<IpAddr> {
    let value = value.trim().trim_matches('"');
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    let host = match value.split_once(':') {
        Some((host, _port)) => host,
        None => value,
    };
    host.parse().ok()
}

fn x_forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| {
            let a = a.trim();
            a.parse().ok().or_else(|| node(a))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = ForwardedHeader::XForwardedFor;
        let client = |peer: &str, h: &HeaderMap, which| {
            client_of(peer.parse().unwrap(), h, &trusted, which).to_string()
        };
        let spoof = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(client("203.0.113.9", &spoof, xff), "203.0.113.9");
        // The client's own claim (1.2.3.4) is left of what the proxy saw.
        let chain = headers(&[("x-forwarded-for", "1.2.3.4, 198.51.100.7, 10.9.9.9")]);
        assert_eq!(client("10.1.2.3", &chain, xff), "198.51.100.7");
        // The other header, sent by the client and passed through: ignored.
        let both = headers(&[
            ("forwarded", "for=192.0.2.99"),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        assert_eq!(client("10.1.2.3", &both, xff), "198.51.100.7");
        let rfc = headers(&[(
            "forwarded",
            "for=192.0.2.60;proto=http, for=\"[2001:db8:cafe::17]:4711\"",
        )]);
        let fwd = ForwardedHeader::Forwarded;
        assert_eq!(client("10.1.2.3", &rfc, fwd), "2001:db8:cafe::/64");
        // Nothing forwarded: the proxy itself.
        assert_eq!(client("10.1.2.3", &HeaderMap::new(), xff), "10.1.2.3");
    }
}
