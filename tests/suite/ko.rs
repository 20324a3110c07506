//! `ko` with real parts: Debian's Go toolchain, a module proxy the test
//! writes in GOPROXY layout (served as `file://`), a two-platform busybox
//! base index in the local upstream registry, docker pulling and running.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use http::StatusCode;
use libtest_mimic::Trial;

use crate::mirror::world;
use crate::support::images;
use crate::support::{Server, docker, get, get_blob, get_ok, refused, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial("ko::docker_runs_a_module_built_on_demand", docker_run),
        trial(
            "ko::the_index_holds_amd64_and_arm64_laid_out_as_ko_does",
            layout,
        ),
        trial(
            "ko::versions_give_different_images_and_subpackages_resolve",
            versions,
        ),
        trial(
            "ko::a_rebuild_from_nothing_gives_the_same_digest_and_cached_pulls_never_rebuild",
            reproducible,
        ),
        trial("ko::a_compile_error_reaches_docker_pull", compile_error),
        trial(
            "ko::module_zips_with_escaping_paths_or_symlinks_are_refused",
            unsafe_zips,
        ),
        trial(
            "ko::zips_naming_a_file_twice_and_libraries_are_refused_before_any_build",
            twice_and_libraries,
        ),
        trial(
            "ko::main_modules_are_checked_against_a_checksum_database_and_go_uses_kontains_proxy",
            checksum_database,
        ),
        trial(
            "ko::a_dependency_on_a_proxy_the_policy_refuses_is_denied_by_kontain",
            refused_dependency,
        ),
        trial("ko::unknown_modules_and_bad_names", unknown),
        trial(
            "ko::each_image_has_an_spdx_sbom_in_the_referrers_api_naming_every_dependency",
            sbom,
        ),
        trial(
            "ko::skopeo_inspect_lists_the_module_versions_as_tags",
            inspect_tags,
        ),
    ]
}

const HELLO: &str = r#"package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"example.com/greeting"
)

func main() {
	data, err := os.ReadFile(filepath.Join(os.Getenv("KO_DATA_PATH"), "message.txt"))
	if err != nil {
		fmt.Println("no kodata:", err)
		os.Exit(1)
	}
	fmt.Printf("hello VERSION: %s; kodata says %s\n", greeting.Hello(), strings.TrimSpace(string(data)))
}
"#;

const KO_YAML: &str = r#"defaultBaseImage: local/busybox-ko:latest
builds:
- id: hello
  main: .
  ldflags: ["-s", "-w"]
"#;

/// A module proxy in a temporary directory, with the fixture modules.
pub struct GoProxy {
    pub dir: tempfile::TempDir,
}

impl GoProxy {
    pub fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }
}

/// Writes `module@version` into the proxy at `root`: zip, .mod, .info and
/// a `list` line. `extra` entries go into the zip as given (names relative
/// to the zip root, for hostile fixtures); `symlink` adds one.
fn publish(
    root: &Path,
    module: &str,
    version: &str,
    files: &[(&str, &str)],
    hostile: Option<(&str, bool)>,
) -> anyhow::Result<()> {
    let dir = root.join(module).join("@v");
    std::fs::create_dir_all(&dir)?;
    let mut zip = zip::ZipWriter::new(std::fs::File::create(dir.join(format!("{version}.zip")))?);
    let options = zip::write::SimpleFileOptions::default();
    for (name, content) in files {
        zip.start_file(format!("{module}@{version}/{name}"), options)?;
        zip.write_all(content.as_bytes())?;
    }
    match hostile {
        Some((name, false)) => {
            zip.start_file(name, options)?;
            zip.write_all(b"escaped")?;
        }
        Some((name, true)) => {
            zip.add_symlink(format!("{module}@{version}/{name}"), "/etc/passwd", options)?;
        }
        None => {}
    }
    zip.finish()?;
    let go_mod = files
        .iter()
        .find(|(n, _)| *n == "go.mod")
        .map(|(_, c)| (*c).to_owned())
        .unwrap_or_else(|| format!("module {module}\n"));
    std::fs::write(dir.join(format!("{version}.mod")), go_mod)?;
    std::fs::write(
        dir.join(format!("{version}.info")),
        format!(r#"{{"Version":"{version}","Time":"2026-01-01T00:00:00Z"}}"#),
    )?;
    let mut list = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("list"))?;
    writeln!(list, "{version}")?;
    Ok(())
}

