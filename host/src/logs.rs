//! Log output: text on stdout for people (the default), or one JSON object
//! per line on stderr for collectors, with the fields Google Cloud Logging reads: `severity`,
//! `message`, `timestamp` (`seconds`/`nanos`), and for access lines an
//! `httpRequest` object. The fields of every enclosing span (a request's
//! `request_id`, `method`, `path`, `generator`, …) are on each line, so
//! every line of a request carries its id.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber, span};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::LogFormat;

/// The filter when `RUST_LOG` is not set.
const DEFAULT_FILTER: &str = "info,wasmtime=warn,cranelift=warn";

/// Starts logging in `format`.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| DEFAULT_FILTER.into());
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            // Colours only for people: log files and collectors get plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => {
            tracing_subscriber::registry()
                .with(filter)
                .with(JsonLines)
                .init();
            json_panics();
        }
    }
}

/// Panics as JSON lines too (a collector reads one JSON object, not Rust's
/// text), with the request's fields when one happened in a request. Text
/// logs keep Rust's own hook, backtraces included.
fn json_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        tracing::error!(panic = %message, %location, %thread, "a thread panicked");
    }));
}

/// Writes each event as a JSON line.
struct JsonLines;

/// A span's fields, kept in its extensions.
struct Fields(Map<String, Value>);

struct Visitor<'a>(&'a mut Map<String, Value>);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), json!(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), json!(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), json!(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), json!(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), json!(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), json!(value));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for JsonLines {
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = Map::new();
        attrs.record(&mut Visitor(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Fields(fields));
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        // Formatting a value may log; the span's lock is not held meanwhile.
        let mut recorded = Map::new();
        values.record(&mut Visitor(&mut recorded));
        if let Some(span) = ctx.span(id)
            && let Some(Fields(fields)) = span.extensions_mut().get_mut::<Fields>()
        {
            fields.extend(recorded);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut line = Map::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(Fields(fields)) = span.extensions().get::<Fields>() {
                    line.extend(fields.clone());
                }
            }
        }
        let mut fields = Map::new();
        event.record(&mut Visitor(&mut fields));
        line.extend(fields);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        line.insert(
            "timestamp".into(),
            json!({ "seconds": now.as_secs(), "nanos": now.subsec_nanos() }),
        );
        line.insert("severity".into(), json!(severity(event.metadata().level())));
        line.insert("target".into(), json!(event.metadata().target()));
        if line.remove("access") == Some(Value::Bool(true)) {
            let request = http_request(&mut line);
            line.insert("httpRequest".into(), request);
        }
        let mut bytes = Value::Object(line).to_string().into_bytes();
        bytes.push(b'\n');
        // One write per line, so that lines from threads never interleave.
        let _ = std::io::stderr().lock().write_all(&bytes);
    }
}

/// Cloud Logging's severities.
fn severity(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        _ => "DEBUG",
    }
}

/// Cloud Logging's `httpRequest`, from an access line's fields (which it
/// takes off the line).
fn http_request(line: &mut Map<String, Value>) -> Value {
    let mut take = |k: &str| line.remove(k).unwrap_or(Value::Null);
    let latency = take("latency_seconds").as_f64().unwrap_or_default();
    let mut url = take("path").as_str().unwrap_or_default().to_owned();
    if let Some(query) = take("query").as_str().filter(|q| !q.is_empty()) {
        url = format!("{url}?{query}");
    }
    json!({
        "requestMethod": take("method"),
        "requestUrl": url,
        "status": take("status"),
        "responseSize": take("bytes").as_u64().map(|b| b.to_string()),
        "latency": format!("{latency:.6}s"),
        "userAgent": take("user_agent"),
        "remoteIp": take("remote_ip"),
    })
}
