//! `project.toml`, the project descriptor an app may carry (schema 0.1's
//! `[build]`, 0.2's `[io.buildpacks]`): which files of the app the build
//! sees (`include` or `exclude`, gitignore patterns), environment for the
//! build (`[[…build.env]]`, platform environment as `pack` passes it), and
//! the buildpacks: a `group` that replaces the builder's order, `pre` and
//! `post` groups around each of its groups. An entry names one of the
//! builder's buildpacks (by `id` and optional `version`, or a
//! `urn:cnb:builder:<id>[@<version>]` URI) or is an inline buildpack (a
//! `script` the app carries: it always detects, and its build runs the
//! script, in the sandbox like any other). Buildpacks from anywhere else
//! (registries, URLs) are not fetched: the operator's builder decides what
//! code builds apps, and a build names nothing outside it but the app's own
//! scripts.

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
pub struct Script {
    pub api: String,
    #[serde(default = "default_shell")]
    pub shell: String,
    pub inline: String,
}

fn default_shell() -> String {
    "/bin/sh".to_owned()
}

/// A buildpack `project.toml` names.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// One of the builder's; an empty version is its only one.
    Builder { id: String, version: String },
    /// The app's own script.
    Inline { id: String, script: Script },
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

/// Inline scripts at most (each is a file of the build's own).
const MAX_SCRIPT: usize = 64 * 1024;

fn entry(raw: RawEntry) -> Result<Entry, BuildpackError> {
    let fail = |why: String| Err(BuildpackError::Project(why));
    match (raw.script, raw.uri.as_str()) {
        (Some(script), "") => {
            if raw.id.is_empty() {
                return fail("an inline buildpack needs an id".into());
            }
            if script.inline.len() > MAX_SCRIPT {
                return fail(format!(
                    "the inline buildpack {} is longer than {MAX_SCRIPT} bytes",
                    raw.id
                ));
            }
            let shell_ok = !script.shell.is_empty()
                && script
                    .shell
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
            let api_ok = !script.api.is_empty()
                && script.api.bytes().all(|b| b.is_ascii_digit() || b == b'.');
            if !shell_ok || !api_ok {
                return fail(format!(
                    "the inline buildpack {} has an unusable shell {:?} or api {:?}",
                    raw.id, script.shell, script.api
                ));
            }
            Ok(Entry::Inline { id: raw.id, script })
        }
        (None, "") if !raw.id.is_empty() => Ok(Entry::Builder {
            id: raw.id,
            version: raw.version,
        }),
        (None, uri) if uri.starts_with(BUILDER_URN) => {
            let named = &uri[BUILDER_URN.len()..];
            let (id, version) = named.split_once('@').unwrap_or((named, ""));
            Ok(Entry::Builder {
                id: id.to_owned(),
                version: version.to_owned(),
            })
        }
        (None, "") => fail("a buildpack entry names no id, uri or script".into()),
        (None, uri) => fail(format!(
            "the buildpack {uri:?} is not the builder's: kontain builds with the builder's buildpacks and inline scripts only (name one as id = \"<id>\" or uri = \"{BUILDER_URN}<id>\")"
        )),
        (Some(_), _) => fail(format!(
            "the buildpack {:?} has both a uri and a script",
            raw.id
        )),
    }
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
    let v2 = parsed.io.buildpacks;
    for table in [parsed.build, v2] {
        project.include.extend(table.include);
        project.exclude.extend(table.exclude);
        let entries =
            |raw: Vec<RawEntry>| raw.into_iter().map(entry).collect::<Result<Vec<_>, _>>();
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
        assert_eq!(
            groups.post,
            [Entry::Inline {
                id: "me/inline".into(),
                script: Script {
                    api: "0.10".into(),
                    shell: "/bin/sh".into(),
                    inline: "echo hi".into()
                },
            }]
        );
        // Schema 0.1's group.
        write("[[build.buildpacks]]\nid = \"acme/tool\"\nversion = \"1\"\n");
        assert_eq!(read(dir.path()).unwrap().groups.group.len(), 1);
        for (text, says) in [
            (
                "[[io.buildpacks.group]]\nuri = \"docker://evil/bp\"\n",
                "not the builder's",
            ),
            (
                "[[io.buildpacks.group]]\nuri = \"https://evil/bp.tgz\"\n",
                "not the builder's",
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
