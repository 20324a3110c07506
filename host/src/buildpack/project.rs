//! `project.toml`, the project descriptor an app may carry (schema 0.1's
//! `[build]`, 0.2's `[io.buildpacks]`): which files of the app the build
//! sees (`include` or `exclude`, gitignore patterns), environment for the
//! build (`[[…build.env]]`, platform environment as `pack` passes it), and
//! the buildpacks: a `group` that replaces the builder's order, `pre` and
//! `post` groups around each of its groups. An entry names one of the
//! builder's buildpacks (by `id` and optional `version`, or a
//! `urn:cnb:builder:<id>[@<version>]` URI), or one the app carries: an
//! inline buildpack (a `script`: it always detects, its build runs the
//! script) or a buildpack directory of the app (a relative `uri`, as
//! buildpacks/samples' apps have theirs). The app's own buildpacks are read
//! here, whole and bounded, and run in the sandbox like any other.
//! Buildpacks from anywhere else (registries, URLs, server paths) are not
//! fetched: the operator's builder decides what code builds apps, and a
//! build runs nothing outside it but what the app itself carries.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::BuildpackError;
use crate::files::inside;

#[derive(Default, Deserialize)]
struct ProjectToml {
    #[serde(default)]
    build: Build,
    #[serde(default)]
    io: Io,
}

#[derive(Default, Deserialize)]
struct Io {
    #[serde(default)]
    buildpacks: Build,
}

#[derive(Default, Deserialize)]
struct Build {
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    /// Schema 0.2 puts `env` under `[io.buildpacks.build]`.
    #[serde(default)]
    build: Option<Box<Build>>,
    /// Schema 0.1's group: `[[build.buildpacks]]`.
    #[serde(default)]
    buildpacks: Vec<RawEntry>,
    /// Schema 0.2's: `[[io.buildpacks.group]]`, `[[io.buildpacks.pre.group]]`
    /// and `[[io.buildpacks.post.group]]`.
    #[serde(default)]
    group: Vec<RawEntry>,
    #[serde(default)]
    pre: Option<Around>,
    #[serde(default)]
    post: Option<Around>,
}

#[derive(Default, Deserialize)]
struct Around {
    #[serde(default)]
    group: Vec<RawEntry>,
}

#[derive(Deserialize)]
struct RawEntry {
    #[serde(default)]
    id: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    uri: String,
    script: Option<Script>,
}

/// An inline buildpack's script.
#[derive(Clone, Debug, Deserialize, PartialEq)]
struct Script {
    api: String,
    #[serde(default = "default_shell")]
    shell: String,
    inline: String,
}

fn default_shell() -> String {
    "/bin/sh".to_owned()
}

/// A buildpack `project.toml` names.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// One of the builder's; an empty version is its latest.
    Builder { id: String, version: String },
    /// One the app carries.
    App(std::sync::Arc<AppBuildpack>),
}

/// A buildpack the app carries (an inline script, or a directory of the
/// repository), read whole: the build writes its files once, for the
/// sandbox to run read-only, and never reads the app for it again.
#[derive(Debug, PartialEq)]
pub struct AppBuildpack {
    pub id: String,
    pub version: String,
    /// Its Buildpack API (`buildpack.toml`'s `api`).
    pub api: String,
    pub files: Vec<AppFile>,
}

#[derive(Debug, PartialEq)]
pub struct AppFile {
    /// Relative to the buildpack's directory.
    pub path: String,
    pub bytes: Vec<u8>,
    pub executable: bool,
}

/// The buildpacks `project.toml` asks for.
#[derive(Default)]
pub struct Groups {
    /// Replaces the builder's order when not empty.
    pub group: Vec<Entry>,
    pub pre: Vec<Entry>,
    pub post: Vec<Entry>,
}

/// The prefix of URIs naming one of the builder's buildpacks.
const BUILDER_URN: &str = "urn:cnb:builder:";

/// The version of an inline buildpack (it has none of its own).
const INLINE_VERSION: &str = "0.0.0";

