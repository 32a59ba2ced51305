//! The stages of a layer's conversion on threads of their own: the blob
//! read on one, decompression on another, the tar reader and the ext4
//! writer on the caller's, and each sha256 sum on one of its own.
//!
//! Inflating a layer is the one step that cannot be made cheaper here, so a
//! build of a compressed layer can at best take as long as decompressing it
//! alone. Every other step (reading the blob and checking its digest, tar
//! parsing, the ext4 writer, the diff-id) runs beside the decoder instead
//! of before or after it: the decoder's thread does nothing but inflate.
//!
//! A [`stage`] turns a [`Source`] into chunks on a thread of its own and
//! hands them to a [`PipeReader`] (a [`BufRead`] that reads them in place,
//! without another copy), and to a [`hasher`] of its own, which reads the
//! same chunks (shared, not copied): one for the blob's digest, one for
//! the tar's (the diff-id), so that neither sum waits for the other.
//!
//! Memory is bounded: at most [`DEPTH`] chunks of [`CHUNK`] bytes wait in
//! each channel, and read chunks go back to their stage to be refilled. A
//! source's error reaches the reader as the same `io::Error`, at the point
//! of the stream where it happened. A reader that goes away (a tar error)
//! makes a [`Drain::Stop`] stage stop at its next chunk; a
//! [`Drain::ToEnd`] stage (the blob's) reads and hashes on to its end, so
//! a wrong blob is still told as such.

use std::io::{self, BufRead, Read};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::thread::{Scope, ScopedJoinHandle};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// Bytes per chunk.
pub(crate) const CHUNK: usize = 256 << 10;
/// Chunks in flight between a stage and its reader.
pub(crate) const DEPTH: usize = 8;

/// A chunk of a stream, shared by its reader and the hasher.
type Chunk = Arc<Vec<u8>>;

/// What a stage sends.
enum Message {
    /// Bytes, and how far the source had got for them (for progress).
    Data(Chunk, u64),
    /// The source failed here; nothing follows.
    Failed(io::Error),
}

/// A stream a [`stage`] reads.
pub(crate) trait Source: Read + Send {
    /// How far this stream has got in the blob (bytes of it consumed), for
    /// progress reports.
    fn consumed(&self) -> u64;
}

/// What a stage does when its reader goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drain {
    /// Stop: nobody wants the rest.
    Stop,
    /// Read (and hash) on to the end: the sum is still wanted.
    ToEnd,
}

/// How a stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Its source ended.
    End,
    /// Its source failed (the error went to the reader, if any).
    Failed,
    /// Its reader went away and it stopped ([`Drain::Stop`]).
    Stopped,
}

/// The stream a stage produces, read on another thread.
pub(crate) struct PipeReader {
    chunks: Receiver<Message>,
    recycle: Sender<Chunk>,
    current: Chunk,
    position: usize,
    /// Bytes handed out so far.
    taken: u64,
    /// The source's position for the latest chunk.
    progress: u64,
    /// The source's error, returned again on every later read.
    failed: Option<io::ErrorKind>,
}

/// A hasher's channel.
pub(crate) type ToHash = SyncSender<Chunk>;

/// Start a thread named `name` that hashes the chunks sent to it; it ends
/// with their sha256 when every sender is dropped.
pub(crate) fn hasher<'scope>(
    scope: &'scope Scope<'scope, '_>,
    name: &str,
) -> io::Result<(ToHash, ScopedJoinHandle<'scope, Digest>)> {
    let (to_hash, hashing) = mpsc::sync_channel::<Chunk>(DEPTH);
    let hasher = std::thread::Builder::new().name(name.into()).spawn_scoped(scope, move || {
        let mut sha = Sha256::new();
        for chunk in hashing {
            sha.update(chunk.as_slice());
        }
        Digest::from_bytes(sha.finalize().into())
    })?;
    Ok((to_hash, hasher))
}

/// Start reading `source` into chunks on a thread of `scope` named `name`;
/// each chunk also goes to the hasher `hash`, if given. The thread gives back the source and how it ended.
pub(crate) fn stage<'scope, S: Source + 'scope>(
    scope: &'scope Scope<'scope, '_>,
    name: &str,
    source: S,
    hash: Option<ToHash>,
    drain: Drain,
) -> io::Result<(PipeReader, ScopedJoinHandle<'scope, (S, Ended)>)> {
    let (chunks, received) = mpsc::sync_channel(DEPTH);
    let (recycle, recycled) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn_scoped(scope, move || produce(source, &chunks, hash.as_ref(), &recycled, drain))?;
    let reader = PipeReader {
        chunks: received,
        recycle,
        current: Chunk::default(),
        position: 0,
        taken: 0,
        progress: 0,
        failed: None,
    };
    Ok((reader, thread))
}

