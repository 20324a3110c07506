//! The builder's launcher in the image, laid out as the CNB lifecycle's
//! exporter lays it out: `/cnb/lifecycle/launcher` (the builder's own
//! file), `/cnb/process/<type>` linking to it for each process type, and
//! `/layers/config/metadata.toml` naming the processes and buildpacks. The
//! launcher does the rest when the image runs: the layers' environment
//! (`env.launch/`, per-process `env.launch/<type>/`), `exec.d`, `profile.d`,
//! and the process chosen by `/cnb/process/<type>` or `CNB_PROCESS_TYPE`.
//! Nothing here depends on how a launcher does that: only the layout and
//! metadata the Platform API specifies.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::BuildpackError;
use super::env::Env;
use super::lifecycle::{self, Built, Process};
use crate::files::inside;
use crate::image::json::config_env;

/// The Platform API the image's metadata is written for, when the builder's
/// `lifecycle.toml` does not list what its launcher supports.
const PLATFORM_API: &str = "0.12";

/// A layer to write: the host directory, the parent directories, its path
/// in the image, what it is, and its owner.
pub type LayerJob = (PathBuf, Vec<String>, String, String, (u32, u32));

/// A launcher ready to be exported: its files under `dir`.
pub struct Prepared {
    dir: PathBuf,
    default: Option<String>,
    has_processes: bool,
    /// The lifecycle's version, for the build metadata label.
    pub version: String,
    platform_api: String,
}

#[derive(Serialize)]
struct Metadata<'a> {
    processes: Vec<MetadataProcess<'a>>,
    buildpacks: Vec<MetadataBuildpack>,
}

#[derive(Serialize)]
struct MetadataProcess<'a> {
    r#type: &'a str,
    command: &'a [String],
    args: &'a [String],
    direct: bool,
    default: bool,
    #[serde(rename = "buildpack-id")]
    buildpack_id: &'a str,
    #[serde(rename = "working-dir", skip_serializing_if = "Option::is_none")]
    working_dir: Option<&'a str>,
}

#[derive(Serialize)]
struct MetadataBuildpack {
    id: String,
    api: String,
}

#[derive(Default, Deserialize)]
struct LifecycleToml {
    #[serde(default)]
    lifecycle: LifecycleVersion,
    #[serde(default)]
    apis: Apis,
    #[serde(default)]
    api: OldApi,
}

#[derive(Default, Deserialize)]
struct LifecycleVersion {
    #[serde(default)]
    version: String,
}

#[derive(Default, Deserialize)]
struct Apis {
    #[serde(default)]
    platform: Supported,
}

/// The older `lifecycle.toml`: `[api] platform = "0.3"`.
#[derive(Default, Deserialize)]
struct OldApi {
    #[serde(default)]
    platform: String,
}

#[derive(Default, Deserialize)]
struct Supported {
    #[serde(default)]
    supported: Vec<String>,
}

#[derive(Default, Deserialize)]
struct BuildpackToml {
    #[serde(default)]
    api: String,
}

/// The Buildpack API kontain's platform implements.
pub const BUILDPACK_API: &str = "0.10";

/// `0.9` as `[0, 9]`, for comparing.
fn version(v: &str) -> Vec<u32> {
    v.split('.').map(|n| n.parse().unwrap_or(0)).collect()
}

/// A process type usable as a file name under `/cnb/process`.
fn plain_type(t: &str) -> bool {
    !t.is_empty()
        && !t.starts_with('.')
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The process the image runs by default: the last marked default, else
/// `web`, else the only one.
pub fn default_process(processes: &[Process]) -> Option<&Process> {
    processes
        .iter()
        .rev()
        .find(|p| p.default)
        .or_else(|| processes.iter().find(|p| p.r#type == "web"))
        .or_else(|| (processes.len() == 1).then(|| &processes[0]))
}

fn small_toml<T: serde::de::DeserializeOwned + Default>(path: Option<PathBuf>) -> T {
    path.filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() < 1 << 20))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| toml::from_str(&text).ok())
        .unwrap_or_default()
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> BuildpackError + '_ {
    move |e| BuildpackError::io(what.to_owned(), e)
}