/// What the buildpacks an app carries may hold in all: how many, bytes,
/// files.
const MAX_APP_BUILDPACKS: usize = 16;
const MAX_APP_BUILDPACK_BYTES: u64 = 16 * 1024 * 1024;
const MAX_APP_BUILDPACK_FILES: usize = 1000;

/// Ids whose layers directory would be one the platform writes
/// (`/layers/sbom`, `/layers/config`, …): the builder's buildpacks are the
/// operator's to get right, the app's are refused.
const RESERVED_IDS: [&str; 4] = ["app", "config", "generated", "sbom"];

fn fail<T>(why: String) -> Result<T, BuildpackError> {
    Err(BuildpackError::Project(why))
}

/// An API version as the spec writes one: digits and dots.
fn plain_api(api: &str) -> bool {
    !api.is_empty() && api.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// What the app's own buildpacks have used so far: [`MAX_APP_BUILDPACKS`],
/// [`MAX_APP_BUILDPACK_BYTES`] and [`MAX_APP_BUILDPACK_FILES`] bound them
/// together.
#[derive(Default)]
struct Budget {
    buildpacks: usize,
    bytes: u64,
    files: usize,
}

impl Budget {
    fn spend(&mut self, what: &str, bytes: u64, files: usize) -> Result<(), BuildpackError> {
        self.bytes += bytes;
        self.files += files;
        if self.bytes > MAX_APP_BUILDPACK_BYTES || self.files > MAX_APP_BUILDPACK_FILES {
            return fail(format!(
                "at {what}, the app's own buildpacks pass {MAX_APP_BUILDPACK_BYTES} bytes or {MAX_APP_BUILDPACK_FILES} files"
            ));
        }
        Ok(())
    }
}

fn entry(raw: RawEntry, app: &Path, budget: &mut Budget) -> Result<Entry, BuildpackError> {
    // The spec: a version, a uri or a script, never two of them.
    let given = [
        !raw.version.is_empty(),
        !raw.uri.is_empty(),
        raw.script.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        return fail(format!(
            "the buildpack entry {:?} has more than one of version, uri and script",
            raw.id
        ));
    }
    let app_buildpack = |entry: Result<AppBuildpack, BuildpackError>, budget: &mut Budget| {
        let bp = entry?;
        budget.buildpacks += 1;
        if budget.buildpacks > MAX_APP_BUILDPACKS {
            return fail(format!(
                "it names more than {MAX_APP_BUILDPACKS} buildpacks of the app's own"
            ));
        }
        if RESERVED_IDS.contains(&bp.id.as_str()) {
            return fail(format!("the buildpack id {:?} is reserved", bp.id));
        }
        Ok(Entry::App(std::sync::Arc::new(bp)))
    };
    match (raw.script, raw.uri.as_str()) {
        (Some(script), _) => app_buildpack(inline(raw.id, script, budget), budget),
        (None, "") if !raw.id.is_empty() => Ok(Entry::Builder {
            id: raw.id,
            version: raw.version,
        }),
        (None, "") => fail("a buildpack entry names no id, uri or script".into()),
        (None, uri) if uri.starts_with(BUILDER_URN) => {
            let named = &uri[BUILDER_URN.len()..];
            let (id, version) = named.split_once('@').unwrap_or((named, ""));
            Ok(Entry::Builder {
                id: id.to_owned(),
                version: version.to_owned(),
            })
        }
        // A path in the repository, as `pack` reads one (relative to the
        // descriptor); never an absolute path, which would be the server's.
        (None, uri) if !uri.contains(':') && !uri.starts_with('/') => {
            app_buildpack(directory(uri, app, budget), budget)
        }
        (None, uri) => fail(format!(
            "the buildpack {uri:?} is neither the builder's nor the app's own: kontain does not fetch buildpacks (name one of the builder's as id = \"<id>\" or uri = \"{BUILDER_URN}<id>\", or carry it in the repository)"
        )),
    }
}

/// An inline buildpack as `pack` lays one out: detect passes, build runs
/// the script with its shell.
fn inline(id: String, script: Script, budget: &mut Budget) -> Result<AppBuildpack, BuildpackError> {
    if id.is_empty() {
        return fail("an inline buildpack needs an id".into());
    }
    // The shell goes on a shebang line: an absolute path and at most one
    // option, or a bare name looked up on PATH; plain characters only.
    let plain = |w: &str| {
        !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
    };
    let shebang = match script.shell.split_once(' ') {
        None if script.shell.starts_with('/') && plain(&script.shell) => {
            Some(format!("#!{}", script.shell))
        }
        None if plain(&script.shell) && !script.shell.starts_with('-') => {
            Some(format!("#!/usr/bin/env {}", script.shell))
        }
        Some((path, option))
            if path.starts_with('/') && plain(path) && option.starts_with('-') && plain(option) =>
        {
            Some(format!("#!{path} {option}"))
        }
        _ => None,
    };
    let (Some(shebang), true) = (shebang, plain_api(&script.api)) else {
        return fail(format!(
            "the inline buildpack {id} has an unusable shell {:?} or api {:?}",
            script.shell, script.api
        ));
    };
    budget.spend(&id, script.inline.len() as u64, 3)?;
    let descriptor = toml::to_string(&toml::toml! {
        api = (script.api.clone())
        [buildpack]
        id = (id.clone())
        version = INLINE_VERSION
    })
    .map_err(|e| BuildpackError::Project(e.to_string()))?;
    let file = |path: &str, bytes: String, executable| AppFile {
        path: path.to_owned(),
        bytes: bytes.into_bytes(),
        executable,
    };
    Ok(AppBuildpack {
        files: vec![
            file("buildpack.toml", descriptor, false),
            file("bin/detect", format!("{shebang}\nexit 0\n"), true),
            file("bin/build", format!("{shebang}\n{}\n", script.inline), true),
        ],
        id,
        version: INLINE_VERSION.to_owned(),
        api: script.api,
    })
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(default)]
    api: String,
    buildpack: DescriptorInfo,
    #[serde(default)]
    order: Vec<toml::Value>,
}

