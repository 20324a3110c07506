//! ko images: a Go program built natively and put on a base image the way
//! ko does it, so that images behave like `ko build`'s:
//!
//! - a kodata layer: `<package dir>/kodata/**` under `/var/run/ko` (with the
//!   directories `/var`, `/var/run`, `/var/run/ko`), then a binary layer with
//!   `/ko-app/<last element of the import path>`; modes 0555, mtimes 0;
//! - config from the base, with `Entrypoint = ["/ko-app/<name>"]`, no `Cmd`,
//!   `:/ko-app` added to `PATH`, `KO_DATA_PATH=/var/run/ko`, and the creation
//!   time fixed at the epoch;
//! - layer media types matching the base's; annotations naming the base
//!   (`org.opencontainers.image.base.name` / `.base.digest`);
//! - an index when the base has several platforms, a plain image for one.
//!
//! The same module version, package, options and base digest always give the
//! same digest (the Go toolchain's own output is reproducible under
//! `-trimpath`), and results are cached under exactly that key.

use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::{BuildOptions, Go, GoError, ImportPath, Module, Target, Workspace, sbom};
use crate::image::assemble::{add_layers, extend};
use crate::image::json::{canonical, config_env, digest_of, inner_config, parse, read_config};
use crate::image::layer::{Fixed, write_layer};
use crate::image::{ImageError, LayerBlob, invalid};
use crate::oci::{Digest, MediaType};
use crate::storage::{ContentStore, StoredManifest};
use crate::upstream::Scoped;

const EPOCH: &str = "1970-01-01T00:00:00Z";
const KODATA_ROOT: &str = "var/run/ko";
const APP_DIR: &str = "ko-app";
const AUTHOR: &str = "kontain ko";
/// Bump when the image layout changes, so cached results are not reused
/// (2: images come with their SBOM).
const LAYOUT_VERSION: u32 = 2;

/// One ko build request.
pub struct KoBuild<'a> {
    pub module: &'a Module,
    pub package: &'a ImportPath,
    pub options: &'a BuildOptions,
    /// The base image's repository (`cgr.dev/chainguard/static`).
    pub base_image: &'a str,
    /// The base image as the request named it (`cgr.dev/chainguard/static:latest`).
    pub base_reference: &'a str,
    pub base: &'a StoredManifest,
    /// `os/arch[/variant]` filters; empty for every platform of the base.
    pub platforms: &'a [String],
    pub accept: &'a [String],
    /// `go env GOVERSION`: a new toolchain may compile differently.
    pub go_version: &'a str,
}

/// One platform image of the base.
struct Child {
    /// The base index's descriptor for it (absent for a single image).
    descriptor: Option<Value>,
    manifest: StoredManifest,
    target: Target,
}

/// Every entry of ko's layers: owned by root, mode 0555, mtime 0.
const FIXED: Fixed = Fixed {
    owner: (0, 0),
    mtime: 0,
    dir_mode: 0o555,
    file_mode: |_| 0o555,
    symlinks: false,
};

fn target_of(platform: &Value) -> Target {
    let s = |k: &str| platform[k].as_str().unwrap_or_default().to_owned();
    Target {
        os: s("os"),
        arch: s("architecture"),
        variant: platform["variant"]
            .as_str()
            .filter(|v| !v.is_empty())
            .map(str::to_owned),
    }
}

/// Whether `target` is one of `filters` (`os/arch[/variant]`); no filters
/// means every platform.
fn wanted(target: &Target, filters: &[String]) -> bool {
    filters.is_empty()
        || filters.iter().any(|f| {
            let mut parts = f.split('/');
            let (os, arch, variant) = (parts.next(), parts.next(), parts.next());
            os == Some(target.os.as_str())
                && arch == Some(target.arch.as_str())
                && variant.is_none_or(|v| target.variant.as_deref() == Some(v))
        })
}

