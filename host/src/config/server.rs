//! `[server]`: where the registry listens and which domains route by
//! subdomain. `listen` needs a restart; `domains` reload live.

use std::net::SocketAddr;

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. The `PORT` environment variable replaces the port.
    pub listen: SocketAddr,
    /// Subdomain routing: `<generator>.<domain>` reaches that generator.
    pub domains: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            domains: vec!["localhost".to_owned()],
        }
    }
}
