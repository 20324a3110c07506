//! One storage conformance suite, run against both drivers (a directory, and
//! a bucket on the GCS emulator) through the content store every capability
//! uses: create-if-absent races, ranged reads, verification of what is
//! written and read back, leases between two stores on one place, and
//! expiry that keeps a blob an old and a new manifest share while the new
//! one lives.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use kontain::config::{Config, Origin};
use kontain::oci::{Digest, MediaType};
use kontain::storage::{BlobContent, ByteRange, ContentStore, StorageError};
use libtest_mimic::Trial;

use crate::support::gcs::fake_gcs;
use crate::support::{rt, trial_with};

#[derive(Clone, Copy, Debug)]
enum Backend {
    Filesystem,
    Gcs,
}

type Case = fn(&Place) -> anyhow::Result<()>;

pub fn trials() -> Vec<Trial> {
    let cases: [(&str, Case); 5] = [
        ("racing_writers_create_each_object_once", races),
        ("ranged_reads_return_exactly_the_range", ranges),
        (
            "nothing_unverified_is_ever_published_or_served",
            verification,
        ),
        ("a_lease_is_held_by_one_store_at_a_time", leases),
        (
            "expiry_keeps_a_blob_an_old_and_a_new_manifest_share_while_the_new_one_lives",
            expiry,
        ),
    ];
    let mut trials = Vec::new();
    for backend in [Backend::Filesystem, Backend::Gcs] {
        for (name, case) in cases {
            let label = format!("{backend:?}").to_lowercase();
            trials.push(trial_with(
                &format!("storage::{label}::{name}"),
                move || case(&Place::new(backend, name)?),
            ));
        }
    }
    trials
}

/// Where a store keeps its objects: a fresh directory, or a fresh bucket.
struct Place {
    backend: Backend,
    dir: tempfile::TempDir,
    bucket: String,
    /// The filesystem backend's one store: a directory belongs to one
    /// server (a second one is refused), so "another replica" is this one.
    owner: std::sync::Mutex<Option<Arc<ContentStore>>>,
    replicas: std::sync::atomic::AtomicUsize,
}

impl Place {
    fn new(backend: Backend, case: &str) -> anyhow::Result<Place> {
        let place = Place {
            backend,
            dir: tempfile::tempdir()?,
            bucket: format!("conformance-{}", case.replace('_', "-"))
                .chars()
                .take(60)
                .collect(),
            owner: Default::default(),
            replicas: Default::default(),
        };
        if let Backend::Gcs = backend {
            fake_gcs()?.create_bucket(&place.bucket)?;
        }
        Ok(place)
    }

    /// A store on this place whose unused content expires after `ttl`: a
    /// replica of its own (with its own local directory), as another process
    /// would open it; on the filesystem, the directory's one store.
    fn open(&self, ttl: &str) -> anyhow::Result<Arc<ContentStore>> {
        let text = match self.backend {
            Backend::Filesystem => {
                let mut owner = self.owner.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(store) = &*owner {
                    return Ok(store.clone());
                }
                let text = format!(
                    "[storage]\nbackend = \"filesystem\"\npath = \"data\"\nttl = \"{ttl}\"\n"
                );
                let store = Arc::new(self.store(&text)?);
                *owner = Some(store.clone());
                return Ok(store);
            }
            Backend::Gcs => {
                let n = self
                    .replicas
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                fake_gcs()?
                    .storage_config(&self.bucket, "p/", "lease_ttl = \"5s\"")
                    .replacen("[storage]\n", &format!("[storage]\nttl = \"{ttl}\"\n"), 1)
                    .replacen("path = \"local\"", &format!("path = \"local-{n}\""), 1)
            }
        };
        Ok(Arc::new(self.store(&text)?))
    }

    fn store(&self, text: &str) -> anyhow::Result<ContentStore> {
        let config = Config::parse(text, Origin::File(self.dir.path().join("kontain.toml")))?;
        Ok(rt().block_on(kontain::storage::open(&config.storage))?)
    }

