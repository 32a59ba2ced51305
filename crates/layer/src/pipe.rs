//! Decompression on a thread of its own, feeding the tar reader and the ext4
//! writer through a bounded channel, and the diff-id's hash on another.
//!
//! Inflating a layer is the one step that cannot be made cheaper here, so a
//! build of a compressed layer can at best take as long as decompressing it
//! alone. With the decoder on the caller's thread, every other step (tar
//! parsing, the ext4 writer, the diff-id) is added to that floor; with the
//! decoder on its own thread they run beside it, and with the sha256 of the
//! decompressed stream (the diff-id) on a third, the caller's thread has
//! less to do than the decoder's. [`spawn`] starts both inside a
//! [`std::thread::scope`]; the caller reads the decompressed stream from
//! the returned [`PipeReader`], which hands out the decoder's chunks
//! without copying them again ([`BufRead`]); the hasher reads the same
//! chunks (shared, not copied).
//!
//! Memory is bounded: at most [`DEPTH`] chunks of [`CHUNK`] bytes wait in
//! each channel, and read chunks go back to the decoder to be refilled. A
//! decoder error reaches the reader as the same `io::Error`, at the point
//! of the stream where it happened; a reader that goes away (a tar error)
//! makes the decoder stop at its next chunk.

use std::io::{self, BufRead, Read};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::thread::{Scope, ScopedJoinHandle};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// Bytes per chunk.
pub(crate) const CHUNK: usize = 256 << 10;
/// Chunks in flight between the decoder and the reader.
pub(crate) const DEPTH: usize = 4;

/// A chunk of the decompressed stream, shared by the reader and the hasher.
type Chunk = Arc<Vec<u8>>;

/// What the decoder sends.
enum Message {
    /// Decompressed bytes, and how many compressed bytes were read so far.
    Data(Chunk, u64),
    /// The decoder failed here; nothing follows.
    Failed(io::Error),
}

/// A decoder that can say how much of its input it has consumed.
pub(crate) trait Decoder: Read + Send {
    /// Compressed bytes read from the blob so far (for progress).
    fn consumed(&self) -> u64;
}

/// The decompressed stream, read on the caller's thread.
pub(crate) struct PipeReader<'p> {
    chunks: Receiver<Message>,
    recycle: Sender<Chunk>,
    current: Chunk,
    position: usize,
    /// The decoder's error, returned again on every later read.
    failed: Option<io::ErrorKind>,
    /// Told the compressed bytes consumed whenever a chunk arrives.
    consumed: &'p mut dyn FnMut(u64),
}

/// The decoder's and the hasher's threads.
pub(crate) struct Decoding<'scope, D> {
    decoder: ScopedJoinHandle<'scope, Option<D>>,
    hasher: ScopedJoinHandle<'scope, Digest>,
}

impl<D> Decoding<'_, D> {
    /// Wait for both threads: the decoder and the sha256 of everything it
    /// decoded, once the stream has ended; `None` if the decoder stopped
    /// first (it failed, or the reader went away).
    pub(crate) fn finish(self) -> io::Result<Option<(D, Digest)>> {
        let panicked = |what: &str| io::Error::other(format!("the layer's {what} thread panicked"));
        let decoder = self.decoder.join().map_err(|_| panicked("decompression"))?;
        let digest = self.hasher.join().map_err(|_| panicked("diff-id hashing"))?;
        Ok(decoder.map(|decoder| (decoder, digest)))
    }
}

/// Start `decoder` on a thread of `scope`, and the hasher of what it
/// decodes on another.
pub(crate) fn spawn<'scope, 'env, 'c, D: Decoder + 'scope>(
    scope: &'scope Scope<'scope, 'env>,
    decoder: D,
    consumed: &'c mut dyn FnMut(u64),
) -> io::Result<(PipeReader<'c>, Decoding<'scope, D>)> {
    let (chunks, received) = mpsc::sync_channel(DEPTH);
    let (to_hash, hashing) = mpsc::sync_channel::<Chunk>(DEPTH);
    let (recycle, recycled) = mpsc::channel();
    let hasher = std::thread::Builder::new().name("layer-diff-id".into()).spawn_scoped(scope, move || {
        let mut sha = Sha256::new();
        for chunk in hashing {
            sha.update(chunk.as_slice());
        }
        Digest::from_bytes(sha.finalize().into())
    })?;
    let decoder = std::thread::Builder::new()
        .name("layer-decompress".into())
        .spawn_scoped(scope, move || decode(decoder, &chunks, &to_hash, &recycled))?;
    let reader =
        PipeReader { chunks: received, recycle, current: Chunk::default(), position: 0, failed: None, consumed };
    Ok((reader, Decoding { decoder, hasher }))
}

