//! Gzip writers for layers: one that compresses on every core, and one that
//! stores instead of compressing, for data that cannot be compressed
//! (random bytes).
//!
//! Both write one ordinary gzip member (RFC 1952), so any gzip reader
//! accepts their output, and both are deterministic: the same input always
//! gives the same bytes, whatever the number of threads or cores.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, mpsc};

use flate2::{Compress, Compression, FlushCompress};

/// Input compressed as one independent piece. Fixed, never derived from the
/// core count, so that the output does not depend on the machine; large
/// enough that the per-piece flush marker (5 bytes) and task hand-off cost
/// nothing, small enough that a 2 MB layer already uses two cores.
const PIECE: usize = 256 * 1024;
/// Deflate's window: each piece is compressed with the previous piece's last
/// 32 KiB as its dictionary, so splitting costs almost no compression.
const WINDOW: usize = 32 * 1024;
/// Pieces one writer has in flight at most (~0.5 MiB each, input and output).
const MAX_IN_FLIGHT: usize = 16;
/// A final, empty block with fixed codes (BFINAL=1, BTYPE=01, end of block).
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];

/// Where the pieces of a [`ParallelGzip`] are compressed.
#[derive(Clone, Default)]
pub enum Threads {
    /// The process-wide pool, one thread per core.
    #[default]
    Shared,
    /// A pool of its own (tests force one or two threads with it).
    Own(Arc<rayon::ThreadPool>),
}

impl Threads {
    fn count(&self) -> usize {
        match self {
            Threads::Shared => rayon::current_num_threads(),
            Threads::Own(pool) => pool.current_num_threads(),
        }
    }

    fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        match self {
            Threads::Shared => rayon::spawn(job),
            Threads::Own(pool) => pool.spawn(job),
        }
    }
}

/// One compressed piece: raw deflate ending in a sync flush (so pieces
/// concatenate into one stream), and the CRC-32 of its input.
struct Piece {
    deflated: Vec<u8>,
    crc: crc32fast::Hasher,
}

/// A gzip writer that compresses pieces of [`PIECE`] bytes on a thread pool
/// while the writing thread goes on (tar, hashing, storage), as pigz does.
/// Pieces are written out in order; two per thread are in flight, at most
/// [`MAX_IN_FLIGHT`].
pub struct ParallelGzip<W: Write> {
    member: Member<W>,
    level: Compression,
    threads: Threads,
    /// Input gathered for the next piece.
    gathered: Vec<u8>,
    /// The end of the previous piece: the next one's dictionary.
    window: Vec<u8>,
    in_flight: VecDeque<mpsc::Receiver<io::Result<Piece>>>,
}

impl<W: Write> ParallelGzip<W> {
    pub fn new(inner: W, level: Compression) -> Self {
        Self::with_threads(inner, level, Threads::Shared)
    }

    pub fn with_threads(inner: W, level: Compression, threads: Threads) -> Self {
        ParallelGzip {
            member: Member::new(inner),
            level,
            threads,
            gathered: Vec::with_capacity(PIECE),
            window: Vec::new(),
            in_flight: VecDeque::new(),
        }
    }

    /// Hands the gathered input to the pool as the next piece, then writes
    /// out finished pieces until few enough are in flight.
    fn submit(&mut self) -> io::Result<()> {
        self.member.start()?;
        let data = std::mem::replace(&mut self.gathered, Vec::with_capacity(PIECE));
        let dictionary = std::mem::replace(
            &mut self.window,
            data[data.len().saturating_sub(WINDOW)..].to_vec(),
        );
        self.member.isize = self.member.isize.wrapping_add(data.len() as u32);
        let level = self.level;
        let (done, result) = mpsc::sync_channel(1);
        self.threads.spawn(move || {
            // The receiver is gone only if the writer was dropped (an error
            // or a cancelled build); nothing waits for this piece then.
            let _ = done.send(deflate_piece(level, &dictionary, &data));
        });
        self.in_flight.push_back(result);
        // Two per thread keep every thread busy; the cap keeps a many-core
        // machine's layers (one writer per core) from holding cores² pieces.
        while self.in_flight.len() > (2 * self.threads.count()).clamp(2, MAX_IN_FLIGHT) {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        let Some(next) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let piece = next
            .recv()
            .map_err(|_| io::Error::other("a compression thread stopped"))??;
        self.member.crc.combine(&piece.crc);
        self.member.inner.write_all(&piece.deflated)
    }

    /// Ends the stream and writes the trailer; returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.gathered.is_empty() {
            self.submit()?;
        }
        while !self.in_flight.is_empty() {
            self.write_oldest()?;
        }
        self.member.finish(&FINAL_BLOCK)
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = buf.len().min(PIECE - self.gathered.len());
        self.gathered.extend_from_slice(&buf[..take]);
        if self.gathered.len() == PIECE {
            self.submit()?;
        }
        Ok(take)
    }

    /// Passes the flush on without ending a piece: where pieces end must
    /// depend on the input alone.
    fn flush(&mut self) -> io::Result<()> {
        self.member.inner.flush()
    }
}

/// Raw deflate of `data` with `dictionary` as the preceding window, ended
/// by a sync flush: byte-aligned and not final, so the next piece follows.
fn deflate_piece(level: Compression, dictionary: &[u8], data: &[u8]) -> io::Result<Piece> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(data);
    let mut deflate = Compress::new(level, false);
    if !dictionary.is_empty() {
        deflate
            .set_dictionary(dictionary)
            .map_err(io::Error::other)?;
    }
    let mut deflated = Vec::with_capacity(data.len() / 2 + 1024);
    loop {
        let consumed = deflate.total_in() as usize;
        deflate
            .compress_vec(&data[consumed..], &mut deflated, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        // The flush is complete once all input is taken and the output
        // buffer was not filled.
        if deflate.total_in() as usize == data.len() && deflated.len() < deflated.capacity() {
            return Ok(Piece { deflated, crc });
        }
        deflated.reserve(deflated.capacity().max(64 * 1024));
    }
}

