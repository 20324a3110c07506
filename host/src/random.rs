//! The `random` capability: layers of random bytes, made natively:
//! RNG → tar → gzip → sha256 → storage, in one pass, several layers at once.
//!
//! Random data does not compress, so the gzip stream is made of stored blocks
//! (see `image::gzip`): valid for every reader, produced at memory speed
//! instead of spending a core per layer failing to find matches.
//!
//! A layer is a pure function of a seed, so it is stored as that seed (a
//! recipe of a few hundred bytes) and made again on every read, whole or
//! just up to the end of a range: a `HEAD random:99x99999999` costs no
//! storage. Not on a backend clients download from themselves (GCS with
//! redirects): there the bytes are stored, so that replicas never carry
//! them.
//!
//! Its WIT host implementation is `wit`; it has no config section (a
//! generator's `limits` bound it).

pub mod wit;

use std::io::{ErrorKind, Write};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::try_join_all;
use futures_util::stream::BoxStream;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::image::gzip::StoredGzip;
use crate::image::layer::publish;
use crate::image::offload::Offload;
use crate::image::{Cancel, Cpu, ImageError, LayerBlob, io_error};
use crate::oci::Sha256Writer;
use crate::storage::{ByteRange, ContentStore, Remake};

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
    /// The maker of random layers storing to `store`, where their recipes
    /// can be read back from then on.
    pub fn new(store: Arc<ContentStore>, cpu: Cpu) -> Self {
        store.remake_with(RECIPE_KIND, Arc::new(Remaker));
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
        // Room in storage, then what it will make from the client's budget.
        self.store.room().await?;
        crate::activity::generate(requested)?;
        // A layer is a pure function of its seed: it is made once here to
        // learn its digest, and stored as its recipe, a few hundred bytes;
        // every read makes the bytes again (see `Remaker`).
        let recipes: Vec<Recipe> = (0..count)
            .map(|n| Recipe {
                n,
                size,
                seed: rand::random(),
            })
            .collect();
        if !self.store.keeps_recipes() {
            let jobs = recipes.iter().map(|recipe| {
                let (store, recipe) = (self.store.clone(), *recipe);
                self.cpu
                    .run(move |cancel| write_random_layer(&store, recipe, cancel))
            });
            return try_join_all(jobs).await;
        }
        let jobs = recipes.iter().map(|recipe| {
            let recipe = *recipe;
            self.cpu.run(move |cancel| measure_layer(recipe, cancel))
        });
        let layers = try_join_all(jobs).await?;
        for (recipe, layer) in recipes.iter().zip(&layers) {
            self.store
                .put_recipe(&layer.digest, layer.size, RECIPE_KIND, &recipe.encode())
                .await?;
        }
        Ok(layers)
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

/// What a random layer is a function of: its number (the file name), its
/// size, and the seed of its bytes.
#[derive(Clone, Copy, Debug)]
pub struct Recipe {
    pub n: u32,
    pub size: u64,
    pub seed: [u8; 32],
}

/// The recipe kind random layers are stored as. "v1" is this layout and
/// rand 0.9's `SmallRng` (Xoshiro256++) on 64-bit: a golden test pins the
/// bytes, since a stored recipe must make the same blob forever.
pub const RECIPE_KIND: &str = "random-v1";

impl Recipe {
    fn encode(&self) -> Vec<u8> {
        serde_json::json!({ "n": self.n, "size": self.size, "seed": hex::encode(self.seed) })
            .to_string()
            .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Recipe> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let seed = hex::decode(v["seed"].as_str()?).ok()?.try_into().ok()?;
        Some(Recipe {
            n: u32::try_from(v["n"].as_u64()?).ok()?,
            size: v["size"].as_u64()?,
            seed,
        })
    }
}

/// Writes the layer `recipe` describes into `sink`: a tar holding
/// `random_file_<n>.txt` with `size` random bytes (mode 0644, owner 0:0,
/// mtime 0), gzipped in stored blocks. Returns the tar's digest (the
/// layer's diff id) and the sink.
fn write_layer<W: Write>(
    sink: W,
    recipe: Recipe,
    cancel: Option<&Cancel>,
) -> Result<(crate::oci::Digest, W), ImageError> {
    let Recipe { n, size, seed } = recipe;
    let gzip = StoredGzip::new(sink);
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

    let mut rng = SmallRng::from_seed(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        if let Some(cancel) = cancel {
            cancel.check()?;
        }
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
    let sink = gzip.finish().map_err(io_error("finishing gzip"))?;
    Ok((diff_id, sink))
}

/// The digest, diff id and size of the layer `recipe` makes, found by
/// making it once without storing a byte. The tar and its hash run on
/// this thread, the gzip stream's hash on another (two cores a layer).
pub fn measure_layer(recipe: Recipe, cancel: &Cancel) -> Result<LayerBlob, ImageError> {
    let hashed = Offload::new(Sha256Writer::new(std::io::sink()))
        .map_err(io_error("starting a layer hash"))?;
    let (diff_id, hashed) = write_layer(hashed, recipe, Some(cancel))?;
    let (digest, size, _) = hashed
        .finish()
        .map_err(io_error("finishing a layer hash"))?
        .finish();
    Ok(LayerBlob {
        digest,
        diff_id,
        size,
    })
}

/// Writes one layer into storage, whole (where clients download blobs
/// from the backend itself).
fn write_random_layer(
    store: &ContentStore,
    recipe: Recipe,
    cancel: &Cancel,
) -> Result<LayerBlob, ImageError> {
    // The tar and its hash on this thread; the blob's hash and the disk
    // write on another.
    let blob = Offload::new(store.blob_writer(layer_size_bound(recipe.size))?)
        .map_err(io_error("starting a layer writer"))?;
    let (diff_id, blob) = write_layer(blob, recipe, Some(cancel))?;
    let blob = blob.finish().map_err(io_error("finishing a layer"))?;
    publish(diff_id, blob)
}

/// The most a layer of `size` bytes can grow to in tar and stored gzip
/// blocks: 5 bytes per 64 KiB block, tar headers and padding, gzip framing.
fn layer_size_bound(size: u64) -> u64 {
    size + size / 65_535 * 5 + 64 * 1024
}

/// Makes stored random layers' bytes again, on a blocking thread, into a
/// stream: only up to the end of the range asked for, and only the range's
/// bytes sent.
struct Remaker;

impl Remake for Remaker {
    fn remake(
        &self,
        recipe: &[u8],
        range: Option<ByteRange>,
    ) -> Result<BoxStream<'static, std::io::Result<Bytes>>, String> {
        let recipe = Recipe::decode(recipe).ok_or("an unreadable random-layer recipe")?;
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let sink = RangeSink {
            sender,
            skip: range.map_or(0, |r| r.first),
            left: range.map_or(u64::MAX, |r| r.len()),
            buf: Vec::with_capacity(CHUNK),
        };
        // At most one remake a core at once: each is a core's work, and a
        // flood of GETs must not take every blocking thread.
        tokio::spawn(async move {
            let Ok(permit) = REMAKES.clone().acquire_owned().await else {
                return;
            };
            let _ = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                remake_into(sink, recipe);
            })
            .await;
        });
        let body = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|chunk| (chunk, receiver))
        });
        Ok(body.boxed())
    }
}

