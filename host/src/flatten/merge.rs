//! Flattening: an image's layers merged into one, as the container runtime
//! would see the filesystem, with the config kept and the rootfs replaced.
//!
//! The merge streams, in two passes over the layers with bounded memory (the
//! names of the entries and the headers of directories, never file contents).
//! The first pass applies the layers, bottom first, to a tree of names as a
//! runtime unpacks them: a layer's whiteouts (`.wh.<name>` deletes a path and
//! what is under it, `.wh..wh..opq` hides everything lower in its directory)
//! act on the layers below it, then its entries replace what is at their
//! paths (a non-directory hides what was under the same path). Regular files
//! are inodes: a hardlink names its target's inode as it is at that moment,
//! so a later layer that replaces, deletes or turns the target into a
//! directory leaves the link with the old content, and the paths that still
//! share an inode at the end are one hardlink group. The second pass writes
//! the survivors: every directory first (sorted, so parents come before
//! children), then each file where its content is, the rest of its group as
//! links right after it. Names are bytes (Linux allows any but `/` and NUL);
//! only paths that would escape the root (`..`) are dropped. PAX records
//! (extended attributes such as `security.capability`, long ids, sub-second
//! times) go with their entries. Decompressed bytes are capped against tar
//! bombs; a layer that is not a valid (gzipped) tar is an invalid image, not a
//! server error.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::image::layer::{finish, layer_tar};
use crate::image::read::{LayerInput, Whiteout, clean_bytes, open_layer, whiteout_bytes};
use crate::image::{Cancel, ImageError, LayerBlob, io_error};
use crate::storage::ContentStore;

/// Counts bytes read through it, failing once `limit` is passed.
struct Capped<R> {
    inner: R,
    read: u64,
    limit: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "unpacked size over the limit",
            ));
        }
        Ok(n)
    }
}

fn tar_error(e: io::Error) -> ImageError {
    if e.kind() == io::ErrorKind::FileTooLarge {
        return ImageError::TooLarge {
            what: "the unpacked layers",
            limit: 0,
        };
    }
    match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof => {
            ImageError::Invalid(format!("a layer is not a valid tar stream: {e}"))
        }
        _ => ImageError::io("reading a layer", e),
    }
}

/// One pass over the layers: what every read needs, and the bytes unpacked
/// so far across the layers, against `limit`.
struct Pass<'a> {
    store: &'a ContentStore,
    handle: &'a tokio::runtime::Handle,
    limit: u64,
    cancel: &'a Cancel,
    unpacked: u64,
}

impl Pass<'_> {
    /// Reads one layer's entries in order, calling `visit` with each entry's
    /// position in the layer and its path, for paths inside the root.
    fn entries(
        &mut self,
        layer: &LayerInput,
        mut visit: impl FnMut(
            usize,
            Vec<u8>,
            &mut tar::Entry<'_, &mut Capped<Box<dyn Read>>>,
        ) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let limit = self.limit;
        let over = |e: ImageError| match e {
            ImageError::TooLarge { what, .. } => ImageError::TooLarge { what, limit },
            other => other,
        };
        let mut reader = Capped {
            inner: open_layer(self.store, self.handle, layer)?,
            read: self.unpacked,
            limit,
        };
        let mut archive = tar::Archive::new(&mut reader);
        for (position, entry) in archive
            .entries()
            .map_err(|e| over(tar_error(e)))?
            .enumerate()
        {
            self.cancel.check()?;
            let mut entry = entry.map_err(|e| over(tar_error(e)))?;
            if let Some(path) = clean_bytes(&entry.path_bytes()) {
                visit(position, path, &mut entry).map_err(over)?;
            }
        }
        self.unpacked = reader.read;
        Ok(())
    }
}

/// Where an entry is: its layer and its position in that layer.
type At = (usize, usize);

/// An entry's header with its PAX records (but the ones naming paths, which
/// the writer sets itself).
struct Saved {
    header: tar::Header,
    pax: Vec<(String, Vec<u8>)>,
}

