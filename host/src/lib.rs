//! kontain: a container registry that generates images when they are pulled.
//!
//! [`run`] is the one place that wires everything: storage, the native
//! builders, the plugin runtime and the HTTP registry. Every other module
//! receives what it needs from here.

pub mod builders;
pub mod buildpack;
pub mod cli;
pub mod config;
pub mod files;
pub mod generator;
pub mod golang;
pub mod locks;
pub mod oci;
pub mod process;
pub mod registry;
pub mod routing;
pub mod runtime;
pub mod storage;
pub mod upstream;
pub mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use std::collections::HashMap;

use crate::builders::Builders;
use crate::buildpack::Buildpacks;
use crate::config::{Backend, Config, CredentialsConfig, Origin, StorageConfig};
use crate::golang::Go;
use crate::registry::Registry;
use crate::runtime::{Runtime, Services};
use crate::storage::Storage;
use crate::storage::filesystem::FilesystemStorage;
use crate::storage::gcs::GcsStorage;
use crate::upstream::{Client, Credentials, Endpoint, HostPattern, Mirror, Policy, Registries};

/// How long open requests may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A built server: the registry, the runtime behind it (for reloads), and
/// the expiry collector to run beside it.
pub struct App {
    pub registry: Arc<Registry>,
    pub runtime: Arc<Runtime>,
    pub collector: Collector,
}

/// Expiry: storage, unpacked Go modules, checkouts and builder filesystems
/// unused for `ttl` are removed every `every` (see `Storage::collect`).
pub struct Collector {
    storage: Arc<dyn Storage>,
    go: Arc<Go>,
    buildpacks: Arc<Buildpacks>,
    ttl: Duration,
    every: Duration,
}

impl Collector {
    /// Runs until the process ends; does nothing when `ttl` is zero.
    pub async fn run(self) {
        if self.ttl.is_zero() {
            return;
        }
        loop {
            tokio::time::sleep(self.every).await;
            match self.storage.collect(self.ttl).await {
                Ok(c) if c != Default::default() => tracing::info!(
                    manifests = c.manifests,
                    blobs = c.blobs,
                    values = c.values,
                    bytes = c.bytes,
                    "expired unused storage"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "expiry failed"),
            }
            let (go, bp, ttl) = (self.go.clone(), self.buildpacks.clone(), self.ttl);
            if let Ok(n) =
                tokio::task::spawn_blocking(move || go.collect(ttl) + bp.collect(ttl)).await
                && n > 0
            {
                tracing::info!(directories = n, "expired unused build caches");
            }
        }
    }
}

/// Builds the registry that `config` describes.
pub async fn build(config: &Config) -> anyhow::Result<App> {
    let StorageConfig {
        path,
        ttl,
        collect_every,
        ..
    } = &config.storage;
    let storage: Arc<dyn Storage> = match (&config.storage.backend, &config.storage.gcs) {
        (Backend::Gcs, Some(gcs)) => Arc::new(
            GcsStorage::open(gcs, path)
                .await
                .with_context(|| format!("opening the bucket {}", gcs.bucket))?,
        ),
        _ => Arc::new(
            FilesystemStorage::open(path)
                .map(|s| s.refreshing(*ttl))
                .with_context(|| format!("opening storage at {}", path.display()))?,
        ),
    };
    let mirror = Arc::new(mirror(config, storage.clone())?);
    let scratch = config.go.scratch.clone().unwrap_or_else(|| path.join("go"));
    let go = Go::new(
        &config.go,
        scratch,
        mirror.client().clone(),
        storage.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    let bp_scratch = config
        .buildpack
        .scratch
        .clone()
        .unwrap_or_else(|| path.join("buildpack"));
    let buildpacks = Buildpacks::new(&config.buildpack, bp_scratch, mirror.client().clone())
        .map_err(anyhow::Error::msg)?;
    let (go, buildpacks) = (Arc::new(go), Arc::new(buildpacks));
    let collector = Collector {
        storage: storage.clone(),
        go: go.clone(),
        buildpacks: buildpacks.clone(),
        ttl: *ttl,
        every: *collect_every,
    };
    let services = Services {
        builders: Builders::new(storage.clone()),
        mirror,
        go,
        buildpacks,
    };
    let compiled = Some(path.join("compiled"));
    let runtime = Arc::new(Runtime::new(config, services, compiled).await?);
    let registry = Arc::new(Registry::new(storage, runtime.clone()));
    Ok(App {
        registry,
        runtime,
        collector,
    })
}

/// The upstream client and its cache, from `[upstream]`.
fn mirror(config: &Config, storage: Arc<dyn Storage>) -> anyhow::Result<Mirror> {
    let upstream = &config.upstream;
    let credentials = |c: &CredentialsConfig| -> anyhow::Result<Credentials> {
        let password = match (&c.password, &c.password_env) {
            (Some(p), _) => p.clone(),
            (None, Some(var)) => std::env::var(var)
                .with_context(|| format!("reading the upstream password from ${var}"))?,
            (None, None) => String::new(),
        };
        Ok(Credentials {
            username: c.username.clone(),
            password,
        })
    };
    let mut named = HashMap::new();
    let mut allow: Vec<HostPattern> = upstream.allow.iter().map(|p| HostPattern::new(p)).collect();
    // Module proxies named in [go] and the git host of [buildpack] are
    // allowed as exactly themselves (still never at a private address).
    let git_host = url::Url::parse(
        &config
            .buildpack
            .git_url
            .replace("{owner}", "o")
            .replace("{repo}", "r"),
    )
    .ok();
    for url in config.go.proxies.iter().chain(git_host.as_ref()) {
        if let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) {
            allow.push(HostPattern::new(&format!("{host}:{port}")));
        }
    }
    let mut private_ok = Vec::new();
    for (name, u) in &upstream.registries {
        let host = u.url.host_str().unwrap_or_default();
        let port = u.url.port_or_known_default().unwrap_or(443);
        let pattern = HostPattern::new(&format!("{host}:{port}"));
        if u.allow_private {
            private_ok.push(pattern);
        } else {
            allow.push(pattern);
        }
        let endpoint = Endpoint {
            name: name.clone(),
            base: u.url.clone(),
            credentials: u.credentials().as_ref().map(credentials).transpose()?,
        };
        named.insert(name.clone(), Arc::new(endpoint));
    }
    let by_host = upstream
        .credentials
        .iter()
        .map(|(host, c)| Ok((host.clone(), credentials(c)?)))
        .collect::<anyhow::Result<HashMap<_, _>>>()?;
    let policy = Arc::new(Policy::new(allow, private_ok));
    let client = Arc::new(Client::new(policy).map_err(anyhow::Error::msg)?);
    Ok(Mirror::new(
        client,
        Registries::new(named, by_host),
        storage,
        upstream.max_blob_bytes.0,
    ))
}

/// Runs the server until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let App {
        registry,
        runtime,
        collector,
    } = build(&config).await?;
    tokio::spawn(collector.run());
    // Generators reload live when their config file or components change.
    let _watch = match &config.origin {
        Origin::File(path) => match watch::spawn(path, &config, runtime) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "hot reload is off: cannot watch the config");
                None
            }
        },
        Origin::BuiltIn => None,
    };
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("listening on {}", config.server.listen))?;
    tracing::info!(
        address = %listener.local_addr()?,
        config = %config.origin,
        generators = ?config.generators.keys().collect::<Vec<_>>(),
        "kontain is serving"
    );
    registry::serve(listener, registry, shutdown, SHUTDOWN_GRACE).await?;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}
