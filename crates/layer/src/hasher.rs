//! Hashing the image's data blocks for dm-verity while the ext4 writer is
//! still writing them.
//!
//! [`HashingFile`] stands between the ext4 writer and the image file. Writes
//! pass straight through; the writer's high-water mark (everything before it
//! was written at least once) goes to a second thread, which reads those
//! blocks back from the file (the page cache) and computes their verity
//! digests. A write behind the high-water mark (the ext4 writer rewrites its
//! superblocks and descriptors at the end) marks the blocks it touches, and
//! [`HashingFile::finish`] hashes those again once everything is written. So
//! every digest is of the block's final contents, the writer's thread does
//! no hashing, and memory is the tree's lowest level (32 bytes per block).

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Blocks hashed per read.
const CHUNK_BLOCKS: u64 = 256;
/// Progress is passed on every this many bytes.
const NOTIFY_EVERY: u64 = 1 << 20;

/// The image file, hashed behind the writer.
pub(crate) struct HashingFile<'f> {
    file: &'f File,
    params: parma_verity::Params,
    block: u64,
    position: u64,
    high_water: u64,
    notified: u64,
    /// Blocks written again after they were passed to the hasher.
    rewritten: Vec<Range<u64>>,
    progress: Option<mpsc::Sender<u64>>,
    worker: Option<JoinHandle<io::Result<Vec<[u8; 32]>>>>,
}

impl<'f> HashingFile<'f> {
    /// Start hashing `file` (written from offset 0) on a second thread.
    pub(crate) fn new(file: &'f File, params: &parma_verity::Params) -> io::Result<Self> {
        let reader = file.try_clone()?;
        let (progress, updates) = mpsc::channel::<u64>();
        let worker_params = params.clone();
        let worker = std::thread::Builder::new()
            .name("verity-leaves".into())
            .spawn(move || hash_behind(&reader, &worker_params, &updates))?;
        Ok(Self {
            file,
            params: params.clone(),
            block: u64::from(params.data_block_size),
            position: 0,
            high_water: 0,
            notified: 0,
            rewritten: Vec::new(),
            progress: Some(progress),
            worker: Some(worker),
        })
    }

    /// Wait for the hasher, hash the rewritten blocks again, and return the
    /// digest of every data block of a `data_size`-byte image (blocks past
    /// the written end are zeros).
    pub(crate) fn finish(mut self, data_size: u64) -> io::Result<Vec<[u8; 32]>> {
        if let Some(progress) = self.progress.take() {
            // The end: a closed channel after this tells the worker to stop.
            let _ = progress.send(data_size);
        }
        let mut leaves = match self.worker.take().map(JoinHandle::join) {
            Some(Ok(result)) => result?,
            Some(Err(_)) => return Err(io::Error::other("the verity hashing thread panicked")),
            None => return Err(io::Error::other("the verity hashing thread is gone")),
        };
        let blocks = data_size / self.block;
        if leaves.len() as u64 != blocks {
            return Err(io::Error::other(format!("hashed {} blocks of {blocks}", leaves.len())));
        }
        let mut buffer = vec![0u8; self.block as usize];
        for range in std::mem::take(&mut self.rewritten) {
            for index in range.start..range.end.min(blocks) {
                read_block(self.file, index * self.block, &mut buffer)?;
                if let Some(leaf) = leaves.get_mut(index as usize) {
                    *leaf = parma_verity::data_block_digest(&self.params, &buffer);
                }
            }
        }
        Ok(leaves)
    }

    fn note_write(&mut self, len: u64) {
        let end = self.position.saturating_add(len);
        if self.position < self.high_water {
            let first = self.position / self.block;
            let last = end.div_ceil(self.block);
            match self.rewritten.last_mut() {
                Some(previous) if previous.end >= first && previous.start <= first => {
                    previous.end = previous.end.max(last);
                }
                _ => self.rewritten.push(first..last),
            }
        }
        self.position = end;
        self.high_water = self.high_water.max(end);
        if self.high_water - self.notified >= NOTIFY_EVERY {
            self.notified = self.high_water;
            if let Some(progress) = &self.progress {
                let _ = progress.send(self.high_water);
            }
        }
    }
}