/// Remakes running at once.
static REMAKES: std::sync::LazyLock<Arc<tokio::sync::Semaphore>> = std::sync::LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    Arc::new(tokio::sync::Semaphore::new(cores))
});

/// Makes the layer of `recipe` into `sink`; a failure goes to the reader
/// as an error (never a clean end of a short body).
fn remake_into(sink: RangeSink, recipe: Recipe) {
    let errors = sink.sender.clone();
    let error = match write_layer(sink, recipe, None) {
        Ok((_, mut sink)) => match sink.send() {
            Ok(()) => return,
            Err(e) => e,
        },
        Err(ImageError::Io { source, .. }) if source.kind() == ErrorKind::BrokenPipe => {
            return;
        }
        Err(e) => std::io::Error::other(e.to_string()),
    };
    let _ = errors.try_send(Err(error));
}

/// How long a reader may take no bytes before its remake stops.
const STALLED: std::time::Duration = std::time::Duration::from_secs(60);

/// A sink that drops the first `skip` bytes, sends the next `left` in
/// chunks, then stops the writer (a `BrokenPipe` error, which the maker
/// takes as the end; not `Interrupted`, which `write_all` retries). A
/// reader that went away stops it too.
struct RangeSink {
    sender: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    skip: u64,
    left: u64,
    buf: Vec<u8>,
}