#[derive(Deserialize)]
struct DescriptorInfo {
    id: String,
    version: String,
}

/// A buildpack directory in the repository at `rel` (under `app`): its
/// directories and regular files (symlinks are left out: they point into
/// the app or the server, not into the buildpack).
fn directory(rel: &str, app: &Path, budget: &mut Budget) -> Result<AppBuildpack, BuildpackError> {
    let dir = inside(app, rel)
        .filter(|d| std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir()))
        .ok_or_else(|| {
            BuildpackError::Project(format!(
                "the buildpack {rel:?} is not a directory of the app"
            ))
        })?;
    let text = inside(&dir, "buildpack.toml")
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() <= 1 << 20))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .ok_or_else(|| {
            BuildpackError::Project(format!("the buildpack {rel:?} has no buildpack.toml"))
        })?;
    let descriptor: Descriptor = toml::from_str(&text)
        .map_err(|e| BuildpackError::Project(format!("{rel}/buildpack.toml: {e}")))?;
    if !descriptor.order.is_empty() {
        return fail(format!(
            "the buildpack {rel:?} is a composite: the app's own buildpacks run their bin/detect and bin/build"
        ));
    }
    let api = match descriptor.api.as_str() {
        "" => super::launcher::BUILDPACK_API.to_owned(),
        api if plain_api(api) => api.to_owned(),
        api => return fail(format!("{rel}/buildpack.toml: unusable api {api:?}")),
    };
    let mut files = Vec::new();
    let mut stack = vec![(dir, String::new())];
    let io = |e| BuildpackError::io(format!("reading the app's buildpack {rel}"), e);
    while let Some((at, prefix)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&at)
            .map_err(io)?
            .collect::<Result<_, _>>()
            .map_err(io)?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = format!("{prefix}{name}");
            let meta = entry.metadata().map_err(io)?;
            if meta.is_dir() {
                stack.push((entry.path(), format!("{path}/")));
            } else if meta.is_file() {
                use std::os::unix::fs::PermissionsExt;
                budget.spend(rel, meta.len(), 1)?;
                files.push(AppFile {
                    path,
                    bytes: std::fs::read(entry.path()).map_err(io)?,
                    executable: meta.permissions().mode() & 0o111 != 0,
                });
            }
        }
    }
    for needed in ["bin/detect", "bin/build"] {
        if !files.iter().any(|f| f.path == needed) {
            return fail(format!("the buildpack {rel:?} has no {needed}"));
        }
    }
    let DescriptorInfo { id, version } = descriptor.buildpack;
    if !usable(&id) || !usable(&version) || version.contains('/') {
        return fail(format!(
            "{rel}/buildpack.toml: {id:?}@{version:?} is not a usable buildpack id and version"
        ));
    }
    Ok(AppBuildpack {
        id,
        version,
        api,
        files,
    })
}

