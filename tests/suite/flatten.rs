//! `flatten` against the mirror tests' upstream: whiteouts, opaque
//! directories, hardlinks and symlinks; indexes; determinism; tar bombs.

use std::collections::BTreeMap;
use std::io::Read;

use http::StatusCode;
use libtest_mimic::Trial;

use crate::mirror::{mirror_server, proxied_mirror, proxied_mirror_with, world};
use crate::support::images::{self, Entry, Image};
use crate::support::{Server, docker, get_blob, get_ok, refused, sha256, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "flatten::one_layer_holds_the_merged_tree_and_runs",
            merged_tree,
        ),
        trial(
            "flatten::an_index_keeps_its_platforms_with_new_sizes_and_drops_attestations",
            index,
        ),
        trial(
            "flatten::the_same_source_always_gives_the_same_digest",
            deterministic,
        ),
        trial(
            "flatten::a_tar_bomb_is_refused_with_a_clear_error",
            tar_bomb,
        ),
    ]
}

/// Three layers over busybox: a deleted file, an opaque directory, a
/// hardlink, a symlink and an overwritten file.
pub fn layered_image() -> anyhow::Result<Image> {
    let mut image = images::busybox(
        &["/bin/cat", "/etc/keep", "/etc/data.hard", "/etc/link"],
        "amd64",
    )?;
    image.layers.push(images::layer(&[
        Entry::Dir("etc"),
        Entry::File("etc/keep", b"keep v1\n", 0o644),
        Entry::File("etc/gone", b"gone\n", 0o644),
        Entry::Dir("var"),
        Entry::Dir("var/cache"),
        Entry::File("var/cache/old", b"old\n", 0o644),
    ])?);
    image.layers.push(images::layer(&[
        Entry::Dir("etc"),
        Entry::File("etc/.wh.gone", b"", 0o644),
        Entry::File("etc/data", b"data\n", 0o644),
        Entry::Hardlink("etc/data.hard", "etc/data"),
        Entry::Symlink("etc/link", "keep"),
        Entry::Dir("var/cache"),
        Entry::File("var/cache/.wh..wh..opq", b"", 0o644),
        Entry::File("var/cache/new", b"new\n", 0o644),
    ])?);
    image.layers.push(images::layer(&[
        Entry::Dir("etc"),
        Entry::File("etc/keep", b"keep v2\n", 0o644),
        // Replaces the target of a lower layer's hardlink: the link keeps
        // the content it had, as a runtime unpacking the layers has it.
        Entry::File("etc/data", b"data v2\n", 0o644),
        Entry::Raw("../escaped", b"outside\n"),
        Entry::Raw("etc/../../escaped-too", b"outside\n"),
    ])?);
    Ok(image)
}

/// Entry type and content (or link target) per path of a gzipped layer.
pub fn tree(gzipped: &[u8]) -> anyhow::Result<BTreeMap<String, (char, Vec<u8>)>> {
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(gzipped).read_to_end(&mut tar)?;
    let mut out = BTreeMap::new();
    for entry in tar::Archive::new(&tar[..]).entries()? {
        let mut entry = entry?;
        let path = entry
            .path()?
            .display()
            .to_string()
            .trim_end_matches('/')
            .to_owned();
        let kind = entry.header().entry_type();
        let mut content = Vec::new();
        let tag = match kind {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name()?
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                content = target.into_bytes();
                if kind == tar::EntryType::Link {
                    'h'
                } else {
                    'l'
                }
            }
            _ => {
                entry.read_to_end(&mut content)?;
                'f'
            }
        };
        out.insert(path, (tag, content));
    }
    Ok(out)
}

fn merged_tree() -> anyhow::Result<()> {
    let (_proxy, server) = proxied_mirror()?;
    let manifest = get_ok(&server, "/v2/flatten/local/layered/manifests/v1")?.json()?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    let layer_digest = layers[0]["digest"].as_str().unwrap_or_default();
    let blob = get_ok(
        &server,
        &format!("/v2/flatten/local/layered/blobs/{layer_digest}"),
    )?;
    assert_eq!(sha256(&blob.body), layer_digest);
    let files = tree(&blob.body)?;
    let file = |p: &str| files.get(p).cloned();
    assert_eq!(
        file("etc/keep"),
        Some(('f', b"keep v2\n".to_vec())),
        "the upper layer wins"
    );
    assert_eq!(file("etc/gone"), None, "a whiteout deletes");
    assert!(
        files.keys().all(|p| !p.contains(".wh.")),
        "whiteouts are not emitted"
    );
    assert_eq!(
        file("var/cache/old"),
        None,
        "an opaque directory hides lower content"
    );
    assert_eq!(file("var/cache/new"), Some(('f', b"new\n".to_vec())));
    assert_eq!(
        file("etc/data.hard"),
        Some(('f', b"data\n".to_vec())),
        "a link whose target was replaced above keeps the old content"
    );
    assert_eq!(
        file("etc/link"),
        Some(('l', b"keep".to_vec())),
        "symlink kept"
    );
    assert!(matches!(file("bin/busybox"), Some(('f', _))));
    assert!(
        files.keys().all(|p| !p.contains("escaped")),
        "entries leaving the root are dropped: {:?}",
        files.keys().collect::<Vec<_>>()
    );

    // The config is kept, with the new rootfs and a history naming the source.
    let config = get_blob(&server, "flatten/local/layered", &manifest["config"])?.json()?;
    let diff_id = {
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&blob.body[..]).read_to_end(&mut tar)?;
        sha256(&tar)
    };
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([diff_id]));
    assert_eq!(config["config"]["Env"], serde_json::json!(["PATH=/bin"]));
    assert_eq!(config["architecture"], "amd64");
    let source = crate::mirror::upstream_digest(world()?.registry.addr, "layered", "v1")?;
    let comment = config["history"][0]["comment"].as_str().unwrap_or_default();
    assert!(
        comment.contains(&source),
        "history names the source: {comment}"
    );

    let docker = docker()?;
    let image = format!("{}/flatten/local/layered:v1", server.addr);
    docker.run(&["pull", &image])?;
    assert_eq!(docker.layer_count(&image)?, 1);
    let output = docker.run_image(&image)?;
    assert_eq!(output, "keep v2\ndata\nkeep v2\n");
    Ok(())
}

