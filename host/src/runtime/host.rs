//! What a capability's WIT host implementation (`<capability>/wit.rs`) sees
//! of the runtime: its view of one request's store ([`Ctx`]), the error its
//! host functions return ([`HostError`], with `?`), the handles it pushes and
//! reads, and the linker it adds its interface to. The `wasmtime` crate is
//! named only in `runtime/`; capabilities reach it through these re-exports.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use wasmtime::component::HasData;

pub use super::bindings::kontain::generator as wit;
pub use super::error::{HostError, HostResult, trap};
pub use super::images::{BlobHandle, LayerHandle, ManifestHandle};
pub use super::state::HostState;
pub use wasmtime::component::{Linker, Resource, ResourceTable};

use super::plugin::Plugin;
use crate::generator::ErrorKind;

/// A host function's result when it has no error for the plugin: a failure
/// ends the call as a trap.
pub type Trap<T> = wasmtime::Result<T>;

/// Projects a request's store onto one capability's view of it; each
/// capability's `add_to_linker` takes the one for its service.
pub type Getter<S> = fn(&mut HostState) -> Ctx<'_, S>;

/// What one request of one plugin is, and has done so far.
pub struct Call {
    pub(super) plugin: Arc<Plugin>,
    /// Blob bytes this request has produced, against its `max_bytes`.
    produced: u64,
    /// The last error a host function gave the plugin as a value, with its
    /// kind: a plugin that passes it on is reported with the host's kind.
    pub(super) last_error: Option<(wit::types::Error, ErrorKind)>,
}

impl Call {
    pub(super) fn new(plugin: Arc<Plugin>) -> Self {
        Call {
            plugin,
            produced: 0,
            last_error: None,
        }
    }

    /// The generator's configured name.
    pub fn generator(&self) -> &str {
        &self.plugin.id.name
    }

    /// The registries this generator may reach, if its config narrows them.
    pub fn upstreams(&self) -> Option<&[String]> {
        self.plugin.upstreams.as_deref()
    }

    /// The generator's `settings` table.
    pub fn settings(&self) -> &BTreeMap<String, String> {
        &self.plugin.settings
    }

    /// The most blob bytes this request may produce.
    pub fn limit(&self) -> u64 {
        self.plugin.limits.max_bytes.0
    }

    /// What this request may still produce.
    pub fn budget(&self) -> u64 {
        self.limit().saturating_sub(self.produced)
    }

    /// Counts `bytes` against the budget; `false` once it is spent.
    pub fn produce(&mut self, bytes: u64) -> bool {
        self.produced = self.produced.saturating_add(bytes);
        self.produced <= self.limit()
    }
}

/// One capability's view of a request's store: its shared service, the
/// request, and the handle table every interface shares.
pub struct Ctx<'a, S> {
    pub service: &'a S,
    pub call: &'a mut Call,
    pub(super) table: &'a mut ResourceTable,
}

impl<S> Ctx<'_, S> {
    /// Hands `value` to the plugin as a new handle.
    pub fn push<T: Send + 'static>(&mut self, value: T) -> HostResult<Resource<T>> {
        Ok(self.table.push(value)?)
    }

    /// What the plugin's handle refers to.
    pub fn get<T: 'static>(&self, handle: &Resource<T>) -> Trap<&T> {
        Ok(self.table.get(handle)?)
    }

    /// Ends a handle (the plugin dropped it, or returned it).
    pub fn take<T: 'static>(&mut self, handle: Resource<T>) -> Trap<T> {
        Ok(self.table.delete(handle)?)
    }
}

/// The `HasData` of a capability whose view is `Ctx<'_, S>`.
pub struct Has<S>(PhantomData<S>);

impl<S: 'static> HasData for Has<S> {
    type Data<'a> = Ctx<'a, S>;
}

/// A referrers-API descriptor (JSON, as storage and registries hold them)
/// as the WIT's `referrer`.
pub fn referrer_of(d: &serde_json::Value) -> wit::types::Referrer {
    let s = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
    wit::types::Referrer {
        media_type: s("mediaType"),
        digest: s("digest"),
        size: d["size"].as_u64().unwrap_or_default(),
        artifact_type: s("artifactType"),
        annotations: d["annotations"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect(),
    }
}

/// A plugin's `referrer` as a referrers-API descriptor; `None` unless its
/// digest is one.
pub fn descriptor_of(r: &wit::types::Referrer) -> Option<serde_json::Value> {
    let digest: crate::oci::Digest = r.digest.parse().ok()?;
    let mut d = serde_json::json!({
        "mediaType": r.media_type,
        "digest": digest.to_string(),
        "size": r.size,
    });
    if !r.artifact_type.is_empty() {
        d["artifactType"] = r.artifact_type.clone().into();
    }
    if !r.annotations.is_empty() {
        d["annotations"] = r
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone())))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    Some(d)
}
