//! The Google Cloud Storage backend against a real emulator: pulls by real
//! clients through redirects to the bucket, replicas sharing one bucket
//! doing each piece of work once, a replica killed mid-work whose lease
//! another replica takes over, and expiry over the bucket.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use libtest_mimic::Trial;

use crate::mirror::{assert_busybox_fetched_once, world};
use crate::support::gcs::{FakeGcs, fake_gcs};
use crate::support::images::{self, Entry, Image};
use crate::support::upstream::Proxy;
use crate::support::{Server, docker, get, get_ok, http, sha256, skopeo, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "gcs::docker_and_skopeo_pull_through_redirects_to_the_bucket",
            pulls,
        ),
        trial(
            "gcs::three_replicas_fetch_each_upstream_blob_once_for_fifteen_pulls",
            replicas,
        ),
        trial(
            "gcs::a_killed_replicas_lease_expires_and_another_replica_finishes",
            takeover,
        ),
        trial(
            "gcs::expiry_keeps_a_layer_a_newer_image_shares_until_that_image_expires",
            expiry,
        ),
    ]
}

/// A server on `bucket`/`prefix` with `random` and a mirror of `upstream`.
fn server(
    gcs: &FakeGcs,
    bucket: &str,
    prefix: &str,
    upstream: SocketAddr,
    gcs_extra: &str,
) -> anyhow::Result<Server> {
    let config = format!(
        "{}\
         [upstream.registries.local]\nurl = \"http://{upstream}\"\nallow_private = true\n\
         [generators.mirror]\nsource = \"builtin:mirror\"\ngrants = [\"upstream\"]\n\
         [generators.random]\nsource = \"builtin:random\"\ngrants = [\"random\"]\n",
        gcs.storage_config(bucket, prefix, gcs_extra)
    );
    Server::start(Some(&config))
}

/// The path and query of an absolute `http://host:port/...` URL at `host`.
fn at(url: &str, host: SocketAddr) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix(&format!("http://{host}"))
        .ok_or_else(|| anyhow::anyhow!("{url} is not on {host}"))?;
    Ok(rest.to_owned())
}

fn first_layer(manifest: &serde_json::Value) -> String {
    manifest["layers"][0]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn pulls() -> anyhow::Result<()> {
    let gcs = fake_gcs()?;
    let world = world()?;
    gcs.create_bucket("kontain-pulls")?;
    let server = server(gcs, "kontain-pulls", "a/", world.registry.addr, "")?;

    // A blob GET is a redirect to a V4 signed URL on the emulator.
    let manifest = get_ok(&server, "/v2/random/manifests/2x1000")?.json()?;
    let layer = first_layer(&manifest);
    let reply = get(server.addr, &format!("/v2/random/blobs/{layer}"))?;
    assert_eq!(
        reply.status,
        StatusCode::TEMPORARY_REDIRECT,
        "{:?}",
        reply.body
    );
    let location = reply.header("location").to_owned();
    let hex = layer.trim_start_matches("sha256:");
    let path = at(&location, gcs.addr)?;
    assert!(
        path.starts_with(&format!("/kontain-pulls/a/blobs/sha256/{hex}?")),
        "{location}"
    );
    assert!(
        path.contains("X-Goog-Algorithm=GOOG4-RSA-SHA256"),
        "{location}"
    );
    assert!(path.contains("X-Goog-Signature="), "{location}");
    let bytes = get(gcs.addr, &path)?;
    assert_eq!(bytes.status, StatusCode::OK);
    // A hot blob is signed once per half TTL, not per download.
    let again = get(server.addr, &format!("/v2/random/blobs/{layer}"))?;
    assert_eq!(again.header("location"), location);
    assert_eq!(sha256(&bytes.body), layer);

    // Real clients follow the redirects.
    let docker = docker()?;
    let random = format!("{}/random:4x100", server.addr);
    docker.run(&["pull", &random])?;
    assert_eq!(docker.layer_count(&random)?, 4);
    let busybox = format!("{}/mirror/local/busybox", server.addr);
    let out = docker.run(&["run", "--rm", &busybox])?;
    assert!(out.contains("hello from the mirror"), "{out}");
    let dir = tempfile::tempdir()?;
    let dest = format!("oci:{}:x", dir.path().display());
    let source = format!("docker://{}/mirror/local/multi:latest", server.addr);
    skopeo(&[
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        &source,
        &dest,
    ])?;

    // Everything is in the bucket; the replica's own directory holds no
    // image data.
    let objects = gcs.objects("kontain-pulls", "a/")?;
    assert!(
        objects
            .iter()
            .any(|(n, _)| n.starts_with("a/manifests/sha256/"))
    );
    assert!(
        objects
            .iter()
            .any(|(n, _)| n == &format!("a/blobs/sha256/{hex}"))
    );
    let spool = server.dir.path().join("local/spool");
    assert_eq!(
        std::fs::read_dir(&spool)?.count(),
        0,
        "upload spool left files"
    );
    assert!(!server.dir.path().join("local/blobs").exists());

    // Another replica on the bucket: public URLs; a third streams itself.
    let public = self::server(
        gcs,
        "kontain-pulls",
        "a/",
        world.registry.addr,
        &format!(
            "redirect = \"public\"\npublic_url = \"http://{}\"",
            gcs.addr
        ),
    )?;
    let reply = get(public.addr, &format!("/v2/random/blobs/{layer}"))?;
    assert_eq!(reply.status, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        reply.header("location"),
        format!("http://{}/kontain-pulls/a/blobs/sha256/{hex}", gcs.addr)
    );
    let streaming = self::server(
        gcs,
        "kontain-pulls",
        "a/",
        world.registry.addr,
        "redirect = \"none\"",
    )?;
    let whole = get(streaming.addr, &format!("/v2/random/blobs/{layer}"))?;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body, bytes.body);
    let part = http(
        streaming.addr,
        Method::GET,
        &format!("/v2/random/blobs/{layer}"),
        &[("range", "bytes=10-19")],
    )?;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body, bytes.body.slice(10..20));
    Ok(())
}

