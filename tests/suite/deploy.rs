//! Deploying kontain itself: the Dockerfile, built by the local docker from
//! this checkout, and the image it makes serving `random`.
//!
//! The Dockerfile's bases live on Docker Hub and gcr.io, which this machine
//! cannot reach; the test builds the same Dockerfile against local stand-ins
//! passed as build arguments: a Debian minbase made by `debootstrap` (from
//! Debian's mirror) with this machine's Rust toolchain in it, and a runtime
//! base holding only the glibc and libgcc_s files that distroless/cc has.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use http::StatusCode;
use libtest_mimic::Trial;

use crate::support::{Docker, docker, free_port, get, run, trial};

pub fn trials() -> Vec<Trial> {
    // The one slow trial (a whole build of kontain inside docker, ~15 min on
    // two cores): first in the list so that it overlaps the others, and
    // skippable for quick local runs.
    let skip = std::env::var_os("KONTAIN_SKIP_DOCKERFILE").is_some();
    vec![
        trial(
            "deploy::the_dockerfile_builds_and_its_image_serves_random",
            dockerfile,
        )
        .with_ignored_flag(skip),
    ]
}

/// `tar -C <root> -c . | docker import [changes] - <tag>`.
fn import(docker: &Docker, root: &Path, changes: &[&str], tag: &str) -> anyhow::Result<()> {
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut import = docker.command();
    import.arg("import");
    for change in changes {
        import.args(["--change", change]);
    }
    let stdout = tar.stdout.take().context("tar's stdout")?;
    let out = import
        .args(["-", tag])
        .stdin(stdout)
        .stderr(Stdio::piped())
        .output()?;
    anyhow::ensure!(tar.wait()?.success(), "tar of {} failed", root.display());
    anyhow::ensure!(
        out.status.success(),
        "docker import {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The stand-ins for `rust:1.95-bookworm` and `distroless/cc-debian12`.
fn base_images(docker: &Docker, repo: &Path, dir: &Path) -> anyhow::Result<()> {
    let rootfs = dir.join("rootfs");
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=gcc,libc6-dev,binutils,ca-certificates",
            "bookworm",
        ])
        .arg(&rootfs)
        .arg("http://deb.debian.org/debian"))?;
    // This machine's trust store: its egress may go through a proxy with
    // its own CA, which crates.io downloads in the build must accept.
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        rootfs.join("etc/ssl/certs/ca-certificates.crt"),
    )
    .context("copying the CA bundle")?;
    // The toolchain rust-toolchain.toml selects (wasm32-wasip2 included).
    let sysroot = run(Command::new("rustc")
        .args(["--print", "sysroot"])
        .current_dir(repo))?;
    let rust = rootfs.join("usr/local/rust");
    std::fs::create_dir_all(&rust)?;
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", sysroot.trim()))
        .arg(&rust))?;
    import(
        docker,
        &rootfs,
        &[
            "ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV CARGO_HOME=/usr/local/cargo",
        ],
        "kontain-test/rust",
    )?;

    let runtime = dir.join("runtime");
    for file in [
        "lib64/ld-linux-x86-64.so.2",
        "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "lib/x86_64-linux-gnu/libc.so.6",
        "lib/x86_64-linux-gnu/libm.so.6",
        "lib/x86_64-linux-gnu/libgcc_s.so.1",
        "etc/ssl/certs/ca-certificates.crt",
    ] {
        let to = runtime.join(file);
        std::fs::create_dir_all(to.parent().context("a parent")?)?;
        // Dereferenced: lib64's loader is a symlink into lib/.
        std::fs::copy(rootfs.join(file), &to).with_context(|| format!("copying {file}"))?;
    }
    std::fs::create_dir_all(runtime.join("tmp"))?;
    import(docker, &runtime, &[], "kontain-test/runtime")
}

fn dockerfile() -> anyhow::Result<()> {
    let docker = docker()?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the repository root")?
        .to_owned();
    let dir = tempfile::tempdir()?;
    base_images(docker, &repo, dir.path())?;

    let started = Instant::now();
    let mut build = docker.command();
    build
        // The Debian docker.io has no buildx: the classic builder.
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "--network", "host", "--quiet"])
        .args(["--build-arg", "RUST_IMAGE=kontain-test/rust"])
        .args(["--build-arg", "RUNTIME_IMAGE=kontain-test/runtime"])
        .args(["-t", "kontain-test/kontain"])
        .arg(&repo);
    run(&mut build)?;
    let size = docker.run(&[
        "image",
        "inspect",
        "--format",
        "{{.Size}}",
        "kontain-test/kontain",
    ])?;
    eprintln!(
        "deploy: image built in {:.0?}, {} MB",
        started.elapsed(),
        size.trim().parse::<u64>().unwrap_or(0) >> 20
    );

    // Run it as a platform would: PORT set, every interface.
    let port = free_port()?;
    let id = docker.run(&[
        "run",
        "-d",
        "--network",
        "host",
        "-e",
        &format!("PORT={port}"),
        "kontain-test/kontain",
    ])?;
    let id = id.trim().to_owned();
    let result = (|| -> anyhow::Result<()> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(addr).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the container did not listen: {}",
                docker.run(&["logs", &id]).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let reply = get(addr, "/v2/random/manifests/2x100")?;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        let image = format!("127.0.0.1:{port}/random:3x100");
        docker.run(&["pull", &image])?;
        assert_eq!(docker.layer_count(&image)?, 3);
        Ok(())
    })();
    let _ = docker.run(&["rm", "-f", &id]);
    result
}