/// The most bytes one stored block can hold (its length field is 16 bits).
const MAX_STORED: usize = 65_535;

/// Magic, deflate, no flags, mtime 0 (reproducible), no extra flags, OS unknown.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// Writes stored blocks only: general-purpose encoders at level 0 still copy
/// every byte through their window buffer (measured on 10 MB: miniz_oxide
/// 82 ms, zlib-rs 14 ms, against 1.2 ms for the CRC-32 this writer needs —
/// the rest is a memcpy).
pub struct StoredGzip<W: Write> {
    member: Member<W>,
}

impl<W: Write> StoredGzip<W> {
    pub fn new(inner: W) -> Self {
        StoredGzip {
            member: Member::new(inner),
        }
    }

    fn block(&mut self, data: &[u8], last: bool) -> io::Result<()> {
        let len = data.len() as u16;
        let [l0, l1] = len.to_le_bytes();
        let [n0, n1] = (!len).to_le_bytes();
        // BFINAL in bit 0, BTYPE 00 (stored); stored blocks start byte-aligned.
        let inner = &mut self.member.inner;
        inner.write_all(&[u8::from(last), l0, l1, n0, n1])?;
        inner.write_all(data)
    }

    /// Ends the deflate stream and writes the trailer; returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        // A final, empty stored block.
        self.member.finish(&[1, 0, 0, 0xff, 0xff])
    }
}

impl<W: Write> Write for StoredGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.member.start()?;
        for chunk in buf.chunks(MAX_STORED) {
            self.block(chunk, false)?;
        }
        self.member.crc.update(buf);
        self.member.isize = self.member.isize.wrapping_add(buf.len() as u32);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.member.inner.flush()
    }
}

/// What both writers keep of the member they write: the output, whether
/// its header is out, and the CRC-32 and length (mod 2^32) of the input
/// for its trailer.
struct Member<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
    isize: u32,
    started: bool,
}

impl<W: Write> Member<W> {
    fn new(inner: W) -> Self {
        Member {
            inner,
            crc: crc32fast::Hasher::new(),
            isize: 0,
            started: false,
        }
    }

    fn start(&mut self) -> io::Result<()> {
        if !self.started {
            self.inner.write_all(&HEADER)?;
            self.started = true;
        }
        Ok(())
    }

    /// Writes the deflate stream's `last_block`, then the trailer.
    fn finish(mut self, last_block: &[u8]) -> io::Result<W> {
        self.start()?;
        self.inner.write_all(last_block)?;
        self.inner.write_all(&self.crc.finalize().to_le_bytes())?;
        self.inner.write_all(&self.isize.to_le_bytes())?;
        Ok(self.inner)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use flate2::read::GzDecoder;

    use super::*;

    fn round_trip(writes: &[&[u8]]) -> Vec<u8> {
        let mut gz = StoredGzip::new(Vec::new());
        for w in writes {
            gz.write_all(w).unwrap();
        }
        let bytes = gz.finish().unwrap();
        let mut out = Vec::new();
        GzDecoder::new(&bytes[..]).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn any_gzip_reader_decodes_what_it_writes() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for writes in [
            vec![],
            vec![&b""[..]],
            vec![&b"hello"[..], &b" world"[..]],
            vec![&big[..]],
            vec![
                &big[..MAX_STORED],
                &big[MAX_STORED..MAX_STORED + 1],
                &big[..],
            ],
        ] {
            let want: Vec<u8> = writes.concat();
            assert_eq!(round_trip(&writes), want);
        }
    }

    fn parallel(data: &[u8], writes: usize, threads: usize) -> Vec<u8> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut gz = ParallelGzip::with_threads(
            Vec::new(),
            Compression::fast(),
            Threads::Own(Arc::new(pool)),
        );
        for chunk in data.chunks(writes.max(1)) {
            gz.write_all(chunk).unwrap();
        }
        gz.finish().unwrap()
    }

    #[test]
    fn parallel_output_decodes_and_does_not_depend_on_threads_or_writes() {
        // Compressible but not trivially: text-like lines with a counter.
        let text: Vec<u8> = (0..120_000u32)
            .flat_map(|i| format!("line {i} of {}\n", i % 97).into_bytes())
            .collect();
        for data in [&b""[..], &b"x"[..], &text[..PIECE], &text[..]] {
            let one = parallel(data, 4096, 1);
            assert_eq!(parallel(data, 7, 2), one);
            assert_eq!(parallel(data, PIECE + 1, 3), one);
            let mut out = Vec::new();
            GzDecoder::new(&one[..]).read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
        }
        // Splitting with a dictionary costs little against one stream.
        let mut whole = flate2::write::GzEncoder::new(Vec::new(), Compression::fast());
        whole.write_all(&text).unwrap();
        let whole = whole.finish().unwrap().len();
        assert!(parallel(&text, 4096, 2).len() < whole + whole / 50);
    }

    #[test]
    fn output_is_deterministic() {
        let a = StoredGzip::new(Vec::new());
        let b = StoredGzip::new(Vec::new());
        assert_eq!(a.finish().unwrap(), b.finish().unwrap());
    }
}
