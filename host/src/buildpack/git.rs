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
    pub url: String,
    pub commit: String,
    pub dir: PathBuf,
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
        Url::parse(&text).map_err(|e| BuildpackError::InvalidName(format!("{text}: {e}")))
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
        mut cmd: tokio::process::Command,
        what: &str,
    ) -> Result<String, BuildpackError> {
        let done = match crate::process::run(&mut cmd, self.timeout, 1 << 20).await {
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
        // costs one ls-remote.
        let create = async || -> Result<(), BuildpackError> {
            let mut git_init = self.command(url, policy, &home).await?;
            init(&mut git_init);
            // No templates: sample hooks are never run here, and copying
            // them was half of init's time.
            git_init.args(["init", "-q", "--template="]);
            self.run(git_init, "init").await.map(drop)
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
                all.args([
                    "-c",
                    "uploadpack.allowFilter=true",
                    "fetch",
                    "-q",
                    "--filter=tree:0",
                    "--",
                    url.as_str(),
                    "+refs/heads/*:refs/remotes/origin/*",
                ]);
                self.run(all, "fetch").await?;
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
                fetch.args([
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
                self.run(fetch, &format!("fetch {commit}")).await?;
                let mut checkout = self.command(url, policy, home).await?;
                init(&mut checkout);
                checkout.args([
                    "-c",
                    "core.symlinks=true",
                    "checkout",
                    "-q",
                    "--detach",
                    commit,
                ]);
                self.run(checkout, &format!("checkout {commit}")).await?;
                let (repo, src, max) = (repo.clone(), dir.join("src"), self.max_bytes);
                let what = format!("{url} at {commit}");
                blocking(move || {
                    std::fs::remove_dir_all(repo.join(".git"))
                        .map_err(|e| BuildpackError::io("removing .git".into(), e))?;
                    let size = crate::files::tree_size(&repo)
                        .map_err(|e| BuildpackError::io("measuring the checkout".into(), e))?;
                    if size > max {
                        return Err(BuildpackError::TooLarge { what, limit: max });
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
            commit,
            dir: done.join("src"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
