//! A driver that counts every operation of the driver it wraps (by backend
//! and operation, failures apart) for the metrics.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::{BlobContent, ByteRange, Driver, Lease, Listed, Stat, StorageError};

pub struct Measured {
    inner: Arc<dyn Driver>,
    backend: &'static str,
}

impl Measured {
    pub fn new(inner: Arc<dyn Driver>, backend: &'static str) -> Self {
        Measured { inner, backend }
    }

    fn count<T>(
        &self,
        operation: &'static str,
        result: Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        crate::metrics::storage(self.backend, operation, result.is_ok());
        result
    }
}

#[async_trait::async_trait]
impl Driver for Measured {
    fn spool_dir(&self) -> &Path {
        self.inner.spool_dir()
    }

    fn serves_downloads(&self) -> bool {
        self.inner.serves_downloads()
    }

    fn publish(&self, key: &str, file: tempfile::NamedTempFile) -> Result<(), StorageError> {
        self.count("publish", self.inner.publish(key, file))
    }

    async fn create(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.count("create", self.inner.create(key, bytes).await)
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.count("put", self.inner.put(key, bytes).await)
    }

    async fn stat(&self, key: &str) -> Result<Option<Stat>, StorageError> {
        self.count("stat", self.inner.stat(key).await)
    }

    async fn read(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobContent>, StorageError> {
        self.count("read", self.inner.read(key, range).await)
    }

    async fn read_small(&self, key: &str, cap: u64) -> Result<Option<(Bytes, Stat)>, StorageError> {
        self.count("read", self.inner.read_small(key, cap).await)
    }

    async fn touch(&self, key: &str) -> Result<(), StorageError> {
        self.count("touch", self.inner.touch(key).await)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StorageError> {
        self.count("list", self.inner.list(prefix).await)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.count("delete", self.inner.delete(key).await)
    }

    async fn lease(&self, key: &str) -> Result<Box<dyn Lease>, StorageError> {
        self.count("lease", self.inner.lease(key).await)
    }

    async fn location(&self, key: &str) -> Result<Option<String>, StorageError> {
        self.count("location", self.inner.location(key).await)
    }
}
