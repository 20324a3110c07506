//! The platform side of the CNB Buildpack API 0.10, natively: detect (order
//! groups, optional buildpacks, build-plan provides/requires), then build
//! (each buildpack's layers, build layers feeding later buildpacks,
//! `launch.toml` processes). Every buildpack executable runs in the
//! [`Sandbox`]; everything it writes is read back as untrusted.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use serde::Deserialize;

use super::BuildpackError;
use super::env::Env;
use super::plan::{DetectPlan, PlanItem, resolve_plan};
use super::project::{AppBuildpack, Entry, Groups};
use super::sandbox::{self, Mounts, Sandbox};
use crate::files::inside;

/// The builder's filesystem and what it says.
pub struct Builder {
    pub rootfs: PathBuf,
    /// The builder image's config `Env`.
    pub env: Vec<String>,
    pub order: Vec<Vec<GroupEntry>>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct GroupEntry {
    pub id: String,
    /// Empty in an order that leaves it out: the one version the builder has.
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub optional: bool,
    /// A buildpack the app carries (`project.toml`): not the builder's.
    #[serde(skip)]
    pub own: Option<std::sync::Arc<AppBuildpack>>,
}

/// Where a step finds a buildpack the app carries: under its plan
/// directory, mounted read-only (the sandbox's read-only root has no other
/// place the host may mount on).
const OWN_DIR: &str = sandbox::OWN;

/// `/cnb/order.toml`, and a composite buildpack's `buildpack.toml`.
#[derive(Deserialize)]
struct OrderToml {
    #[serde(default)]
    order: Vec<OrderGroup>,
}

/// Composite buildpacks nest at most this deep.
const MAX_COMPOSITE_DEPTH: usize = 8;

/// Groups an order may expand to (a composite of composites multiplies).
const MAX_GROUPS: usize = 1000;

/// Buildpacks in one expanded group at most.
const MAX_GROUP_LEN: usize = 100;

/// Order entries read while expanding composites, at most.
const MAX_ENTRIES_READ: usize = 10_000;

#[derive(Deserialize)]
struct OrderGroup {
    #[serde(default)]
    group: Vec<GroupEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Command {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct RawProcess {
    r#type: String,
    command: Command,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    default: bool,
    #[serde(default, rename = "working-dir")]
    working_dir: Option<String>,
    /// Buildpack API < 0.9: `false` runs the command through a shell.
    #[serde(default)]
    direct: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct LaunchToml {
    #[serde(default)]
    processes: Vec<RawProcess>,
    #[serde(default)]
    labels: Vec<RawLabel>,
}

#[derive(Debug, Deserialize)]
struct RawLabel {
    key: String,
    value: String,
}

#[derive(Debug, Default, Deserialize)]
struct LayerToml {
    #[serde(default)]
    types: LayerTypes,
    #[serde(default)]
    metadata: Option<toml::Table>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct LayerTypes {
    #[serde(default)]
    pub launch: bool,
    #[serde(default)]
    pub build: bool,
    #[serde(default)]
    pub cache: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Process {
    pub r#type: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub default: bool,
    pub working_dir: Option<String>,
    pub buildpack_id: String,
    /// As `launch.toml` says, if it does (Buildpack API < 0.9).
    pub direct: Option<bool>,
}

/// One buildpack's contribution.
#[derive(Clone, Debug)]
pub struct Built {
    pub id: String,
    pub version: String,
    pub layers: Vec<(String, LayerTypes)>,
    /// Each launch layer's `<layer>.toml` `[metadata]` (for the lifecycle
    /// metadata label), when it is small enough to carry in a label.
    pub metadata: std::collections::BTreeMap<String, serde_json::Value>,
    /// An inline buildpack's Buildpack API (the builder's say theirs in
    /// their `buildpack.toml`).
    pub api: Option<String>,
}

pub struct BuildOutput {
    pub buildpacks: Vec<Built>,
    pub processes: Vec<Process>,
    /// `launch.toml` `[[labels]]`, later buildpacks' last.
    pub labels: Vec<(String, String)>,
}

/// A buildpack id as a directory name.
pub fn escape_id(id: &str) -> String {
    id.replace('/', "_")
}

fn read_small(path: &Path) -> Option<String> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_file() || meta.len() > 1 << 20 {
        return None;
    }
    std::fs::read_to_string(path).ok()
}

impl Builder {
    /// Reads `/cnb/order.toml` from an unpacked builder.
    pub fn open(rootfs: PathBuf, env: Vec<String>) -> Result<Builder, BuildpackError> {
        let text = inside(&rootfs, "cnb/order.toml")
            .and_then(|p| read_small(&p))
            .ok_or_else(|| BuildpackError::BadBuilder("it has no /cnb/order.toml".into()))?;
        let order: OrderToml = toml::from_str(&text)
            .map_err(|e| BuildpackError::BadBuilder(format!("/cnb/order.toml: {e}")))?;
        let order: Vec<Vec<GroupEntry>> = order.order.into_iter().map(|g| g.group).collect();
        if order.iter().all(Vec::is_empty) {
            return Err(BuildpackError::BadBuilder(
                "/cnb/order.toml has no groups".into(),
            ));
        }
        let mut builder = Builder {
            rootfs,
            env,
            order: Vec::new(),
        };
        let mut budget = MAX_ENTRIES_READ;
        builder.order = builder.expand(order, 0, &mut budget)?;
        Ok(builder)
    }

    /// The order with an app's `project.toml` groups: its `group` instead
    /// of the builder's order, `pre` and `post` around each group (each of
    /// their alternatives, if they hold composites). Its entries are the
    /// app's to get right: what the builder lacks is the app's error.
    pub fn apply(&mut self, groups: &Groups) -> Result<(), BuildpackError> {
        if groups.group.is_empty() && groups.pre.is_empty() && groups.post.is_empty() {
            return Ok(());
        }
        let entries = |list: &[Entry]| -> Result<Vec<GroupEntry>, BuildpackError> {
            list.iter()
                .map(|e| {
                    let entry = match e {
                        Entry::Builder { id, version } => GroupEntry {
                            id: id.clone(),
                            version: version.clone(),
                            optional: false,
                            own: None,
                        },
                        Entry::App(bp) => GroupEntry {
                            id: bp.id.clone(),
                            version: bp.version.clone(),
                            optional: false,
                            own: Some(bp.clone()),
                        },
                    };
                    // A version left out is found when the group expands.
                    let mut named = entry.clone();
                    if named.version.is_empty() {
                        named.version = "0".to_owned();
                    }
                    self.checked(&named).map_err(|_| {
                        BuildpackError::Project(format!(
                            "{:?}@{:?} is not a usable buildpack id and version",
                            entry.id, entry.version
                        ))
                    })?;
                    Ok(entry)
                })
                .collect()
        };
        let mut budget = MAX_ENTRIES_READ;
        let mut expand = |list: &[Entry]| -> Result<Vec<Vec<GroupEntry>>, BuildpackError> {
            self.expand(vec![entries(list)?], 0, &mut budget)
                .map_err(apps_fault)
        };
        let pre = expand(&groups.pre)?;
        let post = expand(&groups.post)?;
        let order = match groups.group.is_empty() {
            true => std::mem::take(&mut self.order),
            false => expand(&groups.group)?,
        };
        let mut combined = Vec::new();
        for group in &order {
            for before in &pre {
                for after in &post {
                    let mut all: Vec<GroupEntry> = Vec::new();
                    for e in before.iter().chain(group).chain(after) {
                        if !all.iter().any(|a| a.id == e.id) {
                            all.push(e.clone());
                        }
                    }
                    if all.len() > MAX_GROUP_LEN {
                        return Err(BuildpackError::Project(format!(
                            "a group passes {MAX_GROUP_LEN} buildpacks"
                        )));
                    }
                    combined.push(all);
                    if combined.len() > MAX_GROUPS {
                        return Err(BuildpackError::Project(format!(
                            "the order passes {MAX_GROUPS} groups"
                        )));
                    }
                }
            }
        }
        self.order = combined;
        // An app's buildpack runs under its own name only: never as one of
        // the builder's (which the image's metadata would then name), never
        // in another's layers directory (ids alike once escaped).
        for entry in self.order.iter().flatten() {
            let Some(own) = &entry.own else { continue };
            let clash = self.order.iter().flatten().any(|other| {
                escape_id(&other.id) == escape_id(&own.id)
                    && !other
                        .own
                        .as_ref()
                        .is_some_and(|o| std::sync::Arc::ptr_eq(o, own))
            });
            let builders = inside(
                &self.rootfs,
                &format!("cnb/buildpacks/{}", escape_id(&own.id)),
            )
            .is_some_and(|dir| dir.exists());
            if clash || builders {
                return Err(BuildpackError::Project(format!(
                    "the app's buildpack {} has the id of another buildpack of the build or the builder",
                    own.id
                )));
            }
        }
        let named = |id: &str| {
            [&groups.group, &groups.pre, &groups.post]
                .into_iter()
                .flatten()
                .any(|e| matches!(e, Entry::Builder { id: i, .. } if i == id))
        };
        for entry in self.order.iter().flatten().filter(|e| named(&e.id)) {
            self.buildpack_dir(entry).map_err(|_| {
                BuildpackError::Project(format!(
                    "the builder has no buildpack {}@{}",
                    entry.id, entry.version
                ))
            })?;
        }
        Ok(())
    }

    /// The buildpacks the app carries that the order runs, once each.
    pub fn own(&self) -> Vec<std::sync::Arc<AppBuildpack>> {
        let mut own: Vec<std::sync::Arc<AppBuildpack>> = Vec::new();
        for bp in self.order.iter().flatten().filter_map(|e| e.own.as_ref()) {
            if !own.iter().any(|o| o.id == bp.id) {
                own.push(bp.clone());
            }
        }
        own
    }

    /// `order` with each composite buildpack (one whose `buildpack.toml`
    /// has an `[[order]]`) replaced by its own groups, recursively, in
    /// order: a group holding a composite becomes one group per group of
    /// the composite, tried in turn (and, for an optional composite, one
    /// without it). Versions left out are filled in; a buildpack named
    /// twice in a group runs once. `budget` counts entries read, so that a
    /// hostile builder's composites cannot make this endless.
    fn expand(
        &self,
        order: Vec<Vec<GroupEntry>>,
        depth: usize,
        budget: &mut usize,
    ) -> Result<Vec<Vec<GroupEntry>>, BuildpackError> {
        let mut expanded = Vec::new();
        for mut group in order {
            let mut seen = std::collections::HashSet::new();
            group.retain(|e| seen.insert(e.id.clone()));
            let mut alternatives: Vec<Vec<GroupEntry>> = vec![Vec::new()];
            for entry in group {
                *budget = budget.checked_sub(1).ok_or_else(|| {
                    BuildpackError::BadBuilder(
                        "its composite buildpacks name too many buildpacks".into(),
                    )
                })?;
                let members = match &entry.own {
                    Some(_) => vec![vec![entry]],
                    None => self.members(entry, depth, budget)?,
                };
                if alternatives.len().saturating_mul(members.len()) > MAX_GROUPS {
                    return Err(BuildpackError::BadBuilder(format!(
                        "its order expands to more than {MAX_GROUPS} groups"
                    )));
                }
                alternatives = alternatives
                    .iter()
                    .flat_map(|before| {
                        members.iter().map(move |m| {
                            let mut group = before.clone();
                            // A buildpack already in the group runs once.
                            for e in m {
                                if !group.iter().any(|g: &GroupEntry| g.id == e.id) {
                                    group.push(e.clone());
                                }
                            }
                            group
                        })
                    })
                    .collect();
                if alternatives.iter().any(|g| g.len() > MAX_GROUP_LEN) {
                    return Err(BuildpackError::BadBuilder(format!(
                        "a group of its order expands to more than {MAX_GROUP_LEN} buildpacks"
                    )));
                }
            }
            expanded.extend(alternatives);
            if expanded.len() > MAX_GROUPS {
                return Err(BuildpackError::BadBuilder(format!(
                    "its order expands to more than {MAX_GROUPS} groups"
                )));
            }
        }
        Ok(expanded)
    }

    /// What a builder's `entry` stands for in a group: itself, or (a
    /// composite) each of its groups in turn, its members as they are
    /// marked; an optional composite may also be left out.
    fn members(
        &self,
        mut entry: GroupEntry,
        depth: usize,
        budget: &mut usize,
    ) -> Result<Vec<Vec<GroupEntry>>, BuildpackError> {
        entry.version = self.version_of(&entry)?;
        match self.composite(&entry)? {
            None => Ok(vec![vec![entry]]),
            Some(_) if depth >= MAX_COMPOSITE_DEPTH => Err(BuildpackError::BadBuilder(format!(
                "composite buildpacks nest deeper than {MAX_COMPOSITE_DEPTH} at {}@{}",
                entry.id, entry.version
            ))),
            Some(order) => {
                let mut members = self.expand(order, depth + 1, budget)?;
                if entry.optional {
                    members.push(Vec::new());
                }
                Ok(members)
            }
        }
    }

    /// The version of `entry`: its own, or the latest the builder has, as
    /// the spec reads a version left out.
    fn version_of(&self, entry: &GroupEntry) -> Result<String, BuildpackError> {
        if !entry.version.is_empty() {
            return Ok(entry.version.clone());
        }
        let versions: Vec<String> = inside(
            &self.rootfs,
            &format!("cnb/buildpacks/{}", escape_id(&entry.id)),
        )
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
        // Semantic versions as semver orders them (a pre-release before its
        // release), above any other; ties by name, so the choice never
        // depends on directory order.
        let key = |v: &String| (semver::Version::parse(v).ok(), v.clone());
        versions.iter().max_by_key(|v| key(v)).cloned().ok_or_else(|| {
            BuildpackError::BadBuilder(format!(
                "buildpack {} is in the order without a version, and the builder has none of it",
                entry.id
            ))
        })
    }

    /// The order of `entry` if it is a composite buildpack: a
    /// `buildpack.toml` with `[[order]]` (and no `bin/`).
    fn composite(
        &self,
        entry: &GroupEntry,
    ) -> Result<Option<Vec<Vec<GroupEntry>>>, BuildpackError> {
        let rel = format!("cnb/buildpacks/{}/{}", escape_id(&entry.id), entry.version);
        let Some(dir) = self
            .checked(entry)
            .ok()
            .and_then(|()| inside(&self.rootfs, &rel))
        else {
            return Ok(None);
        };
        if dir.join("bin").is_dir() {
            return Ok(None);
        }
        let Some(text) = inside(&dir, "buildpack.toml").and_then(|p| read_small(&p)) else {
            return Ok(None);
        };
        let parsed: OrderToml = toml::from_str(&text)
            .map_err(|e| BuildpackError::BadBuilder(format!("/{rel}/buildpack.toml: {e}")))?;
        let order: Vec<Vec<GroupEntry>> = parsed.order.into_iter().map(|g| g.group).collect();
        Ok((!order.is_empty()).then_some(order))
    }

    /// That `bp`'s id and version are plain names, usable in a path.
    fn checked(&self, bp: &GroupEntry) -> Result<(), BuildpackError> {
        let plain = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
                && !s.contains("..")
        };
        if !plain(&bp.id) || !plain(&bp.version) || bp.version.contains('/') {
            return Err(BuildpackError::BadBuilder(format!(
                "buildpack {:?}@{:?} has an unusable id or version",
                bp.id, bp.version
            )));
        }
        Ok(())
    }

    fn buildpack_dir(&self, bp: &GroupEntry) -> Result<String, BuildpackError> {
        self.checked(bp)?;
        if bp.own.is_some() {
            return Ok(format!("{}/{OWN_DIR}", sandbox::IO));
        }
        let rel = format!("cnb/buildpacks/{}/{}", escape_id(&bp.id), bp.version);
        match inside(&self.rootfs, &rel) {
            Some(p) if p.join("bin").is_dir() => Ok(format!("/{rel}")),
            _ => Err(BuildpackError::BadBuilder(format!(
                "buildpack {}@{} is in the order but not at /{rel}",
                bp.id, bp.version
            ))),
        }
    }
}

/// The directories of one build, on the host.
pub struct Work {
    pub app: PathBuf,
    pub layers: PathBuf,
    pub platform: PathBuf,
    pub io: PathBuf,
    /// The buildpacks the app carries, one directory each.
    pub own: PathBuf,
    /// Who the sandbox runs as on the host, to own what it may write.
    pub owner: Option<(u32, u32)>,
    /// The platform's environment (`/platform/env`, `BP_*` settings), also
    /// set for `bin/detect` and `bin/build`.
    pub env: std::collections::BTreeMap<String, String>,
}

impl Work {
    /// The directories of a build under `root`, `/platform/env/<name>`
    /// holding each of `env`.
    pub fn create(
        root: &Path,
        owner: Option<(u32, u32)>,
        env: std::collections::BTreeMap<String, String>,
    ) -> Result<Work, BuildpackError> {
        let w = Work {
            app: root.join("app"),
            layers: root.join("layers"),
            platform: root.join("platform"),
            io: root.join("io"),
            own: root.join("own"),
            owner,
            env,
        };
        for d in [&w.app, &w.layers, &w.platform.join("env"), &w.io] {
            std::fs::create_dir_all(d)
                .map_err(|e| BuildpackError::io(format!("creating {}", d.display()), e))?;
        }
        for (name, value) in &w.env {
            let file = w.platform.join("env").join(name);
            std::fs::write(&file, value)
                .map_err(|e| BuildpackError::io(format!("writing {}", file.display()), e))?;
        }
        Ok(w)
    }

    /// Where the app's buildpack `id` is written (see [`write_own`]).
    pub fn own_dir(&self, id: &str) -> PathBuf {
        self.own.join(escape_id(id))
    }

    /// Hands `path` (a directory the sandbox writes) to the sandbox's user.
    pub fn give(&self, path: &Path) -> Result<(), BuildpackError> {
        if let Some(owner) = self.owner {
            crate::files::chown_tree(path, owner)
                .map_err(|e| BuildpackError::io(format!("preparing {}", path.display()), e))?;
        }
        Ok(())
    }
}

pub struct Lifecycle<'a> {
    pub builder: &'a Builder,
    pub sandbox: &'a Sandbox,
    pub work: &'a Work,
    pub os: &'a str,
    pub arch: &'a str,
}

/// What detect decided: the group, and each buildpack's plan entries.
pub struct Detected {
    pub group: Vec<(GroupEntry, Vec<PlanItem>)>,
}

impl Lifecycle<'_> {
    fn mounts<'m>(&'m self, io: &'m Path, own: Option<PathBuf>) -> Mounts<'m> {
        Mounts {
            rootfs: &self.builder.rootfs,
            app: &self.work.app,
            layers: &self.work.layers,
            platform: &self.work.platform,
            io,
            own,
        }
    }

    fn base_env(&self, bp_dir: &str) -> Env {
        let mut env = Env::from_list(&self.builder.env);
        env.0.entry("HOME".into()).or_insert_with(|| "/tmp".into());
        // The user's variables (Buildpack API: set unless a buildpack asks
        // for `clear-env`, which none of this platform's callers need).
        for (k, v) in &self.work.env {
            env.0.insert(k.clone(), v.clone());
        }
        for (k, v) in [
            ("CNB_BUILDPACK_DIR", bp_dir.to_owned()),
            ("CNB_PLATFORM_DIR", sandbox::PLATFORM.to_owned()),
            ("CNB_TARGET_OS", self.os.to_owned()),
            ("CNB_TARGET_ARCH", self.arch.to_owned()),
            ("CNB_APP_DIR", sandbox::APP.to_owned()),
        ] {
            env.0.insert(k.into(), v);
        }
        env
    }

    /// A new plan directory for one step, `plan.toml` in it holding
    /// `content`; the step sees it (and only it) as its plan dir. Never
    /// reused: a step may leave symlinks in its own, and the host reads
    /// there after the step.
    ///
    /// For a buildpack the app carries, the directory holds the point its
    /// files (written once per build) are mounted on.
    fn plan_dir(
        &self,
        name: &str,
        content: &str,
        bp: &GroupEntry,
    ) -> Result<PathBuf, BuildpackError> {
        let dir = self.work.io.join(name);
        let fail = |e| BuildpackError::io("preparing the plan directory".into(), e);
        std::fs::create_dir(&dir).map_err(fail)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join("plan.toml"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, content.as_bytes()))
            .map_err(fail)?;
        if bp.own.is_some() {
            std::fs::create_dir(dir.join(OWN_DIR)).map_err(fail)?;
        }
        self.work.give(&dir)?;
        Ok(dir)
    }