impl Saved {
    fn of(entry: &mut tar::Entry<'_, impl Read>) -> Result<Saved, ImageError> {
        let mut pax = Vec::new();
        if let Some(records) = entry.pax_extensions().map_err(tar_error)? {
            for record in records {
                let record = record.map_err(tar_error)?;
                let Ok(key) = record.key() else { continue };
                if !matches!(key, "path" | "linkpath") {
                    pax.push((key.to_owned(), record.value_bytes().to_vec()));
                }
            }
        }
        Ok(Saved {
            header: entry.header().clone(),
            pax,
        })
    }

    /// Writes the PAX records (but `skip`) that go before the entry.
    fn write_pax<W: io::Write>(
        &self,
        out: &mut tar::Builder<W>,
        skip: &[&str],
    ) -> Result<(), ImageError> {
        let records = self
            .pax
            .iter()
            .filter(|(k, _)| !skip.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_slice()));
        out.append_pax_extensions(records)
            .map_err(io_error("writing the layer"))
    }
}

/// What is at a path of the merged tree, and which entry put it there.
enum Node {
    Dir(At, Box<Saved>),
    /// A regular file: an index into the inodes.
    File(usize),
    /// A symlink or a special file.
    Other(At),
}

/// One entry of a layer, as the first pass keeps it.
enum Op {
    Dir(Box<Saved>),
    File,
    Link(Vec<u8>),
    Other,
}

/// The merged tree of names: what the first pass builds.
#[derive(Default)]
struct Tree {
    paths: BTreeMap<Vec<u8>, Node>,
    /// Each inode's creating entry.
    inodes: Vec<At>,
    /// Hardlinks that could not be made (no regular file at their target).
    dropped: usize,
}

impl Tree {
    /// Removes everything under `dir` (all of it for the root, `""`).
    fn remove_under(&mut self, dir: &[u8]) {
        if dir.is_empty() {
            self.paths.clear();
            return;
        }
        let (mut low, mut high) = (dir.to_vec(), dir.to_vec());
        low.push(b'/');
        high.push(b'/' + 1);
        let under: Vec<Vec<u8>> = self
            .paths
            .range(low..high)
            .map(|(k, _)| k.clone())
            .collect();
        for path in under {
            self.paths.remove(&path);
        }
    }

    /// Puts `node` at `path`, replacing what was there; a non-directory
    /// also replaces what was under it (a directory keeps its contents, even
    /// ones its layer wrote before it).
    fn put(&mut self, path: Vec<u8>, node: Node) {
        if !matches!(node, Node::Dir(..)) {
            self.remove_under(&path);
        }
        self.paths.insert(path, node);
    }

    /// Applies one layer: its whiteouts to what is below, then its entries.
    fn apply(
        &mut self,
        layer: usize,
        ops: Vec<(usize, Vec<u8>, Op)>,
        whiteouts: Vec<Whiteout<Vec<u8>>>,
    ) {
        for w in whiteouts {
            match w {
                Whiteout::Opaque(dir) => self.remove_under(&dir),
                Whiteout::Delete(path) => {
                    // `.wh.`, `.wh..`, `.wh...` name nothing to remove.
                    let name = path.rsplit(|b| *b == b'/').next().unwrap_or_default();
                    if matches!(name, b"" | b"." | b"..") {
                        continue;
                    }
                    self.remove_under(&path);
                    self.paths.remove(&path);
                }
            }
        }
        for (position, path, op) in ops {
            let at = (layer, position);
            match op {
                Op::Dir(saved) => self.put(path, Node::Dir(at, saved)),
                Op::File => {
                    self.inodes.push(at);
                    self.put(path, Node::File(self.inodes.len() - 1));
                }
                Op::Other => self.put(path, Node::Other(at)),
                Op::Link(target) => match self.paths.get(&target) {
                    Some(Node::File(inode)) => {
                        let inode = *inode;
                        self.put(path, Node::File(inode));
                    }
                    // A link to a symlink or a device is the same thing under
                    // another name: written as a copy.
                    Some(Node::Other(at)) => {
                        let at = *at;
                        self.put(path, Node::Other(at));
                    }
                    // A runtime could not make this link either.
                    _ => self.dropped += 1,
                },
            }
        }
    }
}

