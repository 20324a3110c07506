//! Fair use: per-client budgets and the build queue, with clients told apart
//! by their real source addresses (curl bound to 127.0.0.2, 127.0.0.3, ...;
//! all of 127.0.0.0/8 is loopback).

use std::process::Command;
use std::sync::Arc;

use anyhow::Context;
use http::StatusCode;
use libtest_mimic::Trial;

use crate::support::{Server, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "fair::a_client_past_its_budget_gets_429_while_others_and_stored_images_are_served",
            budgets,
        ),
        trial(
            "fair::builds_take_turns_round_the_clients_and_a_full_queue_answers_429",
            turns,
        ),
        trial(
            "fair::random_layers_are_stored_as_seeds_and_pull_whole_or_by_range",
            seeds,
        ),
        trial(
            "fair::a_storage_quota_evicts_the_least_recently_used_and_spares_a_pull_in_progress",
            quota,
        ),
        trial(
            "fair::a_store_full_of_images_in_use_refuses_new_ones_with_507_and_serves_the_rest",
            quota_full,
        ),
    ]
}

fn quota_full() -> anyhow::Result<()> {
    // A quota smaller than one image: the first is kept (it is in use),
    // the next cannot be made.
    let config = "[storage]\npath = \"data\"\nmax_bytes = \"100B\"\n\
        [generators.random]\nsource = \"builtin:random\"\ngrants = [\"random\"]\n";
    let server = Server::start(Some(config))?;
    let first = crate::support::get_ok(&server, "/v2/random/manifests/1x10")?;
    let digest = first.header("docker-content-digest").to_owned();
    let refused = crate::support::get(server.addr, "/v2/random/manifests/1x10")?;
    let message = refused.expect_error(StatusCode::INSUFFICIENT_STORAGE, "MANIFEST_UNKNOWN")?;
    assert!(message.contains("out of storage space"), "{message}");
    // What is stored is still served.
    crate::support::get_ok(&server, &format!("/v2/random/manifests/{digest}"))?;
    Ok(())
}

/// Bytes the store holds under `data` (its own directories, not the
/// compiled-plugin cache beside them).
fn stored_bytes(data: &std::path::Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for dir in ["blobs", "manifests", "recipes", "values", "referrers"] {
        let dir = data.join(dir);
        if dir.exists() {
            total += disk_use(&dir)?;
        }
    }
    Ok(total)
}

