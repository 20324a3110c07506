//! What the server is doing: the builds running now and the last ones to
//! end, for the landing page (and the builds metrics), and which generator
//! and image the current request is about.
//!
//! The registry opens a [`scope`] per request and names its generator and
//! image in it; a build started anywhere under that request (the plugin
//! call runs on the request's task) finds them there, so capabilities need
//! not be told who asked.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Instant, SystemTime};

use crate::metrics;

/// Ended builds kept for the landing page.
const RECENT: usize = 20;

/// Longest failure message kept (the first line of a compiler's output is
/// what people need; the log has the rest).
const MAX_MESSAGE: usize = 600;

#[derive(Clone, Debug, Default)]
struct Current {
    generator: Arc<Mutex<String>>,
    image: Arc<Mutex<String>>,
}

tokio::task_local! {
    static REQUEST: Current;
}

/// Runs `request` with its own record of what it is about.
pub async fn scope<F: Future>(request: F) -> F::Output {
    REQUEST.scope(Current::default(), request).await
}

fn with(f: impl FnOnce(&Current)) {
    let _ = REQUEST.try_with(f);
}

/// Names the generator the current request reached.
pub fn set_generator(generator: &str) {
    with(|c| *lock(&c.generator) = generator.to_owned());
}

/// Names the image the current request asked for (`name:tag`, `name@digest`).
pub fn set_image(image: String) {
    with(|c| *lock(&c.image) = image);
}

/// The generator of the current request (`""` when none).
pub fn generator() -> String {
    REQUEST
        .try_with(|c| lock(&c.generator).clone())
        .unwrap_or_default()
}

fn image() -> String {
    REQUEST
        .try_with(|c| lock(&c.image).clone())
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A build running now.
#[derive(Clone, Debug)]
pub struct Running {
    pub generator: String,
    pub image: String,
    pub phase: &'static str,
    pub started: Instant,
}

/// A build that ended.
#[derive(Clone, Debug)]
pub struct Ended {
    pub generator: String,
    pub image: String,
    pub seconds: f64,
    pub at: SystemTime,
    /// Why it failed; `None` when it succeeded.
    pub failure: Option<String>,
}

#[derive(Default)]
struct Board {
    running: BTreeMap<u64, Running>,
    recent: VecDeque<Ended>,
}

static BOARD: LazyLock<Mutex<Board>> = LazyLock::new(Mutex::default);
static NEXT: AtomicU64 = AtomicU64::new(0);

/// The builds running now (oldest first) and the last to end (newest first).
pub fn snapshot() -> (Vec<Running>, Vec<Ended>) {
    let board = lock(&BOARD);
    (
        board.running.values().cloned().collect(),
        board.recent.iter().cloned().collect(),
    )
}

/// A build of the current request's image, listed and counted until it
/// ends; dropped unfinished, it ends as abandoned.
pub struct Build {
    id: u64,
    metric: Option<metrics::Build>,
}

/// Starts listing (and counting) a build.
pub fn build_started() -> Build {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let generator = generator();
    let metric = metrics::build_started(&generator);
    let running = Running {
        generator,
        image: image(),
        phase: "building",
        started: Instant::now(),
    };
    lock(&BOARD).running.insert(id, running);
    Build {
        id,
        metric: Some(metric),
    }
}

impl Build {
    /// Ends the build: `failure` says why it failed, `None` if it did not.
    pub fn finish(mut self, failure: Option<String>) {
        self.end(failure);
    }

    fn end(&mut self, failure: Option<String>) {
        let Some(metric) = self.metric.take() else {
            return;
        };
        metric.finish(failure.is_none());
        let mut board = lock(&BOARD);
        let Some(running) = board.running.remove(&self.id) else {
            return;
        };
        let failure = failure.map(|mut m| {
            if m.len() > MAX_MESSAGE {
                let mut end = MAX_MESSAGE;
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                m.truncate(end);
                m.push('…');
            }
            m
        });
        board.recent.push_front(Ended {
            generator: running.generator,
            image: running.image,
            seconds: running.started.elapsed().as_secs_f64(),
            at: SystemTime::now(),
            failure,
        });
        board.recent.truncate(RECENT);
    }
}

impl Drop for Build {
    fn drop(&mut self) {
        self.end(Some(
            "abandoned: the request that started it went away".into(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builds_are_listed_while_running_and_after() {
        scope(async {
            set_generator("ko");
            set_image("ko/example.com/listed:v1".into());
            let build = build_started();
            let (running, _) = snapshot();
            assert!(
                running
                    .iter()
                    .any(|r| r.image == "ko/example.com/listed:v1" && r.generator == "ko")
            );
            build.finish(Some("undefined: nope".into()));
            let (running, recent) = snapshot();
            assert!(
                !running
                    .iter()
                    .any(|r| r.image == "ko/example.com/listed:v1")
            );
            let ended = recent
                .iter()
                .find(|e| e.image == "ko/example.com/listed:v1")
                .expect("listed as ended");
            assert_eq!(ended.failure.as_deref(), Some("undefined: nope"));
        })
        .await;
    }
}
