//! `project.toml`, the project descriptor an app may carry (schema 0.1's
//! `[build]`, 0.2's `[io.buildpacks]`): which files of the app the build
//! sees (`include` or `exclude`, gitignore patterns) and environment for the
//! build (`[[…build.env]]`, platform environment as `pack` passes it).
//! Inline buildpacks and `group` are not used: the builder's order decides.

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
}

/// The descriptor at the root of `app` (none: an empty one).
pub fn read(app: &Path) -> Result<Project, BuildpackError> {
    let Some(text) = inside(app, "project.toml")
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() <= 1 << 20))
        .and_then(|p| std::fs::read_to_string(p).ok())
    else {
        return Ok(Project::default());
    };
    let parsed: ProjectToml = toml::from_str(&text).map_err(|e| {
        BuildpackError::InvalidName(format!("the app's project.toml is not valid: {e}"))
    })?;
    let mut project = Project::default();
    let v2 = parsed.io.buildpacks;
    for table in [parsed.build, v2] {
        project.include.extend(table.include);
        project.exclude.extend(table.exclude);
        let nested = table.build.map(|b| b.env).unwrap_or_default();
        for var in table.env.into_iter().chain(nested) {
            if plain_name(&var.name) {
                project.env.insert(var.name, var.value);
            }
        }
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
            builder.add_line(None, pattern).map_err(|e| {
                BuildpackError::InvalidName(format!("project.toml: the pattern {pattern:?}: {e}"))
            })?;
        }
        let matcher = builder
            .build()
            .map_err(|e| BuildpackError::InvalidName(format!("project.toml: {e}")))?;
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
