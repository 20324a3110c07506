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
use std::time::{Duration, Instant, SystemTime};

use crate::config::generators::Budget;
use crate::fair::{Client, Denied, Fairness, Turn};
use crate::metrics;

/// Ended builds kept for the landing page.
const RECENT: usize = 20;

/// Longest failure message kept (the first line of a compiler's output is
/// what people need; the log has the rest).
const MAX_MESSAGE: usize = 600;

#[derive(Clone, Default)]
struct Current {
    generator: Arc<Mutex<String>>,
    image: Arc<Mutex<String>>,
    /// The build this request is running, if any.
    build: Arc<Mutex<Option<u64>>>,
    /// Who asked.
    client: Arc<Mutex<Option<Client>>>,
    /// What they may spend (once routed).
    who: Arc<Mutex<Option<Who>>>,
    /// When a budget turned the request away: when to come back.
    retry_after: Arc<Mutex<Option<Duration>>>,
}

#[derive(Clone)]
struct Who {
    fair: Arc<Fairness>,
    client: Client,
    budget: Budget,
}

/// Names who sent the current request.
pub fn set_client(client: Client) {
    with(|c| *lock(&c.client) = Some(client));
}

/// The client of the current request, if known.
pub fn client() -> Option<Client> {
    REQUEST.try_with(|c| *lock(&c.client)).ok().flatten()
}

/// Names the budget of the generator the current request reached, kept by
/// `fair`.
pub fn set_budget(fair: Arc<Fairness>, budget: Budget) {
    with(|c| {
        let Some(client) = *lock(&c.client) else {
            return;
        };
        *lock(&c.who) = Some(Who {
            fair,
            client,
            budget,
        })
    });
}

fn who() -> Option<Who> {
    REQUEST.try_with(|c| lock(&c.who).clone()).ok().flatten()
}

/// Remembers a denial's `Retry-After` for the response.
pub fn denied(denied: Denied) -> Denied {
    with(|c| *lock(&c.retry_after) = Some(denied.retry_after));
    denied
}

/// The `Retry-After` of a denial during the current request.
pub fn retry_after() -> Option<Duration> {
    REQUEST.try_with(|c| *lock(&c.retry_after)).ok().flatten()
}

/// Whether the current request's client may have new bytes made.
pub fn may_generate() -> Result<(), Denied> {
    match who() {
        Some(w) => w
            .fair
            .may_generate(&generator(), w.client, &w.budget)
            .map_err(denied),
        None => Ok(()),
    }
}

/// Spends `bytes` about to be made for the current request's client.
pub fn generate(bytes: u64) -> Result<(), Denied> {
    match who() {
        Some(w) => w
            .fair
            .generate(&generator(), w.client, &w.budget, bytes)
            .map_err(denied),
        None => Ok(()),
    }
}

/// Charges `bytes` made for the current request to its client.
pub fn generated(bytes: u64) {
    if let Some(w) = who() {
        w.fair.generated(&generator(), w.client, &w.budget, bytes);
    }
}

/// Spends a build of the current request's client and waits for its turn
/// in the build queue (`None` outside a request: nothing to wait for).
pub async fn build_turn() -> Result<Option<Turn>, Denied> {
    match who() {
        Some(w) => w
            .fair
            .build(&generator(), w.client, &w.budget)
            .await
            .map(Some)
            .map_err(denied),
        None => Ok(None),
    }
}

tokio::task_local! {
    static REQUEST: Current;
}

/// Runs `request` with its own record of what it is about.
pub async fn scope<F: Future>(request: F) -> F::Output {
    REQUEST.scope(Current::default(), request).await
}

/// Work that belongs to the server, not to the request that started it.
static DETACHED: LazyLock<(
    tokio_util::task::TaskTracker,
    tokio_util::sync::CancellationToken,
)> = LazyLock::new(Default::default);

/// Runs `work` as a task of its own, which goes on when the request that
/// started it goes away (a client's header timeout must not cancel a build
/// others will pull). It keeps the request's record (generator, image,
/// client, budget) and log span. `None` when the server stopped it
/// ([`stop_detached`]); only that, and the work's own limits, stop it.
pub fn detach<F>(work: F) -> tokio::task::JoinHandle<Option<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tracing::Instrument;
    let current = REQUEST.try_with(Current::clone).unwrap_or_default();
    let (tracker, stop) = &*DETACHED;
    let stop = stop.clone();
    let work = async move {
        tokio::select! {
            done = work => Some(done),
            () = stop.cancelled() => None,
        }
    };
    tracker.spawn(
        REQUEST
            .scope(current, work)
            .instrument(tracing::Span::current()),
    )
}

