//! Buildpack environment files (`env/`, `env.build/`, `env.launch/`) and a
//! layer's `bin`/`lib` directories, applied to an environment the way the
//! CNB lifecycle does: a file's name up to the first `.` is the variable;
//! no suffix or `.override` replaces, `.default` sets if unset, `.prepend`
//! and `.append` join with the delimiter in `<name>.delim` (none if absent).

use std::collections::BTreeMap;
use std::path::Path;

/// An environment being built up, in a fixed (sorted) order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env(pub BTreeMap<String, String>);

impl Env {
    pub fn from_list(list: &[String]) -> Env {
        Env(list
            .iter()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    pub fn to_list(&self) -> Vec<String> {
        self.0.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    fn prepend(&mut self, key: &str, value: &str, delim: &str) {
        let new = match self.0.get(key) {
            Some(old) if !old.is_empty() => format!("{value}{delim}{old}"),
            _ => value.to_owned(),
        };
        self.0.insert(key.to_owned(), new);
    }

    fn append(&mut self, key: &str, value: &str, delim: &str) {
        let new = match self.0.get(key) {
            Some(old) if !old.is_empty() => format!("{old}{delim}{value}"),
            _ => value.to_owned(),
        };
        self.0.insert(key.to_owned(), new);
    }

    /// A layer as seen at `inside` (its path in the container or sandbox),
    /// read from `host_dir`: `bin` → PATH, `lib` → LD_LIBRARY_PATH, then
    /// `env/` and the `phase` directory (`env.build` or `env.launch`).
    pub fn apply_layer(&mut self, host_dir: &Path, inside: &str, phase: &str) {
        // Layers are written by buildpacks: a symlink here could point the
        // host at its own files, so only real directories count.
        if !crate::files::is_real_dir(host_dir) {
            return;
        }
        if crate::files::is_real_dir(&host_dir.join("bin")) {
            self.prepend("PATH", &format!("{inside}/bin"), ":");
        }
        if crate::files::is_real_dir(&host_dir.join("lib")) {
            self.prepend("LD_LIBRARY_PATH", &format!("{inside}/lib"), ":");
        }
        self.apply_dir(&host_dir.join("env"));
        self.apply_dir(&host_dir.join(phase));
    }

    /// The files of one env directory (regular files only; symlinks are
    /// ignored so that a layer cannot point the host at other files).
    pub fn apply_dir(&mut self, dir: &Path) {
        if !crate::files::is_real_dir(dir) {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut files: Vec<(String, String)> = Vec::new();
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !kind.is_file() {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if meta.len() > 64 * 1024 {
                continue;
            }
            let value = std::fs::read_to_string(entry.path()).unwrap_or_default();
            files.push((name, value));
        }
        files.sort();
        let delims: BTreeMap<&str, &str> = files
            .iter()
            .filter_map(|(n, v)| n.strip_suffix(".delim").map(|k| (k, v.as_str())))
            .collect();
        for (name, value) in &files {
            let (key, suffix) = name.split_once('.').unwrap_or((name, ""));
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                continue;
            }
            let delim = delims.get(key).copied().unwrap_or("");
            match suffix {
                "" | "override" => {
                    self.0.insert(key.to_owned(), value.clone());
                }
                "default" => {
                    self.0
                        .entry(key.to_owned())
                        .or_insert_with(|| value.clone());
                }
                "prepend" => self.prepend(key, value, delim),
                "append" => self.append(key, value, delim),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinked_env_directories_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let secret = tempfile::tempdir().unwrap();
        std::fs::write(secret.path().join("TOKEN"), "hunter2").unwrap();
        std::os::unix::fs::symlink(secret.path(), dir.path().join("env.launch")).unwrap();
        let mut env = Env::default();
        env.apply_layer(dir.path(), "/layers/a/b", "env.launch");
        assert!(!env.0.contains_key("TOKEN"));
    }

    #[test]
    fn env_files_follow_the_lifecycle_rules() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path();
        std::fs::create_dir_all(layer.join("bin")).unwrap();
        std::fs::create_dir_all(layer.join("env.launch")).unwrap();
        std::fs::create_dir_all(layer.join("env")).unwrap();
        let w = |p: &str, v: &str| std::fs::write(layer.join(p), v).unwrap();
        w("env/GREETING", "hi");
        w("env/KEEP.default", "layer");
        w("env/NEW.default", "layer");
        w("env/OPTS.append", "-b");
        w("env/OPTS.delim", " ");
        w("env.launch/MODE.override", "launch");
        let mut env = Env::from_list(&["PATH=/bin".into(), "KEEP=image".into(), "OPTS=-a".into()]);
        env.apply_layer(layer, "/layers/a/tool", "env.launch");
        let e = &env.0;
        assert_eq!(e["PATH"], "/layers/a/tool/bin:/bin");
        assert_eq!(e["GREETING"], "hi");
        assert_eq!(e["KEEP"], "image");
        assert_eq!(e["NEW"], "layer");
        assert_eq!(e["OPTS"], "-a -b");
        assert_eq!(e["MODE"], "launch");
        let mut build = Env::default();
        build.apply_layer(layer, "/layers/a/tool", "env.build");
        assert!(!build.0.contains_key("MODE"));
    }
}