fn quota() -> anyhow::Result<()> {
    const MB: u64 = 1_000_000;
    const LAYER: usize = 40 * 1_000_000;
    let world = crate::mirror::world()?;
    // Eight images upstream of one incompressible 40 MB layer each.
    let layouts = tempfile::tempdir()?;
    for n in 0..8 {
        let mut bytes = vec![0u8; LAYER];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
        let image = crate::support::images::Image {
            layers: vec![crate::support::images::layer(&[
                crate::support::images::Entry::File("big", &bytes, 0o644),
            ])?],
            cmd: vec!["/big".into()],
            architecture: "amd64",
        };
        let layout = layouts.path().join(format!("q{n}"));
        crate::support::images::single(&layout, "v1", &image)?;
        world
            .registry
            .push(&layout, "v1", &format!("quota-{n}"), Some("oci"))?;
    }
    let server = Server::start(Some(&crate::expiry::mirror_and_random(
        world,
        "max_bytes = \"200MB\"\n",
    )))?;
    let data = server.dir.path().join("data");
    let pull = |n: usize| -> anyhow::Result<String> {
        let repo = format!("mirror/local/quota-{n}");
        let manifest =
            crate::support::get_ok(&server, &format!("/v2/{repo}/manifests/v1"))?.json()?;
        let layer = manifest["layers"][0].clone();
        crate::support::get_blob(&server, &repo, &manifest["config"])?;
        crate::support::get_blob(&server, &repo, &layer)?;
        // A random image between each: new content of another kind.
        crate::support::get_ok(&server, "/v2/random/manifests/2x1000")?;
        Ok(layer["digest"].as_str().unwrap_or_default().to_owned())
    };
    let bound = 200 * MB + LAYER as u64 + MB;
    let mut layers = Vec::new();
    // Four fit; pulled within moments, all are in use for a while.
    for n in 0..4 {
        layers.push(pull(n)?);
        let stored = stored_bytes(&data)?;
        assert!(stored <= bound, "after image {n}: {stored} bytes stored");
    }
    // Image 0 is now the least recently used. A slow client starts
    // downloading its layer; meanwhile four new images arrive.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let url = format!(
        "http://{}/v2/mirror/local/quota-0/blobs/{}",
        server.addr, layers[0]
    );
    let slow = std::thread::spawn(move || {
        Command::new("curl")
            .args(["-sf", "--limit-rate", "2M", &url])
            .output()
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    // New images from clients that come a few seconds apart (a burst of
    // pulls within 2 s of each other are all in use, and all stay).
    for n in 4..8 {
        std::thread::sleep(std::time::Duration::from_millis(2500));
        layers.push(pull(n)?);
        let stored = stored_bytes(&data)?;
        eprintln!("fair: after image {n}, {stored} bytes stored (quota 200 MB)");
        assert!(stored <= bound, "after image {n}: {stored} bytes stored");
    }
    let hex = |d: &str| d.trim_start_matches("sha256:").to_owned();
    assert!(
        data.join("blobs/sha256").join(hex(&layers[0])).exists(),
        "the layer being downloaded was evicted under its client"
    );
    let evicted = (1..5)
        .filter(|n| !data.join("blobs/sha256").join(hex(&layers[*n])).exists())
        .count();
    assert!(evicted >= 2, "older images went instead: {evicted} of 4");
    let downloaded = slow.join().map_err(|_| anyhow::anyhow!("curl thread"))??;
    assert!(downloaded.status.success());
    assert_eq!(crate::support::sha256(&downloaded.stdout), layers[0]);
    // The newest pulls completely with docker; an evicted one is fetched
    // again.
    let docker = crate::support::docker()?;
    for n in [7, 1] {
        let image = format!("{}/mirror/local/quota-{n}:v1", server.addr);
        docker.run(&["pull", &image])?;
        assert_eq!(docker.layer_count(&image)?, 1);
        docker.run(&["rmi", &image])?;
    }
    assert!(server.log().contains("evicted least recently used images"));
    Ok(())
}

/// Bytes stored under `dir` (file sizes, as a bucket would bill them; a
/// filesystem rounds each small file up to a block).
fn disk_use(dir: &std::path::Path) -> anyhow::Result<u64> {
    let out = crate::support::run(
        Command::new("du")
            .args(["-s", "-B1", "--apparent-size"])
            .arg(dir),
    )?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du's answer")
}

fn seeds() -> anyhow::Result<()> {
    let config = "[storage]\npath = \"data\"\n\
        [generators.random]\nsource = \"builtin:random\"\ngrants = [\"random\"]\n\
        [generators.random.budget]\ngenerated_bytes = 0\n";
    let server = Server::start(Some(config))?;
    let data = server.dir.path().join("data");
    crate::support::get_ok(&server, "/v2/random/manifests/1x10")?;
    let before = disk_use(&data)?;
    // 50 new images of 10 layers of 10 MB: 5 GB of layers.
    let mut digests = Vec::new();
    for _ in 0..50 {
        let reply = crate::support::get_ok(&server, "/v2/random/manifests/10x10000000")?;
        digests.push(reply.header("docker-content-digest").to_owned());
    }
    let added = disk_use(&data)?.saturating_sub(before);
    eprintln!("fair: 50 images of 100 MB added {added} bytes to storage (file sizes)");
    assert!(added < 1 << 20, "{added} bytes");
    // Every layer of one, whole, matches its digest; a range is its slice.
    let manifest =
        crate::support::get_ok(&server, &format!("/v2/random/manifests/{}", digests[7]))?.json()?;
    let layers = manifest["layers"].as_array().context("layers")?;
    assert_eq!(layers.len(), 10);
    let mut first = Vec::new();
    for layer in layers {
        let blob = crate::support::get_blob(&server, "random", layer)?;
        assert_eq!(
            crate::support::sha256(&blob.body),
            layer["digest"].as_str().unwrap_or_default()
        );
        if first.is_empty() {
            first = blob.body.to_vec();
        }
    }
    let digest = layers[0]["digest"].as_str().context("a digest")?;
    let ranged = crate::support::http(
        server.addr,
        http::Method::GET,
        &format!("/v2/random/blobs/{digest}"),
        &[("range", "bytes=1000-99999")],
    )?;
    assert_eq!(ranged.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(ranged.body[..], first[1000..100_000]);
    // And docker pulls one.
    let docker = crate::support::docker()?;
    let image = format!("{}/random:3x1000000", server.addr);
    docker.run(&["pull", &image])?;
    assert_eq!(docker.layer_count(&image)?, 3);
    docker.run(&["rmi", &image])?;
    Ok(())
}

/// What curl got: status, headers (lowercase names) and body.
struct Got {
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: String,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// `curl` from source address `from` (HEAD with `head`), with `headers`.
fn curl(from: &str, url: &str, head: bool, headers: &[&str]) -> anyhow::Result<Got> {
    let mut command = Command::new("curl");
    command.args(["-s", "-i", "--max-time", "300", "--interface", from]);
    if head {
        command.arg("-I");
    }
    for h in headers {
        command.args(["-H", h]);
    }
    let out = command.arg(url).output().context("running curl")?;
    anyhow::ensure!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head_part, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head_part.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("a status line")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Got {
        status: StatusCode::from_u16(status)?,
        headers,
        body: body.to_owned(),
    })
}

const ACCEPT: &str = "accept: application/vnd.docker.distribution.manifest.v2+json";

fn budgets() -> anyhow::Result<()> {
    let config = "[server]\ntrusted_proxies = [\"127.0.0.4/32\"]\n\
        [generators.random]\nsource = \"builtin:random\"\ngrants = [\"random\"]\n\
        [generators.random.budget]\nrequests = 40\ngenerated_bytes = \"30MB\"\n";
    let server = Server::start(Some(config))?;
    let base = format!("http://{}", server.addr);
    let (a, b) = ("127.0.0.2", "127.0.0.3");
    let new_image = format!("{base}/v2/random/manifests/10x1000000");
    // Each HEAD makes 10 MB: three fit in A's 30 MB an hour, the fourth not.
    let mut made = Vec::new();
    for _ in 0..3 {
        let got = curl(a, &new_image, true, &[ACCEPT])?;
        assert_eq!(got.status, StatusCode::OK);
        made.push(got.header("docker-content-digest").to_owned());
    }
    let over = curl(a, &new_image, false, &[ACCEPT])?;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS, "{}", over.body);
    let body: serde_json::Value = serde_json::from_str(&over.body)?;
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS", "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("generated bytes") && message.contains("30MB"),
        "{message}"
    );
    let retry: u64 = over
        .header("retry-after")
        .parse()
        .context("a Retry-After")?;
    assert!(
        (60..=3600).contains(&retry),
        "10 MB of 30 MB an hour refill in ~20 min: {retry}"
    );
    eprintln!("fair: over its budget, a client reads: {message}");
    // B, at the same time, is served.
    assert_eq!(curl(b, &new_image, true, &[ACCEPT])?.status, StatusCode::OK);
    // What A made is stored: pulling it costs no generation budget.
    let stored = curl(
        a,
        &format!("{base}/v2/random/manifests/{}", made[0]),
        false,
        &[ACCEPT],
    )?;
    assert_eq!(stored.status, StatusCode::OK);
    let manifest: serde_json::Value = serde_json::from_str(&stored.body)?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .context("a layer")?;
    let blob = curl(a, &format!("{base}/v2/random/blobs/{layer}"), true, &[])?;
    assert_eq!(blob.status, StatusCode::OK);
    // Behind the trusted proxy, A is A; from an untrusted peer the header
    // is not believed.
    let forwarded = "x-forwarded-for: 127.0.0.2";
    assert_eq!(
        curl("127.0.0.4", &new_image, true, &[ACCEPT, forwarded])?.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        curl("127.0.0.5", &new_image, true, &[ACCEPT, forwarded])?.status,
        StatusCode::OK
    );
    // The request budget: 40 a minute, A has used 9.
    let cheap = format!("{base}/v2/random/tags/list");
    let mut statuses = Vec::new();
    for _ in 0..35 {
        statuses.push(curl(a, &cheap, true, &[])?.status);
    }
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!((2..=6).contains(&refused), "{statuses:?}");
    assert_eq!(curl(b, &cheap, true, &[])?.status, StatusCode::OK);
    Ok(())
}

