//! Module zips are untrusted: checked entry by entry while they are unpacked
//! (every path under `<module>@<version>/`, no `..`, no absolute or odd
//! paths, no symlinks or other special files, no duplicates, a cap on the
//! unpacked bytes and on the file count), and the module's `go.mod` may not
//! point `go build` at directories outside the module.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Seek};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::GoError;

/// More files than any real module has; a zip with more is hostile.
const MAX_FILES: usize = 100_000;

/// A central directory of more than 100,000 entries is refused anyway.
const MAX_DIRECTORY: u64 = 64 << 20;

/// Unix file-type bits in a zip entry's external attributes.
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;

/// Unpacks `zip` (module `module` at `version`) into `dest`, which must be
/// an empty directory; returns the zip's `h1:` hash, as the checksum
/// database records it. Stops at the first problem; the caller removes
/// `dest` then.
pub fn unpack(
    mut zip: impl Read + Seek,
    module: &str,
    version: &str,
    dest: &Path,
    cap: u64,
) -> Result<String, GoError> {
    let refuse = |reason: String| GoError::UnsafeModule {
        module: module.to_owned(),
        version: version.to_owned(),
        reason,
    };
    // The zip crate keeps one entry per name, so a name given twice (which
    // Go refuses) is only seen in the central directory itself.
    let names = central_names(&mut zip).map_err(|e| refuse(format!("not a valid zip: {e}")))?;
    if names.len() > MAX_FILES {
        return Err(refuse(format!("more than {MAX_FILES} files")));
    }
    let mut once = HashSet::new();
    if let Some(twice) = names.iter().find(|n| !once.insert(n.as_slice())) {
        return Err(refuse(format!(
            "multiple entries for {:?}",
            String::from_utf8_lossy(twice)
        )));
    }
    let mut archive =
        zip::ZipArchive::new(zip).map_err(|e| refuse(format!("not a valid zip: {e}")))?;
    if archive.len() > MAX_FILES {
        return Err(refuse(format!("more than {MAX_FILES} files")));
    }
    let prefix = format!("{module}@{version}/");
    let mut seen = HashSet::new();
    let mut hashes = Vec::new();
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
            hashes.push((name, Sha256::digest(b"").into()));
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
        let mut hashed = Hashing(&mut out, Sha256::new());
        let copied = io::copy(&mut (&mut entry).take(budget + 1), &mut hashed)
            .map_err(|e| refuse(format!("{name:?}: {e}")))?;
        hashes.push((name, hashed.1.finalize().into()));
        unpacked += copied;
        if unpacked > cap {
            return Err(GoError::TooLarge {
                what: format!("{module}@{version} unpacked"),
                limit: cap,
            });
        }
    }
    check_go_mod(dest).map_err(refuse)?;
    Ok(super::sumdb::h1(hashes))
}

/// A writer that hashes what it writes.
struct Hashing<'a, W>(&'a mut W, Sha256);

impl<W: io::Write> io::Write for Hashing<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// The name of every entry in a zip's central directory, in order (read
/// from the end-of-central-directory record, zip64 included).
fn central_names(zip: &mut (impl Read + Seek)) -> io::Result<Vec<Vec<u8>>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let len = zip.seek(io::SeekFrom::End(0))?;
    // The record is 22 bytes plus a comment of at most 65535.
    let tail_len = len.min(22 + 65_535);
    zip.seek(io::SeekFrom::Start(len - tail_len))?;
    let mut tail = vec![0u8; tail_len as usize];
    zip.read_exact(&mut tail)?;
    let at = tail
        .windows(4)
        .rposition(|w| w == b"PK\x05\x06")
        .ok_or_else(|| bad("no end of central directory"))?;
    let eocd = &tail[at..];
    if eocd.len() < 22 {
        return Err(bad("a truncated end of central directory"));
    }
    let u16_at = |b: &[u8], i: usize| u64::from(u16::from_le_bytes([b[i], b[i + 1]]));
    let u32_at =
        |b: &[u8], i: usize| u64::from(u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]));
    let u64_at = |b: &[u8], i: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(x)
    };
    let (mut count, mut size) = (u16_at(eocd, 10), u32_at(eocd, 12));
    // The directory ends where the record after it begins.
    let mut end = len - tail_len + at as u64;
    if count == 0xFFFF || size == 0xFFFF_FFFF {
        // Zip64: a locator just before the record points at the real one.
        let locator = at.checked_sub(20).ok_or_else(|| bad("no zip64 locator"))?;
        if &tail[locator..locator + 4] != b"PK\x06\x07" {
            return Err(bad("no zip64 locator"));
        }
        end = u64_at(&tail, locator + 8);
        zip.seek(io::SeekFrom::Start(end))?;
        let mut record = [0u8; 56];
        zip.read_exact(&mut record)?;
        if &record[..4] != b"PK\x06\x06" {
            return Err(bad("no zip64 end of central directory"));
        }
        (count, size) = (u64_at(&record, 32), u64_at(&record, 40));
    }
    if count > MAX_FILES as u64 + 1 || size > end || size > MAX_DIRECTORY {
        return Err(bad("an implausible central directory"));
    }
    let start = end - size;
    zip.seek(io::SeekFrom::Start(start))?;
    let mut directory = vec![0u8; size as usize];
    zip.read_exact(&mut directory)?;
    let mut names = Vec::new();
    let mut i = 0;
    while names.len() < count as usize {
        let record = directory
            .get(i..i + 46)
            .ok_or_else(|| bad("a truncated central directory"))?;
        if &record[..4] != b"PK\x01\x02" {
            return Err(bad("a damaged central directory"));
        }
        let (name, extra, comment) = (
            u16_at(record, 28) as usize,
            u16_at(record, 30) as usize,
            u16_at(record, 32) as usize,
        );
        let name = directory
            .get(i + 46..i + 46 + name)
            .ok_or_else(|| bad("a truncated central directory"))?;
        names.push(name.to_vec());
        i += 46 + name.len() + extra + comment;
    }
    zip.seek(io::SeekFrom::Start(0))?;
    Ok(names)
}

