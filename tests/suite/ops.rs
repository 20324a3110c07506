//! Running it for real: JSON logs a collector can read, with a request id
//! on every line of a request, and health endpoints that follow storage.

use std::path::Path;

use anyhow::Context;
use http::{Method, StatusCode};
use libtest_mimic::Trial;

use crate::support::{RANDOM, Server, Tmpfs, get, http, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "ops::json_logs_are_one_object_a_line_with_cloud_logging_fields_and_the_request_id",
            json_logs,
        ),
        trial(
            "ops::readyz_fails_while_storage_is_full_and_recovers_healthz_stays_up",
            readiness,
        ),
        trial(
            "ops::metrics_count_pulls_builds_and_refusals_and_parse_as_prometheus_text",
            metrics,
        ),
        trial(
            "ops::the_landing_page_renders_in_chromium_with_pulls_that_work_and_builds_in_flight",
            landing,
        ),
    ]
}

/// The samples of a scrape, as read by the Prometheus Python client's own
/// parser (Prometheus text, or OpenMetrics): (name, labels, value).
fn parse_metrics(
    text: &str,
    openmetrics: bool,
) -> anyhow::Result<Vec<(String, serde_json::Value, f64)>> {
    use std::io::Write;
    let parser = match openmetrics {
        true => "prometheus_client.openmetrics.parser",
        false => "prometheus_client.parser",
    };
    let script = format!(
        "import json, sys\nfrom {parser} import text_string_to_metric_families as parse\n\
         out = [[s.name, s.labels, s.value] for f in parse(sys.stdin.read()) for s in f.samples]\n\
         print(json.dumps(out))\n"
    );
    let mut child = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("python's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "the scrape does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, serde_json::Value, f64)> = serde_json::from_slice(&out.stdout)?;
    Ok(samples)
}

/// The sum of the samples named `name` whose labels include `labels`.
fn total(samples: &[(String, serde_json::Value, f64)], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k].as_str() == Some(*v)))
        .map(|(_, _, v)| v)
        .sum()
}

