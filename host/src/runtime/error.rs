//! Errors at the wasm boundary, as wasmtime-wasi keeps them: a host
//! function returns a [`HostError`] with `?`; it reaches the plugin as a
//! `types.error` value when the plugin can do something about it, or ends
//! the call as a trap when the host failed. Kinds decide which, here only.
//! On the way out, traps and the plugin's own errors become the
//! [`GeneratorError`] the registry maps to HTTP.

use std::fmt;
use std::time::Duration;

use wasmtime::Trap;
use wasmtime::component::ResourceTableError;

use super::bindings::kontain::generator::types;
use super::host::Ctx;
use crate::generator::{Classify, ErrorKind, GeneratorError, PluginId};

pub type HostResult<T> = Result<T, HostError>;

/// A host function's failure.
pub struct HostError(Failure);

enum Failure {
    /// Something the plugin is told, and may pass on.
    Guest { kind: ErrorKind, message: String },
    /// A failure of the host or of the plugin's use of it.
    Trap(wasmtime::Error),
}

/// A host failure carried through a trap, so that the runtime can report it
/// with its kind.
#[derive(Debug)]
struct HostFailure {
    kind: ErrorKind,
    message: String,
}

impl fmt::Display for HostFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HostFailure {}

impl HostError {
    /// An error the plugin is told: `kind` picks the `types.error` case.
    pub fn guest(kind: ErrorKind, message: impl Into<String>) -> Self {
        HostError(Failure::Guest {
            kind,
            message: message.into(),
        })
    }
}

/// A classified error as a trap, for host functions that have no error
/// value to give (the runtime still reports it with its kind).
pub fn trap(e: impl Classify) -> wasmtime::Error {
    wasmtime::Error::new(HostFailure {
        kind: e.kind(),
        message: e.to_string(),
    })
}

/// Every classified error: internal ones end the call (the plugin cannot
/// help them), the rest are the plugin's to handle or pass on.
impl<E: Classify> From<E> for HostError {
    fn from(e: E) -> Self {
        match e.kind() {
            // A spent budget ends the call too: no plugin can do anything
            // about it but answer it.
            ErrorKind::Internal
            | ErrorKind::OutOfSpace
            | ErrorKind::Misconfigured
            | ErrorKind::Throttled => HostError(Failure::Trap(trap(e))),
            kind => HostError(Failure::Guest {
                kind,
                message: e.to_string(),
            }),
        }
    }
}

impl From<ResourceTableError> for HostError {
    fn from(e: ResourceTableError) -> Self {
        HostError(Failure::Trap(e.into()))
    }
}

impl From<wasmtime::Error> for HostError {
    fn from(e: wasmtime::Error) -> Self {
        HostError(Failure::Trap(e))
    }
}

/// The `types.error` case for a kind. Kinds the WIT has no case for become
/// the case a client is answered with anyway (see the registry's mapping).
fn case(kind: ErrorKind, message: String) -> types::Error {
    match kind {
        ErrorKind::InvalidName | ErrorKind::BuildFailed => types::Error::InvalidName(message),
        ErrorKind::InvalidReference => types::Error::InvalidReference(message),
        ErrorKind::NotFound | ErrorKind::NameUnknown => types::Error::NotFound(message),
        ErrorKind::Denied | ErrorKind::SourceRefused => types::Error::Denied(message),
        ErrorKind::LimitExceeded | ErrorKind::Deadline => types::Error::LimitExceeded(message),
        ErrorKind::Unavailable | ErrorKind::Throttled => types::Error::Unavailable(message),
        ErrorKind::Internal | ErrorKind::OutOfSpace | ErrorKind::Misconfigured => {
            types::Error::Internal(message)
        }
    }
}

/// The kind of an error a plugin returned.
fn kind_of(error: &types::Error) -> (ErrorKind, &str) {
    match error {
        types::Error::InvalidReference(m) => (ErrorKind::InvalidReference, m),
        types::Error::InvalidName(m) => (ErrorKind::InvalidName, m),
        types::Error::NotFound(m) => (ErrorKind::NotFound, m),
        types::Error::Denied(m) => (ErrorKind::Denied, m),
        types::Error::LimitExceeded(m) => (ErrorKind::LimitExceeded, m),
        types::Error::Unavailable(m) => (ErrorKind::Unavailable, m),
        types::Error::Internal(m) => (ErrorKind::Internal, m),
    }
}

impl<S> types::Host for Ctx<'_, S> {
    fn convert_error(&mut self, error: HostError) -> wasmtime::Result<types::Error> {
        match error.0 {
            Failure::Guest { kind, message } => {
                let value = case(kind, message);
                self.call.last_error = Some((value.clone(), kind));
                Ok(value)
            }
            Failure::Trap(trap) => Err(trap),
        }
    }
}

/// The error a plugin returned, with the host's kind when the plugin passed
/// on what a host function told it.
pub(super) fn reported(
    plugin: &PluginId,
    error: types::Error,
    last: Option<(types::Error, ErrorKind)>,
) -> GeneratorError {
    let (kind, message) = kind_of(&error);
    let kind = match last {
        Some((value, host_kind)) if kind_of(&value) == (kind, message) => host_kind,
        _ => kind,
    };
    GeneratorError::of(plugin, kind, message)
}

/// What a trap (or an overrun) of `plugin` means.
pub(super) fn trapped(
    plugin: &PluginId,
    error: wasmtime::Error,
    limit: Duration,
) -> GeneratorError {
    if let Some(Trap::Interrupt) = error.downcast_ref::<Trap>() {
        return deadline(plugin, limit);
    }
    match error.downcast::<HostFailure>() {
        Ok(HostFailure { kind, message }) => GeneratorError::of(plugin, kind, message),
        // The root cause first: "wasm trap: ..." or the limiter's message,
        // which is what the plugin author needs.
        Err(error) => GeneratorError {
            kind: ErrorKind::Internal,
            plugin: Some(plugin.clone()),
            message: format!("{plugin} crashed: {}", error.root_cause()),
        },
    }
}

/// `plugin` did not answer within `limit`.
pub(super) fn deadline(plugin: &PluginId, limit: Duration) -> GeneratorError {
    GeneratorError {
        kind: ErrorKind::Deadline,
        plugin: Some(plugin.clone()),
        message: format!(
            "{plugin} did not finish within its limit of {}",
            humantime::format_duration(limit)
        ),
    }
}