/// Versions of `example.com/turns`, each a new build (the fair-use trials).
pub const TURNS: usize = 40;

fn seed_proxy() -> anyhow::Result<GoProxy> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    for n in 0..TURNS {
        let main = format!("package main\n\nfunc main() {{ println(\"turn {n}\") }}\n");
        publish(
            root,
            "example.com/turns",
            &format!("v1.0.{n}"),
            &[
                ("go.mod", "module example.com/turns\n\ngo 1.19\n"),
                ("main.go", &main),
            ],
            None,
        )?;
    }
    publish(
        root,
        "example.com/greeting",
        "v1.0.0",
        &[
            ("go.mod", "module example.com/greeting\n\ngo 1.19\n"),
            (
                "greeting.go",
                "package greeting\n\nfunc Hello() string { return \"hello from greeting\" }\n",
            ),
        ],
        None,
    )?;
    for version in ["v1.0.0", "v1.1.0"] {
        let main = HELLO.replace("VERSION", version);
        publish(
            root,
            "example.com/hello",
            version,
            &[
                (
                    "go.mod",
                    "module example.com/hello\n\ngo 1.19\n\nrequire example.com/greeting v1.0.0\n",
                ),
                ("main.go", &main),
                (".ko.yaml", KO_YAML),
                ("kodata/message.txt", "the kodata file\n"),
                ("kodata/sub/more.txt", "more\n"),
            ],
            None,
        )?;
    }
    publish(
        root,
        "example.com/tools",
        "v0.1.0",
        &[
            ("go.mod", "module example.com/tools\n\ngo 1.19\n"),
            ("tools.go", "package tools\n"),
            (
                "cmd/echo/main.go",
                "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"echo from tools\") }\n",
            ),
        ],
        None,
    )?;
    publish(
        root,
        "example.com/broken",
        "v1.0.0",
        &[
            ("go.mod", "module example.com/broken\n\ngo 1.19\n"),
            ("main.go", "package main\n\nfunc main() {\n\tnope()\n}\n"),
        ],
        None,
    )?;
    let ok_files: &[(&str, &str)] = &[
        ("go.mod", "module example.com/evil\n"),
        ("main.go", "package main\n\nfunc main() {}\n"),
    ];
    publish(
        root,
        "example.com/evil",
        "v1.0.0",
        ok_files,
        Some(("example.com/evil@v1.0.0/../../escaped.txt", false)),
    )?;
    publish(
        root,
        "example.com/linky",
        "v1.0.0",
        &[
            ("go.mod", "module example.com/linky\n"),
            ("main.go", "package main\n\nfunc main() {}\n"),
        ],
        Some(("kodata/passwd", true)),
    )?;
    // The same file twice (the zip crate would not write that: two names,
    // then the second renamed in place), twice but for case, and a file
    // that is also a directory.
    let main = "package main\n\nfunc main() {}\n";
    let twice: [(&str, &[(&str, &str)]); 3] = [
        (
            "example.com/twice",
            &[
                ("main.go", main),
                ("main.gq", "package main\n\nfunc main() { panic(1) }\n"),
            ],
        ),
        ("example.com/cased", &[("main.go", main), ("MAIN.go", main)]),
        (
            "example.com/dirfile",
            &[("main.go", main), ("x", "a file"), ("x/", "")],
        ),
    ];
    for (module, files) in twice {
        let mut files = files.to_vec();
        files.push(("go.mod", "module M\n"));
        publish(root, module, "v1.0.0", &files, None)?;
    }
    // A module whose zip is not what the checksum database records, and one
    // that needs a module no allowed proxy has.
    publish(
        root,
        "example.com/tampered",
        "v1.0.0",
        &[
            ("go.mod", "module example.com/tampered\n"),
            ("main.go", main),
        ],
        None,
    )?;
    publish(
        root,
        "example.com/needy",
        "v1.0.0",
        &[
            (
                "go.mod",
                "module example.com/needy\n\ngo 1.19\n\nrequire example.com/absent v1.0.0\n",
            ),
            (
                "main.go",
                "package main\n\nimport \"example.com/absent\"\n\nfunc main() { absent.Run() }\n",
            ),
        ],
        None,
    )?;
    let zip = root.join("example.com/twice/@v/v1.0.0.zip");
    let mut bytes = std::fs::read(&zip)?;
    for i in 0..bytes.len().saturating_sub(7) {
        if &bytes[i..i + 7] == b"main.gq" {
            bytes[i + 6] = b'o';
        }
    }
    std::fs::write(&zip, bytes)?;
    Ok(GoProxy { dir })
}

