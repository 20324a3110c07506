//! Fair use, for a registry open to anyone: per-client budgets (token
//! buckets on requests, on bytes generated and on builds started, set per
//! generator) and a build queue whose turns go round the clients.
//!
//! Clients are told apart by address ([`client`]): the connection's peer,
//! or the forwarded-for address when the peer is a configured trusted
//! proxy. What is already stored costs nothing to make: pulling it spends
//! only the request budget, never the generation ones.

mod budget;
pub mod client;
mod queue;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use ipnet::IpNet;

use crate::config::generators::Budget;
use crate::config::server::ServerConfig;
pub use budget::Kind;
use budget::{Buckets, Rate};
pub use client::Client;
pub use queue::Turn;

/// A budget spent, or the build queue full: what to tell the client.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    pub message: String,
    pub retry_after: Duration,
}

pub struct Fairness {
    trusted: Vec<IpNet>,
    header: client::ForwardedHeader,
    buckets: Buckets,
    queue: Arc<queue::Queue>,
}

/// How long a client turned away by a full queue is asked to wait.
const QUEUE_RETRY: Duration = Duration::from_secs(30);

impl Fairness {
    pub fn new(server: &ServerConfig) -> Self {
        let slots = match server.concurrent_builds {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Fairness {
            trusted: server.trusted_proxies.clone(),
            header: server.forwarded_header,
            buckets: Buckets::default(),
            queue: queue::Queue::new(slots, server.queued_builds),
        }
    }

    /// Who sent a request from `peer` with `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> Client {
        client::client_of(peer, headers, &self.trusted, self.header)
    }

    fn denied(generator: &str, kind: Kind, budget: String, wait: Duration) -> Denied {
        Denied {
            message: format!(
                "too many {} from your address for {generator} (at most {budget}); try again in {} s",
                kind.name(),
                wait.as_secs().max(1)
            ),
            retry_after: wait,
        }
    }

    /// Spends one request of `client`'s budget with `generator`.
    pub fn request(&self, generator: &str, client: Client, budget: &Budget) -> Result<(), Denied> {
        let Some(rate) = requests(budget) else {
            return Ok(());
        };
        self.buckets
            .take(generator, Kind::Requests, client, rate, 1.0)
            .map_err(|wait| {
                let per = format!("{} a minute", budget.requests);
                Self::denied(generator, Kind::Requests, per, wait)
            })
    }

    /// Whether `client` may have new bytes made (what they cost is known
    /// after, and charged with [`Fairness::generated`]).
    pub fn may_generate(
        &self,
        generator: &str,
        client: Client,
        budget: &Budget,
    ) -> Result<(), Denied> {
        let Some(rate) = bytes(budget) else {
            return Ok(());
        };
        self.buckets
            .check(generator, Kind::Bytes, client, rate)
            .map_err(|wait| {
                let per = format!("{} an hour", budget.generated_bytes);
                Self::denied(generator, Kind::Bytes, per, wait)
            })
    }

    /// Spends `n` bytes about to be made for `client`.
    pub fn generate(
        &self,
        generator: &str,
        client: Client,
        budget: &Budget,
        n: u64,
    ) -> Result<(), Denied> {
        let Some(rate) = bytes(budget) else {
            return Ok(());
        };
        self.buckets
            .take(generator, Kind::Bytes, client, rate, n as f64)
            .map_err(|wait| {
                let per = format!("{} an hour", budget.generated_bytes);
                Self::denied(generator, Kind::Bytes, per, wait)
            })
    }

    pub fn generated(&self, generator: &str, client: Client, budget: &Budget, n: u64) {
        if let Some(rate) = bytes(budget) {
            self.buckets
                .charge(generator, Kind::Bytes, client, rate, n as f64);
        }
    }

    /// Spends one build of `client`'s budget and waits for the build's turn
    /// in the queue.
    pub async fn build(
        &self,
        generator: &str,
        client: Client,
        budget: &Budget,
    ) -> Result<Turn, Denied> {
        if let Some(rate) = builds(budget) {
            self.buckets
                .take(generator, Kind::Builds, client, rate, 1.0)
                .map_err(|wait| {
                    let per = format!("{} an hour", budget.builds);
                    Self::denied(generator, Kind::Builds, per, wait)
                })?;
        }
        let queued = |n: usize| tracing::info!(%client, waiting = n, "build queued");
        self.queue.turn(client, queued).await.map_err(|full| {
            // Turned away: the build it did not get is not spent.
            if let Some(rate) = builds(budget) {
                self.buckets
                    .charge(generator, Kind::Builds, client, rate, -1.0);
            }
            tracing::info!(%client, "build turned away: the queue is full");
            Denied {
                message: format!(
                    "the build queue is full ({} waiting): try again in {} s",
                    full.waiting,
                    QUEUE_RETRY.as_secs()
                ),
                retry_after: QUEUE_RETRY,
            }
        })
    }
}

fn rate(amount: u64, window: Duration) -> Option<Rate> {
    (amount > 0).then_some(Rate {
        amount: amount as f64,
        window,
    })
}

fn requests(b: &Budget) -> Option<Rate> {
    rate(b.requests, Duration::from_secs(60))
}

fn bytes(b: &Budget) -> Option<Rate> {
    rate(b.generated_bytes.0, Duration::from_secs(3600))
}

fn builds(b: &Budget) -> Option<Rate> {
    rate(b.builds, Duration::from_secs(3600))
}
