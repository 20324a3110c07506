//! Buildpack images: a builder image unpacked (once per digest) into the
//! root filesystem buildpacks run in, the lifecycle run over a copy of the
//! app, and the result exported onto the run image the way `pack build`
//! exports it:
//!
//! - one layer per launch layer, at `/layers/<buildpack id>/<layer>`, then
//!   the app at `/workspace`; owned by the builder's CNB user, mtimes fixed
//!   at 1980-01-01T00:00:01Z, entries sorted;
//! - `WorkingDir=/workspace`, `User` the CNB user, entrypoint the default
//!   process (`default = true`, else `web`, else the only one), the launch
//!   environment precomputed from the layers (`bin`, `lib`, `env/`,
//!   `env.launch/`) since there is no launcher, and the
//!   `io.buildpacks.{lifecycle,build,project}.metadata` labels;
//! - cached by commit, app path, builder digest and run image digest.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::flatten::{LayerInput, clean, open_layer};
use super::{
    BuildError, Builders, LayerBlob, LayerTar, canonical, config_env, digest_of, fixed_header,
    invalid, io_error, write_layer,
};
use crate::buildpack::env::Env;
use crate::buildpack::lifecycle::{self, BuildOutput, Builder, Lifecycle, Work};
use crate::buildpack::sandbox::{self, Sandbox};
use crate::buildpack::{BuildpackError, Buildpacks, Source};
use crate::files::{copy_tree, tree_size};
use crate::oci::MediaType;
use crate::storage::{Storage, StoredManifest};
use crate::upstream::{Mirror, split_reference};

/// 1980-01-01T00:00:01Z: what the CNB lifecycle writes, for reproducibility.
const FIXED_TIME: u64 = 315_532_801;
const FIXED_RFC3339: &str = "1980-01-01T00:00:01Z";
const LAYOUT_VERSION: u32 = 1;

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
    /// The generator's registry allowlist (`upstreams`), which the run image
    /// a builder names must pass too.
    pub allowed_registries: Option<&'a [String]>,
}

/// The platform images are built for: the host's own (buildpacks run here).
fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

fn bp_error(e: BuildpackError) -> BuildError {
    BuildError::Buildpack(Box::new(e))
}

impl Builders {
    /// The image manifest of `manifest` for this host's platform (itself, if
    /// it is not an index).
    async fn for_host(
        &self,
        mirror: &Mirror,
        image: &str,
        manifest: &StoredManifest,
    ) -> Result<StoredManifest, BuildError> {
        match manifest.media_type.as_str() {
            MediaType::OCI_INDEX | MediaType::DOCKER_MANIFEST_LIST => {
                let (os, arch) = host_platform();
                let index: Value = serde_json::from_slice(&manifest.bytes)
                    .map_err(|e| invalid(format!("{image}: {e}")))?;
                let child = index["manifests"]
                    .as_array()
                    .and_then(|m| {
                        m.iter().find(|d| {
                            d["platform"]["os"] == os && d["platform"]["architecture"] == arch
                        })
                    })
                    .ok_or_else(|| invalid(format!("{image} has no {os}/{arch} image")))?;
                let accept = MediaType::MANIFESTS.map(str::to_owned);
                Ok(mirror
                    .manifest(image, &digest_of(child)?.to_string(), &accept)
                    .await?)
            }
            _ => Ok(manifest.clone()),
        }
    }

