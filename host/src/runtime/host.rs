//! What a plugin's store holds, and the host side of the kontain interfaces:
//! translating handles to host values, checking grants and limits, and
//! handing the real work to `builders`.

use std::sync::Arc;

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::kontain::generator::{
    buildpack, cache, flatten, go, images, random, settings, types, upstream,
};
use super::plugin::Plugin;
use crate::builders::buildpack::BuildpackBuild;
use crate::builders::ko::KoBuild;
use crate::builders::{
    BuildError, Builders, HistoryEntry, ImageSpec, LayerBlob, ManifestFormat, Platform,
};
use crate::buildpack::{BuildpackError, Buildpacks, Source};
use crate::config::Capability;
use crate::golang::{BuildOptions, Go, GoError, ImportPath, Module};
use crate::storage::{BlobInfo, StoredManifest};
use crate::upstream::{Mirror, UpstreamError};

/// Plugin stdout and stderr are kept (up to this much) and logged after the
/// call, tagged with the plugin, instead of reaching the server's own output.
const OUTPUT_CAPTURE: usize = 64 * 1024;

/// A layer a plugin holds.
pub struct LayerHandle(pub LayerBlob);

/// A manifest a plugin holds (and may return).
pub struct ManifestHandle(pub StoredManifest);

/// Any other blob a plugin holds (and may return).
pub struct BlobHandle(pub BlobInfo);

/// A Go module version a plugin holds.
pub struct ModuleHandle(pub Module);

/// A git commit a plugin holds.
pub struct SourceHandle(pub Source);

/// A host failure while serving a plugin: not the plugin's fault, so it is not
/// shown to the plugin as an error value but ends the call as a trap that the
/// runtime recognises and reports as a server error.
#[derive(Debug, thiserror::Error)]
pub enum HostFailure {
    #[error(transparent)]
    Build(BuildError),
    #[error(transparent)]
    Upstream(UpstreamError),
    #[error(transparent)]
    Go(GoError),
    #[error(transparent)]
    Buildpack(BuildpackError),
}

/// The host's services a plugin's calls reach.
#[derive(Clone)]
pub struct Services {
    pub builders: Builders,
    pub mirror: Arc<Mirror>,
    pub go: Arc<Go>,
    pub buildpacks: Arc<Buildpacks>,
}

pub struct HostState {
    plugin: Arc<Plugin>,
    builders: Builders,
    mirror: Arc<Mirror>,
    go: Arc<Go>,
    buildpacks: Arc<Buildpacks>,
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    output: MemoryOutputPipe,
    /// Blob bytes this request has produced, against `limits.max_bytes`.
    produced: u64,
}

impl HostState {
    pub fn new(plugin: Arc<Plugin>, services: Services) -> Self {
        let output = MemoryOutputPipe::new(OUTPUT_CAPTURE);
        // No preopened directories, no environment, no network: a plugin
        // reaches the outside world only through the kontain interfaces.
        let wasi = WasiCtxBuilder::new()
            .stdout(output.clone())
            .stderr(output.clone())
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(plugin.limits.memory.0 as usize)
            .instances(4)
            .tables(16)
            .memories(4)
            .trap_on_grow_failure(true)
            .build();
        HostState {
            plugin,
            builders: services.builders,
            mirror: services.mirror,
            go: services.go,
            buildpacks: services.buildpacks,
            wasi,
            table: ResourceTable::new(),
            limits,
            output,
            produced: 0,
        }
    }

