//! The Google Cloud Storage backend: one bucket (under a prefix) shared by
//! every replica of kontain.
//!
//! Objects: `blobs/sha256/<hex>` (the bytes), `manifests/sha256/<hex>` (the
//! bytes, media type in metadata), `values/<sha256 of key>` (tags, plugin
//! caches), `leases/<sha256 of key>` (who is doing a piece of work).
//!
//! Blobs and manifests are created with `ifGenerationMatch=0`: the first
//! replica to finish publishes, a racing one gets `412` and keeps what is
//! there (same digest, same bytes). An upload becomes visible only when it
//! completes, and the bytes were hashed locally before it began, so no
//! reader can see a partial or unverified object.
//!
//! Leases make replicas that are asked for the same work at once do it
//! once: created with `ifGenerationMatch=0`, renewed by the holder every
//! third of their TTL (compare-and-swap on the generation), released by
//! writing them expired. A replica that dies stops renewing; once the lease
//! is past its expiry another replica takes it with the same compare-and-
//! swap. Expiry times come from the holder's clock, so replica clocks must
//! agree to well within the TTL (NTP does).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use google_cloud_auth::signer::Signer;
use google_cloud_storage::builder::storage::SignedUrlBuilder;
use google_cloud_storage::client::Storage as Client;
use google_cloud_storage::model_ext::ReadRange;
use google_cloud_storage::read_object::ReadObjectResponse;
use serde::{Deserialize, Serialize};

use super::{
    BlobContent, BlobInfo, BlobWriter, ByteRange, Lease, Spool, Storage, StorageError,
    StoredManifest,
};
use crate::config::{GcsConfig, RedirectMode};
use crate::oci::{Digest, MAX_MANIFEST_BYTES, MediaType};

/// Values are small (a digest, a plugin's cache entry).
const MAX_VALUE_BYTES: u64 = 1 << 20;

pub struct GcsStorage {
    client: Client,
    /// `projects/_/buckets/<name>`, as the client names buckets.
    bucket: String,
    bucket_name: String,
    prefix: String,
    redirect: Redirect,
    spool: PathBuf,
    lease_ttl: Duration,
    /// Names this process in the leases it holds.
    holder: String,
    leases_taken: AtomicU64,
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

/// Signed URLs remembered at most; past this the memory starts over.
const MAX_SIGNED_URLS: usize = 10_000;

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

/// The outcome of a create-only write: `412` means the object exists, and
/// content-addressed objects of one name are equal, so that is success too.
fn created(
    result: google_cloud_storage::Result<google_cloud_storage::model::Object>,
    object: &str,
) -> Result<(), StorageError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if status(&e) == Some(412) => Ok(()),
        Err(e) => Err(remote(format!("write {object}"))(e)),
    }
}

fn read_key(path: &Path) -> Result<serde_json::Value, StorageError> {
    let text = std::fs::read_to_string(path).map_err(|source| StorageError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| StorageError::Remote {
        operation: format!("read the service-account key {}", path.display()),
        message: e.to_string(),
    })
}