pub fn proxy() -> anyhow::Result<&'static GoProxy> {
    static PROXY: OnceLock<Result<GoProxy, String>> = OnceLock::new();
    PROXY
        .get_or_init(|| seed_proxy().map_err(|e| format!("{e:?}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The base index (amd64 + arm64 busybox), pushed once.
fn base() -> anyhow::Result<()> {
    static BASE: OnceLock<Result<(), String>> = OnceLock::new();
    BASE.get_or_init(|| {
        let push = || -> anyhow::Result<()> {
            let world = world()?;
            let dir = tempfile::tempdir()?;
            let layout = dir.path().join("busybox-ko");
            // Both children hold Debian's (amd64) busybox: the arm64 one only
            // has to exist and be labelled, the test never runs it.
            images::index(
                &layout,
                "latest",
                &[
                    images::busybox(&["/bin/sh"], "amd64")?,
                    images::busybox(&["/bin/sh"], "arm64")?,
                ],
            )?;
            world.registry.push(&layout, "latest", "busybox-ko", None)
        };
        push().map_err(|e| format!("{e:?}"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The kontain config for ko against the fixtures; `scratch` shares Go's
/// caches between servers when given.
pub fn config(scratch: Option<&Path>) -> anyhow::Result<String> {
    base()?;
    let world = world()?;
    let scratch = scratch
        .map(|p| format!("scratch = \"{}\"\n", p.display()))
        .unwrap_or_default();
    Ok(format!(
        "[storage]\nbackend = \"filesystem\"\npath = \"data\"\n\
         [upstream.registries.local]\nurl = \"http://{}\"\nallow_private = true\n\
         [go]\nproxies = [\"{}\"]\nsumdb = \"off\"\n{scratch}\
         [generators.ko]\nsource = \"builtin:ko\"\ngrants = [\"upstream\", \"go\"]\n\
         [generators.ko.settings]\nbase = \"local/busybox-ko:latest\"\n\
         [generators.ko.limits]\ntimeout = \"900s\"\n",
        world.registry.addr,
        proxy()?.url()
    ))
}

/// Go's module and build caches, shared by the trials' servers.
pub fn shared_scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kontain-ko-scratch-{}", std::process::id()));
        crate::support::register_cleanup(Box::new(|| {
            if let Some(dir) = DIR.get() {
                let _ = std::process::Command::new("chmod")
                    .args(["-R", "u+w"])
                    .arg(dir)
                    .status();
                let _ = std::fs::remove_dir_all(dir);
            }
        }));
        dir
    })
}

/// The ko config with a `go` that runs `before_build` (shell) before each
/// `go build`, to hold builds up; the script lives in `tools`.
pub fn config_with_slow_go(tools: &Path, before_build: &str) -> anyhow::Result<String> {
    let slow_go = tools.join("slow-go");
    std::fs::write(
        &slow_go,
        format!("#!/bin/sh\ncase \"$1\" in build) {before_build};; esac\nexec go \"$@\"\n"),
    )?;
    std::fs::set_permissions(
        &slow_go,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    Ok(config(Some(shared_scratch()))?.replace(
        "[go]\n",
        &format!("[go]\ncommand = \"{}\"\n", slow_go.display()),
    ))
}

/// One ko server shared by the trials that do not restart it.
fn server() -> anyhow::Result<&'static Server> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    crate::support::shared(&SERVER, || config(Some(shared_scratch())))
}

fn digest(server: &Server, repo: &str, tag: &str) -> anyhow::Result<String> {
    let reply = get_ok(server, &format!("/v2/ko/{repo}/manifests/{tag}"))?;
    Ok(reply.header("docker-content-digest").to_owned())
}

fn docker_run() -> anyhow::Result<()> {
    let server = server()?;
    let docker = docker()?;
    let image = format!("{}/ko/example.com/hello", server.addr);
    let output = docker.run_image(&image)?;
    assert_eq!(
        output.trim(),
        "hello v1.1.0: hello from greeting; kodata says the kodata file"
    );
    Ok(())
}

/// The ELF machine of a binary: 0x3e x86-64, 0xb7 aarch64.
fn elf_machine(binary: &[u8]) -> Option<u16> {
    (binary.get(..4)? == b"\x7fELF").then(|| u16::from_le_bytes([binary[18], binary[19]]))
}

fn layout() -> anyhow::Result<()> {
    let server = server()?;
    let index = get_ok(server, "/v2/ko/example.com/hello/manifests/v1.0.0")?;
    assert_eq!(
        index.header("content-type"),
        "application/vnd.oci.image.index.v1+json"
    );
    let index = index.json()?;
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .unwrap_or(&vec![])
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap_or(""),
                m["platform"]["architecture"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    assert_eq!(
        index["annotations"]["org.opencontainers.image.base.name"],
        "local/busybox-ko:latest"
    );
    let want_machine = [0x3e_u16, 0xb7];
    for (child, machine) in index["manifests"]
        .as_array()
        .unwrap_or(&vec![])
        .iter()
        .zip(want_machine)
    {
        let digest = child["digest"].as_str().unwrap_or_default();
        let manifest = get_ok(
            server,
            &format!("/v2/ko/example.com/hello/manifests/{digest}"),
        )?
        .json()?;
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        assert_eq!(layers.len(), 3, "base + kodata + binary: {manifest}");
        assert!(
            manifest["annotations"]["org.opencontainers.image.base.digest"]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:"))
        );
        let blob = |i: usize| get_blob(server, "ko/example.com/hello", &layers[i]);
        let kodata = crate::flatten::tree(&blob(1)?.body)?;
        let names: Vec<&str> = kodata.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "var",
                "var/run",
                "var/run/ko",
                "var/run/ko/message.txt",
                "var/run/ko/sub",
                "var/run/ko/sub/more.txt"
            ]
        );
        assert_eq!(kodata["var/run/ko/message.txt"].1, b"the kodata file\n");
        let app = crate::flatten::tree(&blob(2)?.body)?;
        let binary = &app
            .get("ko-app/hello")
            .map(|e| e.1.clone())
            .unwrap_or_default();
        assert_eq!(elf_machine(binary), Some(machine), "{}", child["platform"]);

        let config = get_blob(server, "ko/example.com/hello", &manifest["config"])?.json()?;
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(["/ko-app/hello"])
        );
        assert!(config["config"].get("Cmd").is_none(), "{config}");
        assert_eq!(
            config["config"]["Env"],
            serde_json::json!(["PATH=/bin:/ko-app", "KO_DATA_PATH=/var/run/ko"])
        );
        assert_eq!(config["created"], "1970-01-01T00:00:00Z");
    }
    Ok(())
}

/// The SBOM artifacts the referrers API lists for `digest`.
fn sboms(server: &Server, digest: &str) -> anyhow::Result<Vec<String>> {
    let path =
        format!("/v2/ko/example.com/hello/referrers/{digest}?artifactType=application/spdx%2Bjson");
    let reply = get_ok(server, &path)?;
    assert_eq!(reply.header("oci-filters-applied"), "artifactType");
    let index = reply.json()?;
    Ok(index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["digest"].as_str().map(str::to_owned))
        .collect())
}

fn sbom() -> anyhow::Result<()> {
    let server = server()?;
    let index = get_ok(server, "/v2/ko/example.com/hello/manifests/v1.0.0")?;
    let index_digest = index.header("docker-content-digest").to_owned();
    let index = index.json()?;
    assert_eq!(sboms(server, &index_digest)?.len(), 1, "the index's SBOM");
    let child = index["manifests"][0]["digest"].as_str().unwrap_or_default();
    let found = sboms(server, child)?;
    assert_eq!(found.len(), 1, "one SBOM per platform image: {found:?}");
    // A real client fetches the artifact by digest.
    let artifact = crate::support::skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{}/ko/example.com/hello@{}", server.addr, found[0]),
    ])?;
    let artifact: serde_json::Value = serde_json::from_str(&artifact)?;
    assert_eq!(artifact["artifactType"], "application/spdx+json");
    assert_eq!(artifact["subject"]["digest"], child);
    let document = get_blob(server, "ko/example.com/hello", &artifact["layers"][0])?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("sbom.spdx.json");
    std::fs::write(&file, &document.body)?;
    // SPDX's own validator (spdx-tools, installed by tests/run.sh).
    crate::support::validate_spdx(&file)?;
    let document: serde_json::Value = serde_json::from_slice(&document.body)?;
    assert_eq!(document["spdxVersion"], "SPDX-2.3");
    let packages = document["packages"].as_array().cloned().unwrap_or_default();
    let package = |name: &str| packages.iter().find(|p| p["name"] == name).cloned();
    let greeting = package("example.com/greeting").expect("the dependency is listed");
    assert_eq!(greeting["versionInfo"], "v1.0.0");
    let (h1, _) =
        crate::support::sumdb::hashes(proxy()?.dir.path(), "example.com/greeting", "v1.0.0")?;
    assert_eq!(greeting["comment"], format!("go.sum: {h1}"));
    let main = packages
        .iter()
        .find(|p| p["SPDXID"] == "SPDXRef-Package-main")
        .expect("the main module");
    assert_eq!(
        (main["name"].as_str(), main["versionInfo"].as_str()),
        (Some("example.com/hello"), Some("v1.0.0"))
    );
    assert!(package("stdlib").is_some_and(|p| {
        p["versionInfo"]
            .as_str()
            .is_some_and(|v| v.starts_with("go1."))
    }));
    Ok(())
}

