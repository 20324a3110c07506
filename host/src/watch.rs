//! Hot reload: watches `kontain.toml` and every plugin file it names, and
//! when one of them really changed (its content, not just its metadata; our
//! own reads do not count), re-reads the config and applies what can change
//! without a restart: generators and their routing (`[server] domains`
//! included) through the runtime, `[upstream]`, `[go]` and `[buildpack]`
//! through the capabilities' services. What needs a restart is logged by
//! name (`needs a restart: storage`).
//!
//! Directories are watched rather than files, so that editors and deploy
//! tools that replace a file by renaming a new one over it are seen.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, EventKind};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::capabilities::Services;
use crate::config::{Config, Source};
use crate::oci::Digest;
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

/// What each watched file holds (a missing one holds nothing). Plugin
/// files are large: read and hashed off the async threads.
async fn contents(files: &BTreeSet<PathBuf>) -> BTreeMap<PathBuf, Option<Digest>> {
    let files = files.clone();
    tokio::task::spawn_blocking(move || {
        files
            .into_iter()
            .map(|f| {
                let digest = std::fs::read(&f).ok().map(|b| Digest::sha256(&b));
                (f, digest)
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// Whether an event may mean new content: reads (opening, closing after
/// reading, access times) do not.
fn may_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(notify::event::AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Starts watching `config_path` (the file `config` was read from).
pub fn spawn(
    config_path: &Path,
    config: &Config,
    runtime: Arc<Runtime>,
    services: Services,
) -> notify::Result<Watch> {
    // Read the file by the path it was first read by (so that relative paths
    // in it resolve the same way); match events by its absolute path.
    let read_path = config_path.to_owned();
    let config_path = std::path::absolute(config_path)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && may_change(&event.kind)
        {
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
        let mut seen = contents(&files).await;
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
            let now = contents(&files).await;
            if now == seen {
                continue;
            }
            // What was read is what was seen: a bad file is logged once, and
            // an edit made while this reload runs is a change of its own.
            seen = now;
            let Some(next) = read(&read_path) else {
                continue;
            };
            for name in current.needs_restart(&next) {
                tracing::warn!("needs a restart: {name}");
            }
            let applied = services.reconfigure(&current, &next);
            runtime.reload(&applied).await;
            let watched = watched_files(&config_path, &applied);
            let added: BTreeSet<PathBuf> = watched.difference(&files).cloned().collect();
            seen.retain(|f, _| watched.contains(f));
            seen.extend(contents(&added).await);
            files = watched;
            watch_dirs(&mut watcher, &files, &mut dirs);
            current = applied;
        }
    });
    Ok(Watch { task })
}

/// The config at `path` with the environment applied; an invalid one is
/// logged (once per change) and left alone.
fn read(path: &Path) -> Option<Config> {
    let mut config = match Config::from_file(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "config not reloaded; the running generators keep serving");
            return None;
        }
    };
    if let Err(e) = config.apply_env(|k| std::env::var(k).ok()) {
        tracing::error!(error = %e, "config not reloaded");
        return None;
    }
    Some(config)
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