impl GcsStorage {
    /// Connects to the bucket `config` names; uploads are spooled under
    /// `local`. Nothing is sent until the first request.
    pub async fn open(config: &GcsConfig, local: &Path) -> Result<Self, StorageError> {
        // The auth crate signs with whatever rustls provider is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let auth_failed = |e: google_cloud_auth::build_errors::Error| StorageError::Remote {
            operation: "set up credentials".into(),
            message: e.to_string(),
        };
        let key = config.credentials.as_deref().map(read_key).transpose()?;
        let credentials = match (&key, config.anonymous) {
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
            .with_credentials(credentials)
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
                    endpoint,
                    ttl: config.signed_url_ttl,
                    recent: Mutex::default(),
                }
            }
        };
        let spool = local.join("spool");
        std::fs::create_dir_all(&spool).map_err(|source| StorageError::Io {
            path: spool.clone(),
            source,
        })?;
        super::remove_abandoned_temporaries(&spool);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Ok(GcsStorage {
            client,
            bucket: format!("projects/_/buckets/{}", config.bucket),
            bucket_name: config.bucket.clone(),
            prefix: config.prefix.clone(),
            redirect,
            spool,
            lease_ttl: config.lease_ttl,
            holder: format!(
                "{}/{}/{:08x}",
                host.trim(),
                std::process::id(),
                rand::random::<u32>()
            ),
            leases_taken: AtomicU64::new(0),
        })
    }

    fn blob_object(&self, digest: &Digest) -> String {
        format!(
            "{}blobs/{}/{}",
            self.prefix,
            digest.algorithm_name(),
            digest.hex()
        )
    }

    fn manifest_object(&self, digest: &Digest) -> String {
        format!(
            "{}manifests/{}/{}",
            self.prefix,
            digest.algorithm_name(),
            digest.hex()
        )
    }

    fn hashed_object(&self, kind: &str, key: &str) -> String {
        // Keys are arbitrary text; hashing makes them safe object names.
        format!(
            "{}{kind}/{}",
            self.prefix,
            Digest::sha256(key.as_bytes()).hex()
        )
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

    /// A small object's bytes (refused past `cap`) and its metadata.
    async fn read_small(
        &self,
        object: &str,
        cap: u64,
    ) -> Result<Option<(Bytes, ObjectInfo)>, StorageError> {
        let Some(mut response) = self.open_object(object, ReadRange::all()).await? else {
            return Ok(None);
        };
        let info = ObjectInfo::of(&response);
        let mut bytes = BytesMut::new();
        while let Some(chunk) = response.next().await {
            let chunk = chunk.map_err(remote(format!("read {object}")))?;
            bytes.extend_from_slice(&chunk);
            if bytes.len() as u64 > cap {
                return Err(StorageError::TooLarge { limit: cap });
            }
        }
        Ok(Some((bytes.freeze(), info)))
    }

    /// Creates `object` unless it exists (`412`: someone else created it
    /// first, and content-addressed objects are equal).
    async fn create(
        &self,
        object: &str,
        bytes: Bytes,
        metadata: &[(&str, String)],
    ) -> Result<(), StorageError> {
        let result = self
            .client
            .write_object(&self.bucket, object, bytes)
            .set_if_generation_match(0)
            .set_metadata(metadata.iter().map(|(k, v)| (*k, v.as_str())))
            .send_buffered()
            .await;
        created(result, object)
    }

    fn unix_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// What kontain reads back from an object's metadata.
struct ObjectInfo {
    size: u64,
    media_type: Option<String>,
}

impl ObjectInfo {
    fn of(response: &ReadObjectResponse) -> ObjectInfo {
        let object = response.object();
        ObjectInfo {
            // Our own metadata first: not every server reports the size of
            // a ranged read as the object's.
            size: object
                .metadata
                .get("size")
                .and_then(|s| s.parse().ok())
                .unwrap_or(object.size.max(0) as u64),
            media_type: object.metadata.get("media-type").cloned(),
        }
    }
}

/// Spools a blob locally, then uploads it whole on commit.
struct GcsBlobWriter {
    spool: Spool,
    client: Client,
    bucket: String,
    object_prefix: String,
    handle: tokio::runtime::Handle,
}

impl std::io::Write for GcsBlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.spool.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.spool.flush()
    }
}

impl BlobWriter for GcsBlobWriter {
    fn written(&self) -> u64 {
        self.spool.written()
    }

