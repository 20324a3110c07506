//! Where concurrent requests for the same work meet, so that it is done
//! once: [`KeyedLocks`] within this process, and [`Exclusive`], which adds
//! the storage's lease so that replicas sharing a bucket meet too.
//!
//! Depends only on `storage`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OwnedMutexGuard;

use crate::storage::{Lease, Storage, StorageError};

/// One lock per key, so that concurrent requests for the same manifest or
/// blob make one upstream fetch while the others wait for its result.
#[derive(Default)]
pub struct KeyedLocks(Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>);

impl KeyedLocks {
    pub async fn lock(&self, key: String) -> OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 4096 {
                map.retain(|_, w| w.strong_count() > 0);
            }
            match map.get(&key).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key, Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}

/// Work done once among every process sharing the storage.
pub struct Exclusive {
    local: KeyedLocks,
    storage: Arc<dyn Storage>,
}

/// Held while the work for one key is done; dropping it lets the next in.
pub struct Held {
    // Field order is drop order: the lease goes (and is released) before
    // the next local waiter asks for it.
    _lease: Box<dyn Lease>,
    _local: OwnedMutexGuard<()>,
}

impl Exclusive {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Exclusive {
            local: KeyedLocks::default(),
            storage,
        }
    }

    /// Waits for `key`: first behind other requests of this process (so one
    /// of them at a time asks the storage), then for the storage's lease.
    pub async fn lock(&self, key: String) -> Result<Held, StorageError> {
        let local = self.local.lock(key.clone()).await;
        let lease = self.storage.lease(&key).await?;
        Ok(Held {
            _lease: lease,
            _local: local,
        })
    }
}