/// Stops every detached task (dropping it, so that its processes are killed,
/// its temporary files removed and its leases released) and waits at most
/// `grace` for them to end. For shutdown.
pub async fn stop_detached(grace: Duration) {
    let (tracker, stop) = &*DETACHED;
    let running = tracker.len();
    stop.cancel();
    tracker.close();
    if running > 0 {
        tracing::info!(tasks = running, "stopping detached work");
    }
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("detached work did not stop in time");
    }
    // Leases in a bucket are released by tasks their drop spawned.
    if running > 0 {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
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

/// Names what the current request's build is doing now ("compiling
/// linux/arm64"), for the landing page.
pub fn phase(phase: impl Into<String>) {
    let Ok(Some(id)) = REQUEST.try_with(|c| *lock(&c.build)) else {
        return;
    };
    if let Some(running) = lock(&BOARD).running.get_mut(&id) {
        running.phase = phase.into();
    }
}

/// What to tell a client whose request waited `waited` for work that goes
/// on: the build it started or joined, how far it is, and to come back
/// after `retry_after`. Docker prints the message; containers/image waits
/// `Retry-After` and asks again.
pub fn still_working(waited: Duration, retry_after: Duration) -> Denied {
    let image = image();
    let own = REQUEST.try_with(|c| *lock(&c.build)).ok().flatten();
    let build = {
        let board = lock(&BOARD);
        own.and_then(|id| board.running.get(&id).cloned())
            .or_else(|| {
                board
                    .running
                    .values()
                    .find(|r| r.image == image && r.generator == generator())
                    .cloned()
            })
    };
    let message = match build {
        Some(b) => format!(
            "building {} ({}): {} s so far; pull again",
            b.image,
            b.phase,
            b.started.elapsed().as_secs()
        ),
        None => format!(
            "still working on {image}: {} s so far; pull again",
            waited.as_secs()
        ),
    };
    Denied {
        message,
        retry_after,
    }
}

/// A build running now.
#[derive(Clone, Debug)]
pub struct Running {
    pub generator: String,
    pub image: String,
    pub phase: String,
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
/// ends; dropped unfinished, it ends as stopped.
pub struct Build {
    id: u64,
    metric: Option<metrics::Build>,
    /// The request's build before this one (builds may nest).
    outer: Option<u64>,
}

/// Starts listing (and counting) a build.
pub fn build_started() -> Build {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let generator = generator();
    let metric = metrics::build_started(&generator);
    let running = Running {
        generator,
        image: image(),
        phase: "starting".to_owned(),
        started: Instant::now(),
    };
    lock(&BOARD).running.insert(id, running);
    let outer = REQUEST
        .try_with(|c| lock(&c.build).replace(id))
        .ok()
        .flatten();
    Build {
        id,
        metric: Some(metric),
        outer,
    }
}

impl Build {
    /// What the build is doing now, and for how long it has run.
    pub fn progress(&self) -> (String, Duration) {
        match lock(&BOARD).running.get(&self.id) {
            Some(r) => (r.phase.clone(), r.started.elapsed()),
            None => (String::new(), Duration::ZERO),
        }
    }

    /// How long the build has run.
    pub fn elapsed(&self) -> Duration {
        self.progress().1
    }

    /// Ends the build: `failure` says why it failed, `None` if it did not.
    pub fn finish(mut self, failure: Option<String>) {
        self.end(failure);
    }

    fn end(&mut self, failure: Option<String>) {
        let Some(metric) = self.metric.take() else {
            return;
        };
        metric.finish(failure.is_none());
        let outer = self.outer;
        let _ = REQUEST.try_with(|c| *lock(&c.build) = outer);
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
            "stopped before it ended (the server shut down, or a time limit)".into(),
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
            phase("compiling linux/amd64");
            let (running, _) = snapshot();
            assert!(running.iter().any(|r| r.image == "ko/example.com/listed:v1"
                && r.generator == "ko"
                && r.phase == "compiling linux/amd64"));
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