/// What the second pass writes at an entry's place in the layers.
enum Write {
    /// An inode's paths, sorted: the first with the content, the rest as links.
    Group(Vec<Vec<u8>>),
    /// A symlink or special file, under each of these paths.
    Other(Vec<Vec<u8>>),
    /// A directory under a symlink (or another non-directory): written where
    /// it was, after what it goes through.
    Dir(Vec<u8>, Box<Saved>),
}

/// Merges `layers` (bottom first) into one gzipped layer in storage.
pub(super) fn merge(
    store: &ContentStore,
    handle: &tokio::runtime::Handle,
    layers: &[LayerInput],
    limit: u64,
    cancel: &Cancel,
) -> Result<LayerBlob, ImageError> {
    let pass = || Pass {
        store,
        handle,
        limit,
        cancel,
        unpacked: 0,
    };
    // Pass 1, bottom-up: the merged tree of names.
    let mut tree = Tree::default();
    let mut first = pass();
    for (index, layer) in layers.iter().enumerate() {
        let (mut ops, mut whiteouts) = (Vec::new(), Vec::new());
        first.entries(layer, |position, path, entry| {
            if let Some(w) = whiteout_bytes(&path) {
                whiteouts.push(w);
                return Ok(());
            }
            let kind = entry.header().entry_type();
            // Old tars mark directories by a trailing slash alone.
            let old_dir = kind == tar::EntryType::Regular && entry.path_bytes().ends_with(b"/");
            let op = match kind {
                tar::EntryType::Directory => Op::Dir(Box::new(Saved::of(entry)?)),
                _ if old_dir => {
                    let mut saved = Saved::of(entry)?;
                    saved.header.set_entry_type(tar::EntryType::Directory);
                    saved.header.set_size(0);
                    Op::Dir(Box::new(saved))
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => Op::File,
                tar::EntryType::Link => {
                    match entry.link_name_bytes().and_then(|t| clean_bytes(&t)) {
                        Some(target) => Op::Link(target),
                        None => return Ok(()),
                    }
                }
                tar::EntryType::Symlink
                | tar::EntryType::Char
                | tar::EntryType::Block
                | tar::EntryType::Fifo => Op::Other,
                // Extended headers were folded into the entries by the reader;
                // anything else has no place in a container filesystem.
                _ => return Ok(()),
            };
            ops.push((position, path, op));
            Ok(())
        })?;
        tree.apply(index, ops, whiteouts);
    }
    if tree.dropped > 0 {
        tracing::warn!(
            links = tree.dropped,
            "dropped hardlinks to no regular file (a runtime could not make them either)"
        );
    }

    // What to write where: each inode's group at its content, the rest at
    // their entries; directories now, parents first.
    let mut groups: Vec<Vec<Vec<u8>>> = vec![Vec::new(); tree.inodes.len()];
    let mut writes: HashMap<At, Write> = HashMap::new();
    let mut dirs = Vec::new();
    let non_dirs: std::collections::HashSet<Vec<u8>> = tree
        .paths
        .iter()
        .filter(|(_, node)| !matches!(node, Node::Dir(..)))
        .map(|(path, _)| path.clone())
        .collect();
    let through_non_dir = |path: &[u8]| {
        path.iter()
            .enumerate()
            .any(|(i, b)| *b == b'/' && non_dirs.contains(&path[..i]))
    };
    for (path, node) in std::mem::take(&mut tree.paths) {
        match node {
            Node::Dir(at, saved) if through_non_dir(&path) => {
                writes.insert(at, Write::Dir(path, saved));
            }
            Node::Dir(_, saved) => dirs.push((path, saved)),
            Node::File(inode) => groups[inode].push(path),
            Node::Other(at) => {
                if let Write::Other(paths) =
                    writes.entry(at).or_insert_with(|| Write::Other(Vec::new()))
                {
                    paths.push(path);
                }
            }
        }
    }
    drop(non_dirs);
    for (inode, paths) in groups.into_iter().enumerate() {
        if !paths.is_empty() {
            writes.insert(tree.inodes[inode], Write::Group(paths));
        }
    }
    // Level 1 (zlib-rs's quick strategy): ~20% larger than `gzip -1` of the
    // same tar but ~18% faster than level 2, which is smaller than `gzip -1`
    // (bench/flatten.sh prints both).
    let mut out = layer_tar(store)?;
    for (path, saved) in dirs {
        write_dir(&mut out, path, &saved)?;
    }

    // Pass 2, bottom-up: the content where it is.
    let mut second = pass();
    for (index, layer) in layers.iter().enumerate() {
        second.entries(layer, |position, _, entry| {
            match writes.remove(&(index, position)) {
                Some(Write::Group(paths)) => write_group(&mut out, &paths, entry),
                Some(Write::Other(paths)) => write_other(&mut out, &paths, entry),
                Some(Write::Dir(path, saved)) => write_dir(&mut out, path, &saved),
                None => Ok(()),
            }
        })?;
    }
    finish(out)
}

/// A directory entry, with its PAX records.
fn write_dir<W: io::Write>(
    out: &mut tar::Builder<W>,
    mut name: Vec<u8>,
    saved: &Saved,
) -> Result<(), ImageError> {
    let mut header = saved.header.clone();
    saved.write_pax(out, &[])?;
    name.push(b'/');
    out.append_data(&mut header, as_path(&name), io::empty())
        .map_err(tar_error)
}

fn as_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

/// A regular file under its first path, then its other paths as hardlinks
/// to it.
fn write_group<W: io::Write>(
    out: &mut tar::Builder<W>,
    paths: &[Vec<u8>],
    entry: &mut tar::Entry<'_, impl Read>,
) -> Result<(), ImageError> {
    let saved = Saved::of(entry)?;
    let Some((first, rest)) = paths.split_first() else {
        return Ok(());
    };
    let mut header = saved.header.clone();
    saved.write_pax(out, &[])?;
    out.append_data(&mut header, as_path(first), entry)
        .map_err(tar_error)?;
    for path in rest {
        let mut header = saved.header.clone();
        header.set_entry_type(tar::EntryType::Link);
        header.set_size(0);
        saved.write_pax(out, &["size"])?;
        out.append_link(&mut header, as_path(path), as_path(first))
            .map_err(io_error("writing the layer"))?;
    }
    Ok(())
}

/// A symlink (its target kept as written: the runtime resolves it inside the
/// container's root) or a special file.
fn write_other<W: io::Write>(
    out: &mut tar::Builder<W>,
    paths: &[Vec<u8>],
    entry: &mut tar::Entry<'_, impl Read>,
) -> Result<(), ImageError> {
    let saved = Saved::of(entry)?;
    let target = entry.link_name_bytes().map(|t| t.into_owned());
    for path in paths {
        let mut header = saved.header.clone();
        saved.write_pax(out, &[])?;
        if header.entry_type() == tar::EntryType::Symlink {
            let Some(target) = &target else {
                continue;
            };
            out.append_link(&mut header, as_path(path), as_path(target))
                .map_err(io_error("writing the layer"))?;
        } else {
            out.append_data(&mut header, as_path(path), io::empty())
                .map_err(tar_error)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(position: usize, path: &str) -> (usize, Vec<u8>, Op) {
        (position, path.as_bytes().to_vec(), Op::File)
    }

    fn link(path: &str, target: &str) -> (usize, Vec<u8>, Op) {
        (
            0,
            path.as_bytes().to_vec(),
            Op::Link(target.as_bytes().to_vec()),
        )
    }

    fn inode(tree: &Tree, path: &str) -> Option<usize> {
        match tree.paths.get(path.as_bytes()) {
            Some(Node::File(i)) => Some(*i),
            _ => None,
        }
    }

    #[test]
    fn links_keep_the_inode_their_target_had_when_they_were_made() {
        let mut t = Tree::default();
        let ops = vec![
            file(0, "a"),
            link("b", "a"),
            link("c", "b"),
            file(1, "d"),
            link("e", "d"),
        ];
        t.apply(0, ops, vec![]);
        assert_eq!(inode(&t, "a"), inode(&t, "b"));
        assert_eq!(inode(&t, "b"), inode(&t, "c"));
        // Above: `a` replaced, `d` deleted; the links keep the old content.
        let dir = Op::Dir(Box::new(Saved {
            header: tar::Header::new_gnu(),
            pax: vec![],
        }));
        t.apply(
            1,
            vec![(0, b"a".to_vec(), Op::File), (1, b"x".to_vec(), dir)],
            vec![Whiteout::Delete(b"d".to_vec())],
        );
        assert_ne!(inode(&t, "a"), inode(&t, "b"));
        assert_eq!(inode(&t, "b"), Some(0));
        assert_eq!(inode(&t, "c"), Some(0));
        assert_eq!(inode(&t, "d"), None);
        assert_eq!(inode(&t, "e"), Some(1));
        // A link to a directory cannot be made.
        t.apply(2, vec![link("f", "x")], vec![]);
        assert!(!t.paths.contains_key(&b"f"[..]));
        assert_eq!(t.dropped, 1);
    }

    #[test]
    fn whiteouts_act_below_and_non_directories_hide_what_was_under_them() {
        let mut t = Tree::default();
        let dir = || {
            Op::Dir(Box::new(Saved {
                header: tar::Header::new_gnu(),
                pax: vec![],
            }))
        };
        t.apply(
            0,
            vec![
                (0, b"etc".to_vec(), dir()),
                (1, b"etc/a".to_vec(), Op::File),
                (2, b"var".to_vec(), dir()),
                (3, b"var/x".to_vec(), Op::File),
            ],
            vec![],
        );
        // The opaque marker hides the lower `var/x`, not this layer's `var/y`.
        t.apply(
            1,
            vec![
                (0, b"var/y".to_vec(), Op::File),
                (1, b"etc".to_vec(), Op::Other),
                // A directory after its child keeps it.
                (2, b"late/child".to_vec(), Op::File),
                (3, b"late".to_vec(), dir()),
            ],
            vec![Whiteout::Opaque(b"var".to_vec())],
        );
        let names: Vec<&[u8]> = t.paths.keys().map(Vec::as_slice).collect();
        assert_eq!(
            names,
            vec![&b"etc"[..], b"late", b"late/child", b"var", b"var/y"]
        );
        t.apply(
            2,
            vec![(0, b"\xff\xfe".to_vec(), Op::File)],
            vec![Whiteout::Delete(b"var".to_vec())],
        );
        let names: Vec<&[u8]> = t.paths.keys().map(Vec::as_slice).collect();
        assert_eq!(
            names,
            vec![&b"etc"[..], b"late", b"late/child", b"\xff\xfe"]
        );
    }

    #[test]
    fn empty_whiteouts_remove_nothing_and_links_to_symlinks_are_kept() {
        let mut t = Tree::default();
        t.apply(0, vec![file(0, "a"), (1, b"s".to_vec(), Op::Other)], vec![]);
        t.apply(
            1,
            vec![link("l", "s")],
            vec![
                Whiteout::Delete(Vec::new()),
                Whiteout::Delete(b"x/.".to_vec()),
            ],
        );
        let names: Vec<&[u8]> = t.paths.keys().map(Vec::as_slice).collect();
        assert_eq!(names, vec![&b"a"[..], b"l", b"s"]);
        assert!(matches!(t.paths.get(&b"l"[..]), Some(Node::Other((0, 1)))));
        assert_eq!(t.dropped, 0);
    }
}