/// A buildpack id or version usable in a path: plain characters, no
/// leading dot, no `..`.
fn usable(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && !s.contains("..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

#[derive(Deserialize)]
struct EnvVar {
    name: String,
    value: String,
}

/// What an app's `project.toml` asks of its build.
#[derive(Default)]
pub struct Project {
    include: Vec<String>,
    exclude: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub groups: Groups,
}

/// The descriptor at the root of `app` (none: an empty one).
pub fn read(app: &Path) -> Result<Project, BuildpackError> {
    let Some(text) = inside(app, "project.toml")
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() <= 1 << 20))
        .and_then(|p| std::fs::read_to_string(p).ok())
    else {
        return Ok(Project::default());
    };
    let parsed: ProjectToml = toml::from_str(&text)
        .map_err(|e| BuildpackError::Project(format!("it is not valid: {e}")))?;
    let mut project = Project::default();
    let mut budget = Budget::default();
    let v2 = parsed.io.buildpacks;
    for table in [parsed.build, v2] {
        project.include.extend(table.include);
        project.exclude.extend(table.exclude);
        let mut entries = |raw: Vec<RawEntry>| {
            raw.into_iter()
                .map(|r| entry(r, app, &mut budget))
                .collect::<Result<Vec<_>, _>>()
        };
        project.groups.group.extend(entries(table.buildpacks)?);
        project.groups.group.extend(entries(table.group)?);
        project
            .groups
            .pre
            .extend(entries(table.pre.map(|a| a.group).unwrap_or_default())?);
        project
            .groups
            .post
            .extend(entries(table.post.map(|a| a.group).unwrap_or_default())?);
        let nested = table.build.map(|b| b.env).unwrap_or_default();
        for var in table.env.into_iter().chain(nested) {
            if plain_name(&var.name) {
                project.env.insert(var.name, var.value);
            }
        }
    }
    if !project.include.is_empty() && !project.exclude.is_empty() {
        return Err(BuildpackError::Project(
            "it has both include and exclude; the spec allows one".into(),
        ));
    }
    Ok(project)
}

