//! The plugin runtime: the only module that names wasmtime.
//!
//! One [`Engine`] for the process, and one [`Linker`] per set of grants:
//! WASI, the always-available interfaces (`images`, `settings`), and the
//! granted capabilities' interfaces, nothing else. Each generator is
//! compiled and pre-instantiated once at load; each request gets a fresh
//! [`Store`] with the plugin's memory limit, and runs under its wall-time
//! limit. Epoch ticks make running wasm yield every few milliseconds, so a
//! plugin stuck in a loop neither blocks a server thread nor outlives its
//! deadline. Traps, timeouts and plugin errors all come back as
//! [`GeneratorError`]s naming the plugin.
//!
//! One file per WIT interface: `images`, `settings` and `types` (`error`)
//! here; each capability's in its own module (`<capability>/wit.rs`),
//! which reaches wasmtime only through `host`.

mod bindings;
mod error;
pub mod host;
mod images;
mod plugin;
mod settings;
mod state;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use wasmtime::component::Linker;
use wasmtime::{
    Config as EngineConfig, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store,
};

use crate::capabilities::{Capability, Services};
use crate::config::{Config, GeneratorConfig};
use crate::generator::{
    ErrorKind, GeneratorError, Generators, Listed, ResolveRequest, Route, Site,
};
use crate::oci::{Digest, RepositoryName};
use crate::routing::RouteTable;
use crate::storage::{BlobInfo, StoredManifest};

use bindings::exports::kontain::generator::generator as guest;
use bindings::kontain::generator::{images as images_wit, settings as settings_wit, types};
use host::Has;
pub use plugin::LoadError;
use plugin::Plugin;
use state::HostState;

/// The most referrers a plugin may add for one digest.
const MAX_REFERRERS: usize = 1000;

/// How often running wasm is interrupted to yield back to the executor.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Plugin calls that may run at once: the pooling allocator's slots. A call
/// past this waits for a slot instead of failing. Requests that wait on a
/// build hold their slot, so this is far above any build concurrency.
const CONCURRENT_CALLS: u32 = 512;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot set up the wasm engine: {0}")]
    Engine(String),
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// The generators currently loaded and how requests reach them.
struct Loaded {
    routes: RouteTable,
    site: Arc<Site>,
    plugins: HashMap<String, Arc<Plugin>>,
}

pub struct Runtime {
    engine: Engine,
    /// A linker per set of grants, made on first use.
    linkers: Mutex<HashMap<BTreeSet<Capability>, Linker<HostState>>>,
    services: Services,
    /// Where compiled components are cached, if anywhere.
    cache_dir: Option<PathBuf>,
    loaded: ArcSwap<Loaded>,
    /// One permit per pooled instance slot.
    slots: tokio::sync::Semaphore,
    ticker: tokio::task::JoinHandle<()>,
}

fn base_engine_config() -> EngineConfig {
    let mut config = EngineConfig::new();
    config.wasm_component_model(true).epoch_interruption(true);
    config
}

/// An engine whose instances, memories, tables and fiber stacks come from a
/// pool reserved once. Measured on the `wait` plugin: the on-demand
/// allocator's mmap/munmap per request (and the TLB shootdowns the munmaps
/// send to every core) were a third of a plugin call's cost.
fn pooled_engine() -> Result<Engine, RuntimeError> {
    let mut pool = PoolingAllocationConfig::new();
    // Room for every call at once to use all that its store's limits allow
    // (see `state::STORE_LIMITS`), so that the semaphore, not the pool, is
    // what a busy server runs into.
    let (instances, memories, tables) = state::STORE_LIMITS;
    pool.total_component_instances(CONCURRENT_CALLS)
        .total_core_instances(CONCURRENT_CALLS * instances)
        .total_memories(CONCURRENT_CALLS * memories)
        .total_tables(CONCURRENT_CALLS * tables)
        .max_memories_per_module(memories)
        .max_tables_per_module(tables)
        .total_stacks(CONCURRENT_CALLS)
        // Any wasm32 memory; each plugin's own `limits.memory` is enforced
        // by its store's limiter.
        .max_memory_size(4 << 30)
        // Reset a slot's first pages with memset instead of madvise: a
        // plugin's stack and data live there and are touched every call.
        // Measured with bench/plugins.sh: 64 KiB gave the lowest median and
        // p99; 1 MiB spent more on memset than madvise saved.
        .linear_memory_keep_resident(64 << 10)
        .table_keep_resident(64 << 10);
    let mut config = base_engine_config();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config).map_err(|e| RuntimeError::Engine(format!("{e:#}")))
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

