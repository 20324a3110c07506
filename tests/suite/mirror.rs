//! `mirror` against a real upstream (Debian's docker-registry) behind a
//! fault-injecting proxy, pulled by docker and skopeo.

use std::net::SocketAddr;
use std::sync::OnceLock;

use http::{Method, StatusCode};
use libtest_mimic::Trial;

use crate::support::images::{self, Entry, Image};
use crate::support::upstream::{ConnectionCounter, Proxy, UpstreamRegistry};
use crate::support::{
    ACCEPT_ALL, InProcess, Reply, Server, docker, get, http, kill, refused, sha256, skopeo,
    started_once, trial,
};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "mirror::docker_pulls_the_upstream_digest_and_runs_it",
            docker_pull_and_run,
        ),
        trial(
            "mirror::skopeo_copies_every_platform_of_an_index_unchanged",
            index_copy,
        ),
        trial(
            "mirror::docker_and_oci_media_types_are_served_unchanged",
            media_types,
        ),
        trial(
            "mirror::a_cached_tag_pulls_while_the_upstream_is_down",
            upstream_down,
        ),
        trial(
            "mirror::a_corrupted_blob_fails_the_pull_and_is_not_cached",
            corrupted_blob,
        ),
        trial(
            "mirror::ten_concurrent_cold_pulls_fetch_each_blob_once",
            concurrent_pulls,
        ),
        trial(
            "mirror::a_bearer_token_is_fetched_from_the_realm_and_reused",
            bearer_token,
        ),
        trial(
            "mirror::refusals_are_denied_before_any_connection",
            refusals,
        ),
        trial(
            "mirror::skopeo_lists_the_upstreams_250_tags_page_by_page_and_inspects_mirror_and_flatten",
            tag_list,
        ),
        trial(
            "mirror::the_upstreams_referrers_pass_through_from_its_fallback_tag",
            referrers,
        ),
    ]
}

/// The shared upstream registry, seeded once.
pub struct World {
    pub registry: UpstreamRegistry,
}

pub fn world() -> anyhow::Result<&'static World> {
    static WORLD: OnceLock<Result<World, String>> = OnceLock::new();
    started_once(&WORLD, seed, |world| kill(world.registry.pid()))
}

fn seed() -> anyhow::Result<World> {
    let registry = UpstreamRegistry::start()?;
    let dir = tempfile::tempdir()?;
    let busybox = dir.path().join("busybox");
    images::single(
        &busybox,
        "latest",
        &images::busybox(&["/bin/echo", "hello from the mirror"], "amd64")?,
    )?;
    registry.push(&busybox, "latest", "busybox", Some("v2s2"))?;

    let small = |content: &[u8]| -> anyhow::Result<Image> {
        Ok(Image {
            layers: vec![images::layer(&[
                Entry::Dir("etc"),
                Entry::File("etc/greeting", content, 0o644),
                Entry::Hardlink("etc/greeting.link", "etc/greeting"),
            ])?],
            cmd: vec!["/bin/true".into()],
            architecture: "amd64",
        })
    };
    let oci = dir.path().join("oci");
    images::single(&oci, "v1", &small(b"oci")?)?;
    registry.push(&oci, "v1", "oci-image", Some("oci"))?;

    let multi = dir.path().join("multi");
    let mut arm = small(b"arm64")?;
    arm.architecture = "arm64";
    // Stands for an attestation manifest, which indexes list as unknown/unknown.
    let mut attestation = small(b"attestation")?;
    attestation.architecture = "unknown";
    images::index(&multi, "latest", &[small(b"amd64")?, arm, attestation])?;
    registry.push(&multi, "latest", "multi", None)?;

    let layered = dir.path().join("layered");
    images::single(&layered, "v1", &crate::flatten::layered_image()?)?;
    registry.push(&layered, "v1", "layered", Some("oci"))?;

    let bomb = dir.path().join("bomb");
    let zeros = vec![0u8; 8 << 20];
    let bomb_image = Image {
        layers: vec![images::layer(&[Entry::File("zeros", &zeros, 0o644)])?],
        cmd: vec!["/bin/true".into()],
        architecture: "amd64",
    };
    images::single(&bomb, "v1", &bomb_image)?;
    registry.push(&bomb, "v1", "bomb", Some("oci"))?;
    Ok(World { registry })
}

