//! The `go` capability (ko's): Go modules and builds, natively. Resolving
//! an import path to a module version over the module proxy protocol
//! (`proxy`, `modpath`), fetching and checking the module's zip (`source`),
//! running `go build` on it (`build`), and laying the binary out on a base
//! image as `ko build` does (`ko`). Its config section is `[go]` (`config`),
//! which reloads live; its WIT host implementation is `wit`.
//!
//! Depends on `upstream` (its policy-checked HTTP client, and base images
//! through the generator's scoped upstream), `image` and `storage`; knows
//! nothing of wasm or HTTP serving.

mod build;
pub mod config;
mod ko;
mod modpath;
mod proxy;
mod sbom;
mod serve;
mod source;
mod sumdb;
pub mod wit;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest as _, Sha256};

pub use build::{BuildOptions, Target, Toolchain, Workspace};
use config::GoConfig;
pub use ko::KoBuild;
pub use modpath::ImportPath;
use proxy::{Answer, Proxy};

use crate::generator::{Classify, ErrorKind};
use crate::image::once::DirCache;
use crate::image::{Builds, ImageError};
use crate::upstream::{Refusal, Upstream, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum GoError {
    #[error("{0}")]
    InvalidPath(String),
    #[error("no module on {proxies} provides {import_path} at {version}")]
    NotFound {
        import_path: String,
        version: String,
        proxies: String,
    },
    #[error("{module}@{version} has no package {import_path}")]
    NoPackage {
        module: String,
        version: String,
        import_path: String,
    },
    #[error("{import_path} is package {name}, not a main package: ko builds commands only")]
    NotMain { import_path: String, name: String },
    #[error("{module} cannot be checked against the checksum database: {reason}")]
    SumDb { module: String, reason: String },
    #[error(
        "{module}: the checksum database {db} records {recorded}, but the zip the proxy sent has {actual}; refusing it, as go would"
    )]
    Mismatch {
        module: String,
        recorded: String,
        actual: String,
        db: String,
    },
    #[error(transparent)]
    Refused(Refusal),
    #[error("the module proxy {proxy} is unreachable: {message}")]
    Unreachable { proxy: String, message: String },
    #[error("the module proxy {proxy} answered {status} for {what}")]
    Failing {
        proxy: String,
        what: String,
        status: u16,
    },
    #[error("the module proxy sent something unusable: {message}")]
    BadProxy { message: String },
    #[error("module {module}@{version} is refused: {reason}")]
    UnsafeModule {
        module: String,
        version: String,
        reason: String,
    },
    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error("cannot build {package}: {reason}")]
    BadOptions { package: String, reason: String },
    #[error("go build {package} ({target}) failed:\n{output}")]
    BuildFailed {
        package: String,
        target: String,
        output: String,
    },
    #[error("go build {package} ({target}) took longer than the limit of {seconds}s")]
    Timeout {
        package: String,
        target: String,
        seconds: u64,
    },
    #[error(
        "the go command {command:?} cannot be run ({message}); install Go (Debian: golang-go) or set `command` in kontain.toml's [go]"
    )]
    NoGo { command: String, message: String },
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl Classify for GoError {
    fn kind(&self) -> ErrorKind {
        match self {
            GoError::InvalidPath(_) | GoError::NotMain { .. } => ErrorKind::InvalidName,
            GoError::NotFound { .. } | GoError::NoPackage { .. } => ErrorKind::NotFound,
            GoError::Refused(_) | GoError::SumDb { .. } | GoError::Mismatch { .. } => {
                ErrorKind::Denied
            }
            GoError::UnsafeModule { .. } | GoError::BadOptions { .. } => ErrorKind::SourceRefused,
            GoError::TooLarge { .. } | GoError::Timeout { .. } => ErrorKind::LimitExceeded,
            // The name asks for a program that does not compile: the
            // request cannot succeed as it is, and retrying will not help.
            GoError::BuildFailed { .. } => ErrorKind::BuildFailed,
            GoError::Unreachable { .. }
            | GoError::Failing { .. }
            | GoError::BadProxy { .. }
            | GoError::NoGo { .. } => ErrorKind::Unavailable,
            GoError::Storage(e) => e.kind(),
            GoError::Upstream(e) => e.kind(),
            GoError::Image(e) => e.kind(),
        }
    }
}

impl GoError {
    pub(crate) fn io(what: String, source: std::io::Error) -> GoError {
        GoError::Image(ImageError::io(what, source))
    }

