//! Module zips are untrusted: checked entry by entry while they are unpacked
//! (every path under `<module>@<version>/`, no `..`, no absolute or odd
//! paths, no symlinks or other special files, no duplicates, a cap on the
//! unpacked bytes and on the file count), and the module's `go.mod` may not
//! point `go build` at directories outside the module.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Seek};
use std::path::Path;

use super::GoError;

/// More files than any real module has; a zip with more is hostile.
const MAX_FILES: usize = 100_000;

/// Unix file-type bits in a zip entry's external attributes.
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;

/// Unpacks `zip` (module `module` at `version`) into `dest`, which must be
/// an empty directory. Stops at the first problem; the caller removes
/// `dest` then.
pub fn unpack(
    zip: impl Read + Seek,
    module: &str,
    version: &str,
    dest: &Path,
    cap: u64,
) -> Result<(), GoError> {
    let refuse = |reason: String| GoError::UnsafeModule {
        module: module.to_owned(),
        version: version.to_owned(),
        reason,
    };
    let mut archive =
        zip::ZipArchive::new(zip).map_err(|e| refuse(format!("not a valid zip: {e}")))?;
    if archive.len() > MAX_FILES {
        return Err(refuse(format!("more than {MAX_FILES} files")));
    }
    let prefix = format!("{module}@{version}/");
    let mut seen = HashSet::new();
    let mut unpacked = 0u64;
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| refuse(format!("entry {i}: {e}")))?;
        let name = entry
            .name()
            .map_err(|e| refuse(format!("entry {i} has an unreadable name: {e}")))?
            .into_owned();
        let Some(rel) = name.strip_prefix(&prefix) else {
            return Err(refuse(format!("{name:?} is outside {prefix}")));
        };
        check_path(rel).map_err(|why| refuse(format!("{name:?}: {why}")))?;
        if !seen.insert(rel.trim_end_matches('/').to_ascii_lowercase()) {
            return Err(refuse(format!("{name:?} appears twice (ignoring case)")));
        }
        let kind = entry.unix_mode().map(|m| m & S_IFMT);
        let is_dir = entry.is_dir();
        match kind {
            Some(S_IFDIR) | Some(S_IFREG) | Some(0) | None => {}
            Some(_) => {
                return Err(refuse(format!(
                    "{name:?} is a symlink or special file; module zips hold regular files only"
                )));
            }
        }
        let target = dest.join(rel.trim_end_matches('/'));
        if is_dir || kind == Some(S_IFDIR) {
            fs::create_dir_all(&target)
                .map_err(|e| GoError::io(format!("creating {}", target.display()), e))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| GoError::io(format!("creating {}", parent.display()), e))?;
        }
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(|e| GoError::io(format!("creating {}", target.display()), e))?;
        // The sizes in the zip's headers are the attacker's word; count.
        let budget = cap.saturating_sub(unpacked);
        let copied = io::copy(&mut (&mut entry).take(budget + 1), &mut out)
            .map_err(|e| refuse(format!("{name:?}: {e}")))?;
        unpacked += copied;
        if unpacked > cap {
            return Err(GoError::TooLarge {
                what: format!("{module}@{version} unpacked"),
                limit: cap,
            });
        }
    }
    check_go_mod(dest).map_err(refuse)
}

/// A relative path with plain elements only.
fn check_path(rel: &str) -> Result<(), &'static str> {
    let trimmed = rel.strip_suffix('/').unwrap_or(rel);
    if trimmed.is_empty() {
        return Err("an empty path");
    }
    if rel.contains('\\') || rel.contains('\0') || rel.contains(':') {
        return Err("a path with \\, : or NUL");
    }
    for element in trimmed.split('/') {
        match element {
            "" => return Err("an empty path element (absolute path or //)"),
            "." | ".." => return Err("a path with . or .. elements"),
            _ => {}
        }
    }
    Ok(())
}