/// `oci-image:v1` copied to the upstream repository `many` under 250 more
/// tags, once.
fn many_tags() -> anyhow::Result<()> {
    static MANY: OnceLock<Result<(), String>> = OnceLock::new();
    MANY.get_or_init(|| {
        let tag = || -> anyhow::Result<()> {
            let addr = world()?.registry.addr;
            skopeo(&[
                "copy",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
                &format!("docker://{addr}/oci-image:v1"),
                &format!("docker://{addr}/many:v1"),
            ])?;
            let manifest = http(
                addr,
                Method::GET,
                "/v2/many/manifests/v1",
                &[("accept", ACCEPT_ALL)],
            )?;
            let media_type = manifest.header("content-type").to_owned();
            for i in 0..250 {
                let put = crate::support::http_with_body(
                    addr,
                    Method::PUT,
                    &format!("/v2/many/manifests/t{i:03}"),
                    &[("content-type", &media_type)],
                    manifest.body.clone(),
                )?;
                anyhow::ensure!(
                    put.status == StatusCode::CREATED,
                    "PUT t{i:03}: {}",
                    put.status
                );
            }
            Ok(())
        };
        tag().map_err(|e| format!("{e:?}"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!("{e}"))
}

fn tag_list() -> anyhow::Result<()> {
    many_tags()?;
    let (_proxy, server) = proxied_mirror()?;
    let listed = skopeo(&[
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{}/mirror/local/many", server.addr),
    ])?;
    let listed: serde_json::Value = serde_json::from_str(&listed)?;
    let tags: Vec<&str> = listed["Tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str())
        .collect();
    let mut want: Vec<String> = (0..250).map(|i| format!("t{i:03}")).collect();
    want.push("v1".into());
    assert_eq!(tags, want);
    // skopeo sends no `n`: it got pages of 100 and followed their Links.
    let pages = server
        .log()
        .lines()
        .filter(|l| l.contains("/v2/mirror/local/many/tags/list") && l.contains("served"))
        .count();
    assert!(pages >= 3, "{pages} pages:\n{}", server.log());
    // Pages of the spec: `n`, `last`, and a Link while there is more.
    let mut path = "/v2/mirror/local/many/tags/list?n=100".to_owned();
    let mut pages = Vec::new();
    loop {
        let reply = get(server.addr, &path)?;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        pages.push(reply.json()?["tags"].as_array().map_or(0, Vec::len));
        let link = reply.header("link");
        if link.is_empty() {
            break;
        }
        let next = link.trim_start_matches('<');
        path = next[..next.find('>').unwrap_or(next.len())].to_owned();
        assert!(link.ends_with("rel=\"next\""), "{link}");
    }
    assert_eq!(pages, [100, 100, 51]);
    for name in ["mirror/local/many", "flatten/local/many"] {
        let out = skopeo(&[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{}/{name}:t007", server.addr),
        ])?;
        let out: serde_json::Value = serde_json::from_str(&out)?;
        assert_eq!(
            out["RepoTags"].as_array().map(Vec::len),
            Some(251),
            "{name}"
        );
    }
    Ok(())
}

fn referrers() -> anyhow::Result<()> {
    let registry = &world()?.registry;
    // An SBOM of oci-image:v1 in the upstream, which (distribution 2.8) has
    // no referrers API: clients push the spec's fallback tag, an index.
    let subject = upstream_digest(registry.addr, "oci-image", "v1")?;
    let subject_size = http(
        registry.addr,
        Method::GET,
        "/v2/oci-image/manifests/v1",
        &[("accept", ACCEPT_ALL)],
    )?
    .body
    .len();
    let empty = registry.push_blob("oci-image", b"{}")?;
    let document = br#"{"spdxVersion":"SPDX-2.3","name":"upstream sbom"}"#;
    let layer = registry.push_blob("oci-image", document)?;
    let kind = "application/spdx+json";
    let artifact = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": kind,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": kind, "digest": layer, "size": document.len()}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject, "size": subject_size},
    });
    let oci_manifest = "application/vnd.oci.image.manifest.v1+json";
    let artifact_size = serde_json::to_vec(&artifact)?.len();
    let artifact = registry.push_manifest("oci-image", "", oci_manifest, &artifact)?;
    let fallback = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": oci_manifest, "digest": artifact, "size": artifact_size, "artifactType": kind}],
    });
    let tag = subject.replace(':', "-");
    registry.push_manifest(
        "oci-image",
        &tag,
        "application/vnd.oci.image.index.v1+json",
        &fallback,
    )?;

    let (_proxy, server) = proxied_mirror()?;
    let path = format!(
        "/v2/mirror/local/oci-image/referrers/{subject}?artifactType={}",
        kind.replace('+', "%2B")
    );
    let listed = get(server.addr, &path)?;
    assert_eq!(listed.status, StatusCode::OK, "{:?}", listed.body);
    let listed = listed.json()?;
    assert_eq!(
        listed["manifests"][0]["digest"],
        artifact.as_str(),
        "{listed}"
    );
    assert_eq!(listed["manifests"][0]["artifactType"], kind);
    // And the artifact pulls through the mirror by digest.
    let pulled = get(
        server.addr,
        &format!("/v2/mirror/local/oci-image/manifests/{artifact}"),
    )?;
    assert_eq!(pulled.status, StatusCode::OK, "{:?}", pulled.body);
    // A digest nothing refers to: an empty index, not an error.
    let none = format!("sha256:{}", "0".repeat(64));
    let empty = get(
        server.addr,
        &format!("/v2/mirror/local/oci-image/referrers/{none}"),
    )?;
    assert_eq!(empty.json()?["manifests"], serde_json::json!([]));
    Ok(())
}

