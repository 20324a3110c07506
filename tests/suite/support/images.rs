//! Test images written as OCI layouts on disk, to be pushed to the test
//! upstream registry with skopeo.

use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;

use super::sha256;

/// One entry of a layer.
pub enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    /// A regular file whose raw name may escape the root (`../x`): written
    /// byte for byte, since tar writers rightly refuse such names.
    Raw(&'a str, &'a [u8]),
}

/// An uncompressed layer tar of `entries`, mtimes 0.
pub fn layer(entries: &[Entry<'_>]) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        match entry {
            Entry::Dir(path) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder.append_data(&mut header, path, &[][..])?;
            }
            Entry::File(path, data, mode) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, *data)?;
            }
            Entry::Symlink(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, path, target)?;
            }
            Entry::Raw(name, data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(data.len() as u64);
                let raw = &mut header.as_old_mut().name;
                raw.fill(0);
                raw[..name.len()].copy_from_slice(name.as_bytes());
                header.set_cksum();
                builder.append(&header, *data)?;
            }
            Entry::Hardlink(path, target) => {
                header.set_entry_type(tar::EntryType::Link);
                header.set_mode(0o644);
                header.set_size(0);
                builder.append_link(&mut header, path, target)?;
            }
        }
    }
    Ok(builder.into_inner()?)
}

/// A single-platform image: layers (uncompressed tars, bottom first) and the
/// command it runs.
pub struct Image {
    pub layers: Vec<Vec<u8>>,
    pub cmd: Vec<String>,
    pub architecture: &'static str,
}

fn write_blob(layout: &Path, bytes: &[u8]) -> anyhow::Result<(String, u64)> {
    let digest = sha256(bytes);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(digest.trim_start_matches("sha256:")), bytes)?;
    Ok((digest, bytes.len() as u64))
}

fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Write;
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(bytes)?;
    Ok(gz.finish()?)
}

/// Writes the image's blobs and manifest into `layout`; returns the
/// manifest's descriptor.
fn write_image(layout: &Path, image: &Image) -> anyhow::Result<serde_json::Value> {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in &image.layers {
        diff_ids.push(sha256(tar));
        let (digest, size) = write_blob(layout, &gzip(tar)?)?;
        layers.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": size,
        }));
    }
    let config = json!({
        "architecture": image.architecture,
        "os": "linux",
        "config": { "Cmd": image.cmd, "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": image.layers.iter().map(|_| json!({"created_by": "test"})).collect::<Vec<_>>(),
    });
    let (config_digest, config_size) = write_blob(layout, config.to_string().as_bytes())?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers,
    });
    let (digest, size) = write_blob(layout, manifest.to_string().as_bytes())?;
    Ok(json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest,
        "size": size,
        "platform": { "os": "linux", "architecture": image.architecture },
    }))
}

fn write_layout(layout: &Path, tag: &str, mut descriptor: serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    descriptor["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
    let index = json!({ "schemaVersion": 2, "manifests": [descriptor] });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    Ok(())
}

/// An OCI layout at `layout` holding `image` as `tag`.
pub fn single(layout: &Path, tag: &str, image: &Image) -> anyhow::Result<()> {
    let mut descriptor = write_image(layout, image)?;
    descriptor.as_object_mut().map(|o| o.remove("platform"));
    write_layout(layout, tag, descriptor)
}

/// An OCI layout at `layout` holding an index of `images` as `tag`.
pub fn index(layout: &Path, tag: &str, images: &[Image]) -> anyhow::Result<()> {
    let manifests = images
        .iter()
        .map(|image| write_image(layout, image))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    let (digest, size) = write_blob(layout, index.to_string().as_bytes())?;
    write_layout(
        layout,
        tag,
        json!({ "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": size }),
    )
}

/// A runnable image: Debian's static busybox as /bin/busybox, /bin/sh
/// linking to it.
pub fn busybox(cmd: &[&str], architecture: &'static str) -> anyhow::Result<Image> {
    let busybox = std::fs::read("/bin/busybox")?;
    let tar = layer(&[
        Entry::Dir("bin"),
        Entry::File("bin/busybox", &busybox, 0o755),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::Symlink("bin/echo", "busybox"),
        Entry::Symlink("bin/cat", "busybox"),
    ])?;
    Ok(Image {
        layers: vec![tar],
        cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
        architecture,
    })
}
