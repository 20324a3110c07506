//! The `flatten` interface, host side.

use super::Flatten;
use crate::runtime::host::wit::flatten;
use crate::runtime::host::{
    Ctx, Getter, Has, HostResult, HostState, Linker, ManifestHandle, Resource, Trap,
};

pub fn add_to_linker(linker: &mut Linker<HostState>, get: Getter<Flatten>) -> Trap<()> {
    flatten::add_to_linker::<HostState, Has<Flatten>>(linker, get)
}

impl flatten::Host for Ctx<'_, Flatten> {
    async fn image(
        &mut self,
        image: String,
        source: Resource<ManifestHandle>,
        accept: Vec<String>,
    ) -> HostResult<Resource<ManifestHandle>> {
        let source = self.get(&source)?.0.clone();
        let upstream = self
            .service
            .upstream()
            .scoped(self.call.generator(), self.call.upstreams());
        upstream.check(&image)?;
        let flattened = self
            .service
            .image(&upstream, &image, &source, &accept, self.call.budget())
            .await?;
        self.push(ManifestHandle(flattened))
    }
}