impl Go {
    /// Builds `build.package` onto `build.base` (fetched through `upstream`)
    /// and stores the result; once, and cached under everything that
    /// decides it.
    pub async fn image(
        &self,
        upstream: &Scoped<'_>,
        build: KoBuild<'_>,
    ) -> Result<StoredManifest, GoError> {
        let key = cache_key(&build)?;
        let built = self
            .builds
            .build(&key, || async {
                crate::activity::phase("reading the base image");
                let children = self.children(upstream, &build).await?;
                let workspace = {
                    let module = build.module.clone();
                    let work = self.work_dir();
                    crate::image::work::blocking(move || Workspace::new(&module, &work)).await?
                };
                let kodata = {
                    let store = self.builds.store().clone();
                    let dir = kodata_dir(build.module, build.package);
                    self.builds
                        .cpu()
                        .run(move |_| kodata_layer(&store, dir.as_deref()))
                        .await?
                };
                let mut images = Vec::new();
                let mut infos = Vec::new();
                for child in &children {
                    let (image, info) = self
                        .platform_image(upstream, &build, &workspace, &kodata, child)
                        .await?;
                    images.push(image);
                    infos.push(info);
                }
                match (build.base.media_type.as_str(), images.len()) {
                    (MediaType::OCI_INDEX | MediaType::DOCKER_MANIFEST_LIST, n) if n > 1 => {
                        let index = self.index(&build, &children, &images).await?;
                        if let Some(info) = infos.iter().flatten().next() {
                            self.attach_sbom(&build, &index, &info.common()).await?;
                        }
                        Ok::<_, GoError>(index)
                    }
                    _ => Ok(images.swap_remove(0)),
                }
            })
            .await?;
        tracing::info!(package = %build.package, version = %build.module.version, digest = %built.digest, "built a ko image");
        Ok(built)
    }

    /// The base's platform images that the build wants.
    async fn children(
        &self,
        upstream: &Scoped<'_>,
        build: &KoBuild<'_>,
    ) -> Result<Vec<Child>, GoError> {
        let base = build.base;
        let mut children = Vec::new();
        match base.media_type.as_str() {
            MediaType::OCI_INDEX | MediaType::DOCKER_MANIFEST_LIST => {
                let index = parse(&base.bytes, "the base index")?;
                for descriptor in index["manifests"].as_array().cloned().unwrap_or_default() {
                    let target = target_of(&descriptor["platform"]);
                    // Windows images need .exe binaries and another layer
                    // layout; they are left out rather than built wrong.
                    if target.os != "linux"
                        || target.arch == "unknown"
                        || !wanted(&target, build.platforms)
                    {
                        continue;
                    }
                    let digest = digest_of(&descriptor)?;
                    let manifest = upstream
                        .manifest(build.base_image, &digest.to_string(), build.accept)
                        .await?;
                    if !matches!(
                        manifest.media_type.as_str(),
                        MediaType::OCI_MANIFEST | MediaType::DOCKER_MANIFEST
                    ) {
                        continue;
                    }
                    children.push(Child {
                        descriptor: Some(descriptor),
                        manifest,
                        target,
                    });
                }
            }
            MediaType::OCI_MANIFEST | MediaType::DOCKER_MANIFEST => {
                let manifest = parse(&base.bytes, "the base manifest")?;
                let config = self
                    .base_config(upstream, build.base_image, &manifest)
                    .await?;
                let target = Target {
                    os: config["os"].as_str().unwrap_or("linux").to_owned(),
                    arch: config["architecture"]
                        .as_str()
                        .unwrap_or("amd64")
                        .to_owned(),
                    variant: config["variant"].as_str().map(str::to_owned),
                };
                if !wanted(&target, build.platforms) {
                    return Err(invalid(format!(
                        "the base image {} is {target}, not one of the platforms asked for ({})",
                        build.base_image,
                        build.platforms.join(", ")
                    ))
                    .into());
                }
                children.push(Child {
                    descriptor: None,
                    manifest: base.clone(),
                    target,
                });
            }
            other => return Err(invalid(format!("a base image cannot be a {other}")).into()),
        }
        if children.is_empty() {
            return Err(invalid(format!(
                "the base image {} has no platform to build for{}",
                build.base_image,
                if build.platforms.is_empty() {
                    String::new()
                } else {
                    format!(" among {}", build.platforms.join(", "))
                }
            ))
            .into());
        }
        Ok(children)
    }

    async fn base_config(
        &self,
        upstream: &Scoped<'_>,
        image: &str,
        manifest: &Value,
    ) -> Result<Value, GoError> {
        let digest = digest_of(&manifest["config"])?;
        upstream.blob(image, &digest.to_string()).await?;
        Ok(read_config(self.builds.store(), &digest, "the base config").await?)
    }

    /// Attaches the SPDX SBOM of `image` (built as `info` says).
    async fn attach_sbom(
        &self,
        build: &KoBuild<'_>,
        image: &StoredManifest,
        info: &sbom::BuildInfo,
    ) -> Result<(), GoError> {
        // Go stamps a main module built from a directory `(devel)`; kontain
        // knows which version of it the proxy gave.
        let mut info = info.clone();
        let main = info.main.get_or_insert_with(|| sbom::ModuleInfo {
            path: build.module.path.clone(),
            version: String::new(),
            sum: None,
        });
        if matches!(main.version.as_str(), "" | "(devel)") {
            main.version = build.module.version.clone();
        }
        let document = sbom::spdx(build.package.as_str(), &image.digest, &info);
        let bytes = canonical(&document)?;
        crate::image::sbom::attach(
            self.builds.store(),
            image,
            crate::image::sbom::SPDX_JSON,
            bytes,
        )
        .await?;
        Ok(())
    }