impl Runtime {
    /// Compiles every configured generator. Must run inside a tokio runtime.
    pub async fn new(
        config: &Config,
        services: Services,
        cache_dir: Option<PathBuf>,
    ) -> Result<Self, RuntimeError> {
        let engine = pooled_engine().or_else(|pooled| {
            // Only where address space is short (a `ulimit -v`): the pool
            // reserves its slots' virtual memory up front.
            tracing::warn!(error = %pooled, "cannot reserve the instance pool; plugin instances are allocated one by one (slower)");
            Engine::new(&base_engine_config()).map_err(|e| RuntimeError::Engine(format!("{e:#}")))
        })?;

        let ticker = {
            let engine = engine.clone();
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(EPOCH_TICK);
                loop {
                    interval.tick().await;
                    engine.increment_epoch();
                }
            })
        };

        let runtime = Runtime {
            engine,
            linkers: Mutex::default(),
            services,
            cache_dir,
            loaded: ArcSwap::from_pointee(Loaded {
                routes: RouteTable::default(),
                site: Arc::default(),
                plugins: HashMap::new(),
            }),
            slots: tokio::sync::Semaphore::new(CONCURRENT_CALLS as usize),
            ticker,
        };
        let loaded = runtime.load_all(config, None).await?;
        runtime.loaded.store(Arc::new(loaded));
        Ok(runtime)
    }

    /// The linker for plugins granted exactly `grants`: WASI, the interfaces
    /// every plugin has, and the granted capabilities', nothing else. A
    /// plugin can only ever call what its linker holds.
    fn linker(&self, grants: &BTreeSet<Capability>) -> Result<Linker<HostState>, RuntimeError> {
        let mut linkers = self.linkers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(linker) = linkers.get(grants) {
            return Ok(linker.clone());
        }
        let engine_error = |e: wasmtime::Error| RuntimeError::Engine(format!("{e:#}"));
        let mut linker = Linker::<HostState>::new(&self.engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_error)?;
        images_wit::add_to_linker::<HostState, Has<Arc<crate::storage::ContentStore>>>(
            &mut linker,
            |s| s.view(|v| &v.store),
        )
        .map_err(engine_error)?;
        settings_wit::add_to_linker::<HostState, Has<()>>(&mut linker, |s| s.view(|_| &()))
            .map_err(engine_error)?;
        for capability in grants {
            capability.link(&mut linker).map_err(engine_error)?;
        }
        linkers.insert(grants.clone(), linker.clone());
        Ok(linker)
    }

    /// Loads every generator of `config`. With `previous` (a reload), a
    /// generator whose component, limits and grants are unchanged keeps its
    /// compiled plugin, and one that fails to load keeps its previous version
    /// (or stays absent) while the error is logged; at start-up any failure
    /// is fatal.
    async fn load_all(
        &self,
        config: &Config,
        previous: Option<&Loaded>,
    ) -> Result<Loaded, RuntimeError> {
        let mut plugins = HashMap::new();
        for (name, generator) in &config.generators {
            let old = previous.and_then(|p| p.plugins.get(name));
            match self.load_one(name, generator, old).await {
                Ok(plugin) => {
                    plugins.insert(name.clone(), plugin);
                }
                Err(e) if previous.is_some() => {
                    tracing::error!(generator = %name, error = %e, "not loaded; the previous version, if any, keeps serving");
                    if let Some(old) = old {
                        plugins.insert(name.clone(), old.clone());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let routes = RouteTable::new(
            &config.server.domains,
            config
                .generators
                .iter()
                .filter(|(name, _)| plugins.contains_key(*name))
                .map(|(name, g)| (name.as_str(), &g.hosts[..], g.path_prefix(name))),
        );
        let site = Site {
            domains: config.server.domains.clone(),
            generators: config
                .generators
                .iter()
                .filter(|(name, _)| plugins.contains_key(*name))
                .map(|(name, g)| Listed {
                    name: name.clone(),
                    path: g.path_prefix(name).map(str::to_owned),
                    about: g.about.clone(),
                    example: g.example.clone(),
                    budget: g.budget.clone(),
                })
                .collect(),
        };
        Ok(Loaded {
            routes,
            site: Arc::new(site),
            plugins,
        })
    }

    async fn load_one(
        &self,
        name: &str,
        generator: &GeneratorConfig,
        old: Option<&Arc<Plugin>>,
    ) -> Result<Arc<Plugin>, RuntimeError> {
        let bytes = plugin::read_source(name, &generator.source)?;
        let digest = Digest::sha256(&bytes);
        let grants: BTreeSet<_> = generator.grants.iter().copied().collect();
        if let Some(old) = old
            && old.digest == digest
            && old.limits == generator.limits
            && old.grants == grants
            && old.upstreams == generator.upstreams
            && old.settings == generator.settings
        {
            return Ok(old.clone());
        }
        let (engine, linker) = (self.engine.clone(), self.linker(&grants)?);
        let (name_owned, generator_owned) = (name.to_owned(), generator.clone());
        let cache = self.cache_dir.clone();
        // Compiling is CPU-heavy; keep it off the async threads.
        let loaded = tokio::task::spawn_blocking(move || {
            plugin::load(
                &engine,
                &linker,
                &name_owned,
                &generator_owned,
                &bytes,
                cache.as_deref(),
            )
        })
        .await
        .map_err(|e| RuntimeError::Engine(e.to_string()))??;
        tracing::info!(plugin = %loaded.id, digest = %loaded.digest, grants = ?loaded.grants, "loaded generator");
        Ok(Arc::new(loaded))
    }

    /// Applies a changed config: generators added, removed, re-routed or
    /// rebuilt take effect at once, atomically; requests already running
    /// finish on the version they started with.
    pub async fn reload(&self, config: &Config) {
        let previous = self.current();
        let loaded = match self.load_all(config, Some(&previous)).await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "reload failed; the previous generators keep serving");
                return;
            }
        };
        for (name, plugin) in &loaded.plugins {
            let changed = previous
                .plugins
                .get(name)
                .is_none_or(|old| !Arc::ptr_eq(old, plugin));
            if changed {
                tracing::info!(plugin = %plugin.id, digest = %plugin.digest, "swapped in generator");
            }
        }
        for name in previous
            .plugins
            .keys()
            .filter(|n| !loaded.plugins.contains_key(*n))
        {
            tracing::info!(generator = %name, "removed generator");
        }
        self.loaded.store(Arc::new(loaded));
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded.load_full()
    }

    fn plugin(&self, name: &str) -> Result<Arc<Plugin>, GeneratorError> {
        self.current()
            .plugins
            .get(name)
            .cloned()
            .ok_or_else(|| GeneratorError {
                kind: ErrorKind::NameUnknown,
                plugin: None,
                message: format!("no generator named {name:?} is loaded"),
            })
    }

    /// Runs one export of a fresh instance of `plugin` under its limits,
    /// then turns its result into a host value with `finish`.
    async fn call<R, T>(
        &self,
        plugin: Arc<Plugin>,
        export: impl AsyncFnOnce(
            &Exports,
            &mut Store<HostState>,
        ) -> wasmtime::Result<Result<R, types::Error>>,
        finish: impl FnOnce(&mut HostState, R) -> wasmtime::Result<T>,
    ) -> Result<T, GeneratorError> {
        let id = plugin.id.clone();
        let limit = plugin.limits.timeout;
        // Waiting for a slot counts against the plugin's time limit.
        let started = tokio::time::Instant::now();
        let _slot = match tokio::time::timeout(limit, self.slots.acquire()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_closed)) => {
                return Err(GeneratorError {
                    kind: ErrorKind::Internal,
                    plugin: Some(id.clone()),
                    message: "the plugin runtime is shutting down".into(),
                });
            }
            Err(_elapsed) => return Err(error::deadline(&id, limit)),
        };
        let left = limit.saturating_sub(started.elapsed());
        let mut store = Store::new(
            &self.engine,
            HostState::new(plugin.clone(), self.services.clone()),
        );
        store.limiter(|s| s.limiter());
        store.epoch_deadline_async_yield_and_update(1);

        let call = async {
            let instantiating = tokio::time::Instant::now();
            let instance = plugin
                .pre
                .instance_pre()
                .instantiate_async(&mut store)
                .await?;
            crate::metrics::instantiated(&id.name, instantiating.elapsed().as_secs_f64());
            let exports = Exports {
                bound: bindings::Plugin::new(&mut store, &instance)?,
                instance,
                tags: plugin.tags,
                referrers: plugin.referrers,
            };
            export(&exports, &mut store).await
        };
        let outcome = tokio::time::timeout(left, call).await;
        let output = store.data().output();
        if !output.is_empty() {
            tracing::debug!(plugin = %id, output = %output.trim_end(), "plugin output");
        }
        match outcome {
            Err(_elapsed) => Err(error::deadline(&id, limit)),
            Ok(Err(trap)) => Err(error::trapped(&id, trap, limit)),
            Ok(Ok(Err(reported))) => {
                let last = store.data_mut().call.last_error.take();
                Err(error::reported(&id, reported, last))
            }
            Ok(Ok(Ok(value))) => finish(store.data_mut(), value).map_err(|e| GeneratorError {
                kind: ErrorKind::Internal,
                plugin: Some(id.clone()),
                message: format!("{id} crashed: returned an invalid handle: {e:#}"),
            }),
        }
    }
}

