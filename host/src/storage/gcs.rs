//! The Google Cloud Storage driver: one bucket (under a prefix) shared by
//! every replica of kontain. A key is an object name after the prefix.
//!
//! Objects are created with `ifGenerationMatch=0`: the first replica to
//! finish publishes, a racing one gets `412` and keeps what is there (objects
//! of one key are equal). An upload becomes visible only when it completes,
//! and the content store hashed the bytes locally before it began, so no
//! reader can see a partial or unverified object. Every object carries its
//! last use (`used`, Unix milliseconds) in its metadata.
//!
//! Reads and writes go through the official client (`google-cloud-storage`,
//! JSON API); listing, deleting and marking use (whose calls in that crate
//! are gRPC, which emulators do not serve) go to the JSON API directly with
//! the same credentials (`json`). Leases are in `lease`.

mod json;
mod lease;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use google_cloud_auth::credentials::Credentials;
use google_cloud_auth::signer::Signer;
use google_cloud_storage::builder::storage::SignedUrlBuilder;
use google_cloud_storage::client::Storage as Client;
use google_cloud_storage::model_ext::ReadRange;
use google_cloud_storage::read_object::ReadObjectResponse;

use super::config::{GcsConfig, RedirectMode};
use super::{BlobContent, ByteRange, Driver, Lease, Listed, Stat, StorageError};
use crate::oci::Digest;

/// Lease records are small JSON documents.
const MAX_LEASE_BYTES: u64 = 1 << 20;

/// Signed URLs remembered at most; past this the memory starts over.
const MAX_SIGNED_URLS: usize = 10_000;

pub struct GcsDriver {
    client: Client,
    /// `projects/_/buckets/<name>`, as the client names buckets.
    bucket: String,
    prefix: String,
    redirect: Redirect,
    json: json::JsonApi,
    leases: lease::Leases,
    spool: PathBuf,
    /// Blob writers publish from blocking threads; uploads run here.
    handle: tokio::runtime::Handle,
    /// An object written again is marked used if its mark is older than
    /// this (a tenth of the TTL); `None`: nothing expires, nothing is marked.
    mark_after: Option<Duration>,
}

enum Redirect {
    None,
    Public(url::Url),
    Signed {
        signer: Signer,
        endpoint: Option<String>,
        ttl: Duration,
        /// URLs signed recently, by object: reused for half their life, so
        /// that a hot blob costs one signature (an IAM call, with ADC) per
        /// half TTL rather than one per download.
        recent: Mutex<HashMap<String, (String, Instant)>>,
    },
}

fn remote(
    operation: impl Into<String>,
) -> impl FnOnce(google_cloud_storage::Error) -> StorageError {
    let operation = operation.into();
    move |e| StorageError::Remote {
        operation,
        message: e.to_string(),
    }
}