    /// One platform: build the binary, add the two layers, edit the config;
    /// the image comes with its SBOM, whose build information is returned.
    async fn platform_image(
        &self,
        upstream: &Scoped<'_>,
        build: &KoBuild<'_>,
        workspace: &Workspace,
        kodata: &LayerBlob,
        child: &Child,
    ) -> Result<(StoredManifest, Option<sbom::BuildInfo>), GoError> {
        crate::activity::phase(format!("fetching the base for {}", child.target));
        let manifest = parse(&child.manifest.bytes, "a base manifest")?;
        let mut config = self
            .base_config(upstream, build.base_image, &manifest)
            .await?;
        // The image refers to the base's layers: make sure storage has them.
        for layer in manifest["layers"].as_array().cloned().unwrap_or_default() {
            upstream
                .blob(build.base_image, &digest_of(&layer)?.to_string())
                .await?;
        }
        crate::activity::phase(format!("compiling for {}", child.target));
        let binary = self
            .build(workspace, build.package, &child.target, build.options)
            .await?;
        crate::activity::phase(format!("layering {}", child.target));
        let name = app_name(build.package);
        let (app, info) = {
            let store = self.builds.store().clone();
            let name = name.clone();
            self.builds
                .cpu()
                .run(move |_| {
                    let layer = binary_layer(&store, &binary, &name)?;
                    let bytes = std::fs::read(&binary)
                        .map_err(|e| ImageError::io(format!("reading {}", binary.display()), e))?;
                    Ok::<_, ImageError>((layer, sbom::build_info(&bytes)))
                })
                .await?
        };
        let app_path = format!("/{APP_DIR}/{name}");
        ko_config(&mut config, build.package, &app_path, [kodata, &app])?;
        let image = extend(
            self.builds.store(),
            &child.manifest.media_type,
            manifest,
            &config,
            &[kodata, &app],
            |m| annotate(m, build.base_reference, &child.manifest.digest),
        )
        .await?;
        match &info {
            Some(info) => self.attach_sbom(build, &image, info).await?,
            None => {
                tracing::warn!(package = %build.package, "the binary has no Go build information: no SBOM")
            }
        }
        Ok((image, info))
    }

    /// An index over the platform images, in the base index's order and type.
    async fn index(
        &self,
        build: &KoBuild<'_>,
        children: &[Child],
        images: &[StoredManifest],
    ) -> Result<StoredManifest, GoError> {
        let entries: Vec<Value> = children
            .iter()
            .zip(images)
            .map(|(child, image)| {
                let platform = child
                    .descriptor
                    .as_ref()
                    .map(|d| d["platform"].clone())
                    .unwrap_or(Value::Null);
                json!({
                    "mediaType": image.media_type.as_str(),
                    "digest": image.digest.to_string(),
                    "size": image.bytes.len(),
                    "platform": platform,
                })
            })
            .collect();
        let media_type = &build.base.media_type;
        let mut index = json!({
            "schemaVersion": 2,
            "mediaType": media_type.as_str(),
            "manifests": entries,
        });
        if media_type.as_str() == MediaType::OCI_INDEX {
            annotate(&mut index, build.base_reference, &build.base.digest);
        }
        Ok(self
            .builds
            .store()
            .put_manifest(media_type, canonical(&index)?)
            .await?)
    }
}

/// The cache key: everything that decides the result.
fn cache_key(build: &KoBuild<'_>) -> Result<String, ImageError> {
    let mut platforms = build.platforms.to_vec();
    platforms.sort();
    let key = json!({
        "layout": LAYOUT_VERSION,
        "module": build.module.path,
        "version": build.module.version,
        "package": build.package.as_str(),
        "options": build.options,
        "base": build.base.digest.to_string(),
        "base_name": build.base_reference,
        "platforms": platforms,
        "go": build.go_version,
    });
    let bytes = canonical(&key)?;
    Ok(format!("ko {}", hex::encode(Sha256::digest(&bytes))))
}

fn app_name(package: &ImportPath) -> String {
    match package.name() {
        "" | "." => "ko-app".to_owned(),
        name => name.to_owned(),
    }
}

