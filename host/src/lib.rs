//! kontain: a container registry that generates images when they are pulled.
//!
//! [`build`] and [`run`] are the one place that wires everything: the
//! content store, the capabilities' services, the plugin runtime, the HTTP
//! registry, expiry and hot reload. Every other module receives what it
//! needs from here.

pub mod activity;
pub mod buildpack;
pub mod cache;
pub mod capabilities;
pub mod cli;
pub mod config;
pub mod fair;
pub mod files;
pub mod flatten;
pub mod generator;
pub mod go;
pub mod image;
pub mod logs;
pub mod metrics;
pub mod oci;
pub mod process;
pub mod random;
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

use crate::capabilities::Services;
use crate::config::{Config, Origin};
use crate::registry::Registry;
use crate::runtime::Runtime;
use crate::storage::config::Backend;

/// How long open requests may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long stopped builds may take to clean up after a shutdown signal.
const DETACHED_GRACE: Duration = Duration::from_secs(5);

/// A built server: the registry, the runtime and services behind it (for
/// reloads), and the expiry collector to run beside it.
pub struct App {
    pub registry: Arc<Registry>,
    pub runtime: Arc<Runtime>,
    pub services: Services,
    pub collector: Collector,
}

/// Expiry: content unused for `ttl` leaves the store, and local trees
/// (unpacked modules, checkouts, builder filesystems) leave the disk, every
/// `every` (see `storage::expiry`).
pub struct Collector {
    services: Services,
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
            match self.services.store.collect(self.ttl, self.every).await {
                Ok(Some(c)) if c != Default::default() => {
                    crate::metrics::expiry(c.bytes);
                    tracing::info!(
                        manifests = c.manifests,
                        blobs = c.blobs,
                        values = c.values,
                        bytes = c.bytes,
                        "expired unused storage"
                    )
                }
                Ok(Some(_)) => crate::metrics::expiry(0),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "expiry failed"),
            }
            let (services, ttl) = (self.services.clone(), self.ttl);
            if let Ok(n) = tokio::task::spawn_blocking(move || services.collect(ttl)).await
                && n > 0
            {
                tracing::info!(directories = n, "expired unused build caches");
            }
        }
    }
}

/// Builds the registry that `config` describes.
pub async fn build(config: &Config) -> anyhow::Result<App> {
    let storage = &config.storage;
    let store =
        storage::open(storage)
            .await
            .with_context(|| match (&storage.backend, &storage.gcs) {
                (Backend::Gcs, Some(gcs)) => format!("opening the bucket {}", gcs.bucket),
                _ => format!("opening storage at {}", storage.path.display()),
            })?;
    let store = Arc::new(store);
    let services = Services::new(config, store.clone()).map_err(anyhow::Error::msg)?;
    let compiled = Some(storage.path.join("compiled"));
    let runtime = Arc::new(Runtime::new(config, services.clone(), compiled).await?);
    let about = registry::About {
        backend: match storage.backend {
            Backend::Gcs => "Google Cloud Storage",
            Backend::Filesystem => "the local filesystem",
        },
        ttl: storage.ttl,
        collect_every: storage.collect_every,
    };
    let registry = Arc::new(
        Registry::new(store, runtime.clone())
            .with_about(about)
            .with_fairness(fair::Fairness::new(&config.server))
            .with_hold(config.server.hold),
    );
    let collector = Collector {
        services: services.clone(),
        ttl: storage.ttl,
        every: storage.collect_every,
    };
    Ok(App {
        registry,
        runtime,
        services,
        collector,
    })
}

/// Runs the server until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let App {
        registry,
        runtime,
        services,
        collector,
    } = build(&config).await?;
    tokio::spawn(collector.run());
    // The config reloads live when its file or plugin components change.
    let _watch = match &config.origin {
        Origin::File(path) => match watch::spawn(path, &config, runtime, services) {
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
    if let Some(address) = config.server.metrics_listen {
        let listener = metrics::listen(address).await?;
        tracing::info!(address = %listener.local_addr()?, "metrics are served at /metrics");
        tokio::spawn(metrics::serve(listener));
    }
    let limits = registry::Limits::new(&config.server);
    // Builds stop at the signal (stopped, nothing stored), so that requests
    // waiting for them are answered within the grace period.
    let shutdown = async move {
        shutdown.await;
        tokio::spawn(activity::stop_detached(DETACHED_GRACE));
    };
    let served = registry::serve(listener, registry, limits, shutdown, SHUTDOWN_GRACE).await;
    activity::stop_detached(DETACHED_GRACE).await;
    served?;
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
