//! Hot reload: the real server, its `kontain.toml` and plugin files changed
//! underneath it while it serves.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use libtest_mimic::Trial;

use crate::support::{Server, http, plugin_path, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "reload::a_generator_added_to_kontain_toml_serves_without_a_restart",
            added,
        ),
        trial(
            "reload::a_replaced_plugin_swaps_under_load_without_failed_requests",
            swap_under_load,
        ),
        trial(
            "reload::a_garbage_plugin_leaves_the_old_version_serving",
            garbage,
        ),
        trial(
            "reload::the_upstream_allowlist_changes_without_a_restart_and_storage_says_it_needs_one",
            allowlist,
        ),
        trial(
            "reload::a_new_go_build_timeout_applies_without_a_restart",
            build_timeout,
        ),
    ]
}

const BASE: &str = crate::support::RANDOM;

/// Replaces `path` the way deploy tools do: write aside, rename over.
fn replace(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Waits until the server's log holds `line`.
fn logged(server: &Server, line: &str) -> anyhow::Result<()> {
    eventually(|| Ok(server.log().contains(line)))
        .map(drop)
        .map_err(|e| anyhow::anyhow!("{e}: no {line:?} in the log:\n{}", server.log()))
}

/// Polls `check` until it holds (or 20 s pass); returns how long it took.
fn eventually(mut check: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if check()? {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("the change was not applied within 20 s")
}

fn added() -> anyhow::Result<()> {
    let server = Server::start(Some(BASE))?;
    let before = server.head("/v2/wait/demo/manifests/1s")?;
    assert_eq!(before.status, StatusCode::NOT_FOUND);
    let config = format!(
        "{BASE}[generators.wait]\nsource = {:?}\ngrants = [\"cache\", \"random\"]\n",
        plugin_path("wait")
    );
    replace(&server.dir.path().join("kontain.toml"), config.as_bytes())?;
    let took = eventually(|| {
        let reply = http(server.addr, Method::GET, "/v2/wait/demo/manifests/1s", &[])?;
        Ok(reply.status == StatusCode::NOT_FOUND && reply.error()?.1.contains("waiting"))
    })
    .map_err(|e| anyhow::anyhow!("{e}\nserver log:\n{}", server.log()))?;
    println!("wait became servable {took:?} after kontain.toml changed");
    // The image appears once its delay has passed.
    eventually(|| Ok(server.head("/v2/wait/demo/manifests/1s")?.status == StatusCode::OK))?;
    assert!(
        server.log().contains("swapped in generator"),
        "the swap is logged"
    );
    Ok(())
}

fn digest_of(server: &Server) -> anyhow::Result<Option<String>> {
    let reply = server.head("/v2/swap/manifests/latest")?;
    Ok((reply.status == StatusCode::OK).then(|| reply.header("docker-content-digest").to_owned()))
}

/// A server whose generator `swap` is `fixture-v1`, loaded from a file in
/// `dir` that the test may replace.
fn serving_v1() -> anyhow::Result<(tempfile::TempDir, std::path::PathBuf, Server)> {
    let dir = tempfile::tempdir()?;
    let wasm = dir.path().join("swap.wasm");
    std::fs::copy(plugin_path("fixture-v1"), &wasm)?;
    // Budgets off: the load below is thousands of requests a second from
    // one address, which is what they are there to stop.
    let server = Server::start(Some(&format!(
        "{BASE}[generators.swap]\nsource = {wasm:?}\nbudget = {{ requests = 0 }}\n"
    )))?;
    Ok((dir, wasm, server))
}

fn swap_under_load() -> anyhow::Result<()> {
    let (_dir, wasm, server) = serving_v1()?;
    let v1 = digest_of(&server)?.ok_or_else(|| anyhow::anyhow!("v1 does not serve"))?;

    let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let seen_v2 = AtomicUsize::new(0);
    let load_for = Duration::from_secs(10);
    let started = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        for _ in 0..4 {
            s.spawn(|| {
                while started.elapsed() < load_for {
                    match digest_of(&server) {
                        Ok(Some(d)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            if d != v1 {
                                seen_v2.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_secs(3));
        replace(&wasm, &std::fs::read(plugin_path("fixture-v2"))?)?;
        Ok(())
    })?;
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    println!(
        "{ok} requests in {load_for:?} ({:.0}/s) while swapping, {failed} failed",
        ok as f64 / load_for.as_secs_f64()
    );
    assert_eq!(failed, 0, "no request fails during the swap");
    assert!(
        seen_v2.into_inner() > 0,
        "the new version answered after the swap"
    );
    assert_ne!(digest_of(&server)?, Some(v1), "the new version serves now");
    Ok(())
}

fn garbage() -> anyhow::Result<()> {
    let (_dir, wasm, server) = serving_v1()?;
    let v1 = digest_of(&server)?;
    assert!(v1.is_some());
    replace(&wasm, b"\0asm this is not a component")?;
    eventually(|| {
        Ok(server
            .log()
            .contains("the previous version, if any, keeps serving"))
    })?;
    assert_eq!(digest_of(&server)?, v1, "the old version keeps serving");
    Ok(())
}

/// The mirror's refusal of `localhost`: which rule refused it.
fn localhost_refusal(server: &Server) -> anyhow::Result<String> {
    let reply = http(
        server.addr,
        Method::GET,
        "/v2/mirror/localhost/x/manifests/latest",
        &[],
    )?;
    anyhow::ensure!(reply.status == StatusCode::FORBIDDEN, "{}", reply.status);
    Ok(reply.error()?.1)
}

fn allowlist() -> anyhow::Result<()> {
    let config = |allow: &str, ttl: &str| {
        format!(
            "[storage]\nbackend = \"filesystem\"\npath = \"data\"\nttl = \"{ttl}\"\n\
             [upstream]\nallow = [{allow}]\n\
             [generators.mirror]\nsource = \"builtin:mirror\"\ngrants = [\"upstream\"]\n"
        )
    };
    let server = Server::start(Some(&config("", "10d")))?;
    let refused = localhost_refusal(&server)?;
    assert!(
        refused.contains("not on the upstream allowlist"),
        "{refused}"
    );
    // Allowed now: the next rule (no loopback addresses) refuses instead,
    // without a connection, and without a restart.
    let path = server.dir.path().join("kontain.toml");
    replace(&path, config("\"localhost\"", "20d").as_bytes())?;
    logged(&server, "reloaded [upstream]")?;
    let refused = localhost_refusal(&server)?;
    assert!(refused.contains("loopback, private"), "{refused}");
    logged(&server, "needs a restart: storage")
}

fn build_timeout() -> anyhow::Result<()> {
    let config = crate::ko::config(None)?;
    let server = Server::start(Some(&config))?;
    let path = server.dir.path().join("kontain.toml");
    let quick = config.replacen("[go]\n", "[go]\nbuild_timeout = \"1ms\"\n", 1);
    replace(&path, quick.as_bytes())?;
    logged(&server, "reloaded [go]")?;
    let message = http(
        server.addr,
        Method::GET,
        "/v2/ko/example.com/tools/cmd/echo/manifests/v0.1.0",
        &[],
    )?
    .expect_error(StatusCode::FORBIDDEN, "DENIED")?;
    assert!(message.contains("took longer than the limit"), "{message}");
    Ok(())
}