    /// Replaces the object `key` behind the store's back.
    fn tamper(&self, key: &str, bytes: &[u8]) -> anyhow::Result<()> {
        match self.backend {
            Backend::Filesystem => Ok(std::fs::write(
                self.dir.path().join("data").join(key),
                bytes,
            )?),
            Backend::Gcs => fake_gcs()?.put_object(&self.bucket, &format!("p/{key}"), bytes),
        }
    }
}

fn put_blob(store: &Arc<ContentStore>, bytes: &[u8]) -> anyhow::Result<Digest> {
    Ok(rt()
        .block_on(store.put_blob(Bytes::copy_from_slice(bytes)))?
        .digest)
}

fn read(
    store: &ContentStore,
    digest: &Digest,
    range: Option<ByteRange>,
) -> anyhow::Result<Vec<u8>> {
    rt().block_on(async {
        let Some(BlobContent { len, body }) = store.read_blob(digest, range).await? else {
            anyhow::bail!("{digest} is not stored");
        };
        let chunks: Vec<_> = body.collect().await;
        let mut bytes = Vec::new();
        for chunk in chunks {
            bytes.extend_from_slice(&chunk?);
        }
        anyhow::ensure!(
            bytes.len() as u64 == len,
            "{len} bytes announced, {} sent",
            bytes.len()
        );
        Ok(bytes)
    })
}

/// An image manifest over `config` and `layers`.
fn manifest(config: &Digest, layers: &[&Digest]) -> Bytes {
    let layers: Vec<_> = layers
        .iter()
        .map(|d| serde_json::json!({"mediaType": MediaType::OCI_LAYER_GZIP, "digest": d.to_string(), "size": 1}))
        .collect();
    let doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MediaType::OCI_MANIFEST,
        "config": {"mediaType": MediaType::OCI_CONFIG, "digest": config.to_string(), "size": 1},
        "layers": layers,
    });
    Bytes::from(doc.to_string())
}

