//! A writer whose writes happen on a thread of their own, so that a layer's
//! two hashes run on two cores: the caller's thread makes and hashes the
//! tar, this one hashes the compressed blob and writes it to storage.
//!
//! Bytes travel in whole buffers of [`CHUNK`] (recycled, at most [`DEPTH`]
//! in flight), in order; the output is exactly what the same writes to the
//! inner writer would have produced.

use std::io::{self, Write};
use std::sync::mpsc;
use std::thread;

/// At least the storage spool's buffer, so that it passes our buffers
/// straight to the file instead of copying them again.
const CHUNK: usize = 1 << 20;
/// Buffers in flight: enough to keep both threads busy, little memory.
const DEPTH: usize = 3;

pub struct Offload<W: Write + Send + 'static> {
    current: Vec<u8>,
    full: Option<mpsc::SyncSender<Vec<u8>>>,
    empty: mpsc::Receiver<Vec<u8>>,
    writer: Option<thread::JoinHandle<io::Result<W>>>,
}

impl<W: Write + Send + 'static> Offload<W> {
    pub fn new(mut inner: W) -> io::Result<Self> {
        let (full, to_write) = mpsc::sync_channel::<Vec<u8>>(DEPTH);
        let (recycle, empty) = mpsc::sync_channel(DEPTH + 1);
        let writer = thread::Builder::new()
            .name("kontain-write".into())
            .spawn(move || {
                for mut chunk in to_write {
                    inner.write_all(&chunk)?;
                    chunk.clear();
                    // The other side may be gone (finished or dropped).
                    let _ = recycle.try_send(chunk);
                }
                Ok(inner)
            })?;
        Ok(Offload {
            current: Vec::with_capacity(CHUNK),
            full: Some(full),
            empty,
            writer: Some(writer),
        })
    }

    fn send(&mut self) -> io::Result<()> {
        let next = self
            .empty
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        let chunk = std::mem::replace(&mut self.current, next);
        let sent = self.full.as_ref().map(|full| full.send(chunk));
        if let Some(Ok(())) = sent {
            return Ok(());
        }
        // The writing thread stopped: it failed; its error says why.
        match self.join() {
            Err(e) => Err(e),
            Ok(_) => Err(io::Error::other("the writing thread stopped")),
        }
    }

    fn join(&mut self) -> io::Result<W> {
        self.full = None;
        match self.writer.take().map(thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("the writing thread panicked")),
            None => Err(io::Error::other("the writing thread already stopped")),
        }
    }

    /// Writes what is left, waits for the thread, returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.current.is_empty() {
            self.send()?;
        }
        self.join()
    }
}

impl<W: Write + Send + 'static> Write for Offload<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = buf.len().min(CHUNK - self.current.len());
        self.current.extend_from_slice(&buf[..take]);
        if self.current.len() == CHUNK {
            self.send()?;
        }
        Ok(take)
    }

    /// Nothing to do: [`Offload::finish`] is the only way to the end.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write + Send + 'static> Drop for Offload<W> {
    fn drop(&mut self) {
        // Ends the thread's loop; the inner writer is dropped there (an
        // unfinished blob writer leaves nothing behind).
        self.full = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_arrive_whole_and_in_order() {
        let data: Vec<u8> = (0..3 * CHUNK + 12_345).map(|i| (i % 251) as u8).collect();
        let mut out = Offload::new(Vec::new()).unwrap();
        for piece in data.chunks(70_000) {
            out.write_all(piece).unwrap();
        }
        assert_eq!(out.finish().unwrap(), data);
    }

    struct Failing;
    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk full"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_inner_writers_error_comes_back() {
        let mut out = Offload::new(Failing).unwrap();
        let big = vec![0u8; CHUNK];
        let mut failed = None;
        for _ in 0..DEPTH + 3 {
            if let Err(e) = out.write_all(&big) {
                failed = Some(e);
                break;
            }
        }
        let error = failed.unwrap_or_else(|| out.finish().map(|_| ()).unwrap_err());
        assert_eq!(error.to_string(), "disk full");
    }
}
