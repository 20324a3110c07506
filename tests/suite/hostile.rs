//! The server under hostile load and unlucky operations, on loopback only:
//! silent connections by the thousand, a descriptor limit, an upstream that
//! never stops sending, clients without `Accept` or `Host`, `kill -9` in the
//! middle of a download, a full disk.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use libtest_mimic::Trial;

use crate::mirror::proxied_mirror;
use crate::support::RANDOM;
use crate::support::{
    ACCEPT_ALL, Server, docker, free_port, get, get_ok, http, trial, wait_for_port,
};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "hostile::a_config_edit_is_read_once_and_a_bad_one_logged_once",
            config_edits,
        ),
        trial(
            "hostile::a_thousand_silent_connections_neither_block_a_pull_nor_stay_open",
            silent_connections,
        ),
        trial(
            "hostile::with_256_descriptors_the_server_sheds_idle_connections_and_keeps_accepting",
            descriptor_limit,
        ),
        trial(
            "hostile::an_endless_upstream_body_is_cut_at_the_declared_size_and_not_stored",
            endless_body,
        ),
        trial(
            "hostile::small_blobs_answer_as_fast_as_manifests_under_keep_alive",
            small_blobs,
        ),
        trial(
            "hostile::no_accept_still_pulls_and_upstream_4xx_stays_4xx",
            accept_and_upstream_errors,
        ),
        trial(
            "hostile::kill_9_leaves_no_temporaries_and_a_second_server_is_refused",
            crash_debris,
        ),
        trial(
            "hostile::a_full_disk_is_507_without_paths_and_recovers",
            full_disk,
        ),
        trial(
            "hostile::file_redirects_are_denied_blobs_are_scoped_and_hosts_are_required",
            scoping,
        ),
    ]
}

/// Polls `check` for up to `limit`.
fn within(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The process's CPU time so far, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime is the
    // 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn config_edits() -> anyhow::Result<()> {
    let server = Server::start(Some(RANDOM))?;
    let path = server.dir.path().join("kontain.toml");
    let idle_before = {
        let t = cpu_ticks(server.pid())?;
        std::thread::sleep(Duration::from_secs(2));
        cpu_ticks(server.pid())? - t
    };
    std::fs::write(
        &path,
        format!("{RANDOM}[upstream]\nallow = [\"example.com\"]\n"),
    )?;
    anyhow::ensure!(
        within(Duration::from_secs(20), || server
            .log()
            .contains("reloaded [upstream]")),
        "the edit was not applied:\n{}",
        server.log()
    );
    std::thread::sleep(Duration::from_secs(5));
    let reloads = server.log().matches("reloaded [upstream]").count();
    assert_eq!(reloads, 1, "one edit, one reload:\n{}", server.log());
    std::fs::write(&path, "this is [not toml")?;
    anyhow::ensure!(
        within(Duration::from_secs(20), || server
            .log()
            .contains("config not reloaded")),
        "the bad file was not noticed"
    );
    let t = cpu_ticks(server.pid())?;
    std::thread::sleep(Duration::from_secs(5));
    let idle_after = cpu_ticks(server.pid())? - t;
    let errors = server.log().matches("config not reloaded").count();
    assert_eq!(errors, 1, "a bad file is logged once:\n{}", server.log());
    eprintln!("idle CPU ticks: {idle_before} in 2 s before the edits, {idle_after} in 5 s after");
    // Not a speed check: a reload loop shows as tens of ticks a second.
    assert!(idle_after < 50, "{idle_after} CPU ticks in 5 s while idle");
    Ok(())
}

/// A server whose silent connections close after `header` seconds.
fn timeouts(header: u32) -> String {
    format!("[server]\nheader_timeout = \"{header}s\"\nidle_timeout = \"{header}s\"\n{RANDOM}")
}

/// Opens `n` connections that send nothing.
fn silent(server: &Server, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    (0..n)
        .map(|_| Ok(TcpStream::connect(server.addr)?))
        .collect()
}

/// How many of `streams` the server has closed (a read sees the end).
fn closed(streams: &mut [TcpStream]) -> anyhow::Result<usize> {
    let mut n = 0;
    for s in streams.iter_mut() {
        s.set_read_timeout(Some(Duration::from_millis(20)))?;
        match s.read(&mut [0u8; 1]) {
            Ok(0) => n += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => n += 1,
            _ => {}
        }
    }
    Ok(n)
}