fn races(place: &Place) -> anyhow::Result<()> {
    let stores = (0..2)
        .map(|_| place.open("0s"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let blob: Bytes = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let oci = MediaType::OCI_MANIFEST.parse::<MediaType>()?;
    let doc = manifest(&Digest::sha256(b"c"), &[&Digest::sha256(&blob)]);
    let (blobs, manifests) = rt().block_on(async {
        let blobs = (0..8).map(|i| stores[i % 2].put_blob(blob.clone()));
        let manifests = (0..8).map(|i| stores[i % 2].put_manifest(&oci, doc.clone()));
        tokio::join!(
            futures_util::future::join_all(blobs),
            futures_util::future::join_all(manifests)
        )
    });
    for result in blobs {
        assert_eq!(result?.digest, Digest::sha256(&blob));
    }
    for result in manifests {
        assert_eq!(result?.digest, Digest::sha256(&doc));
    }
    for store in &stores {
        assert_eq!(read(store, &Digest::sha256(&blob), None)?, blob);
        let got = rt().block_on(store.manifest(&Digest::sha256(&doc)))?;
        assert_eq!(got.map(|m| m.bytes), Some(doc.clone()));
    }
    Ok(())
}

fn ranges(place: &Place) -> anyhow::Result<()> {
    let store = place.open("0s")?;
    let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
    let digest = put_blob(&store, &bytes)?;
    assert_eq!(rt().block_on(store.blob_size(&digest))?, Some(1000));
    assert_eq!(read(&store, &digest, None)?, bytes);
    for (first, last) in [(0, 0), (10, 19), (990, 999), (0, 999)] {
        let range = ByteRange { first, last };
        let got = read(&store, &digest, Some(range))?;
        assert_eq!(got, bytes[first as usize..=last as usize], "{first}-{last}");
    }
    Ok(())
}

fn verification(place: &Place) -> anyhow::Result<()> {
    use std::io::Write;
    let store = place.open("0s")?;
    // A writer whose bytes are not what was expected publishes nothing.
    let expected = Digest::sha256(b"original");
    let mut writer = store.blob_writer(100)?;
    writer.write_all(b"corrupt")?;
    let Err(err) = writer.commit(Some(&expected)) else {
        anyhow::bail!("a blob with the wrong digest was published");
    };
    assert!(matches!(err, StorageError::DigestMismatch { .. }), "{err}");
    for digest in [&expected, &Digest::sha256(b"corrupt")] {
        assert_eq!(rt().block_on(store.blob_size(digest))?, None);
    }
    // Neither does one dropped half-way, or one past its limit.
    let mut writer = store.blob_writer(100)?;
    writer.write_all(b"partial")?;
    drop(writer);
    assert_eq!(
        rt().block_on(store.blob_size(&Digest::sha256(b"partial")))?,
        None
    );
    let mut writer = store.blob_writer(4)?;
    assert!(writer.write_all(b"12345").is_err());
    // A manifest changed behind the store's back is never served as its
    // digest's content.
    let oci = MediaType::OCI_MANIFEST.parse::<MediaType>()?;
    let doc = manifest(&Digest::sha256(b"c"), &[]);
    let stored = rt().block_on(store.put_manifest(&oci, doc))?;
    let key = format!("manifests/sha256/{}", stored.digest.hex());
    place.tamper(
        &key,
        format!("{}\n{{\"tampered\":1}}", MediaType::OCI_MANIFEST).as_bytes(),
    )?;
    let fresh = place.open("0s")?;
    assert!(rt().block_on(fresh.manifest(&stored.digest)).is_err());
    Ok(())
}

fn leases(place: &Place) -> anyhow::Result<()> {
    let (a, b) = (place.open("0s")?, place.open("0s")?);
    rt().block_on(async {
        let held = a.lock("work".into()).await?;
        let waiting = tokio::time::timeout(Duration::from_millis(500), b.lock("work".into())).await;
        assert!(waiting.is_err(), "a second store took a held lease");
        let other = tokio::time::timeout(Duration::from_secs(10), b.lock("other".into())).await;
        assert!(other.is_ok(), "another key's lease was not free");
        drop(other);
        drop(held);
        let taken = tokio::time::timeout(Duration::from_secs(10), b.lock("work".into())).await;
        assert!(taken.is_ok(), "a released lease was not handed on");
        anyhow::Ok(())
    })
}

fn expiry(place: &Place) -> anyhow::Result<()> {
    let ttl = Duration::from_secs(2);
    let store = place.open("2s")?;
    let collect = || rt().block_on(store.collect(ttl, Duration::ZERO));
    let oci = MediaType::OCI_MANIFEST.parse::<MediaType>()?;
    let [config, shared, only_a, only_b] =
        [&b"config"[..], b"shared", b"only a", b"only b"].map(|b| put_blob(&store, b));
    let (config, shared, only_a, only_b) = (config?, shared?, only_a?, only_b?);
    let a = rt().block_on(store.put_manifest(&oci, manifest(&config, &[&shared, &only_a])))?;
    std::thread::sleep(ttl + Duration::from_millis(500));
    // Image B, made later, shares a layer with A.
    let b = rt().block_on(store.put_manifest(&oci, manifest(&config, &[&shared, &only_b])))?;
    collect()?;
    let size = |d: &Digest| rt().block_on(store.blob_size(d));
    assert!(
        rt().block_on(store.manifest(&a.digest))?.is_none(),
        "A outlived its TTL"
    );
    assert_eq!(size(&only_a)?, None, "A's own old layer stayed");
    assert!(
        rt().block_on(store.manifest(&b.digest))?.is_some(),
        "B went while it lives"
    );
    for blob in [&config, &shared, &only_b] {
        assert!(size(blob)?.is_some(), "B lost {blob}");
        read(&store, blob, None)?;
    }
    // B unused for the TTL too: nothing of either image is left.
    std::thread::sleep(ttl + Duration::from_millis(500));
    collect()?;
    assert!(
        rt().block_on(store.manifest(&b.digest))?.is_none(),
        "B outlived its TTL"
    );
    for blob in [&config, &shared, &only_a, &only_b] {
        assert_eq!(size(blob)?, None, "{blob} outlived every manifest using it");
    }
    Ok(())
}