    /// The config of an image manifest, and its layers fetched into storage.
    async fn config_and_layers(
        &self,
        mirror: &Mirror,
        image: &str,
        manifest: &StoredManifest,
    ) -> Result<(Value, Value, Vec<LayerInput>), BuildError> {
        let document: Value =
            serde_json::from_slice(&manifest.bytes).map_err(|e| invalid(e.to_string()))?;
        let config_digest = digest_of(&document["config"])?;
        mirror.blob(image, &config_digest.to_string()).await?;
        let config: Value = serde_json::from_slice(&self.read_blob(&config_digest, 1 << 22).await?)
            .map_err(|e| invalid(format!("{image}: the config is not JSON: {e}")))?;
        let mut layers = Vec::new();
        for layer in document["layers"].as_array().cloned().unwrap_or_default() {
            let digest = digest_of(&layer)?;
            mirror.blob(image, &digest.to_string()).await?;
            let media_type = layer["mediaType"].as_str().unwrap_or_default();
            layers.push(LayerInput {
                digest,
                gzipped: media_type.ends_with("gzip"),
            });
        }
        Ok((document, config, layers))
    }

    /// The builder's filesystem, unpacked once per builder digest.
    async fn builder_rootfs(
        &self,
        scratch: &Path,
        digest: &crate::oci::Digest,
        layers: Vec<LayerInput>,
    ) -> Result<PathBuf, BuildError> {
        let dir = scratch.join("builders").join(digest.hex());
        let rootfs = dir.join("rootfs");
        if dir.join("complete").exists() {
            crate::files::touch_complete(&dir);
            return Ok(rootfs);
        }
        let _guard = self.locks.lock(format!("builder rootfs {digest}")).await;
        if dir.join("complete").exists() {
            return Ok(rootfs);
        }
        let tmp_root = scratch.join("tmp");
        std::fs::create_dir_all(&tmp_root).map_err(io_error("creating a directory"))?;
        let tmp = tempfile::Builder::new()
            .prefix("rootfs-")
            .tempdir_in(&tmp_root)
            .map_err(io_error("creating a directory"))?;
        let target = tmp.path().join("rootfs");
        let storage = self.storage().clone();
        let handle = tokio::runtime::Handle::current();
        let t = target.clone();
        self.run_blocking(move |cancel| {
            unpack_rootfs(storage.as_ref(), &handle, &layers, &t, cancel)
        })
        .await?;
        std::fs::write(tmp.path().join("complete"), b"").map_err(io_error("marking a rootfs"))?;
        std::fs::create_dir_all(scratch.join("builders"))
            .map_err(io_error("creating a directory"))?;
        let kept = tmp.keep();
        if std::fs::rename(&kept, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&kept);
        }
        Ok(rootfs)
    }

    /// Builds `build.source` with the buildpacks of `build.builder`.
    pub async fn buildpack(
        &self,
        buildpacks: &Buildpacks,
        mirror: &Mirror,
        build: BuildpackBuild<'_>,
    ) -> Result<StoredManifest, BuildError> {
        let builder_manifest = self
            .for_host(mirror, build.builder_image, build.builder)
            .await?;
        let (_, builder_config, builder_layers) = self
            .config_and_layers(mirror, build.builder_image, &builder_manifest)
            .await?;
        let rootfs = self
            .builder_rootfs(
                &buildpacks.scratch,
                &builder_manifest.digest,
                builder_layers,
            )
            .await?;
        let run_reference = match build.run_image {
            Some(r) => r.to_owned(),
            None => run_image_of(&rootfs, &builder_config).ok_or_else(|| {
                bp_error(BuildpackError::BadBuilder(
                    "it names no run image (/cnb/run.toml, /cnb/stack.toml or its metadata label)"
                        .into(),
                ))
            })?,
        };
        let (run_name, run_tag) = split_reference(&run_reference);
        if let Some(allowed) = build.allowed_registries {
            let registry = mirror.parse(run_name)?.endpoint.name.clone();
            if !allowed.contains(&registry) {
                return Err(bp_error(BuildpackError::BadBuilder(format!(
                    "its run image {run_reference} is on {registry:?}, which this generator may not reach (upstreams: {})",
                    allowed.join(", ")
                ))));
            }
        }
        let accept = MediaType::MANIFESTS.map(str::to_owned);
        let run_top = mirror.manifest(run_name, run_tag, &accept).await?;
        let run_manifest = self.for_host(mirror, run_name, &run_top).await?;

        let key = {
            let key = json!({
                "layout": LAYOUT_VERSION,
                "url": build.source.url,
                "commit": build.source.commit,
                "app": build.app_path,
                "builder": builder_manifest.digest.to_string(),
                "run": run_manifest.digest.to_string(),
                "run_name": run_reference,
            });
            format!(
                "buildpack {}",
                hex::encode(Sha256::digest(&canonical(&key)?))
            )
        };
        if let Some(done) = self.cached(&key).await? {
            return Ok(done);
        }
        let _guard = self.builds.lock(key.clone()).await?;
        if let Some(done) = self.cached(&key).await? {
            return Ok(done);
        }
        let (run_document, run_config, _) = self
            .config_and_layers(mirror, run_name, &run_manifest)
            .await?;

        let builder_env = config_env(&builder_config);
        let id = |name: &str, default: u32| {
            Env::from_list(&builder_env)
                .0
                .get(name)
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let (uid, gid) = (id("CNB_USER_ID", 1000), id("CNB_GROUP_ID", 1000));
        let builder = Builder::open(rootfs.clone(), builder_env).map_err(bp_error)?;
        prepare_mount_points(&rootfs)?;

        let work_root = buildpacks.scratch.join("work");
        std::fs::create_dir_all(&work_root).map_err(io_error("creating a directory"))?;
        let work_dir = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(&work_root)
            .map_err(io_error("creating a build directory"))?;
        let host_user = sandbox::host_user(buildpacks.config.sandbox_user);
        let work = Work::create(work_dir.path(), host_user).map_err(bp_error)?;
        let app_source = lifecycle::inside(&build.source.dir, build.app_path)
            .filter(|p| p.is_dir())
            .ok_or_else(|| {
                bp_error(BuildpackError::InvalidName(format!(
                    "{} at {} has no directory {:?}",
                    build.source.url, build.source.commit, build.app_path
                )))
            })?;
        copy_tree(&app_source, &work.app).map_err(io_error("copying the app"))?;
        work.give(&work.app).map_err(bp_error)?;
        work.give(&work.layers).map_err(bp_error)?;

        let config = &buildpacks.config;
        let sandbox = Sandbox {
            bwrap: config.bwrap_command.clone(),
            unsandboxed: buildpacks.unsandboxed().await?,
            network: config.network,
            timeout: config.step_timeout,
            uid,
            gid,
            host_user,
        };
        let (os, arch) = host_platform();
        let lifecycle = Lifecycle {
            builder: &builder,
            sandbox: &sandbox,
            work: &work,
            os,
            arch,
        };
        let output = self
            .unless_failed_recently(&key, async {
                let detected = lifecycle.detect().await.map_err(bp_error)?;
                tracing::info!(url = %build.source.url, commit = %build.source.commit, group = ?detected.group.iter().map(|(b, _)| format!("{}@{}", b.id, b.version)).collect::<Vec<_>>(), "buildpacks detected");
                lifecycle.build(&detected).await.map_err(bp_error)
            })
            .await?;
        let size = tree_size(work_dir.path()).map_err(io_error("measuring the build"))?;
        if size > config.max_source_bytes.0 {
            return Err(bp_error(BuildpackError::TooLarge {
                what: "the app and its layers".into(),
                limit: config.max_source_bytes.0,
            }));
        }

        // Export: launch layers, then the app.
        let mut new_layers: Vec<(LayerBlob, String)> = Vec::new();
        for bp in &output.buildpacks {
            for (name, types) in &bp.layers {
                if !types.launch {
                    continue;
                }
                let escaped = lifecycle::escape_id(&bp.id);
                let host = work.layers.join(&escaped).join(name);
                let storage = self.storage().clone();
                let prefix = format!("layers/{escaped}/{name}");
                let parents = vec!["layers".to_owned(), format!("layers/{escaped}")];
                let blob = self
                    .run_blocking(move |_| {
                        tree_layer(storage.as_ref(), &host, &parents, &prefix, uid, gid)
                    })
                    .await?;
                new_layers.push((
                    blob,
                    format!("buildpack {}@{} layer {name}", bp.id, bp.version),
                ));
            }
        }
        let storage = self.storage().clone();
        let app = work.app.clone();
        let app_blob = self
            .run_blocking(move |_| tree_layer(storage.as_ref(), &app, &[], "workspace", uid, gid))
            .await?;
        new_layers.push((app_blob, "application at /workspace".to_owned()));

        let launch_env = launch_env(&run_config, &output, &work.layers);
        let mut config = run_config;
        image_config(&mut config, &output, launch_env, uid, gid, &new_layers)?;
        let labels = labels(
            &build,
            &output,
            &run_reference,
            &run_manifest.digest.to_string(),
            &builder_manifest.digest.to_string(),
        );
        for (k, v) in labels {
            config["config"]["Labels"][k] = json!(v);
        }
        let blobs: Vec<&LayerBlob> = new_layers.iter().map(|(b, _)| b).collect();
        let stored = self
            .extend_image(
                &run_manifest.media_type,
                run_document,
                &config,
                &blobs,
                |_| {},
            )
            .await?;
        self.storage().put_tag(&key, &stored.digest).await?;
        tracing::info!(url = %build.source.url, commit = %build.source.commit, digest = %stored.digest, "built a buildpack image");
        Ok(stored)
    }
}