/// Refuses `replace` directives with a local directory on the right: they
/// would make `go build` read outside the module (another build's files, or
/// the server's).
fn check_go_mod(dir: &Path) -> Result<(), String> {
    let text = match fs::read_to_string(dir.join("go.mod")) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("go.mod cannot be read: {e}")),
    };
    let mut in_block = false;
    for line in text.lines() {
        let line = line.split("//").next().unwrap_or_default().trim();
        let directive = if in_block {
            if line == ")" {
                in_block = false;
                continue;
            }
            line
        } else if let Some(rest) = line.strip_prefix("replace") {
            let rest = rest.trim();
            if rest == "(" {
                in_block = true;
                continue;
            }
            rest
        } else {
            continue;
        };
        if let Some((_, target)) = directive.split_once("=>") {
            // go.mod strings may be quoted with escapes or backquoted; a
            // quoted target is refused outright rather than interpreted.
            if target.contains(['"', '`', '\\']) {
                return Err(format!(
                    "go.mod has a quoted replacement {:?}; kontain refuses those",
                    target.trim()
                ));
            }
            let target = target.trim();
            let path = target.split_whitespace().next().unwrap_or_default();
            if path.starts_with("./")
                || path.starts_with("../")
                || path.starts_with('/')
                || path == "."
                || path == ".."
            {
                return Err(format!(
                    "go.mod replaces a module with the local directory {path:?}"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};
    use zip::write::SimpleFileOptions;

    fn zip_of(entries: &[(&str, Option<u32>, &[u8])]) -> Cursor<Vec<u8>> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, mode, data) in entries {
            let mut options = SimpleFileOptions::default();
            if let Some(mode) = mode {
                options = options.unix_permissions(*mode);
            }
            match mode {
                Some(m) if m & S_IFMT == 0o120_000 => {
                    w.add_symlink(*name, std::str::from_utf8(data).unwrap(), options)
                        .unwrap();
                }
                _ => {
                    w.start_file(*name, options).unwrap();
                    w.write_all(data).unwrap();
                }
            }
        }
        Cursor::new(w.finish().unwrap().into_inner())
    }

    fn try_unpack(entries: &[(&str, Option<u32>, &[u8])]) -> Result<(), GoError> {
        let dir = tempfile::tempdir().unwrap();
        unpack(zip_of(entries), "a.com/m", "v1.0.0", dir.path(), 1 << 20)
    }

    #[test]
    fn a_plain_module_unpacks() {
        let dir = tempfile::tempdir().unwrap();
        let zip = zip_of(&[
            ("a.com/m@v1.0.0/go.mod", None, b"module a.com/m\n"),
            ("a.com/m@v1.0.0/cmd/x/main.go", None, b"package main\n"),
        ]);
        unpack(zip, "a.com/m", "v1.0.0", dir.path(), 1 << 20).unwrap();
        assert!(dir.path().join("cmd/x/main.go").is_file());
    }

    #[test]
    fn escaping_and_special_entries_are_refused() {
        for bad in [
            "a.com/m@v1.0.0/../evil",
            "a.com/m@v1.0.0/x/../../evil",
            "a.com/m@v1.0.0//etc/passwd",
            "other@v1.0.0/x",
            "a.com/m@v1.0.0/x\\y",
        ] {
            let err = try_unpack(&[(bad, None, b"x")]).unwrap_err();
            assert!(matches!(err, GoError::UnsafeModule { .. }), "{bad}: {err}");
        }
        let err =
            try_unpack(&[("a.com/m@v1.0.0/link", Some(0o120_777), b"/etc/passwd")]).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        let err = try_unpack(&[
            ("a.com/m@v1.0.0/A.go", None, b"x"),
            ("a.com/m@v1.0.0/a.go", None, b"x"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
    }

    #[test]
    fn unpacked_bytes_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![0u8; 4096];
        let zip = zip_of(&[("a.com/m@v1.0.0/big", None, &big)]);
        let err = unpack(zip, "a.com/m", "v1.0.0", dir.path(), 1000).unwrap_err();
        assert!(matches!(err, GoError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn local_replacements_are_refused() {
        for (text, ok) in [
            ("module a.com/m\nreplace b.com/x => b.com/y v1.0.0\n", true),
            ("module a.com/m\nreplace b.com/x => ../x\n", false),
            (
                "module a.com/m\nreplace (\n\tb.com/x v1.0.0 => /etc\n)\n",
                false,
            ),
            (
                "module a.com/m\nreplace (\n\tb.com/x => c.com/x v1.2.0\n)\n",
                true,
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("go.mod"), text).unwrap();
            assert_eq!(check_go_mod(dir.path()).is_ok(), ok, "{text}");
        }
    }
}