/// What an instance exports: the `generator` interface every plugin has, and
/// the optional ones, looked up when called.
struct Exports {
    bound: bindings::Plugin,
    instance: wasmtime::component::Instance,
    tags: Option<wasmtime::component::ComponentExportIndex>,
    referrers: Option<wasmtime::component::ComponentExportIndex>,
}

impl Exports {
    fn generator(&self) -> &guest::Guest {
        self.bound.kontain_generator_generator()
    }

    /// `tags.list(repository)`; a plugin without it lists nothing.
    async fn tags(
        &self,
        store: &mut Store<HostState>,
        repository: &str,
    ) -> wasmtime::Result<Result<Vec<String>, types::Error>> {
        let Some(index) = &self.tags else {
            return Ok(Ok(Vec::new()));
        };
        let list = self
            .instance
            .get_typed_func::<(&str,), (Result<Vec<String>, types::Error>,)>(&mut *store, index)?;
        let (tags,) = list.call_async(&mut *store, (repository,)).await?;
        Ok(tags)
    }

    /// `referrers.list(repository, digest)`; a plugin without it adds none.
    async fn referrers(
        &self,
        store: &mut Store<HostState>,
        repository: &str,
        digest: &str,
    ) -> wasmtime::Result<Result<Vec<types::Referrer>, types::Error>> {
        let Some(index) = &self.referrers else {
            return Ok(Ok(Vec::new()));
        };
        let list = self
            .instance
            .get_typed_func::<(&str, &str), (Result<Vec<types::Referrer>, types::Error>,)>(
                &mut *store,
                index,
            )?;
        let (found,) = list.call_async(&mut *store, (repository, digest)).await?;
        Ok(found)
    }
}