fn replicas() -> anyhow::Result<()> {
    let gcs = fake_gcs()?;
    let world = world()?;
    gcs.create_bucket("kontain-replicas")?;
    let proxy = Proxy::start(world.registry.addr)?;
    let servers = (0..3)
        .map(|_| server(gcs, "kontain-replicas", "r/", proxy.addr, ""))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let dirs = (0..15)
        .map(|_| tempfile::tempdir())
        .collect::<Result<Vec<_>, _>>()?;
    // Five concurrent skopeo pulls through each replica, all at once.
    let pulls: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let source = format!(
                "docker://{}/mirror/local/busybox:latest",
                servers[i % 3].addr
            );
            let dest = format!("dir:{}", dir.path().display());
            std::thread::spawn(move || skopeo(&["copy", "--src-tls-verify=false", &source, &dest]))
        })
        .collect();
    for pull in pulls {
        pull.join()
            .map_err(|_| anyhow::anyhow!("a pull panicked"))??;
    }
    let digests = dirs
        .iter()
        .map(|d| Ok(sha256(&std::fs::read(d.path().join("manifest.json"))?)))
        .collect::<anyhow::Result<std::collections::BTreeSet<_>>>()?;
    assert_eq!(digests.len(), 1, "fifteen pulls, one digest: {digests:?}");
    let upstream = crate::mirror::upstream_digest(world.registry.addr, "busybox", "latest")?;
    assert_eq!(digests.first(), Some(&upstream));
    assert_busybox_fetched_once(&proxy);
    Ok(())
}

fn takeover() -> anyhow::Result<()> {
    let gcs = fake_gcs()?;
    let world = world()?;
    gcs.create_bucket("kontain-leases")?;
    // An image whose layer takes the upstream ~5 s to send.
    let dir = tempfile::tempdir()?;
    let noise: Vec<u8> = (0..(2 << 20)).map(|_| rand::random::<u8>()).collect();
    let image = Image {
        layers: vec![images::layer(&[Entry::File("noise", &noise, 0o644)])?],
        cmd: vec!["/bin/true".into()],
        architecture: "amd64",
    };
    images::single(&dir.path().join("slow"), "v1", &image)?;
    world
        .registry
        .push(&dir.path().join("slow"), "v1", "slow", Some("oci"))?;
    let proxy = Proxy::start(world.registry.addr)?;
    let extra = "lease_ttl = \"5s\"";
    let mut a = server(gcs, "kontain-leases", "l/", proxy.addr, extra)?;
    let b = server(gcs, "kontain-leases", "l/", proxy.addr, extra)?;
    let manifest = get_ok(&a, "/v2/mirror/local/slow/manifests/v1")?.json()?;
    let layer = first_layer(&manifest);
    let object = format!("l/blobs/sha256/{}", layer.trim_start_matches("sha256:"));
    let blob_path = format!("/v2/mirror/local/slow/blobs/{layer}");
    proxy.set_slow_blobs(Some(Duration::from_millis(600)));

    // Replica A starts the download; B is asked for the same blob and waits
    // on A's lease; A dies mid-transfer.
    let (a_addr, b_addr) = (a.addr, b.addr);
    let path = blob_path.clone();
    let _on_a = std::thread::spawn(move || get(a_addr, &path));
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.blob_gets().get(&layer).copied().unwrap_or(0) == 0 {
        anyhow::ensure!(Instant::now() < deadline, "A never asked the upstream");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1500)); // a few pieces in
    let path = blob_path.clone();
    let on_b = std::thread::spawn(move || get(b_addr, &path));
    std::thread::sleep(Duration::from_millis(300));
    a.kill();

    // Until B is done, the bucket holds no object for the blob, or the
    // whole, verified one: never a part.
    let size = manifest["layers"][0]["size"].as_u64().unwrap_or(0);
    while !on_b.is_finished() {
        for (name, len) in gcs.objects("kontain-leases", &object)? {
            assert_eq!(len, size, "{name} is readable with {len} of {size} bytes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let reply = on_b
        .join()
        .map_err(|_| anyhow::anyhow!("B's request panicked"))??;
    // B streams its own download as it arrives (the bucket gets it once it
    // is whole and verified).
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{:?}\n{}",
        reply.body,
        b.log()
    );
    assert_eq!(sha256(&reply.body), layer);
    // Once it is uploaded, clients are sent to the bucket's copy (until
    // then, they read it here).
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        let reply = get(b.addr, &blob_path)?;
        if reply.status != StatusCode::OK || Instant::now() > deadline {
            break reply;
        }
        assert_eq!(sha256(&reply.body), layer);
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        reply.status,
        StatusCode::TEMPORARY_REDIRECT,
        "{:?}",
        reply.body
    );
    let bytes = get(gcs.addr, &at(reply.header("location"), gcs.addr)?)?;
    assert_eq!(sha256(&bytes.body), layer);
    assert_eq!(
        proxy.blob_gets().get(&layer).copied(),
        Some(2),
        "A's broken transfer and B's"
    );
    let log = b.log();
    assert!(log.contains("took over a lease"), "{log}");
    Ok(())
}

