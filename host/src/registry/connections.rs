//! The connections the server holds open, and the rules that keep a flood of
//! them from taking it down: a time limit on sending a request head, one on
//! keeping an idle connection alive, a cap on how many are open (the
//! longest-idle one makes room for a new one), and a cap below the process's
//! descriptor limit so that running out of descriptors cannot stop accepting.
//!
//! hyper's own header timeout is not used: it starts whenever a connection
//! waits for a request, so it would also end kept-alive connections, and the
//! protocol sniffing of `auto` (HTTP/1 or 2) reads without any timeout.
//! Instead every connection's socket is [`Tracked`]: its reads and writes
//! update a [`Slot`], and one watchdog task closes what the rules say.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::Body;
use crate::config::ServerConfig;

/// Descriptors kept free for everything but client sockets: storage files,
/// plugin caches, upstream connections, build processes.
const RESERVED_DESCRIPTORS: u64 = 64;

/// The limits `[server]` sets.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    pub fn new(config: &ServerConfig) -> Limits {
        Limits {
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            max_connections: config.max_connections,
        }
    }
}

/// One open connection, as the watchdog sees it. Times are milliseconds
/// since the server started (0: never).
pub struct Slot {
    opened: u64,
    last_active: AtomicU64,
    /// When the first byte of a request head arrived on an idle connection.
    head_since: AtomicU64,
    /// Requests whose response is not finished (HTTP/2 has several).
    busy: AtomicUsize,
    /// Since when writes have been refused (the peer reads nothing).
    write_blocked: AtomicU64,
    /// HTTP/2: frames between requests (window updates, pings) are not the
    /// start of a request head.
    h2: std::sync::atomic::AtomicBool,
    served: AtomicU64,
    close: CancellationToken,
}

impl Slot {
    /// Completes when the watchdog or the cap closes this connection.
    pub async fn closed(&self) {
        self.close.cancelled().await;
    }
}

pub struct Connections {
    epoch: Instant,
    limits: Limits,
    /// `limits.max_connections`, lowered to what the descriptor limit allows.
    max: usize,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
    full_log: Throttled,
    descriptors_log: Throttled,
    timeout_log: Throttled,
}

/// Why a connection was closed by us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    HeadTooSlow,
    Idle,
    /// A response the peer stopped reading.
    Stalled,
}

impl Connections {
    pub fn new(limits: Limits) -> Arc<Connections> {
        let max = match descriptor_limit() {
            Some(n) => {
                let allowed = n.saturating_sub(RESERVED_DESCRIPTORS.max(n / 4)).max(1);
                limits.max_connections.min(allowed as usize)
            }
            None => limits.max_connections,
        };
        if max < limits.max_connections {
            tracing::info!(
                max_connections = max,
                configured = limits.max_connections,
                "fewer connections than configured: the descriptor limit is lower"
            );
        }
        Arc::new(Connections {
            epoch: Instant::now(),
            limits,
            max,
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            full_log: Throttled::default(),
            descriptors_log: Throttled::default(),
            timeout_log: Throttled::default(),
        })
    }