fn silent_connections() -> anyhow::Result<()> {
    let server = Server::start(Some(&timeouts(3)))?;
    let mut idle = silent(&server, 1000)?;
    let docker = docker()?;
    let image = format!("{}/random:2x1000", server.addr);
    docker.run(&["pull", &image])?;
    docker.run(&["rmi", &image])?;
    let mut all_closed = 0;
    within(Duration::from_secs(15), || {
        all_closed = closed(&mut idle).unwrap_or(0);
        all_closed == idle.len()
    });
    assert_eq!(all_closed, 1000, "silent connections closed after 3 s");
    assert!(
        server
            .log()
            .contains("closed connections that sent no complete request in time"),
        "{}",
        server.log()
    );
    get_ok(&server, "/v2/")?;
    Ok(())
}

fn descriptor_limit() -> anyhow::Result<()> {
    let server = Server::start_with_descriptors(&timeouts(3), 256)?;
    let mut idle = silent(&server, 300)?;
    // Accepting goes on while they are open: idle ones make room.
    for _ in 0..3 {
        get_ok(&server, "/v2/")?;
    }
    within(Duration::from_secs(15), || {
        closed(&mut idle).unwrap_or(0) == idle.len()
    });
    assert_eq!(
        closed(&mut idle)?,
        300,
        "every silent connection was closed"
    );
    for _ in 0..3 {
        get_ok(&server, "/v2/random/manifests/1x10")?;
    }
    assert!(
        server.log().contains("fewer connections than configured"),
        "{}",
        server.log()
    );
    Ok(())
}

fn endless_body() -> anyhow::Result<()> {
    let (proxy, server) = proxied_mirror()?;
    let manifest = get_ok(&server, "/v2/mirror/local/oci-image/manifests/v1")?.json()?;
    let layer = &manifest["layers"][0];
    let (digest, declared) = (
        layer["digest"].as_str().unwrap_or_default().to_owned(),
        layer["size"].as_u64().unwrap_or_default(),
    );
    proxy.set_endless_blobs(true);
    let path = format!("/v2/mirror/local/oci-image/blobs/{digest}");
    let message =
        get(server.addr, &path)?.expect_error(StatusCode::SERVICE_UNAVAILABLE, "BLOB_UNKNOWN")?;
    eprintln!(
        "an endless body: {message}; the upstream sent {} bytes",
        proxy.endless_sent()
    );
    assert!(
        message.contains(&format!("more than the {declared} bytes declared")),
        "{message}"
    );
    let read: u64 = message
        .split("(read ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(
        read <= declared + 64 * 1024,
        "read {read} of {declared} declared bytes"
    );
    assert!(!message.contains("/tmp"), "{message}");
    // Nothing was stored: the honest upstream is asked again.
    proxy.set_endless_blobs(false);
    let blob = get_ok(&server, &path)?;
    assert_eq!(crate::support::sha256(&blob.body), digest);
    assert_eq!(proxy.blob_gets().get(&digest), Some(&2));
    Ok(())
}

/// The median times of `n` GETs of each of `paths`, taken in turns on one
/// kept-alive connection (so that both see the same machine load).
fn median_gets(server: &Server, paths: [&str; 2], n: usize) -> anyhow::Result<[Duration; 2]> {
    use http_body_util::{BodyExt, Empty};
    let addr = server.addr;
    let paths = paths.map(str::to_owned);
    crate::support::rt().block_on(async move {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut times = [Vec::with_capacity(n), Vec::with_capacity(n)];
        for _ in 0..n {
            for (path, times) in paths.iter().zip(times.iter_mut()) {
                sender.ready().await?;
                let request = http::Request::get(path.as_str())
                    .header("host", addr.to_string())
                    .header("accept", ACCEPT_ALL)
                    .body(Empty::<bytes::Bytes>::new())?;
                let started = Instant::now();
                let response = sender.send_request(request).await?;
                anyhow::ensure!(
                    response.status() == StatusCode::OK,
                    "{path}: {}",
                    response.status()
                );
                response.into_body().collect().await?;
                times.push(started.elapsed());
            }
        }
        Ok(times.map(|mut t| {
            t.sort();
            t[n / 2]
        }))
    })
}

