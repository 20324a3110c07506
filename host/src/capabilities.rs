//! The host capabilities a plugin can be granted, in one list: each is a WIT
//! interface (named as its grant) and a module of its own that holds its
//! WIT host implementation (`<module>/wit.rs`), its config section, its
//! native work and its tests. This file names them, builds their services
//! from the config, links the granted ones for a plugin, and passes reloads
//! and expiry on to them. Adding a capability adds a variant here and a line
//! in each `match` (the compiler lists them); see `docs/capabilities.md`.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::buildpack::Buildpacks;
use crate::cache::Cache;
use crate::config::Config;
use crate::flatten::Flatten;
use crate::go::Go;
use crate::image::{Builds, Cpu};
use crate::random::Random;
use crate::runtime::host::{HostState, Linker, Trap};
use crate::storage::ContentStore;
use crate::upstream::{HostPattern, Upstream};

/// A host capability a plugin can be granted; each is one WIT interface.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// `kontain:generator/random`: layers of random bytes.
    Random,
    /// `kontain:generator/upstream`: other registries, through the allowlist.
    Upstream,
    /// `kontain:generator/flatten`: images squashed to one layer.
    Flatten,
    /// `kontain:generator/cache`: a private key-value store.
    Cache,
    /// `kontain:generator/go`: Go modules fetched and built natively.
    Go,
    /// `kontain:generator/buildpack`: git sources built with CNB buildpacks.
    Buildpack,
}

impl Capability {
    pub const ALL: &'static [Capability] = &[
        Capability::Random,
        Capability::Upstream,
        Capability::Flatten,
        Capability::Cache,
        Capability::Go,
        Capability::Buildpack,
    ];

    /// The grant name, which is also the WIT interface's name.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Random => "random",
            Capability::Upstream => "upstream",
            Capability::Flatten => "flatten",
            Capability::Cache => "cache",
            Capability::Go => "go",
            Capability::Buildpack => "buildpack",
        }
    }

    /// Adds this capability's interface to a plugin's linker.
    pub fn link(self, linker: &mut Linker<HostState>) -> Trap<()> {
        match self {
            Capability::Random => {
                crate::random::wit::add_to_linker(linker, |s| s.view(|v| &*v.random))
            }
            Capability::Upstream => {
                crate::upstream::wit::add_to_linker(linker, |s| s.view(|v| &*v.upstream))
            }
            Capability::Flatten => {
                crate::flatten::wit::add_to_linker(linker, |s| s.view(|v| &*v.flatten))
            }
            Capability::Cache => {
                crate::cache::wit::add_to_linker(linker, |s| s.view(|v| &*v.cache))
            }
            Capability::Go => crate::go::wit::add_to_linker(linker, |s| s.view(|v| &*v.go)),
            Capability::Buildpack => {
                crate::buildpack::wit::add_to_linker(linker, |s| s.view(|v| &*v.buildpack))
            }
        }
    }
}

/// Every capability's shared service, built once from the config; each
/// request's store holds a copy (a handful of `Arc`s).
#[derive(Clone)]
pub struct Services {
    /// The store every capability writes to; also the `images` interface's.
    pub store: Arc<ContentStore>,
    pub random: Arc<Random>,
    pub upstream: Arc<Upstream>,
    pub flatten: Arc<Flatten>,
    pub cache: Arc<Cache>,
    pub go: Arc<Go>,
    pub buildpack: Arc<Buildpacks>,
}

/// Hosts the upstream client must reach for other sections: the module
/// proxies of `[go]` and the git host of `[buildpack]`.
fn extra_hosts(config: &Config) -> Vec<HostPattern> {
    let mut hosts = config.go.upstream_hosts();
    hosts.extend(config.buildpack.upstream_hosts());
    hosts
}

impl Services {
    pub fn new(config: &Config, store: Arc<ContentStore>) -> Result<Self, String> {
        let cpu = Cpu::default();
        let builds = Arc::new(Builds::new(store.clone(), cpu.clone()));
        let upstream = Arc::new(Upstream::new(
            &config.upstream,
            &extra_hosts(config),
            store.clone(),
        )?);
        let local = &config.storage.path;
        let go = Go::new(
            &config.go,
            config
                .go
                .scratch
                .clone()
                .unwrap_or_else(|| local.join("go")),
            upstream.clone(),
            builds.clone(),
        )?;
        let buildpack = Buildpacks::new(
            &config.buildpack,
            config
                .buildpack
                .scratch
                .clone()
                .unwrap_or_else(|| local.join("buildpack")),
            upstream.clone(),
            builds.clone(),
        )?;
        Ok(Services {
            random: Arc::new(Random::new(store.clone(), cpu)),
            flatten: Arc::new(Flatten::new(upstream.clone(), builds)),
            cache: Arc::new(Cache::new(store.clone())),
            go: Arc::new(go),
            buildpack: Arc::new(buildpack),
            upstream,
            store,
        })
    }

    /// Applies the sections of `next` that reload live, each on its own, and
    /// returns the config now in force: a section that fails to apply is
    /// logged and keeps its previous settings (so that the next edit tries
    /// it again) without holding the others back.
    pub fn reconfigure(&self, current: &Config, next: &Config) -> Config {
        let mut applied = next.clone();
        let outcome = |name: &str, result: Result<(), String>| match result {
            Ok(()) => {
                tracing::info!("reloaded [{name}]");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "[{name}] not reloaded; its previous settings stay");
                false
            }
        };
        // The upstream policy also allows what [go] and [buildpack] reach.
        if (current.upstream != next.upstream || extra_hosts(current) != extra_hosts(next))
            && !outcome(
                "upstream",
                self.upstream
                    .reconfigure(&next.upstream, &extra_hosts(next)),
            )
        {
            applied.upstream = current.upstream.clone();
        }
        if current.go != next.go && !outcome("go", self.go.reconfigure(&next.go)) {
            applied.go = current.go.clone();
        }
        if current.buildpack != next.buildpack {
            self.buildpack.reconfigure(&next.buildpack);
            outcome("buildpack", Ok(()));
        }
        applied
    }

    /// Removes the local trees (modules, checkouts, builders) unused for
    /// `ttl`; returns how many went.
    pub fn collect(&self, ttl: Duration) -> usize {
        self.go.collect(ttl) + self.buildpack.collect(ttl)
    }
}
