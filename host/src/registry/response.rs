//! Responses: bodies, and the one place where an error becomes an OCI error
//! response (code, HTTP status, message, detail). Server-side failures are
//! logged here, once.

use std::io;

use bytes::Bytes;
use futures_util::TryStreamExt;
use futures_util::stream::BoxStream;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::json;

use crate::generator::{Classify, ErrorKind, GeneratorError};
use crate::oci::{Digest, ErrorCode, NameError, RepositoryName};
use crate::storage::StorageError;

pub type Body = UnsyncBoxBody<Bytes, io::Error>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

pub fn stream(body: BoxStream<'static, io::Result<Bytes>>) -> Body {
    StreamBody::new(body.map_ok(Frame::data)).boxed_unsync()
}

const OUT_OF_SPACE: &str = "the registry is out of storage space: it serves what it has, \
    but cannot make anything new until space is freed; try again later";

/// What a request asked for, which names the code of a failure to produce
/// it: a manifest that could not be made is `MANIFEST_UNKNOWN` whatever the
/// reason, and the status says the reason (404, 503, 500, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    Manifest,
    Blob,
    /// A tag list or a repository as a whole.
    Repository,
    /// Anything else (the API root, paths outside it).
    Other,
}

impl Subject {
    fn unknown(self) -> ErrorCode {
        match self {
            Subject::Manifest => ErrorCode::ManifestUnknown,
            Subject::Blob => ErrorCode::BlobUnknown,
            Subject::Repository | Subject::Other => ErrorCode::NameUnknown,
        }
    }
}

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NameInvalid(NameError),
    /// A tag that is not one (the spec answers a manifest that cannot
    /// exist with 404, as for any unknown manifest).
    #[error("{0}")]
    TagInvalid(NameError),
    #[error("{0}")]
    DigestInvalid(NameError),
    /// A client's budget is spent.
    #[error(transparent)]
    Throttled(#[from] crate::fair::Denied),
    /// The work a request started (a build) outlasted `hold`; it goes on.
    #[error(transparent)]
    Working(crate::fair::Denied),
    #[error("no generator serves repository {0}")]
    NameUnknown(RepositoryName),
    #[error("manifest {reference} is not known in {name}")]
    ManifestUnknown {
        name: RepositoryName,
        reference: String,
    },
    #[error("blob {0} is not known")]
    BlobUnknown(Digest),
    #[error("the requested range is not within the blob's {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// A method this resource does not have; `allow` lists those it has.
    #[error("{message}")]
    MethodNotAllowed {
        message: &'static str,
        allow: &'static str,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Generator(#[from] GeneratorError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ApiError {
    /// The one mapping from errors to OCI codes and HTTP statuses.
    fn classify(&self, subject: Subject) -> (StatusCode, ErrorCode) {
        use ApiError as E;
        match self {
            E::NameInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
            E::TagInvalid(_) => (StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown),
            E::DigestInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
            E::NameUnknown(_) => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
            E::ManifestUnknown { .. } => (StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown),
            E::BlobUnknown(_) => (StatusCode::NOT_FOUND, ErrorCode::BlobUnknown),
            // The spec has no range code; the parameters are what is wrong.
            E::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, ErrorCode::Unsupported)
            }
            E::MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::Unsupported),
            E::BadRequest(_) => (StatusCode::BAD_REQUEST, ErrorCode::Unsupported),
            E::NotFound(_) => (StatusCode::NOT_FOUND, subject.unknown()),
            E::Generator(g) => classify_generator(g, subject),
            E::Throttled(_) | E::Working(_) => {
                (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests)
            }
            E::Storage(StorageError::TooLarge { .. }) => {
                (StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid)
            }
            // The bucket is unreachable or refusing: worth a retry.
            E::Storage(StorageError::Remote { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, subject.unknown())
            }
            E::Storage(e) if e.kind() == ErrorKind::OutOfSpace => {
                (StatusCode::INSUFFICIENT_STORAGE, subject.unknown())
            }
            E::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, subject.unknown()),
        }
    }

    fn detail(&self) -> serde_json::Value {
        match self {
            ApiError::Generator(GeneratorError {
                plugin: Some(plugin),
                ..
            }) => json!({ "generator": plugin.name, "version": plugin.version }),
            ApiError::RangeNotSatisfiable { size } => json!({ "size": size }),
            _ => serde_json::Value::Null,
        }
    }

    /// The error as a response about `subject`; `head` leaves the body out.
    pub fn into_response(self, head: bool, subject: Subject) -> Response<Body> {
        let (status, code) = self.classify(subject);
        let mut message = self.to_string();
        let misconfigured =
            matches!(&self, ApiError::Generator(g) if g.kind == ErrorKind::Misconfigured);
        if status == StatusCode::INSUFFICIENT_STORAGE {
            // The operator needs the path; a client needs only the fact.
            tracing::error!(error = %message, "out of storage space");
            message = OUT_OF_SPACE.to_owned();
        } else if status.is_server_error() || misconfigured {
            tracing::error!(%code, error = %message, "request failed");
        } else {
            tracing::debug!(%code, error = %message, "request refused");
        }
        let body = json!({ "errors": [{ "code": code.as_str(), "message": message, "detail": self.detail() }] });
        let bytes = Bytes::from(body.to_string());
        let mut response = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, bytes.len());
        match &self {
            ApiError::RangeNotSatisfiable { size } => {
                response = response.header(header::CONTENT_RANGE, format!("bytes */{size}"));
            }
            ApiError::MethodNotAllowed { allow, .. } => {
                response = response.header(header::ALLOW, *allow);
            }
            _ => {}
        }
        // A spent budget: when it refills enough.
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = match &self {
                ApiError::Throttled(d) | ApiError::Working(d) => Some(d.retry_after),
                _ => crate::activity::retry_after(),
            };
            let seconds = wait.map_or(60, |w| w.as_secs().max(1));
            response = response.header(header::RETRY_AFTER, seconds);
        }
        // Failures a retry may cure: the upstream, the bucket, a deadline.
        if matches!(
            status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ) {
            response = response.header(header::RETRY_AFTER, HeaderValue::from_static("10"));
        }
        let body = if head { empty() } else { full(bytes) };
        response
            .body(body)
            .unwrap_or_else(|_| Response::new(empty()))
    }
}

