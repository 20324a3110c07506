//! The `buildpack` interface, host side: source handles, and builds.

use super::{BuildpackBuild, Buildpacks, Source};
use crate::oci::split_reference;
use crate::runtime::host::wit::buildpack;
use crate::runtime::host::{
    Ctx, Getter, Has, HostResult, HostState, Linker, ManifestHandle, Resource, Trap,
};

/// A git commit a plugin holds.
pub struct SourceHandle(pub Source);

pub fn add_to_linker(linker: &mut Linker<HostState>, get: Getter<Buildpacks>) -> Trap<()> {
    buildpack::add_to_linker::<HostState, Has<Buildpacks>>(linker, get)
}

impl buildpack::HostSource for Ctx<'_, Buildpacks> {
    async fn commit(&mut self, this: Resource<SourceHandle>) -> Trap<String> {
        Ok(self.get(&this)?.0.commit.clone())
    }

    async fn url(&mut self, this: Resource<SourceHandle>) -> Trap<String> {
        // Never the server's own path or credentials: plugins are untrusted,
        // and what they say reaches clients.
        Ok(self.get(&this)?.0.public())
    }

    async fn drop(&mut self, this: Resource<SourceHandle>) -> Trap<()> {
        self.take(this).map(drop)
    }
}

impl buildpack::Host for Ctx<'_, Buildpacks> {
    async fn fetch(
        &mut self,
        owner: String,
        repo: String,
        revision: String,
    ) -> HostResult<Resource<SourceHandle>> {
        let source = self.service.fetch(&owner, &repo, &revision).await?;
        self.push(SourceHandle(source))
    }

    async fn refs(&mut self, owner: String, repo: String) -> HostResult<Vec<String>> {
        Ok(self.service.refs(&owner, &repo).await?.to_vec())
    }

    async fn build(
        &mut self,
        source: Resource<SourceHandle>,
        app_path: String,
        builder_image: String,
        builder: Resource<ManifestHandle>,
        run_image: String,
    ) -> HostResult<Resource<ManifestHandle>> {
        let (builder_name, _) = split_reference(&builder_image);
        let upstream = self
            .service
            .upstream()
            .scoped(self.call.generator(), self.call.upstreams());
        upstream.check(builder_name)?;
        if !run_image.is_empty() {
            upstream.check(split_reference(&run_image).0)?;
        }
        let source = self.get(&source)?.0.clone();
        let builder = self.get(&builder)?.0.clone();
        let build = BuildpackBuild {
            source: &source,
            app_path: &app_path,
            builder_image: builder_name,
            builder: &builder,
            run_image: (!run_image.is_empty()).then_some(run_image.as_str()),
            platform_env: platform_env(self.call.settings()),
        };
        let image = self.service.image(&upstream, build).await?;
        self.push(ManifestHandle(image))
    }
}

/// The generator's settings that are platform environment variables for
/// the buildpacks: `BP_*` (as `pack build --env` passes them).
fn platform_env(
    settings: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    settings
        .iter()
        .filter(|(name, _)| {
            name.strip_prefix("BP_").is_some_and(|rest| {
                !rest.is_empty()
                    && rest
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            })
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
