//! Misbehaving plugins (from `plugins/fixtures/`) end in errors that name
//! them, within their limits, and the server keeps serving.

use std::time::{Duration, Instant};

use http::StatusCode;
use kontain::config::{Config, Origin};
use libtest_mimic::Trial;

use crate::support::{InProcess, plugin_path, rt, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "plugins::a_trapping_plugin_is_an_error_naming_it",
            trapping_plugin,
        ),
        trial(
            "plugins::a_looping_plugin_is_stopped_at_its_deadline",
            looping_plugin,
        ),
        trial(
            "plugins::a_plugin_allocating_past_its_limit_is_trapped",
            memory_hog,
        ),
        trial(
            "plugins::a_plugin_importing_an_ungranted_capability_is_refused_at_load",
            ungranted_import,
        ),
        trial(
            "plugins::a_config_pointing_at_a_missing_wasm_file_fails_clearly",
            missing_file,
        ),
        trial(
            "plugins::a_restart_with_a_warm_cache_compiles_no_component",
            warm_restart,
        ),
        trial(
            "plugins::a_plugin_built_against_wit_0_1_0_loads_serves_and_lists_no_tags",
            older_wit,
        ),
    ]
}

/// The WIT is a public contract: a plugin built against its first release
/// (`plugins/fixtures/wit-0.1.0`, with its own frozen copy) keeps working.
fn older_wit() -> anyhow::Result<()> {
    // It imports `upstream` (which 0.1.1 grew), so it is granted that.
    let config = with_fixture("fixture-wit-0-1-0", "timeout = \"5s\"").replace(
        "[generators.bad.limits]",
        "grants = [\"upstream\"]\n[generators.bad.limits]",
    );
    let r = InProcess::new(&config)?;
    let manifest = r.get("/v2/bad/manifests/v1")?;
    assert_eq!(manifest.status, StatusCode::OK, "{:?}", manifest.body);
    let message = r.refused(
        "/v2/bad/manifests/v2",
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )?;
    assert!(message.contains("only tag v1"), "{message}");
    let tags = r.get("/v2/bad/tags/list")?;
    assert_eq!(tags.status, StatusCode::OK);
    assert_eq!(
        tags.json()?,
        serde_json::json!({ "name": "bad", "tags": [] })
    );
    random_still_works(&r)
}

/// Config with `random` plus a fixture generator named `bad`.
fn with_fixture(fixture: &str, limits: &str) -> String {
    format!(
        "[generators.random]\nsource = \"builtin:random\"\ngrants = [\"random\"]\n\
         [generators.bad]\nsource = {:?}\n[generators.bad.limits]\n{limits}\n",
        plugin_path(fixture)
    )
}

fn random_still_works(r: &InProcess) -> anyhow::Result<()> {
    let ok = r.head("/v2/random/manifests/1x10")?;
    assert_eq!(ok.status, StatusCode::OK, "random after a failing plugin");
    Ok(())
}

fn trapping_plugin() -> anyhow::Result<()> {
    let r = InProcess::new(&with_fixture("fixture-trap", "timeout = \"5s\""))?;
    let reply = r.get("/v2/bad/manifests/latest")?;
    let message = reply.expect_error(StatusCode::INTERNAL_SERVER_ERROR, "MANIFEST_UNKNOWN")?;
    assert!(
        message.starts_with("bad@sha256:"),
        "names the plugin: {message}"
    );
    assert!(message.contains("crashed"), "{message}");
    assert_eq!(reply.json()?["errors"][0]["detail"]["generator"], "bad");
    random_still_works(&r)
}

fn looping_plugin() -> anyhow::Result<()> {
    let r = InProcess::new(&with_fixture("fixture-spin", "timeout = \"1s\""))?;
    // While one request spins, others are served: the loop yields at every
    // epoch tick instead of holding a server thread.
    let registry = r.registry.clone();
    let spinning = rt().spawn(async move {
        let started = Instant::now();
        let request = http::Request::get("/v2/bad/manifests/latest")
            .header("host", "127.0.0.1")
            .body(())?;
        let response = registry.handle(request).await;
        anyhow::Ok((response.status(), started.elapsed()))
    });
    std::thread::sleep(Duration::from_millis(200));
    random_still_works(&r)?;
    let (status, elapsed) = rt().block_on(spinning)??;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    // Generous bound: this checks that the deadline is enforced at all, not speed.
    assert!(
        elapsed < Duration::from_secs(10),
        "stopped after {elapsed:?}"
    );
    let reply = r.get("/v2/bad/manifests/latest")?;
    let message = reply.expect_error(StatusCode::GATEWAY_TIMEOUT, "MANIFEST_UNKNOWN")?;
    assert!(
        message.contains("did not finish within its limit of 1s"),
        "{message}"
    );
    random_still_works(&r)
}

fn memory_hog() -> anyhow::Result<()> {
    let r = InProcess::new(&with_fixture(
        "fixture-memhog",
        "memory = \"8MiB\"\ntimeout = \"20s\"",
    ))?;
    let reply = r.get("/v2/bad/manifests/latest")?;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    let (_, message) = reply.error()?;
    assert!(
        message.contains("bad@") && message.contains("crashed"),
        "{message}"
    );
    random_still_works(&r)
}

fn ungranted_import() -> anyhow::Result<()> {
    let text = "[generators.random]\nsource = \"builtin:random\"\n";
    let config = Config::parse(text, Origin::BuiltIn)?;
    let dir = tempfile::tempdir()?;
    let mut config = config;
    config.storage.path = dir.path().to_owned();
    let Err(err) = rt().block_on(kontain::build(&config)) else {
        anyhow::bail!("a plugin importing kontain:generator/random without the grant was loaded");
    };
    let message = format!("{err:#}");
    assert!(message.contains("generator random"), "{message}");
    assert!(message.contains("\"random\" capability"), "{message}");
    Ok(())
}

fn missing_file() -> anyhow::Result<()> {
    let Err(err) = InProcess::new("[generators.x]\nsource = \"/nonexistent/x.wasm\"\n") else {
        anyhow::bail!("loaded a generator from a missing file");
    };
    let message = format!("{err:#}");
    assert!(
        message.contains("generator x") && message.contains("/nonexistent/x.wasm"),
        "{message}"
    );
    Ok(())
}

fn warm_restart() -> anyhow::Result<()> {
    let cold = crate::support::Server::start(None)?;
    let log = cold.log();
    assert!(log.contains(" compiled"), "a cold start compiles:\n{log}");
    let warm = cold.restart()?;
    let log = warm.log();
    let generators = ["random", "mirror", "flatten"];
    for g in generators {
        assert!(
            log.contains(&format!("plugin={g}@"))
                && log.contains("loaded from the precompiled cache"),
            "{g} from the cache:\n{log}"
        );
    }
    assert!(
        !log.contains(" compiled"),
        "a warm start compiles nothing:\n{log}"
    );
    assert_eq!(
        warm.head("/v2/random/manifests/1x10")?.status,
        StatusCode::OK
    );
    Ok(())
}
