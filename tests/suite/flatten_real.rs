//! `flatten` of a real distribution image, compared with what docker runs:
//! a Debian bookworm minbase made by `debootstrap` (with `libcap2-bin` and
//! `attr`), and two layers written here (docker's vfs builder cannot make
//! opaque markers, user xattrs or links into lower layers) covering
//! hardlinks whose targets change above them, PAX records (file
//! capabilities, user xattrs, sub-second times, big ids), names that are not
//! UTF-8, and directories that come after their children. The original and
//! the flattened image are both pulled, created and exported by docker, and
//! the merged trees compared entry by entry.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use libtest_mimic::Trial;

use crate::mirror::{proxied_mirror, world};
use crate::support::images::{self, Image};
use crate::support::{Docker, docker, get_ok, run, sha256, trial};

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "flatten::a_debian_image_flattens_to_exactly_the_tree_docker_runs",
        debian,
    )]
}

/// `security.capability` for `cap_net_raw+ep` (VFS_CAP_REVISION_2).
const CAP_NET_RAW_EP: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// A layer tar written entry by entry, with PAX records where asked.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h
    }

    fn pax(&mut self, records: &[(&str, &[u8])]) -> anyhow::Result<()> {
        Ok(self.0.append_pax_extensions(records.iter().copied())?)
    }

    fn dir(&mut self, path: &str, mode: u32) -> anyhow::Result<()> {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        Ok(self.0.append_data(&mut h, path, &[][..])?)
    }

    fn file(&mut self, path: impl AsRef<Path>, data: &[u8]) -> anyhow::Result<()> {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        Ok(self.0.append_data(&mut h, path, data)?)
    }

    fn link(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        Ok(self.0.append_link(&mut h, path, target)?)
    }

    fn whiteout(&mut self, path: &str) -> anyhow::Result<()> {
        self.file(path, b"")
    }

    fn done(self) -> anyhow::Result<Vec<u8>> {
        Ok(self.0.into_inner()?)
    }
}

fn non_utf8() -> &'static Path {
    use std::os::unix::ffi::OsStrExt;
    Path::new(std::ffi::OsStr::from_bytes(b"names/caf\xe9-\xff"))
}

/// The layers above Debian: the cases, then what changes them.
fn upper_layers() -> anyhow::Result<Vec<Vec<u8>>> {
    let mut two = Layer::new();
    two.dir("ld", 0o755)?;
    for name in ["a", "c", "e"] {
        two.file(format!("ld/{name}"), format!("{name} v1\n").as_bytes())?;
    }
    two.link("ld/b", "ld/a")?; // a's target is replaced above
    two.link("ld/g", "ld/b")?; // a link to a link
    two.link("ld/d", "ld/c")?; // c is deleted above
    two.link("ld/f", "ld/e")?; // e becomes a directory above
    two.link("ld/lower", "etc/debian_version")?; // into the layer below
    two.dir("cap", 0o755)?;
    two.pax(&[("SCHILY.xattr.security.capability", &CAP_NET_RAW_EP)])?;
    two.file("cap/ping", b"not really ping\n")?;
    two.dir("x", 0o755)?;
    two.pax(&[("SCHILY.xattr.user.kontain", b"yes")])?;
    two.file("x/user", b"an attribute\n")?;
    two.pax(&[
        ("mtime", b"1700000000.123456789"),
        ("uid", b"3000000"),
        ("gid", b"3000001"),
    ])?;
    two.file("x/precise", b"a time and owner\n")?;
    two.dir("names", 0o755)?;
    two.file(non_utf8(), b"not utf-8\n")?;
    two.dir("etc/apt/apt.conf.d", 0o755)?;
    two.file(
        "etc/apt/apt.conf.d/99kontain",
        b"// hidden by the opaque marker\n",
    )?;

    let mut three = Layer::new();
    three.file("ld/a", b"a v2\n")?;
    three.whiteout("ld/.wh.c")?;
    three.dir("ld/e", 0o755)?;
    three.file("ld/e/inside", b"inside\n")?;
    // A directory after its child, with a mode of its own.
    three.file("late/child", b"child\n")?;
    three.dir("late", 0o700)?;
    // Through Debian's `lib -> usr/lib` symlink: lands in usr/lib.
    three.dir("lib/kontain-dir", 0o700)?;
    three.file("lib/kontain-dir/x", b"through a symlink\n")?;
    three.whiteout("etc/apt/apt.conf.d/.wh..wh..opq")?;
    three.file("etc/apt/apt.conf.d/10new", b"// only this one\n")?;
    Ok(vec![two.done()?, three.done()?])
}

/// Debian bookworm minbase with getcap and getfattr, as one layer tar whose
/// xattrs are kept.
fn debian_layer(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let rootfs = dir.join("rootfs");
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=libcap2-bin,attr",
            "bookworm",
        ])
        .arg(&rootfs)
        .arg("http://deb.debian.org/debian"))?;
    let tar = dir.join("base.tar");
    run(Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg("."))?;
    Ok(std::fs::read(tar)?)
}