/// The upstream's own digest for `repo:tag`.
pub fn upstream_digest(addr: SocketAddr, repo: &str, tag: &str) -> anyhow::Result<String> {
    let reply = http(
        addr,
        Method::HEAD,
        &format!("/v2/{repo}/manifests/{tag}"),
        &[("accept", ACCEPT_ALL)],
    )?;
    anyhow::ensure!(
        reply.status == StatusCode::OK,
        "upstream HEAD {repo}:{tag}: {}",
        reply.status
    );
    Ok(reply.header("docker-content-digest").to_owned())
}

/// A kontain server mirroring through `proxy` as the named upstream `local`.
pub fn mirror_server(proxy: &Proxy) -> anyhow::Result<Server> {
    mirror_server_with(proxy, "20GiB")
}

/// A fresh proxy in front of the shared upstream, and a mirror server through
/// it: each trial gets its own, so that faults it injects and counts it
/// reads are its own.
pub fn proxied_mirror() -> anyhow::Result<(Proxy, Server)> {
    proxied_mirror_with("20GiB")
}

/// As [`proxied_mirror`], with the server's unpacking capped at `flatten_max`.
pub fn proxied_mirror_with(flatten_max: &str) -> anyhow::Result<(Proxy, Server)> {
    let proxy = Proxy::start(world()?.registry.addr)?;
    let server = mirror_server_with(&proxy, flatten_max)?;
    Ok((proxy, server))
}

/// Asserts that the upstream sent busybox's two blobs, its config and its
/// layer, once each however many pulls there were.
pub fn assert_busybox_fetched_once(proxy: &Proxy) {
    let counts = proxy.blob_gets();
    assert_eq!(counts.len(), 2, "a config and a layer: {counts:?}");
    assert!(
        counts.values().all(|n| *n == 1),
        "each blob fetched once: {counts:?}"
    );
}

