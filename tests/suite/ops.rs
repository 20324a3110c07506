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
            "ops::readyz_fails_while_storage_is_read_only_and_recovers_healthz_stays_up",
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
    for sent in [None, Some("bad id\twith tabs")] {
        let headers: Vec<(&str, &str)> = sent.map(|s| ("x-request-id", s)).into_iter().collect();
        let reply = http(server.addr, Method::GET, "/v2/", &headers)?;
        let id = reply.header("x-request-id");
        assert!(
            id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id:?}"
        );
    }
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
    let (status, body) = answer("/readyz")?;
    std::fs::remove_file(&filler)?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("storage"), "{body}");
    assert!(!body.contains('/'), "no paths: {body}");
    assert_eq!(answer("/healthz")?.0, StatusCode::OK, "alive all along");
    assert_eq!(answer("/readyz")?.0, StatusCode::OK);
    assert_eq!(answer("/healthz")?.0, StatusCode::OK);
    Ok(())
}