    pub fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limits
    }

    /// What the plugin printed, for the log.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.contents()).into_owned()
    }

    /// Takes the manifest a plugin returned out of the table.
    pub fn take_manifest(
        &mut self,
        handle: Resource<ManifestHandle>,
    ) -> wasmtime::Result<StoredManifest> {
        Ok(self.table.delete(handle)?.0)
    }

    /// Takes the blob a plugin returned out of the table.
    pub fn take_blob(&mut self, handle: Resource<BlobHandle>) -> wasmtime::Result<BlobInfo> {
        Ok(self.table.delete(handle)?.0)
    }

    fn require(&self, capability: Capability) -> Result<(), types::Error> {
        if self.plugin.grants.contains(&capability) {
            Ok(())
        } else {
            Err(types::Error::Denied(format!(
                "generator {} is not granted the {:?} capability",
                self.plugin.id.name,
                capability.name()
            )))
        }
    }

    /// Checks the upstream grant and this plugin's own registry allowlist.
    fn require_upstream(&self, image: &str) -> Result<(), types::Error> {
        self.require(Capability::Upstream)?;
        let Some(allowed) = &self.plugin.upstreams else {
            return Ok(());
        };
        let registry = match self.mirror.parse(image) {
            Ok(upstream) => upstream.endpoint.name.clone(),
            Err(e) => return Err(types::Error::InvalidName(e.to_string())),
        };
        if allowed.contains(&registry) {
            Ok(())
        } else {
            Err(types::Error::Denied(format!(
                "generator {} may not reach the registry {registry:?} (its `upstreams` in kontain.toml: {})",
                self.plugin.id.name,
                allowed.join(", ")
            )))
        }
    }

    fn budget(&self) -> u64 {
        self.plugin.limits.max_bytes.0.saturating_sub(self.produced)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Splits a build error into what the plugin should see and what is a host
/// failure (a trap).
fn guest_error(e: BuildError) -> wasmtime::Result<types::Error> {
    match e {
        BuildError::LimitExceeded { .. } => Ok(types::Error::LimitExceeded(e.to_string())),
        BuildError::InvalidImage(_) => Ok(types::Error::InvalidReference(e.to_string())),
        BuildError::TooLarge { .. } => Ok(types::Error::LimitExceeded(e.to_string())),
        BuildError::Upstream(upstream) => upstream_error(*upstream),
        BuildError::Go(go) => go_error(*go),
        BuildError::Buildpack(bp) => buildpack_error(*bp),
        BuildError::Remembered { refused: true, .. } => Ok(types::Error::Denied(e.to_string())),
        BuildError::Remembered { .. } => Ok(types::Error::InvalidName(e.to_string())),
        other => Err(HostFailure::Build(other).into()),
    }
}

fn buildpack_error(e: BuildpackError) -> wasmtime::Result<types::Error> {
    let message = e.to_string();
    Ok(match e {
        BuildpackError::InvalidName(_) => types::Error::InvalidName(message),
        BuildpackError::UnknownRevision { .. } | BuildpackError::UnknownRepository { .. } => {
            types::Error::NotFound(message)
        }
        BuildpackError::Refused(_) => types::Error::Denied(message),
        BuildpackError::TooLarge { .. } | BuildpackError::Timeout { .. } => {
            types::Error::LimitExceeded(message)
        }
        // The source cannot be built as it is: the request cannot succeed,
        // and retrying will not help.
        BuildpackError::NoGroupPassed { .. } | BuildpackError::BuildpackFailed { .. } => {
            types::Error::InvalidName(message)
        }
        // The configured builder is the operator's to fix.
        BuildpackError::BadBuilder(_) => types::Error::Internal(message),
        BuildpackError::Unreachable { .. }
        | BuildpackError::Git { .. }
        | BuildpackError::Tool { .. }
        | BuildpackError::SandboxUnavailable { .. } => types::Error::Unavailable(message),
        BuildpackError::Io { .. } => return Err(HostFailure::Buildpack(e).into()),
    })
}

fn go_error(e: GoError) -> wasmtime::Result<types::Error> {
    let message = e.to_string();
    Ok(match e {
        GoError::InvalidPath(_) => types::Error::InvalidName(message),
        GoError::NotFound { .. } | GoError::NoPackage { .. } => types::Error::NotFound(message),
        GoError::Refused(_) | GoError::UnsafeModule { .. } | GoError::BadOptions { .. } => {
            types::Error::Denied(message)
        }
        GoError::TooLarge { .. } | GoError::Timeout { .. } => types::Error::LimitExceeded(message),
        // The name asks for a program that does not compile: the client's
        // request cannot succeed as it is, and retrying will not help.
        GoError::BuildFailed { .. } => types::Error::InvalidName(message),
        GoError::Unreachable { .. }
        | GoError::Failing { .. }
        | GoError::BadProxy { .. }
        | GoError::NoGo { .. } => types::Error::Unavailable(message),
        GoError::Io { .. } | GoError::Storage(_) => return Err(HostFailure::Go(e).into()),
    })
}

fn upstream_error(e: UpstreamError) -> wasmtime::Result<types::Error> {
    let message = e.to_string();
    Ok(match e {
        UpstreamError::InvalidImage(_) => types::Error::InvalidName(message),
        UpstreamError::Refused(_) | UpstreamError::Unauthorized { .. } => {
            types::Error::Denied(message)
        }
        UpstreamError::NotFound { .. } => types::Error::NotFound(message),
        UpstreamError::TooLarge { .. } => types::Error::LimitExceeded(message),
        UpstreamError::Failing { .. }
        | UpstreamError::Unreachable { .. }
        | UpstreamError::DigestMismatch { .. } => types::Error::Unavailable(message),
        UpstreamError::Storage(_) => return Err(HostFailure::Upstream(e).into()),
    })
}

impl types::Host for HostState {}

impl images::HostLayer for HostState {
    async fn digest(&mut self, this: Resource<LayerHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.0.digest.to_string())
    }

    async fn diff_id(&mut self, this: Resource<LayerHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.0.diff_id.to_string())
    }

    async fn size(&mut self, this: Resource<LayerHandle>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&this)?.0.size)
    }

    async fn drop(&mut self, this: Resource<LayerHandle>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}