/// The run image a builder names: `/cnb/run.toml`, `/cnb/stack.toml`, or the
/// `io.buildpacks.builder.metadata` label.
fn run_image_of(rootfs: &Path, config: &Value) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct RunToml {
        #[serde(default)]
        images: Vec<RunImage>,
    }
    #[derive(serde::Deserialize)]
    struct RunImage {
        image: String,
    }
    #[derive(serde::Deserialize)]
    struct StackToml {
        #[serde(rename = "run-image")]
        run_image: RunImage,
    }
    let read = |rel: &str| {
        lifecycle::inside(rootfs, rel)
            .filter(|p| {
                std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() < 1 << 20)
            })
            .and_then(|p| std::fs::read_to_string(p).ok())
    };
    if let Some(r) = read("cnb/run.toml")
        .and_then(|t| toml::from_str::<RunToml>(&t).ok())
        .and_then(|r| r.images.into_iter().next())
    {
        return Some(r.image);
    }
    if let Some(s) = read("cnb/stack.toml").and_then(|t| toml::from_str::<StackToml>(&t).ok()) {
        return Some(s.run_image.image);
    }
    let label = config["config"]["Labels"]["io.buildpacks.builder.metadata"].as_str()?;
    let metadata: Value = serde_json::from_str(label).ok()?;
    metadata["stack"]["runImage"]["image"]
        .as_str()
        .map(str::to_owned)
}

