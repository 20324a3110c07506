//! Pure OCI distribution and image-spec vocabulary: digests, repository names,
//! tags, references, media types and error codes, each parsed at the edge so
//! that an invalid value cannot be constructed.
//!
//! No I/O here, and no dependency on any other kontain module: everything else
//! depends inward on this one.

mod digest;
mod error_code;
mod image_ref;
mod manifest;
mod media_type;
mod name;

pub use digest::{Digest, DigestError, Sha256Writer};
pub use error_code::ErrorCode;
pub use image_ref::split_reference;
pub use manifest::{blob_sizes, references};
pub use media_type::MediaType;
pub use name::{NameError, Reference, RepositoryName, Tag};

/// Manifests larger than this are refused, as the distribution spec suggests.
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
