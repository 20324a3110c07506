//! The three calls the official client offers only over gRPC (which
//! emulators do not serve), on the JSON API with the client's own
//! credentials: list objects, delete one, and set an object's metadata.

use std::time::UNIX_EPOCH;

use google_cloud_auth::credentials::{CacheableResource, Credentials};
use serde::Deserialize;

use super::from_unix_ms;
use crate::storage::{Listed, Stat, StorageError};

pub(super) struct JsonApi {
    http: reqwest::Client,
    /// `<endpoint>/storage/v1/b/<bucket>/o`
    objects: String,
    credentials: Credentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Page {
    #[serde(default)]
    items: Vec<Item>,
    next_page_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    name: String,
    #[serde(default)]
    size: String,
    time_created: Option<String>,
    updated: Option<String>,
    #[serde(default)]
    metadata: std::collections::HashMap<String, String>,
}

impl Item {
    /// The latest of its creation, its last update and our own use mark.
    fn stat(&self) -> Stat {
        let time = |t: &Option<String>| {
            t.as_deref()
                .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
        };
        let used = self
            .metadata
            .get("used")
            .and_then(|ms| ms.parse().ok())
            .map(from_unix_ms);
        let latest = [time(&self.time_created), time(&self.updated), used]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(UNIX_EPOCH);
        Stat {
            size: self.size.parse().unwrap_or(0),
            used: latest,
        }
    }
}

/// An object name as one path segment: everything but unreserved bytes
/// escaped, `/` included.
fn segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl JsonApi {
    pub fn new(
        endpoint: &str,
        bucket: &str,
        credentials: Credentials,
    ) -> Result<Self, StorageError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("kontain/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StorageError::Remote {
                operation: "create the JSON API client".into(),
                message: e.to_string(),
            })?;
        Ok(JsonApi {
            http,
            objects: format!(
                "{}/storage/v1/b/{}/o",
                endpoint.trim_end_matches('/'),
                segment(bucket)
            ),
            credentials,
        })
    }

    /// Sends `request` with the credentials' headers; the response if its
    /// status is a success (or one of `ok`).
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        operation: &str,
        ok: &[u16],
    ) -> Result<reqwest::Response, StorageError> {
        let failed = |message: String| StorageError::Remote {
            operation: operation.to_owned(),
            message,
        };
        let headers = match self.credentials.headers(http::Extensions::new()).await {
            Ok(CacheableResource::New { data, .. }) => data,
            Ok(CacheableResource::NotModified) => http::HeaderMap::new(),
            Err(e) => return Err(failed(e.to_string())),
        };
        let response = request
            .headers(headers)
            .send()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        if status.is_success() || ok.contains(&status.as_u16()) {
            Ok(response)
        } else {
            let body = response.text().await.unwrap_or_default();
            Err(failed(format!(
                "{status}: {}",
                body.chars().take(300).collect::<String>()
            )))
        }
    }

    /// Every object whose name starts with `prefix`, page by page.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StorageError> {
        let operation = format!("list {prefix}");
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = url::Url::parse(&self.objects).map_err(|e| StorageError::Remote {
                operation: operation.clone(),
                message: e.to_string(),
            })?;
            {
                let mut query = url.query_pairs_mut();
                query.append_pair("prefix", prefix).append_pair(
                    "fields",
                    "items(name,size,timeCreated,updated,metadata),nextPageToken",
                );
                if let Some(token) = &token {
                    query.append_pair("pageToken", token);
                }
            }
            let response = self.send(self.http.get(url), &operation, &[]).await?;
            let body = response.bytes().await.map_err(|e| StorageError::Remote {
                operation: operation.clone(),
                message: e.to_string(),
            })?;
            let page: Page = serde_json::from_slice(&body).map_err(|e| StorageError::Remote {
                operation: operation.clone(),
                message: e.to_string(),
            })?;
            out.extend(page.items.iter().map(|item| Listed {
                key: item.name.clone(),
                stat: item.stat(),
            }));
            match page.next_page_token {
                Some(next) if !next.is_empty() => token = Some(next),
                _ => return Ok(out),
            }
        }
    }

    /// Deletes `object`; one that is already gone is not an error.
    pub async fn delete(&self, object: &str) -> Result<(), StorageError> {
        let url = format!("{}/{}", self.objects, segment(object));
        self.send(self.http.delete(url), &format!("delete {object}"), &[404])
            .await?;
        Ok(())
    }

    /// Sets custom metadata keys of `object` (others are kept).
    pub async fn set_metadata(
        &self,
        object: &str,
        pairs: &[(&str, String)],
    ) -> Result<(), StorageError> {
        let url = format!("{}/{}", self.objects, segment(object));
        let metadata: serde_json::Map<String, serde_json::Value> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(v.as_str())))
            .collect();
        let body = serde_json::json!({ "metadata": metadata });
        self.send(
            self.http
                .patch(url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.to_string()),
            &format!("mark {object} used"),
            &[],
        )
        .await?;
        Ok(())
    }
}
