//! What a plugin's store holds for one request: the WASI context (output
//! captured, nothing else granted), the memory limits, the handle table
//! every interface shares, the request ([`Call`]) and the host's services.

use std::sync::Arc;

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::host::{Call, Ctx};
use super::images::{BlobHandle, ManifestHandle};
use super::plugin::Plugin;
use crate::capabilities::Services;
use crate::storage::{BlobInfo, StoredManifest};

/// Plugin stdout and stderr are kept (up to this much) and logged after the
/// call, tagged with the plugin, instead of reaching the server's own output.
const OUTPUT_CAPTURE: usize = 64 * 1024;

/// Core instances, memories and tables one plugin call may create: a Rust
/// wasip2 component needs a few (the program, the WASI adapter, shims).
pub(super) const STORE_LIMITS: (u32, u32, u32) = (4, 4, 16);

pub struct HostState {
    pub(super) call: Call,
    table: ResourceTable,
    services: Services,
    wasi: WasiCtx,
    limits: StoreLimits,
    output: MemoryOutputPipe,
}

impl HostState {
    pub(super) fn new(plugin: Arc<Plugin>, services: Services) -> Self {
        let output = MemoryOutputPipe::new(OUTPUT_CAPTURE);
        // No preopened directories, no environment, no network: a plugin
        // reaches the outside world only through the kontain interfaces.
        let wasi = WasiCtxBuilder::new()
            .stdout(output.clone())
            .stderr(output.clone())
            .build();
        let (instances, memories, tables) = STORE_LIMITS;
        let limits = StoreLimitsBuilder::new()
            .memory_size(plugin.limits.memory.0 as usize)
            .instances(instances as usize)
            .tables(tables as usize)
            .memories(memories as usize)
            .trap_on_grow_failure(true)
            .build();
        HostState {
            call: Call::new(plugin),
            table: ResourceTable::new(),
            services,
            wasi,
            limits,
            output,
        }
    }

    /// The view of the capability whose service `pick` chooses.
    pub fn view<S>(&mut self, pick: impl FnOnce(&Services) -> &S) -> Ctx<'_, S> {
        Ctx {
            service: pick(&self.services),
            call: &mut self.call,
            table: &mut self.table,
        }
    }

    pub(super) fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limits
    }

    /// What the plugin printed, for the log.
    pub(super) fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.contents()).into_owned()
    }

    /// Takes the manifest a plugin returned out of the table.
    pub(super) fn take_manifest(
        &mut self,
        handle: Resource<ManifestHandle>,
    ) -> wasmtime::Result<StoredManifest> {
        Ok(self.table.delete(handle)?.0)
    }

    /// Takes the blob a plugin returned out of the table.
    pub(super) fn take_blob(&mut self, handle: Resource<BlobHandle>) -> wasmtime::Result<BlobInfo> {
        Ok(self.table.delete(handle)?.0)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}
