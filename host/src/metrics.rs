//! Metrics in the Prometheus text format, served on `[server]
//! metrics_listen` (a separate listener, so that a registry open to the
//! internet does not publish its internals).
//!
//! The families live here, in one process-wide registry; each capability
//! counts its own events through the functions below (requests in
//! `registry`, builds in `image::once`, upstream requests and refusals in
//! `upstream`, instantiations in `runtime`, storage operations in
//! `storage`). Label values are bounded: generator names come from the
//! config, upstream hosts are capped at [`MAX_HOSTS`] distinct values, and
//! no image name is ever a label.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Distinct upstream hosts given their own label value; the rest are
/// counted as `other` (a mirror may reach any host its policy allows).
const MAX_HOSTS: usize = 64;

struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    request_seconds: Histograms,
    blob_bytes: Family<Labels, Counter>,
    cache: Family<Labels, Counter>,
    builds: Family<Labels, Counter>,
    builds_failed: Family<Labels, Counter>,
    builds_in_flight: Family<Labels, Gauge>,
    build_seconds: Histograms,
    upstream: Family<Labels, Counter>,
    upstream_hosts: Mutex<HashSet<String>>,
    refusals: Family<Labels, Counter>,
    instantiation_seconds: Histograms,
    storage: Family<Labels, Counter>,
    storage_errors: Family<Labels, Counter>,
    expiry_runs: Counter,
    expiry_bytes: Counter,
}

fn request_buckets() -> Histogram {
    // 100 µs to ~100 s.
    Histogram::new(exponential_buckets(0.0001, 4.0, 11))
}

fn build_buckets() -> Histogram {
    // 50 ms to ~1.4 h.
    Histogram::new(exponential_buckets(0.05, 3.0, 11))
}

fn instantiation_buckets() -> Histogram {
    // 10 µs to ~0.6 s.
    Histogram::new(exponential_buckets(0.00001, 3.0, 11))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let m = Metrics {
        requests: Family::default(),
        request_seconds: Family::new_with_constructor(request_buckets),
        blob_bytes: Family::default(),
        cache: Family::default(),
        builds: Family::default(),
        builds_failed: Family::default(),
        builds_in_flight: Family::default(),
        build_seconds: Family::new_with_constructor(build_buckets),
        upstream: Family::default(),
        upstream_hosts: Mutex::default(),
        refusals: Family::default(),
        instantiation_seconds: Family::new_with_constructor(instantiation_buckets),
        storage: Family::default(),
        storage_errors: Family::default(),
        expiry_runs: Counter::default(),
        expiry_bytes: Counter::default(),
        registry: Registry::default(),
    };
    registry.register(
        "kontain_http_requests",
        "Registry requests by generator, method and status class",
        m.requests.clone(),
    );
    registry.register(
        "kontain_http_request_duration_seconds",
        "Time from a request's arrival to its response headers",
        m.request_seconds.clone(),
    );
    registry.register(
        "kontain_blob_bytes_served",
        "Blob bytes sent to clients (bytes actually written, not declared)",
        m.blob_bytes.clone(),
    );
    registry.register(
        "kontain_cache_requests",
        "Lookups answered from storage (hit) or made (miss), by generator and kind",
        m.cache.clone(),
    );
    registry.register(
        "kontain_builds_started",
        "Builds started (ko, buildpack, flatten)",
        m.builds.clone(),
    );
    registry.register(
        "kontain_builds_failed",
        "Builds that failed",
        m.builds_failed.clone(),
    );
    registry.register(
        "kontain_builds_in_flight",
        "Builds running now",
        m.builds_in_flight.clone(),
    );
    registry.register(
        "kontain_build_duration_seconds",
        "How long builds took, failed or not",
        m.build_seconds.clone(),
    );
    registry.register(
        "kontain_upstream_requests",
        "Requests to upstream registries by host and status class",
        m.upstream.clone(),
    );
    registry.register(
        "kontain_ssrf_refusals",
        "Connections to upstreams refused by the address policy, by rule",
        m.refusals.clone(),
    );
    registry.register(
        "kontain_plugin_instantiation_seconds",
        "Time to instantiate a plugin for one call",
        m.instantiation_seconds.clone(),
    );
    registry.register(
        "kontain_storage_operations",
        "Storage driver operations by backend and operation",
        m.storage.clone(),
    );
    registry.register(
        "kontain_storage_errors",
        "Storage driver operations that failed",
        m.storage_errors.clone(),
    );
    registry.register("kontain_expiry_runs", "Expiry runs", m.expiry_runs.clone());
    registry.register(
        "kontain_expiry_removed_bytes",
        "Bytes removed by expiry",
        m.expiry_bytes.clone(),
    );
    registry.register_collector(Box::new(Process));
    Metrics { registry, ..m }
});

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.into_iter().map(|(k, v)| (k, v.to_owned())).collect()
}

