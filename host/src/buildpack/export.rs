//! Buildpack images: the lifecycle run over a copy of the app inside the
//! builder's filesystem, and the result exported onto the run image the way
//! `pack build` exports it:
//!
//! - one layer per launch layer, at `/layers/<buildpack id>/<layer>`, the
//!   buildpacks' SBOM files at `/layers/sbom/launch/…`, then the app at
//!   `/workspace`, then the builder's launcher, `/layers/config` and
//!   `/cnb/process`; owned by the builder's CNB user, mtimes fixed at
//!   1980-01-01T00:00:01Z, entries sorted;
//! - `WorkingDir=/workspace`, `User` the CNB user; with the builder's
//!   launcher, entrypoint `/cnb/process/<default>` and the launcher's
//!   variables; without one, entrypoint the default process (`default =
//!   true`, else `web`, else the only one) and the launch environment
//!   precomputed from the layers (`bin`, `lib`, `env/`, `env.launch/`); the
//!   `io.buildpacks.{lifecycle,build,project}.metadata` labels (the
//!   lifecycle's with every new layer's diff ID and the run image's top
//!   layer, as `pack rebase` needs);
//! - SBOMs attached as artifacts about the image (`sbom`);
//! - cached by commit, app path, builder digest and run image digest.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::future::try_join_all;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::builder::{host_platform, run_image_of};
use super::env::Env;
use super::lifecycle::{self, BuildOutput, Builder, Lifecycle, Work};
use super::sandbox::{self, Sandbox};
use super::{BuildpackError, Buildpacks, Source};
use super::{launcher, sbom};
use crate::files::{Scratch, copy_tree, tree_size};
use crate::image::assemble::{add_layers, extend};
use crate::image::json::{canonical, config_env, inner_config};
use crate::image::layer::{Fixed, write_layer};
use crate::image::work::blocking;
use crate::image::{ImageError, LayerBlob, io_error};
use crate::oci::{Digest, MediaType, split_reference};
use crate::storage::{ContentStore, StoredManifest};
use crate::upstream::Scoped;

/// 1980-01-01T00:00:01Z: what the CNB lifecycle writes, for reproducibility.
const FIXED_TIME: u64 = 315_532_801;
const FIXED_RFC3339: &str = "1980-01-01T00:00:01Z";
/// 2: images come with their SBOMs; 3: with the builder's launcher; 4:
/// with the SBOM layer and the complete lifecycle metadata label; 5:
/// `project.toml` groups and the app's own buildpacks.
const LAYOUT_VERSION: u32 = 5;

/// The most JSON of the buildpacks' layer metadata an image's lifecycle
/// label carries in all.
const MAX_LABEL_METADATA: usize = 1 << 20;

pub struct BuildpackBuild<'a> {
    pub source: &'a Source,
    /// Relative to the repository root; "" for the root.
    pub app_path: &'a str,
    /// The builder's repository, for the upstream client.
    pub builder_image: &'a str,
    pub builder: &'a StoredManifest,
    /// A run image chosen by the request's generator; `None` for the
    /// builder's own.
    pub run_image: Option<&'a str>,
    /// The platform environment (`/platform/env`): the generator's `BP_*`
    /// settings.
    pub platform_env: std::collections::BTreeMap<String, String>,
}

