//! `buildpack` with real parts: local git repositories (Debian's git, a
//! `file://` URL template), a test builder image in the local upstream
//! registry (busybox build/run images, `/cnb/order.toml`, two shell
//! buildpacks), bubblewrap as the sandbox, docker pulling and running.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use http::StatusCode;
use libtest_mimic::Trial;

use crate::mirror::world;
use crate::support::images::{self, Entry, Image};
use crate::support::{Server, docker, get, get_blob, get_ok, refused, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial("buildpack::docker_runs_the_built_app", docker_run),
        trial("buildpack::the_image_is_laid_out_as_pack_builds_it", layout),
        trial(
            "buildpack::branches_and_shas_name_commits_and_new_commits_rebuild",
            revisions,
        ),
        trial(
            "buildpack::a_rebuild_from_nothing_gives_the_same_digest",
            reproducible,
        ),
        trial(
            "buildpack::an_undetectable_app_names_the_buildpacks_tried",
            undetectable,
        ),
        trial(
            "buildpack::composite_buildpacks_nested_two_deep_expand_into_their_members",
            composite,
        ),
        trial(
            "buildpack::bp_settings_reach_detect_and_build_as_platform_env",
            platform_env,
        ),
        trial(
            "buildpack::the_builders_launcher_runs_processes_with_exec_d_profile_d_and_per_process_env",
            launched,
        ),
        trial(
            "buildpack::project_toml_excludes_files_and_sets_build_env",
            project_toml,
        ),
        trial(
            "buildpack::project_toml_groups_name_builder_buildpacks_and_run_inline_scripts",
            project_groups,
        ),
        trial(
            "buildpack::an_unsandboxed_server_refuses_the_apps_own_buildpacks",
            unsandboxed,
        ),
        trial(
            "buildpack::an_abbreviated_sha_of_a_500_commit_repository_fetches_its_history_once",
            abbreviated,
        ),
        trial(
            "buildpack::a_hostile_buildpack_is_confined_by_the_sandbox",
            hostile,
        ),
        trial(
            "buildpack::symlinks_or_processes_left_by_a_buildpack_never_lead_the_host_out",
            symlinks,
        ),
        trial(
            "buildpack::skopeo_inspect_lists_branches_and_tags",
            inspect_tags,
        ),
        trial(
            "buildpack::referrers_list_an_spdx_document_and_the_buildpacks_own_sboms",
            sboms,
        ),
    ]
}

fn sboms() -> anyhow::Result<()> {
    let server = server()?;
    let image = get_ok(server, "/v2/buildpack/acme/app/manifests/main")?;
    let digest = image.header("docker-content-digest").to_owned();
    let index = get_ok(
        server,
        &format!("/v2/buildpack/acme/app/referrers/{digest}"),
    )?
    .json()?;
    let mut found: Vec<(String, String)> = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let s = |k: &str| m[k].as_str().unwrap_or_default().to_owned();
            (s("artifactType"), s("digest"))
        })
        .collect();
    found.sort();
    let kinds: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "application/spdx+json",
            "application/vnd.cyclonedx+json",
            "application/vnd.cyclonedx+json"
        ]
    );
    let document = |artifact: &str| -> anyhow::Result<bytes::Bytes> {
        let path = format!("/v2/buildpack/acme/app/manifests/{artifact}");
        let manifest = get_ok(server, &path)?.json()?;
        assert_eq!(manifest["subject"]["digest"], digest.as_str());
        Ok(get_blob(server, "buildpack/acme/app", &manifest["layers"][0])?.body)
    };
    // The buildpacks' own files (the app's launch SBOM, the tool's layer
    // SBOM), as they wrote them.
    let mut components = Vec::new();
    for (_, artifact) in &found[1..] {
        let cdx: serde_json::Value = serde_json::from_slice(&document(artifact)?)?;
        components.push(
            cdx["components"][0]["name"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        );
    }
    components.sort();
    assert_eq!(components, ["shout", "shouted-message"]);
    // kontain's: the commit, every buildpack with its version, the run image.
    let spdx = document(&found[0].1)?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("bp.spdx.json"), &spdx)?;
    crate::support::validate_spdx(&dir.path().join("bp.spdx.json"))?;
    let spdx: serde_json::Value = serde_json::from_slice(&spdx)?;
    let packages = spdx["packages"].as_array().cloned().unwrap_or_default();
    let named = |name: &str| packages.iter().find(|p| p["name"] == name).cloned();
    let commit = git(
        &repos()?.root.path().join("acme/app"),
        &["rev-parse", "main"],
    )?;
    let app = packages
        .iter()
        .find(|p| p["SPDXID"] == "SPDXRef-App")
        .expect("the app");
    assert_eq!(app["name"], "acme/app", "no server path: {app}");
    assert_eq!(app["versionInfo"], commit.as_str());
    for id in ["kontain-test/tool", "kontain-test/app"] {
        let bp = named(id).unwrap_or_else(|| panic!("{id} in {spdx}"));
        assert_eq!(bp["versionInfo"], "0.1.0", "{id}");
    }
    Ok(())
}

fn inspect_tags() -> anyhow::Result<()> {
    let server = server()?;
    let repos = repos()?;
    let dir = repos.create(
        "acme",
        "tagged",
        &[("message.txt", "tagged\n"), ("run.sh", RUN_SH)],
    )?;
    git(&dir, &["tag", "v1.0"])?;
    // Not a valid image tag: left out of the list.
    git(&dir, &["branch", "feature/x"])?;
    git(&dir, &["branch", "next"])?;
    let tags =
        crate::support::skopeo_repo_tags(&format!("{}/buildpack/acme/tagged:v1.0", server.addr))?;
    assert_eq!(
        tags,
        serde_json::json!(["latest", "main", "next", "v1.0"]),
        "{tags}"
    );
    Ok(())
}

