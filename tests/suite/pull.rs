//! The real binary, pulled from by real clients: Docker (a private dockerd)
//! and skopeo.

use std::io::Read;
use std::time::Duration;

use http::StatusCode;
use libtest_mimic::Trial;

use crate::support::{Server, docker, shared_server, skopeo, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "pull::docker_pulls_random_4x100_as_four_layers_of_one_100_byte_file",
            docker_4x100,
        ),
        trial(
            "pull::docker_pulls_the_default_10mb_random_image",
            docker_default,
        ),
        trial(
            "pull::skopeo_copies_random_3x1000_verifying_every_digest",
            skopeo_3x1000,
        ),
        trial(
            "pull::the_server_runs_with_the_built_in_config_when_none_is_given",
            built_in_config,
        ),
        trial(
            "pull::server_rss_stays_under_200mb_while_generating_1gb",
            rss_while_generating,
        ),
        trial(
            "pull::skopeo_inspect_lists_example_shapes_as_random_tags",
            inspect_tags,
        ),
    ]
}

fn inspect_tags() -> anyhow::Result<()> {
    let server = shared_server()?;
    let tags = crate::support::skopeo_repo_tags(&format!("{}/random:1x10", server.addr))?;
    assert_eq!(
        tags,
        serde_json::json!(["10x10000000", "1x10", "4x100", "4x1000000", "latest"]),
        "{tags}"
    );
    Ok(())
}

fn docker_4x100() -> anyhow::Result<()> {
    let server = shared_server()?;
    let docker = docker()?;
    let image = format!("{}/random:4x100", server.addr);
    docker.run(&["pull", &image])?;
    assert_eq!(docker.layer_count(&image)?, 4);

    let dir = tempfile::tempdir()?;
    let saved = dir.path().join("image.tar");
    docker.run(&["save", "-o", saved.to_str().unwrap_or_default(), &image])?;
    let mut archive = tar::Archive::new(std::fs::File::open(&saved)?);
    let mut layer_files = Vec::new();
    let mut manifest = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.display().to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        if path == "manifest.json" {
            manifest = Some(serde_json::from_slice::<serde_json::Value>(&bytes)?);
        } else if path.ends_with("layer.tar") || path.starts_with("blobs/") {
            layer_files.push((path, bytes));
        }
    }
    let manifest = manifest.ok_or_else(|| anyhow::anyhow!("docker save wrote no manifest.json"))?;
    let layers = manifest[0]["Layers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(layers.len(), 4);
    for layer in layers {
        let name = layer.as_str().unwrap_or_default();
        let (_, bytes) = layer_files
            .iter()
            .find(|(p, _)| p == name)
            .ok_or_else(|| anyhow::anyhow!("layer {name} missing from the saved image"))?;
        let mut inner = tar::Archive::new(&bytes[..]);
        let files: Vec<(String, u64)> = inner
            .entries()?
            .map(|e| {
                let e = e?;
                Ok((e.path()?.display().to_string(), e.header().size()?))
            })
            .collect::<anyhow::Result<_>>()?;
        assert_eq!(files.len(), 1, "layer {name}: {files:?}");
        assert_eq!(files[0].1, 100, "layer {name}: {files:?}");
        assert!(files[0].0.starts_with("random_file_"), "{files:?}");
    }
    docker.run(&["rmi", &image])?;
    Ok(())
}

fn docker_default() -> anyhow::Result<()> {
    let server = shared_server()?;
    let docker = docker()?;
    let image = format!("{}/random", server.addr);
    docker.run(&["pull", &image])?;
    let size = docker.run(&["image", "inspect", "--format", "{{.Size}}", &image])?;
    let size: u64 = size.trim().parse()?;
    assert!(
        (10_000_000..10_100_000).contains(&size),
        "image size {size}"
    );
    docker.run(&["rmi", &image])?;
    Ok(())
}

fn skopeo_3x1000() -> anyhow::Result<()> {
    let server = shared_server()?;
    let dir = tempfile::tempdir()?;
    let dest = format!("oci:{}:copied", dir.path().join("layout").display());
    let src = format!("docker://{}/random:3x1000", server.addr);
    skopeo(&["copy", "--src-tls-verify=false", &src, &dest])?;
    // skopeo checks every blob's digest while copying; the layout must also
    // hold the three layers.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("layout/index.json"))?)?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let hex = manifest_digest.trim_start_matches("sha256:");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(
        dir.path().join("layout/blobs/sha256").join(hex),
    )?)?;
    assert_eq!(manifest["layers"].as_array().map(Vec::len), Some(3));
    Ok(())
}

fn built_in_config() -> anyhow::Result<()> {
    let server = Server::start(None)?;
    let reply = server.head("/v2/random/manifests/1x10")?;
    assert_eq!(reply.status, StatusCode::OK, "log:\n{}", server.log());
    assert!(
        server.log().contains("(built-in default)"),
        "log:\n{}",
        server.log()
    );
    Ok(())
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/{pid}/status"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

fn rss_while_generating() -> anyhow::Result<()> {
    let server = Server::start(None)?;
    let reply = server.head("/v2/random/manifests/20x50000000")?;
    assert_eq!(reply.status, StatusCode::OK, "log:\n{}", server.log());
    let peak = peak_rss_kib(server.pid())?;
    println!(
        "peak RSS while generating random:20x50000000: {} MiB",
        peak / 1024
    );
    assert!(peak < 200 * 1024, "peak RSS {} MiB", peak / 1024);
    // Let the log settle so a failure above would show complete output.
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}