    fn commit(self: Box<Self>, expected: Option<&Digest>) -> Result<BlobInfo, StorageError> {
        let GcsBlobWriter {
            spool,
            client,
            bucket,
            object_prefix,
            handle,
        } = *self;
        let (info, tmp) = spool.finish(expected)?;
        let object = format!("{object_prefix}{}", info.digest.hex());
        let file = tmp.reopen().map_err(|source| StorageError::Io {
            path: tmp.path().to_owned(),
            source,
        })?;
        let metadata = [
            ("digest", info.digest.to_string()),
            ("size", info.size.to_string()),
        ];
        let upload = async {
            let result = client
                .write_object(&bucket, &object, tokio::fs::File::from_std(file))
                .set_if_generation_match(0)
                .set_content_type("application/octet-stream")
                .set_metadata(metadata.iter().map(|(k, v)| (*k, v.as_str())))
                .send_buffered()
                .await;
            created(result, &object)
        };
        // Writers run on blocking threads; a thread of our own makes waiting
        // for the async upload safe from any caller.
        std::thread::scope(|s| {
            s.spawn(|| handle.block_on(upload))
                .join()
                .unwrap_or_else(|_| {
                    Err(StorageError::Remote {
                        operation: format!("upload {object}"),
                        message: "the upload thread panicked".into(),
                    })
                })
        })?;
        Ok(info)
    }
}

