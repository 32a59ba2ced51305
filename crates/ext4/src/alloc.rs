//! Sequential block allocation.
//!
//! Blocks are handed out in increasing order, so the image is written front
//! to back. The only holes are the areas at the start of the groups that hold
//! a superblock copy (`sparse_super`): one block for the superblock plus the
//! room reserved for the group descriptor table.

use crate::Error;
use crate::ondisk::{BLOCKS_PER_GROUP, has_super};

#[derive(Debug, Clone)]
pub(crate) struct Allocator {
    /// Next block to hand out.
    next: u64,
    /// Blocks at the start of each group with a superblock copy: the copy plus
    /// the reserved descriptor table.
    reserve: u64,
    /// Blocks the image may not reach.
    limit: u64,
    /// Bytes `limit` stands for, for the error.
    max_bytes: u64,
    /// Every allocation, ascending, adjacent ones merged.
    runs: Vec<(u64, u64)>,
}

impl Allocator {
    pub(crate) fn new(reserve: u64, limit: u64, max_bytes: u64) -> Self {
        Allocator { next: reserve, reserve, limit, max_bytes, runs: Vec::new() }
    }

    /// The first block not handed out yet.
    pub(crate) fn end(&self) -> u64 {
        self.next
    }

    /// Allocated runs, ascending.
    pub(crate) fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// Move past a superblock area if `next` is inside one.
    fn skip_reserved(&mut self) {
        let group = self.next / BLOCKS_PER_GROUP;
        if has_super(group) && self.next % BLOCKS_PER_GROUP < self.reserve {
            self.next = group * BLOCKS_PER_GROUP + self.reserve;
        }
    }

    /// Contiguous free blocks from `next` (at most `want`) before the next
    /// superblock area.
    fn room(&self, want: u64) -> u64 {
        let mut group = self.next / BLOCKS_PER_GROUP + 1;
        loop {
            let end = group * BLOCKS_PER_GROUP;
            let room = end - self.next;
            if room >= want {
                return want;
            }
            if has_super(group) {
                return room;
            }
            group += 1;
        }
    }

    fn record(&mut self, start: u64, len: u64) -> Result<(), Error> {
        if start + len > self.limit {
            return Err(Error::ImageTooLarge { max: self.max_bytes });
        }
        self.next = start + len;
        match self.runs.last_mut() {
            Some((s, l)) if *s + *l == start => *l += len,
            _ => self.runs.push((start, len)),
        }
        Ok(())
    }

    /// Up to `want` (at least 1) contiguous blocks: `(start, len)`.
    pub(crate) fn take(&mut self, want: u64) -> Result<(u64, u64), Error> {
        self.skip_reserved();
        let start = self.next;
        let len = self.room(want.max(1));
        self.record(start, len)?;
        Ok((start, len))
    }

    /// Exactly `n` contiguous blocks (`n` must fit in a group after its
    /// superblock area), skipping past a superblock area if needed.
    pub(crate) fn take_contiguous(&mut self, n: u64) -> Result<u64, Error> {
        self.skip_reserved();
        if self.room(n) < n {
            self.next = (self.next / BLOCKS_PER_GROUP + 1) * BLOCKS_PER_GROUP;
            while !has_super(self.next / BLOCKS_PER_GROUP) {
                self.next += BLOCKS_PER_GROUP;
            }
            self.skip_reserved();
        }
        let start = self.next;
        self.record(start, n)?;
        Ok(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_superblock_areas() {
        let mut a = Allocator::new(5, u64::MAX, u64::MAX);
        assert_eq!(a.take(10).unwrap(), (5, 10));
        // Group 1 holds a backup: a run stops before it, the next starts after.
        assert_eq!(a.take(40000).unwrap(), (15, BLOCKS_PER_GROUP - 15));
        assert_eq!(a.take(40000).unwrap(), (BLOCKS_PER_GROUP + 5, 40000));
        // Group 2 has no backup: the run above crossed into it.
        assert_eq!(a.runs(), [(5, BLOCKS_PER_GROUP - 5), (BLOCKS_PER_GROUP + 5, 40000)]);
    }

    #[test]
    fn contiguous_runs_jump_over_a_backup() {
        let mut a = Allocator::new(2, u64::MAX, u64::MAX);
        a.take(BLOCKS_PER_GROUP - 10).unwrap();
        let start = a.take_contiguous(100).unwrap();
        assert_eq!(start, BLOCKS_PER_GROUP + 2);
    }

    #[test]
    fn refuses_past_the_limit() {
        let mut a = Allocator::new(2, 100, 4096 * 100);
        assert!(a.take(50).is_ok());
        assert!(matches!(a.take(60), Err(Error::ImageTooLarge { .. })));
    }
}