/// As [`mirror_server`], with `flatten` too, its unpacking capped at `flatten_max`.
pub fn mirror_server_with(proxy: &Proxy, flatten_max: &str) -> anyhow::Result<Server> {
    Server::start(Some(&format!(
        "[storage]\nbackend = \"filesystem\"\npath = \"data\"\n\
         [upstream.registries.local]\nurl = \"http://{}\"\nallow_private = true\n\
         [generators.mirror]\nsource = \"builtin:mirror\"\ngrants = [\"upstream\"]\n\
         [generators.flatten]\nsource = \"builtin:flatten\"\ngrants = [\"upstream\", \"flatten\"]\n\
         [generators.flatten.limits]\nmax_bytes = \"{flatten_max}\"\n",
        proxy.addr
    )))
}

/// `skopeo copy` of `source` (`host/repo:tag`) into an OCI layout at `dest`;
/// `all` copies every platform with digests preserved.
fn pull_to_layout(source: &str, dest: &std::path::Path, all: bool) -> anyhow::Result<String> {
    let src = format!("docker://{source}");
    let dest = format!("oci:{}:x", dest.display());
    let mut args = vec!["copy", "--src-tls-verify=false"];
    if all {
        args.extend(["--all", "--preserve-digests"]);
    }
    args.extend([src.as_str(), dest.as_str()]);
    skopeo(&args)
}

fn head(server: &Server, path: &str) -> anyhow::Result<Reply> {
    http(server.addr, Method::HEAD, path, &[("accept", ACCEPT_ALL)])
}

fn docker_pull_and_run() -> anyhow::Result<()> {
    let (_proxy, server) = proxied_mirror()?;
    let docker = docker()?;
    let image = format!("{}/mirror/local/busybox:latest", server.addr);
    let pulled = docker.run(&["pull", &image])?;
    let want = upstream_digest(world()?.registry.addr, "busybox", "latest")?;
    assert!(
        pulled.contains(&want),
        "docker pull printed {pulled:?}, upstream digest {want}"
    );
    let output = docker.run_image(&image)?;
    assert_eq!(output.trim(), "hello from the mirror");
    Ok(())
}

