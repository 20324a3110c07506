//! The `settings` interface, always linked: the generator's own `settings`
//! table from `kontain.toml`.

use super::bindings::kontain::generator::settings;
use super::host::{Ctx, Trap};

impl settings::Host for Ctx<'_, ()> {
    async fn get(&mut self, key: String) -> Trap<Option<String>> {
        Ok(self.call.settings().get(&key).cloned())
    }
}