fn status(e: &google_cloud_storage::Error) -> Option<u16> {
    e.http_status_code()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The metadata a new object is written with: its use, now.
fn fresh() -> [(&'static str, String); 1] {
    [("used", unix_ms().to_string())]
}

fn read_key(path: &Path) -> Result<serde_json::Value, StorageError> {
    let text = std::fs::read_to_string(path).map_err(StorageError::io(path))?;
    serde_json::from_str(&text).map_err(|e| StorageError::Remote {
        operation: format!("read the service-account key {}", path.display()),
        message: e.to_string(),
    })
}

/// What a read tells of the object: our own metadata first, since not every
/// server reports the size of a ranged read as the object's.
fn stat_of(response: &ReadObjectResponse) -> Stat {
    let object = response.object();
    let number = |k: &str| object.metadata.get(k).and_then(|s| s.parse::<u64>().ok());
    Stat {
        size: number("size").unwrap_or(object.size.max(0) as u64),
        used: number("used").map_or(UNIX_EPOCH, from_unix_ms),
    }
}

impl GcsDriver {
    /// Connects to the bucket `config` names; blobs are spooled under
    /// `local`; content unused for `ttl` expires. Nothing is sent until the
    /// first request.
    pub async fn open(
        config: &GcsConfig,
        local: &Path,
        ttl: Duration,
    ) -> Result<Self, StorageError> {
        // The auth crate signs with whatever rustls provider is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let auth_failed = |e: google_cloud_auth::build_errors::Error| StorageError::Remote {
            operation: "set up credentials".into(),
            message: e.to_string(),
        };
        let key = config.credentials.as_deref().map(read_key).transpose()?;
        let credentials: Credentials = match (&key, config.anonymous) {
            (_, true) => google_cloud_auth::credentials::anonymous::Builder::new().build(),
            (Some(key), false) => {
                google_cloud_auth::credentials::service_account::Builder::new(key.clone())
                    .build()
                    .map_err(auth_failed)?
            }
            (None, false) => google_cloud_auth::credentials::Builder::default()
                .build()
                .map_err(auth_failed)?,
        };
        let endpoint = config
            .endpoint
            .as_ref()
            .map(|u| u.as_str().trim_end_matches('/').to_owned());
        let mut builder = Client::builder()
            .with_credentials(credentials.clone())
            .with_resumable_upload_threshold(
                usize::try_from(config.resumable_upload_threshold.0).unwrap_or(usize::MAX),
            );
        if let Some(endpoint) = &endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let client = builder.build().await.map_err(|e| StorageError::Remote {
            operation: "create the storage client".into(),
            message: e.to_string(),
        })?;
        let redirect = match config.redirect {
            RedirectMode::None => Redirect::None,
            RedirectMode::Public => Redirect::Public(config.public_url.clone()),
            RedirectMode::Signed => {
                let signer = match key {
                    Some(key) => google_cloud_auth::credentials::service_account::Builder::new(key)
                        .build_signer(),
                    None => google_cloud_auth::credentials::Builder::default().build_signer(),
                }
                .map_err(auth_failed)?;
                Redirect::Signed {
                    signer,
                    endpoint: endpoint.clone(),
                    ttl: config.signed_url_ttl,
                    recent: Mutex::default(),
                }
            }
        };
        let spool = local.join("spool");
        std::fs::create_dir_all(&spool).map_err(StorageError::io(&spool))?;
        // Opened by the local directory's owner only (`storage::open`).
        super::spool::remove_abandoned(&spool, std::time::Duration::ZERO);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let bucket = format!("projects/_/buckets/{}", config.bucket);
        Ok(GcsDriver {
            json: json::JsonApi::new(
                endpoint
                    .as_deref()
                    .unwrap_or("https://storage.googleapis.com"),
                &config.bucket,
                credentials,
            )?,
            leases: lease::Leases {
                client: client.clone(),
                bucket: bucket.clone(),
                ttl: config.lease_ttl,
                holder: format!(
                    "{}/{}/{:08x}",
                    host.trim(),
                    std::process::id(),
                    rand::random::<u32>()
                ),
                taken: AtomicU64::new(0),
            },
            client,
            bucket,
            prefix: config.prefix.clone(),
            redirect,
            spool,
            handle: tokio::runtime::Handle::current(),
            mark_after: (!ttl.is_zero()).then(|| ttl / 10),
        })
    }

    fn object(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Starts reading `object`; `None` if it does not exist.
    async fn open_object(
        &self,
        object: &str,
        range: ReadRange,
    ) -> Result<Option<ReadObjectResponse>, StorageError> {
        match self
            .client
            .read_object(&self.bucket, object)
            .set_read_range(range)
            .send()
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(remote(format!("read {object}"))(e)),
        }
    }

    /// Writes `object`: only if absent (`create`), or replacing it.
    async fn write(&self, object: &str, bytes: Bytes, create: bool) -> Result<(), StorageError> {
        let metadata = fresh();
        let mut request = self
            .client
            .write_object(&self.bucket, object, bytes)
            .set_metadata(metadata.iter().map(|(k, v)| (*k, v.as_str())));
        if create {
            request = request.set_if_generation_match(0);
        }
        self.created(request.send_buffered().await, object).await
    }

    /// The outcome of a create-only write: `412` means the object exists,
    /// and objects of one key are equal, so that is success too; writing it
    /// again is a use (a new image made of old parts), and its mark says so
    /// once it is stale.
    async fn created(
        &self,
        result: google_cloud_storage::Result<google_cloud_storage::model::Object>,
        object: &str,
    ) -> Result<(), StorageError> {
        match result {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(412) => {
                let Some(after) = self.mark_after else {
                    return Ok(());
                };
                let stale = self.stat_object(object).await?.is_some_and(|stat| {
                    SystemTime::now()
                        .duration_since(stat.used)
                        .unwrap_or_default()
                        > after
                });
                if stale {
                    self.json.set_metadata(object, &fresh()).await?;
                }
                Ok(())
            }
            Err(e) => Err(remote(format!("write {object}"))(e)),
        }
    }

    /// An object's size and last use, from a one-byte read (the metadata
    /// without the body).
    async fn stat_object(&self, object: &str) -> Result<Option<Stat>, StorageError> {
        match self
            .client
            .read_object(&self.bucket, object)
            .set_read_range(ReadRange::segment(0, 1))
            .send()
            .await
        {
            Ok(r) => Ok(Some(stat_of(&r))),
            Err(e) if status(&e) == Some(404) => Ok(None),
            // An empty object has no first byte.
            Err(e) if status(&e) == Some(416) => Ok(Some(Stat {
                size: 0,
                used: UNIX_EPOCH,
            })),
            Err(e) => Err(remote(format!("read {object}"))(e)),
        }
    }

    /// A signed or public URL for `object`, per the redirect mode.
    async fn url_for(&self, object: String) -> Result<Option<String>, StorageError> {
        match &self.redirect {
            Redirect::None => Ok(None),
            Redirect::Public(base) => {
                let mut url = base.clone();
                let bucket = self.bucket.trim_start_matches("projects/_/buckets/");
                url.path_segments_mut()
                    .map_err(|()| StorageError::Remote {
                        operation: "build a public URL".into(),
                        message: format!("{base} cannot be a base URL"),
                    })?
                    .pop_if_empty()
                    .push(bucket)
                    .extend(object.split('/'));
                Ok(Some(url.to_string()))
            }
            Redirect::Signed {
                signer,
                endpoint,
                ttl,
                recent,
            } => {
                let reusable = |recent: &HashMap<String, (String, Instant)>| {
                    recent
                        .get(&object)
                        .filter(|(_, at)| at.elapsed() < *ttl / 2)
                        .map(|(url, _)| url.clone())
                };
                if let Some(url) = reusable(&recent.lock().unwrap_or_else(|p| p.into_inner())) {
                    return Ok(Some(url));
                }
                let mut builder = SignedUrlBuilder::for_object(&self.bucket, &object)
                    .with_method(http::Method::GET)
                    .with_expiration(*ttl);
                if let Some(endpoint) = endpoint {
                    builder = builder.with_endpoint(endpoint.clone());
                }
                let url = builder
                    .sign_with(signer)
                    .await
                    .map_err(|e| StorageError::Remote {
                        operation: format!("sign a URL for {object}"),
                        message: e.to_string(),
                    })?;
                let mut recent = recent.lock().unwrap_or_else(|p| p.into_inner());
                if recent.len() >= MAX_SIGNED_URLS {
                    recent.clear();
                }
                recent.insert(object, (url.clone(), Instant::now()));
                Ok(Some(url))
            }
        }
    }
}

#[async_trait::async_trait]
impl Driver for GcsDriver {
    fn spool_dir(&self) -> &Path {
        &self.spool
    }

    fn publish(&self, key: &str, file: tempfile::NamedTempFile) -> Result<(), StorageError> {
        let object = self.object(key);
        let size = file
            .as_file()
            .metadata()
            .map_err(StorageError::io(file.path()))?
            .len();
        let reopened = file.reopen().map_err(StorageError::io(file.path()))?;
        let metadata = [("size", size.to_string()), ("used", unix_ms().to_string())];
        let upload = async {
            let result = self
                .client
                .write_object(&self.bucket, &object, tokio::fs::File::from_std(reopened))
                .set_if_generation_match(0)
                .set_content_type("application/octet-stream")
                .set_metadata(metadata.iter().map(|(k, v)| (*k, v.as_str())))
                .send_buffered()
                .await;
            self.created(result, &object).await
        };
        // Writers publish from blocking threads; a thread of our own makes
        // waiting for the async upload safe from any caller.
        std::thread::scope(|s| {
            s.spawn(|| self.handle.block_on(upload))
                .join()
                .unwrap_or_else(|_| {
                    Err(StorageError::Remote {
                        operation: format!("upload {object}"),
                        message: "the upload thread panicked".into(),
                    })
                })
        })
    }

    async fn create(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.write(&self.object(key), bytes, true).await
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.write(&self.object(key), bytes, false).await
    }

    async fn stat(&self, key: &str) -> Result<Option<Stat>, StorageError> {
        self.stat_object(&self.object(key)).await
    }

    async fn read(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobContent>, StorageError> {
        let object = self.object(key);
        let read_range = match range {
            Some(r) => ReadRange::segment(r.first, r.len()),
            None => ReadRange::all(),
        };
        let Some(response) = self.open_object(&object, read_range).await? else {
            return Ok(None);
        };
        let len = match range {
            Some(r) => r.len(),
            None => stat_of(&response).size,
        };
        let body = futures_util::stream::unfold(response, |mut response| async move {
            let chunk = response.next().await?;
            Some((chunk.map_err(std::io::Error::other), response))
        })
        .boxed();
        Ok(Some(BlobContent { len, body }))
    }

    async fn read_small(&self, key: &str, cap: u64) -> Result<Option<(Bytes, Stat)>, StorageError> {
        let object = self.object(key);
        let Some(mut response) = self.open_object(&object, ReadRange::all()).await? else {
            return Ok(None);
        };
        let stat = stat_of(&response);
        let mut bytes = BytesMut::new();
        while let Some(chunk) = response.next().await {
            let chunk = chunk.map_err(remote(format!("read {object}")))?;
            bytes.extend_from_slice(&chunk);
            if bytes.len() as u64 > cap {
                return Err(StorageError::TooLarge { limit: cap });
            }
        }
        Ok(Some((bytes.freeze(), stat)))
    }

    async fn touch(&self, key: &str) -> Result<(), StorageError> {
        self.json.set_metadata(&self.object(key), &fresh()).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StorageError> {
        let mut listed = self.json.list(&self.object(prefix)).await?;
        for item in &mut listed {
            item.key = item.key.split_off(self.prefix.len());
        }
        Ok(listed)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.json.delete(&self.object(key)).await
    }

    async fn lease(&self, key: &str) -> Result<Box<dyn Lease>, StorageError> {
        let object = self.object(&format!("leases/{}", Digest::sha256(key.as_bytes()).hex()));
        self.leases.take(object, key).await
    }

    fn serves_downloads(&self) -> bool {
        !matches!(self.redirect, Redirect::None)
    }

    async fn location(&self, key: &str) -> Result<Option<String>, StorageError> {
        self.url_for(self.object(key)).await
    }
}