impl Buildpacks {
    /// Builds `build.source` with the buildpacks of `build.builder`, onto
    /// the run image; images come through `upstream`.
    pub async fn image(
        &self,
        upstream: &Scoped<'_>,
        build: BuildpackBuild<'_>,
    ) -> Result<StoredManifest, BuildpackError> {
        let builder_manifest = self
            .for_host(upstream, build.builder_image, build.builder)
            .await?;
        let builder = self
            .parts(upstream, build.builder_image, &builder_manifest)
            .await?;
        let rootfs = self
            .rootfs(&builder_manifest.digest, builder.layers)
            .await?;
        let run_reference = match build.run_image {
            Some(r) => r.to_owned(),
            None => run_image_of(&rootfs, &builder.config).ok_or_else(|| {
                BuildpackError::BadBuilder(
                    "it names no run image (/cnb/run.toml, /cnb/stack.toml or its metadata label)"
                        .into(),
                )
            })?,
        };
        let (run_name, run_tag) = split_reference(&run_reference);
        let accept = MediaType::MANIFESTS.map(str::to_owned);
        let run_top = upstream.manifest(run_name, run_tag, &accept).await?;
        let run_manifest = self.for_host(upstream, run_name, &run_top).await?;

        let key = {
            let key = json!({
                "layout": LAYOUT_VERSION,
                "url": build.source.url,
                "commit": build.source.commit,
                "app": build.app_path,
                "builder": builder_manifest.digest.to_string(),
                "run": run_manifest.digest.to_string(),
                "run_name": run_reference,
                "env": build.platform_env,
            });
            format!(
                "buildpack {}",
                hex::encode(Sha256::digest(&canonical(&key)?))
            )
        };
        let exported = Exported {
            run_reference: &run_reference,
            run_pinned: format!("{run_name}@{}", run_manifest.digest),
            builder_digest: builder_manifest.digest.to_string(),
        };
        let stored = self
            .builds
            .build(&key, || async {
                crate::activity::phase("reading the run image");
                let run = self.parts(upstream, run_name, &run_manifest).await?;
                let built = self
                    .run_lifecycle(&build, rootfs, config_env(&builder.config))
                    .await?;
                self.export(
                    &build,
                    &exported,
                    run.document,
                    run.config,
                    &run_manifest,
                    built,
                )
                .await
            })
            .await?;
        tracing::info!(url = %build.source.url, commit = %build.source.commit, digest = %stored.digest, "built a buildpack image");
        Ok(stored)
    }

    /// Detect and build over a fresh copy of the app; the work directory and
    /// what the buildpacks made in it.
    async fn run_lifecycle(
        &self,
        build: &BuildpackBuild<'_>,
        rootfs: PathBuf,
        builder_env: Vec<String>,
    ) -> Result<Built, BuildpackError> {
        let settings = self.settings.load_full();
        let config = &settings.config;
        let id = |name: &str, default: u32| {
            Env::from_list(&builder_env)
                .0
                .get(name)
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let (uid, gid) = (id("CNB_USER_ID", 1000), id("CNB_GROUP_ID", 1000));
        let mut builder = Builder::open(rootfs, builder_env)?;
        let host_user = sandbox::host_user(config.sandbox_user);
        let app_source = crate::files::inside(&build.source.dir, build.app_path)
            .filter(|p| p.is_dir())
            .ok_or_else(|| {
                BuildpackError::InvalidName(format!(
                    "{} at {} has no directory {:?}",
                    build.source.name, build.source.commit, build.app_path
                ))
            })?;
        let work_root = self.scratch.join("work");
        let platform_env = build.platform_env.clone();
        let (dir, work, groups) = blocking(move || {
            std::fs::create_dir_all(&work_root).map_err(io_error("creating a directory"))?;
            let dir = tempfile::Builder::new()
                .prefix("build-")
                .tempdir_in(&work_root)
                .map(Scratch::new)
                .map_err(io_error("creating a build directory"))?;
            // Passable (not readable) by the sandbox's own host user, which
            // bubblewrap runs as and mounts from (a temporary directory is
            // 0700).
            std::fs::set_permissions(
                dir.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o711),
            )
            .map_err(io_error("preparing a build directory"))?;
            // The app's project.toml: its build env (the generator's
            // settings win, as `pack build --env` over the descriptor) and
            // the files the build sees.
            let project = super::project::read(&app_source)?;
            let mut env = project.env.clone();
            env.extend(platform_env);
            let work = Work::create(dir.path(), host_user, env)?;
            copy_tree(&app_source, &work.app).map_err(io_error("copying the app"))?;
            project.filter(&work.app)?;
            work.give(&work.app)?;
            work.give(&work.layers)?;
            Ok::<_, BuildpackError>((dir, work, project.groups))
        })
        .await?;
        builder.apply(&groups)?;

        let sandbox = Sandbox {
            bwrap: config.bwrap_command.clone(),
            unsandboxed: self.unsandboxed(&settings).await?,
            network: config.network,
            timeout: config.step_timeout,
            uid,
            gid,
            host_user,
            max_file: config.max_source_bytes.0,
        };
        // The app's own buildpacks run code of the app's choosing: only
        // where nothing a buildpack runs can reach the host.
        let own = builder.own();
        if !own.is_empty() && sandbox.unsandboxed {
            return Err(BuildpackError::NotAllowed(
                "the app's project.toml names buildpacks of its own, which this server does not run: it runs buildpacks without the sandbox (allow_unsandboxed)".into(),
            ));
        }
        if !own.is_empty() {
            let root = work.own.clone();
            blocking(move || lifecycle::write_own(&root, &own)).await?;
        }
        let (os, arch) = host_platform();
        let lifecycle = Lifecycle {
            builder: &builder,
            sandbox: &sandbox,
            work: &work,
            os,
            arch,
        };
        crate::activity::phase("detecting");
        let detected = lifecycle.detect().await?;
        tracing::info!(url = %build.source.url, commit = %build.source.commit, group = ?detected.group.iter().map(|(b, _)| format!("{}@{}", b.id, b.version)).collect::<Vec<_>>(), "buildpacks detected");
        crate::activity::phase("building");
        let output = lifecycle.build(&detected).await?;
        let measured = dir.path().to_owned();
        let size =
            blocking(move || tree_size(&measured).map_err(io_error("measuring the build"))).await?;
        if size > config.max_source_bytes.0 {
            return Err(BuildpackError::TooLarge {
                what: "the app and its layers".into(),
                limit: config.max_source_bytes.0,
            });
        }
        Ok(Built {
            _dir: dir,
            work,
            output,
            owner: (uid, gid),
            rootfs: builder.rootfs.clone(),
        })
    }

