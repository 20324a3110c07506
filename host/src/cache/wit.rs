//! The `cache` interface, host side.

use super::Cache;
use crate::runtime::host::wit::cache;
use crate::runtime::host::{Ctx, Getter, Has, HostResult, HostState, Linker, Trap, trap};

pub fn add_to_linker(linker: &mut Linker<HostState>, get: Getter<Cache>) -> Trap<()> {
    cache::add_to_linker::<HostState, Has<Cache>>(linker, get)
}

impl cache::Host for Ctx<'_, Cache> {
    async fn get(&mut self, key: String) -> Trap<Option<String>> {
        self.service
            .get(self.call.generator(), &key)
            .await
            .map_err(trap)
    }

    async fn set(&mut self, key: String, value: String) -> HostResult<()> {
        Ok(self
            .service
            .set(self.call.generator(), &key, &value)
            .await?)
    }
}
