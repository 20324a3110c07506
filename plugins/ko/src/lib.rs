//! `ko`: Go import paths built into images, the way `ko build` makes them.
//!
//! `ko/example.com/app/cmd/tool:v1.2.3` (or `latest`, a branch, a commit):
//! the host resolves the module over the Go module proxy, unpacks and checks
//! it, and runs `go build` per platform; this recipe reads the module's
//! `.ko.yaml` (in the sandbox: it is untrusted) to choose the base image,
//! the platforms and the build options, and names the base image to the
//! host's upstream client.
//!
//! Settings (`[generators.ko.settings]` in kontain.toml): `base`, the base
//! image when `.ko.yaml` names none (default `cgr.dev/chainguard/static:latest`);
//! `platforms`, comma-separated filters when `.ko.yaml` has none (default
//! `all`: every platform of the base but `unknown` ones).

mod ko_yaml;

use ko_yaml::KoYaml;
use kontain_sdk::{Error, Generator, Manifest, Request, go, settings, split_reference, upstream};

const DEFAULT_BASE: &str = "cgr.dev/chainguard/static:latest";

struct Ko;

impl Generator for Ko {
    fn resolve(request: Request) -> Result<Manifest, Error> {
        if request.repository.is_empty() {
            return Err(Error::InvalidName(
                "name a Go import path after the prefix, e.g. ko/github.com/google/ko".into(),
            ));
        }
        if request.is_digest() {
            return Err(Error::NotFound(format!(
                "{} is not an image this server built; pull by tag (a Go version)",
                request.reference
            )));
        }
        let package = &request.repository;
        let module = go::resolve(package, &request.reference)?;
        let ko_yaml = match module.read_file(".ko.yaml") {
            Some(text) => KoYaml::parse(&text).map_err(|e| {
                Error::InvalidName(format!(
                    "{}@{}: .ko.yaml: {e}",
                    module.path(),
                    module.version()
                ))
            })?,
            None => KoYaml::default(),
        };
        let configured_base = settings::get("base");
        let base = ko_yaml
            .base_for(package)
            .or(configured_base.as_deref())
            .unwrap_or(DEFAULT_BASE);
        let (base_image, base_reference) = split_reference(base);
        let platforms = ko_yaml.platforms().unwrap_or_else(|| {
            let configured = settings::get("platforms").unwrap_or_else(|| "all".into());
            ko_yaml::parse_platforms(configured.split(',').map(|p| p.trim().to_owned()).collect())
        });
        let options = ko_yaml.options_for(&module.path(), package);
        let accept = kontain_sdk::accept_all();
        let base_manifest = upstream::fetch_manifest(base_image, base_reference, &accept)?;
        go::image(
            &module,
            package,
            &go::BuildOptions {
                env: options.env,
                flags: options.flags,
                ldflags: options.ldflags,
            },
            base,
            &base_manifest,
            &platforms,
        )
    }

    /// The module's released versions, and `latest`.
    fn tags(repository: String) -> Result<Vec<String>, Error> {
        if repository.is_empty() {
            return Ok(Vec::new());
        }
        let mut tags = go::versions(&repository)?;
        tags.push("latest".to_owned());
        Ok(tags)
    }
}

kontain_sdk::export_generator!(Ko);
