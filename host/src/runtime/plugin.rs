//! Loading a plugin: read the component (embedded or from disk), check what it
//! imports against its grants and our WIT version, compile it, and
//! pre-instantiate it so that each request only has to create a store.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::{Component, ComponentExportIndex, Linker};

use super::bindings::PluginPre;
use super::state::HostState;
use crate::capabilities::Capability;
use crate::config::{GeneratorConfig, Limits, Source};
use crate::generator::PluginId;
use crate::oci::Digest;

/// The WIT package this host implements; see `wit/generator.wit`.
pub const WIT_PACKAGE: &str = "kontain:generator";
pub const WIT_VERSION: (u64, u64, u64) = (0, 1, 1);

/// The optional `tags` export (since 0.1.1), looked up semver-compatibly:
/// a plugin of a later 0.1.x exports it under its own version.
const TAGS_EXPORT: (&str, &str) = ("kontain:generator/tags@0.1.1", "list");
/// The optional `referrers` export (since 0.1.1).
const REFERRERS_EXPORT: (&str, &str) = ("kontain:generator/referrers@0.1.1", "list");

/// Built-in generators, embedded at build time (see `build.rs`).
const BUILT_IN: &[(&str, &[u8])] = &[
    (
        "random",
        include_bytes!(concat!(env!("KONTAIN_PLUGINS_DIR"), "/random.wasm")),
    ),
    (
        "mirror",
        include_bytes!(concat!(env!("KONTAIN_PLUGINS_DIR"), "/mirror.wasm")),
    ),
    (
        "flatten",
        include_bytes!(concat!(env!("KONTAIN_PLUGINS_DIR"), "/flatten.wasm")),
    ),
    (
        "ko",
        include_bytes!(concat!(env!("KONTAIN_PLUGINS_DIR"), "/ko.wasm")),
    ),
    (
        "buildpack",
        include_bytes!(concat!(env!("KONTAIN_PLUGINS_DIR"), "/buildpack.wasm")),
    ),
];

pub struct Plugin {
    pub id: PluginId,
    /// The sha256 of the component's bytes.
    pub digest: Digest,
    pub limits: Limits,
    pub grants: BTreeSet<Capability>,
    /// Registries this plugin may reach, if restricted.
    pub upstreams: Option<Vec<String>>,
    /// The generator's `settings` table.
    pub settings: BTreeMap<String, String>,
    pub pre: PluginPre<HostState>,
    /// `tags.list`, if the plugin exports it (plugins built against 0.1.0
    /// cannot).
    pub tags: Option<ComponentExportIndex>,
    /// `referrers.list`, likewise.
    pub referrers: Option<ComponentExportIndex>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("generator {name}: there is no built-in plugin {builtin:?} (built in: {available})")]
    UnknownBuiltIn {
        name: String,
        builtin: String,
        available: String,
    },
    #[error("generator {name}: cannot read {}: {source}", path.display())]
    Read {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("generator {name}: not a valid WebAssembly component: {message}")]
    Compile { name: String, message: String },
    #[error(
        "generator {name}: it imports {import}, which needs the {:?} capability; add it to `grants` in kontain.toml to allow it",
        capability.name()
    )]
    NotGranted {
        name: String,
        import: String,
        capability: Capability,
    },
    #[error(
        "generator {name}: it was built against {import}, but this kontain implements {WIT_PACKAGE}@{}.{}.{}; rebuild it with a compatible kontain-sdk",
        WIT_VERSION.0, WIT_VERSION.1, WIT_VERSION.2
    )]
    IncompatibleVersion { name: String, import: String },
    #[error("generator {name}: it imports {import}, which kontain does not provide")]
    UnknownImport { name: String, import: String },
    #[error("generator {name}: {message}")]
    Link { name: String, message: String },
}