fn metrics() -> anyhow::Result<()> {
    let port = crate::support::free_port()?;
    let config = format!(
        "{}{RANDOM_GENERATOR}[generators.mirror]\nsource = \"builtin:mirror\"\ngrants = [\"upstream\"]\n",
        crate::ko::config(Some(crate::ko::shared_scratch()))?
    );
    let metrics_at = format!("127.0.0.1:{port}");
    let server = Server::start_with_env(
        Some(&config),
        &[("KONTAIN_METRICS_LISTEN", metrics_at.as_str())],
    )?;
    // A random pull, a mirror pull (manifest and a blob), a failed build
    // and a mirror request the address policy refuses.
    let image = get(server.addr, "/v2/random/manifests/2x100")?;
    assert_eq!(image.status, StatusCode::OK);
    let manifest = get(server.addr, "/v2/mirror/local/busybox/manifests/latest")?;
    assert_eq!(manifest.status, StatusCode::OK, "{}", manifest.text());
    let layer = &manifest.json()?["layers"][0];
    let blob = crate::support::get_blob(&server, "mirror/local/busybox", layer)?;
    let broken = get(server.addr, "/v2/ko/example.com/broken/manifests/v1.0.0")?;
    assert_eq!(broken.status, StatusCode::NOT_FOUND, "{}", broken.text());
    let denied = get(
        server.addr,
        "/v2/mirror/169.254.169.254/app/manifests/latest",
    )?;
    assert!(denied.status.is_client_error(), "{}", denied.text());

    let scrape = http(metrics_at.parse()?, Method::GET, "/metrics", &[])?;
    assert_eq!(scrape.status, StatusCode::OK);
    assert!(
        scrape
            .header("content-type")
            .starts_with("text/plain; version=0.0.4")
    );
    let text = scrape.text();
    let samples = parse_metrics(&text, false)?;
    let requests = "kontain_http_requests_total";
    assert!(
        total(
            &samples,
            requests,
            &[("generator", "random"), ("status", "2xx")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        total(
            &samples,
            requests,
            &[("generator", "mirror"), ("status", "2xx")]
        ) >= 2.0,
        "{text}"
    );
    assert!(
        total(
            &samples,
            requests,
            &[("generator", "ko"), ("status", "4xx")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        total(
            &samples,
            "kontain_builds_started_total",
            &[("generator", "ko")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        total(
            &samples,
            "kontain_builds_failed_total",
            &[("generator", "ko")]
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(
        total(&samples, "kontain_builds_in_flight", &[("generator", "ko")]),
        0.0,
        "{text}"
    );
    assert!(
        total(
            &samples,
            "kontain_build_duration_seconds_count",
            &[("generator", "ko")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        total(&samples, "kontain_ssrf_refusals_total", &[]) >= 1.0,
        "{text}"
    );
    assert!(
        total(
            &samples,
            "kontain_upstream_requests_total",
            &[("registry", "127.0.0.1"), ("status", "2xx")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        total(
            &samples,
            "kontain_blob_bytes_served_total",
            &[("generator", "mirror")]
        ) >= blob.body.len() as f64,
        "{text}"
    );
    assert!(
        total(
            &samples,
            "kontain_cache_requests_total",
            &[("generator", "mirror"), ("kind", "blob")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        total(
            &samples,
            "kontain_plugin_instantiation_seconds_count",
            &[("generator", "random")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        total(
            &samples,
            "kontain_storage_operations_total",
            &[("backend", "filesystem")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        total(&samples, "process_resident_memory_bytes", &[]) > 0.0,
        "{text}"
    );
    // Bounded labels: no image name is a label value.
    assert!(
        !text.contains("busybox") && !text.contains("broken"),
        "{text}"
    );

    // OpenMetrics when asked for, also parsed by the reference parser.
    let open = http(
        metrics_at.parse()?,
        Method::GET,
        "/metrics",
        &[("accept", "application/openmetrics-text; version=1.0.0")],
    )?;
    assert!(
        open.header("content-type")
            .starts_with("application/openmetrics-text")
    );
    parse_metrics(&open.text(), true)?;
    // The registry itself does not publish them.
    assert_eq!(get(server.addr, "/metrics")?.status, StatusCode::NOT_FOUND);
    Ok(())
}

const RANDOM_GENERATOR: &str = "[generators.random]\nsource = \"builtin:random\"\ngrants = [\"random\"]\nexample = \":4x100\"\n";

/// `chromium --headless` with no way off loopback: its own profile, no
/// background services, every name but 127.0.0.1 unresolvable.
fn chromium(args: &[&str], url: &str) -> anyhow::Result<String> {
    let profile = tempfile::tempdir()?;
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .context("running chromium")?;
    anyhow::ensure!(
        out.status.success(),
        "chromium {args:?} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn landing() -> anyhow::Result<()> {
    // A `go` that takes its time to build, so that a build is in flight
    // long enough to be seen.
    let tools = tempfile::tempdir()?;
    let config = crate::ko::config_with_slow_go(tools.path(), "sleep 8")?;
    let server = Server::start(Some(&format!("{config}{RANDOM_GENERATOR}")))?;
    let url = format!("http://{}/", server.addr);

    let dom = chromium(&["--dump-dom"], &url)?;
    for name in ["ko", "random"] {
        assert!(
            dom.contains(&format!("id=\"g-{name}\"")),
            "{name} is listed: {dom}"
        );
    }
    // The example, copied from the rendered page as a visitor would, pulls.
    let pull = format!("docker pull {}/random:4x100", server.addr);
    assert!(dom.contains(&pull), "{dom}");
    let docker = crate::support::docker()?;
    let image = format!("{}/random:4x100", server.addr);
    docker.run(&["pull", &image])?;
    assert_eq!(docker.layer_count(&image)?, 4);
    docker.run(&["rmi", &image])?;

    // A build in flight shows, with its image and generator.
    let addr = server.addr;
    let building =
        std::thread::spawn(move || get(addr, "/v2/ko/example.com/broken/manifests/v1.0.0"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let page = get(server.addr, "/")?.text();
        if page.contains("<table id=running>") {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no build showed: {page}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let dom = chromium(&["--dump-dom"], &url)?;
    let running = dom
        .split("id=\"running\"")
        .nth(1)
        .context("a table of running builds")?;
    assert!(running.contains("ko/example.com/broken:v1.0.0"), "{dom}");
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let shot = artifacts.join("landing.png");
    chromium(
        &[
            "--window-size=412,1400",
            &format!("--screenshot={}", shot.display()),
        ],
        &url,
    )?;
    anyhow::ensure!(
        std::fs::metadata(&shot)?.len() > 1000,
        "an empty screenshot"
    );
    eprintln!("landing page screenshot: {}", shot.display());

    // When it ends, the failure and its message are listed.
    let failed = building
        .join()
        .map_err(|_| anyhow::anyhow!("the build thread panicked"))??;
    assert_eq!(failed.status, StatusCode::NOT_FOUND);
    let dom = chromium(&["--dump-dom"], &url)?;
    let ended = dom
        .split("id=\"ended\"")
        .nth(1)
        .context("a table of ended builds")?;
    assert!(ended.contains("undefined: nope"), "{dom}");
    assert!(
        !dom.contains(&server.dir.path().display().to_string()),
        "no server path: {dom}"
    );

    // The image page lists the layers.
    let dom = chromium(&["--dump-dom"], &format!("{url}i/random:3x100"))?;
    assert!(dom.contains("3 layers"), "{dom}");
    assert_eq!(
        dom.matches("rootfs.diff.tar.gzip").count(),
        3 + 3,
        "table and manifest: {dom}"
    );
    chromium(
        &[
            "--window-size=412,1400",
            &format!("--screenshot={}", artifacts.join("image.png").display()),
        ],
        &format!("{url}i/random:3x100"),
    )?;
    Ok(())
}

fn json_logs() -> anyhow::Result<()> {
    let server = Server::start_with_env(Some(RANDOM), &[("KONTAIN_LOG_FORMAT", "json")])?;
    let ours = http(
        server.addr,
        Method::GET,
        "/v2/random/manifests/1x10",
        &[
            ("x-request-id", "test-123"),
            ("user-agent", "kontain-suite/1"),
        ],
    )?;
    assert_eq!(ours.status, StatusCode::OK);
    assert_eq!(ours.header("x-request-id"), "test-123");
    // No id, or one that is not plain: the server makes one.
    let mut made = Vec::new();
    for sent in [None, Some("bad id\twith tabs")] {
        let headers: Vec<(&str, &str)> = sent.map(|s| ("x-request-id", s)).into_iter().collect();
        let reply = http(server.addr, Method::GET, "/v2/", &headers)?;
        let id = reply.header("x-request-id").to_owned();
        assert!(
            id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id:?}"
        );
        made.push(id);
    }
    // A streamed blob (over 64 KiB): its size is the one it declared.
    let big = http(
        server.addr,
        Method::GET,
        "/v2/random/manifests/1x1000000",
        &[("accept", crate::support::ACCEPT_ALL)],
    )?
    .json()?;
    let blob = crate::support::get_blob(&server, "random", &big["layers"][0])?;
    assert!(blob.body.len() > 64 * 1024);
    let log = server.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("not JSON: {l:?}: {e}")))
        .collect::<anyhow::Result<_>>()?;
    assert!(
        lines
            .iter()
            .all(|l| l["severity"].is_string() && l["message"].is_string())
    );
    let access = lines
        .iter()
        .find(|l| l["request_id"] == "test-123" && l["httpRequest"].is_object())
        .unwrap_or_else(|| panic!("no access line for test-123:\n{log}"));
    let request = &access["httpRequest"];
    assert_eq!(request["requestMethod"], "GET");
    assert_eq!(request["requestUrl"], "/v2/random/manifests/1x10");
    assert_eq!(request["status"], 200);
    assert_eq!(request["userAgent"], "kontain-suite/1");
    assert_eq!(request["remoteIp"], "127.0.0.1");
    assert_eq!(request["responseSize"], ours.body.len().to_string());
    assert!(
        request["latency"]
            .as_str()
            .is_some_and(|l| l.ends_with('s'))
    );
    assert_eq!(access["generator"], "random");
    assert_eq!(access["severity"], "INFO");
    assert!(access["timestamp"]["seconds"].is_u64());
    // One access line per request, the made-up ids included.
    let access_lines = |id: &str| {
        lines
            .iter()
            .filter(|l| l["request_id"] == id && l["httpRequest"].is_object())
            .count()
    };
    assert_eq!(access_lines("test-123"), 1);
    for id in &made {
        assert_eq!(access_lines(id), 1, "{id}");
    }
    let streamed = lines
        .iter()
        .rfind(|l| {
            l["httpRequest"]["requestUrl"]
                .as_str()
                .is_some_and(|u| u.contains("/blobs/"))
        })
        .unwrap_or_else(|| panic!("no blob access line:\n{log}"));
    assert_eq!(
        streamed["httpRequest"]["responseSize"],
        blob.body.len().to_string()
    );
    Ok(())
}

fn readiness() -> anyhow::Result<()> {
    let disk = Tmpfs::mount()?;
    let data = disk.0.path().join("data");
    let server = Server::start(Some(&RANDOM.replace(
        "path = \"data\"",
        &format!("path = {:?}", data.display().to_string()),
    )))?;
    let answer = |path: &str| -> anyhow::Result<(StatusCode, String)> {
        let reply = get(server.addr, path)?;
        Ok((
            reply.status,
            String::from_utf8_lossy(&reply.body).into_owned(),
        ))
    };
    assert_eq!(answer("/healthz")?, (StatusCode::OK, "ok\n".to_owned()));
    assert_eq!(answer("/readyz")?.0, StatusCode::OK);
    // Storage that takes no write (root ignores permissions and the server's
    // open files keep the mount writable): a full disk.
    let filler = disk.0.path().join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status()?;
    // An answer is reused for 2 s: wait for the next one.
    let until = |want: StatusCode| -> anyhow::Result<String> {
        let started = std::time::Instant::now();
        loop {
            let (status, body) = answer("/readyz")?;
            if status == want || started.elapsed() > std::time::Duration::from_secs(10) {
                anyhow::ensure!(status == want, "/readyz stayed {status}: {body}");
                return Ok(body);
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    };
    let full = until(StatusCode::SERVICE_UNAVAILABLE);
    std::fs::remove_file(&filler)?;
    let body = full?;
    assert!(body.contains("storage"), "{body}");
    assert!(!body.contains('/'), "no paths: {body}");
    assert_eq!(answer("/healthz")?.0, StatusCode::OK, "alive all along");
    until(StatusCode::OK)?;
    Ok(())
}
