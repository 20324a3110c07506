//! A Go checksum database on loopback, as `sum.golang.org` serves one: a
//! tamper-evident log of `<module> <version> h1:…` records (RFC 6962
//! hashing, tiles of height 8), a tree head signed in the `note` format with
//! a test key, `/lookup`, `/latest` and `/tile` endpoints.

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};

use super::rt;

type Hash = [u8; 32];

/// The database's name, as `GOSUMDB` and the signatures name it.
pub const NAME: &str = "sum.kontain.test";

fn leaf_hash(data: &[u8]) -> Hash {
    Sha256::new()
        .chain_update([0u8])
        .chain_update(data)
        .finalize()
        .into()
}

fn node_hash(l: &Hash, r: &Hash) -> Hash {
    Sha256::new()
        .chain_update([1u8])
        .chain_update(l)
        .chain_update(r)
        .finalize()
        .into()
}

/// The RFC 6962 hash of `leaves`.
fn tree_hash(leaves: &[Hash]) -> Hash {
    if leaves.len() == 1 {
        return leaves[0];
    }
    let k = 1 << (63 - (leaves.len() as u64 - 1).leading_zeros());
    node_hash(&tree_hash(&leaves[..k]), &tree_hash(&leaves[k..]))
}

/// `h1:` over `(name, content)` files, as Go's dirhash computes it.
pub fn h1(files: &[(String, Vec<u8>)]) -> String {
    // One line per file, in the order of the names.
    let mut sorted: Vec<&(String, Vec<u8>)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let lines: String = sorted
        .iter()
        .map(|(name, data)| format!("{}  {name}\n", hex::encode(Sha256::digest(data))))
        .collect();
    format!("h1:{}", BASE64.encode(Sha256::digest(lines)))
}

/// The `h1:` of a module zip and of its `go.mod`, from a proxy directory.
pub fn hashes(proxy: &Path, module: &str, version: &str) -> anyhow::Result<(String, String)> {
    let dir = proxy.join(module).join("@v");
    let mut zip = zip::ZipArchive::new(std::fs::File::open(dir.join(format!("{version}.zip")))?)?;
    let mut files = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i)?;
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        files.push((entry.name()?.into_owned(), data));
    }
    let go_mod = std::fs::read(dir.join(format!("{version}.mod")))?;
    Ok((h1(&files), h1(&[("go.mod".to_owned(), go_mod)])))
}

struct Log {
    records: Vec<(String, String)>,
    leaves: Vec<Hash>,
    note: String,
}

/// The database: its verifier key and address, serving until dropped.
pub struct SumDb {
    pub key: String,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl SumDb {
    /// A database of `records` (`(module@version, hashes)`), its tree head
    /// signed with the key of `seed`, or with another key when `forged`.
    pub fn start(
        records: &[(String, (String, String))],
        seed: u8,
        forged: bool,
    ) -> anyhow::Result<SumDb> {
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let public = ring::signature::KeyPair::public_key(&pair)
            .as_ref()
            .to_vec();
        let key_hash = {
            let d = Sha256::new()
                .chain_update(NAME.as_bytes())
                .chain_update(b"\n\x01")
                .chain_update(&public)
                .finalize();
            [d[0], d[1], d[2], d[3]]
        };
        let mut encoded = vec![1u8];
        encoded.extend_from_slice(&public);
        let key = format!(
            "{NAME}+{}+{}",
            hex::encode(key_hash),
            BASE64.encode(encoded)
        );
        let mut log = Log {
            records: Vec::new(),
            leaves: Vec::new(),
            note: String::new(),
        };
        for (at, (zip, go_mod)) in records {
            let (module, version) = at.split_once('@').unwrap_or_default();
            let text = format!("{module} {version} {zip}\n{module} {version}/go.mod {go_mod}\n");
            log.leaves.push(leaf_hash(text.as_bytes()));
            log.records.push((at.clone(), text));
        }
        let text = format!(
            "go.sum database tree\n{}\n{}\n",
            log.leaves.len(),
            BASE64.encode(tree_hash(&log.leaves))
        );
        let signer = match forged {
            true => ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed ^ 0xff; 32])
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            false => pair,
        };
        let mut signature = key_hash.to_vec();
        signature.extend_from_slice(signer.sign(text.as_bytes()).as_ref());
        log.note = format!("{text}\n\u{2014} {NAME} {}\n", BASE64.encode(signature));
        let log = Arc::new(log);
        let listener = rt().block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let task = rt().spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(serve(&log, &req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(SumDb { key, addr, task })
    }

    /// `[go] sumdb` for this database.
    pub fn setting(&self) -> String {
        format!("{} http://{}", self.key, self.addr)
    }
}

impl Drop for SumDb {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn serve(log: &Log, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let found = |body: String| Response::new(Full::new(Bytes::from(body)));
    if path == "/latest" {
        return found(log.note.clone());
    }
    if let Some(at) = path.strip_prefix("/lookup/")
        && let Some(id) = log.records.iter().position(|(r, _)| r == at)
    {
        return found(format!("{id}\n{}\n{}", log.records[id].1, log.note));
    }
    // Level-0 tiles (enough for fewer than 256 records), whole or partial.
    if let Some(tile) = path.strip_prefix("/tile/8/0/000") {
        let width = match tile.strip_prefix(".p/") {
            Some(w) => w.parse().unwrap_or(usize::MAX),
            None if tile.is_empty() => 256,
            None => usize::MAX,
        };
        if width <= log.leaves.len() {
            return found_bytes(log.leaves[..width].concat());
        }
    }
    let mut missing = Response::new(Full::new(Bytes::from_static(b"not found")));
    *missing.status_mut() = StatusCode::NOT_FOUND;
    missing
}

fn found_bytes(bytes: Vec<u8>) -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from(bytes)))
}
