//! `buildpack`: git repositories built with Cloud Native Buildpacks, the way
//! `pack build` would, with no Docker daemon.
//!
//! `buildpack/<owner>/<repo>[/<path/to/app>]:<revision>`: the host fetches
//! that commit (`latest` = the default branch; a branch, a tag or a SHA),
//! runs the builder's buildpacks in a sandbox, and exports the result onto
//! the run image. This recipe only splits the name and picks the builder.
//!
//! Settings (`[generators.buildpack.settings]`): `builder`, the builder image
//! (default `docker.io/paketobuildpacks/builder-jammy-base:latest`);
//! `run_image`, a run image to use instead of the builder's own.

use kontain_sdk::{
    Error, Generator, Manifest, Request, buildpack, settings, split_reference, upstream,
};

const DEFAULT_BUILDER: &str = "docker.io/paketobuildpacks/builder-jammy-base:latest";

struct Buildpack;

impl Generator for Buildpack {
    fn resolve(request: Request) -> Result<Manifest, Error> {
        let mut parts = request.repository.splitn(3, '/');
        let (Some(owner), Some(repo)) = (parts.next(), parts.next()) else {
            return Err(Error::InvalidName(
                "name a repository after the prefix: buildpack/<owner>/<repo>[/<path>]:<revision>"
                    .into(),
            ));
        };
        let app_path = parts.next().unwrap_or("");
        if request.is_digest() {
            return Err(Error::NotFound(format!(
                "{} is not an image this server built; pull by revision",
                request.reference
            )));
        }
        let source = buildpack::fetch(owner, repo, &request.reference)?;
        let builder = settings::get("builder").unwrap_or_else(|| DEFAULT_BUILDER.to_owned());
        let (name, reference) = split_reference(&builder);
        let accept = kontain_sdk::accept_all();
        let builder_manifest = upstream::fetch_manifest(name, reference, &accept)?;
        let run_image = settings::get("run_image").unwrap_or_default();
        buildpack::build(&source, app_path, &builder, &builder_manifest, &run_image)
    }

    /// The repository's branches and tags, and `latest` (its default branch).
    fn tags(repository: String) -> Result<Vec<String>, Error> {
        let mut parts = repository.splitn(3, '/');
        let (Some(owner), Some(repo)) = (parts.next(), parts.next()) else {
            return Ok(Vec::new());
        };
        let mut tags = buildpack::refs(owner, repo)?;
        tags.push("latest".to_owned());
        Ok(tags)
    }
}

kontain_sdk::export_generator!(Buildpack);