const TOOL_DETECT: &str = include_str!("../fixtures/buildpacks/tool/detect");
const TOOL_BUILD: &str = include_str!("../fixtures/buildpacks/tool/build");
const APP_DETECT: &str = include_str!("../fixtures/buildpacks/app/detect");
const APP_BUILD: &str = include_str!("../fixtures/buildpacks/app/build");
const LAUNCHER: &str = include_str!("../fixtures/buildpacks/launcher");
const LAUNCH_DETECT: &str = include_str!("../fixtures/buildpacks/launch/detect");
const LAUNCH_BUILD: &str = include_str!("../fixtures/buildpacks/launch/build");
/// A project descriptor (schema 0.2) keeping files out and setting a
/// build variable.
const PROJECT_TOML: &str = "[_]\nschema-version = \"0.2\"\n\
    [io.buildpacks]\nexclude = [\"secret.txt\", \"docs/\"]\n\
    [[io.buildpacks.build.env]]\nname = \"BP_KONTAIN_NOTE\"\nvalue = \"from project.toml\"\n";
/// The builder's two buildpacks named by the app (one by URI), and an
/// inline buildpack after them that uses the first one's tool.
const PROJECT_GROUPS: &str = "[_]\nschema-version = \"0.2\"\n\
    [[io.buildpacks.pre.group]]\nid = \"acme/pre\"\n\
    [io.buildpacks.pre.group.script]\napi = \"0.10\"\nshell = \"/bin/sh -e\"\n\
    inline = \"echo pre > pre.txt\"\n\
    [[io.buildpacks.group]]\nid = \"kontain-test/tool\"\n\
    [[io.buildpacks.group]]\nuri = \"urn:cnb:builder:kontain-test/app\"\n\
    [[io.buildpacks.post.group]]\nid = \"acme/inline\"\n\
    [io.buildpacks.post.group.script]\napi = \"0.10\"\n\
    inline = \"shout < message.txt > inline.txt\"\n";
/// A buildpack the repository carries, as buildpacks/samples' apps do
/// (schema 0.1, a relative URI), kept out of the build's files.
const PROJECT_LOCAL: &str = "[project]\nid = \"acme.local\"\n\
    [build]\nexclude = [\"own-buildpack\"]\n\
    [[build.buildpacks]]\nuri = \"own-buildpack/\"\n";
const OWN_BUILDPACK_TOML: &str =
    "api = \"0.10\"\n[buildpack]\nid = \"acme/own\"\nversion = \"1.0.0\"\n";
const OWN_DETECT: &str = "#!/bin/sh\ntest -f message.txt || exit 100\n";
const OWN_BUILD: &str = "#!/bin/sh\nset -e\necho \"own buildpack: $(cat message.txt)\" > hello.txt\n\
    printf '[[processes]]\\ntype = \"web\"\\ncommand = [\"/bin/cat\", \"/workspace/hello.txt\"]\\ndefault = true\\n' > \"$CNB_LAYERS_DIR/launch.toml\"\n";
/// A buildpack from elsewhere, which kontain does not fetch.
const PROJECT_FOREIGN: &str = "[[io.buildpacks.group]]\nuri = \"docker://evil.example/bp\"\n";
const RUN_SH: &str = "echo \"$GREETING: $(shout < message.txt) / built: $(cat built.txt)\"\n";

/// Busybox with the applets the scripts use.
fn busybox_entries(busybox: &[u8]) -> Vec<Entry<'_>> {
    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::File("bin/busybox", busybox, 0o755),
    ];
    for applet in [
        "sh", "cat", "echo", "mkdir", "tr", "chmod", "test", "printf", "ls", "id", "cp", "ln",
        "env", "sleep", "awk",
    ] {
        let path: &'static str = Box::leak(format!("bin/{applet}").into_boxed_str());
        entries.push(Entry::Symlink(path, "busybox"));
    }
    entries
}

fn buildpack_entries<'a>(id: &str, detect: &'a str, build: &'a str) -> Vec<Entry<'a>> {
    buildpack_entries_for(id, "0.10", detect, build)
}

/// A buildpack of Buildpack API `api`.
fn buildpack_entries_for<'a>(
    id: &str,
    api: &str,
    detect: &'a str,
    build: &'a str,
) -> Vec<Entry<'a>> {
    let dir: &'static str =
        Box::leak(format!("cnb/buildpacks/{}/0.1.0", id.replace('/', "_")).into_boxed_str());
    let toml: &'static str = Box::leak(
        format!("api = \"{api}\"\n[buildpack]\nid = \"{id}\"\nversion = \"0.1.0\"\n")
            .into_boxed_str(),
    );
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    vec![
        Entry::Dir(leak(format!("cnb/buildpacks/{}", id.replace('/', "_")))),
        Entry::Dir(dir),
        Entry::Dir(leak(format!("{dir}/bin"))),
        Entry::File(
            leak(format!("{dir}/buildpack.toml")),
            toml.as_bytes(),
            0o644,
        ),
        Entry::File(leak(format!("{dir}/bin/detect")), detect.as_bytes(), 0o755),
        Entry::File(leak(format!("{dir}/bin/build")), build.as_bytes(), 0o755),
    ]
}

/// A builder image: busybox, `/cnb/order.toml` with `group`, the run image
/// named in `/cnb/run.toml`, and the given buildpacks.
fn builder_image(buildpacks: &[(&str, &str, &str)], run_image: &str) -> anyhow::Result<Image> {
    let busybox = std::fs::read("/bin/busybox")?;
    let mut order = String::from("[[order]]\n");
    for (id, _, _) in buildpacks {
        order.push_str(&format!(
            "[[order.group]]\nid = \"{id}\"\nversion = \"0.1.0\"\n"
        ));
    }
    let run = format!("[[images]]\nimage = \"{run_image}\"\n");
    let mut cnb = vec![
        Entry::Dir("cnb"),
        Entry::Dir("cnb/buildpacks"),
        Entry::File("cnb/order.toml", order.as_bytes(), 0o644),
        Entry::File("cnb/run.toml", run.as_bytes(), 0o644),
    ];
    for (id, detect, build) in buildpacks {
        cnb.extend(buildpack_entries(id, detect, build));
    }
    Ok(Image {
        layers: vec![
            images::layer(&busybox_entries(&busybox))?,
            images::layer(&cnb)?,
        ],
        cmd: vec![],
        architecture: "amd64",
    })
}

