//! Sources from git: a revision resolved to one commit, fetched shallow into
//! a directory of its own.
//!
//! git runs with a cleared environment and no user or system config, only
//! the template's protocol allowed, no redirects, no hooks and no
//! submodules. For https, the host name is checked against the upstream
//! policy and resolved by us, and git is pinned to the checked address
//! (`http.curloptResolve`), so DNS cannot steer it somewhere private.

use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use super::BuildpackError;
use crate::image::once::DirCache;
use crate::image::work::blocking;
use crate::process::{RunError, is_plain};
use crate::upstream::Policy;

/// A commit checked out (without `.git`).
#[derive(Clone, Debug)]
pub struct Source {
    /// Where it was fetched from: the server's own URL, for its log only.
    pub url: String,
    /// The repository as the client named it (`owner/repo`).
    pub name: String,
    pub commit: String,
    pub dir: PathBuf,
}

impl Source {
    /// How images and plugins name the repository (see [`public`]).
    pub fn public(&self) -> String {
        match Url::parse(&self.url) {
            Ok(url) => public(&url, &self.name),
            Err(_) => self.name.clone(),
        }
    }
}

/// How clients see the repository at `url` that they named `name`: an
/// `http(s)` URL without credentials, query or fragment; otherwise (a
/// `file://` template: a server path) the name they gave.
pub fn public(url: &Url, name: &str) -> String {
    match url.scheme() {
        "http" | "https" => {
            let mut url = url.clone();
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        _ => name.to_owned(),
    }
}

/// `e` with the server's URL for the repository (and, for a `file://` one,
/// its path, which git's own messages print) replaced by how clients see
/// it: error messages reach them.
pub fn scrubbed(e: BuildpackError, url: &Url, name: &str) -> BuildpackError {
    let shown = public(url, name);
    let mut secrets = vec![url.as_str().to_owned()];
    if url.scheme() == "file" {
        // git prints paths decoded; the URL keeps them percent-encoded.
        let decoded = url
            .to_file_path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        for path in [url.path().to_owned(), decoded] {
            secrets.push(path.trim_end_matches('/').to_owned());
            secrets.push(path);
        }
    }
    // Longest first: a path inside another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.retain(|s| s.len() > 1);
    let clean = |text: String| {
        secrets
            .iter()
            .fold(text, |text, secret| text.replace(secret.as_str(), &shown))
    };
    match e {
        BuildpackError::Unreachable { url, message } => BuildpackError::Unreachable {
            url: clean(url),
            message: clean(message),
        },
        BuildpackError::UnknownRepository { what } => {
            BuildpackError::UnknownRepository { what: clean(what) }
        }
        BuildpackError::UnknownRevision { url, revision } => BuildpackError::UnknownRevision {
            url: clean(url),
            revision,
        },
        BuildpackError::Git { what, message } => BuildpackError::Git {
            what: clean(what),
            message: clean(message),
        },
        BuildpackError::TooLarge { what, limit } => BuildpackError::TooLarge {
            what: clean(what),
            limit,
        },
        BuildpackError::TooManyFiles { what, limit } => BuildpackError::TooManyFiles {
            what: clean(what),
            limit,
        },
        other => other,
    }
}

pub struct Git {
    pub command: PathBuf,
    pub template: String,
    pub timeout: Duration,
    pub max_bytes: u64,
}

/// `owner` and `repo` as they may appear in a URL: no `/`, no leading dot
/// or dash.
fn check_name(what: &str, s: &str) -> Result<(), BuildpackError> {
    if is_plain(s, 100) {
        Ok(())
    } else {
        Err(BuildpackError::InvalidName(format!(
            "{s:?} is not a valid {what}: use letters, digits, - _ ."
        )))
    }
}

fn check_revision(rev: &str) -> Result<(), BuildpackError> {
    // Tags are at most 128 characters; so are revisions.
    if is_plain(rev, 128) {
        Ok(())
    } else {
        Err(BuildpackError::InvalidName(format!(
            "{rev:?} is not a revision: use latest, a branch, a tag or a commit SHA"
        )))
    }
}

fn is_sha(rev: &str) -> bool {
    (7..=40).contains(&rev.len()) && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `rev` is an abbreviated commit id (which only the history can
/// resolve); a branch or tag may look like one, and is found first.
pub fn is_abbreviation(rev: &str) -> bool {
    is_sha(rev) && rev.len() < 40
}

/// A directory for one git job under `tmp`, with `home/` and `repo/`;
/// removed when dropped.
async fn scratch(tmp: &Path) -> Result<crate::files::Scratch, BuildpackError> {
    let tmp = tmp.to_owned();
    blocking(move || {
        std::fs::create_dir_all(&tmp)
            .map_err(|e| BuildpackError::io(format!("creating {}", tmp.display()), e))?;
        let work = tempfile::Builder::new()
            .prefix("git-")
            .tempdir_in(&tmp)
            .map(crate::files::Scratch::new)
            .map_err(|e| BuildpackError::io("creating a directory".into(), e))?;
        for d in ["home", "repo"] {
            std::fs::create_dir_all(work.path().join(d))
                .map_err(|e| BuildpackError::io("creating a directory".into(), e))?;
        }
        Ok::<_, BuildpackError>(work)
    })
    .await
}

impl Git {
    pub fn url(&self, owner: &str, repo: &str) -> Result<Url, BuildpackError> {
        check_name("owner", owner)?;
        check_name("repository", repo)?;
        let text = self
            .template
            .replace("{owner}", owner)
            .replace("{repo}", repo);
        // The template is the server's: the message names what the client
        // asked for.
        Url::parse(&text).map_err(|e| {
            BuildpackError::InvalidName(format!("{owner}/{repo} makes no git URL: {e}"))
        })
    }

    /// The git invocation: clean environment, restricted protocols, and for
    /// https the checked, pinned address.
    async fn command(
        &self,
        url: &Url,
        policy: &Policy,
        home: &Path,
    ) -> Result<tokio::process::Command, BuildpackError> {
        let mut cmd = tokio::process::Command::new(&self.command);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .args(["-c", "protocol.allow=never"])
            .args(["-c", "http.followRedirects=false"])
            .args(["-c", "core.hooksPath=/dev/null"])
            .args(["-c", "submodule.recurse=false"])
            .args(["-c", "core.fsmonitor=false"])
            .args(["-c", "advice.detachedHead=false"])
            // A checkout lives for one fetch: no housekeeping after it (a
            // process per fetch otherwise).
            .args(["-c", "maintenance.auto=false"])
            .args(["-c", "gc.auto=0"]);
        match url.scheme() {
            "file" => {
                cmd.args(["-c", "protocol.file.allow=always"]);
            }
            "https" | "http" => {
                policy.check_url(url).map_err(BuildpackError::Refused)?;
                let host = url.host_str().unwrap_or_default().to_owned();
                let port = url.port_or_known_default().unwrap_or(443);
                let addrs = tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(|e| BuildpackError::Unreachable {
                        url: url.to_string(),
                        message: e.to_string(),
                    })?;
                let mut pinned = None;
                let mut refusal = None;
                for addr in addrs {
                    match policy.check_address(&host, addr.ip()) {
                        Ok(()) => {
                            pinned = Some(addr.ip());
                            break;
                        }
                        Err(r) => refusal = Some(r),
                    }
                }
                let Some(ip) = pinned else {
                    return Err(match refusal {
                        Some(r) => BuildpackError::Refused(r),
                        None => BuildpackError::Unreachable {
                            url: url.to_string(),
                            message: "no address".into(),
                        },
                    });
                };
                let ip = match ip {
                    std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                    v4 => v4.to_string(),
                };
                cmd.args(["-c", &format!("protocol.{}.allow=always", url.scheme())])
                    .args(["-c", &format!("http.curloptResolve={host}:{port}:{ip}")]);
            }
            other => {
                return Err(BuildpackError::InvalidName(format!(
                    "git sources are https:// or file://, not {other}"
                )));
            }
        }
        Ok(cmd)
    }

    async fn run(
        &self,
        cmd: tokio::process::Command,
        what: &str,
    ) -> Result<String, BuildpackError> {
        self.run_with(cmd, what, None).await
    }

    /// Runs git; with `bound`, output past it stops git and is
    /// [`BuildpackError::TooLarge`] (`bound.1` names what), else the first
    /// MiB is kept.
    async fn run_with(
        &self,
        mut cmd: tokio::process::Command,
        what: &str,
        bound: Option<(usize, String)>,
    ) -> Result<String, BuildpackError> {
        let ran = match &bound {
            Some((cap, _)) => crate::process::run_bounded(&mut cmd, self.timeout, *cap).await,
            None => crate::process::run(&mut cmd, self.timeout, 1 << 20).await,
        };
        let done = match ran {
            Ok(done) => done,
            Err(RunError::Spawn(e)) => {
                return Err(BuildpackError::Tool {
                    tool: self.command.display().to_string(),
                    message: format!("{e}; install git or set [buildpack] git_command"),
                });
            }
            Err(RunError::Wait(e)) => {
                return Err(BuildpackError::io(format!("running git {what}"), e));
            }
            Err(RunError::Overflow) => {
                let (cap, named) = bound.unwrap_or_default();
                return Err(BuildpackError::TooLarge {
                    what: format!("the listing of {named}"),
                    limit: cap as u64,
                });
            }
            Err(RunError::Timeout) => {
                return Err(BuildpackError::Git {
                    what: what.to_owned(),
                    message: format!("took longer than {}s", self.timeout.as_secs()),
                });
            }
        };
        if !done.status.success() {
            let stderr = String::from_utf8_lossy(&done.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            let message = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
            let missing = [
                "not found",
                "does not appear to be a git repository",
                "does not exist",
            ];
            if what.starts_with("ls-remote") && missing.iter().any(|m| message.contains(m)) {
                return Err(BuildpackError::UnknownRepository {
                    what: what.trim_start_matches("ls-remote ").to_owned(),
                });
            }
            return Err(BuildpackError::Git {
                what: what.to_owned(),
                message,
            });
        }
        Ok(String::from_utf8_lossy(&done.stdout).into_owned())
    }

    /// The branches and tags of the repository at `url`, short names.
    pub async fn refs(
        &self,
        url: &Url,
        policy: &Policy,
        tmp: &Path,
    ) -> Result<Vec<String>, BuildpackError> {
        let work = scratch(tmp).await?;
        let mut ls = self.command(url, policy, &work.path().join("home")).await?;
        ls.args(["ls-remote", "--heads", "--tags", "--", url.as_str()]);
        let refs = self.run(ls, &format!("ls-remote {url}")).await?;
        Ok(refs
            .lines()
            .filter_map(|l| l.split_once('\t').map(|(_, r)| r))
            .filter_map(|r| {
                r.strip_prefix("refs/heads/")
                    .or_else(|| r.strip_prefix("refs/tags/"))
            })
            .filter(|r| !r.ends_with("^{}"))
            .map(str::to_owned)
            .collect())
    }

    /// The commit `revision` names, and the commit's files, checked out
    /// once into `sources`; `tmp` holds the work of one fetch.
    pub async fn fetch(
        &self,
        url: &Url,
        name: &str,
        revision: &str,
        policy: &Policy,
        sources: &DirCache,
        tmp: &Path,
    ) -> Result<Source, BuildpackError> {
        check_revision(revision)?;
        let work = scratch(tmp).await?;
        let home = work.path().join("home");
        let repo = work.path().join("repo");
        let mut ls = self.command(url, policy, &home).await?;
        ls.args(["ls-remote", "--", url.as_str()]);
        let refs = self.run(ls, &format!("ls-remote {url}")).await?;
        let find = |name: &str| {
            refs.lines().find_map(|l| {
                let (sha, r) = l.split_once('\t')?;
                (r == name).then(|| sha.to_owned())
            })
        };
        let resolved = if revision == "latest" {
            find("HEAD")
        } else {
            find(&format!("refs/heads/{revision}"))
                .or_else(|| find(&format!("refs/tags/{revision}^{{}}")))
                .or_else(|| find(&format!("refs/tags/{revision}")))
        };
        let init = |cmd: &mut tokio::process::Command| {
            cmd.current_dir(&repo);
        };
        // Only a fetch needs a repository: a commit already checked out
        // costs one ls-remote. What `git init` would make, less its
        // templates and config (defaults for both): a process less per
        // new commit.
        let create = async || -> Result<(), BuildpackError> {
            let git_dir = repo.join(".git");
            blocking(move || {
                let skeleton = || -> std::io::Result<()> {
                    std::fs::create_dir_all(git_dir.join("objects"))?;
                    std::fs::create_dir_all(git_dir.join("refs"))?;
                    std::fs::create_dir_all(git_dir.join("info"))?;
                    std::fs::write(git_dir.join("HEAD"), "ref: refs/heads/main\n")?;
                    // Attributes that make the checkout larger than its
                    // blobs (`ident` expands `$Id$` twelvefold, an encoding
                    // to UTF-32 fourfold) are off whatever the repository
                    // says; filters have no drivers here anyway.
                    std::fs::write(
                        git_dir.join("info/attributes"),
                        "* -ident -filter -working-tree-encoding\n",
                    )
                };
                skeleton().map_err(|e| BuildpackError::io("creating a repository".into(), e))
            })
            .await
        };
        let commit = match resolved {
            Some(sha) => sha,
            None if revision.len() == 40 && is_sha(revision) => revision.to_ascii_lowercase(),
            None if is_sha(revision) => {
                // An abbreviated SHA: only the history can say which commit.
                // Its commits only (no trees, no files), where the server
                // can filter (GitHub can): the whole repository's bytes are
                // not fetched to find one id. In a repository of its own, so
                // that the checkout's is not a partial clone.
                tracing::info!(%revision, "fetching the history to find an abbreviated commit");
                let history = work.path().join("history");
                let in_history = |cmd: &mut tokio::process::Command| {
                    cmd.current_dir(&history);
                };
                std::fs::create_dir_all(&history)
                    .map_err(|e| BuildpackError::io("creating a directory".into(), e))?;
                let mut git_init = self.command(url, policy, &home).await?;
                in_history(&mut git_init);
                git_init.args(["init", "-q", "--template="]);
                self.run(git_init, "init").await?;
                let mut all = self.command(url, policy, &home).await?;
                in_history(&mut all);
                crate::process::limit_file_size(&mut all, self.max_bytes);
                all.args([
                    "-c",
                    "fetch.unpackLimit=1",
                    "-c",
                    "uploadpack.allowFilter=true",
                    "fetch",
                    "-q",
                    "--filter=tree:0",
                    "--",
                    url.as_str(),
                    "+refs/heads/*:refs/remotes/origin/*",
                ]);
                let history_too_large = || BuildpackError::TooLarge {
                    what: format!("the history of {name}"),
                    limit: self.max_bytes,
                };
                match self.run(all, "fetch").await {
                    Err(BuildpackError::Git { .. })
                        if reached(&history.join(".git"), self.max_bytes) =>
                    {
                        return Err(history_too_large());
                    }
                    fetched => fetched?,
                };
                // Many packs or loose objects (a dumb http server, which
                // ignores the filter), each under the limit: all of them.
                if reached(&history.join(".git"), self.max_bytes) {
                    return Err(history_too_large());
                }
                let mut parse = self.command(url, policy, &home).await?;
                in_history(&mut parse);
                parse.args([
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    &format!("{revision}^{{commit}}"),
                ]);
                self.run(parse, &format!("rev-parse {revision}"))
                    .await
                    .map_err(|_| BuildpackError::UnknownRevision {
                        url: url.to_string(),
                        revision: revision.to_owned(),
                    })?
                    .trim()
                    .to_owned()
            }
            None => {
                return Err(BuildpackError::UnknownRevision {
                    url: url.to_string(),
                    revision: revision.to_owned(),
                });
            }
        };
        // A commit id names content only within the repository it came from:
        // the cache is per URL, so that one repository's (unadvertised) SHA
        // never serves another's checkout.
        let url_digest = crate::oci::Digest::sha256(url.as_str().as_bytes());
        let key = format!("{}-{commit}", &url_digest.hex()[..16]);
        let (home, repo, commit_ref, init, create) = (&home, &repo, &commit, &init, &create);
        let done = sources
            .get_or_make(&key, |dir: PathBuf| async move {
                let commit = commit_ref;
                if !repo.join(".git").is_dir() {
                    create().await?;
                }
                let mut fetch = self.command(url, policy, home).await?;
                init(&mut fetch);
                // The pack is kept as it arrives (not unpacked into loose
                // objects), one file the size limit bounds while it is
                // written: a repository larger than `max_source_bytes`
                // costs at most that much disk and transfer.
                crate::process::limit_file_size(&mut fetch, self.max_bytes);
                fetch.args([
                    "-c",
                    "fetch.unpackLimit=1",
                    "fetch",
                    "-q",
                    "--no-tags",
                    "--no-write-fetch-head",
                    "--depth",
                    "1",
                    "--",
                    url.as_str(),
                    commit,
                ]);
                let too_large = || BuildpackError::TooLarge {
                    what: format!("{name} at {commit}"),
                    limit: self.max_bytes,
                };
                match self.run(fetch, &format!("fetch {commit}")).await {
                    Err(BuildpackError::Git { .. })
                        if reached(&repo.join(".git"), self.max_bytes) =>
                    {
                        return Err(too_large());
                    }
                    fetched => fetched?,
                };
                // Fetched objects past the limit in all (several packs, or
                // loose objects: a dumb http server).
                let (git_dir, max) = (repo.join(".git"), self.max_bytes);
                if blocking(move || Ok::<_, BuildpackError>(reached(&git_dir, max))).await? {
                    return Err(too_large());
                }
                // What the checkout would write, before it writes it: a
                // small pack can hold one big file under many names, or
                // millions of names (a tree that holds itself).
                let mut list = self.command(url, policy, home).await?;
                init(&mut list);
                list.args(["ls-tree", "-r", "-l", "-z", "--full-tree", commit]);
                let bound = (MAX_LISTING, format!("{name} at {commit}"));
                let listed = self
                    .run_with(list, &format!("ls-tree {commit}"), Some(bound))
                    .await?;
                let Some((bytes, files)) = checkout_size(&listed) else {
                    return Err(BuildpackError::TooManyFiles {
                        what: format!("{name} at {commit} (nested deeper than {MAX_DEPTH})"),
                        limit: MAX_CHECKOUT_FILES,
                    });
                };
                if bytes > self.max_bytes {
                    return Err(too_large());
                }
                if files > MAX_CHECKOUT_FILES {
                    return Err(BuildpackError::TooManyFiles {
                        what: format!("{name} at {commit}"),
                        limit: MAX_CHECKOUT_FILES,
                    });
                }
                let mut checkout = self.command(url, policy, home).await?;
                init(&mut checkout);
                crate::process::limit_file_size(&mut checkout, self.max_bytes);
                checkout.args([
                    "-c",
                    "core.symlinks=true",
                    "checkout",
                    "-q",
                    "--detach",
                    commit,
                ]);
                match self.run(checkout, &format!("checkout {commit}")).await {
                    // Line endings the attributes convert grew a file past
                    // the limit.
                    Err(BuildpackError::Git { .. }) if reached(repo, self.max_bytes) => {
                        return Err(too_large());
                    }
                    checked_out => checked_out?,
                };
                let (repo, src, max) = (repo.clone(), dir.join("src"), self.max_bytes);
                let too_large = too_large();
                blocking(move || {
                    std::fs::remove_dir_all(repo.join(".git"))
                        .map_err(|e| BuildpackError::io("removing .git".into(), e))?;
                    // What the listing cannot foresee (line endings the
                    // repository's attributes convert), measured.
                    let size = crate::files::tree_size(&repo)
                        .map_err(|e| BuildpackError::io("measuring the checkout".into(), e))?;
                    if size > max {
                        return Err(too_large);
                    }
                    std::fs::rename(&repo, &src)
                        .map_err(|e| BuildpackError::io("moving the checkout".into(), e))
                })
                .await
            })
            .await?;
        // The work directory (git's home, what is left of the repository)
        // goes when `work` is dropped.
        Ok(Source {
            url: url.to_string(),
            name: name.to_owned(),
            commit,
            dir: done.join("src"),
        })
    }
}

/// Whether a failed git under the file size limit was stopped by it: a
/// file under `dir` (a pack, a loose object, a checked-out file) reached
/// `limit` bytes, or all of them passed it. git itself only says "invalid
/// index-pack output" or "unable to write file" when its writer is killed.
fn reached(dir: &Path, limit: u64) -> bool {
    fn walk(dir: &Path, limit: u64, total: &mut u64) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                if walk(&entry.path(), limit, total) {
                    return true;
                }
            } else if meta.is_file() {
                *total += meta.len();
                if meta.len() >= limit || *total > limit {
                    return true;
                }
            }
        }
        false
    }
    walk(dir, limit, &mut 0)
}

/// The bytes and the number of the entries a `git ls-tree -r -l -z`
/// listing makes on disk: files (a symlink counts its target's length, a
/// submodule nothing) and the directories they are in, each once (a small
/// repository can name the same subtree under many names); `None` for a
/// path deeper than [`MAX_DEPTH`].
fn checkout_size(listing: &str) -> Option<(u64, usize)> {
    let mut dirs = std::collections::HashSet::new();
    let (mut bytes, mut files) = (0u64, 0usize);
    for entry in listing.split('\0') {
        let Some((meta, path)) = entry.split_once('\t') else {
            continue;
        };
        let size = meta
            .split_whitespace()
            .nth(3)
            .map_or(0, |s| s.parse::<u64>().unwrap_or(0));
        bytes = bytes.saturating_add(size);
        files += 1;
        let mut depth = 0;
        for (at, _) in path.match_indices('/') {
            depth += 1;
            if depth > MAX_DEPTH {
                return None;
            }
            dirs.insert(&path[..at]);
        }
    }
    Some((bytes, files + dirs.len()))
}

/// The deepest a checkout's paths may go.
const MAX_DEPTH: usize = 256;

/// The longest listing of a commit's files read (64 MiB: about a million
/// entries); a longer one is too large.
const MAX_LISTING: usize = 64 << 20;

/// The most files and directories a checkout may have.
const MAX_CHECKOUT_FILES: usize = 500_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_named_without_server_paths_or_credentials() {
        for (url, want) in [
            ("https://github.com/acme/app", "https://github.com/acme/app"),
            (
                "https://user:secret@git.example/acme/app.git?x=1#y",
                "https://git.example/acme/app.git",
            ),
            ("file:///srv/git/acme/app", "acme/app"),
            ("ssh://git@host/srv/acme/app", "acme/app"),
        ] {
            let source = Source {
                url: url.into(),
                name: "acme/app".into(),
                commit: String::new(),
                dir: PathBuf::new(),
            };
            assert_eq!(source.public(), want, "{url}");
        }
    }

    /// A repository under `root/acme/<name>` with `files` (name, bytes)
    /// committed on `main`.
    fn repository(root: &Path, name: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
        let dir = root.join("acme").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let git = |args: &[&str]| {
            let done = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(done.status.success(), "{args:?}: {done:?}");
        };
        git(&["init", "-q", "-b", "main"]);
        for (file, bytes) in files {
            std::fs::write(dir.join(file), bytes).unwrap();
        }
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "only"]);
        dir
    }

    async fn fetch_with_limit(
        root: &Path,
        name: &str,
        limit: u64,
    ) -> Result<Source, BuildpackError> {
        let git = Git {
            command: "git".into(),
            template: format!("file://{}/{{owner}}/{{repo}}", root.display()),
            timeout: Duration::from_secs(60),
            max_bytes: limit,
        };
        let url = git.url("acme", name)?;
        let sources = DirCache::new(root.join("sources"), root.join("tmp"));
        let shown = format!("acme/{name}");
        git.fetch(
            &url,
            &shown,
            "main",
            &Policy::default(),
            &sources,
            &root.join("tmp"),
        )
        .await
        .map_err(|e| scrubbed(e, &url, &shown))
    }

    #[tokio::test]
    async fn max_source_bytes_bounds_the_fetch_and_the_checkout() {
        let root = tempfile::tempdir().unwrap();
        let random: Vec<u8> = (0..2_000_000).map(|_| rand::random::<u8>()).collect();
        repository(root.path(), "big", &[("blob.bin", random)]);
        // A small pack that checks out large: one file of zeros, four names.
        let zeros = vec![0u8; 600_000];
        let names = ["a", "b", "c", "d"].map(|n| (n, zeros.clone()));
        repository(root.path(), "bomb", &names);
        repository(root.path(), "small", &[("README", b"hi\n".to_vec())]);
        for name in ["big", "bomb"] {
            match fetch_with_limit(root.path(), name, 1_000_000).await {
                Err(BuildpackError::TooLarge { what, limit }) => {
                    assert_eq!(limit, 1_000_000);
                    assert!(what.starts_with(&format!("acme/{name} at ")), "{what}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        // The pack stopped at the limit: nothing of it is kept.
        let kept = crate::files::tree_size(&root.path().join("sources")).unwrap_or(0);
        assert!(kept < 100_000, "{kept} bytes kept");
        let small = fetch_with_limit(root.path(), "small", 1_000_000)
            .await
            .unwrap();
        assert_eq!(std::fs::read(small.dir.join("README")).unwrap(), b"hi\n");
        assert_eq!(small.public(), "acme/small");
        // A repository that is not there is named as the client named it.
        let missing = fetch_with_limit(root.path(), "missing", 1_000_000)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            !missing.contains(&root.path().display().to_string()),
            "{missing}"
        );
        assert!(missing.contains("acme/missing"), "{missing}");
    }

    #[tokio::test]
    async fn attributes_that_grow_a_checkout_are_off() {
        let root = tempfile::tempdir().unwrap();
        let keyword = b"$Id$\n".repeat(1000);
        let files = [
            (".gitattributes", b"* ident\n".to_vec()),
            ("ids.txt", keyword.clone()),
        ];
        repository(root.path(), "ident", &files);
        let source = fetch_with_limit(root.path(), "ident", 1_000_000)
            .await
            .unwrap();
        assert_eq!(std::fs::read(source.dir.join("ids.txt")).unwrap(), keyword);
    }

    #[test]
    fn checkout_sizes_add_up_from_a_listing() {
        let listing = [
            "100644 blob aaaa      14\tmessage.txt",
            "100755 blob bbbb 41\trun sh",
            "160000 commit cccc       -\tsub",
            "",
        ]
        .join("\0");
        assert_eq!(checkout_size(&listing), Some((55, 3)));
        // Directories count, once each; too deep is refused.
        let nested = ["a/b/c", "a/b/d", "a/e"]
            .map(|path| format!("100644 blob a 1\t{path}\0"))
            .concat();
        assert_eq!(checkout_size(&nested), Some((3, 5)));
        let deep = format!("100644 blob a 1\t{}f\0", "d/".repeat(300));
        assert_eq!(checkout_size(&deep), None);
    }

    #[test]
    fn names_and_revisions_are_plain() {
        assert!(check_name("owner", "acme").is_ok());
        assert!(check_name("owner", "../etc").is_err());
        assert!(check_name("owner", "-upload-pack=x").is_err());
        assert!(check_revision("main").is_ok());
        assert!(check_revision("v1.2.3").is_ok());
        assert!(check_revision("--upload-pack=evil").is_err());
        assert!(check_revision("a/b").is_err());
        assert!(is_sha("0123abc"));
        assert!(!is_sha("main"));
    }
}