impl Write for HashingFile<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&mut &*self.file).write(buf)?;
        self.note_write(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&mut &*self.file).flush()
    }
}

impl Seek for HashingFile<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.position = (&mut &*self.file).seek(to)?;
        Ok(self.position)
    }
}

impl Drop for HashingFile<'_> {
    fn drop(&mut self) {
        // Unfinished (an error): stop the worker without waiting for more.
        self.progress.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Read one block; past the end of the file it is zeros.
fn read_block(file: &File, offset: u64, buffer: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        let Some(rest) = buffer.get_mut(filled..) else { break };
        match file.read_at(rest, offset + filled as u64) {
            Ok(0) => {
                rest.fill(0);
                break;
            }
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// The worker: hash every whole block below the latest high-water mark, in
/// order, until the channel closes; the last value sent is the data size.
fn hash_behind(file: &File, params: &parma_verity::Params, updates: &mpsc::Receiver<u64>) -> io::Result<Vec<[u8; 32]>> {
    let block = u64::from(params.data_block_size);
    let mut leaves = Vec::new();
    let mut buffer = vec![0u8; (block * CHUNK_BLOCKS) as usize];
    let mut target = 0u64;
    while let Ok(mut mark) = updates.recv() {
        while let Ok(later) = updates.try_recv() {
            mark = later;
        }
        target = target.max(mark / block);
        while (leaves.len() as u64) < target {
            let first = leaves.len() as u64;
            let count = (target - first).min(CHUNK_BLOCKS);
            let Some(chunk) = buffer.get_mut(..(count * block) as usize) else { break };
            read_block(file, first * block, chunk)?;
            leaves.extend(chunk.chunks_exact(block as usize).map(|b| parma_verity::data_block_digest(params, b)));
        }
    }
    Ok(leaves)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes in the ext4 writer's pattern (front to back, then a few
    /// rewrites near the start, then a gap left to set_len) give the
    /// digests of the final file.
    #[test]
    fn digests_are_of_the_final_contents() {
        let params = parma_verity::Params::new(vec![7; 32], [3; 16]);
        let dir = tempfile::tempdir().unwrap();
        let file =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("img")).unwrap();
        let mut hashing = HashingFile::new(&file, &params).unwrap();
        let data: Vec<u8> = (0..(3 << 20) + 4096 * 3).map(|i: u32| (i * 31 % 251) as u8).collect();
        for piece in data.chunks(10_000) {
            hashing.write_all(piece).unwrap();
        }
        hashing.seek(SeekFrom::Start(1024)).unwrap();
        hashing.write_all(&[0xee; 100]).unwrap();
        hashing.seek(SeekFrom::Start(4096 * 300 + 5)).unwrap();
        hashing.write_all(&[0xdd; 9000]).unwrap();
        hashing.seek(SeekFrom::Start(data.len() as u64)).unwrap();
        hashing.flush().unwrap();
        let size = data.len() as u64 + 4096 * 5;
        let leaves = hashing.finish(size).unwrap();
        file.set_len(size).unwrap();
        let contents = std::fs::read(dir.path().join("img")).unwrap();
        let expected: Vec<[u8; 32]> =
            contents.chunks(4096).map(|b| parma_verity::data_block_digest(&params, b)).collect();
        assert_eq!(leaves.len(), expected.len());
        assert!(leaves == expected, "a digest differs from the file's final contents");
    }

    /// Dropping an unfinished one (an error on the way) stops and joins
    /// its worker: the drop returns within a deadline.
    #[test]
    fn dropping_an_unfinished_one_stops_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let (done, dropped) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let params = parma_verity::Params::new(vec![7; 32], [3; 16]);
            let file = File::create(&path).unwrap();
            let mut hashing = HashingFile::new(&file, &params).unwrap();
            hashing.write_all(&[1; 8192]).unwrap();
            let worker = hashing.worker.as_ref().map(|w| w.thread().id());
            drop(hashing);
            done.send(worker).unwrap();
        });
        let worker = dropped.recv_timeout(std::time::Duration::from_secs(30));
        assert!(worker.is_ok(), "dropping an unfinished HashingFile did not return within 30 s");
        assert!(worker.unwrap().is_some(), "no worker thread was started");
        writer.join().unwrap();
    }
}