fn index() -> anyhow::Result<()> {
    let (_proxy, server) = proxied_mirror()?;
    let index = get_ok(&server, "/v2/flatten/local/multi/manifests/latest")?;
    assert_eq!(
        index.header("content-type"),
        "application/vnd.oci.image.index.v1+json"
    );
    let index = index.json()?;
    let children = index["manifests"].as_array().cloned().unwrap_or_default();
    let platforms: Vec<_> = children
        .iter()
        .map(|c| c["platform"]["architecture"].clone())
        .collect();
    assert_eq!(
        platforms,
        vec!["amd64", "arm64"],
        "both platforms, attestation dropped"
    );
    for child in children {
        let digest = child["digest"].as_str().unwrap_or_default();
        let manifest = get_ok(
            &server,
            &format!("/v2/flatten/local/multi/manifests/{digest}"),
        )?;
        assert_eq!(sha256(&manifest.body), digest);
        assert_eq!(child["size"], manifest.body.len(), "the child's new size");
        assert_eq!(manifest.json()?["layers"].as_array().map(Vec::len), Some(1));
        sbom(&server, "flatten/local/multi", digest)?;
    }
    // The index's SBOM names the upstream index it was made from.
    let digest = index_digest(&server)?;
    let (_, document) = sbom(&server, "flatten/local/multi", &digest)?;
    let upstream = crate::mirror::upstream_digest(world()?.registry.addr, "multi", "latest")?;
    let source = document["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["SPDXID"] == "SPDXRef-Source")
        .cloned()
        .unwrap_or_default();
    assert_eq!(source["versionInfo"], upstream.as_str(), "{document}");
    Ok(())
}

fn index_digest(server: &Server) -> anyhow::Result<String> {
    Ok(get_ok(server, "/v2/flatten/local/multi/manifests/latest")?
        .header("docker-content-digest")
        .to_owned())
}

/// The one SPDX SBOM the referrers API lists for `digest` under `name`:
/// its artifact digest and its document, checked by SPDX's validator.
fn sbom(server: &Server, name: &str, digest: &str) -> anyhow::Result<(String, serde_json::Value)> {
    let listed = get_ok(server, &format!("/v2/{name}/referrers/{digest}"))?.json()?;
    let manifests = listed["manifests"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(manifests.len() == 1, "one SBOM for {digest}: {listed}");
    let artifact = manifests[0]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let manifest = get_ok(server, &format!("/v2/{name}/manifests/{artifact}"))?.json()?;
    assert_eq!(manifest["subject"]["digest"], digest);
    let body = get_blob(server, name, &manifest["layers"][0])?.body;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("flatten.spdx.json"), &body)?;
    crate::support::validate_spdx(&dir.path().join("flatten.spdx.json"))?;
    Ok((artifact, serde_json::from_slice(&body)?))
}

fn deterministic() -> anyhow::Result<()> {
    let digest = |server: &Server| -> anyhow::Result<String> {
        Ok(get_ok(server, "/v2/flatten/local/layered/manifests/v1")?
            .header("docker-content-digest")
            .to_owned())
    };
    let (proxy, first) = proxied_mirror()?;
    let a = digest(&first)?;
    assert_eq!(digest(&first)?, a, "a repeated pull");
    let second = mirror_server(&proxy)?;
    assert_eq!(digest(&second)?, a, "another server with empty storage");
    // And so is its SBOM.
    let name = "flatten/local/layered";
    assert_eq!(sbom(&first, name, &a)?.0, sbom(&second, name, &a)?.0);
    Ok(())
}

fn tar_bomb() -> anyhow::Result<()> {
    let (_proxy, server) = proxied_mirror_with("4MiB")?;
    let message = refused(
        server.addr,
        "/v2/flatten/local/bomb/manifests/v1",
        StatusCode::FORBIDDEN,
        "DENIED",
    )?;
    assert!(
        message.contains("more than the limit of 4194304 bytes"),
        "{message}"
    );
    let data = server.dir.path().join("data");
    assert_eq!(
        std::fs::read_dir(data.join("tmp"))?.count(),
        0,
        "no partial layer is left behind"
    );
    Ok(())
}