fn kodata_dir(module: &Module, package: &ImportPath) -> Option<std::path::PathBuf> {
    let rel = package.relative_to(&module.path)?;
    let dir = module.dir.join(rel).join("kodata");
    dir.is_dir().then_some(dir)
}

fn annotate(document: &mut Value, base_image: &str, base_digest: &Digest) {
    let annotations = document
        .as_object_mut()
        .map(|o| o.entry("annotations").or_insert_with(|| json!({})));
    if let Some(Value::Object(a)) = annotations {
        a.insert(
            "org.opencontainers.image.base.name".into(),
            json!(base_image),
        );
        a.insert(
            "org.opencontainers.image.base.digest".into(),
            json!(base_digest.to_string()),
        );
    }
}

/// The base config, turned into the app's (see the module comment).
fn ko_config(
    config: &mut Value,
    package: &ImportPath,
    app_path: &str,
    layers: [&LayerBlob; 2],
) -> Result<(), ImageError> {
    let mut env = config_env(config);
    match env.iter_mut().find(|e| e.starts_with("PATH=")) {
        Some(path) => path.push_str(&format!(":/{APP_DIR}")),
        None => env.push(format!("PATH=/{APP_DIR}")),
    }
    env.push(format!("KO_DATA_PATH=/{KODATA_ROOT}"));
    let inner = inner_config(config, "the base config")?;
    inner.insert("Entrypoint".into(), json!([app_path]));
    inner.remove("Cmd");
    inner.insert("Env".into(), json!(env));
    let history = |comment: String| {
        json!({
            "author": AUTHOR,
            "created": EPOCH,
            "created_by": format!("ko build ko://{package}"),
            "comment": comment,
        })
    };
    let [kodata, app] = layers;
    add_layers(
        config,
        [
            (kodata, history("kodata contents, at $KO_DATA_PATH".into())),
            (app, history(format!("go build output, at {app_path}"))),
        ],
    )?;
    if let Some(root) = config.as_object_mut() {
        root.insert("created".into(), json!(EPOCH));
        root.insert("author".into(), json!(AUTHOR));
    }
    Ok(())
}

/// `/var/run/ko` with the package's kodata, in a fixed (sorted) order.
fn kodata_layer(store: &ContentStore, dir: Option<&Path>) -> Result<LayerBlob, ImageError> {
    write_layer(store, |tar| {
        for d in ["var", "var/run", KODATA_ROOT] {
            FIXED.add_dir(tar, d)?;
        }
        match dir {
            // Module trees hold only directories and regular files (the
            // zip check refused the rest).
            Some(dir) => FIXED.add_tree(tar, dir, KODATA_ROOT),
            None => Ok(()),
        }
    })
}

/// `/ko-app/<name>`.
fn binary_layer(store: &ContentStore, binary: &Path, name: &str) -> Result<LayerBlob, ImageError> {
    write_layer(store, |tar| {
        FIXED.add_dir(tar, APP_DIR)?;
        FIXED.add_file(tar, &format!("{APP_DIR}/{name}"), binary)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8) -> LayerBlob {
        let d = Digest::sha256(&[n]);
        LayerBlob {
            digest: d.clone(),
            diff_id: d,
            size: 1,
        }
    }

    #[test]
    fn the_config_gets_entrypoint_path_and_kodata() {
        let mut config = json!({
            "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
            "config": {"Env": ["PATH=/usr/bin:/bin", "A=b"], "Cmd": ["sh"], "User": "65532"},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:00"]},
            "history": [{"created_by": "base"}],
        });
        let package = ImportPath::parse("example.com/hello").unwrap();
        ko_config(&mut config, &package, "/ko-app/hello", [&blob(1), &blob(2)]).unwrap();
        assert_eq!(config["config"]["Entrypoint"], json!(["/ko-app/hello"]));
        assert!(config["config"].get("Cmd").is_none());
        assert_eq!(
            config["config"]["Env"],
            json!([
                "PATH=/usr/bin:/bin:/ko-app",
                "A=b",
                "KO_DATA_PATH=/var/run/ko"
            ])
        );
        assert_eq!(config["config"]["User"], "65532");
        assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 3);
        assert_eq!(config["history"].as_array().unwrap().len(), 3);
        assert_eq!(config["created"], EPOCH);
    }

    #[test]
    fn platform_filters() {
        let t = Target {
            os: "linux".into(),
            arch: "arm".into(),
            variant: Some("v7".into()),
        };
        assert!(wanted(&t, &[]));
        assert!(wanted(&t, &["linux/arm".into()]));
        assert!(wanted(&t, &["linux/arm/v7".into()]));
        assert!(!wanted(&t, &["linux/arm/v6".into(), "linux/amd64".into()]));
    }
}