fn inspect_tags() -> anyhow::Result<()> {
    let server = server()?;
    let tags =
        crate::support::skopeo_repo_tags(&format!("{}/ko/example.com/hello:v1.0.0", server.addr))?;
    assert_eq!(
        tags,
        serde_json::json!(["latest", "v1.0.0", "v1.1.0"]),
        "{tags}"
    );
    Ok(())
}

fn versions() -> anyhow::Result<()> {
    let server = server()?;
    let v1 = digest(server, "example.com/hello", "v1.0.0")?;
    let latest = digest(server, "example.com/hello", "latest")?;
    let v11 = digest(server, "example.com/hello", "v1.1.0")?;
    assert_ne!(v1, latest, "latest is v1.1.0, not v1.0.0");
    assert_eq!(latest, v11);
    // A package below its module's root: found by trying shorter prefixes.
    let docker = docker()?;
    let image = format!("{}/ko/example.com/tools/cmd/echo:v0.1.0", server.addr);
    let output = docker.run_image(&image)?;
    assert_eq!(output.trim(), "echo from tools");
    Ok(())
}

fn go_builds_in(log: &str) -> usize {
    log.lines().filter(|l| l.contains("go build")).count()
}

/// Threads for the layer compressor (rayon's global pool reads this).
const ONE_THREAD: [(&str, &str); 1] = [("RAYON_NUM_THREADS", "1")];
const TWO_THREADS: [(&str, &str); 1] = [("RAYON_NUM_THREADS", "2")];