/// The directories the sandbox mounts over must exist in the (read-only)
/// builder filesystem.
fn prepare_mount_points(rootfs: &Path) -> Result<(), BuildError> {
    for dir in [
        sandbox::APP,
        sandbox::LAYERS,
        sandbox::PLATFORM,
        sandbox::IO,
        "/tmp",
        "/proc",
        "/dev",
    ] {
        let path = rootfs.join(dir.trim_start_matches('/'));
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(bp_error(BuildpackError::BadBuilder(format!(
                    "{dir} in the builder is not a directory"
                ))));
            }
            Err(_) => std::fs::create_dir_all(&path).map_err(io_error("preparing the builder"))?,
        }
    }
    Ok(())
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
    uid: u32,
    gid: u32,
    layers: &[(LayerBlob, String)],
) -> Result<(), BuildError> {
    let root = config
        .as_object_mut()
        .ok_or_else(|| invalid("the run image config is not an object"))?;
    let inner = root.entry("config").or_insert_with(|| json!({}));
    if !inner.is_object() {
        *inner = json!({});
    }
    inner["Env"] = json!(env.to_list());
    inner["WorkingDir"] = json!("/workspace");
    inner["User"] = json!(format!("{uid}:{gid}"));
    let process = output
        .processes
        .iter()
        .rev()
        .find(|p| p.default)
        .or_else(|| output.processes.iter().find(|p| p.r#type == "web"))
        .or_else(|| (output.processes.len() == 1).then(|| &output.processes[0]));
    if let Some(o) = inner.as_object_mut() {
        o.remove("Cmd");
        if !o.contains_key("Labels") || !o["Labels"].is_object() {
            o.insert("Labels".into(), json!({}));
        }
    }
    if let Some(p) = process {
        // Arguments go in Cmd, so that `docker run image other args`
        // replaces them, as it would with the lifecycle's launcher.
        inner["Entrypoint"] = json!(p.command);
        if !p.args.is_empty() {
            inner["Cmd"] = json!(p.args);
        }
        if let Some(dir) = &p.working_dir {
            inner["WorkingDir"] = json!(dir);
        }
    }
    let ids = root
        .entry("rootfs")
        .or_insert_with(|| json!({"type": "layers", "diff_ids": []}));
    let ids = ids["diff_ids"]
        .as_array_mut()
        .ok_or_else(|| invalid("the run image config has no rootfs.diff_ids"))?;
    for (blob, _) in layers {
        ids.push(json!(blob.diff_id.to_string()));
    }
    if let Some(history) = root
        .entry("history")
        .or_insert_with(|| json!([]))
        .as_array_mut()
    {
        for (_, what) in layers {
            history.push(json!({
                "created": FIXED_RFC3339,
                "created_by": format!("kontain buildpack: {what}"),
            }));
        }
    }
    root.insert("created".into(), json!(FIXED_RFC3339));
    Ok(())
}

fn labels(
    build: &BuildpackBuild<'_>,
    output: &BuildOutput,
    run_image: &str,
    run_digest: &str,
    builder_digest: &str,
) -> Vec<(&'static str, String)> {
    let buildpacks: Vec<Value> = output
        .buildpacks
        .iter()
        .map(|b| json!({"key": b.id, "version": b.version}))
        .collect();
    let lifecycle = json!({
        "app": [{"sha": "", "path": "/workspace"}],
        "buildpacks": output.buildpacks.iter().map(|b| json!({
            "key": b.id,
            "version": b.version,
            "layers": b.layers.iter().filter(|(_, t)| t.launch).map(|(n, t)| (n.clone(), json!({"launch": t.launch, "build": t.build, "cache": t.cache}))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
        "runImage": {"reference": run_digest, "image": run_image},
        "builder": {"reference": builder_digest, "image": build.builder_image},
    });
    let build_md = json!({
        "buildpacks": buildpacks,
        "processes": output.processes.iter().map(|p| json!({
            "type": p.r#type,
            "command": p.command,
            "args": p.args,
            "default": p.default,
            "buildpackID": p.buildpack_id,
        })).collect::<Vec<_>>(),
        "launcher": {"version": "none (kontain precomputes the environment)"},
    });
    let project = json!({
        "source": {
            "type": "git",
            "version": {"commit": build.source.commit},
            "metadata": {"repository": build.source.url, "path": build.app_path},
        }
    });
    vec![
        ("io.buildpacks.lifecycle.metadata", lifecycle.to_string()),
        ("io.buildpacks.build.metadata", build_md.to_string()),
        ("io.buildpacks.project.metadata", project.to_string()),
    ]
}

fn header(kind: tar::EntryType, mode: u32, uid: u32, gid: u32, size: u64) -> tar::Header {
    fixed_header(kind, mode, (uid, gid), FIXED_TIME, size)
}

/// A layer holding the tree at `dir` under `prefix` (after `parents`),
/// entries sorted, modes normalised (0755 for directories and executables,
/// 0644 otherwise), owner and mtime fixed.
fn tree_layer(
    storage: &dyn Storage,
    dir: &Path,
    parents: &[String],
    prefix: &str,
    uid: u32,
    gid: u32,
) -> Result<LayerBlob, BuildError> {
    write_layer(storage, |tar| {
        for p in parents.iter().map(String::as_str).chain([prefix]) {
            tar.append_data(
                &mut header(tar::EntryType::Directory, 0o755, uid, gid, 0),
                format!("{p}/"),
                std::io::empty(),
            )
            .map_err(io_error("writing a layer"))?;
        }
        add_tree(tar, dir, prefix, uid, gid)
    })
}

fn add_tree(
    tar: &mut LayerTar,
    dir: &Path,
    prefix: &str,
    uid: u32,
    gid: u32,
) -> Result<(), BuildError> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(io_error("reading a layer directory"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_error("reading a layer directory"))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let path = format!("{prefix}/{name}");
        let meta = std::fs::symlink_metadata(entry.path()).map_err(io_error("reading a layer"))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            tar.append_data(
                &mut header(tar::EntryType::Directory, 0o755, uid, gid, 0),
                format!("{path}/"),
                std::io::empty(),
            )
            .map_err(io_error("writing a layer"))?;
            add_tree(tar, &entry.path(), &path, uid, gid)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(entry.path()).map_err(io_error("reading a link"))?;
            let mut h = header(tar::EntryType::Symlink, 0o777, uid, gid, 0);
            tar.append_link(&mut h, &path, &target)
                .map_err(io_error("writing a layer"))?;
        } else if kind.is_file() {
            use std::os::unix::fs::PermissionsExt;
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            let f = std::fs::File::open(entry.path()).map_err(io_error("reading a file"))?;
            tar.append_data(
                &mut header(tar::EntryType::Regular, mode, uid, gid, meta.len()),
                &path,
                f,
            )
            .map_err(io_error("writing a layer"))?;
        }
    }
    Ok(())
}

/// Applies image layers, in order, to an empty directory: whiteouts remove
/// (never through a symlink), everything else unpacks inside `dest` only.
fn unpack_rootfs(
    storage: &dyn Storage,
    handle: &tokio::runtime::Handle,
    layers: &[LayerInput],
    dest: &Path,
    cancel: &super::Cancel,
) -> Result<(), BuildError> {
    std::fs::create_dir_all(dest).map_err(io_error("creating the rootfs"))?;
    for layer in layers {
        cancel.check()?;
        let reader = open_layer(storage, handle, layer)?;
        let mut archive = tar::Archive::new(reader);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        let entries = archive
            .entries()
            .map_err(|e| invalid(format!("a builder layer is not a tar: {e}")))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| invalid(format!("a builder layer is not a tar: {e}")))?;
            let Some(path) = entry.path().ok().and_then(|p| clean(&p)) else {
                continue;
            };
            let (parent, name) = path.rsplit_once('/').unwrap_or(("", &path));
            if let Some(hidden) = name.strip_prefix(".wh.") {
                if hidden == "." || hidden == ".." || hidden.is_empty() {
                    continue;
                }
                let Some(dir) = safe_path(dest, parent) else {
                    continue;
                };
                if hidden == ".wh..opq" {
                    if let Ok(children) = std::fs::read_dir(&dir) {
                        for child in children.flatten() {
                            remove(&child.path());
                        }
                    }
                } else {
                    remove(&dir.join(hidden));
                }
                continue;
            }
            entry.unpack_in(dest).map_err(|e| {
                invalid(format!("a builder layer cannot be unpacked at {path}: {e}"))
            })?;
        }
    }
    Ok(())
}

/// `rel` under `root` if no component of it is a symlink.
fn safe_path(root: &Path, rel: &str) -> Option<PathBuf> {
    lifecycle::inside(root, rel)
}

fn remove(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}