/// Every digest an image manifest names: its config and layers.
fn blobs_of(manifest: &serde_json::Value) -> Vec<String> {
    let layers = manifest["layers"].as_array().into_iter().flatten();
    std::iter::once(&manifest["config"])
        .chain(layers)
        .filter_map(|d| d["digest"].as_str().map(str::to_owned))
        .collect()
}

fn expiry() -> anyhow::Result<()> {
    let gcs = fake_gcs()?;
    let world = world()?;
    gcs.create_bucket("kontain-expiry")?;
    // Images A and B share their first layer; B is pushed later.
    let dir = tempfile::tempdir()?;
    let shared = images::layer(&[Entry::File("shared", b"in both images", 0o644)])?;
    for (name, own) in [("expiry-a", &b"only in a"[..]), ("expiry-b", b"only in b")] {
        let image = Image {
            layers: vec![
                shared.clone(),
                images::layer(&[Entry::File("own", own, 0o644)])?,
            ],
            cmd: vec!["/bin/true".into()],
            architecture: "amd64",
        };
        images::single(&dir.path().join(name), "v1", &image)?;
        world
            .registry
            .push(&dir.path().join(name), "v1", name, Some("oci"))?;
    }
    let proxy = Proxy::start(world.registry.addr)?;
    let storage = gcs.storage_config("kontain-expiry", "e/", "").replacen(
        "[storage]\n",
        "[storage]\nttl = \"3s\"\ncollect_every = \"300ms\"\n",
        1,
    );
    let server = Server::start(Some(&format!(
        "{storage}[upstream.registries.local]\nurl = \"http://{}\"\nallow_private = true\n\
         [generators.mirror]\nsource = \"builtin:mirror\"\ngrants = [\"upstream\"]\n",
        proxy.addr
    )))?;
    let pull = |image: &str| -> anyhow::Result<(String, Vec<String>)> {
        let reply = get_ok(&server, &format!("/v2/mirror/local/{image}/manifests/v1"))?;
        let blobs = blobs_of(&reply.json()?);
        for blob in &blobs {
            let redirect = get(
                server.addr,
                &format!("/v2/mirror/local/{image}/blobs/{blob}"),
            )?;
            let bytes = get(gcs.addr, &at(redirect.header("location"), gcs.addr)?)?;
            assert_eq!(&sha256(&bytes.body), blob, "{image}: {blob}");
        }
        Ok((reply.header("docker-content-digest").to_owned(), blobs))
    };
    let stored = |digest: &str| -> anyhow::Result<bool> {
        let name = format!("e/blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        Ok(gcs
            .objects("kontain-expiry", &name)?
            .iter()
            .any(|(n, _)| *n == name))
    };
    let (a, a_blobs) = pull("expiry-a")?;
    std::thread::sleep(Duration::from_millis(1500));
    let (b, b_blobs) = pull("expiry-b")?;
    let layer = a_blobs[1].clone();
    assert!(b_blobs.contains(&layer), "A and B share {layer}");
    // B stays in use (pulled by digest) until A's manifest has expired.
    let a_manifest = format!("e/manifests/sha256/{}", a.trim_start_matches("sha256:"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !gcs.objects("kontain-expiry", &a_manifest)?.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "A never expired:\n{}",
            server.log()
        );
        get_ok(&server, &format!("/v2/mirror/local/expiry-b/manifests/{b}"))?;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(stored(&layer)?, "the layer B still uses went with A");
    pull("expiry-b")?;
    assert_eq!(
        proxy.blob_gets().get(&layer).copied(),
        Some(1),
        "B pulled completely without fetching the shared layer again"
    );
    // Once B is unused for the TTL too, the layer leaves the bucket.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored(&layer)? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the layer never expired:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(server.log().contains("expired unused storage"));
    Ok(())
}
