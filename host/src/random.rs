//! The `random` capability: layers of random bytes, made natively:
//! RNG → tar → gzip → sha256 → storage, in one pass, several layers at once.
//!
//! Random data does not compress, so the gzip stream is made of stored blocks
//! (see `image::gzip`): valid for every reader, produced at memory speed
//! instead of spending a core per layer failing to find matches.
//!
//! Its WIT host implementation is `wit`; it has no config section (a
//! generator's `limits` bound it).

pub mod wit;

use std::io::Write;
use std::sync::Arc;

use futures_util::future::try_join_all;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::image::gzip::StoredGzip;
use crate::image::layer::publish;
use crate::image::offload::Offload;
use crate::image::{Cancel, Cpu, ImageError, LayerBlob, io_error};
use crate::oci::Sha256Writer;
use crate::storage::ContentStore;

/// Bytes generated and pushed through the pipeline per step.
const CHUNK: usize = 1 << 20;
const TAR_BLOCK: u64 = 512;
/// More layers than any runtime handles well (overlayfs stacks top out near
/// 128); also bounds the work one call can queue.
const MAX_LAYERS: u32 = 1000;

/// The random layer maker plugins with the `random` grant reach.
pub struct Random {
    store: Arc<ContentStore>,
    cpu: Cpu,
}

impl Random {
    pub fn new(store: Arc<ContentStore>, cpu: Cpu) -> Self {
        Random { store, cpu }
    }

    /// `count` layers of `size` random bytes each, made in parallel.
    /// `limit` is the most bytes this request may produce.
    pub async fn layers(
        &self,
        count: u32,
        size: u64,
        limit: u64,
    ) -> Result<Vec<LayerBlob>, ImageError> {
        if count > MAX_LAYERS {
            return Err(ImageError::Invalid(format!(
                "{count} layers requested; an image may have at most {MAX_LAYERS}"
            )));
        }
        let requested = u64::from(count).saturating_mul(size);
        if requested > limit {
            return Err(ImageError::LimitExceeded { requested, limit });
        }
        // What it will make, from the client's budget, before making it.
        crate::activity::generate(requested)?;
        let jobs = (0..count).map(|n| {
            let store = self.store.clone();
            self.cpu
                .run(move |cancel| write_random_layer(&store, n, size, cancel))
        });
        try_join_all(jobs).await
    }
}

/// Fills `buf` with random bytes a word at a time: three times faster than
/// `fill_bytes`, which this RNG implements byte-chunk by byte-chunk.
fn fill_random(rng: &mut SmallRng, buf: &mut [u8]) {
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        word.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let tail = words.into_remainder();
    let last = rng.next_u64().to_le_bytes();
    tail.copy_from_slice(&last[..tail.len()]);
}

/// The most a layer of `size` bytes can grow to in tar and stored gzip
/// blocks: 5 bytes per 64 KiB block, tar headers and padding, gzip framing.
fn layer_size_bound(size: u64) -> u64 {
    size + size / 65_535 * 5 + 64 * 1024
}

/// Writes one layer: a tar holding `random_file_<n>.txt` with `size` random
/// bytes (mode 0644, owner 0:0, mtime 0), gzipped into storage.
pub fn write_random_layer(
    store: &ContentStore,
    n: u32,
    size: u64,
    cancel: &Cancel,
) -> Result<LayerBlob, ImageError> {
    // This thread makes the tar and hashes it; the blob's own hash and the
    // disk write run on another (two cores for one layer).
    let blob = Offload::new(store.blob_writer(layer_size_bound(size))?)
        .map_err(io_error("starting a layer writer"))?;
    let gzip = StoredGzip::new(blob);
    let mut tar = Sha256Writer::new(gzip);

    let mut header = tar::Header::new_ustar();
    header
        .set_path(format!("random_file_{n}.txt"))
        .map_err(io_error("tar header"))?;
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    tar.write_all(header.as_bytes())
        .map_err(io_error("writing layer"))?;

    let mut rng = SmallRng::from_os_rng();
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        cancel.check()?;
        let step = left.min(CHUNK as u64) as usize;
        fill_random(&mut rng, &mut buf[..step]);
        tar.write_all(&buf[..step])
            .map_err(io_error("writing layer"))?;
        left -= step as u64;
    }
    // Pad the file to a whole block, then the two zero blocks that end a tar.
    let trailer = ((TAR_BLOCK - size % TAR_BLOCK) % TAR_BLOCK + 2 * TAR_BLOCK) as usize;
    buf[..trailer].fill(0);
    tar.write_all(&buf[..trailer])
        .map_err(io_error("writing layer"))?;

    let (diff_id, _, gzip) = tar.finish();
    let blob = gzip
        .finish()
        .and_then(Offload::finish)
        .map_err(io_error("finishing gzip"))?;
    publish(diff_id, blob)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use flate2::read::GzDecoder;

    use super::*;
    use crate::oci::Digest;

    #[tokio::test]
    async fn random_layers_hold_one_file_of_the_requested_size() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::test_store(dir.path());
        let random = Random::new(storage.clone(), Cpu::default());
        let layers = random.layers(3, 1000, u64::MAX).await.unwrap();
        assert_eq!(layers.len(), 3);
        for (n, layer) in layers.iter().enumerate() {
            let gz = crate::storage::read_all(&storage, &layer.digest, None).await;
            assert_eq!(Digest::sha256(&gz), layer.digest);
            assert_eq!(gz.len() as u64, layer.size);
            let mut tar_bytes = Vec::new();
            GzDecoder::new(&gz[..]).read_to_end(&mut tar_bytes).unwrap();
            assert_eq!(Digest::sha256(&tar_bytes), layer.diff_id);
            let mut archive = tar::Archive::new(&tar_bytes[..]);
            let entries: Vec<_> = archive
                .entries()
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (
                        e.path().unwrap().display().to_string(),
                        e.header().size().unwrap(),
                    )
                })
                .collect();
            assert_eq!(entries, vec![(format!("random_file_{n}.txt"), 1000)]);
        }
        assert_ne!(layers[0].digest, layers[1].digest, "layers must differ");
    }

    #[tokio::test]
    async fn refuses_requests_over_the_byte_limit() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::test_store(dir.path());
        let err = Random::new(storage, Cpu::default())
            .layers(2, 100, 150)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            ImageError::LimitExceeded {
                requested: 200,
                limit: 150
            }
        ));
    }
}