/// The component bytes a generator's `source` names.
pub fn read_source(name: &str, source: &Source) -> Result<Vec<u8>, LoadError> {
    match source {
        Source::BuiltIn(builtin) => BUILT_IN
            .iter()
            .find(|(n, _)| n == builtin)
            .map(|(_, bytes)| bytes.to_vec())
            .ok_or_else(|| LoadError::UnknownBuiltIn {
                name: name.to_owned(),
                builtin: builtin.clone(),
                available: BUILT_IN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        Source::File(path) => std::fs::read(path).map_err(|source| LoadError::Read {
            name: name.to_owned(),
            path: path.clone(),
            source,
        }),
    }
}

/// Compiles and checks a generator. CPU-heavy: call it off the async path.
pub fn load(
    engine: &Engine,
    linker: &Linker<HostState>,
    name: &str,
    config: &GeneratorConfig,
    bytes: &[u8],
    cache: Option<&Path>,
) -> Result<Plugin, LoadError> {
    let digest = Digest::sha256(bytes);
    let id = PluginId {
        name: name.to_owned(),
        version: format!("{}:{}", digest.algorithm_name(), &digest.hex()[..12]),
    };
    let cached = cache.map(|dir| dir.join(cache_file_name(engine, &digest)));
    let component = match cached.as_deref().and_then(|file| precompiled(engine, file)) {
        Some(component) => {
            tracing::info!(plugin = %id, "loaded from the precompiled cache, no compilation");
            component
        }
        None => {
            let component = Component::new(engine, bytes).map_err(|e| LoadError::Compile {
                name: name.to_owned(),
                message: format!("{e:#}"),
            })?;
            tracing::info!(plugin = %id, "compiled");
            if let Some(file) = &cached {
                store_precompiled(&component, file);
            }
            component
        }
    };
    let grants: BTreeSet<Capability> = config.grants.iter().copied().collect();
    for (import, _) in component.component_type().imports(engine) {
        check_import(name, import, &grants)?;
    }
    let instance_pre = linker
        .instantiate_pre(&component)
        .map_err(|e| LoadError::Link {
            name: name.to_owned(),
            message: format!("{e:#}"),
        })?;
    let pre = PluginPre::new(instance_pre).map_err(|e| LoadError::Link {
        name: name.to_owned(),
        message: format!("{e:#}"),
    })?;
    let optional = |(interface, function): (&str, &str)| {
        component
            .get_export_index(None, interface)
            .and_then(|interface| component.get_export_index(Some(&interface), function))
    };
    let (tags, referrers) = (optional(TAGS_EXPORT), optional(REFERRERS_EXPORT));
    Ok(Plugin {
        id,
        digest,
        limits: config.limits,
        grants,
        upstreams: config.upstreams.clone(),
        settings: config.settings.clone(),
        pre,
        tags,
        referrers,
    })
}

/// Compiled components are cached under the sha256 of the component and the
/// engine's compatibility hash (wasmtime version, target, settings), so that
/// a restart compiles nothing and an upgrade never loads stale code.
fn cache_file_name(engine: &Engine, digest: &Digest) -> String {
    let mut hasher = std::hash::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{}-{:016x}.cwasm", digest.hex(), hasher.finish())
}

fn precompiled(engine: &Engine, file: &Path) -> Option<Component> {
    if !file.is_file() {
        return None;
    }
    // SAFETY: `Component::deserialize_file` runs the machine code in `file`.
    // Files in the cache directory are only ever written by
    // `store_precompiled` from components this process compiled itself, and
    // published by atomic rename; the directory belongs to kontain (anyone
    // who can write there could equally replace the kontain binary). The
    // file name binds the component's digest and the engine's compatibility
    // hash, and wasmtime checks the latter again while loading.
    #[allow(unsafe_code)]
    let loaded = unsafe { Component::deserialize_file(engine, file) };
    match loaded {
        Ok(component) => Some(component),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %format!("{e:#}"), "ignoring an unusable precompiled component");
            None
        }
    }
}

