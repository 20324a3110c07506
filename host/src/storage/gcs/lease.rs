//! Leases in the bucket, so that replicas asked for the same work at once
//! do it once: a lease object is created with `ifGenerationMatch=0`, renewed
//! by its holder every third of its TTL (compare-and-swap on the
//! generation), and released by writing it expired. A replica that dies
//! stops renewing; once the lease is past its expiry another replica takes
//! it with the same compare-and-swap. Expiry times come from the holder's
//! clock, so replica clocks must agree to well within the TTL (NTP does).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use google_cloud_storage::client::Storage as Client;
use serde::{Deserialize, Serialize};

use super::{MAX_LEASE_BYTES, remote, status, unix_ms};
use crate::storage::{Lease, StorageError};

/// Where this process takes its leases.
pub(super) struct Leases {
    pub client: Client,
    pub bucket: String,
    pub ttl: Duration,
    /// Names this process in the leases it holds.
    pub holder: String,
    pub taken: AtomicU64,
}

impl Leases {
    /// Waits until this process holds the lease object `object` (for `key`).
    pub async fn take(&self, object: String, key: &str) -> Result<Box<dyn Lease>, StorageError> {
        let n = self.taken.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(LeaseState {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            object,
            key: key.to_owned(),
            process: self.holder.clone(),
            token: format!("{}/{n}", self.holder),
            ttl: self.ttl,
            generation: Mutex::new(0),
        });
        // In a task of its own: if the request is dropped once the lease
        // object is written, the task still finishes, and dropping the
        // lease it made releases it.
        let acquiring = tokio::spawn(async move {
            state.acquire().await?;
            let heartbeat = tokio::spawn(state.clone().renew());
            Ok::<_, StorageError>(GcsLease { state, heartbeat })
        });
        let lease = acquiring.await.map_err(|e| StorageError::Remote {
            operation: "take a lease".into(),
            message: e.to_string(),
        })??;
        Ok(Box::new(lease))
    }
}

/// The content of a lease object.
#[derive(Serialize, Deserialize)]
struct LeaseRecord {
    holder: String,
    key: String,
    expires_unix_ms: u64,
}

struct LeaseState {
    client: Client,
    bucket: String,
    object: String,
    key: String,
    /// This process, as it names itself in lease records.
    process: String,
    /// This acquisition, unique among all replicas.
    token: String,
    ttl: Duration,
    /// The lease object's generation as last written by us.
    generation: Mutex<i64>,
}

impl LeaseState {
    fn record(&self, expires_unix_ms: u64) -> String {
        serde_json::to_string(&LeaseRecord {
            holder: self.token.clone(),
            key: self.key.clone(),
            expires_unix_ms,
        })
        .unwrap_or_default()
    }

    fn generation(&self) -> i64 {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_generation(&self, generation: i64) {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner()) = generation;
    }

    /// Writes our record expiring at `expires` if the object is still at
    /// `generation` (`0`: does not exist). `Ok(false)`: someone else wrote.
    async fn swap(&self, generation: i64, expires: u64) -> Result<bool, StorageError> {
        let result = self
            .client
            .write_object(&self.bucket, &self.object, self.record(expires))
            .set_if_generation_match(generation)
            .send_buffered()
            .await;
        match result {
            Ok(object) => {
                self.set_generation(object.generation);
                Ok(true)
            }
            // The client retries lost responses; a retry of our own write
            // that landed gets 412 too. The record says whose it is.
            Err(e) if status(&e) == Some(412) => match self.current().await? {
                Some((generation, Some(r))) if r.holder == self.token => {
                    self.set_generation(generation);
                    Ok(true)
                }
                _ => Ok(false),
            },
            Err(e) => Err(remote(format!("write the lease {}", self.object))(e)),
        }
    }

    /// The lease object's generation and record, if it exists.
    async fn current(&self) -> Result<Option<(i64, Option<LeaseRecord>)>, StorageError> {
        let read = self
            .client
            .read_object(&self.bucket, &self.object)
            .send()
            .await;
        let mut response = match read {
            Ok(r) => r,
            Err(e) if status(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(remote(format!("read the lease {}", self.object))(e)),
        };
        let generation = response.object().generation;
        let mut bytes = Vec::new();
        while let Some(chunk) = response.next().await {
            let chunk = chunk.map_err(remote(format!("read the lease {}", self.object)))?;
            bytes.extend_from_slice(&chunk);
            if bytes.len() as u64 > MAX_LEASE_BYTES {
                break;
            }
        }
        Ok(Some((generation, serde_json::from_slice(&bytes).ok())))
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// Waits until the lease is ours.
    async fn acquire(&self) -> Result<(), StorageError> {
        // Check often enough that a released lease is picked up quickly,
        // rarely enough that waiting replicas cost the bucket little.
        let poll = (self.ttl / 10).clamp(Duration::from_millis(50), Duration::from_millis(500));
        loop {
            if self.swap(0, unix_ms() + self.ttl_ms()).await? {
                return Ok(());
            }
            if let Some((generation, record)) = self.current().await? {
                let now = unix_ms();
                // An unreadable record guards nothing. A record of this
                // process is a lease whose holder has finished (its local
                // lock, which this caller now holds, was released with it)
                // and whose release write has not landed yet.
                let ours = format!("{}/", self.process);
                let expired = record
                    .as_ref()
                    .is_none_or(|r| r.expires_unix_ms <= now || r.holder.starts_with(&ours));
                if expired && self.swap(generation, now + self.ttl_ms()).await? {
                    if let Some(r) = record.filter(|r| {
                        !r.holder.ends_with("/released") && !r.holder.starts_with(&ours)
                    }) {
                        tracing::warn!(key = %self.key, previous = %r.holder,
                            "took over a lease its holder stopped renewing");
                    }
                    return Ok(());
                }
            } else {
                continue; // deleted (by a lifecycle rule) just now: create it
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % 50);
            tokio::time::sleep(poll + jitter).await;
        }
    }

    /// Renews the lease every third of its TTL until aborted.
    async fn renew(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.ttl / 3).await;
            let expires = unix_ms() + self.ttl_ms();
            match self.swap(self.generation(), expires).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(key = %self.key, "lost a lease (renewed too late); another replica may repeat this work");
                    return;
                }
                Err(e) => tracing::warn!(key = %self.key, error = %e, "could not renew a lease"),
            }
        }
    }

    /// Marks the lease expired so that a waiting replica takes it at once.
    async fn release(&self) {
        let released = serde_json::to_string(&LeaseRecord {
            holder: format!("{}/released", self.token),
            key: self.key.clone(),
            expires_unix_ms: 0,
        })
        .unwrap_or_default();
        let mut generation = self.generation();
        for _ in 0..2 {
            let result = self
                .client
                .write_object(&self.bucket, &self.object, released.clone())
                .set_if_generation_match(generation)
                .send_buffered()
                .await;
            match result {
                Ok(_) => return,
                // A renewal we aborted may have landed: if the lease is
                // still ours, release that generation.
                Err(e) if status(&e) == Some(412) => match self.current().await {
                    Ok(Some((g, Some(r)))) if r.holder == self.token => generation = g,
                    _ => return,
                },
                Err(e) => {
                    tracing::warn!(key = %self.key, error = %e, "could not release a lease; it expires by itself");
                    return;
                }
            }
        }
    }
}

struct GcsLease {
    state: Arc<LeaseState>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Lease for GcsLease {}

impl Drop for GcsLease {
    fn drop(&mut self) {
        self.heartbeat.abort();
        let state = self.state.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { state.release().await });
        }
    }
}