/// Join a stage's thread; a panic there is an error.
pub(crate) fn join<S>(thread: ScopedJoinHandle<'_, S>, what: &str) -> io::Result<S> {
    thread.join().map_err(|_| io::Error::other(format!("the layer's {what} thread panicked")))
}

/// A stage's thread: fill chunks until the source ends or fails.
fn produce<S: Source>(
    mut source: S,
    chunks: &SyncSender<Message>,
    hash: Option<&ToHash>,
    recycled: &Receiver<Chunk>,
    drain: Drain,
) -> (S, Ended) {
    let mut reader_gone = false;
    loop {
        // A chunk both the reader and the hasher are done with, else a new one.
        let mut chunk = recycled.try_iter().find_map(|chunk| Arc::try_unwrap(chunk).ok()).unwrap_or_default();
        chunk.resize(CHUNK, 0);
        let mut filled = 0;
        let mut failed = None;
        while filled < CHUNK {
            match source.read(chunk.get_mut(filled..).unwrap_or_default()) {
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
        // What was read before an error comes first.
        if filled > 0 {
            let chunk = Arc::new(chunk);
            if let Some(to_hash) = hash
                && to_hash.send(chunk.clone()).is_err()
            {
                // The hasher is gone: only when the scope is ending.
                return (source, Ended::Stopped);
            }
            if !reader_gone && chunks.send(Message::Data(chunk, source.consumed())).is_err() {
                reader_gone = true;
            }
            if reader_gone && drain == Drain::Stop {
                return (source, Ended::Stopped);
            }
        }
        if let Some(err) = failed {
            if !reader_gone {
                let _ = chunks.send(Message::Failed(err));
            }
            return (source, Ended::Failed);
        }
        if ended {
            return (source, Ended::End);
        }
    }
}

impl PipeReader {
    /// Bytes read from this stream so far.
    pub(crate) fn taken(&self) -> u64 {
        self.taken
    }

    /// How far the source had got for the chunk being read.
    pub(crate) fn progress(&self) -> u64 {
        self.progress
    }

    /// The next chunk, unless the current one still has bytes. `false`: the
    /// stream has ended.
    fn next_chunk(&mut self) -> io::Result<bool> {
        if let Some(kind) = self.failed {
            return Err(io::Error::new(kind, "the layer's stream failed earlier"));
        }
        while self.position >= self.current.len() {
            match self.chunks.recv() {
                Ok(Message::Data(chunk, progress)) => {
                    let done = std::mem::replace(&mut self.current, chunk);
                    self.position = 0;
                    self.progress = progress;
                    let _ = self.recycle.send(done);
                }
                Ok(Message::Failed(err)) => {
                    self.failed = Some(err.kind());
                    return Err(err);
                }
                // The stage's thread has finished: the end (a panic there
                // is reported when it is joined).
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf.get_mut(..n).unwrap_or_default().copy_from_slice(available.get(..n).unwrap_or_default());
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for PipeReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if !self.next_chunk()? {
            return Ok(&[]);
        }
        Ok(self.current.get(self.position..).unwrap_or_default())
    }

    fn consume(&mut self, amount: usize) {
        let amount = amount.min(self.current.len().saturating_sub(self.position));
        self.position += amount;
        self.taken += amount as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yields `data` in reads of at most `step` bytes, then fails with `error` if set.
    struct Bytes {
        data: Vec<u8>,
        at: usize,
        step: usize,
        error: Option<io::ErrorKind>,
    }

    impl Bytes {
        fn new(data: Vec<u8>, step: usize, error: Option<io::ErrorKind>) -> Self {
            Bytes { data, at: 0, step, error }
        }
    }

    impl Read for Bytes {
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

    impl Source for Bytes {
        fn consumed(&self) -> u64 {
            self.at as u64
        }
    }

    /// A second stage over the first's stream, as a decoder is: passes the
    /// bytes on, each one twice.
    struct Doubling(PipeReader);

    impl Read for Doubling {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            // The stage asks for what is left of an even-sized chunk.
            assert!(buf.len() >= 2);
            let half = buf.len() / 2;
            let n = self.0.read(&mut buf[..half])?;
            for i in (0..n).rev() {
                buf[2 * i] = buf[i];
                buf[2 * i + 1] = buf[i];
            }
            Ok(2 * n)
        }
    }

    impl Source for Doubling {
        fn consumed(&self) -> u64 {
            self.0.taken()
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn every_byte_arrives_in_order_and_progress_only_grows() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, CHUNK * (DEPTH + 3) + 17] {
            let data = pattern(len);
            let (out, seen, ended, sum) = std::thread::scope(|scope| {
                let (to_hash, hasher) = hasher(scope, "sha256").unwrap();
                let source = Bytes::new(data.clone(), 4099, None);
                let (mut reader, thread) = stage(scope, "test", source, Some(to_hash), Drain::Stop).unwrap();
                let mut out = Vec::new();
                let mut seen = Vec::new();
                // Small reads, as the tar reader's header reads.
                let mut buf = [0u8; 512];
                loop {
                    let n = reader.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..n]);
                    seen.push(reader.progress());
                }
                assert_eq!(reader.taken(), len as u64);
                drop(reader);
                let (source, ended) = join(thread, "test").unwrap();
                assert_eq!(source.at, len);
                (out, seen, ended, join(hasher, "sha256").unwrap())
            });
            assert_eq!(out, data, "length {len}");
            assert_eq!(ended, Ended::End);
            assert_eq!(sum, Digest::of(&data), "the hasher saw every byte, in order");
            assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
            assert_eq!(seen.last().copied().unwrap_or(0), len as u64);
        }
    }

    #[test]
    fn two_stages_hash_their_streams_each_into_its_own_sum() {
        let data = pattern(CHUNK * 3 + 99);
        let doubled: Vec<u8> = data.iter().flat_map(|&b| [b, b]).collect();
        let (out, sums) = std::thread::scope(|scope| {
            let (to_hash_raw, raw_hasher) = hasher(scope, "raw-sha256").unwrap();
            let (to_hash, hasher) = hasher(scope, "sha256").unwrap();
            let source = Bytes::new(data.clone(), 1000, None);
            let (raw, reading) = stage(scope, "raw", source, Some(to_hash_raw), Drain::ToEnd).unwrap();
            let (mut reader, decoding) = stage(scope, "double", Doubling(raw), Some(to_hash), Drain::Stop).unwrap();
            let mut out = Vec::new();
            reader.read_to_end(&mut out).unwrap();
            // The second stage's progress is how far it read the first.
            assert_eq!(reader.progress(), data.len() as u64);
            drop(reader);
            assert_eq!(join(decoding, "double").unwrap().1, Ended::End);
            assert_eq!(join(reading, "raw").unwrap().1, Ended::End);
            (out, [join(raw_hasher, "raw").unwrap(), join(hasher, "sha256").unwrap()])
        });
        assert_eq!(out, doubled);
        assert_eq!(sums, [Digest::of(&data), Digest::of(&doubled)]);
    }

    #[test]
    fn an_error_arrives_after_the_bytes_before_it_and_stays() {
        let data = pattern(CHUNK * 2 + 5);
        std::thread::scope(|scope| {
            let source = Bytes::new(data.clone(), 1 << 16, Some(io::ErrorKind::InvalidData));
            let (mut reader, thread) = stage(scope, "test", source, None, Drain::Stop).unwrap();
            let mut out = Vec::new();
            let err = reader.read_to_end(&mut out).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert_eq!(out, data);
            assert_eq!(reader.read(&mut [0u8; 8]).unwrap_err().kind(), io::ErrorKind::InvalidData);
            assert_eq!(join(thread, "test").unwrap().1, Ended::Failed);
        });
    }

    #[test]
    fn a_reader_that_goes_away_stops_a_stage_or_lets_it_hash_to_the_end() {
        // Far more than the channels hold: a stopping stage must stop, not
        // fill memory; a draining one reads everything into its sum.
        let data = pattern(CHUNK * (DEPTH + 20));
        for drain in [Drain::Stop, Drain::ToEnd] {
            let (source, ended, sum) = std::thread::scope(|scope| {
                let (to_hash, hasher) = hasher(scope, "sha256").unwrap();
                let source = Bytes::new(data.clone(), CHUNK, None);
                let (mut reader, thread) = stage(scope, "test", source, Some(to_hash), drain).unwrap();
                let mut first = [0u8; 100];
                reader.read_exact(&mut first).unwrap();
                drop(reader);
                let (source, ended) = join(thread, "test").unwrap();
                (source, ended, join(hasher, "sha256").unwrap())
            });
            match drain {
                Drain::Stop => {
                    assert_eq!(ended, Ended::Stopped);
                    assert!(source.at < data.len(), "the stage stopped early");
                }
                Drain::ToEnd => {
                    assert_eq!(ended, Ended::End);
                    assert_eq!(source.at, data.len());
                    assert_eq!(sum, Digest::of(&data), "every byte hashed");
                }
            }
        }
    }
}
