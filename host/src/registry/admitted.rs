//! Which repositories a generator has served a manifest under. Stored
//! content is shared by digest, but a name is only an answer when its
//! generator would serve it: a blob or a manifest by digest is answered from
//! storage under names whose generator has produced a manifest, and any other
//! name goes to the generator (whose policy refuses, or which produces it).
//! Clients always fetch a manifest before its blobs, so a real pull never
//! notices. Kept in memory and, for replicas and restarts, as stored values.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::generator::Route;
use crate::storage::ContentStore;

/// Names remembered in memory (then forgotten at once; storage still knows).
const MAX_REMEMBERED: usize = 100_000;

#[derive(Default)]
pub struct Admitted {
    known: Mutex<HashSet<String>>,
}

fn key(route: &Route) -> String {
    format!("{}/{}", route.generator, route.repository)
}

fn value_key(key: &str) -> String {
    format!("served {key}")
}

impl Admitted {
    fn remember(&self, key: String) -> bool {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= MAX_REMEMBERED {
            known.clear();
        }
        known.insert(key)
    }

    fn knows(&self, key: &str) -> bool {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.contains(key)
    }

    /// The generator of `route` served a manifest under its name.
    pub async fn admit(&self, store: &ContentStore, route: &Route) {
        let key = key(route);
        if self.remember(key.clone())
            && let Err(e) = store.put_value(&value_key(&key), "1").await
        {
            tracing::warn!(error = %e, "could not record a served repository");
        }
    }

    /// Whether the generator of `route` has served a manifest under its name.
    pub async fn admits(&self, store: &ContentStore, route: &Route) -> bool {
        let key = key(route);
        if self.knows(&key) {
            return true;
        }
        match store.value(&value_key(&key)).await {
            Ok(Some(_)) => {
                self.remember(key);
                true
            }
            _ => false,
        }
    }
}