/// What one path of an exported tree is: type, mode, owner, content (or
/// target), xattrs, and the other paths of its hardlink group.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: char,
    mode: u32,
    owner: (u64, u64),
    content: String,
    xattrs: BTreeMap<String, Vec<u8>>,
    group: BTreeSet<Vec<u8>>,
}

/// Paths docker makes in every container: not part of the image.
fn runtime_made(path: &[u8]) -> bool {
    let path = String::from_utf8_lossy(path);
    matches!(
        path.as_ref(),
        ".dockerenv" | "etc/hostname" | "etc/hosts" | "etc/resolv.conf" | "etc/mtab"
    ) || ["dev", "proc", "sys"]
        .iter()
        .any(|d| path == *d || path.starts_with(&format!("{d}/")))
}

/// The merged tree of an exported container (or of a layer tar).
fn read_tree(tar: &[u8]) -> anyhow::Result<BTreeMap<Vec<u8>, Node>> {
    let mut nodes = BTreeMap::new();
    let mut links: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for entry in tar::Archive::new(tar).entries()? {
        let mut entry = entry?;
        let path = clean(&entry.path_bytes());
        if path.is_empty() || path == b"." || runtime_made(&path) {
            continue;
        }
        let mut xattrs = BTreeMap::new();
        if let Some(records) = entry.pax_extensions()? {
            for r in records {
                let r = r?;
                if let Some(name) = r.key()?.strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(name.to_owned(), r.value_bytes().to_vec());
                }
            }
        }
        let h = entry.header();
        let owner = (h.uid()?, h.gid()?);
        let mode = h.mode()? & 0o7777;
        let kind = h.entry_type();
        let target = entry
            .link_name_bytes()
            .map(|t| t.into_owned())
            .unwrap_or_default();
        let (tag, content) = match kind {
            tar::EntryType::Directory => ('d', String::new()),
            tar::EntryType::Symlink => ('l', String::from_utf8_lossy(&target).into_owned()),
            tar::EntryType::Link => {
                links.push((path, clean(&target)));
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut data = Vec::new();
                entry.read_to_end(&mut data)?;
                ('f', sha256(&data))
            }
            other => (
                format!("{other:?}").chars().next().unwrap_or('?'),
                String::new(),
            ),
        };
        let group = BTreeSet::from([path.clone()]);
        nodes.insert(
            path,
            Node {
                kind: tag,
                mode,
                owner,
                content,
                xattrs,
                group,
            },
        );
    }
    // A link is its target's inode: same node, one group.
    for (path, target) in &links {
        let node = nodes.get_mut(target).with_context(|| {
            format!(
                "a hardlink to {}, which is not in the tree",
                String::from_utf8_lossy(target)
            )
        })?;
        node.group.insert(path.clone());
    }
    for (path, target) in links {
        let node = &nodes[&target];
        let copy = Node {
            kind: node.kind,
            mode: node.mode,
            owner: node.owner,
            content: node.content.clone(),
            xattrs: node.xattrs.clone(),
            group: node.group.clone(),
        };
        nodes.insert(path, copy);
    }
    Ok(nodes)
}

/// `docker create` + `docker export` of `image`: the runtime's merged tree.
fn exported(
    docker: &Docker,
    image: &str,
    dir: &Path,
    name: &str,
) -> anyhow::Result<BTreeMap<Vec<u8>, Node>> {
    docker.run(&["pull", "--quiet", image])?;
    let id = docker.run(&["create", image])?.trim().to_owned();
    let file = dir.join(format!("{name}.tar"));
    let result = docker
        .run(&["export", "-o", &file.display().to_string(), &id])
        .and_then(|_| read_tree(&std::fs::read(&file)?));
    let _ = docker.run(&["rm", &id]);
    let _ = std::fs::remove_file(&file);
    result
}

