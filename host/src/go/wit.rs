//! The `go` interface, host side: module handles, and ko images.

use super::{BuildOptions, Go, GoError, ImportPath, KoBuild, Module};
use crate::generator::ErrorKind;
use crate::oci::{MediaType, split_reference};
use crate::runtime::host::wit::go;
use crate::runtime::host::{
    Ctx, Getter, Has, HostError, HostResult, HostState, Linker, ManifestHandle, Resource, Trap,
    trap,
};

/// Text files a plugin may read from a module (`.ko.yaml`).
const MAX_MODULE_FILE: u64 = 64 * 1024;

/// A Go module version a plugin holds.
pub struct ModuleHandle(pub Module);

pub fn add_to_linker(linker: &mut Linker<HostState>, get: Getter<Go>) -> Trap<()> {
    go::add_to_linker::<HostState, Has<Go>>(linker, get)
}

impl go::HostModule for Ctx<'_, Go> {
    async fn path(&mut self, this: Resource<ModuleHandle>) -> Trap<String> {
        Ok(self.get(&this)?.0.path.clone())
    }

    async fn version(&mut self, this: Resource<ModuleHandle>) -> Trap<String> {
        Ok(self.get(&this)?.0.version.clone())
    }

    async fn read_file(
        &mut self,
        this: Resource<ModuleHandle>,
        path: String,
    ) -> Trap<Option<String>> {
        let module = self.get(&this)?.0.clone();
        crate::image::work::blocking(move || {
            Ok::<_, GoError>(module.read_file(&path, MAX_MODULE_FILE))
        })
        .await
        .map_err(trap)
    }

    async fn drop(&mut self, this: Resource<ModuleHandle>) -> Trap<()> {
        self.take(this).map(drop)
    }
}

impl go::Host for Ctx<'_, Go> {
    async fn resolve(
        &mut self,
        import_path: String,
        version: String,
    ) -> HostResult<Resource<ModuleHandle>> {
        let module = self.service.resolve(&import_path, &version).await?;
        self.push(ModuleHandle(module))
    }

    async fn versions(&mut self, import_path: String) -> HostResult<Vec<String>> {
        Ok(self.service.versions(&import_path).await?)
    }

    async fn image(
        &mut self,
        module: Resource<ModuleHandle>,
        package: String,
        options: go::BuildOptions,
        base_image: String,
        base: Resource<ManifestHandle>,
        platforms: Vec<String>,
    ) -> HostResult<Resource<ManifestHandle>> {
        // `name[:tag|@digest]`: the name reaches the upstream; the whole
        // reference is what the image's annotations record.
        let (base_name, _) = split_reference(&base_image);
        let upstream = self
            .service
            .upstream()
            .scoped(self.call.generator(), self.call.upstreams());
        upstream.check(base_name)?;
        let module = self.get(&module)?.0.clone();
        let base = self.get(&base)?.0.clone();
        let package = ImportPath::parse(&package).map_err(GoError::InvalidPath)?;
        if package.relative_to(&module.path).is_none() {
            return Err(HostError::guest(
                ErrorKind::InvalidName,
                format!("{package} is not a package of module {}", module.path),
            ));
        }
        let options = BuildOptions {
            env: options.env,
            flags: options.flags,
            ldflags: options.ldflags,
        };
        let accept = MediaType::MANIFESTS.map(str::to_owned).to_vec();
        let go_version = self.service.version().await;
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
        let image = self.service.image(&upstream, build).await?;
        self.push(ManifestHandle(image))
    }
}