fn reproducible() -> anyhow::Result<()> {
    // Nothing shared with the other trials: Go's caches start empty too.
    // The compressor gets one thread here and two after the restart: the
    // binary's layer is many pieces, and its digest must not change.
    let first = Server::start_with_env(Some(&config(None)?), &ONE_THREAD)?;
    let path = "/v2/ko/example.com/hello/manifests/v1.0.0";
    // Five concurrent cold pulls: one build (two platforms).
    let digests = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5).map(|_| s.spawn(|| get(first.addr, path))).collect();
        handles
            .into_iter()
            .map(|h| {
                let reply = h.join().map_err(|_| anyhow::anyhow!("a pull panicked"))??;
                anyhow::ensure!(
                    reply.status == StatusCode::OK,
                    "GET: {} {:?}",
                    reply.status,
                    reply.body
                );
                Ok(reply.header("docker-content-digest").to_owned())
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    assert_eq!(
        go_builds_in(&first.log()),
        2,
        "one go build per platform:\n{}",
        first.log()
    );
    // Cached: more pulls build nothing.
    for _ in 0..3 {
        assert_eq!(digest(&first, "example.com/hello", "v1.0.0")?, digests[0]);
    }
    assert_eq!(go_builds_in(&first.log()), 2);
    let child = get_ok(&first, path)?.json()?["manifests"][1]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let sbom_digests = [sboms(&first, &digests[0])?, sboms(&first, &child)?];

    // Delete everything (image cache, modules, Go's caches) and rebuild.
    let again = first.restart_after_with_env(&TWO_THREADS, |dir| {
        let data = dir.join("data");
        // Go's module cache is read-only by design.
        std::process::Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(&data)
            .status()?;
        std::fs::remove_dir_all(&data)?;
        Ok(())
    })?;
    assert_eq!(digest(&again, "example.com/hello", "v1.0.0")?, digests[0]);
    assert_eq!(go_builds_in(&again.log()), 2, "{}", again.log());
    assert_eq!(
        [sboms(&again, &digests[0])?, sboms(&again, &child)?],
        sbom_digests,
        "the same build gives the same SBOMs"
    );
    let _ = std::process::Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(again.dir.path())
        .status();
    Ok(())
}

fn compile_error() -> anyhow::Result<()> {
    let server = server()?;
    let docker = docker()?;
    let image = format!("{}/ko/example.com/broken:v1.0.0", server.addr);
    let message = docker.pull_error(&image, "a module that does not compile")?;
    assert!(
        message.contains("undefined: nope"),
        "docker pull shows the compiler's message: {message}"
    );
    assert!(message.contains("manifest unknown"), "{message}");
    // docker asked HEAD, then GET: its user is not told of an earlier failure.
    assert!(!message.contains("remembered"), "{message}");
    // Asked again at once: the same answer, without another build.
    let builds = || {
        server
            .log()
            .lines()
            .filter(|l| l.contains("build started") && l.contains("example.com/broken/"))
            .count()
    };
    let before = builds();
    let again = get(server.addr, "/v2/ko/example.com/broken/manifests/v1.0.0")?;
    let (_, repeated) = again.error()?;
    assert!(repeated.contains("undefined: nope"), "{repeated}");
    assert_eq!(builds(), before, "no other build");
    Ok(())
}

/// The message of the 403 DENIED that `repo` at v1.0.0 must get.
fn denied(server: &Server, repo: &str) -> anyhow::Result<String> {
    refused(
        server.addr,
        &format!("/v2/ko/{repo}/manifests/v1.0.0"),
        StatusCode::FORBIDDEN,
        "DENIED",
    )
}

fn unsafe_zips() -> anyhow::Result<()> {
    let server = server()?;
    for (repo, needle) in [("example.com/evil", ".."), ("example.com/linky", "symlink")] {
        let message = denied(server, repo)?;
        assert!(
            message.contains("refused") && message.contains(needle),
            "{repo}: {message}"
        );
    }
    assert!(
        !proxy()?.dir.path().join("escaped.txt").exists()
            && !shared_scratch().join("escaped.txt").exists(),
        "nothing escaped"
    );
    Ok(())
}

fn twice_and_libraries() -> anyhow::Result<()> {
    let server = server()?;
    for (repo, needle) in [
        (
            "example.com/twice",
            "multiple entries for \"example.com/twice@v1.0.0/main.go\"",
        ),
        ("example.com/cased", "appears twice (ignoring case)"),
        ("example.com/dirfile", "appears twice"),
    ] {
        let message = denied(server, repo)?;
        assert!(message.contains(needle), "{repo}: {message}");
    }
    // A library: refused before `go build` runs.
    let reply = get(server.addr, "/v2/ko/example.com/tools/manifests/v0.1.0")?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{:?}", reply.body);
    let (_, message) = reply.error()?;
    assert!(
        message.contains("example.com/tools is package tools, not a main package"),
        "{message}"
    );
    let log = server.log();
    for module in [
        "example.com/twice",
        "example.com/cased",
        "example.com/dirfile",
    ] {
        assert!(
            !log.lines()
                .any(|l| l.contains("go build") && l.contains(module)),
            "{module} was built"
        );
    }
    assert!(
        !log.lines()
            .any(|l| l.contains("go build") && l.contains("package=example.com/tools ")),
        "the library was built"
    );
    Ok(())
}

fn checksum_database() -> anyhow::Result<()> {
    use crate::support::sumdb::{SumDb, hashes};
    let proxy = proxy()?.dir.path();
    let mut records = Vec::new();
    for (module, version) in [
        ("example.com/greeting", "v1.0.0"),
        ("example.com/hello", "v1.0.0"),
    ] {
        records.push((
            format!("{module}@{version}"),
            hashes(proxy, module, version)?,
        ));
    }
    // What the database recorded for `tampered` is another zip's hash.
    let other = hashes(proxy, "example.com/broken", "v1.0.0")?;
    records.push(("example.com/tampered@v1.0.0".to_owned(), other.clone()));
    let db = SumDb::start(&records, 7, false)?;
    let with_db = |db: &SumDb| -> anyhow::Result<Server> {
        let config =
            config(None)?.replace("sumdb = \"off\"", &format!("sumdb = {:?}", db.setting()));
        // The database is on loopback: name it as an allowed private host.
        let config = format!(
            "{config}[upstream.registries.sumdb]\nurl = \"http://{}\"\nallow_private = true\n",
            db.addr
        );
        Server::start(Some(&config))
    };
    let server = with_db(&db)?;
    get_ok(&server, "/v2/ko/example.com/hello/manifests/v1.0.0")?;
    let log = server.log();
    assert!(
        log.contains("verified against the checksum database"),
        "{log}"
    );
    // `go` fetched the dependency, and checked it, through kontain.
    for asked in [
        "example.com/greeting/@v/v1.0.0.zip",
        "sumdb/sum.kontain.test/lookup/example.com/greeting@v1.0.0",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("go asked kontain's module proxy") && l.contains(asked)),
            "go never asked kontain for {asked}:\n{log}"
        );
    }
    let message = refused(
        server.addr,
        "/v2/ko/example.com/tampered/manifests/v1.0.0",
        StatusCode::FORBIDDEN,
        "DENIED",
    )?;
    assert!(
        message.contains("example.com/tampered@v1.0.0")
            && message.contains(&other.0)
            && message.contains("h1:"),
        "{message}"
    );
    assert!(
        !server.log().contains("module=example.com/tampered"),
        "tampered was built"
    );
    // A tree head signed with another key is not believed.
    let forged = SumDb::start(&records, 7, true)?;
    let server = with_db(&forged)?;
    let message = refused(
        server.addr,
        "/v2/ko/example.com/hello/manifests/v1.0.0",
        StatusCode::FORBIDDEN,
        "DENIED",
    )?;
    assert!(message.contains("not signed by"), "{message}");
    Ok(())
}