#[async_trait::async_trait]
impl Generators for Runtime {
    fn route(&self, host: Option<&str>, name: &RepositoryName) -> Option<Route> {
        self.current().routes.route(host, name)
    }

    fn site(&self) -> Arc<Site> {
        self.current().site.clone()
    }

    fn loaded(&self) -> usize {
        self.current().plugins.len()
    }

    async fn resolve(&self, request: ResolveRequest) -> Result<StoredManifest, GeneratorError> {
        let plugin = self.plugin(&request.route.generator)?;
        let guest_request = guest::Request {
            repository: request.route.repository,
            reference: request.reference.to_string(),
            accept: request.accept,
        };
        self.call(
            plugin,
            async |exports, store| {
                exports
                    .generator()
                    .call_resolve(store, &guest_request)
                    .await
            },
            |state, handle| state.take_manifest(handle),
        )
        .await
    }

    async fn tags(&self, route: Route) -> Result<Vec<String>, GeneratorError> {
        let plugin = self.plugin(&route.generator)?;
        if plugin.tags.is_none() {
            return Ok(Vec::new());
        }
        self.call(
            plugin,
            async |exports, store| exports.tags(store, &route.repository).await,
            |_, tags| Ok(tags),
        )
        .await
    }

    async fn referrers(
        &self,
        route: Route,
        digest: Digest,
    ) -> Result<Vec<serde_json::Value>, GeneratorError> {
        let plugin = self.plugin(&route.generator)?;
        if plugin.referrers.is_none() {
            return Ok(Vec::new());
        }
        let digest = digest.to_string();
        let found = self
            .call(
                plugin,
                async |exports, store| exports.referrers(store, &route.repository, &digest).await,
                |_, found| {
                    Ok(found
                        .iter()
                        .filter_map(host::descriptor_of)
                        .take(MAX_REFERRERS)
                        .collect())
                },
            )
            .await;
        match found {
            // The spec answers a digest nothing refers to with an empty
            // index, never 404: a client would take that for "no API".
            Err(e)
                if matches!(
                    e.kind,
                    ErrorKind::NotFound | ErrorKind::InvalidReference | ErrorKind::InvalidName
                ) =>
            {
                Ok(Vec::new())
            }
            other => other,
        }
    }

    async fn fetch_blob(&self, route: Route, digest: Digest) -> Result<BlobInfo, GeneratorError> {
        let plugin = self.plugin(&route.generator)?;
        let guest_request = guest::BlobRequest {
            repository: route.repository,
            digest: digest.to_string(),
        };
        self.call(
            plugin,
            async |exports, store| {
                exports
                    .generator()
                    .call_fetch_blob(store, &guest_request)
                    .await
            },
            |state, handle| state.take_blob(handle),
        )
        .await
    }
}