impl images::HostManifest for HostState {
    async fn digest(&mut self, this: Resource<ManifestHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.0.digest.to_string())
    }

    async fn media_type(&mut self, this: Resource<ManifestHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.0.media_type.to_string())
    }

    async fn size(&mut self, this: Resource<ManifestHandle>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&this)?.0.bytes.len() as u64)
    }

    async fn drop(&mut self, this: Resource<ManifestHandle>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}

impl images::HostBlob for HostState {
    async fn digest(&mut self, this: Resource<BlobHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.0.digest.to_string())
    }

    async fn size(&mut self, this: Resource<BlobHandle>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&this)?.0.size)
    }

    async fn drop(&mut self, this: Resource<BlobHandle>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}

impl upstream::Host for HostState {
    async fn fetch_manifest(
        &mut self,
        image: String,
        reference: String,
        accept: Vec<String>,
    ) -> wasmtime::Result<Result<Resource<ManifestHandle>, types::Error>> {
        if let Err(denied) = self.require_upstream(&image) {
            return Ok(Err(denied));
        }
        match self.mirror.manifest(&image, &reference, &accept).await {
            Ok(manifest) => Ok(Ok(self.table.push(ManifestHandle(manifest))?)),
            Err(e) => Ok(Err(upstream_error(e)?)),
        }
    }

    async fn fetch_blob(
        &mut self,
        image: String,
        digest: String,
    ) -> wasmtime::Result<Result<Resource<BlobHandle>, types::Error>> {
        if let Err(denied) = self.require_upstream(&image) {
            return Ok(Err(denied));
        }
        if self.budget() == 0 {
            return Ok(Err(types::Error::LimitExceeded(format!(
                "this request has produced {} bytes, the generator's limit",
                self.plugin.limits.max_bytes.0
            ))));
        }
        match self.mirror.blob(&image, &digest).await {
            Ok(blob) => {
                self.produced = self.produced.saturating_add(blob.size);
                if self.produced > self.plugin.limits.max_bytes.0 {
                    return Ok(Err(types::Error::LimitExceeded(format!(
                        "blob {digest} takes this request past the generator's limit of {} bytes",
                        self.plugin.limits.max_bytes.0
                    ))));
                }
                Ok(Ok(self.table.push(BlobHandle(blob))?))
            }
            Err(e) => Ok(Err(upstream_error(e)?)),
        }
    }
}

/// Longest value a plugin may keep in its cache.
const MAX_CACHE_VALUE: usize = 4096;

impl HostState {
    /// Cache keys are namespaced by generator, so plugins cannot read or
    /// overwrite each other's entries.
    fn cache_key(&self, key: &str) -> String {
        format!("plugin-cache {} {key}", self.plugin.id.name)
    }
}

impl cache::Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        if self.require(Capability::Cache).is_err() {
            return Ok(None);
        }
        let key = self.cache_key(&key);
        match self.builders.storage().value(&key).await {
            Ok(value) => Ok(value),
            Err(e) => Err(HostFailure::Build(BuildError::Storage(e)).into()),
        }
    }

    async fn set(
        &mut self,
        key: String,
        value: String,
    ) -> wasmtime::Result<Result<(), types::Error>> {
        if let Err(denied) = self.require(Capability::Cache) {
            return Ok(Err(denied));
        }
        if value.len() > MAX_CACHE_VALUE {
            return Ok(Err(types::Error::LimitExceeded(format!(
                "cache values are at most {MAX_CACHE_VALUE} bytes"
            ))));
        }
        let key = self.cache_key(&key);
        match self.builders.storage().put_value(&key, &value).await {
            Ok(()) => Ok(Ok(())),
            Err(e) => Err(HostFailure::Build(BuildError::Storage(e)).into()),
        }
    }
}