    /// The proxy is down or failing: a remembered resolution may be used.
    fn proxy_down(&self) -> bool {
        match self {
            GoError::Unreachable { .. } => true,
            GoError::Failing { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// One version of a module, unpacked and checked.
#[derive(Clone, Debug)]
pub struct Module {
    pub path: String,
    pub version: String,
    /// The unpacked tree. Shared by every request for this version: read it,
    /// never build in it (see [`Workspace`]).
    pub dir: PathBuf,
}

impl Module {
    /// A small text file of the module, if it exists and is at most `cap`
    /// bytes of UTF-8.
    pub fn read_file(&self, rel: &str, cap: u64) -> Option<String> {
        let clean = rel
            .split('/')
            .all(|e| !e.is_empty() && e != "." && e != "..");
        if !clean {
            return None;
        }
        let path = self.dir.join(rel);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if !meta.is_file() || meta.len() > cap {
            return None;
        }
        std::fs::read_to_string(path).ok()
    }
}

/// What `[go]` decides, replaced as a whole on reload; builds that started
/// keep the settings they started with.
struct Settings {
    proxies: Vec<Proxy>,
    /// The checksum database main modules are checked against (`None`: off).
    sumdb: Option<sumdb::SumDb>,
    toolchain: Toolchain,
    max_module: u64,
    /// `go env GOVERSION` of this toolchain, asked once.
    version: tokio::sync::OnceCell<String>,
}

impl Settings {
    fn new(config: &GoConfig, scratch: &Path) -> Result<Settings, String> {
        let proxies = config
            .proxies
            .iter()
            .map(Proxy::new)
            .collect::<Result<Vec<_>, _>>()?;
        // Each build gets kontain's own proxy (`serve`); nothing else.
        let goproxy = "off".to_owned();
        let sumdb = sumdb::SumDb::parse(&config.sumdb)?;
        if sumdb.is_none() {
            tracing::warn!(
                "[go] sumdb is off: module zips are not checked against a checksum database"
            );
        }
        // `go` checks dependencies with the full key (it asks for the
        // database through kontain's proxy, `serve`).
        let gosumdb = sumdb
            .as_ref()
            .map_or_else(|| "off".to_owned(), |db| db.key.clone());
        Ok(Settings {
            proxies,
            sumdb,
            toolchain: Toolchain {
                command: config.command.clone(),
                goproxy,
                gosumdb,
                mod_cache: scratch.join("mod"),
                build_cache: scratch.join("cache"),
                timeout: config.build_timeout,
                max_binary: config.max_binary_bytes.0,
            },
            max_module: config.max_module_bytes.0,
            version: tokio::sync::OnceCell::new(),
        })
    }

    fn proxy_names(&self) -> String {
        self.proxies
            .iter()
            .map(Proxy::describe)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The Go toolchain and module proxies, as the `go` capability offers them.
pub struct Go {
    settings: Arc<ArcSwap<Settings>>,
    /// The module proxy `go build` is given, started with the first build.
    server: tokio::sync::OnceCell<serve::ModuleServer>,
    upstream: Arc<Upstream>,
    builds: Arc<Builds>,
    scratch: PathBuf,
    /// Unpacked module versions, shared by every build of them.
    modules: DirCache,
    /// `go build` uses every core by itself; builds beyond this wait.
    slots: tokio::sync::Semaphore,
}

impl Go {
    pub fn new(
        config: &GoConfig,
        scratch: PathBuf,
        upstream: Arc<Upstream>,
        builds: Arc<Builds>,
    ) -> Result<Go, String> {
        // go wants absolute cache paths, and builds run in other directories.
        let scratch =
            std::path::absolute(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
        // Modules half-unpacked and builds a previous run left behind; not
        // those of another process sharing the scratch directory (builds end
        // within their timeouts, well under the hour).
        for leftover in ["tmp", "work"] {
            crate::files::remove_abandoned(
                &scratch.join(leftover),
                crate::storage::ABANDONED_AFTER,
            );
        }
        let settings = Settings::new(config, &scratch)?;
        Ok(Go {
            settings: Arc::new(ArcSwap::from_pointee(settings)),
            server: tokio::sync::OnceCell::new(),
            upstream,
            builds,
            modules: DirCache::new(scratch.join("modules"), scratch.join("tmp")),
            scratch,
            slots: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2)),
            ),
        })
    }

    /// Applies a changed `[go]` (but for `scratch`, which needs a restart):
    /// resolutions and builds from now on use the new settings.
    pub fn reconfigure(&self, config: &GoConfig) -> Result<(), String> {
        self.settings
            .store(Arc::new(Settings::new(config, &self.scratch)?));
        Ok(())
    }

    /// Where base images come from.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// A document from the first proxy that has it (404/410 fall through).
    async fn document(&self, path: &str) -> Result<Option<Vec<u8>>, GoError> {
        let client = self.upstream.client();
        for p in &self.settings.load().proxies {
            if let Answer::Found(body) = proxy::document(client, p, path).await? {
                return Ok(Some(body));
            }
        }
        Ok(None)
    }

    /// The version `query` means for `module`, if the module exists.
    async fn version_of(&self, module: &str, query: &str) -> Result<Option<String>, GoError> {
        if query == "latest" {
            let path = proxy::path_of(module, "@latest");
            if let Some(body) = self.document(&path).await? {
                return proxy::info_version(&body, &path).map(Some);
            }
            let list = proxy::path_of(module, "@v/list");
            let latest = self
                .document(&list)
                .await?
                .and_then(|body| modpath::latest_of(&String::from_utf8_lossy(&body)));
            if let Some(v) = &latest {
                proxy::check_version(v, &list)?;
            }
            return Ok(latest);
        }
        let path = proxy::version_path(module, query, "info");
        match self.document(&path).await? {
            Some(body) => proxy::info_version(&body, &path).map(Some),
            None => Ok(None),
        }
    }

    /// The module providing `import_path` at `query`, fetched and unpacked.
    /// A resolution is remembered, and reused when every proxy is down.
    pub async fn resolve(&self, import_path: &str, query: &str) -> Result<Module, GoError> {
        let import = ImportPath::parse(import_path).map_err(GoError::InvalidPath)?;
        modpath::check_query(query).map_err(GoError::InvalidPath)?;
        let memory = format!("go resolve {import} {query}");
        let found = match self.find(&import, query).await {
            Ok(found) => {
                if let Some((module, version)) = &found {
                    let value = format!("{module} {version}");
                    if let Err(e) = self.builds.store().put_value(&memory, &value).await {
                        tracing::warn!(error = %e, "could not remember a Go resolution");
                    }
                }
                found
            }
            Err(e) if e.proxy_down() => match self.builds.store().value(&memory).await? {
                Some(value) => {
                    tracing::warn!(%import, query, error = %e, "module proxy down: using the last resolution");
                    value
                        .split_once(' ')
                        .map(|(m, v)| (m.to_owned(), v.to_owned()))
                }
                None => return Err(e),
            },
            Err(e) => return Err(e),
        };
        let Some((module_path, version)) = found else {
            return Err(GoError::NotFound {
                import_path: import.to_string(),
                version: query.to_owned(),
                proxies: self.settings.load().proxy_names(),
            });
        };
        let module = self.fetch(&module_path, &version).await?;
        let rel = import.relative_to(&module.path).unwrap_or_default();
        let dir = module.dir.join(rel);
        let name = match dir.is_dir() {
            true => source::package_name(&dir),
            false => None,
        };
        match name {
            Some(name) if name == "main" => Ok(module),
            Some(name) => Err(GoError::NotMain {
                import_path: import.to_string(),
                name,
            }),
            None => Err(GoError::NoPackage {
                module: module.path,
                version: module.version,
                import_path: import.to_string(),
            }),
        }
    }

    /// The released versions of the module providing `import_path` (the
    /// longest module path the proxies know), as `@v/list` gives them:
    /// semver lines only.
    pub async fn versions(&self, import_path: &str) -> Result<Vec<String>, GoError> {
        let import = ImportPath::parse(import_path).map_err(GoError::InvalidPath)?;
        for candidate in import.module_candidates() {
            let list = proxy::path_of(candidate, "@v/list");
            // An empty list may be a proxy's answer for a path that is no
            // module; a longer path is tried first, as `find` does.
            if let Some(body) = self.document(&list).await? {
                let versions = modpath::versions_of(&String::from_utf8_lossy(&body));
                if !versions.is_empty() {
                    return Ok(versions);
                }
            }
        }
        Ok(Vec::new())
    }

    /// Longest module path first, as `go get` does.
    async fn find(
        &self,
        import: &ImportPath,
        query: &str,
    ) -> Result<Option<(String, String)>, GoError> {
        for candidate in import.module_candidates() {
            if let Some(version) = self.version_of(candidate, query).await? {
                return Ok(Some((candidate.to_owned(), version)));
            }
        }
        Ok(None)
    }

    /// The unpacked module, downloading and checking its zip the first time.
    async fn fetch(&self, module: &str, version: &str) -> Result<Module, GoError> {
        let key = hex::encode(Sha256::digest(format!("{module}@{version}")));
        let settings = self.settings.load_full();
        let client = self.upstream.client();
        let dir = self
            .modules
            .get_or_make(&key, |dir: PathBuf| async move {
                let mut zip = tempfile::tempfile_in(&dir)
                    .map_err(|e| GoError::io("creating a temporary file".into(), e))?;
                let path = proxy::version_path(module, version, "zip");
                let mut found = false;
                for p in &settings.proxies {
                    let answer =
                        proxy::fetch(client, p, &path, settings.max_module, &mut zip).await?;
                    if let Answer::Found(()) = answer {
                        found = true;
                        break;
                    }
                }
                if !found {
                    return Err(GoError::NotFound {
                        import_path: module.to_owned(),
                        version: version.to_owned(),
                        proxies: settings.proxy_names(),
                    });
                }
                let (owned_module, owned_version, cap) =
                    (module.to_owned(), version.to_owned(), settings.max_module);
                let target = dir.join("src");
                let h1 = crate::image::work::blocking(move || {
                    use std::io::Seek;
                    zip.rewind()
                        .map_err(|e| GoError::io("reading the module zip".into(), e))?;
                    std::fs::create_dir(&target)
                        .map_err(|e| GoError::io("creating a directory".into(), e))?;
                    source::unpack(zip, &owned_module, &owned_version, &target, cap)
                })
                .await?;
                // Before anything is built from it: the zip everybody's `go`
                // would accept, or nothing.
                if let Some(db) = &settings.sumdb {
                    db.verify(client, module, version, &h1).await?;
                    tracing::info!(module, version, %h1, sumdb = %db.name, "verified against the checksum database");
                }
                Ok(())
            })
            .await?;
        tracing::debug!(module, version, "Go module ready");
        Ok(Module {
            path: module.to_owned(),
            version: version.to_owned(),
            dir: dir.join("src"),
        })
    }

    /// Removes unpacked modules unused for `ttl`.
    pub fn collect(&self, ttl: std::time::Duration) -> usize {
        // What a crashed run left (the sweep at start keeps what is younger
        // than an hour: it may be another process's).
        for leftover in ["tmp", "work"] {
            crate::files::remove_abandoned(
                &self.scratch.join(leftover),
                crate::storage::ABANDONED_AFTER,
            );
        }
        self.modules.expire(ttl)
    }

    /// Where build workspaces are made.
    pub fn work_dir(&self) -> PathBuf {
        self.scratch.join("work")
    }

    /// `go env GOVERSION`, asked once per toolchain; "unknown" if go cannot
    /// run (a cached image is still served then).
    pub async fn version(&self) -> String {
        let settings = self.settings.load_full();
        settings
            .version
            .get_or_init(|| async {
                let out = tokio::process::Command::new(&settings.toolchain.command)
                    .args(["env", "GOVERSION"])
                    .env("GOTOOLCHAIN", "local")
                    .env("GOENV", "off")
                    .output()
                    .await;
                match out {
                    Ok(o) if o.status.success() => {
                        String::from_utf8_lossy(&o.stdout).trim().to_owned()
                    }
                    _ => "unknown".to_owned(),
                }
            })
            .await
            .clone()
    }

    /// Builds `package` for `target` in `workspace`, once a build slot is
    /// free; returns the binary's path inside the workspace.
    pub async fn build(
        &self,
        workspace: &Workspace,
        package: &ImportPath,
        target: &Target,
        options: &BuildOptions,
    ) -> Result<PathBuf, GoError> {
        let _slot = self.slots.acquire().await.map_err(|e| {
            GoError::io("waiting for a build slot".into(), std::io::Error::other(e))
        })?;
        let server = self
            .server
            .get_or_try_init(|| {
                serve::ModuleServer::start(self.settings.clone(), self.upstream.client().clone())
            })
            .await
            .map_err(|e| GoError::io("starting the module proxy for go".into(), e))?;
        let proxy = server.for_build();
        tracing::info!(%package, %target, module = %workspace.module().path, version = %workspace.module().version, "go build");
        let mut toolchain = self.settings.load().toolchain.clone();
        toolchain.goproxy = proxy.goproxy();
        let built = workspace.build(&toolchain, package, target, options).await;
        // A dependency the policy refused is why the build failed.
        match (built, proxy.refusal()) {
            (Err(_), Some(refusal)) => Err(GoError::Refused(refusal)),
            (built, _) => built,
        }
    }
}