    /// Runs `bp`'s `bin/<phase>` (from `dir`, inside the sandbox), with the
    /// plan directory `io`.
    async fn step(
        &self,
        bp: &GroupEntry,
        dir: &str,
        phase: &str,
        args: Vec<String>,
        env: Env,
        io: &Path,
    ) -> Result<sandbox::Outcome, BuildpackError> {
        let step = sandbox::Step {
            program: format!("{dir}/bin/{phase}"),
            args,
            env: env.0.into_iter().collect(),
            what: format!("{}@{} {phase}", bp.id, bp.version),
        };
        let own = bp.own.as_ref().map(|o| self.work.own_dir(&o.id));
        self.sandbox.run(&self.mounts(io, own), &step).await
    }

    /// Runs `bin/detect` of every buildpack of `group`, several at once as
    /// the lifecycle does (each in its own sandbox and plan directory).
    /// One result per buildpack, in group order: the caller reads them as
    /// the sequential lifecycle would, so that what comes after a required
    /// failure (even an error) does not count.
    async fn detect_group(
        &self,
        index: usize,
        group: &[GroupEntry],
    ) -> Vec<Result<(sandbox::Outcome, PathBuf), BuildpackError>> {
        let plan_inside = format!("{}/plan.toml", sandbox::IO);
        let mut steps = Vec::new();
        for (n, bp) in group.iter().enumerate() {
            let plan_inside = plan_inside.clone();
            steps.push(async move {
                let dir = self.builder.buildpack_dir(bp)?;
                let io = self.plan_dir(&format!("detect-{index}-{n}"), "", bp)?;
                let mut env = self.base_env(&dir);
                env.0
                    .insert("CNB_BUILD_PLAN_PATH".into(), plan_inside.clone());
                let args = vec![sandbox::PLATFORM.to_owned(), plan_inside];
                let outcome = self.step(bp, &dir, "detect", args, env, &io).await?;
                Ok::<_, BuildpackError>((outcome, io))
            });
        }
        let at_once = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        futures_util::stream::iter(steps)
            .buffered(at_once)
            .collect()
            .await
    }