impl flatten::Host for HostState {
    async fn image(
        &mut self,
        image: String,
        source: Resource<ManifestHandle>,
        accept: Vec<String>,
    ) -> wasmtime::Result<Result<Resource<ManifestHandle>, types::Error>> {
        if let Err(denied) = self
            .require(Capability::Flatten)
            .and_then(|()| self.require_upstream(&image))
        {
            return Ok(Err(denied));
        }
        let source = self.table.get(&source)?.0.clone();
        let limit = self.budget();
        match self
            .builders
            .flatten(&self.mirror, &image, &source, &accept, limit)
            .await
        {
            Ok(manifest) => Ok(Ok(self.table.push(ManifestHandle(manifest))?)),
            Err(e) => Ok(Err(guest_error(e)?)),
        }
    }
}

impl images::Host for HostState {
    async fn assemble(
        &mut self,
        format: images::ManifestFormat,
        config: images::Config,
        layers: Vec<Resource<LayerHandle>>,
        annotations: Vec<(String, String)>,
    ) -> wasmtime::Result<Result<Resource<ManifestHandle>, types::Error>> {
        let blobs = layers
            .iter()
            .map(|l| Ok(self.table.get(l)?.0.clone()))
            .collect::<wasmtime::Result<Vec<_>>>()?;
        let format = match format {
            images::ManifestFormat::Docker => ManifestFormat::Docker,
            images::ManifestFormat::Oci => ManifestFormat::Oci,
        };
        let spec = ImageSpec {
            platform: Platform {
                os: config.platform.os,
                architecture: config.platform.architecture,
                variant: config.platform.variant,
            },
            env: config.env,
            entrypoint: config.entrypoint,
            cmd: config.cmd,
            working_dir: config.working_dir,
            user: config.user,
            labels: config.labels,
            history: config
                .history
                .into_iter()
                .map(|h| HistoryEntry {
                    created_by: h.created_by,
                    comment: h.comment,
                    empty_layer: h.empty_layer,
                })
                .collect(),
            created: config.created,
        };
        match self
            .builders
            .assemble(format, &spec, &blobs, &annotations)
            .await
        {
            Ok(manifest) => Ok(Ok(self.table.push(ManifestHandle(manifest))?)),
            Err(e) => Ok(Err(guest_error(e)?)),
        }
    }
}

impl random::Host for HostState {
    async fn layers(
        &mut self,
        count: u32,
        size: u64,
    ) -> wasmtime::Result<Result<Vec<Resource<LayerHandle>>, types::Error>> {
        if let Err(denied) = self.require(Capability::Random) {
            return Ok(Err(denied));
        }
        let blobs = match self
            .builders
            .random_layers(count, size, self.budget())
            .await
        {
            Ok(blobs) => blobs,
            Err(e) => return Ok(Err(guest_error(e)?)),
        };
        let mut handles = Vec::with_capacity(blobs.len());
        for blob in blobs {
            self.produced += blob.size;
            handles.push(self.table.push(LayerHandle(blob))?);
        }
        Ok(Ok(handles))
    }
}

impl settings::Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.plugin.settings.get(&key).cloned())
    }
}

/// Text files a plugin may read from a module (`.ko.yaml`).
const MAX_MODULE_FILE: u64 = 64 * 1024;

impl go::HostModule for HostState {
    async fn path(&mut self, this: Resource<ModuleHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.0.path.clone())
    }

    async fn version(&mut self, this: Resource<ModuleHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.0.version.clone())
    }

    async fn read_file(
        &mut self,
        this: Resource<ModuleHandle>,
        path: String,
    ) -> wasmtime::Result<Option<String>> {
        let module = self.table.get(&this)?.0.clone();
        Ok(tokio::task::spawn_blocking(move || module.read_file(&path, MAX_MODULE_FILE)).await?)
    }

    async fn drop(&mut self, this: Resource<ModuleHandle>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}

impl go::Host for HostState {
    async fn resolve(
        &mut self,
        import_path: String,
        version: String,
    ) -> wasmtime::Result<Result<Resource<ModuleHandle>, types::Error>> {
        if let Err(denied) = self.require(Capability::Go) {
            return Ok(Err(denied));
        }
        match self.go.resolve(&import_path, &version).await {
            Ok(module) => Ok(Ok(self.table.push(ModuleHandle(module))?)),
            Err(e) => Ok(Err(go_error(e)?)),
        }
    }