/// The decoder's thread: fill chunks until the stream ends or fails.
fn decode<D: Decoder>(
    mut decoder: D,
    chunks: &SyncSender<Message>,
    to_hash: &SyncSender<Chunk>,
    recycled: &Receiver<Chunk>,
) -> Option<D> {
    loop {
        // A chunk both the reader and the hasher are done with, else a new one.
        let mut chunk = recycled.try_iter().find_map(|chunk| Arc::try_unwrap(chunk).ok()).unwrap_or_default();
        chunk.resize(CHUNK, 0);
        let mut filled = 0;
        let mut failed = None;
        while filled < CHUNK {
            match decoder.read(chunk.get_mut(filled..).unwrap_or_default()) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    failed = Some(err);
                    break;
                }
            }
        }
        let ended = filled < CHUNK;
        chunk.truncate(filled);
        // What was decoded before an error comes first.
        if filled > 0 {
            let chunk = Arc::new(chunk);
            let sent =
                to_hash.send(chunk.clone()).is_ok() && chunks.send(Message::Data(chunk, decoder.consumed())).is_ok();
            if !sent {
                // The reader is gone: nobody wants the rest.
                return None;
            }
        }
        if let Some(err) = failed {
            let _ = chunks.send(Message::Failed(err));
            return None;
        }
        if ended {
            return Some(decoder);
        }
    }
}

impl PipeReader<'_> {
    /// The next chunk, unless the current one still has bytes. `false`: the
    /// stream has ended.
    fn next_chunk(&mut self) -> io::Result<bool> {
        if let Some(kind) = self.failed {
            return Err(io::Error::new(kind, "the layer's decompression failed earlier"));
        }
        while self.position >= self.current.len() {
            match self.chunks.recv() {
                Ok(Message::Data(chunk, consumed)) => {
                    let done = std::mem::replace(&mut self.current, chunk);
                    self.position = 0;
                    let _ = self.recycle.send(done);
                    (self.consumed)(consumed);
                }
                Ok(Message::Failed(err)) => {
                    self.failed = Some(err.kind());
                    return Err(err);
                }
                // The decoder's thread has finished: the end (a panic there
                // is reported when it is joined).
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }
}

impl Read for PipeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf.get_mut(..n).unwrap_or_default().copy_from_slice(available.get(..n).unwrap_or_default());
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for PipeReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if !self.next_chunk()? {
            return Ok(&[]);
        }
        Ok(self.current.get(self.position..).unwrap_or_default())
    }

    fn consume(&mut self, amount: usize) {
        self.position = self.position.saturating_add(amount).min(self.current.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yields `data` in reads of at most `step` bytes, then fails with `error` if set.
    struct Source {
        data: Vec<u8>,
        at: usize,
        step: usize,
        error: Option<io::ErrorKind>,
    }

    impl Read for Source {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.at == self.data.len() {
                return match self.error {
                    Some(kind) => Err(io::Error::new(kind, "broken stream")),
                    None => Ok(0),
                };
            }
            let n = buf.len().min(self.step).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    impl Decoder for Source {
        fn consumed(&self) -> u64 {
            self.at as u64
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn every_byte_arrives_in_order_and_progress_only_grows() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, CHUNK * (DEPTH + 3) + 17] {
            let data = pattern(len);
            let mut seen = Vec::new();
            let mut report = |n: u64| seen.push(n);
            let (out, finished) = std::thread::scope(|scope| {
                let source = Source { data: data.clone(), at: 0, step: 4099, error: None };
                let (mut reader, decoding) = spawn(scope, source, &mut report).unwrap();
                let mut out = Vec::new();
                // Small reads, as the tar reader's header reads.
                let mut buf = [0u8; 512];
                loop {
                    let n = reader.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..n]);
                }
                drop(reader);
                (out, decoding.finish().unwrap())
            });
            assert_eq!(out, data, "length {len}");
            let (decoder, digest) = finished.expect("the decoder comes back at the end");
            assert_eq!(decoder.at, len);
            assert_eq!(digest, Digest::of(&data), "the hasher saw every byte, in order");
            assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
            assert_eq!(seen.last().copied().unwrap_or(0), len as u64);
        }
    }

    #[test]
    fn a_decoder_error_arrives_after_the_bytes_before_it_and_stays() {
        let data = pattern(CHUNK * 2 + 5);
        let mut report = |_| {};
        std::thread::scope(|scope| {
            let source = Source { data: data.clone(), at: 0, step: 1 << 16, error: Some(io::ErrorKind::InvalidData) };
            let (mut reader, decoding) = spawn(scope, source, &mut report).unwrap();
            let mut out = Vec::new();
            let err = reader.read_to_end(&mut out).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert_eq!(out, data);
            assert_eq!(reader.read(&mut [0u8; 8]).unwrap_err().kind(), io::ErrorKind::InvalidData);
            assert!(decoding.finish().unwrap().is_none());
        });
    }

    #[test]
    fn a_reader_that_goes_away_stops_the_decoder() {
        // Far more than the channel holds: the decoder must stop, not fill memory.
        let data = pattern(CHUNK * (DEPTH + 20));
        let mut report = |_| {};
        std::thread::scope(|scope| {
            let source = Source { data, at: 0, step: CHUNK, error: None };
            let (mut reader, decoding) = spawn(scope, source, &mut report).unwrap();
            let mut first = [0u8; 100];
            reader.read_exact(&mut first).unwrap();
            drop(reader);
            assert!(decoding.finish().unwrap().is_none(), "the decoder stopped early");
        });
    }
}