fn index_copy() -> anyhow::Result<()> {
    let (_proxy, server) = proxied_mirror()?;
    let dir = tempfile::tempdir()?;
    let from_mirror = dir.path().join("mirror");
    let from_upstream = dir.path().join("upstream");
    pull_to_layout(
        &format!("{}/mirror/local/multi:latest", server.addr),
        &from_mirror,
        true,
    )?;
    pull_to_layout(
        &format!("{}/multi:latest", world()?.registry.addr),
        &from_upstream,
        true,
    )?;
    let index = |dir: &std::path::Path| -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(
            dir.join("index.json"),
        )?)?)
    };
    let (a, b) = (index(&from_mirror)?, index(&from_upstream)?);
    assert_eq!(
        a["manifests"][0]["digest"], b["manifests"][0]["digest"],
        "index digest"
    );
    let mut blobs_a: Vec<_> = std::fs::read_dir(from_mirror.join("blobs/sha256"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let mut blobs_b: Vec<_> = std::fs::read_dir(from_upstream.join("blobs/sha256"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    blobs_a.sort();
    blobs_b.sort();
    assert_eq!(
        blobs_a, blobs_b,
        "every platform's manifests, configs and layers, identical"
    );
    assert_eq!(
        blobs_a.len(),
        1 + 3 * 3,
        "an index, and a manifest, config and layer per platform"
    );
    Ok(())
}

fn media_types() -> anyhow::Result<()> {
    let world = world()?;
    let (proxy, server) = proxied_mirror()?;
    // A second server with nothing cached, asked by digest only.
    let by_digest_only = mirror_server(&proxy)?;
    for (repo, tag, media_type) in [
        (
            "busybox",
            "latest",
            "application/vnd.docker.distribution.manifest.v2+json",
        ),
        (
            "oci-image",
            "v1",
            "application/vnd.oci.image.manifest.v1+json",
        ),
        ("multi", "latest", "application/vnd.oci.image.index.v1+json"),
    ] {
        let reply = head(&server, &format!("/v2/mirror/local/{repo}/manifests/{tag}"))?;
        assert_eq!(reply.status, StatusCode::OK, "{repo}");
        assert_eq!(reply.header("content-type"), media_type, "{repo}");
        let digest = upstream_digest(world.registry.addr, repo, tag)?;
        assert_eq!(reply.header("docker-content-digest"), digest);
        // By digest, uncached: fetched from upstream by that digest.
        let by_digest = get(
            by_digest_only.addr,
            &format!("/v2/mirror/local/{repo}/manifests/{digest}"),
        )?;
        assert_eq!(by_digest.status, StatusCode::OK, "{repo}@{digest}");
        assert_eq!(sha256(&by_digest.body), digest);
    }
    Ok(())
}

fn upstream_down() -> anyhow::Result<()> {
    let (proxy, server) = proxied_mirror()?;
    let dir = tempfile::tempdir()?;
    let copy = |tag: &str, n: u32| {
        pull_to_layout(
            &format!("{}/mirror/local/{tag}", server.addr),
            &dir.path().join(format!("out{n}")),
            false,
        )
    };
    copy("oci-image:v1", 1)?;
    proxy.set_down(true);
    copy("oci-image:v1", 2)
        .map_err(|e| anyhow::anyhow!("a cached tag must pull while upstream is down: {e}"))?;
    copy("busybox:latest", 3).expect_err("an uncached tag cannot be served");
    let message = http(
        server.addr,
        Method::GET,
        "/v2/mirror/local/busybox/manifests/latest",
        &[],
    )?
    .expect_error(StatusCode::SERVICE_UNAVAILABLE, "MANIFEST_UNKNOWN")?;
    assert!(message.contains("unreachable"), "{message}");
    assert!(
        server.log().contains("serving the cached tag"),
        "the stale serve is logged"
    );
    Ok(())
}

fn corrupted_blob() -> anyhow::Result<()> {
    let (proxy, server) = proxied_mirror()?;
    let dir = tempfile::tempdir()?;
    let copy = |n: u32| {
        pull_to_layout(
            &format!("{}/mirror/local/oci-image:v1", server.addr),
            &dir.path().join(format!("out{n}")),
            false,
        )
    };
    proxy.set_corrupt_blobs(true);
    copy(1).expect_err("a corrupted blob must fail the pull");
    // What the client was told, first hand.
    let manifest = get(server.addr, "/v2/mirror/local/oci-image/manifests/v1")?;
    let layer = manifest.json()?["layers"][0]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let message = http(
        server.addr,
        Method::GET,
        &format!("/v2/mirror/local/oci-image/blobs/{layer}"),
        &[],
    )?
    .expect_error(StatusCode::SERVICE_UNAVAILABLE, "BLOB_UNKNOWN")?;
    assert!(
        message.contains("digest") && message.contains("nothing was cached"),
        "{message}"
    );
    let data = server.dir.path().join("data");
    assert_eq!(
        std::fs::read_dir(data.join("tmp"))?.count(),
        0,
        "no partial blob is left behind"
    );
    let stored = data
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    assert!(!stored.exists(), "the corrupt blob is not stored");
    proxy.set_corrupt_blobs(false);
    copy(2)?;
    assert!(stored.exists(), "the good blob is cached");
    Ok(())
}

fn concurrent_pulls() -> anyhow::Result<()> {
    let (proxy, server) = proxied_mirror()?;
    let dir = tempfile::tempdir()?;
    std::thread::scope(|s| {
        let pulls: Vec<_> = (0..10)
            .map(|n| {
                let dest = dir.path().join(format!("out{n}"));
                let src = format!("{}/mirror/local/busybox:latest", server.addr);
                s.spawn(move || pull_to_layout(&src, &dest, false))
            })
            .collect();
        for pull in pulls {
            pull.join()
                .map_err(|_| anyhow::anyhow!("a pull thread panicked"))??;
        }
        anyhow::Ok(())
    })?;
    assert_busybox_fetched_once(&proxy);
    Ok(())
}

fn refusals() -> anyhow::Result<()> {
    let world = world()?;
    let proxy = Proxy::start(world.registry.addr)?;
    let forbidden = ConnectionCounter::start()?;
    let r = InProcess::new(&format!(
        "[upstream]\nallow = [\"localhost\", \"registry-1.docker.io\"]\n\
         [upstream.registries.local]\nurl = \"http://{}\"\nallow_private = true\n\
         [generators.mirror]\nsource = \"builtin:mirror\"\ngrants = [\"upstream\"]\n\
         [generators.narrow]\nsource = \"builtin:mirror\"\ngrants = [\"upstream\"]\nupstreams = [\"docker.io\"]\n",
        proxy.addr
    ))?;
    for (path, rule) in [
        (
            "/v2/mirror/example.com/x/manifests/latest",
            "not on the upstream allowlist",
        ),
        (
            "/v2/mirror/169.254.169.254/x/manifests/latest",
            "not on the upstream allowlist",
        ),
        (
            "/v2/mirror/localhost/x/manifests/latest",
            "loopback, private",
        ),
    ] {
        let message = r.refused(path, StatusCode::FORBIDDEN, "DENIED")?;
        assert!(message.contains(rule), "{path}: {message}");
    }
    // A generator's own registry allowlist is enforced at run time.
    let message = r.refused(
        "/v2/narrow/local/oci-image/manifests/v1",
        StatusCode::FORBIDDEN,
        "DENIED",
    )?;
    assert!(
        message.contains("may not reach the registry \"local\""),
        "{message}"
    );
    // A redirect from the allowed upstream to a loopback address is refused
    // before it is followed.
    let manifest = r.request(
        Method::GET,
        "/v2/mirror/local/oci-image/manifests/v1",
        &[("accept", ACCEPT_ALL)],
    )?;
    assert_eq!(manifest.status, StatusCode::OK);
    let layer = manifest.json()?["layers"][0]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    proxy.redirect_blobs_to(Some(format!("http://localhost:{}", forbidden.addr.port())));
    r.refused(
        &format!("/v2/mirror/local/oci-image/blobs/{layer}"),
        StatusCode::FORBIDDEN,
        "DENIED",
    )?;
    proxy.redirect_blobs_to(Some(format!("http://127.0.0.1:{}", forbidden.addr.port())));
    let reply = r.get(&format!("/v2/mirror/local/oci-image/blobs/{layer}"))?;
    assert_eq!(
        reply.status,
        StatusCode::FORBIDDEN,
        "another port of the allowed host is not allowed"
    );
    assert_eq!(forbidden.connections(), 0, "no connection was attempted");
    Ok(())
}

fn bearer_token() -> anyhow::Result<()> {
    let world = world()?;
    let proxy = Proxy::start(world.registry.addr)?;
    proxy.require_token(Some(format!("http://{}/token", proxy.addr)));
    let server = mirror_server(&proxy)?;
    let dir = tempfile::tempdir()?;
    pull_to_layout(
        &format!("{}/mirror/local/oci-image:v1", server.addr),
        &dir.path().join("out"),
        false,
    )?;
    assert_eq!(
        proxy.tokens_issued(),
        1,
        "one token, reused for the manifest and blobs"
    );

    // A realm the policy forbids is refused like any other connection.
    let forbidden = ConnectionCounter::start()?;
    proxy.require_token(Some(format!(
        "http://localhost:{}/token",
        forbidden.addr.port()
    )));
    let fresh = mirror_server(&proxy)?;
    let message = refused(
        fresh.addr,
        "/v2/mirror/local/oci-image/manifests/v1",
        StatusCode::FORBIDDEN,
        "DENIED",
    )?;
    assert!(message.contains("localhost"), "{message}");
    assert_eq!(forbidden.connections(), 0);
    Ok(())
}
