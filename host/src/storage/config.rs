//! `[storage]` and `[storage.gcs]`: which driver, where, and how long unused
//! content is kept. Changes need a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::config::Invalid;
use crate::config::units::{ByteSize, duration};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Where blobs and manifests live.
    #[serde(default)]
    pub backend: Backend,
    /// The filesystem backend keeps everything here; with `gcs`, only local
    /// working files (uploads being written, compiled plugins, Go and
    /// buildpack scratch).
    #[serde(default = "default_storage_path")]
    pub path: PathBuf,
    /// What is not used for this long is removed: manifests first, then
    /// the blobs no remaining manifest refers to. Serving a manifest
    /// counts as use. `"0s"` keeps everything.
    #[serde(default = "default_ttl", with = "duration")]
    pub ttl: Duration,
    /// How often the collector looks.
    #[serde(default = "default_collect_every", with = "duration")]
    pub collect_every: Duration,
    /// At most this much is stored: past it, least recently used images go
    /// (see `storage::quota`). Absent or 0: no quota.
    #[serde(default)]
    pub max_bytes: Option<ByteSize>,
    /// Settings of the `gcs` backend.
    pub gcs: Option<GcsConfig>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Filesystem,
    Gcs,
}

/// `[storage.gcs]`: a Google Cloud Storage bucket shared by every replica.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GcsConfig {
    pub bucket: String,
    /// Prepended to every object name (`kontain/` keeps a shared bucket tidy).
    #[serde(default)]
    pub prefix: String,
    /// The JSON API endpoint; set only for an emulator.
    pub endpoint: Option<Url>,
    /// A service-account key (JSON) to authenticate and sign URLs with.
    /// Without it: Application Default Credentials (on Cloud Run, the
    /// service's account; signing then goes through the IAM API).
    pub credentials: Option<PathBuf>,
    /// Send requests without credentials (an emulator); `credentials` is
    /// then used only to sign URLs.
    #[serde(default)]
    pub anonymous: bool,
    /// How blob downloads reach clients.
    #[serde(default)]
    pub redirect: RedirectMode,
    /// Base of public object URLs (`redirect = "public"`):
    /// `<public_url>/<bucket>/<object>`.
    #[serde(default = "default_public_url")]
    pub public_url: Url,
    /// How long a signed URL stays valid. Long enough to start a download.
    #[serde(default = "default_signed_url_ttl", with = "duration")]
    pub signed_url_ttl: Duration,
    /// A replica that stops renewing its lease on a piece of work (it died)
    /// loses it after this long, and another replica takes the work over.
    #[serde(default = "default_lease_ttl", with = "duration")]
    pub lease_ttl: Duration,
    /// Uploads larger than this are resumable (in chunks); smaller ones are
    /// one request.
    #[serde(default = "default_resumable_threshold")]
    pub resumable_upload_threshold: ByteSize,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedirectMode {
    /// `307` to a V4 signed URL: the bucket stays private.
    #[default]
    Signed,
    /// `307` to the object's public URL (a bucket readable by allUsers).
    Public,
    /// kontain streams the bytes itself.
    None,
}

fn default_public_url() -> Url {
    Url::parse("https://storage.googleapis.com").expect("a valid URL")
}

fn default_signed_url_ttl() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(30)
}

fn default_resumable_threshold() -> ByteSize {
    ByteSize(16 << 20)
}

fn default_ttl() -> Duration {
    Duration::from_secs(10 * 24 * 3600)
}

fn default_collect_every() -> Duration {
    Duration::from_secs(3600)
}

fn default_storage_path() -> PathBuf {
    PathBuf::from("kontain-data")
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Filesystem,
            path: default_storage_path(),
            ttl: default_ttl(),
            collect_every: default_collect_every(),
            max_bytes: None,
            gcs: None,
        }
    }
}

impl StorageConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        match (self.backend, &self.gcs) {
            (Backend::Gcs, None) => Err(Invalid::new(
                "storage",
                "backend \"gcs\" needs a [storage.gcs] table",
            )),
            (Backend::Filesystem, Some(_)) => Err(Invalid::new(
                "storage.gcs",
                "set backend = \"gcs\" to use the bucket, or remove the table",
            )),
            (Backend::Gcs, Some(gcs)) => gcs.validate(),
            (Backend::Filesystem, None) => Ok(()),
        }
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        crate::config::resolve(&mut self.path, base);
        if let Some(key) = self.gcs.as_mut().and_then(|g| g.credentials.as_mut()) {
            crate::config::resolve(key, base);
        }
    }
}

impl GcsConfig {
    fn validate(&self) -> Result<(), Invalid> {
        let valid_bucket = (3..=222).contains(&self.bucket.len())
            && self
                .bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !valid_bucket {
            return Err(Invalid::new("storage.gcs.bucket", "not a bucket name"));
        }
        // Renewals come every third of the TTL, and GCS takes about one
        // write per second to an object.
        if self.lease_ttl < Duration::from_secs(5) {
            return Err(Invalid::new("storage.gcs.lease_ttl", "at least 5s"));
        }
        // Never send Google credentials (or ask Google's IAM API to sign)
        // for a bucket served somewhere else.
        if self.endpoint.is_some() && !self.anonymous && self.credentials.is_none() {
            return Err(Invalid::new(
                "storage.gcs.endpoint",
                "with an endpoint, give `credentials` (a key) or set `anonymous`",
            ));
        }
        if self.redirect == RedirectMode::Signed && self.anonymous && self.credentials.is_none() {
            return Err(Invalid::new(
                "storage.gcs.redirect",
                "signed URLs need `credentials` (a service-account key) when `anonymous` is set",
            ));
        }
        Ok(())
    }
}
