//! Expiry on the filesystem backend: what has not been used for the TTL
//! goes, manifests before blobs, and a blob that a live manifest refers to
//! stays however old it is.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use libtest_mimic::Trial;

use crate::mirror::world;
use crate::support::{Server, get, get_ok, trial};

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "expiry::unused_images_go_and_live_manifests_keep_their_blobs",
        expiry,
    )]
}

/// Every file of `dir` made `hours` old.
fn age(dir: &Path, hours: u32) -> anyhow::Result<()> {
    let status = Command::new("find")
        .arg(dir)
        .args(["-type", "f", "-exec", "touch", "-d"])
        .arg(format!("{hours} hours ago"))
        .args(["{}", "+"])
        .status()?;
    anyhow::ensure!(status.success(), "find/touch failed");
    Ok(())
}

/// The digests an image manifest refers to.
fn blobs_of(manifest: &serde_json::Value) -> Vec<String> {
    let mut out = vec![
        manifest["config"]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ];
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        out.push(layer["digest"].as_str().unwrap_or_default().to_owned());
    }
    out
}

/// Whether a blob is stored, as bytes or (random layers) as a recipe.
fn stored(data: &Path, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    ["blobs/sha256", "recipes/sha256"]
        .iter()
        .any(|dir| data.join(dir).join(hex).exists())
}

/// A config with storage in `data` (and `storage`'s settings), the mirror
/// on the test upstream, and random.
pub fn mirror_and_random(world: &crate::mirror::World, storage: &str) -> String {
    format!(
        "[storage]\nbackend = \"filesystem\"\npath = \"data\"\n{storage}\
         [upstream.registries.local]\nurl = \"http://{}\"\nallow_private = true\n\
         [generators.mirror]\nsource = \"builtin:mirror\"\ngrants = [\"upstream\"]\n\
         [generators.random]\nsource = \"builtin:random\"\ngrants = [\"random\"]\n",
        world.registry.addr
    )
}

fn expiry() -> anyhow::Result<()> {
    let world = world()?;
    let server = Server::start(Some(&mirror_and_random(
        world,
        "ttl = \"1h\"\ncollect_every = \"300ms\"\n",
    )))?;
    let data = server.dir.path().join("data");

    // A mirrored image, every blob fetched, and a random one.
    let live = get_ok(&server, "/v2/mirror/local/oci-image/manifests/v1")?;
    let live_digest = live.header("docker-content-digest").to_owned();
    let live_blobs = blobs_of(&live.json()?);
    for blob in &live_blobs {
        get_ok(&server, &format!("/v2/mirror/local/oci-image/blobs/{blob}"))?;
    }
    let dead = get_ok(&server, "/v2/random/manifests/2x1000")?;
    let dead_digest = dead.header("docker-content-digest").to_owned();
    let dead_blobs = blobs_of(&dead.json()?);
    assert!(dead_blobs.iter().all(|b| stored(&data, b)));

    // Two hours pass; then the mirrored image is pulled again by digest,
    // which marks its manifest used.
    age(&data, 2)?;
    get_ok(
        &server,
        &format!("/v2/mirror/local/oci-image/manifests/{live_digest}"),
    )?;
    // A blob made just now that nothing refers to yet (an image being built).
    let fresh = get_ok(&server, "/v2/random/manifests/1x10")?.json()?;
    let fresh_blobs = blobs_of(&fresh);

    let deadline = Instant::now() + Duration::from_secs(20);
    while stored(&data, &dead_blobs[1]) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "nothing expired:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(700));
    for blob in &dead_blobs {
        assert!(
            !stored(&data, blob),
            "an unused, expired blob stayed: {blob}"
        );
    }
    assert!(!stored(&data, &dead_digest), "the expired manifest stayed");
    for blob in &live_blobs {
        assert!(
            stored(&data, blob),
            "a blob of a live manifest went: {blob}"
        );
        get_ok(&server, &format!("/v2/mirror/local/oci-image/blobs/{blob}"))?;
    }
    for blob in &fresh_blobs {
        assert!(stored(&data, blob), "a young blob went: {blob}");
    }
    let gone = get(server.addr, &format!("/v2/random/blobs/{}", dead_blobs[1]))?;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert!(server.log().contains("expired unused storage"));
    Ok(())
}