/// Runs `args` in a container of `image`; its output.
fn in_container(docker: &Docker, image: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["run", "--rm", "--network", "none", image];
    all.extend_from_slice(args);
    docker.run(&all)
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

fn debian() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut layers = vec![debian_layer(dir.path())?];
    layers.extend(upper_layers()?);
    let layout = dir.path().join("layout");
    images::single(
        &layout,
        "v1",
        &Image {
            layers,
            cmd: vec!["/bin/sh".into()],
            architecture: "amd64",
        },
    )?;
    let upstream = world()?.registry.addr;
    world()?
        .registry
        .push(&layout, "v1", "debian", Some("oci"))?;
    let (_proxy, server) = proxied_mirror()?;

    // The flattened layer itself: PAX records kept, parents first.
    let manifest = get_ok(&server, "/v2/flatten/local/debian/manifests/v1")?.json()?;
    let digest = manifest["layers"][0]["digest"].as_str().unwrap_or_default();
    let blob = get_ok(&server, &format!("/v2/flatten/local/debian/blobs/{digest}"))?;
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&blob.body[..]).read_to_end(&mut tar)?;
    let mut dirs = BTreeSet::new();
    for entry in tar::Archive::new(&tar[..]).entries()? {
        let entry = entry?;
        if entry.header().entry_type() == tar::EntryType::Directory {
            dirs.insert(clean(&entry.path_bytes()));
        }
    }
    let mut seen = BTreeSet::new();
    let mut pax = BTreeMap::new();
    for entry in tar::Archive::new(&tar[..]).entries()? {
        let mut entry = entry?;
        let path = clean(&entry.path_bytes());
        if let Some(i) = path.iter().rposition(|b| *b == b'/') {
            let parent = &path[..i];
            assert!(
                seen.contains(parent) || !dirs.contains(parent),
                "{} comes before its directory",
                show(&path)
            );
        }
        if matches!(&path[..], b"x/precise" | b"x/user" | b"cap/ping") {
            let records = entry.pax_extensions()?.context("no PAX records")?;
            let records: BTreeMap<String, Vec<u8>> = records
                .map(|r| {
                    r.map(|r| {
                        (
                            r.key().unwrap_or_default().to_owned(),
                            r.value_bytes().to_vec(),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            pax.insert(path.clone(), records);
        }
        seen.insert(path);
    }
    let record = |path: &[u8], key: &str| {
        pax.get(path)
            .and_then(|r: &BTreeMap<String, Vec<u8>>| r.get(key))
            .cloned()
    };
    assert_eq!(
        record(b"x/precise", "mtime").as_deref(),
        Some(&b"1700000000.123456789"[..])
    );
    assert_eq!(
        record(b"x/precise", "uid").as_deref(),
        Some(&b"3000000"[..])
    );
    assert_eq!(
        record(b"x/user", "SCHILY.xattr.user.kontain").as_deref(),
        Some(&b"yes"[..])
    );
    assert_eq!(
        record(b"cap/ping", "SCHILY.xattr.security.capability").as_deref(),
        Some(&CAP_NET_RAW_EP[..])
    );

    // The runtime's trees, compared entry by entry.
    let docker = docker()?;
    let original = format!("{upstream}/debian:v1");
    let flattened = format!("{}/flatten/local/debian:v1", server.addr);
    let want = exported(docker, &original, dir.path(), "original")?;
    let got = exported(docker, &flattened, dir.path(), "flattened")?;
    let mut differences = Vec::new();
    for path in want.keys().chain(got.keys()).collect::<BTreeSet<_>>() {
        match (want.get(path), got.get(path)) {
            (Some(w), Some(g)) if w == g => {}
            (w, g) => differences.push(format!("{}: docker {w:?}, flattened {g:?}", show(path))),
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {} paths differ:\n{}",
        differences.len(),
        want.len(),
        differences
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("flatten: {} paths, the same as docker's tree", want.len());
    // The cases, as the runtime shows them.
    let node = |p: &[u8]| {
        got.get(p)
            .with_context(|| format!("{} is missing", show(p)))
    };
    assert_eq!(
        node(b"ld/b")?.content,
        sha256(b"a v1\n"),
        "the link keeps the old content"
    );
    assert_eq!(
        node(b"ld/b")?.group,
        BTreeSet::from([b"ld/b".to_vec(), b"ld/g".to_vec()])
    );
    assert_eq!(node(b"ld/d")?.content, sha256(b"c v1\n"));
    assert_eq!(node(b"ld/f")?.content, sha256(b"e v1\n"));
    assert_eq!(node(b"ld/e")?.kind, 'd');
    assert!(
        node(b"ld/lower")?
            .group
            .contains(&b"etc/debian_version"[..])
    );
    assert_eq!(node(b"late")?.mode, 0o700);
    assert_eq!(node(b"usr/lib/kontain-dir")?.mode, 0o700);
    assert_eq!(
        node(b"usr/lib/kontain-dir/x")?.content,
        sha256(b"through a symlink\n")
    );
    assert!(node(non_utf8().as_os_str().as_encoded_bytes())?.kind == 'f');
    assert!(!got.contains_key(&b"etc/apt/apt.conf.d/99kontain"[..]));

    // What tools in the containers see.
    for args in [
        &["/usr/sbin/getcap", "/cap/ping"][..],
        &["/usr/bin/getfattr", "-d", "/x/user"],
        &["/usr/bin/stat", "-c", "%y %u %g", "/x/precise"],
    ] {
        let w = in_container(docker, &original, args)?;
        let g = in_container(docker, &flattened, args)?;
        assert_eq!(w, g, "{args:?}");
        eprintln!("{}: {}", args.join(" "), g.trim());
    }
    let caps = in_container(docker, &flattened, &["/usr/sbin/getcap", "/cap/ping"])?;
    assert!(caps.contains("cap_net_raw"), "{caps}");
    let _ = docker.run(&["rmi", &original, &flattened]);
    Ok(())
}

/// A tar entry's path without `./` or a trailing `/`, as bytes.
fn clean(raw: &[u8]) -> Vec<u8> {
    let path = raw.strip_prefix(b"./").unwrap_or(raw);
    path.strip_suffix(b"/").unwrap_or(path).to_vec()
}