/// A builder whose order names only a composite buildpack, `meta`: its
/// first group is a buildpack that never detects, its second the composite
/// `inner` (no version given), whose one group is the tool and app
/// buildpacks: composites two deep, the real buildpacks only inside.
fn composite_builder() -> anyhow::Result<Image> {
    let busybox = std::fs::read("/bin/busybox")?;
    let order = "[[order]]\n[[order.group]]\nid = \"kontain-test/meta\"\nversion = \"1.0.0\"\n";
    let meta = "api = \"0.10\"\n[buildpack]\nid = \"kontain-test/meta\"\nversion = \"1.0.0\"\n\
                [[order]]\n[[order.group]]\nid = \"kontain-test/never\"\nversion = \"0.1.0\"\n\
                [[order]]\n[[order.group]]\nid = \"kontain-test/inner\"\n";
    let inner = "api = \"0.10\"\n[buildpack]\nid = \"kontain-test/inner\"\nversion = \"2.0.0\"\n\
                 [[order]]\n[[order.group]]\nid = \"kontain-test/tool\"\nversion = \"0.1.0\"\n\
                 [[order.group]]\nid = \"kontain-test/app\"\nversion = \"0.1.0\"\n";
    let run = "[[images]]\nimage = \"local/bp-run:latest\"\n";
    let mut cnb = vec![
        Entry::Dir("cnb"),
        Entry::Dir("cnb/buildpacks"),
        Entry::File("cnb/order.toml", order.as_bytes(), 0o644),
        Entry::File("cnb/run.toml", run.as_bytes(), 0o644),
        Entry::Dir("cnb/buildpacks/kontain-test_meta"),
        Entry::Dir("cnb/buildpacks/kontain-test_meta/1.0.0"),
        Entry::File(
            "cnb/buildpacks/kontain-test_meta/1.0.0/buildpack.toml",
            meta.as_bytes(),
            0o644,
        ),
        Entry::Dir("cnb/buildpacks/kontain-test_inner"),
        Entry::Dir("cnb/buildpacks/kontain-test_inner/2.0.0"),
        Entry::File(
            "cnb/buildpacks/kontain-test_inner/2.0.0/buildpack.toml",
            inner.as_bytes(),
            0o644,
        ),
    ];
    cnb.extend(buildpack_entries(
        "kontain-test/never",
        "#!/bin/sh\nexit 100\n",
        "#!/bin/sh\nexit 1\n",
    ));
    cnb.extend(buildpack_entries(
        "kontain-test/tool",
        TOOL_DETECT,
        TOOL_BUILD,
    ));
    cnb.extend(buildpack_entries("kontain-test/app", APP_DETECT, APP_BUILD));
    Ok(Image {
        layers: vec![
            images::layer(&busybox_entries(&busybox))?,
            images::layer(&cnb)?,
        ],
        cmd: vec![],
        architecture: "amd64",
    })
}

/// A builder with a launcher at /cnb/lifecycle/launcher (the suite's own,
/// `fixtures/buildpacks/launcher`) and one buildpack that leaves exec.d,
/// profile.d, a per-process variable, two process types and a label.
fn launcher_builder() -> anyhow::Result<Image> {
    let busybox = std::fs::read("/bin/busybox")?;
    let order = "[[order]]\n[[order.group]]\nid = \"kontain-test/launch\"\nversion = \"0.1.0\"\n";
    let run = "[[images]]\nimage = \"local/bp-run:latest\"\n";
    let lifecycle = "[lifecycle]\nversion = \"0.0.0-kontain-test\"\n[apis.platform]\nsupported = [\"0.11\", \"0.12\"]\n";
    let mut cnb = vec![
        Entry::Dir("cnb"),
        Entry::Dir("cnb/buildpacks"),
        Entry::Dir("cnb/lifecycle"),
        Entry::File("cnb/lifecycle/launcher", LAUNCHER.as_bytes(), 0o755),
        Entry::File("cnb/lifecycle/lifecycle.toml", lifecycle.as_bytes(), 0o644),
        Entry::File("cnb/order.toml", order.as_bytes(), 0o644),
        Entry::File("cnb/run.toml", run.as_bytes(), 0o644),
    ];
    cnb.extend(buildpack_entries_for(
        "kontain-test/launch",
        "0.8",
        LAUNCH_DETECT,
        LAUNCH_BUILD,
    ));
    Ok(Image {
        layers: vec![
            images::layer(&busybox_entries(&busybox))?,
            images::layer(&cnb)?,
        ],
        cmd: vec![],
        architecture: "amd64",
    })
}

fn push(image: &Image, repo: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join(repo);
    images::single(&layout, "latest", image)?;
    world()?.registry.push(&layout, "latest", repo, Some("oci"))
}