/// Lays out the launcher of the builder at `rootfs` (if it has one) under
/// `out`, for `processes` of `buildpacks`.
pub fn prepare(
    rootfs: &Path,
    out: &Path,
    processes: &[Process],
    buildpacks: &[Built],
) -> Result<Option<Prepared>, BuildpackError> {
    let Some(launcher) = inside(rootfs, "cnb/lifecycle/launcher")
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
    else {
        return Ok(None);
    };
    let described: LifecycleToml = small_toml(inside(rootfs, "cnb/lifecycle/lifecycle.toml"));
    let mut supported = described.apis.platform.supported.clone();
    if supported.is_empty() && !described.api.platform.is_empty() {
        supported.push(described.api.platform.clone());
    }
    let platform_api = match supported.iter().any(|v| v == PLATFORM_API) || supported.is_empty() {
        true => PLATFORM_API.to_owned(),
        false => supported
            .iter()
            .max_by_key(|v| version(v))
            .cloned()
            .unwrap_or_else(|| PLATFORM_API.to_owned()),
    };

    let lifecycle_dir = out.join("lifecycle");
    std::fs::create_dir_all(&lifecycle_dir).map_err(io("creating the launcher's directory"))?;
    std::fs::copy(&launcher, lifecycle_dir.join("launcher")).map_err(io("copying the launcher"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            lifecycle_dir.join("launcher"),
            std::fs::Permissions::from_mode(0o755),
        )
        .map_err(io("copying the launcher"))?;
    }

    let usable: Vec<&Process> = processes.iter().filter(|p| plain_type(&p.r#type)).collect();
    let process_dir = out.join("process");
    std::fs::create_dir_all(&process_dir).map_err(io("creating /cnb/process"))?;
    for p in &usable {
        std::os::unix::fs::symlink("/cnb/lifecycle/launcher", process_dir.join(&p.r#type))
            .map_err(io("linking a process type"))?;
    }

    let buildpacks: Vec<MetadataBuildpack> = buildpacks
        .iter()
        .map(|b| {
            let toml: BuildpackToml = small_toml(inside(
                rootfs,
                &format!(
                    "cnb/buildpacks/{}/{}/buildpack.toml",
                    lifecycle::escape_id(&b.id),
                    b.version
                ),
            ));
            MetadataBuildpack {
                id: b.id.clone(),
                // The launcher needs a version; the one this platform
                // implements when the buildpack does not say.
                api: match (b.api.as_deref(), toml.api.as_str()) {
                    (Some(inline), _) => inline.to_owned(),
                    (None, "") => BUILDPACK_API.to_owned(),
                    (None, api) => api.to_owned(),
                },
            }
        })
        .collect();
    // Below Buildpack API 0.9 a process runs through a shell unless it
    // says `direct = true`; from 0.9 on, always directly.
    let direct = |p: &Process| {
        p.direct.unwrap_or_else(|| {
            buildpacks
                .iter()
                .find(|b| b.id == p.buildpack_id)
                .is_none_or(|b| version(&b.api) >= vec![0, 9])
        })
    };
    let metadata = Metadata {
        processes: usable
            .iter()
            .map(|p| MetadataProcess {
                r#type: &p.r#type,
                command: &p.command,
                args: &p.args,
                direct: direct(p),
                default: p.default,
                buildpack_id: &p.buildpack_id,
                working_dir: p.working_dir.as_deref(),
            })
            .collect(),
        buildpacks,
    };
    let text = toml::to_string(&metadata).map_err(|e| {
        BuildpackError::io(
            "writing the launch metadata".into(),
            std::io::Error::other(e),
        )
    })?;
    let config_dir = out.join("config");
    std::fs::create_dir_all(&config_dir).map_err(io("creating /layers/config"))?;
    std::fs::write(config_dir.join("metadata.toml"), text)
        .map_err(io("writing the launch metadata"))?;

    let default = default_process(processes)
        .filter(|p| plain_type(&p.r#type))
        .map(|p| p.r#type.clone());
    Ok(Some(Prepared {
        dir: out.to_owned(),
        default,
        has_processes: !usable.is_empty(),
        version: match described.lifecycle.version.as_str() {
            "" => "unknown (the builder's)".to_owned(),
            v => v.to_owned(),
        },
        platform_api,
    }))
}

impl Prepared {
    /// The layers to export, each with the lifecycle metadata label's key
    /// for it, (host directory, parent directories, path in the image, what
    /// it is, owner): the launcher, the launch metadata (owned by the CNB
    /// user, as the lifecycle's), the process types.
    pub fn layers(&self, owner: (u32, u32)) -> Vec<(&'static str, LayerJob)> {
        let mut layers = vec![
            (
                "launcher",
                (
                    self.dir.join("lifecycle"),
                    vec!["cnb".to_owned()],
                    "cnb/lifecycle".to_owned(),
                    "the builder's launcher".to_owned(),
                    (0, 0),
                ),
            ),
            (
                "config",
                (
                    self.dir.join("config"),
                    vec!["layers".to_owned()],
                    "layers/config".to_owned(),
                    "launch metadata".to_owned(),
                    owner,
                ),
            ),
        ];
        if self.has_processes {
            layers.push((
                "process-types",
                (
                    self.dir.join("process"),
                    vec!["cnb".to_owned()],
                    "cnb/process".to_owned(),
                    "process types".to_owned(),
                    (0, 0),
                ),
            ));
        }
        layers
    }

    /// What the image runs: the default process's link, or the launcher.
    pub fn entrypoint(&self) -> String {
        match &self.default {
            Some(t) => format!("/cnb/process/{t}"),
            None => "/cnb/lifecycle/launcher".to_owned(),
        }
    }

    /// The image's environment: the run image's, with what the launcher
    /// reads, and the process types on `PATH` (`docker run --entrypoint
    /// <type>`).
    pub fn env(&self, run_config: &Value) -> Env {
        let mut env = Env::from_list(&config_env(run_config));
        let path = env.0.get("PATH").cloned().unwrap_or_else(|| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        });
        env.0
            .insert("PATH".into(), format!("/cnb/process:/cnb/lifecycle:{path}"));
        for (k, v) in [
            ("CNB_LAYERS_DIR", "/layers"),
            ("CNB_APP_DIR", "/workspace"),
            ("CNB_PLATFORM_API", self.platform_api.as_str()),
        ] {
            env.0.insert(k.into(), v.into());
        }
        env
    }
}
