//! Go import paths and module versions as the module proxy protocol spells
//! them: validation of what a request names, the proxy's case escaping, and
//! semantic-version ordering for `@v/list`.

use std::cmp::Ordering;
use std::fmt;

/// A Go import path a request names: `example.com/org/repo/cmd/tool`.
///
/// Stricter than Go itself where that keeps us safe: ASCII letters, digits
/// and `-._~+` in each element, no empty, `.`-leading or `..` element, and a
/// first element with a dot (a domain), as module paths need.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImportPath(String);

impl ImportPath {
    pub fn parse(path: &str) -> Result<ImportPath, String> {
        let bad = |why: &str| Err(format!("{path:?} is not a Go import path: {why}"));
        if path.is_empty() || path.len() > 512 {
            return bad("it must have 1 to 512 characters");
        }
        for element in path.split('/') {
            if element.is_empty() {
                return bad("it has an empty element");
            }
            if element.starts_with('.') || element.ends_with('.') {
                return bad("an element starts or ends with a dot");
            }
            let ok = element
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~+".contains(&b));
            if !ok {
                return bad("use letters, digits and -._~+ only");
            }
        }
        let first = path.split('/').next().unwrap_or_default();
        if !first.contains('.') {
            return bad("the first element must be a domain, like example.com");
        }
        Ok(ImportPath(path.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path and each shorter prefix that could be a module path, longest
    /// first: `a.com/b/c`, `a.com/b`, `a.com`.
    pub fn module_candidates(&self) -> impl Iterator<Item = &str> {
        let path = self.0.as_str();
        let ends = path
            .match_indices('/')
            .map(|(i, _)| i)
            .chain([path.len()])
            .collect::<Vec<_>>();
        ends.into_iter().rev().map(move |end| &path[..end])
    }

    /// The package's directory relative to `module` (`""` for the root), if
    /// the package is inside it.
    pub fn relative_to(&self, module: &str) -> Option<&str> {
        let rest = self.0.strip_prefix(module)?;
        if rest.is_empty() {
            Some("")
        } else {
            rest.strip_prefix('/')
        }
    }

    /// The last element: the binary's name.
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
}

impl fmt::Display for ImportPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A version query from a tag: `latest`, `v1.2.3`, a branch or a commit.
/// Docker's tag grammar already excludes `/` and `+`; this keeps proxy URLs
/// plain.
pub fn check_query(query: &str) -> Result<(), String> {
    let ok = !query.is_empty()
        && query.len() <= 128
        && !query.starts_with('.')
        && query
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{query:?} is not a Go version: use latest, a tag like v1.2.3, a branch or a commit"
        ))
    }
}

/// The module proxy's case encoding: each uppercase letter becomes `!` and
/// its lowercase, so that paths survive case-insensitive file systems.
pub fn escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 4);
    for c in path.chars() {
        if c.is_ascii_uppercase() {
            out.push('!');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A parsed `vMAJOR.MINOR.PATCH[-pre][+build]`.
#[derive(Debug, PartialEq, Eq)]
struct SemVer<'a> {
    core: [u64; 3],
    pre: Option<&'a str>,
}

fn parse_semver(v: &str) -> Option<SemVer<'_>> {
    let v = v.strip_prefix('v')?;
    let v = v.split('+').next()?;
    let (core, pre) = match v.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (v, None),
    };
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let core = [parts.next()??, parts.next()??, parts.next()??];
    if parts.next().is_some() {
        return None;
    }
    Some(SemVer { core, pre })
}

fn compare_pre(a: Option<&str>, b: Option<&str>) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(a), Some(b)) => {
            for (x, y) in a.split('.').zip(b.split('.')) {
                let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    (Ok(_), Err(_)) => Ordering::Less,
                    (Err(_), Ok(_)) => Ordering::Greater,
                    (Err(_), Err(_)) => x.cmp(y),
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
            a.split('.').count().cmp(&b.split('.').count())
        }
    }
}

/// The semver lines of a version list, in semver order.
pub fn versions_of(list: &str) -> Vec<String> {
    let mut versions: Vec<(&str, SemVer<'_>)> = list
        .lines()
        .map(str::trim)
        .filter_map(|v| parse_semver(v).map(|s| (v, s)))
        .collect();
    versions.sort_by(|(_, a), (_, b)| a.core.cmp(&b.core).then(compare_pre(a.pre, b.pre)));
    versions.dedup_by(|(a, _), (b, _)| a == b);
    versions.into_iter().map(|(v, _)| v.to_owned()).collect()
}

/// What `go` picks as `@latest` from a version list: the highest release,
/// else the highest pre-release. Lines that are not semver are ignored.
pub fn latest_of(list: &str) -> Option<String> {
    let versions: Vec<(&str, SemVer<'_>)> = list
        .lines()
        .map(str::trim)
        .filter_map(|v| parse_semver(v).map(|s| (v, s)))
        .collect();
    let best = |release: bool| {
        versions
            .iter()
            .filter(|(_, s)| s.pre.is_none() == release)
            .max_by(|(_, a), (_, b)| a.core.cmp(&b.core).then(compare_pre(a.pre, b.pre)))
            .map(|(v, _)| (*v).to_owned())
    };
    best(true).or_else(|| best(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_paths_are_checked_and_split_into_candidates() {
        let p = ImportPath::parse("example.com/org/repo/cmd/tool").unwrap();
        let c: Vec<_> = p.module_candidates().collect();
        assert_eq!(
            c,
            [
                "example.com/org/repo/cmd/tool",
                "example.com/org/repo/cmd",
                "example.com/org/repo",
                "example.com/org",
                "example.com"
            ]
        );
        assert_eq!(p.relative_to("example.com/org/repo"), Some("cmd/tool"));
        assert_eq!(p.relative_to("example.com/org/re"), None);
        assert_eq!(p.relative_to("example.com/org/repo/cmd/tool"), Some(""));
        assert_eq!(p.name(), "tool");
        for bad in [
            "",
            "nodot/x",
            "a.com//b",
            "a.com/../b",
            "a.com/.git",
            "a.com/b c",
            "a.com/b\\c",
            "/a.com",
        ] {
            assert!(ImportPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uppercase_is_escaped() {
        assert_eq!(
            escape("github.com/Azure/azure-sdk"),
            "github.com/!azure/azure-sdk"
        );
        assert_eq!(escape("example.com/BIG"), "example.com/!b!i!g");
    }

    #[test]
    fn latest_prefers_releases_then_highest() {
        assert_eq!(
            latest_of("v1.0.0\nv1.10.0\nv1.9.0\nv2.0.0-rc.1\n").as_deref(),
            Some("v1.10.0")
        );
        assert_eq!(
            latest_of("v0.1.0-alpha.2\nv0.1.0-alpha.10\n").as_deref(),
            Some("v0.1.0-alpha.10")
        );
        assert_eq!(latest_of("main\n"), None);
    }

    #[test]
    fn queries_are_plain() {
        assert!(check_query("latest").is_ok());
        assert!(check_query("v1.2.3").is_ok());
        assert!(check_query("0123abcd").is_ok());
        assert!(check_query("../x").is_err());
        assert!(check_query("a/b").is_err());
    }
}