fn small_blobs() -> anyhow::Result<()> {
    let server = Server::start(Some(RANDOM))?;
    let reply = get_ok(&server, "/v2/random/manifests/1x2600")?;
    let manifest = format!(
        "/v2/random/manifests/{}",
        reply.header("docker-content-digest")
    );
    let layer = &reply.json()?["layers"][0];
    let blob = format!(
        "/v2/random/blobs/{}",
        layer["digest"].as_str().unwrap_or_default()
    );
    let [m, b] = median_gets(&server, [&manifest, &blob], 101)?;
    eprintln!(
        "keep-alive medians: manifest {m:?}, {}-byte blob {b:?}",
        layer["size"]
    );
    // Nagle's delay would be ~40 ms; the slack covers a busy CI machine.
    assert!(
        b <= m * 2 + Duration::from_millis(5),
        "blob {b:?} vs manifest {m:?}"
    );
    Ok(())
}

fn accept_and_upstream_errors() -> anyhow::Result<()> {
    let (proxy, server) = proxied_mirror()?;
    // No Accept at all: the upstream is asked with every manifest type.
    let reply = http(
        server.addr,
        Method::GET,
        "/v2/mirror/local/busybox/manifests/latest",
        &[],
    )?;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let reply = http(
        server.addr,
        Method::GET,
        "/v2/mirror/local/oci-image/manifests/v1",
        &[("accept", "*/*")],
    )?;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    // An upstream's client error is permanent: a 4xx that says what it said.
    proxy.answer_manifests(Some((
        400,
        r#"{"errors":[{"code":"MANIFEST_INVALID","message":"manifest invalid"}]}"#,
    )));
    let reply = get(server.addr, "/v2/mirror/local/multi/manifests/latest")?;
    assert!(
        reply.status.is_client_error(),
        "{}: {:?}",
        reply.status,
        reply.body
    );
    let (_, message) = reply.error()?;
    assert!(
        message.contains("refused") && message.contains("400"),
        "{message}"
    );
    assert!(reply.header("retry-after").is_empty());
    // Throttling and failures upstream are worth a retry.
    proxy.answer_manifests(Some((429, "{}")));
    get(server.addr, "/v2/mirror/local/multi/manifests/latest")?
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "MANIFEST_UNKNOWN")?;
    Ok(())
}