/// A relative path with plain elements only.
fn check_path(rel: &str) -> Result<(), &'static str> {
    let trimmed = rel.strip_suffix('/').unwrap_or(rel);
    if trimmed.is_empty() {
        return Err("an empty path");
    }
    if rel.contains('\\') || rel.contains(':') {
        return Err("a path with \\ or :");
    }
    // Control characters (a newline above all) could forge the lines the
    // module's `h1:` hash is made of; Go refuses them too.
    if rel.chars().any(char::is_control) {
        return Err("a path with a control character");
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

/// The package the Go files of `dir` declare (`main` if any file declares
/// it), as `go build` would see it without building: test files and files
/// excluded with `//go:build ignore` (generators beside a library) do not
/// count. `None`: no Go files.
pub fn package_name(dir: &Path) -> Option<String> {
    let mut found = None;
    let entries = fs::read_dir(dir).ok()?;
    for entry in entries.flatten().take(MAX_FILES) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.ends_with(".go") || name.ends_with("_test.go") {
            continue;
        }
        let meta = entry.metadata().ok()?;
        if !meta.is_file() {
            continue;
        }
        let mut head = Vec::new();
        let file = fs::File::open(entry.path()).ok()?;
        let _ = file.take(64 * 1024).read_to_end(&mut head);
        let Some(package) = package_clause(&String::from_utf8_lossy(&head)) else {
            continue;
        };
        if package == "main" {
            return Some(package);
        }
        found.get_or_insert(package);
    }
    found
}

/// The name in a Go file's `package` clause, unless a build constraint
/// before it says `ignore`.
fn package_clause(text: &str) -> Option<String> {
    let mut rest = text;
    loop {
        rest = rest.trim_start();
        if let Some(line) = rest.strip_prefix("//") {
            let (comment, after) = line.split_once('\n').unwrap_or((line, ""));
            if let Some(constraint) = comment.strip_prefix("go:build")
                && constraint
                    .split(|c: char| !c.is_alphanumeric() && c != '_')
                    .any(|w| w == "ignore")
            {
                return None;
            }
            rest = after;
        } else if let Some(block) = rest.strip_prefix("/*") {
            rest = block.split_once("*/")?.1;
        } else {
            break;
        }
    }
    let name = rest.strip_prefix("package")?;
    if !name.starts_with(char::is_whitespace) {
        return None;
    }
    let name: String = name
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
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
        unpack(zip_of(entries), "a.com/m", "v1.0.0", dir.path(), 1 << 20).map(drop)
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
    fn a_newline_in_a_name_is_refused() {
        let entries: &[(&str, Option<u32>, &[u8])] = &[(
            "a.com/m@v1.0.0/auth.go\n0000  a.com/m@v1.0.0/x.go",
            None,
            b"package main",
        )];
        let err = try_unpack(entries).unwrap_err();
        assert!(err.to_string().contains("control character"), "{err}");
    }

    #[test]
    fn package_clauses_are_read_past_comments_and_ignored_files_skipped() {
        assert_eq!(
            package_clause("// Copyright\n\n/* x */ package main\n").as_deref(),
            Some("main")
        );
        assert_eq!(
            package_clause("package lib // comment").as_deref(),
            Some("lib")
        );
        assert_eq!(package_clause("//go:build ignore\n\npackage main\n"), None);
        assert_eq!(
            package_clause("//go:build linux\npackage main").as_deref(),
            Some("main")
        );
        assert_eq!(package_clause("packagemain"), None);
    }

    #[test]
    fn a_name_given_twice_is_refused_as_go_refuses_it() {
        // The zip crate will not write a name twice: write two, then make
        // the second name the first's, in its local header and directory.
        let zip = zip_of(&[
            ("a.com/m@v1.0.0/main.go", None, b"package main"),
            ("a.com/m@v1.0.0/main.gp", None, b"package evil"),
        ])
        .into_inner();
        let patched = String::from_utf8_lossy(&zip).contains("main.gp");
        assert!(patched);
        let mut bytes = zip;
        for i in 0..bytes.len() - 7 {
            if &bytes[i..i + 7] == b"main.gp" {
                bytes[i + 6] = b'o';
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let err = unpack(Cursor::new(bytes), "a.com/m", "v1.0.0", dir.path(), 1 << 20).unwrap_err();
        assert!(
            err.to_string()
                .contains("multiple entries for \"a.com/m@v1.0.0/main.go\""),
            "{err}"
        );
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
