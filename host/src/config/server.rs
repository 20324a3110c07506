//! `[server]`: where the registry listens, which domains route by
//! subdomain, and how long and how many connections it keeps. `domains`
//! reload live; the rest needs a restart.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::units::duration;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. The `PORT` environment variable replaces the port.
    pub listen: SocketAddr,
    /// Subdomain routing: `<generator>.<domain>` reaches that generator.
    pub domains: Vec<String>,
    /// A connection must send a whole request head within this long of its
    /// first byte (or of opening, for a connection that sends nothing).
    #[serde(with = "duration")]
    pub header_timeout: Duration,
    /// A kept-alive connection with no request for this long is closed.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// A manifest request waits this long at most for the build (or other
    /// long work) it started or joined; then it is answered 429 with
    /// `Retry-After` while the work goes on. Under the 30 s that containerd
    /// waits for response headers. `0s`: wait as long as the work takes.
    #[serde(with = "duration")]
    pub hold: Duration,
    /// Where `/metrics` is served (Prometheus text), apart from the
    /// registry so that a public registry does not publish its internals;
    /// `""` turns metrics off. `KONTAIN_METRICS_LISTEN` replaces it.
    #[serde(deserialize_with = "optional_address")]
    pub metrics_listen: Option<SocketAddr>,
    /// Proxies (address ranges) whose `Forwarded`/`X-Forwarded-For` are
    /// believed when telling clients apart; a request from anywhere else is
    /// its peer's. Behind a load balancer, its ranges.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The header those proxies write the chain in (only it is read):
    /// `x-forwarded-for` or `forwarded`.
    pub forwarded_header: crate::fair::client::ForwardedHeader,
    /// Builds (ko, buildpack, flatten) running at once; 0: one per core.
    /// The rest wait, turns going round the clients.
    pub concurrent_builds: usize,
    /// Builds waiting at most; past it a client is answered 429 with
    /// `Retry-After`.
    pub queued_builds: usize,
    /// Open connections at most; past it the longest-idle one is closed to
    /// make room. Lowered at start to what the descriptor limit allows.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            domains: vec!["localhost".to_owned()],
            // Above what any real client needs to send a request head on a
            // slow link; below the 30 s kubelets and containerd wait for an
            // answer, so a flood of silent sockets clears before they give up.
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            hold: Duration::from_secs(25),
            max_connections: 4096,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            trusted_proxies: Vec::new(),
            forwarded_header: Default::default(),
            concurrent_builds: 0,
            queued_builds: 100,
        }
    }
}

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), super::Invalid> {
        let invalid =
            |key: &str, message: &str| super::Invalid::new(format!("server.{key}"), message);
        if self.header_timeout.is_zero() {
            return Err(invalid("header_timeout", "must be more than zero"));
        }
        if self.idle_timeout.is_zero() {
            return Err(invalid("idle_timeout", "must be more than zero"));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        Ok(())
    }
}

/// An `address:port`, or `""` for none.
fn optional_address<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    parse_optional_address(&text).map_err(serde::de::Error::custom)
}

pub(super) fn parse_optional_address(text: &str) -> Result<Option<SocketAddr>, String> {
    match text.trim() {
        "" => Ok(None),
        t => t
            .parse()
            .map(Some)
            .map_err(|_| format!("{text:?} is not an address:port (or \"\" for none)")),
    }
}
