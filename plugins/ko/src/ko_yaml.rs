//! `.ko.yaml`, the module's own build settings, as ko reads them: base
//! images (`defaultBaseImage`, `baseImageOverrides`), `defaultPlatforms`, and
//! per-binary `builds` (`dir`, `main`, `env`, `flags`, `ldflags`), with the
//! `default*` fallbacks. Parsed here, inside the sandbox, because it is
//! untrusted text; the host checks the build options again before using them.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KoYaml {
    pub default_base_image: Option<String>,
    #[serde(default)]
    pub base_image_overrides: BTreeMap<String, String>,
    #[serde(default)]
    pub default_platforms: Platforms,
    #[serde(default)]
    pub builds: Vec<Build>,
    #[serde(default)]
    pub default_env: Vec<String>,
    #[serde(default)]
    pub default_flags: Vec<String>,
    #[serde(default)]
    pub default_ldflags: Vec<String>,
}

/// ko accepts a list or one comma-separated string.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
pub enum Platforms {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct Build {
    #[serde(default)]
    pub dir: Option<String>,
    #[serde(default)]
    pub main: Option<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub ldflags: Vec<String>,
}

/// The options for one package.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub env: Vec<String>,
    pub flags: Vec<String>,
    pub ldflags: Vec<String>,
}

/// Largest `.ko.yaml` we parse (the host reads at most 64 KiB anyway).
const MAX_LEN: usize = 64 * 1024;

impl KoYaml {
    pub fn parse(text: &str) -> Result<KoYaml, String> {
        if text.len() > MAX_LEN {
            return Err(format!("larger than {MAX_LEN} bytes"));
        }
        if text.trim().is_empty() {
            return Ok(KoYaml::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }

    /// The base image for `package`: its override, else the default.
    pub fn base_for(&self, package: &str) -> Option<&str> {
        self.base_image_overrides
            .get(package)
            .or(self.default_base_image.as_ref())
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// `os/arch[/variant]` filters; empty for all (also for `all`).
    pub fn platforms(&self) -> Option<Vec<String>> {
        let list: Vec<String> = match &self.default_platforms {
            Platforms::None => return None,
            Platforms::One(s) => s.split(',').map(|p| p.trim().to_owned()).collect(),
            Platforms::Many(v) => v.iter().map(|p| p.trim().to_owned()).collect(),
        };
        Some(parse_platforms(list))
    }

    /// The build options for `package` of `module`: the `builds` entry whose
    /// `dir` + `main` names the package, else the defaults.
    pub fn options_for(&self, module: &str, package: &str) -> Options {
        let build = self
            .builds
            .iter()
            .find(|b| build_package(module, b).as_deref() == Some(package));
        let pick = |own: Option<&Vec<String>>, default: &Vec<String>| match own {
            Some(v) if !v.is_empty() => v.clone(),
            _ => default.clone(),
        };
        Options {
            env: pick(build.map(|b| &b.env), &self.default_env),
            flags: pick(build.map(|b| &b.flags), &self.default_flags),
            ldflags: pick(build.map(|b| &b.ldflags), &self.default_ldflags),
        }
    }
}

/// `all` (anywhere) means every platform; otherwise the list as given.
pub fn parse_platforms(list: Vec<String>) -> Vec<String> {
    if list.iter().any(|p| p == "all") {
        Vec::new()
    } else {
        list.into_iter().filter(|p| !p.is_empty()).collect()
    }
}

/// The import path a `builds` entry makes: `main` may be an import path or
/// a directory relative to `dir` (itself relative to the module root).
fn build_package(module: &str, build: &Build) -> Option<String> {
    let main = build.main.as_deref().unwrap_or(".");
    if main == module || main.starts_with(&format!("{module}/")) {
        return Some(main.trim_end_matches('/').to_owned());
    }
    let mut parts: Vec<&str> = Vec::new();
    let dir = build.dir.as_deref().unwrap_or(".");
    for part in dir.split('/').chain(main.split('/')) {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(if parts.is_empty() {
        module.to_owned()
    } else {
        format!("{module}/{}", parts.join("/"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
defaultBaseImage: cgr.dev/chainguard/static
baseImageOverrides:
  example.com/hello/cmd/debug: local/busybox:latest
defaultPlatforms:
- linux/amd64
- linux/arm64
defaultLdflags: ["-s", "-w"]
builds:
- id: hello
  dir: .
  main: ./cmd/hello
  flags: [-tags, netgo]
  ldflags: ["-X main.version=1"]
- main: example.com/hello/cmd/other
  env: [GOAMD64=v2]
unknownKey: is fine, as in ko
"#;

    #[test]
    fn parses_what_ko_reads() {
        let k = KoYaml::parse(YAML).unwrap();
        assert_eq!(
            k.base_for("example.com/hello/cmd/debug"),
            Some("local/busybox:latest")
        );
        assert_eq!(
            k.base_for("example.com/hello"),
            Some("cgr.dev/chainguard/static")
        );
        assert_eq!(
            k.platforms(),
            Some(vec!["linux/amd64".to_owned(), "linux/arm64".to_owned()])
        );
        let hello = k.options_for("example.com/hello", "example.com/hello/cmd/hello");
        assert_eq!(hello.flags, ["-tags", "netgo"]);
        assert_eq!(hello.ldflags, ["-X main.version=1"]);
        let other = k.options_for("example.com/hello", "example.com/hello/cmd/other");
        assert_eq!(other.env, ["GOAMD64=v2"]);
        assert_eq!(other.ldflags, ["-s", "-w"]);
        let root = k.options_for("example.com/hello", "example.com/hello");
        assert_eq!(
            root,
            Options {
                env: vec![],
                flags: vec![],
                ldflags: vec!["-s".into(), "-w".into()]
            }
        );
    }

    #[test]
    fn all_means_every_platform_and_strings_split() {
        let k = KoYaml::parse("defaultPlatforms: linux/amd64,linux/arm/v7").unwrap();
        assert_eq!(
            k.platforms(),
            Some(vec!["linux/amd64".to_owned(), "linux/arm/v7".to_owned()])
        );
        let k = KoYaml::parse("defaultPlatforms: all").unwrap();
        assert_eq!(k.platforms(), Some(vec![]));
        assert_eq!(KoYaml::parse("").unwrap().platforms(), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(KoYaml::parse("builds: 7").is_err());
        assert!(KoYaml::parse("[unclosed").is_err());
    }
}