fn turns() -> anyhow::Result<()> {
    // The first build takes a while, so that every request is in before
    // a turn passes: then who is turned away does not depend on timing.
    let tools = tempfile::tempdir()?;
    let config = crate::ko::config_with_slow_go(
        tools.path(),
        "grep -q '\"turn 0\"' main.go 2>/dev/null && sleep 5",
    )?
    .replace(
        "[storage]\n",
        "[server]\nconcurrent_builds = 1\nqueued_builds = 30\n[storage]\n",
    );
    let config = config.replace(
        "[generators.ko.settings]\n",
        "[generators.ko.settings]\nplatforms = \"linux/amd64\"\n",
    );
    let server = Arc::new(Server::start(Some(&config))?);
    let (a, b) = ("127.0.0.2", "127.0.0.3");
    let each = crate::ko::TURNS / 2;
    let ask = |from: &'static str, n: usize| {
        let url = format!(
            "http://{}/v2/ko/example.com/turns/manifests/v1.0.{n}",
            server.addr
        );
        std::thread::spawn(move || curl(from, &url, false, &[ACCEPT]))
    };
    let queued = |client: &str| {
        server
            .log()
            .lines()
            .filter(|l| l.contains("build queued") && l.contains(&format!("client={client}")))
            .count()
    };
    // A asks for 20 at once; when they all wait (one runs), B asks for 20.
    let mut asked: Vec<_> = (0..each).map(|n| ask(a, n)).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while queued(a) < each - 1 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "A's builds did not queue: {}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    asked.extend((each..2 * each).map(|n| ask(b, n)));
    let mut answers = Vec::new();
    for t in asked {
        answers.push(
            t.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??,
        );
    }
    // 1 running + 30 waiting. B's first 11 fill the queue; then each of B's
    // takes the place of A's newest while A has more than one over B
    // (four); B's last five find them even and are turned away. All told
    // when to come back.
    let refused = |answers: &[Got]| {
        answers
            .iter()
            .filter(|g| g.status == StatusCode::TOO_MANY_REQUESTS)
            .count()
    };
    let statuses: Vec<StatusCode> = answers.iter().map(|g| g.status).collect();
    let (of_a, of_b) = answers.split_at(each);
    assert_eq!((refused(of_a), refused(of_b)), (4, 5), "{statuses:?}");
    assert!(
        answers
            .iter()
            .filter(|g| g.status == StatusCode::TOO_MANY_REQUESTS)
            .all(|g| g.header("retry-after") == "30" && g.body.contains("TOOMANYREQUESTS"))
    );
    assert!(
        answers
            .iter()
            .all(|g| g.status == StatusCode::OK || g.status == StatusCode::TOO_MANY_REQUESTS)
    );
    // The order builds started in: after A's first, B and A alternate for
    // as long as both wait.
    let log = server.log();
    let started: Vec<char> = log
        .lines()
        .filter(|l| l.contains("build started"))
        .filter_map(|l| match () {
            _ if l.contains(&format!("client={a}")) => Some('A'),
            _ if l.contains(&format!("client={b}")) => Some('B'),
            _ => None,
        })
        .collect();
    let order: String = started.iter().collect();
    eprintln!("fair: builds started in the order {order}");
    let (a_served, b_served) = (each - refused(of_a), each - refused(of_b));
    // A first; then, while both wait, one each; A's rest at the end.
    let alternating: String = std::iter::once('A')
        .chain((0..b_served).flat_map(|_| ['A', 'B']))
        .chain(std::iter::repeat_n('A', a_served - 1 - b_served))
        .collect();
    assert_eq!(order, alternating, "{log}");
    Ok(())
}
