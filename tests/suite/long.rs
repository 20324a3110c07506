//! Long work never breaks a client: a cold mirror blob streams to every
//! client as it arrives, from one upstream download; builds go on (and are
//! stored) when the clients that started them go away; a client is never
//! kept waiting for headers past `hold`; a shutdown stops what is running
//! and stores nothing of it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use libtest_mimic::Trial;

use crate::mirror::{mirror_server, world};
use crate::support::images::{self, Entry, Image};
use crate::support::upstream::Proxy;
use crate::support::{Server, docker, get, get_ok, http, sha256, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "long::a_cold_16mib_blob_streams_to_curl_and_docker_from_one_upstream_get",
            streams,
        ),
        trial(
            "long::a_wrong_cold_blob_aborts_every_client_and_nothing_is_stored",
            wrong_blob,
        ),
        trial(
            "long::a_slow_ko_build_outlives_its_clients_and_a_waiting_one_is_told_to_come_back",
            slow_ko,
        ),
        trial(
            "long::a_slow_buildpack_build_outlives_its_clients",
            slow_buildpack,
        ),
        trial(
            "long::sigterm_stops_a_detached_build_releases_its_lease_and_stores_nothing",
            sigterm,
        ),
        trial(
            "long::concurrent_flattens_of_a_tag_make_one_build_after_one_upstream_head",
            single_flight,
        ),
    ]
}

/// The pieces and pause of the trickled upstream: 16 MiB over ~40 s.
const TRICKLE: (usize, Duration) = (40, Duration::from_secs(1));

/// The test hold: short, so that the trials are quick; what they check is
/// that an answer comes within it, whatever it is.
const HOLD: &str = "5s";

/// Pushes an image whose one layer is 16 MiB of incompressible bytes as
/// `local/<repo>:v1`.
fn push_big(repo: &str) -> anyhow::Result<()> {
    // xorshift64*: bytes gzip cannot shrink, so the layer stays 16 MiB.
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ repo.len() as u64;
    let data: Vec<u8> = (0..(16usize << 20) / 8)
        .flat_map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
        })
        .collect();
    let tar = images::layer(&[Entry::File("big.bin", &data, 0o644)])?;
    let image = Image {
        layers: vec![tar],
        cmd: vec!["/big.bin".into()],
        architecture: "amd64",
    };
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join(repo);
    images::single(&layout, "v1", &image)?;
    world()?.registry.push(&layout, "v1", repo, Some("oci"))
}

/// The digest of the first layer of `local/<repo>:v1` through `server`.
fn layer_of(server: &Server, repo: &str) -> anyhow::Result<(String, u64)> {
    let manifest = get_ok(server, &format!("/v2/mirror/local/{repo}/manifests/v1"))?.json()?;
    let layer = &manifest["layers"][0];
    Ok((
        layer["digest"].as_str().unwrap_or_default().to_owned(),
        layer["size"].as_u64().unwrap_or_default(),
    ))
}