    /// Export: launch layers, then the app, onto the run image.
    async fn export(
        &self,
        build: &BuildpackBuild<'_>,
        exported: &Exported<'_>,
        run_document: Value,
        run_config: Value,
        run_manifest: &StoredManifest,
        built: Built,
    ) -> Result<StoredManifest, BuildpackError> {
        let Built {
            work,
            output,
            owner,
            rootfs,
            _dir: scratch,
        } = &built;
        crate::activity::phase("exporting layers");
        // The builder's own launcher, if it has one (every real builder
        // does): it applies the layers' environment, exec.d and profile.d
        // when the image runs, and lets a process type be chosen.
        let launcher = {
            let (rootfs, out) = (rootfs.clone(), scratch.path().join("export"));
            let processes = output.processes.clone();
            let buildpacks = output.buildpacks.clone();
            blocking(move || launcher::prepare(&rootfs, &out, &processes, &buildpacks)).await?
        };
        if launcher.is_none() {
            tracing::info!(
                "the builder has no /cnb/lifecycle/launcher: the image's environment is precomputed, and its processes other than the default cannot be chosen"
            );
        }
        // The run image's top layer, where `pack rebase` cuts the image.
        let run_top = run_config["rootfs"]["diff_ids"]
            .as_array()
            .and_then(|ids| ids.last())
            .and_then(Value::as_str)
            .map(str::to_owned);
        // The buildpacks' SBOM files: a layer of the image and artifacts
        // about it.
        let sboms = {
            let (layers, places) = (work.layers.clone(), sbom::places(output));
            Arc::new(
                blocking(move || Ok::<_, BuildpackError>(sbom::collect(&layers, &places))).await?,
            )
        };
        // Every launch layer, the SBOMs, the app and the launcher, written
        // at once (each is one core's work), in image order.
        let mut jobs: Vec<(Part, String, Contents)> = Vec::new();
        for (index, bp) in output.buildpacks.iter().enumerate() {
            for (name, types) in &bp.layers {
                if !types.launch {
                    continue;
                }
                let escaped = lifecycle::escape_id(&bp.id);
                let host = work.layers.join(&escaped).join(name);
                let parents = vec!["layers".to_owned(), format!("layers/{escaped}")];
                let prefix = format!("layers/{escaped}/{name}");
                let what = format!("buildpack {}@{} layer {name}", bp.id, bp.version);
                let tree = (host, parents, prefix, what.clone(), *owner);
                jobs.push((
                    Part::Launch(index, name.clone()),
                    what,
                    Contents::Tree(tree),
                ));
            }
        }
        if !sboms.is_empty() {
            let what = "buildpack-provided SBOMs".to_owned();
            jobs.push((Part::Sbom, what, Contents::Sboms(sboms.clone(), *owner)));
        }
        let app = (
            work.app.clone(),
            Vec::new(),
            "workspace".to_owned(),
            "application at /workspace".to_owned(),
            *owner,
        );
        jobs.push((Part::App, app.3.clone(), Contents::Tree(app)));
        if let Some(prepared) = &launcher {
            for (key, tree) in prepared.layers(*owner) {
                jobs.push((Part::Launcher(key), tree.3.clone(), Contents::Tree(tree)));
            }
        }
        let made: Vec<(Part, LayerBlob, String)> =
            try_join_all(jobs.into_iter().map(|(part, what, contents)| {
                let store = self.builds.store().clone();
                let cpu = self.builds.cpu().clone();
                async move {
                    let blob = cpu.run(move |_| contents.write(&store)).await?;
                    Ok::<_, BuildpackError>((part, blob, what))
                }
            }))
            .await?;
        let parts: Vec<(Part, Digest)> = made
            .iter()
            .map(|(part, blob, _)| (part.clone(), blob.diff_id.clone()))
            .collect();
        let new_layers: Vec<(LayerBlob, String)> = made
            .into_iter()
            .map(|(_, blob, what)| (blob, what))
            .collect();

        let launch_env = match &launcher {
            Some(prepared) => prepared.env(&run_config),
            None => launch_env(&run_config, output, &work.layers),
        };
        let mut config = run_config;
        image_config(&mut config, output, launch_env, *owner, &new_layers)?;
        if let Some(prepared) = &launcher {
            let inner = inner_config(&mut config, "the run image config")?;
            inner.insert("Entrypoint".into(), json!([prepared.entrypoint()]));
            inner.remove("Cmd");
            inner.insert("WorkingDir".into(), json!("/workspace"));
        }
        let labels = labels(
            build,
            exported,
            output,
            launcher.as_ref(),
            &parts,
            run_top.as_deref(),
        );
        let inner = inner_config(&mut config, "the run image config")?;
        let all = inner.entry("Labels").or_insert_with(|| json!({}));
        if !all.is_object() {
            *all = json!({});
        }
        if let Some(all) = all.as_object_mut() {
            // The buildpacks' own (launch.toml), then the platform's, which
            // they cannot replace.
            for (k, v) in &output.labels {
                if !k.starts_with("io.buildpacks.") {
                    all.insert(k.clone(), json!(v));
                }
            }
            for (k, v) in labels {
                all.insert(k.to_owned(), json!(v));
            }
        }
        let blobs: Vec<&LayerBlob> = new_layers.iter().map(|(b, _)| b).collect();
        let image = extend(
            self.builds.store(),
            &run_manifest.media_type,
            run_document,
            &config,
            &blobs,
            |_| {},
        )
        .await?;
        let name = match build.app_path {
            "" => build.source.name.clone(),
            path => format!("{}/{path}", build.source.name),
        };
        let document = sbom::document(
            &name,
            &image.digest,
            &build.source.commit,
            (exported.run_reference, &run_manifest.digest),
            output,
        );
        sbom::attach(self.builds.store(), &image, &document, &sboms).await?;
        Ok(image)
    }
}