/// A generator name for a label: `none` for requests no generator took.
fn generator_label(generator: &str) -> &str {
    if generator.is_empty() {
        "none"
    } else {
        generator
    }
}

/// One request answered: counted by status class, timed to its headers.
pub fn request(generator: &str, method: &http::Method, status: u16, seconds: f64) {
    let generator = generator_label(generator);
    let method = match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        _ => "other",
    };
    let class = format!("{}xx", status / 100);
    METRICS
        .requests
        .get_or_create(&labels([
            ("generator", generator),
            ("method", method),
            ("status", &class),
        ]))
        .inc();
    METRICS
        .request_seconds
        .get_or_create(&labels([("generator", generator), ("method", method)]))
        .observe(seconds);
}

/// Blob bytes written to a client.
pub fn blob_bytes(generator: &str, bytes: u64) {
    METRICS
        .blob_bytes
        .get_or_create(&labels([("generator", generator_label(generator))]))
        .inc_by(bytes);
}

/// A lookup of stored content: `kind` is `manifest`, `blob` or `build`.
pub fn cache(generator: &str, kind: &'static str, hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    METRICS
        .cache
        .get_or_create(&labels([
            ("generator", generator_label(generator)),
            ("kind", kind),
            ("result", result),
        ]))
        .inc();
}

/// A build under way: counted when made, in flight until [`Build::finish`]
/// or drop (a build whose request went away counts as failed).
pub struct Build {
    generator: Labels,
    started: Instant,
    finished: bool,
}

pub fn build_started(generator: &str) -> Build {
    let generator = labels([("generator", generator_label(generator))]);
    METRICS.builds.get_or_create(&generator).inc();
    METRICS.builds_in_flight.get_or_create(&generator).inc();
    Build {
        generator,
        started: Instant::now(),
        finished: false,
    }
}

impl Build {
    pub fn finish(mut self, ok: bool) {
        self.end(ok);
    }

    fn end(&mut self, ok: bool) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        METRICS
            .builds_in_flight
            .get_or_create(&self.generator)
            .dec();
        METRICS
            .build_seconds
            .get_or_create(&self.generator)
            .observe(self.started.elapsed().as_secs_f64());
        if !ok {
            METRICS.builds_failed.get_or_create(&self.generator).inc();
        }
    }
}

impl Drop for Build {
    fn drop(&mut self) {
        self.end(false);
    }
}

/// A request to an upstream: its status, or `None` when it got no answer.
pub fn upstream(host: &str, status: Option<u16>) {
    let host = {
        let mut hosts = METRICS
            .upstream_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Only a host that answered takes a label of its own: names that do
        // not resolve cannot use the places up.
        if hosts.contains(host)
            || (status.is_some() && hosts.len() < MAX_HOSTS && hosts.insert(host.to_owned()))
        {
            host
        } else {
            "other"
        }
    };
    let status = match status {
        Some(s) => format!("{}xx", s / 100),
        None => "error".to_owned(),
    };
    METRICS
        .upstream
        .get_or_create(&labels([("registry", host), ("status", &status)]))
        .inc();
}

/// A connection the address policy refused, by the rule that refused it.
pub fn refused(rule: &'static str) {
    METRICS
        .refusals
        .get_or_create(&labels([("rule", rule)]))
        .inc();
}