/// A `curl` downloading `url` into `out`, in the background.
fn curl(url: &str, out: &Path) -> anyhow::Result<std::process::Child> {
    Ok(Command::new("curl")
        .args(["-sS", "--max-time", "120", "-o"])
        .arg(out)
        .arg(url)
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

/// When `file` first holds a byte (polled), within `within`.
fn first_byte(file: &Path, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::fs::metadata(file).is_ok_and(|m| m.len() > 0) {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn streams() -> anyhow::Result<()> {
    push_big("big-stream")?;
    let proxy = Proxy::start(world()?.registry.addr)?;
    let server = mirror_server(&proxy)?;
    let (layer, size) = layer_of(&server, "big-stream")?;
    // A small blob (the config), cold and trickled, is stored, then sent.
    proxy.set_trickle(Some((4, Duration::from_millis(100))));
    let manifest = get_ok(&server, "/v2/mirror/local/big-stream/manifests/v1")?.json()?;
    let config = manifest["config"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let reply = get_ok(
        &server,
        &format!("/v2/mirror/local/big-stream/blobs/{config}"),
    )?;
    assert_eq!(sha256(&reply.body), config);
    proxy.set_trickle(Some(TRICKLE));
    let url = format!(
        "http://{}/v2/mirror/local/big-stream/blobs/{layer}",
        server.addr
    );
    let dir = tempfile::tempdir()?;
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let started = Instant::now();
    let mut first = curl(&url, &one)?;
    let got = first_byte(&one, Duration::from_secs(20))
        .ok_or_else(|| anyhow::anyhow!("no byte reached the first client\n{}", server.log()))?;
    let upstream_first = proxy
        .first_piece_at()
        .ok_or_else(|| anyhow::anyhow!("the upstream sent nothing"))?;
    let lag = got.saturating_duration_since(upstream_first);
    assert!(
        lag < Duration::from_secs(1),
        "the first byte reached the client {lag:?} after the upstream sent it"
    );
    // docker pulls the image while the layer is still arriving.
    let image = format!("{}/mirror/local/big-stream:v1", server.addr);
    let docker = docker()?;
    let pulling = {
        let image = image.clone();
        std::thread::spawn(move || docker.run(&["pull", &image]))
    };
    // A second client, 10 s later, reads the same download as it grows.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(started.elapsed()));
    let mut second = curl(&url, &two)?;
    first_byte(&two, Duration::from_secs(5))
        .ok_or_else(|| anyhow::anyhow!("no byte reached the second client"))?;
    // A range far ahead of what has arrived waits for its bytes.
    let part = dir.path().join("part");
    let mut ranged = Command::new("curl")
        .args(["-sS", "--max-time", "120", "-r", "15000000-15000999", "-o"])
        .arg(&part)
        .arg(&url)
        .spawn()?;
    anyhow::ensure!(
        std::fs::metadata(&one)?.len() < size,
        "the first client was done before the second started: nothing was shown"
    );
    for (name, child) in [
        ("first", &mut first),
        ("second", &mut second),
        ("ranged", &mut ranged),
    ] {
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "the {name} curl failed: {status}");
    }
    for file in [&one, &two] {
        assert_eq!(sha256(&std::fs::read(file)?), layer, "{}", file.display());
    }
    assert_eq!(
        std::fs::read(&part)?,
        std::fs::read(&one)?[15_000_000..15_001_000],
        "the range's bytes"
    );
    pulling
        .join()
        .map_err(|_| anyhow::anyhow!("the docker thread panicked"))??;
    docker.run(&["rmi", &image])?;
    assert_eq!(
        proxy.blob_gets().get(&layer).copied(),
        Some(1),
        "the upstream saw one GET of the layer: {:?}",
        proxy.blob_gets()
    );
    Ok(())
}

fn wrong_blob() -> anyhow::Result<()> {
    push_big("big-wrong")?;
    let proxy = Proxy::start(world()?.registry.addr)?;
    let server = mirror_server(&proxy)?;
    let (layer, _) = layer_of(&server, "big-wrong")?;
    proxy.set_trickle(Some((16, Duration::from_millis(250))));
    proxy.set_corrupt_blobs(true);
    let url = format!(
        "http://{}/v2/mirror/local/big-wrong/blobs/{layer}",
        server.addr
    );
    let dir = tempfile::tempdir()?;
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let mut first = curl(&url, &one)?;
    first_byte(&one, Duration::from_secs(10))
        .ok_or_else(|| anyhow::anyhow!("no byte reached the first client"))?;
    let mut second = curl(&url, &two)?;
    for (name, child, file) in [("first", &mut first, &one), ("second", &mut second, &two)] {
        let status = child.wait()?;
        let got = std::fs::read(file).unwrap_or_default();
        // An aborted body, never a clean end of a wrong one.
        assert!(
            !status.success(),
            "the {name} client's transfer ended cleanly ({} bytes)",
            got.len()
        );
        assert_ne!(sha256(&got), layer);
    }
    let data = server.dir.path().join("data");
    let stored = data
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    assert!(!stored.exists(), "the wrong blob is not stored");
    assert_eq!(
        std::fs::read_dir(data.join("tmp"))?.count(),
        0,
        "no partial blob is left behind"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("a blob download failed") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no failure logged\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    proxy.set_corrupt_blobs(false);
    proxy.set_trickle(None);
    let reply = get_ok(
        &server,
        &format!("/v2/mirror/local/big-wrong/blobs/{layer}"),
    )?;
    assert_eq!(sha256(&reply.body), layer);
    assert!(stored.exists(), "the good blob is stored");
    Ok(())
}

/// What every slow build must show: a client that hangs up at 3 s does not
/// stop it; a client that waits is answered 429 within `hold` + 1 s with a
/// message saying what is building; the build ends and is stored; the next
/// pull is served from storage at once; docker, retried, pulls it.
fn outlives_its_clients(server: &Server, repo: &str, reference: &str) -> anyhow::Result<()> {
    let path = format!("/v2/{repo}/manifests/{reference}");
    let url = format!("http://{}{path}", server.addr);
    // A client that gives up after 3 s.
    let quitter = Command::new("curl")
        .args(["-sS", "--max-time", "3", "-o", "/dev/null", &url])
        .status()?;
    assert!(!quitter.success(), "the build took less than 3 s");
    // A client that waits up to 30 s for headers is answered in time.
    let asked = Instant::now();
    let reply = http(
        server.addr,
        Method::GET,
        &path,
        &[("accept", crate::support::ACCEPT_ALL)],
    )?;
    let waited = asked.elapsed();
    let hold = Duration::from_secs(HOLD.trim_end_matches('s').parse()?);
    assert!(
        waited <= hold + Duration::from_secs(1),
        "answered after {waited:?}"
    );
    let message = reply.expect_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS")?;
    assert!(
        message.starts_with(&format!("building {}", repo)) && message.ends_with("pull again"),
        "{message}"
    );
    assert!(
        !reply.header("retry-after").is_empty(),
        "Retry-After is set"
    );
    // containers/image (skopeo, podman) waits `Retry-After` and asks again
    // by itself on a 429: skopeo gets through without being retried.
    let image = format!("{}/{repo}:{reference}", server.addr);
    let inspecting = {
        let image = format!("docker://{image}");
        std::thread::spawn(move || {
            crate::support::skopeo(&["inspect", "--tls-verify=false", "--raw", &image])
        })
    };
    // docker prints the message while the build runs, and pulls once it ends.
    let docker = docker()?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut told = Vec::new();
    loop {
        match docker.run(&["pull", &image]) {
            Ok(_) => break,
            Err(e) => {
                told.push(e.to_string());
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "docker never pulled: {told:?}\n{}",
                    server.log()
                );
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
    assert!(
        told.iter().any(|e| e.contains("building ")),
        "docker printed the build's progress: {told:?}"
    );
    eprintln!("docker said, while {repo} was building: {}", told[0].trim());
    docker.run(&["rmi", &image])?;
    inspecting
        .join()
        .map_err(|_| anyhow::anyhow!("the skopeo thread panicked"))??;
    // From storage now, at once (the best of three, on a busy machine).
    let mut took = Duration::MAX;
    for _ in 0..3 {
        let asked = Instant::now();
        get_ok(server, &path)?;
        took = took.min(asked.elapsed());
    }
    assert!(
        took < Duration::from_millis(100),
        "a cached pull took {took:?}"
    );
    let log = server.log();
    assert!(
        log.contains("build in progress") || log.contains("build ended"),
        "{log}"
    );
    assert_eq!(log.matches("build started").count(), 1, "one build: {log}");
    Ok(())
}

fn slow_ko() -> anyhow::Result<()> {
    let tools = tempfile::tempdir()?;
    let runs = tools.path().join("runs");
    let config = crate::ko::config_with_slow_go(
        tools.path(),
        &format!("echo build >> {}; sleep 15", runs.display()),
    )?;
    let server = Server::start(Some(&with_hold(&config)))?;
    outlives_its_clients(&server, "ko/example.com/hello", "v1.0.0")?;
    let index = get_ok(&server, "/v2/ko/example.com/hello/manifests/v1.0.0")?.json()?;
    let platforms = index["manifests"].as_array().map_or(1, Vec::len);
    let builds = std::fs::read_to_string(&runs)?.lines().count();
    assert_eq!(builds, platforms, "go build ran once per platform");
    Ok(())
}

fn slow_buildpack() -> anyhow::Result<()> {
    let config = crate::buildpack::config()?;
    let server = Server::start(Some(&with_hold(&config)))?;
    let revision = crate::buildpack::slow_repo()?;
    outlives_its_clients(&server, "buildpack/acme/slow", revision)
}

/// `config` with the test's `hold`.
fn with_hold(config: &str) -> String {
    match config.contains("[server]\n") {
        true => config.replacen("[server]\n", &format!("[server]\nhold = \"{HOLD}\"\n"), 1),
        false => format!("[server]\nhold = \"{HOLD}\"\n{config}"),
    }
}

fn sigterm() -> anyhow::Result<()> {
    let tools = tempfile::tempdir()?;
    let marker = tools.path().join("sleeping");
    // A sleep no other process runs, to look for afterwards.
    let nap = "sleep 61.25";
    let config = crate::ko::config_with_slow_go(
        tools.path(),
        &format!("touch {}; {nap}", marker.display()),
    )?;
    let mut server = Server::start(Some(&with_hold(&config)))?;
    let path = "/v2/ko/example.com/hello/manifests/v1.1.0";
    let url = format!("http://{}{path}", server.addr);
    let _ = Command::new("curl")
        .args(["-sS", "--max-time", "2", "-o", "/dev/null", &url])
        .status()?;
    // The build goes on without its client, until go is running.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        anyhow::ensure!(Instant::now() < deadline, "go never ran\n{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    crate::support::kill(server.pid());
    let stopped = Instant::now();
    let status = server.wait()?;
    assert!(status.success(), "a clean exit: {status}\n{}", server.log());
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "stopping took {:?}",
        stopped.elapsed()
    );
    let log = server.log();
    assert!(log.contains("stopping detached work"), "{log}");
    assert!(!log.contains("build ended"), "{log}");
    let gone = Command::new("pgrep").args(["-f", nap]).output()?;
    assert!(gone.stdout.is_empty(), "the build's processes are killed");
    let data = server.dir.path().join("data");
    let count = |dir: &str| std::fs::read_dir(data.join(dir)).map_or(0, |d| d.count());
    assert_eq!(count("leases"), 0, "the build's lease is released");
    assert_eq!(count("tmp"), 0, "no partial blob is left");
    // Nothing of the build is kept: the next start builds it again (with a
    // go that takes no time now).
    crate::ko::config_with_slow_go(tools.path(), "true")?;
    let server = server.restart()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while get(server.addr, path)?.status != StatusCode::OK {
        anyhow::ensure!(Instant::now() < deadline, "never built\n{}", server.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(server.log().contains("build started"), "{}", server.log());
    Ok(())
}

fn single_flight() -> anyhow::Result<()> {
    let proxy = Proxy::start(world()?.registry.addr)?;
    let server = mirror_server(&proxy)?;
    // The upstream answers slowly, so that the requests overlap.
    proxy.set_slow_manifests(Some(Duration::from_millis(500)));
    proxy.set_slow_blobs(Some(Duration::from_millis(100)));
    let path = "/v2/flatten/local/busybox/manifests/latest";
    let digests = std::thread::scope(|s| {
        let pulls: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    get_ok(&server, path).map(|r| r.header("docker-content-digest").to_owned())
                })
            })
            .collect();
        pulls
            .into_iter()
            .map(|p| p.join().map_err(|_| anyhow::anyhow!("a pull panicked"))?)
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    let log = server.log();
    assert_eq!(
        log.matches("build started").count(),
        1,
        "one flatten: {log}"
    );
    let heads = proxy
        .manifest_requests()
        .get("HEAD /v2/busybox/manifests/latest")
        .copied();
    assert_eq!(
        heads,
        Some(1),
        "one tag HEAD: {:?}",
        proxy.manifest_requests()
    );
    Ok(())
}