/// What the lifecycle left: the work directory (removed when dropped) and
/// what the buildpacks said.
struct Built {
    _dir: Scratch,
    work: Work,
    output: BuildOutput,
    owner: (u32, u32),
    /// The builder's filesystem (its launcher, its buildpacks' APIs).
    rootfs: PathBuf,
}

/// The images a build was exported onto, for its labels.
struct Exported<'a> {
    run_reference: &'a str,
    /// `<run image>@<manifest digest>`.
    run_pinned: String,
    builder_digest: String,
}

/// What a new layer of the image is, for the lifecycle metadata label.
#[derive(Clone, Debug, PartialEq)]
enum Part {
    /// A launch layer: its buildpack's place in the build, and its name.
    Launch(usize, String),
    Sbom,
    App,
    /// One of the launcher's, by its key in the label.
    Launcher(&'static str),
}

/// What a new layer holds.
enum Contents {
    /// A tree from disk.
    Tree(launcher::LayerJob),
    /// The buildpacks' SBOM files, where the platform spec puts them.
    Sboms(Arc<Vec<sbom::SbomFile>>, (u32, u32)),
}

impl Contents {
    fn write(self, store: &ContentStore) -> Result<LayerBlob, ImageError> {
        match self {
            Contents::Tree((host, parents, prefix, _, owner)) => {
                tree_layer(store, &host, &parents, &prefix, owner)
            }
            Contents::Sboms(files, owner) => sbom_layer(store, &files, owner),
        }
    }
}

/// How new layers' entries are written: `owner`'s, mtimes fixed, modes
/// normalised (0755 for directories and executables, 0644 otherwise),
/// symlinks kept.
fn fixed(owner: (u32, u32)) -> Fixed {
    Fixed {
        owner,
        mtime: FIXED_TIME,
        dir_mode: 0o755,
        file_mode: |executable| if executable { 0o755 } else { 0o644 },
        symlinks: true,
    }
}

/// The SBOM layer: every directory on the way to each file, then the files,
/// in the order they were found.
fn sbom_layer(
    store: &ContentStore,
    files: &[sbom::SbomFile],
    owner: (u32, u32),
) -> Result<LayerBlob, ImageError> {
    let fixed = fixed(owner);
    let paths: Vec<String> = files.iter().map(sbom::SbomFile::layer_path).collect();
    let mut dirs = std::collections::BTreeSet::new();
    for path in &paths {
        let mut at = 0;
        while let Some(slash) = path[at..].find('/') {
            dirs.insert(path[..at + slash].to_owned());
            at += slash + 1;
        }
    }
    write_layer(store, |tar| {
        for dir in &dirs {
            fixed.add_dir(tar, dir)?;
        }
        for (file, path) in files.iter().zip(&paths) {
            fixed.add_bytes(tar, path, &file.bytes)?;
        }
        Ok(())
    })
}

/// The run image's environment plus every launch layer's, in order.
fn launch_env(run_config: &Value, output: &BuildOutput, layers_dir: &Path) -> Env {
    let mut env = Env::from_list(&config_env(run_config));
    for bp in &output.buildpacks {
        let escaped = lifecycle::escape_id(&bp.id);
        for (name, types) in &bp.layers {
            if types.launch {
                env.apply_layer(
                    &layers_dir.join(&escaped).join(name),
                    &format!("/layers/{escaped}/{name}"),
                    "env.launch",
                );
            }
        }
    }
    env
}

fn image_config(
    config: &mut Value,
    output: &BuildOutput,
    env: Env,
    (uid, gid): (u32, u32),
    layers: &[(LayerBlob, String)],
) -> Result<(), ImageError> {
    let inner = inner_config(config, "the run image config")?;
    inner.insert("Env".into(), json!(env.to_list()));
    inner.insert("WorkingDir".into(), json!("/workspace"));
    inner.insert("User".into(), json!(format!("{uid}:{gid}")));
    inner.remove("Cmd");
    if let Some(p) = launcher::default_process(&output.processes) {
        // Arguments go in Cmd, so that `docker run image other args`
        // replaces them, as it would with the lifecycle's launcher.
        inner.insert("Entrypoint".into(), json!(p.command));
        if !p.args.is_empty() {
            inner.insert("Cmd".into(), json!(p.args));
        }
        if let Some(dir) = &p.working_dir {
            inner.insert("WorkingDir".into(), json!(dir));
        }
    }
    add_layers(
        config,
        layers.iter().map(|(blob, what)| {
            let entry = json!({
                "created": FIXED_RFC3339,
                "created_by": format!("kontain buildpack: {what}"),
            });
            (blob, entry)
        }),
    )?;
    if let Some(root) = config.as_object_mut() {
        root.insert("created".into(), json!(FIXED_RFC3339));
    }
    Ok(())
}

fn labels(
    build: &BuildpackBuild<'_>,
    exported: &Exported<'_>,
    output: &BuildOutput,
    launcher: Option<&launcher::Prepared>,
    parts: &[(Part, Digest)],
    run_top: Option<&str>,
) -> Vec<(&'static str, String)> {
    let sha = |want: &Part| {
        parts
            .iter()
            .find(|(part, _)| part == want)
            .map(|(_, d)| d.to_string())
    };
    let buildpacks: Vec<Value> = output
        .buildpacks
        .iter()
        .map(|b| json!({"key": b.id, "version": b.version}))
        .collect();
    // What the lifecycle's exporter writes (Platform API 0.12), so that
    // `pack inspect` reads our images and `pack rebase` can swap the run
    // image: every new layer's diff ID, and the run image's top layer.
    // Layers' metadata goes in while it fits a budget: the whole config,
    // labels included, must stay readable (kontain reads at most 4 MiB).
    let mut metadata_left = MAX_LABEL_METADATA;
    let mut layer_entries = |index: usize, b: &lifecycle::Built| {
        b.layers
            .iter()
            .filter(|(_, t)| t.launch)
            .map(|(n, t)| {
                let data = b.metadata.get(n).cloned().unwrap_or_else(|| json!({}));
                let size = data.to_string().len();
                let data = match size <= metadata_left {
                    true => {
                        metadata_left -= size;
                        data
                    }
                    false => json!({}),
                };
                let entry = json!({
                    "sha": sha(&Part::Launch(index, n.clone())),
                    "data": data,
                    "launch": t.launch,
                    "build": t.build,
                    "cache": t.cache,
                });
                (n.clone(), entry)
            })
            .collect::<serde_json::Map<_, _>>()
    };
    let run_image = json!({
        "image": exported.run_reference,
        "reference": exported.run_pinned,
        "topLayer": run_top,
    });
    let mut lifecycle = json!({
        "app": [{"sha": sha(&Part::App)}],
        "buildpacks": output.buildpacks.iter().enumerate().map(|(i, b)| json!({
            "key": b.id,
            "version": b.version,
            "layers": layer_entries(i, b),
        })).collect::<Vec<_>>(),
        "runImage": run_image,
        // Deprecated in Platform API 0.12, still read by older tools.
        "stack": {"runImage": {"image": exported.run_reference}},
        "builder": {"reference": exported.builder_digest, "image": build.builder_image},
    });
    for (part, digest) in parts {
        let key = match part {
            Part::Sbom => "sbom",
            Part::Launcher(key) => key,
            Part::Launch(..) | Part::App => continue,
        };
        lifecycle[key] = json!({ "sha": digest.to_string() });
    }
    let build_md = json!({
        "buildpacks": buildpacks,
        "processes": output.processes.iter().map(|p| json!({
            "type": p.r#type,
            "command": p.command,
            "args": p.args,
            "default": p.default,
            "buildpackID": p.buildpack_id,
        })).collect::<Vec<_>>(),
        "launcher": {"version": match launcher {
            Some(l) => l.version.clone(),
            None => "none (kontain precomputes the environment)".to_owned(),
        }},
    });
    let project = json!({
        "source": {
            "type": "git",
            "version": {"commit": build.source.commit},
            "metadata": {"repository": build.source.public(), "path": build.app_path},
        }
    });
    vec![
        ("io.buildpacks.lifecycle.metadata", lifecycle.to_string()),
        ("io.buildpacks.build.metadata", build_md.to_string()),
        ("io.buildpacks.project.metadata", project.to_string()),
    ]
}

/// A layer holding the tree at `dir` under `prefix` (after `parents`),
/// entries sorted, modes normalised (0755 for directories and executables,
/// 0644 otherwise), owner and mtime fixed.
fn tree_layer(
    store: &ContentStore,
    dir: &Path,
    parents: &[String],
    prefix: &str,
    owner: (u32, u32),
) -> Result<LayerBlob, ImageError> {
    let fixed = fixed(owner);
    write_layer(store, |tar| {
        for p in parents.iter().map(String::as_str).chain([prefix]) {
            fixed.add_dir(tar, p)?;
        }
        fixed.add_tree(tar, dir, prefix)
    })
}
