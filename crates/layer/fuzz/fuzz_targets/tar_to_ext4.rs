//! Arbitrary bytes as a layer's uncompressed tar stream: `tar_to_ext4` must
//! never panic, only return a typed `TarError`. The image goes to an
//! in-memory cursor capped at 16 MiB: a GNU sparse entry of a few hundred
//! bytes may announce gigabytes of zeros, and the writer really writes them
//! (a typed write error past the cap, not an out-of-memory abort).
//!
//! Seeds: any small layer tars, e.g. those `tests/fuzz_smoke.rs` builds.
#![no_main]

use std::io::{self, Cursor, Seek, SeekFrom, Write};

use libfuzzer_sys::fuzz_target;

const CAP: u64 = 16 << 20;

struct Bounded(Cursor<Vec<u8>>);

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.position().saturating_add(buf.len() as u64) > CAP {
            return Err(io::Error::other("image over the fuzzing cap"));
        }
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Bounded {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}

fuzz_target!(|data: &[u8]| {
    let options = parma_ext4::Options::new([1; 16], [2; 16]);
    if let Err(err) = parma_layer::tar_to_ext4(data, options, Bounded(Cursor::new(Vec::new()))) {
        // Formatting walks every message: it must not panic either.
        let _ = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            let _ = s.to_string();
            source = s.source();
        }
    }
});