    /// Runs detect over the order; the first group that passes wins.
    pub async fn detect(&self) -> Result<Detected, BuildpackError> {
        let mut tried = Vec::new();
        for (index, group) in self.builder.order.iter().enumerate() {
            let mut passed: Vec<(GroupEntry, DetectPlan)> = Vec::new();
            let mut failed_required = false;
            let mut notes = Vec::new();
            let outcomes = self.detect_group(index, group).await;
            for (bp, result) in group.iter().zip(outcomes) {
                let (outcome, io) = result?;
                match outcome.code {
                    Some(0) => {
                        let text = read_small(&io.join("plan.toml")).unwrap_or_default();
                        let parsed: DetectPlan = toml::from_str(&text).map_err(|e| {
                            unusable(
                                bp,
                                "detect",
                                format!("its build plan is not valid TOML: {e}"),
                            )
                        })?;
                        notes.push(format!("{}@{} passed", bp.id, bp.version));
                        passed.push((bp.clone(), parsed));
                    }
                    Some(100) => {
                        notes.push(format!(
                            "{}@{} failed{}",
                            bp.id,
                            bp.version,
                            if bp.optional { " (optional)" } else { "" }
                        ));
                        if !bp.optional {
                            failed_required = true;
                            break;
                        }
                    }
                    code => {
                        return Err(BuildpackError::BuildpackFailed {
                            buildpack: format!("{}@{}", bp.id, bp.version),
                            phase: "detect",
                            code: code.unwrap_or(-1),
                            tail: sandbox::tail(&outcome.output, 20),
                        });
                    }
                }
            }
            if !failed_required {
                match resolve_plan(passed) {
                    Ok(group) if !group.is_empty() => return Ok(Detected { group }),
                    Ok(_) => notes.push("nothing passed".into()),
                    Err(why) => notes.push(why),
                }
            }
            tried.push(format!("group {}: {}", index + 1, notes.join(", ")));
        }
        Err(BuildpackError::NoGroupPassed {
            tried: tried.join("; "),
        })
    }

