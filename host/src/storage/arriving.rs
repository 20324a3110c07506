//! Blobs still arriving: a download being spooled into storage is readable,
//! by any number of clients at once, while its bytes come in.
//!
//! The writer ([`super::BlobWriter`] made with
//! [`super::ContentStore::arriving_writer`]) publishes how far its spool
//! file is written; readers follow it through their own handle on that
//! file. The blob's last byte is held back until the whole blob is verified
//! and published: a reader never sees a clean end of a wrong body. When the
//! download fails (a wrong digest, a broken transfer, a shutdown), every
//! reader's body ends in an error, which aborts the response.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use tokio::sync::watch;

use super::{BlobContent, ByteRange};
use crate::oci::Digest;

/// Readers read at most this much at a time.
const READ_CHUNK: u64 = 256 * 1024;

/// How far a blob has arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// This many bytes are written and readable.
    Growing(u64),
    /// Every byte is there and verified (being stored: on a bucket, an
    /// upload that may take a while; readers need not wait for it).
    Verified,
    /// Every byte is there, verified and stored.
    Stored,
    /// The download failed; nothing is stored.
    Failed(String),
}

/// One blob arriving.
pub struct Arrival {
    pub digest: Digest,
    /// The size it is expected to have.
    pub size: u64,
    file: std::fs::File,
    progress: watch::Sender<Progress>,
}

impl Arrival {
    /// Waits until the blob is stored (`Ok`) or its download failed.
    pub async fn finished(&self) -> Result<(), String> {
        let mut progress = self.progress.subscribe();
        loop {
            match &*progress.borrow_and_update() {
                Progress::Stored => return Ok(()),
                Progress::Failed(why) => return Err(why.clone()),
                Progress::Growing(_) | Progress::Verified => {}
            }
            // The sender lives as long as `self`.
            let _ = progress.changed().await;
        }
    }

    /// Bytes `range` of the blob (all of it without one), each sent once it
    /// has arrived.
    pub fn read(self: &Arc<Self>, range: Option<ByteRange>) -> BlobContent {
        let (first, end) = match range {
            Some(r) => (r.first, r.last + 1),
            None => (0, self.size),
        };
        let state = (self.clone(), self.progress.subscribe(), first);
        let body: BoxStream<'static, io::Result<Bytes>> = Box::pin(futures_util::stream::unfold(
            state,
            move |(arrival, mut progress, at)| async move {
                if at >= end {
                    return None;
                }
                loop {
                    let now = progress.borrow_and_update().clone();
                    let readable = match now {
                        Progress::Verified | Progress::Stored => arrival.size,
                        // The last byte waits for the verdict on the whole.
                        Progress::Growing(n) => n.min(arrival.size.saturating_sub(1)),
                        Progress::Failed(why) => {
                            let error = io::Error::other(why);
                            return Some((Err(error), (arrival, progress, end)));
                        }
                    };
                    if readable > at {
                        let n = (readable.min(end) - at).min(READ_CHUNK);
                        let reading = arrival.clone();
                        let read = tokio::task::spawn_blocking(move || {
                            let mut buf = vec![0; n as usize];
                            reading.file.read_exact_at(&mut buf, at).map(|()| buf)
                        })
                        .await
                        .unwrap_or_else(|e| Err(io::Error::other(e)));
                        return Some(match read {
                            Ok(buf) => (Ok(Bytes::from(buf)), (arrival, progress, at + n)),
                            Err(e) => (Err(e), (arrival, progress, end)),
                        });
                    }
                    let _ = progress.changed().await;
                }
            },
        ));
        BlobContent {
            len: end.saturating_sub(first),
            body,
        }
    }
}

/// The blobs arriving now, by digest.
#[derive(Default)]
pub struct Arrivals(Mutex<HashMap<Digest, Arc<Arrival>>>);

impl Arrivals {
    pub fn get(&self, digest: &Digest) -> Option<Arc<Arrival>> {
        self.lock().get(digest).cloned()
    }

    /// Lists a blob starting to arrive into the spool file `file`.
    pub(super) fn start(
        self: &Arc<Self>,
        digest: Digest,
        size: u64,
        file: std::fs::File,
    ) -> Arriving {
        let arrival = Arc::new(Arrival {
            digest: digest.clone(),
            size,
            file,
            progress: watch::Sender::new(Progress::Growing(0)),
        });
        self.lock().insert(digest, arrival.clone());
        Arriving {
            arrivals: self.clone(),
            arrival,
            ended: false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Arrival>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The writer's side of an arrival: listed until it ends, and failed if it
/// is dropped before it ends.
pub(super) struct Arriving {
    arrivals: Arc<Arrivals>,
    arrival: Arc<Arrival>,
    ended: bool,
}

impl Arriving {
    /// `written` bytes are on the file, readable.
    pub fn grew(&self, written: u64) {
        self.arrival
            .progress
            .send_replace(Progress::Growing(written));
    }

    /// The whole blob is on the file, `size` bytes, its digest checked:
    /// readers may finish while it is stored. A size other than the one
    /// readers were told fails them.
    pub fn verified(&self, size: u64) -> Result<(), String> {
        if size != self.arrival.size {
            return Err(format!(
                "the blob is {size} bytes, not the {} its upstream said",
                self.arrival.size
            ));
        }
        self.arrival.progress.send_replace(Progress::Verified);
        Ok(())
    }

    /// Ends the arrival: stored (readers finish from the storage's copy
    /// of the same bytes) or failed.
    pub fn end(mut self, outcome: Result<(), String>) {
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: Result<(), String>) {
        if self.ended {
            return;
        }
        self.ended = true;
        {
            let mut map = self.arrivals.lock();
            if map
                .get(&self.arrival.digest)
                .is_some_and(|a| Arc::ptr_eq(a, &self.arrival))
            {
                map.remove(&self.arrival.digest);
            }
        }
        self.arrival.progress.send_replace(match outcome {
            Ok(()) => Progress::Stored,
            Err(why) => Progress::Failed(why),
        });
    }
}

impl Drop for Arriving {
    fn drop(&mut self) {
        self.finish(Err(
            "the download stopped before the blob was complete".into()
        ));
    }
}
