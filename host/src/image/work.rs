//! CPU-bound work (tar, gzip, hashing, unpacking) on blocking threads, at
//! most one job per core at a time, stopped early when nobody waits for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Semaphore;

use super::ImageError;
use crate::process::OnDrop;

/// A bound on how much CPU-heavy work runs at once.
#[derive(Clone)]
pub struct Cpu(Arc<Semaphore>);

impl Default for Cpu {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Cpu(Arc::new(Semaphore::new(cores)))
    }
}

impl Cpu {
    /// Runs `work` on a blocking thread once a core is free. If the returned
    /// future is dropped (the request timed out or the client left), `work`
    /// sees its [`Cancel`] flag set and should stop early.
    pub async fn run<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<ImageError> + Send + 'static,
        F: FnOnce(&Cancel) -> Result<T, E> + Send + 'static,
    {
        let permit = self
            .0
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ImageError::TaskFailed(e.to_string()))?;
        let cancel = Cancel::default();
        let flag = cancel.clone();
        let guard = OnDrop::new(move || flag.0.store(true, Ordering::Relaxed));
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(&cancel)
        })
        .await
        .map_err(|e| ImageError::TaskFailed(e.to_string()))?;
        guard.disarm();
        result
    }
}

/// Runs short blocking work (file system calls) off the async threads, with
/// no bound: it waits on the disk, not the CPU.
pub async fn blocking<T, E>(work: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<ImageError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ImageError::TaskFailed(e.to_string()))?
}

/// A flag long-running blocking work polls so that abandoned requests stop
/// consuming CPU and disk.
#[derive(Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn check(&self) -> Result<(), ImageError> {
        if self.0.load(Ordering::Relaxed) {
            Err(ImageError::Cancelled)
        } else {
            Ok(())
        }
    }
}