/// The builder, run image and hostile builder, pushed once.
fn seed_images() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let go = || -> anyhow::Result<()> {
            let busybox = std::fs::read("/bin/busybox")?;
            push(
                &Image {
                    layers: vec![images::layer(&busybox_entries(&busybox))?],
                    cmd: vec![],
                    architecture: "amd64",
                },
                "bp-run",
            )?;
            push(
                &builder_image(
                    &[
                        ("kontain-test/tool", TOOL_DETECT, TOOL_BUILD),
                        ("kontain-test/app", APP_DETECT, APP_BUILD),
                    ],
                    "local/bp-run:latest",
                )?,
                "bp-builder",
            )?;
            let secret = secret_dir();
            let evil_build = format!(
                "#!/bin/sh\n\
                 if cat {dir}/secret.txt; then echo LEAKED; fi\n\
                 if echo pwned > {dir}/pwned.txt; then echo WROTE-HOST; fi\n\
                 if echo pwned > /etc/pwned; then echo WROTE-ROOT; fi\n\
                 if echo pwned > /cnb/pwned; then echo WROTE-CNB; fi\n\
                 echo 'hostile: done trying'\n\
                 exit 3\n",
                dir = secret.display()
            );
            let evil_build: &'static str = Box::leak(evil_build.into_boxed_str());
            push(
                &builder_image(
                    &[("kontain-test/hostile", "#!/bin/sh\nexit 0\n", evil_build)],
                    "local/bp-run:latest",
                )?,
                "bp-evil",
            )?;
            // Passes, but leaves symlinks to host paths where the host
            // reads plans and launch environment files, and a process
            // that would spoil the build if it outlived its step.
            let linker_detect: &'static str = Box::leak(
                format!(
                    "#!/bin/sh\nln -sf {dir}/written-through-plan.txt \"$CNB_BUILD_PLAN_PATH\"\n\
                     (while true; do if test -e /workspace/.go; then echo late > /workspace/late.txt; fi; busybox usleep 10000; done) &\n\
                     exit 0\n",
                    dir = secret.display()
                )
                .into_boxed_str(),
            );
            let linker_build: &'static str = Box::leak(
                format!(
                    "#!/bin/sh\nset -e\necho > /workspace/.go\nbusybox usleep 300000\n\
                     if test -e /workspace/late.txt; then echo 'a process outlived its step'; exit 9; fi\n\
                     mkdir -p \"$CNB_LAYERS_DIR/evil\"\n\
                     ln -s {dir} \"$CNB_LAYERS_DIR/evil/env.launch\"\n\
                     printf '[types]\\nlaunch = true\\n' > \"$CNB_LAYERS_DIR/evil.toml\"\n\
                     ln -sf {dir}/written-through-plan.txt \"$CNB_BP_PLAN_PATH\"\n\
                     ln -s {dir}/TOKEN \"$CNB_LAYERS_DIR/launch.sbom.spdx.json\"\n\
                     mkfifo \"$CNB_LAYERS_DIR/evil.sbom.cdx.json\"\n\
                     printf '[[processes]]\\ntype = \"web\"\\ncommand = [\"/bin/sh\", \"-c\", \"env\"]\\ndefault = true\\n' > \"$CNB_LAYERS_DIR/launch.toml\"\n",
                    dir = secret.display()
                )
                .into_boxed_str(),
            );
            push(
                &builder_image(
                    &[("kontain-test/linker", linker_detect, linker_build)],
                    "local/bp-run:latest",
                )?,
                "bp-linker",
            )?;
            push(&composite_builder()?, "bp-composite")?;
            push(&launcher_builder()?, "bp-launcher")
        };
        go().map_err(|e| format!("{e:?}"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// A host directory with a secret the hostile buildpack tries to read. Not
/// under /tmp (the sandbox has its own): in the build tree, like the
/// server's own files.
fn secret_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("kontain-secret-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("secret.txt"), "top secret\n");
        let _ = std::fs::write(dir.join("TOKEN"), "hunter2");
        crate::support::register_cleanup(Box::new(|| {
            if let Some(dir) = DIR.get() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }));
        dir
    })
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .args(["-c", "user.name=test", "-c", "user.email=test@example.com"])
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Local repositories under `<root>/<owner>/<repo>`.
pub struct Repos {
    pub root: tempfile::TempDir,
}

impl Repos {
    fn create(&self, owner: &str, repo: &str, files: &[(&str, &str)]) -> anyhow::Result<PathBuf> {
        let dir = self.root.path().join(owner).join(repo);
        std::fs::create_dir_all(&dir)?;
        git(&dir, &["init", "-q", "-b", "main"])?;
        for (name, content) in files {
            let file = dir.join(name);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&file, content)?;
            // A buildpack's executables, as git keeps them.
            if name.contains("bin/") {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        git(&dir, &["add", "."])?;
        git(&dir, &["commit", "-q", "-m", "first"])?;
        Ok(dir)
    }
}

pub fn repos() -> anyhow::Result<&'static Repos> {
    static REPOS: OnceLock<Result<Repos, String>> = OnceLock::new();
    REPOS
        .get_or_init(|| {
            let go = || -> anyhow::Result<Repos> {
                let repos = Repos {
                    root: tempfile::tempdir()?,
                };
                let app = [("message.txt", "hello world\n"), ("run.sh", RUN_SH)];
                repos.create("acme", "app", &app)?;
                repos.create("acme", "moving", &app)?;
                repos.create("acme", "again", &app)?;
                repos.create("acme", "plain", &[("README", "nothing to detect\n")])?;
                let slow = [app[0], app[1], ("sleep-seconds", "25\n")];
                repos.create("acme", "slow", &slow)?;
                let project = [
                    app[0],
                    app[1],
                    ("project.toml", PROJECT_TOML),
                    ("secret.txt", "kept out\n"),
                    ("docs/a.md", "kept out too\n"),
                ];
                repos.create("acme", "project", &project)?;
                let groups = [app[0], app[1], ("project.toml", PROJECT_GROUPS)];
                repos.create("acme", "groups", &groups)?;
                let local = [
                    app[0],
                    ("project.toml", PROJECT_LOCAL),
                    ("own-buildpack/buildpack.toml", OWN_BUILDPACK_TOML),
                    ("own-buildpack/bin/detect", OWN_DETECT),
                    ("own-buildpack/bin/build", OWN_BUILD),
                ];
                repos.create("acme", "local", &local)?;
                let foreign = [app[0], app[1], ("project.toml", PROJECT_FOREIGN)];
                repos.create("acme", "foreign", &foreign)?;
                Ok(repos)
            };
            go().map_err(|e| format!("{e:?}"))
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// A repository whose build sleeps 25 s (see the app buildpack); the
/// revision to pull.
pub fn slow_repo() -> anyhow::Result<&'static str> {
    repos()?;
    Ok("main")
}

pub fn config() -> anyhow::Result<String> {
    seed_images()?;
    let world = world()?;
    Ok(format!(
        "[storage]\nbackend = \"filesystem\"\npath = \"data\"\n\
         [upstream.registries.local]\nurl = \"http://{}\"\nallow_private = true\n\
         [buildpack]\ngit_url = \"file://{}/{{owner}}/{{repo}}\"\nstep_timeout = \"120s\"\n\
         [generators.buildpack]\nsource = \"builtin:buildpack\"\ngrants = [\"upstream\", \"buildpack\"]\n\
         [generators.buildpack.settings]\nbuilder = \"local/bp-builder:latest\"\n\
         [generators.hostile]\nsource = \"builtin:buildpack\"\ngrants = [\"upstream\", \"buildpack\"]\n\
         [generators.hostile.settings]\nbuilder = \"local/bp-evil:latest\"\n\
         [generators.linker]\nsource = \"builtin:buildpack\"\ngrants = [\"upstream\", \"buildpack\"]\n\
         [generators.linker.settings]\nbuilder = \"local/bp-linker:latest\"\n\
         [generators.platform]\nsource = \"builtin:buildpack\"\ngrants = [\"upstream\", \"buildpack\"]\n\
         [generators.platform.settings]\nbuilder = \"local/bp-builder:latest\"\nBP_KONTAIN_NOTE = \"noted in kontain.toml\"\n\
         [generators.skipping]\nsource = \"builtin:buildpack\"\ngrants = [\"upstream\", \"buildpack\"]\n\
         [generators.skipping.settings]\nbuilder = \"local/bp-builder:latest\"\nBP_KONTAIN_SKIP = \"yes\"\n\
         [generators.launched]\nsource = \"builtin:buildpack\"\ngrants = [\"upstream\", \"buildpack\"]\n\
         [generators.launched.settings]\nbuilder = \"local/bp-launcher:latest\"\n\
         [generators.composite]\nsource = \"builtin:buildpack\"\ngrants = [\"upstream\", \"buildpack\"]\n\
         [generators.composite.settings]\nbuilder = \"local/bp-composite:latest\"\n",
        world.registry.addr,
        repos()?.root.path().display()
    ))
}

fn server() -> anyhow::Result<&'static Server> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    crate::support::shared(&SERVER, config)
}

fn digest(server: &Server, repo: &str, revision: &str) -> anyhow::Result<String> {
    let reply = get_ok(
        server,
        &format!("/v2/buildpack/{repo}/manifests/{revision}"),
    )?;
    Ok(reply.header("docker-content-digest").to_owned())
}

/// The image `<generator>/<repo>:main`: its config, and the files of its
/// last layer (the app at `/workspace`, in an image without the launcher).
struct Pulled {
    config: serde_json::Value,
    app: Tree,
}

fn pulled(server: &Server, repo: &str) -> anyhow::Result<Pulled> {
    let manifest = get_ok(server, &format!("/v2/{repo}/manifests/main"))?.json()?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    let last = layers
        .last()
        .ok_or_else(|| anyhow::anyhow!("no layers: {manifest}"))?;
    let app = crate::flatten::tree(&get_blob(server, repo, last)?.body)?;
    let config = get_blob(server, repo, &manifest["config"])?.json()?;
    Ok(Pulled { config, app })
}

/// The text of `/workspace/<name>` in an app layer's files.
fn workspace_file(tree: &Tree, name: &str) -> anyhow::Result<String> {
    let (_, bytes) = tree
        .get(&format!("workspace/{name}"))
        .ok_or_else(|| anyhow::anyhow!("no {name}: {:?}", tree.keys().collect::<Vec<_>>()))?;
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// A layer's files: path → (kind, bytes).
type Tree = std::collections::BTreeMap<String, (char, Vec<u8>)>;

/// The JSON label `name` of an image config.
fn json_label(config: &serde_json::Value, name: &str) -> anyhow::Result<serde_json::Value> {
    let text = config["config"]["Labels"][name].as_str().unwrap_or("{}");
    Ok(serde_json::from_str(text)?)
}

pub const EXPECTED: &str = "hello from env.launch: HELLO WORLD / built: HELLO WORLD";

fn docker_run() -> anyhow::Result<()> {
    let server = server()?;
    let docker = docker()?;
    let image = format!("{}/buildpack/acme/app:main", server.addr);
    let output = docker.run_image(&image)?;
    assert_eq!(output.trim(), EXPECTED);
    Ok(())
}

fn layout() -> anyhow::Result<()> {
    let server = server()?;
    let manifest = get_ok(server, "/v2/buildpack/acme/app/manifests/main")?.json()?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        layers.len(),
        4,
        "run image + shout layer + SBOMs + app: {manifest}"
    );
    let blob = |i: usize| get_blob(server, "buildpack/acme/app", &layers[i]);
    let tool = crate::flatten::tree(&blob(1)?.body)?;
    assert!(
        tool.contains_key("layers/kontain-test_tool/shout/bin/shout"),
        "{:?}",
        tool.keys().collect::<Vec<_>>()
    );
    // The platform spec's SBOM layer: the app buildpack's launch SBOM, the
    // tool buildpack's SBOM of its layer.
    let sboms = crate::flatten::tree(&blob(2)?.body)?;
    for (path, says) in [
        (
            "layers/sbom/launch/kontain-test_app/sbom.cdx.json",
            "shouted-message",
        ),
        (
            "layers/sbom/launch/kontain-test_tool/shout/sbom.cdx.json",
            "\"shout\"",
        ),
    ] {
        let cdx = &sboms
            .get(path)
            .unwrap_or_else(|| panic!("{path}: {:?}", sboms.keys().collect::<Vec<_>>()))
            .1;
        assert!(String::from_utf8_lossy(cdx).contains(says), "{path}");
    }
    let app = crate::flatten::tree(&blob(3)?.body)?;
    assert!(app.contains_key("workspace/run.sh") && app.contains_key("workspace/built.txt"));
    let config = get_blob(server, "buildpack/acme/app", &manifest["config"])?.json()?;
    // The lifecycle metadata `pack rebase` and `pack inspect` read: each new
    // layer's diff ID, and where the run image ends.
    let diff_ids = &config["rootfs"]["diff_ids"];
    let lifecycle = json_label(&config, "io.buildpacks.lifecycle.metadata")?;
    assert_eq!(
        lifecycle["runImage"]["topLayer"], diff_ids[0],
        "{lifecycle}"
    );
    assert_eq!(lifecycle["runImage"]["image"], "local/bp-run:latest");
    let reference = lifecycle["runImage"]["reference"].as_str().unwrap_or("");
    assert!(reference.starts_with("local/bp-run@sha256:"), "{lifecycle}");
    let shout = &lifecycle["buildpacks"][0]["layers"]["shout"];
    assert_eq!(shout["sha"], diff_ids[1], "{lifecycle}");
    assert_eq!(shout["data"]["flavour"], "upper", "{lifecycle}");
    assert_eq!(lifecycle["sbom"]["sha"], diff_ids[2], "{lifecycle}");
    assert_eq!(lifecycle["app"][0]["sha"], diff_ids[3], "{lifecycle}");
    // The repository as the client named it, never the server's path.
    let project = json_label(&config, "io.buildpacks.project.metadata")?;
    assert_eq!(
        project["source"]["metadata"]["repository"], "acme/app",
        "{project}"
    );
    let c = &config["config"];
    assert_eq!(c["WorkingDir"], "/workspace");
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/bin/sh", "/workspace/run.sh"])
    );
    assert_eq!(c["User"], "1000:1000");
    let env: Vec<String> = c["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let has = |e: &str| env.iter().any(|x| x == e);
    assert!(has("GREETING=hello from env.launch"), "{env:?}");
    assert!(
        has("PATH=/layers/kontain-test_tool/shout/bin:/bin"),
        "{env:?}"
    );
    for label in [
        "io.buildpacks.lifecycle.metadata",
        "io.buildpacks.build.metadata",
        "io.buildpacks.project.metadata",
    ] {
        assert!(c["Labels"][label].is_string(), "label {label}: {c}");
    }
    assert_eq!(config["created"], "1980-01-01T00:00:01Z");
    Ok(())
}

fn revisions() -> anyhow::Result<()> {
    let server = server()?;
    let repo = repos()?.root.path().join("acme/moving");
    let sha = git(&repo, &["rev-parse", "HEAD"])?;
    let main = digest(server, "acme/moving", "main")?;
    assert_eq!(digest(server, "acme/moving", &sha)?, main);
    assert_eq!(digest(server, "acme/moving", &sha[..10])?, main);
    assert_eq!(digest(server, "acme/moving", "latest")?, main);
    // A new commit on main: a new image; the old SHA keeps the old one.
    std::fs::write(repo.join("message.txt"), "second commit\n")?;
    git(&repo, &["commit", "-q", "-am", "second"])?;
    let moved = digest(server, "acme/moving", "main")?;
    assert_ne!(moved, main);
    assert_eq!(digest(server, "acme/moving", &sha)?, main);
    Ok(())
}

fn reproducible() -> anyhow::Result<()> {
    let first = Server::start(Some(&config()?))?;
    let one = digest(&first, "acme/again", "main")?;
    let again = first.restart_after(|dir| {
        std::fs::remove_dir_all(dir.join("data"))?;
        Ok(())
    })?;
    assert_eq!(digest(&again, "acme/again", "main")?, one);
    assert!(
        again.log().contains("built a buildpack image"),
        "it rebuilt"
    );
    Ok(())
}

fn undetectable() -> anyhow::Result<()> {
    let server = server()?;
    let docker = docker()?;
    let image = format!("{}/buildpack/acme/plain:main", server.addr);
    let message = docker.pull_error(&image, "an undetectable app")?;
    assert!(
        message.contains("no buildpack group passed detection")
            && message.contains("kontain-test/tool")
            && message.contains("kontain-test/app"),
        "{message}"
    );
    Ok(())
}

/// `acme/<repo>`: 500 commits (git fast-import), the app in each.
fn long_history(repo: &str) -> anyhow::Result<String> {
    let dir = repos()?.root.path().join("acme").join(repo);
    std::fs::create_dir_all(&dir)?;
    git(&dir, &["init", "-q", "-b", "main"])?;
    let mut stream = String::new();
    let file = |name: &str, content: &str| {
        format!("M 644 inline {name}\ndata {}\n{content}\n", content.len())
    };
    for n in 1..=500 {
        let message = format!("commit {n}");
        stream.push_str(&format!(
            "commit refs/heads/main\ncommitter test <test@example.com> {n} +0000\ndata {}\n{message}\n",
            message.len()
        ));
        stream.push_str(&file("message.txt", "hello world\n"));
        stream.push_str(&file("run.sh", RUN_SH));
        stream.push_str(&file("count.txt", &format!("{n}\n")));
    }
    let mut child = Command::new("git")
        .current_dir(&dir)
        .args(["fast-import", "--quiet"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        anyhow::Context::context(child.stdin.as_mut(), "fast-import's stdin")?,
        stream.as_bytes(),
    )?;
    drop(child.stdin.take());
    anyhow::ensure!(child.wait()?.success(), "git fast-import failed");
    Ok(git(&dir, &["rev-parse", "main"])?.trim().to_owned())
}

fn abbreviated() -> anyhow::Result<()> {
    let server = server()?;
    let full = long_history("history")?;
    let short = &full[..8];
    let fetches = || server.log().matches("fetching the history").count();
    let pull = |revision: &str| -> anyhow::Result<(String, std::time::Duration)> {
        let asked = std::time::Instant::now();
        let digest = digest(server, "acme/history", revision)?;
        Ok((digest, asked.elapsed()))
    };
    let before = fetches();
    let (first, built) = pull(short)?;
    let (again, by_short) = pull(short)?;
    let (by_full_digest, by_full) = pull(&full)?;
    assert_eq!(first, again);
    assert_eq!(first, by_full_digest);
    assert_eq!(fetches() - before, 1, "the history was fetched once");
    eprintln!(
        "a 500-commit repository by {short}: first pull {built:?}, second {by_short:?}; by the full SHA {by_full:?}"
    );
    // An abbreviation the repository does not have: fetched once, then
    // remembered.
    let before = fetches();
    for _ in 0..2 {
        let reply = get(server.addr, "/v2/buildpack/acme/history/manifests/0123abcd")?;
        let (code, message) = reply.error()?;
        assert_eq!(code, "MANIFEST_UNKNOWN", "{message}");
        assert!(
            message.contains("acme/history") && !message.contains("file://"),
            "{message}"
        );
    }
    assert_eq!(
        fetches() - before,
        1,
        "an unknown abbreviation was looked for once"
    );
    Ok(())
}

fn project_toml() -> anyhow::Result<()> {
    let server = server()?;
    let tree = pulled(server, "buildpack/acme/project")?.app;
    let names: Vec<&String> = tree.keys().collect();
    assert!(tree.contains_key("workspace/message.txt"), "{names:?}");
    assert!(
        !names
            .iter()
            .any(|n| n.contains("secret.txt") || n.contains("docs")),
        "excluded files stay out of /workspace: {names:?}"
    );
    assert_eq!(
        workspace_file(&tree, "platform-note.txt")?,
        "from project.toml / from project.toml"
    );
    Ok(())
}

/// The buildpacks an image's build metadata names, `id@version`.
fn buildpacks_run(config: &serde_json::Value) -> anyhow::Result<Vec<String>> {
    let build = json_label(config, "io.buildpacks.build.metadata")?;
    Ok(build["buildpacks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            format!(
                "{}@{}",
                b["key"].as_str().unwrap_or(""),
                b["version"].as_str().unwrap_or("")
            )
        })
        .collect())
}

fn project_groups() -> anyhow::Result<()> {
    let server = server()?;
    let Pulled { config, app: tree } = pulled(server, "buildpack/acme/groups")?;
    assert_eq!(workspace_file(&tree, "inline.txt")?, "HELLO WORLD\n");
    assert_eq!(workspace_file(&tree, "pre.txt")?, "pre\n");
    assert_eq!(
        buildpacks_run(&config)?,
        [
            "acme/pre@0.0.0",
            "kontain-test/tool@0.1.0",
            "kontain-test/app@0.1.0",
            "acme/inline@0.0.0"
        ]
    );
    // A buildpack directory of the repository, as buildpacks/samples'
    // apps carry theirs: it alone builds, and it is not among the files.
    let Pulled { config, app: tree } = pulled(server, "buildpack/acme/local")?;
    let names: Vec<&String> = tree.keys().collect();
    assert!(
        !names.iter().any(|n| n.contains("own-buildpack")),
        "{names:?}"
    );
    assert_eq!(
        workspace_file(&tree, "hello.txt")?,
        "own buildpack: hello world\n"
    );
    assert_eq!(buildpacks_run(&config)?, ["acme/own@1.0.0"]);
    let message = refused(
        server.addr,
        "/v2/buildpack/acme/foreign/manifests/main",
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )?;
    assert!(
        message.contains("project.toml") && message.contains("does not fetch"),
        "{message}"
    );
    Ok(())
}

/// A server whose bubblewrap cannot start and whose config lets buildpacks
/// run on the host anyway: the builder's buildpacks build, an app's own
/// buildpacks (code of the app's choosing) are refused with 403.
fn unsandboxed() -> anyhow::Result<()> {
    let config = config()?.replace(
        "[buildpack]\n",
        "[buildpack]\nallow_unsandboxed = true\nbwrap_command = \"/nonexistent/bwrap\"\n",
    );
    let server = Server::start(Some(&config))?;
    get_ok(&server, "/v2/buildpack/acme/app/manifests/main")?;
    assert!(server.log().contains("UNSANDBOXED"), "it said so");
    for repo in ["groups", "local"] {
        let message = refused(
            server.addr,
            &format!("/v2/buildpack/acme/{repo}/manifests/main"),
            StatusCode::FORBIDDEN,
            "DENIED",
        )?;
        assert!(message.contains("without the sandbox"), "{repo}: {message}");
    }
    Ok(())
}

fn launched() -> anyhow::Result<()> {
    let server = server()?;
    let docker = docker()?;
    let image = format!("{}/launched/acme/app:main", server.addr);
    docker.run(&["pull", "-q", &image])?;
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let mut all = vec!["run", "--rm", "--network", "none"];
        all.extend(args);
        all.push(&image);
        Ok(docker.run(&all)?.trim().to_owned())
    };
    // The default process, through the launcher: exec.d's and profile.d's
    // variables, and the one only `web` gets.
    assert_eq!(
        run(&[])?,
        "web: exec.d=from exec.d profile.d=from profile.d web-only=for web"
    );
    // Another process type, chosen as pack users do (a direct one: no
    // shell, so no profile.d).
    assert_eq!(
        run(&["--entrypoint", "sys-info"])?,
        "sys-info: exec.d=from exec.d profile.d=unset web-only=unset"
    );
    // Or by CNB_PROCESS_TYPE, through the launcher itself.
    assert_eq!(
        run(&[
            "--entrypoint",
            "launcher",
            "-e",
            "CNB_PROCESS_TYPE=sys-info"
        ])?,
        "sys-info: exec.d=from exec.d profile.d=unset web-only=unset"
    );
    docker.run(&["rmi", &image])?;
    let config = pulled(server, "launched/acme/app")?.config;
    let c = &config["config"];
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/cnb/process/web"]),
        "{c}"
    );
    let env = c["Env"].to_string();
    for e in [
        "CNB_LAYERS_DIR=/layers",
        "CNB_APP_DIR=/workspace",
        "CNB_PLATFORM_API=0.12",
        "PATH=/cnb/process:/cnb/lifecycle:",
    ] {
        assert!(env.contains(e), "{e}: {env}");
    }
    assert_eq!(
        c["Labels"]["org.example.built-by"], "kontain-test/launch",
        "{c}"
    );
    let build = json_label(&config, "io.buildpacks.build.metadata")?;
    assert_eq!(build["launcher"]["version"], "0.0.0-kontain-test");
    // The launcher's layers, named in the lifecycle metadata: the last
    // three, in the order the label's keys say.
    let lifecycle = json_label(&config, "io.buildpacks.lifecycle.metadata")?;
    let ids = config["rootfs"]["diff_ids"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let last = |back: usize| ids[ids.len() - back].clone();
    assert_eq!(lifecycle["launcher"]["sha"], last(3), "{lifecycle}");
    assert_eq!(lifecycle["config"]["sha"], last(2), "{lifecycle}");
    assert_eq!(lifecycle["process-types"]["sha"], last(1), "{lifecycle}");
    get_ok(server, "/v2/buildpack/acme/app/manifests/main")?;
    assert!(
        server.log().contains("has no /cnb/lifecycle/launcher"),
        "a builder without one is said in the log"
    );
    Ok(())
}

