//! The `random` interface, host side.

use super::Random;
use crate::runtime::host::wit::random;
use crate::runtime::host::{
    Ctx, Getter, Has, HostResult, HostState, LayerHandle, Linker, Resource, Trap,
};

pub fn add_to_linker(linker: &mut Linker<HostState>, get: Getter<Random>) -> Trap<()> {
    random::add_to_linker::<HostState, Has<Random>>(linker, get)
}

impl random::Host for Ctx<'_, Random> {
    async fn layers(&mut self, count: u32, size: u64) -> HostResult<Vec<Resource<LayerHandle>>> {
        let blobs = self.service.layers(count, size, self.call.budget()).await?;
        let mut handles = Vec::with_capacity(blobs.len());
        for blob in blobs {
            self.call.produce(blob.size);
            handles.push(self.push(LayerHandle(blob))?);
        }
        Ok(handles)
    }
}