impl RangeSink {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut chunk = Ok(Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(CHUNK),
        )));
        // A reader that takes nothing for a while has stalled: its remake
        // (and the core it holds) is given up.
        let started = std::time::Instant::now();
        loop {
            match self.sender.try_send(chunk) {
                Ok(()) => return Ok(()),
                Err(tokio::sync::mpsc::error::TrySendError::Full(back))
                    if started.elapsed() < STALLED =>
                {
                    chunk = back;
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(_) => {
                    return Err(std::io::Error::new(
                        ErrorKind::BrokenPipe,
                        "the reader went away or stalled",
                    ));
                }
            }
        }
    }
}

impl Write for RangeSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // Skipping to a range's start sends nothing for a while: notice a
        // reader that left meanwhile.
        if self.sender.is_closed() {
            return Err(std::io::Error::new(
                ErrorKind::BrokenPipe,
                "the reader went away",
            ));
        }
        let skipped = (self.skip.min(data.len() as u64)) as usize;
        self.skip -= skipped as u64;
        let wanted = &data[skipped..];
        let take = (self.left.min(wanted.len() as u64)) as usize;
        self.buf.extend_from_slice(&wanted[..take]);
        self.left -= take as u64;
        if self.buf.len() >= CHUNK || self.left == 0 {
            self.send()?;
        }
        if self.left == 0 {
            return Err(std::io::Error::new(
                ErrorKind::BrokenPipe,
                "the range is sent",
            ));
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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

    /// Stored recipes must make the same bytes forever: this pins them.
    #[test]
    fn a_recipe_makes_the_same_layer_on_every_machine_and_version() {
        let recipe = Recipe {
            n: 3,
            size: 100_000,
            seed: [7; 32],
        };
        let layer = measure_layer(recipe, &Cancel::default()).unwrap();
        assert_eq!(
            (layer.digest.to_string(), layer.size),
            (GOLDEN_DIGEST.to_owned(), GOLDEN_SIZE),
            "random-v1 changed: stored recipes would no longer match their digests; \
             make a random-v2 kind instead"
        );
    }

    const GOLDEN_DIGEST: &str =
        "sha256:041a1070e0dabb6ead1c65e50ab1ab27278f31a76fe192ff66bfd7925dfbbab4";
    const GOLDEN_SIZE: u64 = 101_931;

    #[tokio::test]
    async fn layers_are_stored_as_recipes_and_made_again_whole_or_in_part() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::test_store(dir.path());
        let random = Random::new(storage.clone(), Cpu::default());
        let layers = random.layers(2, 3_000_000, u64::MAX).await.unwrap();
        // No blob bytes on disk: a recipe a layer.
        assert!(
            !dir.path().join("blobs").exists()
                || std::fs::read_dir(dir.path().join("blobs/sha256")).map_or(0, |d| d.count()) == 0
        );
        let recipes = std::fs::read_dir(dir.path().join("recipes/sha256"))
            .unwrap()
            .count();
        assert_eq!(recipes, 2);
        for layer in &layers {
            let whole = crate::storage::read_all(&storage, &layer.digest, None).await;
            assert_eq!(Digest::sha256(&whole), layer.digest);
            for (first, last) in [(0, 0), (10, 70_000), (1_500_000, layer.size - 1)] {
                let part = crate::storage::read_all(
                    &storage,
                    &layer.digest,
                    Some(ByteRange { first, last }),
                )
                .await;
                assert_eq!(part, whole[first as usize..=last as usize]);
            }
        }
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
