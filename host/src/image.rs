//! Image primitives that know no feature: layers written from trees and
//! streams (`layer`), stored-block gzip (`gzip`), configs and manifests
//! assembled or extended (`assemble`), canonical JSON and descriptors
//! (`json`), stored layers read back (`read`), CPU-bound work on blocking
//! threads with cancellation (`work`), and work done once across requests
//! and replicas, with failures that asking again cannot fix remembered, and
//! trees on the local disk made once and kept while used (`once`). `random`, `upstream`, `flatten`, `go` and `buildpack` build on
//! these; nothing here knows any of them.
//!
//! Everything streams (bytes flow from a source through tar, gzip and
//! hashing into storage without ever being held whole). Depends on `oci`,
//! `storage`, `files` and `process`, and on `generator` for error kinds;
//! never on wasmtime, HTTP or a capability.

pub mod assemble;
pub mod gzip;
pub mod json;
pub mod layer;
pub mod offload;
pub mod once;
pub mod read;
pub mod sbom;
pub mod work;

use std::io;

use crate::generator::{Classify, ErrorKind};
use crate::oci::Digest;
use crate::storage::StorageError;

pub use assemble::{HistoryEntry, ImageSpec, ManifestFormat, Platform};
pub use once::{Builds, Remembered, once};
pub use work::{Cancel, Cpu};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("this request would produce {requested} bytes, over the generator's limit of {limit}")]
    LimitExceeded { requested: u64, limit: u64 },
    #[error("invalid image: {0}")]
    Invalid(String),
    #[error("{what}: more than the limit of {limit} bytes")]
    TooLarge { what: &'static str, limit: u64 },
    #[error("the request was cancelled")]
    Cancelled,
    #[error("a build task failed: {0}")]
    TaskFailed(String),
    #[error(transparent)]
    Remembered(#[from] Remembered),
    /// A client's budget is spent, or the build queue is full.
    #[error(transparent)]
    Throttled(#[from] crate::fair::Denied),
}

impl Classify for ImageError {
    fn kind(&self) -> ErrorKind {
        match self {
            ImageError::Storage(e) => e.kind(),
            ImageError::LimitExceeded { .. } | ImageError::TooLarge { .. } => {
                ErrorKind::LimitExceeded
            }
            ImageError::Invalid(_) => ErrorKind::InvalidReference,
            ImageError::Io { source, .. } if crate::storage::out_of_space(source) => {
                ErrorKind::OutOfSpace
            }
            ImageError::Io { .. } | ImageError::Cancelled | ImageError::TaskFailed(_) => {
                ErrorKind::Internal
            }
            ImageError::Remembered(e) => e.kind(),
            ImageError::Throttled(_) => ErrorKind::Throttled,
        }
    }
}

impl ImageError {
    /// A local file operation failed while doing `what`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        ImageError::Io {
            what: what.into(),
            source,
        }
    }
}

pub(crate) fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> ImageError {
    move |source| ImageError::io(what, source)
}

pub(crate) fn invalid(message: impl Into<String>) -> ImageError {
    ImageError::Invalid(message.into())
}

/// A layer blob in storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerBlob {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
}
