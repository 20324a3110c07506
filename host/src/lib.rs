//! kontain: a container registry that generates images when they are pulled.
//!
//! [`run`] is the one place that wires everything: storage, the native
//! builders, the plugin runtime and the HTTP registry. Every other module
//! receives what it needs from here.

pub mod builders;
pub mod cli;
pub mod config;
pub mod generator;
pub mod oci;
pub mod registry;
pub mod routing;
pub mod runtime;
pub mod storage;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::builders::Builders;
use crate::config::{Config, StorageConfig};
use crate::registry::Registry;
use crate::runtime::Runtime;
use crate::storage::Storage;
use crate::storage::filesystem::FilesystemStorage;

/// How long open requests may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Builds the registry that `config` describes.
pub async fn build(config: &Config) -> anyhow::Result<Arc<Registry>> {
    let storage: Arc<dyn Storage> = match &config.storage {
        StorageConfig::Filesystem { path } => Arc::new(
            FilesystemStorage::open(path)
                .with_context(|| format!("opening storage at {}", path.display()))?,
        ),
    };
    let builders = Builders::new(storage.clone());
    let runtime = Runtime::new(config, builders).await?;
    Ok(Arc::new(Registry::new(storage, Arc::new(runtime))))
}

/// Runs the server until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let registry = build(&config).await?;
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
