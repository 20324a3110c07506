//! Hot reload: watches `kontain.toml` and every plugin file it names, and on a
//! change (debounced) re-reads the config and hands it to the runtime, which
//! compiles changed plugins off the request path and swaps them in.
//!
//! Directories are watched rather than files, so that editors and deploy
//! tools that replace a file by renaming a new one over it are seen.
//! Generators and their routing (including `[server] domains`) reload live;
//! `[server] listen`, `[storage]` and `[upstream]` need a restart (the first
//! two are logged when they change).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{Config, Source};
use crate::runtime::Runtime;

/// Changes closer together than this are applied once.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Keeps the watch running; dropping it stops watching.
pub struct Watch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The files a config depends on: itself and its plugins' components.
fn watched_files(config_path: &Path, config: &Config) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::from([config_path.to_owned()]);
    for generator in config.generators.values() {
        if let Source::File(path) = &generator.source {
            files.insert(std::path::absolute(path).unwrap_or_else(|_| path.clone()));
        }
    }
    files
}

/// Starts watching `config_path` (the file `config` was read from).
pub fn spawn(config_path: &Path, config: &Config, runtime: Arc<Runtime>) -> notify::Result<Watch> {
    // Read the file by the path it was first read by (so that relative paths
    // in it resolve the same way); match events by its absolute path.
    let read_path = config_path.to_owned();
    let config_path = std::path::absolute(config_path)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            for path in event.paths {
                let _ = tx.send(path);
            }
        }
    })?;
    let mut files = watched_files(&config_path, config);
    let mut dirs = BTreeSet::new();
    watch_dirs(&mut watcher, &files, &mut dirs);
    let startup = config.clone();
    let task = tokio::spawn(async move {
        let mut current = startup;
        while let Some(path) = rx.recv().await {
            if !files.contains(&path) {
                continue;
            }
            // Debounce: wait until the burst of events about our files is
            // over (other files in the same directories, like a log being
            // written, must not hold the reload back).
            let mut quiet_until = tokio::time::Instant::now() + DEBOUNCE;
            loop {
                match tokio::time::timeout_at(quiet_until, rx.recv()).await {
                    Ok(Some(path)) if files.contains(&path) => {
                        quiet_until = tokio::time::Instant::now() + DEBOUNCE;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let mut config = match Config::from_file(&read_path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "config not reloaded; the running generators keep serving");
                    continue;
                }
            };
            if let Err(e) = config.apply_env(|k| std::env::var(k).ok()) {
                tracing::error!(error = %e, "config not reloaded");
                continue;
            }
            if config.server.listen != current.server.listen
                || format!("{:?}", config.storage) != format!("{:?}", current.storage)
            {
                tracing::warn!("[server] and [storage] changes take effect at the next restart");
            }
            runtime.reload(&config).await;
            files = watched_files(&config_path, &config);
            watch_dirs(&mut watcher, &files, &mut dirs);
            current = config;
        }
    });
    Ok(Watch { task })
}

fn watch_dirs(watcher: &mut impl Watcher, files: &BTreeSet<PathBuf>, dirs: &mut BTreeSet<PathBuf>) {
    for file in files {
        let Some(dir) = file.parent() else { continue };
        if dirs.contains(dir) {
            continue;
        }
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                dirs.insert(dir.to_owned());
            }
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot watch for changes"),
        }
    }
}