fn store_precompiled(component: &Component, file: &Path) {
    let write = || -> std::io::Result<()> {
        let dir = file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let bytes = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        std::io::Write::write_all(&mut tmp, &bytes)?;
        tmp.persist(file).map_err(|e| e.error)?;
        Ok(())
    };
    if let Err(e) = write() {
        tracing::warn!(file = %file.display(), error = %e, "could not cache the compiled component");
    }
}

/// Accepts WASI imports (the context grants no files, env or network),
/// kontain imports of a compatible version that the plugin is granted, and
/// nothing else.
fn check_import(name: &str, import: &str, grants: &BTreeSet<Capability>) -> Result<(), LoadError> {
    if import.starts_with("wasi:") {
        return Ok(());
    }
    let unknown = || LoadError::UnknownImport {
        name: name.to_owned(),
        import: import.to_owned(),
    };
    let Some(rest) = import
        .strip_prefix(WIT_PACKAGE)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return Err(unknown());
    };
    let (interface, version) = rest.split_once('@').unwrap_or((rest, ""));
    if !compatible(version) {
        return Err(LoadError::IncompatibleVersion {
            name: name.to_owned(),
            import: import.to_owned(),
        });
    }
    if let Some(capability) = Capability::ALL.iter().find(|c| c.name() == interface) {
        if !grants.contains(capability) {
            return Err(LoadError::NotGranted {
                name: name.to_owned(),
                import: import.to_owned(),
                capability: *capability,
            });
        }
        return Ok(());
    }
    match interface {
        // Always available: the vocabulary every generator needs.
        "types" | "images" | "settings" => Ok(()),
        _ => Err(unknown()),
    }
}

/// Semver compatibility with `WIT_VERSION`: same major, and for 0.x the same
/// minor; a plugin may not need a newer minor than the host has.
fn compatible(version: &str) -> bool {
    let mut parts = version
        .split('.')
        .map(|p| p.split(['-', '+']).next().unwrap_or(p).parse::<u64>());
    let (Some(Ok(major)), Some(Ok(minor)), Some(Ok(_patch)), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (host_major, host_minor, _) = WIT_VERSION;
    if host_major == 0 {
        major == 0 && minor == host_minor
    } else {
        major == host_major && minor <= host_minor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_declared_version_matches_the_wit_file() {
        let wit = include_str!("../../../wit/generator.wit");
        let (a, b, c) = WIT_VERSION;
        assert!(wit.contains(&format!("package {WIT_PACKAGE}@{a}.{b}.{c};")));
    }

    #[test]
    fn checks_imports_against_grants_and_versions() {
        let none = BTreeSet::new();
        let random: BTreeSet<_> = [Capability::Random].into();
        let ok = |i: &str, g: &BTreeSet<Capability>| check_import("t", i, g).is_ok();
        assert!(ok("wasi:io/streams@0.2.6", &none));
        assert!(ok("kontain:generator/images@0.1.0", &none));
        assert!(ok("kontain:generator/images@0.1.7", &none));
        assert!(ok("kontain:generator/random@0.1.0", &random));
        assert!(matches!(
            check_import("t", "kontain:generator/random@0.1.0", &none),
            Err(LoadError::NotGranted { .. })
        ));
        assert!(matches!(
            check_import("t", "kontain:generator/images@0.2.0", &none),
            Err(LoadError::IncompatibleVersion { .. })
        ));
        assert!(matches!(
            check_import("t", "kontain:generator/images@1.0.0", &none),
            Err(LoadError::IncompatibleVersion { .. })
        ));
        assert!(matches!(
            check_import("t", "evil:thing/x@1.0.0", &none),
            Err(LoadError::UnknownImport { .. })
        ));
        assert!(matches!(
            check_import("t", "kontain:generator/secret@0.1.0", &none),
            Err(LoadError::UnknownImport { .. })
        ));
    }
}