fn crash_debris() -> anyhow::Result<()> {
    let (proxy, mut server) = proxied_mirror()?;
    let manifest = get_ok(&server, "/v2/mirror/local/busybox/manifests/latest")?.json()?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    proxy.set_slow_blobs(Some(Duration::from_millis(700)));
    let addr = server.addr;
    let path = format!("/v2/mirror/local/busybox/blobs/{layer}");
    let _pulling = std::thread::spawn(move || get(addr, &path));
    let tmp = server.dir.path().join("data/tmp");
    let busy = within(Duration::from_secs(10), || {
        std::fs::read_dir(&tmp).is_ok_and(|d| d.count() > 0)
    });
    assert!(busy, "no download in progress");
    server.kill();
    let server = server.restart()?;
    let left = std::fs::read_dir(server.dir.path().join("data/tmp"))?.count();
    assert_eq!(left, 0, "temporaries of the killed server were left");
    // A second server on the same directory refuses to start.
    let mut second = Command::new(env!("CARGO_BIN_EXE_kontain"))
        .current_dir(server.dir.path())
        .env("PORT", free_port()?.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let exited = within(Duration::from_secs(20), || {
        second.try_wait().ok().flatten().is_some()
    });
    if !exited {
        let _ = second.kill();
        anyhow::bail!("a second server on the same directory kept running");
    }
    let out = second.wait_with_output()?;
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(said.contains("another kontain server"), "{said}");
    let refusal = said.lines().find(|l| l.contains("another kontain server"));
    eprintln!("a second server: {}", refusal.unwrap_or_default());
    get_ok(&server, "/v2/")?;
    Ok(())
}

fn full_disk() -> anyhow::Result<()> {
    let disk = crate::support::Tmpfs::mount()?;
    let data = disk.0.path().join("data");
    let server = Server::start(Some(&RANDOM.replace(
        "path = \"data\"",
        &format!("path = {:?}", data.display().to_string()),
    )))?;
    let check = |reply: crate::support::Reply| -> anyhow::Result<()> {
        let code = match reply.request.contains("/blobs/") {
            true => "BLOB_UNKNOWN",
            false => "MANIFEST_UNKNOWN",
        };
        let message = reply.expect_error(StatusCode::INSUFFICIENT_STORAGE, code)?;
        assert!(message.contains("out of storage space"), "{message}");
        assert!(!message.contains('/'), "a path in {message}");
        Ok(())
    };
    // A random layer bigger than the disk is a seed: it fits.
    get_ok(&server, "/v2/random/manifests/1x40000000")?;
    // Fill what is left, then free it.
    let filler = disk.0.path().join("filler");
    let mut file = std::fs::File::create(&filler)?;
    let chunk = vec![1u8; 1 << 20];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.flush();
    check(get(server.addr, "/v2/random/manifests/1x5000")?)?;
    // The failed image left nothing half-written.
    let spool = data.join("tmp");
    if spool.exists() {
        assert_eq!(
            std::fs::read_dir(&spool)?.count(),
            0,
            "a partial blob was left"
        );
    }
    drop(file);
    std::fs::remove_file(&filler)?;
    get_ok(&server, "/v2/random/manifests/1x5000")?;
    assert!(
        server.log().contains("out of storage space"),
        "the path is logged"
    );
    Ok(())
}

/// A raw HTTP/1.x request; the status line of the answer.
fn raw(server: &Server, request: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(server.addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

fn scoping() -> anyhow::Result<()> {
    let (proxy, server) = proxied_mirror()?;
    let manifest = get_ok(&server, "/v2/mirror/local/oci-image/manifests/v1")?.json()?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // A redirect to a file is refused like any other forbidden redirect.
    proxy.redirect_blobs_to(Some("file:///etc".into()));
    let message = get(
        server.addr,
        &format!("/v2/mirror/local/oci-image/blobs/{layer}"),
    )?
    .expect_error(StatusCode::FORBIDDEN, "DENIED")?;
    assert!(message.contains("file:"), "{message}");
    proxy.redirect_blobs_to(None);
    get_ok(
        &server,
        &format!("/v2/mirror/local/oci-image/blobs/{layer}"),
    )?;
    // A stored blob is not served under a name its generator refuses, or
    // under one no manifest was served for.
    get(
        server.addr,
        &format!("/v2/mirror/10.1.2.3/bb/blobs/{layer}"),
    )?
    .expect_error(StatusCode::FORBIDDEN, "DENIED")?;
    get(
        server.addr,
        &format!("/v2/mirror/127.0.0.1/bb/blobs/{layer}"),
    )?
    .expect_error(StatusCode::FORBIDDEN, "DENIED")?;
    let by_digest = format!(
        "/v2/mirror/127.0.0.1/bb/manifests/{}",
        crate::support::sha256(&serde_json::to_vec(&manifest)?)
    );
    assert_ne!(get(server.addr, &by_digest)?.status, StatusCode::OK);
    // HTTP/1.1 needs exactly one Host; HTTP/1.0 may go without.
    assert!(raw(&server, "GET /v2/ HTTP/1.1\r\n\r\n")?.contains(" 400 "));
    assert!(raw(&server, "GET /v2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")?.contains(" 400 "));
    assert!(raw(&server, "GET /v2/ HTTP/1.0\r\n\r\n")?.contains(" 200 "));
    Ok(())
}

impl Server {
    /// As [`Server::start`], with the process's descriptor limit (soft and
    /// hard) at `nofile`, as `ulimit -n` sets it.
    pub fn start_with_descriptors(config: &str, nofile: u32) -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("kontain.toml"), config)?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\""))
            .arg(env!("CARGO_BIN_EXE_kontain"))
            .current_dir(dir.path())
            .env("PORT", port.to_string())
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        wait_for_port(addr, &mut child, "kontain")?;
        Ok(Server::from_parts(addr, child, dir))
    }
}