    fn now(&self) -> u64 {
        // Never 0, which means "never".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes room for and registers a new connection; `None` when every open
    /// connection is busy and the cap is reached (the new one is refused).
    pub fn admit(self: &Arc<Self>) -> Option<(u64, Arc<Slot>)> {
        let now = self.now();
        let mut slots = self.lock();
        if slots.len() >= self.max && !evict_idle(&mut slots, 1) {
            drop(slots);
            self.full_log.warn(|suppressed| {
                tracing::warn!(
                    max_connections = self.max,
                    suppressed,
                    "connection limit reached with every connection busy: refusing new ones"
                );
            });
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            opened: now,
            last_active: AtomicU64::new(now),
            head_since: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            write_blocked: AtomicU64::new(0),
            h2: Default::default(),
            served: AtomicU64::new(0),
            close: CancellationToken::new(),
        });
        slots.insert(id, slot.clone());
        Some((id, slot))
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn open(&self) -> usize {
        self.lock().len()
    }

    /// `accept` failed for lack of descriptors: close some idle connections
    /// so that the next one can be accepted. False if none was idle.
    pub fn out_of_descriptors(&self, error: &io::Error) -> bool {
        let freed = evict_idle(&mut self.lock(), 8);
        self.descriptors_log.warn(|suppressed| {
            tracing::warn!(
                error = %error,
                open = self.open(),
                closed_idle = freed,
                suppressed,
                "out of file descriptors: closing idle connections"
            );
        });
        freed
    }

    /// A request head arrived: the connection is busy until the returned
    /// guard (carried by the response body) is dropped.
    pub fn request_started(self: &Arc<Self>, slot: &Arc<Slot>) -> Busy {
        slot.busy.fetch_add(1, Ordering::AcqRel);
        slot.served.fetch_add(1, Ordering::Relaxed);
        slot.head_since.store(0, Ordering::Release);
        Busy {
            connections: self.clone(),
            slot: slot.clone(),
        }
    }

    /// Closes what the limits say, every tick, for as long as the server runs.
    pub async fn watchdog(self: Arc<Self>) {
        let shortest = self.limits.header_timeout.min(self.limits.idle_timeout);
        let tick = (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let now = self.now();
            let mut closed = (0, 0);
            self.lock().retain(|_, slot| match self.verdict(slot, now) {
                Verdict::Keep => true,
                verdict => {
                    slot.close.cancel();
                    match verdict {
                        Verdict::HeadTooSlow => closed.0 += 1,
                        _ => closed.1 += 1,
                    }
                    false
                }
            });
            if closed.0 > 0 {
                self.timeout_log.warn(|suppressed| {
                    tracing::warn!(
                        connections = closed.0,
                        suppressed,
                        timeout = ?self.limits.header_timeout,
                        "closed connections that sent no complete request in time"
                    );
                });
            }
            if closed.1 > 0 {
                tracing::debug!(connections = closed.1, "closed idle connections");
            }
        }
    }

    fn verdict(&self, slot: &Slot, now: u64) -> Verdict {
        let idle = self.limits.idle_timeout.as_millis() as u64;
        if slot.busy.load(Ordering::Acquire) > 0 {
            // A build may take minutes with nothing written; a response the
            // peer does not read is a slot held for nothing.
            let blocked = slot.write_blocked.load(Ordering::Acquire);
            return match blocked != 0 && now.saturating_sub(blocked) > idle {
                true => Verdict::Stalled,
                false => Verdict::Keep,
            };
        }
        let header = self.limits.header_timeout.as_millis() as u64;
        let head_since = slot.head_since.load(Ordering::Acquire);
        if head_since != 0 {
            return match now.saturating_sub(head_since) > header {
                true => Verdict::HeadTooSlow,
                false => Verdict::Keep,
            };
        }
        if slot.served.load(Ordering::Relaxed) == 0 {
            // Opened and silent: as slow as a head can be.
            return match now.saturating_sub(slot.opened) > header {
                true => Verdict::HeadTooSlow,
                false => Verdict::Keep,
            };
        }
        match now.saturating_sub(slot.last_active.load(Ordering::Acquire)) > idle {
            true => Verdict::Idle,
            false => Verdict::Keep,
        }
    }

    /// Wraps a connection's socket so that its traffic updates `slot`.
    pub fn track<T>(self: &Arc<Self>, io: T, slot: Arc<Slot>) -> Tracked<T> {
        Tracked {
            io,
            slot,
            connections: self.clone(),
        }
    }
}

/// Closes up to `n` idle connections, longest idle first; true if any was.
fn evict_idle(slots: &mut HashMap<u64, Arc<Slot>>, n: usize) -> bool {
    let mut idle: Vec<(u64, u64)> = slots
        .iter()
        .filter(|(_, s)| s.busy.load(Ordering::Acquire) == 0)
        .map(|(id, s)| (s.last_active.load(Ordering::Acquire), *id))
        .collect();
    idle.sort_unstable();
    let mut any = false;
    for (_, id) in idle.into_iter().take(n) {
        if let Some(slot) = slots.remove(&id) {
            slot.close.cancel();
            any = true;
        }
    }
    any
}

/// Raises the soft descriptor limit to the hard one (as Go's runtime does),
/// and answers the limit in force.
fn descriptor_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(maximum)) = (limit.current, limit.maximum)
        && current < maximum
    {
        let raised = rustix::process::Rlimit {
            current: Some(maximum),
            maximum: Some(maximum),
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = raised;
        }
    }
    limit.current
}

