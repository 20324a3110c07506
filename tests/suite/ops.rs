//! Running it for real: JSON logs a collector can read, with a request id
//! on every line of a request, and health endpoints that follow storage.

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
    ]
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
