//! The `cache` capability: a small key-value store private to each
//! generator, kept in the content store across requests and restarts (and
//! expired with it). Its WIT host implementation is `wit`; no config section.

pub mod wit;

use std::sync::Arc;

use crate::generator::{Classify, ErrorKind};
use crate::storage::{ContentStore, StorageError};

/// Longest value a plugin may keep in its cache.
pub const MAX_VALUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache values are at most {MAX_VALUE} bytes")]
    TooLong,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl Classify for CacheError {
    fn kind(&self) -> ErrorKind {
        match self {
            CacheError::TooLong => ErrorKind::LimitExceeded,
            CacheError::Storage(e) => e.kind(),
        }
    }
}

pub struct Cache {
    store: Arc<ContentStore>,
}

/// Keys are namespaced by generator, so plugins cannot read or overwrite
/// each other's entries.
fn namespaced(generator: &str, key: &str) -> String {
    format!("plugin-cache {generator} {key}")
}

impl Cache {
    pub fn new(store: Arc<ContentStore>) -> Self {
        Cache { store }
    }

    /// The value `generator` last set for `key`.
    pub async fn get(&self, generator: &str, key: &str) -> Result<Option<String>, StorageError> {
        self.store.value(&namespaced(generator, key)).await
    }

    /// Sets `generator`'s `key` to `value` (at most [`MAX_VALUE`] bytes).
    pub async fn set(&self, generator: &str, key: &str, value: &str) -> Result<(), CacheError> {
        if value.len() > MAX_VALUE {
            return Err(CacheError::TooLong);
        }
        Ok(self
            .store
            .put_value(&namespaced(generator, key), value)
            .await?)
    }
}