#[async_trait::async_trait]
impl Storage for GcsStorage {
    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        let object = self.blob_object(digest);
        // One byte: the metadata without the body.
        match self
            .client
            .read_object(&self.bucket, &object)
            .set_read_range(ReadRange::segment(0, 1))
            .send()
            .await
        {
            Ok(r) => Ok(Some(ObjectInfo::of(&r).size)),
            Err(e) if status(&e) == Some(404) => Ok(None),
            // An empty object has no first byte.
            Err(e) if status(&e) == Some(416) => Ok(Some(0)),
            Err(e) => Err(remote(format!("read {object}"))(e)),
        }
    }

    async fn blob_location(&self, digest: &Digest) -> Result<Option<String>, StorageError> {
        let object = self.blob_object(digest);
        match &self.redirect {
            Redirect::None => Ok(None),
            Redirect::Public(base) => {
                let mut url = base.clone();
                url.path_segments_mut()
                    .map_err(|()| StorageError::Remote {
                        operation: "build a public URL".into(),
                        message: format!("{base} cannot be a base URL"),
                    })?
                    .pop_if_empty()
                    .push(&self.bucket_name)
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

    async fn read_blob(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobContent>, StorageError> {
        let object = self.blob_object(digest);
        let read_range = match range {
            Some(r) => ReadRange::segment(r.first, r.len()),
            None => ReadRange::all(),
        };
        let Some(response) = self.open_object(&object, read_range).await? else {
            return Ok(None);
        };
        let len = match range {
            Some(r) => r.len(),
            None => ObjectInfo::of(&response).size,
        };
        let body = futures_util::stream::unfold(response, |mut response| async move {
            let chunk = response.next().await?;
            Some((chunk.map_err(std::io::Error::other), response))
        })
        .boxed();
        Ok(Some(BlobContent { len, body }))
    }

    fn blob_writer(&self, limit: u64) -> Result<Box<dyn BlobWriter>, StorageError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|e| StorageError::Io {
            path: self.spool.clone(),
            source: std::io::Error::other(e),
        })?;
        Ok(Box::new(GcsBlobWriter {
            spool: Spool::new(&self.spool, limit)?,
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            object_prefix: format!("{}blobs/sha256/", self.prefix),
            handle,
        }))
    }

    async fn put_manifest(
        &self,
        media_type: &MediaType,
        bytes: Bytes,
    ) -> Result<StoredManifest, StorageError> {
        let digest = super::manifest_digest(&bytes)?;
        let metadata = [
            ("media-type", media_type.to_string()),
            ("digest", digest.to_string()),
            ("size", bytes.len().to_string()),
        ];
        self.create(&self.manifest_object(&digest), bytes.clone(), &metadata)
            .await?;
        Ok(StoredManifest {
            digest,
            media_type: media_type.clone(),
            bytes,
        })
    }

    async fn manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, StorageError> {
        let object = self.manifest_object(digest);
        let Some((bytes, info)) = self.read_small(&object, MAX_MANIFEST_BYTES).await? else {
            return Ok(None);
        };
        let corrupt = || StorageError::CorruptMetadata {
            digest: digest.clone(),
        };
        // The bucket is trusted less than the digest it is asked for.
        if Digest::sha256(&bytes) != *digest {
            return Err(corrupt());
        }
        let media_type = info
            .media_type
            .and_then(|m| m.parse().ok())
            .ok_or_else(corrupt)?;
        Ok(Some(StoredManifest {
            digest: digest.clone(),
            media_type,
            bytes,
        }))
    }

    async fn put_value(&self, key: &str, value: &str) -> Result<(), StorageError> {
        let object = self.hashed_object("values", key);
        self.client
            .write_object(&self.bucket, &object, value.to_owned())
            .send_buffered()
            .await
            .map_err(remote(format!("write {object}")))?;
        Ok(())
    }

    async fn value(&self, key: &str) -> Result<Option<String>, StorageError> {
        let object = self.hashed_object("values", key);
        Ok(self
            .read_small(&object, MAX_VALUE_BYTES)
            .await?
            .map(|(bytes, _)| String::from_utf8_lossy(&bytes).into_owned()))
    }

    async fn lease(&self, key: &str) -> Result<Box<dyn Lease>, StorageError> {
        let n = self.leases_taken.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(LeaseState {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            object: self.hashed_object("leases", key),
            key: key.to_owned(),
            process: self.holder.clone(),
            token: format!("{}/{n}", self.holder),
            ttl: self.lease_ttl,
            generation: Mutex::new(0),
        });
        // In a task of its own: if the request is dropped once the lease
        // object is written, the task still finishes, and dropping the
        // lease it made releases it.
        let acquiring = tokio::spawn(async move {
            state.acquire().await?;
            let heartbeat = tokio::spawn(state.clone().renew());
            Ok::<_, StorageError>(GcsLease { state, heartbeat })
        });
        let lease = acquiring.await.map_err(|e| StorageError::Remote {
            operation: "take a lease".into(),
            message: e.to_string(),
        })??;
        Ok(Box::new(lease))
    }
}

/// The content of a lease object.
#[derive(Serialize, Deserialize)]
struct LeaseRecord {
    holder: String,
    key: String,
    expires_unix_ms: u64,
}

struct LeaseState {
    client: Client,
    bucket: String,
    object: String,
    key: String,
    /// This process, as it names itself in lease records.
    process: String,
    /// This acquisition, unique among all replicas.
    token: String,
    ttl: Duration,
    /// The lease object's generation as last written by us.
    generation: Mutex<i64>,
}

impl LeaseState {
    fn record(&self, expires_unix_ms: u64) -> String {
        serde_json::to_string(&LeaseRecord {
            holder: self.token.clone(),
            key: self.key.clone(),
            expires_unix_ms,
        })
        .unwrap_or_default()
    }

    fn generation(&self) -> i64 {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_generation(&self, generation: i64) {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner()) = generation;
    }

    /// Writes our record expiring at `expires` if the object is still at
    /// `generation` (`0`: does not exist). `Ok(false)`: someone else wrote.
    async fn swap(&self, generation: i64, expires: u64) -> Result<bool, StorageError> {
        let result = self
            .client
            .write_object(&self.bucket, &self.object, self.record(expires))
            .set_if_generation_match(generation)
            .send_buffered()
            .await;
        match result {
            Ok(object) => {
                self.set_generation(object.generation);
                Ok(true)
            }
            // The client retries lost responses; a retry of our own write
            // that landed gets 412 too. The record says whose it is.
            Err(e) if status(&e) == Some(412) => match self.current().await? {
                Some((generation, Some(r))) if r.holder == self.token => {
                    self.set_generation(generation);
                    Ok(true)
                }
                _ => Ok(false),
            },
            Err(e) => Err(remote(format!("write the lease {}", self.object))(e)),
        }
    }

    /// The lease object's generation and record, if it exists.
    async fn current(&self) -> Result<Option<(i64, Option<LeaseRecord>)>, StorageError> {
        let read = self
            .client
            .read_object(&self.bucket, &self.object)
            .send()
            .await;
        let mut response = match read {
            Ok(r) => r,
            Err(e) if status(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(remote(format!("read the lease {}", self.object))(e)),
        };
        let generation = response.object().generation;
        let mut bytes = Vec::new();
        while let Some(chunk) = response.next().await {
            let chunk = chunk.map_err(remote(format!("read the lease {}", self.object)))?;
            bytes.extend_from_slice(&chunk);
            if bytes.len() as u64 > MAX_VALUE_BYTES {
                break;
            }
        }
        Ok(Some((generation, serde_json::from_slice(&bytes).ok())))
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// Waits until the lease is ours.
    async fn acquire(&self) -> Result<(), StorageError> {
        // Check often enough that a released lease is picked up quickly,
        // rarely enough that waiting replicas cost the bucket little.
        let poll = (self.ttl / 10).clamp(Duration::from_millis(50), Duration::from_millis(500));
        loop {
            if self.swap(0, GcsStorage::unix_ms() + self.ttl_ms()).await? {
                return Ok(());
            }
            if let Some((generation, record)) = self.current().await? {
                let now = GcsStorage::unix_ms();
                // An unreadable record guards nothing. A record of this
                // process is a lease whose holder has finished (its local
                // lock, which this caller now holds, was released with it)
                // and whose release write has not landed yet.
                let ours = format!("{}/", self.process);
                let expired = record
                    .as_ref()
                    .is_none_or(|r| r.expires_unix_ms <= now || r.holder.starts_with(&ours));
                if expired && self.swap(generation, now + self.ttl_ms()).await? {
                    if let Some(r) = record.filter(|r| {
                        !r.holder.ends_with("/released") && !r.holder.starts_with(&ours)
                    }) {
                        tracing::warn!(key = %self.key, previous = %r.holder,
                            "took over a lease its holder stopped renewing");
                    }
                    return Ok(());
                }
            } else {
                continue; // deleted (by a lifecycle rule) just now: create it
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % 50);
            tokio::time::sleep(poll + jitter).await;
        }
    }

    /// Renews the lease every third of its TTL until aborted.
    async fn renew(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.ttl / 3).await;
            let expires = GcsStorage::unix_ms() + self.ttl_ms();
            match self.swap(self.generation(), expires).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(key = %self.key, "lost a lease (renewed too late); another replica may repeat this work");
                    return;
                }
                Err(e) => tracing::warn!(key = %self.key, error = %e, "could not renew a lease"),
            }
        }
    }

    /// Marks the lease expired so that a waiting replica takes it at once.
    async fn release(&self) {
        let released = serde_json::to_string(&LeaseRecord {
            holder: format!("{}/released", self.token),
            key: self.key.clone(),
            expires_unix_ms: 0,
        })
        .unwrap_or_default();
        let mut generation = self.generation();
        for _ in 0..2 {
            let result = self
                .client
                .write_object(&self.bucket, &self.object, released.clone())
                .set_if_generation_match(generation)
                .send_buffered()
                .await;
            match result {
                Ok(_) => return,
                // A renewal we aborted may have landed: if the lease is
                // still ours, release that generation.
                Err(e) if status(&e) == Some(412) => match self.current().await {
                    Ok(Some((g, Some(r)))) if r.holder == self.token => generation = g,
                    _ => return,
                },
                Err(e) => {
                    tracing::warn!(key = %self.key, error = %e, "could not release a lease; it expires by itself");
                    return;
                }
            }
        }
    }
}

struct GcsLease {
    state: Arc<LeaseState>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Lease for GcsLease {}

impl Drop for GcsLease {
    fn drop(&mut self) {
        self.heartbeat.abort();
        let state = self.state.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { state.release().await });
        }
    }
}