    async fn image(
        &mut self,
        module: Resource<ModuleHandle>,
        package: String,
        options: go::BuildOptions,
        base_image: String,
        base: Resource<ManifestHandle>,
        platforms: Vec<String>,
    ) -> wasmtime::Result<Result<Resource<ManifestHandle>, types::Error>> {
        // `name[:tag|@digest]`: the name reaches the upstream; the whole
        // reference is what the image's annotations record.
        let (base_name, _) = crate::upstream::split_reference(&base_image);
        if let Err(denied) = self
            .require(Capability::Go)
            .and_then(|()| self.require_upstream(base_name))
        {
            return Ok(Err(denied));
        }
        let module = self.table.get(&module)?.0.clone();
        let base = self.table.get(&base)?.0.clone();
        let package = match ImportPath::parse(&package) {
            Ok(p) if p.relative_to(&module.path).is_some() => p,
            Ok(p) => {
                return Ok(Err(types::Error::InvalidName(format!(
                    "{p} is not a package of module {}",
                    module.path
                ))));
            }
            Err(e) => return Ok(Err(types::Error::InvalidName(e))),
        };
        let options = BuildOptions {
            env: options.env,
            flags: options.flags,
            ldflags: options.ldflags,
        };
        let accept = crate::oci::MediaType::MANIFESTS.map(str::to_owned).to_vec();
        let go_version = self.go.version().await;
        let build = KoBuild {
            module: &module,
            package: &package,
            options: &options,
            base_image: base_name,
            base_reference: &base_image,
            base: &base,
            platforms: &platforms,
            accept: &accept,
            go_version: &go_version,
        };
        match self.builders.ko(&self.go, &self.mirror, build).await {
            Ok(manifest) => Ok(Ok(self.table.push(ManifestHandle(manifest))?)),
            Err(e) => Ok(Err(guest_error(e)?)),
        }
    }
}

impl buildpack::HostSource for HostState {
    async fn commit(&mut self, this: Resource<SourceHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.0.commit.clone())
    }

    async fn url(&mut self, this: Resource<SourceHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.0.url.clone())
    }

    async fn drop(&mut self, this: Resource<SourceHandle>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}

impl buildpack::Host for HostState {
    async fn fetch(
        &mut self,
        owner: String,
        repo: String,
        revision: String,
    ) -> wasmtime::Result<Result<Resource<SourceHandle>, types::Error>> {
        if let Err(denied) = self.require(Capability::Buildpack) {
            return Ok(Err(denied));
        }
        match self.buildpacks.fetch(&owner, &repo, &revision).await {
            Ok(source) => Ok(Ok(self.table.push(SourceHandle(source))?)),
            Err(e) => Ok(Err(buildpack_error(e)?)),
        }
    }

    async fn build(
        &mut self,
        source: Resource<SourceHandle>,
        app_path: String,
        builder_image: String,
        builder: Resource<ManifestHandle>,
        run_image: String,
    ) -> wasmtime::Result<Result<Resource<ManifestHandle>, types::Error>> {
        let (builder_name, _) = crate::upstream::split_reference(&builder_image);
        let (run_name, _) = crate::upstream::split_reference(&run_image);
        let checks = self
            .require(Capability::Buildpack)
            .and_then(|()| self.require_upstream(builder_name))
            .and_then(|()| {
                if run_image.is_empty() {
                    Ok(())
                } else {
                    self.require_upstream(run_name)
                }
            });
        if let Err(denied) = checks {
            return Ok(Err(denied));
        }
        let source = self.table.get(&source)?.0.clone();
        let builder = self.table.get(&builder)?.0.clone();
        let build = BuildpackBuild {
            source: &source,
            app_path: &app_path,
            builder_image: builder_name,
            builder: &builder,
            run_image: (!run_image.is_empty()).then_some(run_image.as_str()),
            allowed_registries: self.plugin.upstreams.as_deref(),
        };
        match self
            .builders
            .buildpack(&self.buildpacks, &self.mirror, build)
            .await
        {
            Ok(manifest) => Ok(Ok(self.table.push(ManifestHandle(manifest))?)),
            Err(e) => Ok(Err(guest_error(e)?)),
        }
    }
}