pub fn instantiated(generator: &str, seconds: f64) {
    METRICS
        .instantiation_seconds
        .get_or_create(&labels([("generator", generator)]))
        .observe(seconds);
}

/// A storage driver operation and whether it succeeded.
pub fn storage(backend: &'static str, operation: &'static str, ok: bool) {
    let l = labels([("backend", backend), ("operation", operation)]);
    METRICS.storage.get_or_create(&l).inc();
    if !ok {
        METRICS.storage_errors.get_or_create(&l).inc();
    }
}

pub fn expiry(bytes: u64) {
    METRICS.expiry_runs.inc();
    METRICS.expiry_bytes.inc_by(bytes);
}

/// Every metric, in the Prometheus text format (0.0.4), or OpenMetrics
/// when `openmetrics`.
pub fn render(openmetrics: bool) -> String {
    let mut out = String::new();
    let encoded = match openmetrics {
        true => prometheus_client::encoding::text::encode(&mut out, &METRICS.registry),
        false => prometheus_client::encoding::prometheus_text::encode(&mut out, &METRICS.registry),
    };
    if let Err(e) = encoded {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

/// The standard `process_*` metrics, read from `/proc` at each scrape.
#[derive(Debug)]
struct Process;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stat) = process_stat() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(stat.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size",
                stat.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size",
                stat.virtual_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time since the Unix epoch",
                stat.start_time,
            ),
            ("process_open_fds", "Open file descriptors", stat.open_fds),
            ("process_threads", "Threads", stat.threads),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

struct ProcessStat {
    cpu_seconds: f64,
    resident_bytes: f64,
    virtual_bytes: f64,
    start_time: f64,
    open_fds: f64,
    threads: f64,
}

/// `/proc/self/stat` (fields after the command name, which may hold spaces),
/// with the clock tick and page size Linux uses for them.
fn process_stat() -> Option<ProcessStat> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Numbered from field 3 (state) of proc(5).
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let page = rustix::param::page_size() as f64;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
    Some(ProcessStat {
        cpu_seconds: (field(14)? + field(15)?) / ticks,
        threads: field(20)?,
        start_time: boot + field(22)? / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
        open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as f64,
    })
}

/// Serves `GET /metrics` on `listener` until the process ends.
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors and the like: wait, don't spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                Ok::<_, Infallible>(answer(&request))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer<B>(request: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, kind: &'static str, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, kind)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "metrics are at /metrics\n".into(),
        );
    }
    let openmetrics = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    match openmetrics {
        true => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(true),
        ),
        false => reply(
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            render(false),
        ),
    }
}

/// Binds the metrics listener (the error names the setting to change).
pub async fn listen(address: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(address).await.with_context(|| {
        format!(
            "metrics cannot listen on {address} (`[server] metrics_listen`; \"\" turns metrics off)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_follow_prometheus_conventions() {
        request("random", &http::Method::GET, 200, 0.001);
        cache("random", "blob", true);
        upstream("registry.example", Some(503));
        refused("special_address");
        let text = render(false);
        for line in [
            "kontain_http_requests_total{generator=\"random\",method=\"GET\",status=\"2xx\"} 1",
            "kontain_cache_requests_total{generator=\"random\",kind=\"blob\",result=\"hit\"} 1",
            "kontain_upstream_requests_total{registry=\"registry.example\",status=\"5xx\"} 1",
            "kontain_ssrf_refusals_total{rule=\"special_address\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        assert!(text.contains("# TYPE kontain_http_request_duration_seconds histogram"));
        assert!(text.contains("process_open_fds"), "{text}");
    }

    #[test]
    fn upstream_hosts_are_bounded() {
        for n in 0..(MAX_HOSTS + 10) {
            upstream(&format!("host{n}.bounded.example"), Some(200));
        }
        let text = render(false);
        let hosts = text
            .lines()
            .filter(|l| l.starts_with("kontain_upstream_requests_total{registry=\"host"))
            .count();
        assert!(hosts <= MAX_HOSTS, "{hosts} host labels");
        assert!(text.contains("registry=\"other\""));
    }
}