fn platform_env() -> anyhow::Result<()> {
    let server = server()?;
    let tree = pulled(server, "platform/acme/app")?.app;
    assert_eq!(
        workspace_file(&tree, "platform-note.txt")?,
        "noted in kontain.toml / noted in kontain.toml"
    );
    // The same commit built without the setting is another image.
    let plain = get_ok(server, "/v2/buildpack/acme/app/manifests/main")?;
    assert_ne!(
        plain.header("docker-content-digest"),
        get_ok(server, "/v2/platform/acme/app/manifests/main")?.header("docker-content-digest")
    );
    let reply = get(server.addr, "/v2/skipping/acme/app/manifests/main")?;
    let (_, message) = reply.error()?;
    assert!(
        message.contains("kontain-test/app@0.1.0 failed"),
        "{message}"
    );
    Ok(())
}

fn composite() -> anyhow::Result<()> {
    let server = server()?;
    let docker = docker()?;
    let image = format!("{}/composite/acme/app:main", server.addr);
    let output = docker.run_image(&image)?;
    assert_eq!(output.trim(), EXPECTED);
    // Detection names the members it tried, not the composites.
    let image = format!("{}/composite/acme/plain:main", server.addr);
    let message = docker.pull_error(&image, "an undetectable app")?;
    for member in [
        "kontain-test/never@0.1.0 failed",
        "kontain-test/tool@0.1.0",
        "kontain-test/app@0.1.0",
    ] {
        assert!(message.contains(member), "{member}: {message}");
    }
    assert!(!message.contains("kontain-test/meta"), "{message}");
    // The first pull (docker asks HEAD, then GET) is not told of an earlier failure.
    assert!(!message.contains("remembered"), "{message}");
    Ok(())
}

