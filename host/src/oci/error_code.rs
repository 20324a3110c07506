//! The error codes of the distribution spec (v1.1), and only those: a client
//! may reject a body whose code it does not know.

use std::fmt;

/// An error code of the distribution spec. The HTTP status for each answer
/// is chosen in one place, `registry::response`; the spec's codes for the
/// push side (`BLOB_UPLOAD_*`, `MANIFEST_BLOB_UNKNOWN`, `SIZE_INVALID`) are
/// left out because a pull-only registry never answers them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ErrorCode {
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    ManifestInvalid,
    NameInvalid,
    NameUnknown,
    Unsupported,
    Denied,
    Unauthorized,
    TooManyRequests,
}

impl ErrorCode {
    /// Every code, for tests that check answers against the spec's list.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BlobUnknown,
        ErrorCode::DigestInvalid,
        ErrorCode::ManifestUnknown,
        ErrorCode::ManifestInvalid,
        ErrorCode::NameInvalid,
        ErrorCode::NameUnknown,
        ErrorCode::Unsupported,
        ErrorCode::Denied,
        ErrorCode::Unauthorized,
        ErrorCode::TooManyRequests,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