/// Marks a request in flight; dropped when its response is done.
pub struct Busy {
    connections: Arc<Connections>,
    slot: Arc<Slot>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.slot
            .last_active
            .store(self.connections.now(), Ordering::Release);
        self.slot.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection marked busy until it is sent
/// (or abandoned).
pub struct Guarded {
    pub body: Body,
    pub _busy: Busy,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A socket whose reads and writes are noted in its [`Slot`].
pub struct Tracked<T> {
    io: T,
    slot: Arc<Slot>,
    connections: Arc<Connections>,
}

impl<T> Tracked<T> {
    /// A write the peer's window refused: the start of a stall, if none is
    /// counting yet.
    fn blocked(&self) {
        let now = self.connections.now();
        let _ =
            self.slot
                .write_blocked
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
    }

    fn touch(&self, read: bool) {
        let now = self.connections.now();
        self.slot.last_active.store(now, Ordering::Release);
        if !read {
            self.slot.write_blocked.store(0, Ordering::Release);
        }
        // The first byte of a request on an idle connection starts the
        // head's clock.
        if read
            && self.slot.busy.load(Ordering::Acquire) == 0
            && !self.slot.h2.load(Ordering::Relaxed)
        {
            let _ =
                self.slot
                    .head_since
                    .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if self.slot.served.load(Ordering::Relaxed) == 0
                && buf.filled()[before..].starts_with(b"PRI * HTTP/2.0")
            {
                self.slot.h2.store(true, Ordering::Relaxed);
            }
            self.touch(true);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        match polled {
            Poll::Ready(Ok(n)) if n > 0 => self.touch(false),
            Poll::Pending => self.blocked(),
            _ => {}
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        match polled {
            Poll::Ready(Ok(n)) if n > 0 => self.touch(false),
            Poll::Pending => self.blocked(),
            _ => {}
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A warning logged at most once a minute, saying how many were left out.
#[derive(Default)]
struct Throttled {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Throttled {
    const EVERY: Duration = Duration::from_secs(60);

    fn warn(&self, log: impl FnOnce(u64)) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        log(self.suppressed.swap(0, Ordering::Relaxed));
    }
}

/// Running out of descriptors (or of kernel memory for sockets) is a reason
/// to shed connections, not to stop.
pub fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

mod libc_errno {
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const ENOBUFS: i32 = 105;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(300),
            max_connections: 2,
        }
    }

    #[test]
    fn silent_slow_and_idle_connections_are_closed_busy_ones_kept() {
        let c = Connections::new(limits());
        let (_, slot) = c.admit().unwrap();
        let t0 = slot.opened;
        assert_eq!(c.verdict(&slot, t0 + 50), Verdict::Keep);
        assert_eq!(c.verdict(&slot, t0 + 150), Verdict::HeadTooSlow);
        let busy = c.request_started(&slot);
        assert_eq!(c.verdict(&slot, t0 + 10_000), Verdict::Keep);
        // A response the peer stops reading is not kept for ever.
        slot.write_blocked.store(t0 + 10_000, Ordering::Release);
        assert_eq!(c.verdict(&slot, t0 + 10_200), Verdict::Keep);
        assert_eq!(c.verdict(&slot, t0 + 10_400), Verdict::Stalled);
        slot.write_blocked.store(0, Ordering::Release);
        drop(busy);
        let done = slot.last_active.load(Ordering::Acquire);
        assert_eq!(c.verdict(&slot, done + 200), Verdict::Keep);
        assert_eq!(c.verdict(&slot, done + 400), Verdict::Idle);
        slot.head_since.store(done + 250, Ordering::Release);
        assert_eq!(c.verdict(&slot, done + 300), Verdict::Keep);
        assert_eq!(c.verdict(&slot, done + 400), Verdict::HeadTooSlow);
    }

    #[test]
    fn the_cap_closes_the_longest_idle_connection_and_spares_busy_ones() {
        let c = Connections::new(limits());
        let (_, first) = c.admit().unwrap();
        let (_, second) = c.admit().unwrap();
        first.last_active.store(1, Ordering::Release);
        let (_, _third) = c.admit().unwrap();
        assert!(first.close.is_cancelled());
        assert!(!second.close.is_cancelled());
        assert_eq!(c.open(), 2);
        let all_busy: Vec<Busy> = c
            .lock()
            .values()
            .cloned()
            .collect::<Vec<_>>()
            .iter()
            .map(|s| c.request_started(s))
            .collect();
        assert!(c.admit().is_none());
        drop(all_busy);
        assert!(c.admit().is_some());
    }
}