fn hostile() -> anyhow::Result<()> {
    let server = server()?;
    let reply = get(server.addr, "/v2/hostile/acme/app/manifests/main")?;
    let (_, message) = reply.error()?;
    eprintln!("the hostile buildpack's pull: {} {message}", reply.status);
    assert!(
        message.contains("kontain-test/hostile") && message.contains("done trying"),
        "the failing buildpack and its output: {message}"
    );
    for leak in [
        "LEAKED",
        "WROTE-HOST",
        "WROTE-ROOT",
        "WROTE-CNB",
        "top secret",
    ] {
        assert!(!message.contains(leak), "{leak} in {message}");
    }
    assert!(!secret_dir().join("pwned.txt").exists());
    // The server still serves, and its storage holds nothing of the build.
    assert_eq!(digest(server, "acme/app", "main")?.len(), 71);
    Ok(())
}

fn symlinks() -> anyhow::Result<()> {
    let server = server()?;
    let manifest = get_ok(server, "/v2/linker/acme/app/manifests/main")?.json()?;
    let config = get_blob(server, "linker/acme/app", &manifest["config"])?.json()?;
    let env = config["config"]["Env"].to_string();
    assert!(
        !env.contains("hunter2"),
        "a host file reached the image: {env}"
    );
    assert!(
        !secret_dir().join("written-through-plan.txt").exists(),
        "the host wrote through a buildpack's symlink"
    );
    // SBOM "files" that are a symlink to a host file and a FIFO: neither is
    // read (nor waited on); only kontain's own document is attached.
    let image = get_ok(server, "/v2/linker/acme/app/manifests/main")?;
    let digest = image.header("docker-content-digest");
    let listed = get_ok(server, &format!("/v2/linker/acme/app/referrers/{digest}"))?.json()?;
    let kinds: Vec<&str> = listed["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["artifactType"].as_str())
        .collect();
    assert_eq!(kinds, ["application/spdx+json"], "{listed}");
    let artifact = listed["manifests"][0]["digest"]
        .as_str()
        .unwrap_or_default();
    let artifact = get_ok(server, &format!("/v2/linker/acme/app/manifests/{artifact}"))?.json()?;
    let document = get_blob(server, "linker/acme/app", &artifact["layers"][0])?;
    assert!(!String::from_utf8_lossy(&document.body).contains("hunter2"));
    Ok(())
}