/// A variable name usable as a file name under `/platform/env`.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Project {
    /// Removes from the app copy at `dir` what the descriptor leaves out:
    /// with `include`, everything it does not name; else what `exclude`
    /// names. The descriptor itself stays.
    pub fn filter(&self, dir: &Path) -> Result<(), BuildpackError> {
        if self.include.is_empty() && self.exclude.is_empty() {
            return Ok(());
        }
        let patterns = match self.include.is_empty() {
            true => &self.exclude,
            false => &self.include,
        };
        let mut builder = ignore::gitignore::GitignoreBuilder::new(dir);
        for pattern in patterns {
            builder
                .add_line(None, pattern)
                .map_err(|e| BuildpackError::Project(format!("the pattern {pattern:?}: {e}")))?;
        }
        let matcher = builder
            .build()
            .map_err(|e| BuildpackError::Project(e.to_string()))?;
        let including = !self.include.is_empty();
        self.prune(dir, dir, &matcher, including)
    }

    /// Walks `at` (under `root`), removing what is left out. With
    /// `including`, a directory stays if anything under it is included.
    fn prune(
        &self,
        root: &Path,
        at: &Path,
        matcher: &ignore::gitignore::Gitignore,
        including: bool,
    ) -> Result<(), BuildpackError> {
        let io = |e| BuildpackError::io("applying project.toml".into(), e);
        for entry in std::fs::read_dir(at).map_err(io)? {
            let entry = entry.map_err(io)?;
            let path = entry.path();
            if path == root.join("project.toml") {
                continue;
            }
            let is_dir = entry.file_type().map_err(io)?.is_dir();
            let matched = matcher
                .matched_path_or_any_parents(&path, is_dir)
                .is_ignore();
            match (including, matched, is_dir) {
                (false, true, _) | (true, false, false) => crate::files::remove(&path),
                (true, false, true) => {
                    self.prune(root, &path, matcher, including)?;
                    let empty = std::fs::read_dir(&path).map_err(io)?.next().is_none();
                    if empty {
                        crate::files::remove(&path);
                    }
                }
                (false, false, true) => self.prune(root, &path, matcher, including)?,
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            let path = dir.path().join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x").unwrap();
        }
        dir
    }

    fn left(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                match e.file_type().unwrap().is_dir() {
                    true => stack.push(e.path()),
                    false => out.push(
                        e.path()
                            .strip_prefix(dir)
                            .unwrap()
                            .to_string_lossy()
                            .into_owned(),
                    ),
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn include_keeps_only_what_it_names_and_the_descriptor() {
        let dir = tree(&[
            "project.toml",
            "src/main.go",
            "src/util/x.go",
            "README.md",
            "docs/a.md",
        ]);
        std::fs::write(
            dir.path().join("project.toml"),
            "[_]\nschema-version = \"0.2\"\n[io.buildpacks]\ninclude = [\"src/**/*.go\"]\n",
        )
        .unwrap();
        read(dir.path()).unwrap().filter(dir.path()).unwrap();
        assert_eq!(
            left(dir.path()),
            ["project.toml", "src/main.go", "src/util/x.go"]
        );
    }

    #[test]
    fn groups_name_the_builders_buildpacks_or_inline_scripts() {
        let dir = tree(&["project.toml"]);
        let write = |text: &str| std::fs::write(dir.path().join("project.toml"), text).unwrap();
        write(
            "[_]\nschema-version = \"0.2\"\n\
             [[io.buildpacks.group]]\nid = \"acme/tool\"\n\
             [[io.buildpacks.group]]\nuri = \"urn:cnb:builder:acme/app@1.2.3\"\n\
             [[io.buildpacks.post.group]]\nid = \"me/inline\"\n\
             [io.buildpacks.post.group.script]\napi = \"0.10\"\ninline = \"echo hi\"\n",
        );
        let groups = read(dir.path()).unwrap().groups;
        assert_eq!(
            groups.group,
            [
                Entry::Builder {
                    id: "acme/tool".into(),
                    version: String::new()
                },
                Entry::Builder {
                    id: "acme/app".into(),
                    version: "1.2.3".into()
                },
            ]
        );
        assert!(groups.pre.is_empty());
        let [Entry::App(inline)] = groups.post.as_slice() else {
            panic!("{:?}", groups.post);
        };
        assert_eq!(
            (
                inline.id.as_str(),
                inline.version.as_str(),
                inline.api.as_str()
            ),
            ("me/inline", "0.0.0", "0.10")
        );
        let file = |path: &str| {
            let f = inline.files.iter().find(|f| f.path == path).unwrap();
            (String::from_utf8_lossy(&f.bytes).into_owned(), f.executable)
        };
        assert_eq!(file("bin/build"), ("#!/bin/sh\necho hi\n".into(), true));
        assert_eq!(file("bin/detect"), ("#!/bin/sh\nexit 0\n".into(), true));
        assert!(file("buildpack.toml").0.contains("id = \"me/inline\""));
        // A shell with an option; a bare name, looked up on PATH.
        for (shell, line) in [
            ("/bin/bash -e", "#!/bin/bash -e"),
            ("bash", "#!/usr/bin/env bash"),
        ] {
            write(&format!(
                "[[io.buildpacks.group]]\nid = \"a/b\"\n[io.buildpacks.group.script]\napi = \"0.10\"\nshell = \"{shell}\"\ninline = \"x\"\n"
            ));
            let groups = read(dir.path()).unwrap().groups;
            let [Entry::App(bp)] = groups.group.as_slice() else {
                panic!()
            };
            assert!(
                String::from_utf8_lossy(&bp.files[2].bytes).starts_with(line),
                "{shell}"
            );
        }
        // A buildpack directory in the repository, as buildpacks/samples
        // carries one (schema 0.1, a relative uri): its files, read whole;
        // a symlink in it left out.
        let bp = dir.path().join("own-bp");
        std::fs::create_dir_all(bp.join("bin")).unwrap();
        std::fs::write(
            bp.join("buildpack.toml"),
            "api = \"0.9\"\n[buildpack]\nid = \"me/own\"\nversion = \"1.0.0\"\n",
        )
        .unwrap();
        for script in ["detect", "build"] {
            std::fs::write(bp.join("bin").join(script), "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(
                bp.join("bin").join(script),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", bp.join("passwd")).unwrap();
        write("[[build.buildpacks]]\nuri = \"own-bp/\"\n");
        let groups = read(dir.path()).unwrap().groups;
        let [Entry::App(own)] = groups.group.as_slice() else {
            panic!("{:?}", groups.group)
        };
        assert_eq!(
            (own.id.as_str(), own.version.as_str(), own.api.as_str()),
            ("me/own", "1.0.0", "0.9")
        );
        let paths: Vec<(&str, bool)> = own
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.executable))
            .collect();
        assert_eq!(
            paths,
            [
                ("buildpack.toml", false),
                ("bin/build", true),
                ("bin/detect", true)
            ]
        );
        // Schema 0.1's group.
        write("[[build.buildpacks]]\nid = \"acme/tool\"\nversion = \"1\"\n");
        assert_eq!(read(dir.path()).unwrap().groups.group.len(), 1);
        for (text, says) in [
            (
                "[[io.buildpacks.group]]\nuri = \"docker://evil/bp\"\n",
                "does not fetch",
            ),
            (
                "[[io.buildpacks.group]]\nuri = \"https://evil/bp.tgz\"\n",
                "does not fetch",
            ),
            (
                "[[io.buildpacks.group]]\nuri = \"/srv/buildpacks/x\"\n",
                "does not fetch",
            ),
            (
                "[[io.buildpacks.group]]\nuri = \"../outside\"\n",
                "not a directory of the app",
            ),
            (
                "[[io.buildpacks.group]]\nid = \"a/b\"\nversion = \"1\"\nuri = \"urn:cnb:builder:a/b\"\n",
                "more than one of",
            ),
            (
                "[[io.buildpacks.group]]\nid = \"sbom\"\n[io.buildpacks.group.script]\napi = \"0.10\"\ninline = \"x\"\n",
                "reserved",
            ),
            ("[[io.buildpacks.group]]\nversion = \"1\"\n", "no id"),
            (
                "[[io.buildpacks.group]]\n[io.buildpacks.group.script]\napi = \"0.10\"\ninline = \"x\"\n",
                "needs an id",
            ),
            (
                "[[io.buildpacks.group]]\nid = \"a/b\"\n[io.buildpacks.group.script]\napi = \"0.10\"\nshell = \"/bin/sh\\nrm\"\ninline = \"x\"\n",
                "unusable shell",
            ),
            (
                "[io.buildpacks]\ninclude = [\"a\"]\nexclude = [\"b\"]\n",
                "both include and exclude",
            ),
        ] {
            write(text);
            let e = read(dir.path())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn exclude_and_env_of_schema_0_1() {
        let dir = tree(&["project.toml", "keep.txt", "tmp/a", "b.log"]);
        std::fs::write(
            dir.path().join("project.toml"),
            "[build]\nexclude = [\"tmp/\", \"*.log\"]\n[[build.env]]\nname = \"BP_X\"\nvalue = \"1\"\n[[build.env]]\nname = \"../bad\"\nvalue = \"2\"\n",
        )
        .unwrap();
        let project = read(dir.path()).unwrap();
        project.filter(dir.path()).unwrap();
        assert_eq!(left(dir.path()), ["keep.txt", "project.toml"]);
        assert_eq!(
            project.env.into_iter().collect::<Vec<_>>(),
            [("BP_X".to_owned(), "1".to_owned())]
        );
    }
}