    /// Runs build for each buildpack of the detected group.
    pub async fn build(&self, detected: &Detected) -> Result<BuildOutput, BuildpackError> {
        let plan_inside = format!("{}/plan.toml", sandbox::IO);
        let mut built: Vec<Built> = Vec::new();
        let mut processes: Vec<Process> = Vec::new();
        let mut labels: Vec<(String, String)> = Vec::new();
        for (bp, entries) in &detected.group {
            let dir = self.builder.buildpack_dir(bp)?;
            let escaped = escape_id(&bp.id);
            // An earlier buildpack may have put a symlink where this one's
            // layers go: only a real directory is used.
            let layers_host = self.work.layers.join(&escaped);
            crate::files::fresh_dir(&layers_host)
                .map_err(|e| BuildpackError::io("creating a layers directory".into(), e))?;
            self.work.give(&layers_host)?;
            #[derive(serde::Serialize)]
            struct BpPlan<'a> {
                entries: &'a [PlanItem],
            }
            let text = toml::to_string(&BpPlan { entries }).map_err(|e| {
                BuildpackError::io("writing the plan".into(), std::io::Error::other(e))
            })?;
            let io = self.plan_dir(&format!("build-{}", built.len()), &text, bp)?;

            let mut env = self.base_env(&dir);
            // Build layers of the buildpacks before this one.
            for earlier in &built {
                for (name, types) in &earlier.layers {
                    if types.build {
                        let host = self.work.layers.join(escape_id(&earlier.id)).join(name);
                        let inside =
                            format!("{}/{}/{name}", sandbox::LAYERS, escape_id(&earlier.id));
                        env.apply_layer(&host, &inside, "env.build");
                    }
                }
            }
            let layers_inside = format!("{}/{escaped}", sandbox::LAYERS);
            env.0.insert("CNB_LAYERS_DIR".into(), layers_inside.clone());
            env.0.insert("CNB_BP_PLAN_PATH".into(), plan_inside.clone());
            let args = vec![
                layers_inside,
                sandbox::PLATFORM.to_owned(),
                plan_inside.clone(),
            ];
            let outcome = self.step(bp, &dir, "build", args, env, &io).await?;
            if outcome.code != Some(0) {
                return Err(BuildpackError::BuildpackFailed {
                    buildpack: format!("{}@{}", bp.id, bp.version),
                    phase: "build",
                    code: outcome.code.unwrap_or(-1),
                    tail: sandbox::tail(&outcome.output, 20),
                });
            }
            let (layers, metadata) = read_layers(&layers_host)?;
            if let Some(text) = read_small(&layers_host.join("launch.toml")) {
                let launch: LaunchToml = toml::from_str(&text)
                    .map_err(|e| unusable(bp, "build", format!("launch.toml is not valid: {e}")))?;
                for label in launch.labels {
                    labels.push((label.key, label.value));
                }
                for p in launch.processes {
                    // A later buildpack's process of the same type wins.
                    processes.retain(|q| q.r#type != p.r#type);
                    processes.push(Process {
                        r#type: p.r#type,
                        command: match p.command {
                            Command::One(c) => vec![c],
                            Command::Many(v) => v,
                        },
                        args: p.args,
                        default: p.default,
                        working_dir: p.working_dir,
                        buildpack_id: bp.id.clone(),
                        direct: p.direct,
                    });
                }
            }
            built.push(Built {
                id: bp.id.clone(),
                version: bp.version.clone(),
                layers,
                metadata,
                api: bp.own.as_ref().map(|o| o.api.clone()),
            });
        }
        Ok(BuildOutput {
            buildpacks: built,
            processes,
            labels,
        })
    }
}

/// A buildpack that exited 0 but left something unusable.
fn unusable(bp: &GroupEntry, phase: &'static str, why: String) -> BuildpackError {
    BuildpackError::BuildpackFailed {
        buildpack: format!("{}@{}", bp.id, bp.version),
        phase,
        code: 0,
        tail: why,
    }
}

/// A problem of the builder's order met while applying an app's groups:
/// the app named what the builder does not have.
fn apps_fault(e: BuildpackError) -> BuildpackError {
    match e {
        BuildpackError::BadBuilder(why) => BuildpackError::Project(why),
        other => other,
    }
}

/// Writes the buildpacks the app carries under `root`, once for the whole
/// build: steps see them read-only. Owned by the server, readable by all.
pub fn write_own(root: &Path, own: &[std::sync::Arc<AppBuildpack>]) -> Result<(), BuildpackError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |e| BuildpackError::io("writing the app's buildpacks".into(), e);
    for bp in own {
        let dir = root.join(escape_id(&bp.id));
        for file in &bp.files {
            let path = dir.join(&file.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(fail)?;
                // Readable by the sandbox's user whatever the umask.
                for dir in parent.ancestors().take_while(|d| d.starts_with(root)) {
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                        .map_err(fail)?;
                }
            }
            std::fs::write(&path, &file.bytes).map_err(fail)?;
            let mode = if file.executable { 0o755 } else { 0o644 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
        }
    }
    Ok(())
}

/// The layers a buildpack made: directories with a `<name>.toml` beside them,
/// in name order.
fn read_layers(dir: &Path) -> Result<Layers, BuildpackError> {
    let mut layers = Vec::new();
    let mut metadata = std::collections::BTreeMap::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| BuildpackError::io("reading layers".into(), e))?;
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Some(text) = read_small(&dir.join(format!("{name}.toml"))) else {
            continue;
        };
        let parsed: LayerToml = toml::from_str(&text).unwrap_or_default();
        if let Some(data) = parsed.metadata.filter(|_| parsed.types.launch)
            && let Ok(value) = serde_json::to_value(data)
            && value.to_string().len() <= MAX_LAYER_METADATA
        {
            metadata.insert(name.clone(), value);
        }
        layers.push((name, parsed.types));
    }
    layers.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((layers, metadata))
}

/// A buildpack's layers by name, and its launch layers' metadata.
type Layers = (
    Vec<(String, LayerTypes)>,
    std::collections::BTreeMap<String, serde_json::Value>,
);

/// The most JSON of one layer's metadata carried into the image's label
/// (the whole config, labels included, is a few MiB at most for clients).
const MAX_LAYER_METADATA: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_left_out_is_the_latest_semver() {
        let rootfs = tempfile::tempdir().unwrap();
        for v in ["1.9.0", "1.10.0", "1.11.0-rc.1", "nightly"] {
            std::fs::create_dir_all(rootfs.path().join("cnb/buildpacks/acme_x").join(v)).unwrap();
        }
        let builder = Builder {
            rootfs: rootfs.path().to_owned(),
            env: Vec::new(),
            order: Vec::new(),
        };
        let entry = GroupEntry {
            id: "acme/x".into(),
            version: String::new(),
            optional: false,
            own: None,
        };
        assert_eq!(builder.version_of(&entry).unwrap(), "1.11.0-rc.1");
        std::fs::remove_dir(rootfs.path().join("cnb/buildpacks/acme_x/1.11.0-rc.1")).unwrap();
        assert_eq!(builder.version_of(&entry).unwrap(), "1.10.0");
    }
}