fn refused_dependency() -> anyhow::Result<()> {
    let forbidden = crate::support::upstream::ConnectionCounter::start()?;
    let config = config(None)?.replace(
        &format!("proxies = [\"{}\"]", proxy()?.url()),
        &format!(
            "proxies = [\"{}\", \"http://127.0.0.1:{}/\"]",
            proxy()?.url(),
            forbidden.addr.port()
        ),
    );
    let server = Server::start(Some(&config))?;
    let message = refused(
        server.addr,
        "/v2/ko/example.com/needy/manifests/v1.0.0",
        StatusCode::FORBIDDEN,
        "DENIED",
    )?;
    assert!(message.contains("loopback"), "{message}");
    assert_eq!(
        forbidden.connections(),
        0,
        "no connection to the refused proxy"
    );
    assert!(
        server
            .log()
            .lines()
            .any(|l| l.contains("go asked kontain's module proxy")
                && l.contains("example.com/absent/@v/")),
        "{}",
        server.log()
    );
    Ok(())
}

fn unknown() -> anyhow::Result<()> {
    let server = server()?;
    let message = refused(
        server.addr,
        "/v2/ko/example.com/nothing/here/manifests/latest",
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )?;
    assert!(message.contains("no module"), "{message}");
    let reply = get(server.addr, "/v2/ko/nodomain/x/manifests/latest")?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.error()?.1.contains("domain"), "{:?}", reply.body);
    let reply = get(server.addr, "/v2/ko/example.com/hello/manifests/v9.9.9")?;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{:?}", reply.body);
    Ok(())
}