/// What each kind of generator failure is, over HTTP. Docker prints the
/// body of a 4xx answer (`manifest unknown: <message>`) but only the status
/// line of a 5xx, so failures the client must read about are 4xx, and 5xx
/// is kept for what a retry may cure or only the operator can see.
fn classify_generator(e: &GeneratorError, subject: Subject) -> (StatusCode, ErrorCode) {
    match e.kind {
        ErrorKind::InvalidName => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
        // A tag that names nothing this generator can make, a source that
        // cannot be built as it is, a configured builder that cannot be
        // used: there is no such manifest, and the message says why.
        ErrorKind::InvalidReference | ErrorKind::BuildFailed | ErrorKind::Misconfigured => {
            (StatusCode::NOT_FOUND, subject.unknown())
        }
        ErrorKind::NameUnknown => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
        ErrorKind::NotFound => (StatusCode::NOT_FOUND, subject.unknown()),
        ErrorKind::Denied | ErrorKind::LimitExceeded | ErrorKind::SourceRefused => {
            (StatusCode::FORBIDDEN, ErrorCode::Denied)
        }
        ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, subject.unknown()),
        ErrorKind::Deadline => (StatusCode::GATEWAY_TIMEOUT, subject.unknown()),
        ErrorKind::Throttled => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests),
        ErrorKind::OutOfSpace => (StatusCode::INSUFFICIENT_STORAGE, subject.unknown()),
        ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, subject.unknown()),
    }
}
