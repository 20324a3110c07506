//! Deploying kontain itself: the Dockerfile, built by the local docker from
//! this checkout: its default image runs a `ko` and a `buildpack` pull with
//! the docker flags docs/deploy.md gives, and its `slim` image serves
//! `random`.
//!
//! The Dockerfile's bases live on Docker Hub and gcr.io, which this machine
//! cannot reach; the test builds the same Dockerfile against local stand-ins
//! passed as build arguments: a Debian minbase made by `debootstrap` (from
//! Debian's mirror), the same with this machine's Rust toolchain in it, and
//! a runtime base holding only the glibc and libgcc_s files that
//! distroless/cc has. The full image installs its packages from Debian's
//! mirror, as it would anywhere.

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
            "deploy::the_default_image_builds_with_ko_and_buildpack_and_the_slim_one_serves_random",
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

/// The stand-ins for `debian:12-slim`, `rust:1.95-bookworm` and
/// `distroless/cc-debian12`.
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
    import(docker, &rootfs, &[], "kontain-test/debian")?;
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
        .args(["--build-arg", "DEBIAN_IMAGE=kontain-test/debian"]);
    // The default target builds every stage; the slim one is then cached.
    run(build.args(["-t", "kontain-test/kontain"]).arg(&repo))?;
    let mut slim = docker.command();
    slim.env("DOCKER_BUILDKIT", "0")
        .args(["build", "--network", "host", "--quiet", "--target", "slim"])
        .args(["--build-arg", "RUST_IMAGE=kontain-test/rust"])
        .args(["--build-arg", "RUNTIME_IMAGE=kontain-test/runtime"])
        .args(["--build-arg", "DEBIAN_IMAGE=kontain-test/debian"])
        .args(["-t", "kontain-test/slim"])
        .arg(&repo);
    run(&mut slim)?;
    let size = |image: &str| -> u64 {
        docker
            .run(&["image", "inspect", "--format", "{{.Size}}", image])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
            >> 20
    };
    eprintln!(
        "deploy: images built in {:.0?}: default {} MB, slim {} MB",
        started.elapsed(),
        size("kontain-test/kontain"),
        size("kontain-test/slim")
    );
    slim_serves_random(docker)?;
    full_builds(docker)
}

/// Starts `image` as a platform would (PORT set, every interface), with
/// docker's `flags` and the server's `args`; its port and container id.
fn start(
    docker: &Docker,
    image: &str,
    flags: &[&str],
    args: &[&str],
) -> anyhow::Result<(u16, String)> {
    let port = free_port()?;
    let mut run = vec!["run", "-d", "--network", "host"];
    let env = format!("PORT={port}");
    run.extend(["-e", &env]);
    run.extend(flags);
    run.push(image);
    run.extend(args);
    let id = docker.run(&run)?.trim().to_owned();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            let logs = docker.run(&["logs", &id]).unwrap_or_default();
            let _ = docker.run(&["rm", "-f", &id]);
            anyhow::bail!("the container did not listen: {logs}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((port, id))
}

fn slim_serves_random(docker: &Docker) -> anyhow::Result<()> {
    let (port, id) = start(docker, "kontain-test/slim", &[], &[])?;
    let result = (|| -> anyhow::Result<()> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let reply = get(addr, "/v2/random/manifests/2x100")?;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        let image = format!("127.0.0.1:{port}/random:3x100");
        docker.run(&["pull", &image])?;
        assert_eq!(docker.layer_count(&image)?, 3);
        docker.run(&["rmi", &image])?;
        Ok(())
    })();
    let _ = docker.run(&["rm", "-f", &id]);
    result
}

/// The flags docs/deploy.md gives for the sandbox (user namespaces and a
/// /proc of its own).
const SANDBOX_FLAGS: [&str; 6] = [
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "apparmor=unconfined",
    "--security-opt",
    "systempaths=unconfined",
];

/// The default image, as its unprivileged user, builds a Go program from a
/// `file://` module proxy and a git repository with the test builder, both
/// mounted in (copies owned by that user: git refuses repositories of
/// others), bases and builder from the loopback registry.
fn full_builds(docker: &Docker) -> anyhow::Result<()> {
    // The suites' fixtures: modules, repositories, images in the registry.
    crate::ko::config(None)?;
    crate::buildpack::config()?;
    let registry = crate::mirror::world()?.registry.addr;
    let mounts = tempfile::tempdir()?;
    for (from, to) in [
        (crate::ko::proxy()?.dir.path(), "proxy"),
        (crate::buildpack::repos()?.root.path(), "repos"),
    ] {
        run(Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(mounts.path().join(to)))?;
    }
    std::fs::write(
        mounts.path().join("kontain.toml"),
        format!(
            "[storage]\npath = \"/var/lib/kontain/data\"\n\
             [upstream.registries.local]\nurl = \"http://{registry}\"\nallow_private = true\n\
             [go]\nproxies = [\"file:///mnt/proxy\"]\nsumdb = \"off\"\n\
             [buildpack]\ngit_url = \"file:///mnt/repos/{{owner}}/{{repo}}\"\n\
             [generators.ko]\nsource = \"builtin:ko\"\ngrants = [\"upstream\", \"go\"]\n\
             [generators.ko.settings]\nbase = \"local/busybox-ko:latest\"\nplatforms = \"linux/amd64\"\n\
             [generators.buildpack]\nsource = \"builtin:buildpack\"\ngrants = [\"upstream\", \"buildpack\"]\n\
             [generators.buildpack.settings]\nbuilder = \"local/bp-builder:latest\"\n"
        ),
    )?;
    run(Command::new("chown")
        .args(["-R", "65532:65532"])
        .arg(mounts.path()))?;
    let volume = format!("{}:/mnt:ro", mounts.path().display());
    let mut flags = SANDBOX_FLAGS.to_vec();
    flags.extend(["-v", &volume]);
    let (port, id) = start(
        docker,
        "kontain-test/kontain",
        &flags,
        &["--config", "/mnt/kontain.toml"],
    )?;
    let result = (|| -> anyhow::Result<()> {
        let ko = format!("127.0.0.1:{port}/ko/example.com/hello:v1.1.0");
        let output = docker.run_image(&ko)?;
        assert_eq!(
            output.trim(),
            "hello v1.1.0: hello from greeting; kodata says the kodata file"
        );
        let app = format!("127.0.0.1:{port}/buildpack/acme/app:main");
        let output = docker.run_image(&app)?;
        assert_eq!(output.trim(), crate::buildpack::EXPECTED);
        Ok(())
    })();
    if result.is_err() {
        eprintln!(
            "deploy: container log:\n{}",
            docker.run(&["logs", &id]).unwrap_or_default()
        );
    }
    let _ = docker.run(&["rm", "-f", &id]);
    result
}
