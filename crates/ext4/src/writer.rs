//! The image writer: entries in, an ext4 image out.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromZeros, IntoBytes};

use crate::alloc::Allocator;
use crate::csum::Csum;
use crate::extent::{self, Extent};
use crate::ondisk::*;
use crate::xattr::{self, Encoded, Refusal, Xattr};
use crate::{Error, dir};

/// A point in time as ext4 stores it: seconds since the epoch (1901-12-13 to
/// 2446-05-10) and nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    pub seconds: i64,
    pub nanoseconds: u32,
}

impl Timestamp {
    pub fn new(seconds: i64, nanoseconds: u32) -> Self {
        Timestamp { seconds, nanoseconds }
    }

    /// `(i_xtime, i_xtime_extra)`: the low 32 bits of the seconds, and the
    /// nanoseconds shifted left by 2 over two epoch bits extending the
    /// seconds to 34 bits.
    fn encode(self) -> Option<(u32, u32)> {
        let low = i64::from(i32::MIN);
        let high = i64::from(i32::MAX) + (3 << 32);
        if self.nanoseconds >= 1_000_000_000 || self.seconds < low || self.seconds > high {
            return None;
        }
        let epoch = ((self.seconds - i64::from(self.seconds as i32)) >> 32) & 3;
        Some((self.seconds as u32, (self.nanoseconds << 2) | epoch as u32))
    }
}

/// What every inode carries. The creation time (`i_crtime`) is set to
/// `ctime`; inode generations are 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Permission bits only (`0o7777`: rwx, setuid, setgid, sticky); the
    /// file type comes from the kind of entry.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub xattrs: Vec<Xattr>,
}

impl Metadata {
    /// `mode`, owned by `uid:gid`, all timestamps zero, no xattrs.
    pub fn new(mode: u32, uid: u32, gid: u32) -> Self {
        Metadata { mode, uid, gid, ..Metadata::default() }
    }
}

/// Inodes without data. An overlayfs whiteout is a character device 0:0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Special {
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
    Socket,
}

/// Image-wide choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Filesystem UUID; also seeds every metadata checksum.
    pub uuid: [u8; 16],
    /// Directory hash seed (`s_hash_seed`).
    pub hash_seed: [u8; 16],
    /// The largest image this writer may produce, rounded up to 16 GiB
    /// steps: room for its group descriptor table (4 KiB per 16 GiB) is
    /// reserved at the start of the image and of every group holding a
    /// superblock copy. At most 16 TiB.
    pub max_image_size: u64,
}

impl Options {
    /// The default [`Options::max_image_size`]: 64 GiB.
    pub const DEFAULT_MAX_IMAGE_SIZE: u64 = 64 << 30;

    pub fn new(uuid: [u8; 16], hash_seed: [u8; 16]) -> Self {
        Options { uuid, hash_seed, max_image_size: Self::DEFAULT_MAX_IMAGE_SIZE }
    }
}

/// Largest regular file: 2^28 blocks, so `i_blocks` (512-byte units) fits in
/// 32 bits with room for the extent tree without `huge_file`.
const MAX_FILE_SIZE: u64 = 1 << 40;
/// Longest symlink target (`PATH_MAX` less the NUL).
const MAX_SYMLINK: usize = 4095;
/// Targets shorter than `i_block` live in it (a fast symlink).
const FAST_SYMLINK_MAX: usize = 59;
/// Read buffer for file data.
const COPY_BUFFER: usize = 256 * 1024;

/// Per-inode fields, checked and encoded.
#[derive(Debug, Clone)]
struct Attrs {
    perm: u16,
    uid: u32,
    gid: u32,
    atime: (u32, u32),
    mtime: (u32, u32),
    ctime: (u32, u32),
    xattrs: Vec<Encoded>,
}

#[derive(Debug)]
enum Link {
    Fast(Box<[u8]>),
    Slow { len: u64, extent: Extent },
}

#[derive(Debug)]
enum Kind {
    File { size: u64, extents: Vec<Extent> },
    Dir { parent: u32, children: BTreeMap<Box<[u8]>, u32>, subdirs: u32 },
    Symlink(Link),
    Special(Special),
}

impl Kind {
    /// `(i_mode type bits, directory entry file type)`.
    fn types(&self) -> (u16, u8) {
        match self {
            Kind::File { .. } => (S_IFREG, FT_REG_FILE),
            Kind::Dir { .. } => (S_IFDIR, FT_DIR),
            Kind::Symlink(_) => (S_IFLNK, FT_SYMLINK),
            Kind::Special(Special::CharDevice { .. }) => (S_IFCHR, FT_CHRDEV),
            Kind::Special(Special::BlockDevice { .. }) => (S_IFBLK, FT_BLKDEV),
            Kind::Special(Special::Fifo) => (S_IFIFO, FT_FIFO),
            Kind::Special(Special::Socket) => (S_IFSOCK, FT_SOCK),
        }
    }
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    attrs: Attrs,
    /// Hard links (non-directories; directories count at finish).
    links: u32,
}

/// Where an inode's blocks ended up, decided at finish.
#[derive(Debug)]
struct Placed {
    block: [u8; 60],
    flags: u32,
    size: u64,
    /// Blocks owned (data, extent tree, xattr block).
    blocks: u64,
    xattr_block: u32,
}

/// Nodes are stored by slot: the root in slot 0, inode 11 onwards after it.
fn slot(ino: u32) -> Option<usize> {
    match ino {
        ROOT_INO => Some(0),
        i if i >= FIRST_INO => usize::try_from(i - FIRST_INO + 1).ok(),
        _ => None,
    }
}

fn ino_at(slot: usize) -> Result<u32, Error> {
    if slot == 0 {
        return Ok(ROOT_INO);
    }
    u32::try_from(slot).ok().and_then(|s| s.checked_add(FIRST_INO - 1)).ok_or(Error::TooManyInodes)
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// The names of a path; empty for the root.
fn components(path: &[u8]) -> Result<Vec<&[u8]>, Error> {
    let rel = path.strip_prefix(b"/").unwrap_or(path);
    if rel.is_empty() {
        return Ok(Vec::new());
    }
    let invalid = |reason| Error::InvalidPath { path: show(path), reason };
    rel.split(|&b| b == b'/')
        .map(|name| match name {
            b"" => Err(invalid("empty name (doubled or trailing '/')")),
            b"." | b".." => Err(invalid("'.' and '..' are not entries")),
            _ if name.contains(&0) => Err(invalid("name contains NUL")),
            _ if name.len() > NAME_MAX => Err(Error::NameTooLong { path: show(path) }),
            _ => Ok(name),
        })
        .collect()
}

/// The output and how far it has been written (always whole blocks, front
/// to back, until the final superblock and descriptor writes).
struct Sink<W> {
    out: W,
    written: u64,
}

impl<W: Write + Seek> Sink<W> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.out.write_all(bytes).map_err(Error::Write)
    }

    /// Zeros up to block `block`.
    fn zero_to(&mut self, block: u64) -> Result<(), Error> {
        if block < self.written {
            return Err(Error::Internal("write behind the stream position"));
        }
        let zeros = [0u8; BLOCK_SIZE];
        while self.written < block {
            self.write(&zeros)?;
            self.written += 1;
        }
        Ok(())
    }

    /// `data` at block `block`, padded with zeros to whole blocks.
    fn put(&mut self, block: u64, data: &[u8]) -> Result<(), Error> {
        self.zero_to(block)?;
        self.write(data)?;
        self.pad(data.len())?;
        self.written += (data.len() as u64).div_ceil(BLOCK);
        Ok(())
    }

    /// Zeros from `len` bytes into a block to its end.
    fn pad(&mut self, len: usize) -> Result<(), Error> {
        let zeros = [0u8; BLOCK_SIZE];
        match len % BLOCK_SIZE {
            0 => Ok(()),
            tail => self.write(zeros.get(tail..).unwrap_or_default()),
        }
    }

    /// `data` at an absolute byte offset, already written over.
    fn overwrite(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.out.seek(SeekFrom::Start(offset)).map_err(Error::Write)?;
        self.write(data)
    }
}

/// Writes an ext4 image to `W`, starting at offset 0. File data goes out as
/// it is added; everything else at [`Writer::finish`]. Every byte of the
/// image is written (gaps as zeros), so `W` need not start empty, but
/// nothing past the image's end is truncated.
///
/// After an error while file data was being written, or an I/O error, the
/// writer refuses further use ([`Error::Poisoned`]); errors found before
/// anything was written (bad names, missing parents, ...) leave it usable.
pub struct Writer<W: Write + Seek> {
    sink: Sink<W>,
    options: Options,
    alloc: Allocator,
    /// Group descriptor blocks reserved after the superblock.
    gdt_reserve: u64,
    /// Inodes by slot (see [`slot`]).
    nodes: Vec<Node>,
    buf: Vec<u8>,
    poisoned: bool,
}

impl<W: Write + Seek> std::fmt::Debug for Writer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("options", &self.options)
            .field("inodes", &self.nodes.len())
            .field("blocks", &self.alloc.end())
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl<W: Write + Seek> Writer<W> {
    /// Start an image with an empty root directory (mode 0755, owned by
    /// 0:0, timestamps 0; see [`Writer::set_metadata`]).
    pub fn new(out: W, options: Options) -> Result<Self, Error> {
        let group_bytes = BLOCKS_PER_GROUP * BLOCK;
        let max_groups = options.max_image_size.div_ceil(group_bytes).clamp(1, (1 << 32) / BLOCKS_PER_GROUP);
        let gdt_reserve = max_groups.div_ceil(DESCS_PER_BLOCK);
        let limit = (gdt_reserve * DESCS_PER_BLOCK * BLOCKS_PER_GROUP).min(u64::from(u32::MAX));
        let mut sink = Sink { out, written: 0 };
        sink.out.seek(SeekFrom::Start(0)).map_err(Error::Write)?;
        // The superblock and the descriptor table: written at finish.
        sink.zero_to(1 + gdt_reserve)?;
        let root = Node {
            kind: Kind::Dir { parent: ROOT_INO, children: BTreeMap::new(), subdirs: 0 },
            attrs: Attrs {
                perm: 0o755,
                uid: 0,
                gid: 0,
                atime: (0, 0),
                mtime: (0, 0),
                ctime: (0, 0),
                xattrs: Vec::new(),
            },
            links: 1,
        };
        Ok(Writer {
            sink,
            options,
            alloc: Allocator::new(1 + gdt_reserve, limit, limit * BLOCK),
            gdt_reserve,
            nodes: vec![root],
            buf: Vec::new(),
            poisoned: false,
        })
    }

    fn check(&self) -> Result<(), Error> {
        if self.poisoned { Err(Error::Poisoned) } else { Ok(()) }
    }

    fn node(&self, ino: u32) -> Option<&Node> {
        slot(ino).and_then(|s| self.nodes.get(s))
    }

    /// The inode a path names.
    fn resolve(&self, names: &[&[u8]]) -> Option<u32> {
        let mut ino = ROOT_INO;
        for name in names {
            match &self.node(ino)?.kind {
                Kind::Dir { children, .. } => ino = *children.get(*name)?,
                _ => return None,
            }
        }
        Some(ino)
    }

    /// The directory a new entry goes in, and its name; checks that the name
    /// is free.
    fn parent_of<'p>(&self, path: &'p [u8]) -> Result<(u32, &'p [u8]), Error> {
        let names = components(path)?;
        let Some((name, parents)) = names.split_last() else {
            return Err(Error::AlreadyExists { path: show(path) });
        };
        let mut ino = ROOT_INO;
        for parent in parents {
            let Some(Kind::Dir { children, .. }) = self.node(ino).map(|n| &n.kind) else {
                return Err(Error::ParentNotDirectory { path: show(path) });
            };
            ino = *children.get(*parent).ok_or_else(|| Error::ParentNotFound { path: show(path) })?;
        }
        match self.node(ino).map(|n| &n.kind) {
            Some(Kind::Dir { children, .. }) if children.contains_key(*name) => {
                Err(Error::AlreadyExists { path: show(path) })
            }
            Some(Kind::Dir { .. }) => Ok((ino, name)),
            _ => Err(Error::ParentNotDirectory { path: show(path) }),
        }
    }

    fn attrs(path: &[u8], meta: &Metadata) -> Result<Attrs, Error> {
        let perm = u16::try_from(meta.mode)
            .ok()
            .filter(|m| m & !0o7777 == 0)
            .ok_or_else(|| Error::InvalidMode { path: show(path), mode: meta.mode })?;
        let time = |t: Timestamp| t.encode().ok_or_else(|| Error::InvalidTimestamp { path: show(path) });
        let xattrs = xattr::encode_all(&meta.xattrs).map_err(|refusal| match refusal {
            Refusal::Invalid(name, reason) => Error::InvalidXattr { path: show(path), name: show(&name), reason },
            Refusal::TooLarge => Error::XattrsTooLarge { path: show(path) },
        })?;
        Ok(Attrs {
            perm,
            uid: meta.uid,
            gid: meta.gid,
            atime: time(meta.atime)?,
            mtime: time(meta.mtime)?,
            ctime: time(meta.ctime)?,
            xattrs,
        })
    }

    fn insert(&mut self, parent: u32, name: &[u8], kind: Kind, attrs: Attrs) -> Result<(), Error> {
        let ino = ino_at(self.nodes.len())?;
        let is_dir = matches!(kind, Kind::Dir { .. });
        let dir = slot(parent).and_then(|s| self.nodes.get_mut(s)).map(|n| &mut n.kind);
        let Some(Kind::Dir { children, subdirs, .. }) = dir else {
            return Err(Error::Internal("parent vanished"));
        };
        children.insert(name.into(), ino);
        if is_dir {
            *subdirs += 1;
        }
        self.nodes.push(Node { kind, attrs, links: 1 });
        Ok(())
    }

    /// Add an empty directory.
    pub fn add_dir(&mut self, path: impl AsRef<[u8]>, meta: &Metadata) -> Result<(), Error> {
        self.check()?;
        let path = path.as_ref();
        let attrs = Self::attrs(path, meta)?;
        let (parent, name) = self.parent_of(path)?;
        let kind = Kind::Dir { parent, children: BTreeMap::new(), subdirs: 0 };
        self.insert(parent, name, kind, attrs)
    }

    /// Add a regular file of exactly `size` bytes read from `data`, copied to
    /// the image as it is read (never buffered whole). Fewer bytes is an
    /// error ([`Error::ShortRead`]); bytes past `size` are not read.
    pub fn add_file(
        &mut self,
        path: impl AsRef<[u8]>,
        meta: &Metadata,
        size: u64,
        data: impl Read,
    ) -> Result<(), Error> {
        self.check()?;
        let path = path.as_ref();
        let attrs = Self::attrs(path, meta)?;
        let (parent, name) = self.parent_of(path)?;
        if size > MAX_FILE_SIZE {
            return Err(Error::FileTooLarge { path: show(path), size });
        }
        self.poisoned = true;
        let extents = self.stream(path, size, data)?;
        self.poisoned = false;
        self.insert(parent, name, Kind::File { size, extents }, attrs)
    }

    /// Copy `size` bytes into freshly allocated blocks.
    fn stream(&mut self, path: &[u8], size: u64, mut data: impl Read) -> Result<Vec<Extent>, Error> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; COPY_BUFFER];
        }
        let mut extents = Vec::new();
        let mut done = 0u64;
        while done < size {
            let logical = u32::try_from(done / BLOCK).map_err(|_| Error::FileTooLarge { path: show(path), size })?;
            let want = (size - done).div_ceil(BLOCK).min(MAX_EXTENT_LEN);
            let (start, len) = self.alloc.take(want)?;
            self.sink.zero_to(start)?;
            let chunk_end = (done + len * BLOCK).min(size);
            while done < chunk_end {
                let n = usize::try_from(chunk_end - done).unwrap_or(usize::MAX).min(self.buf.len());
                let buf = self.buf.get_mut(..n).ok_or(Error::Internal("copy buffer"))?;
                let got = match data.read(buf) {
                    Ok(0) => return Err(Error::ShortRead { path: show(path), read: done, expected: size }),
                    Ok(got) => got,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(source) => return Err(Error::Read { path: show(path), source }),
                };
                let bytes = buf.get(..got).ok_or(Error::Internal("reader overran its buffer"))?;
                self.sink.write(bytes)?;
                done += got as u64;
            }
            self.sink.pad((done % BLOCK) as usize)?;
            self.sink.written = start + len;
            extents.push(Extent {
                logical,
                start: u32::try_from(start).map_err(|_| Error::Internal("block number over 32 bits"))?,
                len: u16::try_from(len).map_err(|_| Error::Internal("extent over 32768 blocks"))?,
            });
        }
        Ok(extents)
    }

    /// Add a symbolic link to `target` (1 to 4095 bytes, no NUL).
    pub fn add_symlink(&mut self, path: impl AsRef<[u8]>, meta: &Metadata, target: &[u8]) -> Result<(), Error> {
        self.check()?;
        let path = path.as_ref();
        let attrs = Self::attrs(path, meta)?;
        let (parent, name) = self.parent_of(path)?;
        let invalid = |reason| Error::InvalidSymlink { path: show(path), reason };
        if target.is_empty() {
            return Err(invalid("is empty"));
        }
        if target.len() > MAX_SYMLINK {
            return Err(invalid("is longer than 4095 bytes"));
        }
        if target.contains(&0) {
            return Err(invalid("contains NUL"));
        }
        let link = if target.len() <= FAST_SYMLINK_MAX {
            Link::Fast(target.into())
        } else {
            self.poisoned = true;
            let (start, _) = self.alloc.take(1)?;
            self.sink.put(start, target)?;
            self.poisoned = false;
            let start = u32::try_from(start).map_err(|_| Error::Internal("block number over 32 bits"))?;
            Link::Slow { len: target.len() as u64, extent: Extent { logical: 0, start, len: 1 } }
        };
        self.insert(parent, name, Kind::Symlink(link), attrs)
    }

    /// Add a hard link at `path` to the inode `target` (an earlier,
    /// non-directory path) names.
    pub fn add_hard_link(&mut self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Result<(), Error> {
        self.check()?;
        let (path, target) = (path.as_ref(), target.as_ref());
        let (parent, name) = self.parent_of(path)?;
        let not_found = || Error::LinkTargetNotFound { path: show(path), target: show(target) };
        let ino = components(target).ok().and_then(|names| self.resolve(&names)).ok_or_else(not_found)?;
        let node = slot(ino).and_then(|s| self.nodes.get_mut(s)).ok_or_else(not_found)?;
        if matches!(node.kind, Kind::Dir { .. }) {
            return Err(Error::LinkToDirectory { path: show(path), target: show(target) });
        }
        if node.links >= LINK_MAX {
            return Err(Error::TooManyLinks { path: show(path) });
        }
        node.links += 1;
        let dir = slot(parent).and_then(|s| self.nodes.get_mut(s)).map(|n| &mut n.kind);
        let Some(Kind::Dir { children, .. }) = dir else {
            return Err(Error::Internal("parent vanished"));
        };
        children.insert(name.into(), ino);
        Ok(())
    }

    /// Add a device, fifo or socket.
    pub fn add_special(&mut self, path: impl AsRef<[u8]>, meta: &Metadata, special: Special) -> Result<(), Error> {
        self.check()?;
        let path = path.as_ref();
        let attrs = Self::attrs(path, meta)?;
        if let Special::CharDevice { major, minor } | Special::BlockDevice { major, minor } = special
            && (major >= 1 << 12 || minor >= 1 << 20)
        {
            return Err(Error::InvalidDevice { path: show(path), major, minor });
        }
        let (parent, name) = self.parent_of(path)?;
        self.insert(parent, name, Kind::Special(special), attrs)
    }

    /// Replace the mode, owner, timestamps and xattrs of an existing entry
    /// (the root too: `/`). For a hard-linked inode this changes every link.
    pub fn set_metadata(&mut self, path: impl AsRef<[u8]>, meta: &Metadata) -> Result<(), Error> {
        self.check()?;
        let path = path.as_ref();
        let attrs = Self::attrs(path, meta)?;
        let ino = self.resolve(&components(path)?).ok_or_else(|| Error::NotFound { path: show(path) })?;
        let node = slot(ino).and_then(|s| self.nodes.get_mut(s)).ok_or(Error::Internal("inode vanished"))?;
        node.attrs = attrs;
        Ok(())
    }

    /// Write the metadata and return the image size in bytes (a multiple of
    /// 4096; the image spans `[0, size)` of the output).
    pub fn finish(self) -> Result<u64, Error> {
        self.check()?;
        let Writer { mut sink, options, mut alloc, gdt_reserve, nodes, .. } = self;
        let csum = Csum::new(&options.uuid);

        // Directories, extent index blocks and xattr blocks, in inode order.
        let mut placed = Vec::with_capacity(nodes.len());
        for (s, node) in nodes.iter().enumerate() {
            let ino = ino_at(s)?;
            placed.push(place(&nodes, node, ino, &csum, &mut alloc, &mut sink)?);
        }

        // Group count, inodes per group, and where bitmaps and tables go.
        let max_ino = ino_at(nodes.len() - 1)?.max(FIRST_INO - 1);
        let plan = plan_groups(&alloc, max_ino, gdt_reserve)?;
        let Plan { groups, ipg, blocks_count, alloc, block_bitmaps, inode_bitmaps, inode_tables } = plan;
        let gdt_blocks = groups.div_ceil(DESCS_PER_BLOCK);

        let mut descs = Vec::with_capacity(usize::try_from(groups).unwrap_or(0));
        let mut free_blocks = 0u64;
        let mut free_inodes = 0u64;
        let mut runs = alloc.runs().iter().peekable();
        let mut block_bitmap_data = Vec::new();
        let mut inode_bitmap_data = Vec::new();
        for g in 0..groups {
            let mut desc = GroupDesc::new_zeroed();
            // Block bitmap: superblock copy and descriptors, then every run.
            let start = g * BLOCKS_PER_GROUP;
            let end = (start + BLOCKS_PER_GROUP).min(blocks_count);
            let mut bitmap = vec![0u8; BLOCK_SIZE];
            if has_super(g) {
                mark(&mut bitmap, 0, 1 + gdt_blocks);
            }
            while let Some(&&(run_start, run_len)) = runs.peek() {
                let run_end = run_start + run_len;
                if run_start >= end {
                    break;
                }
                mark(&mut bitmap, run_start.max(start) - start, run_end.min(end) - start);
                if run_end > end {
                    break;
                }
                runs.next();
            }
            let used: u64 = bitmap.iter().map(|b| u64::from(b.count_ones())).sum();
            mark(&mut bitmap, end - start, BLOCKS_PER_GROUP);
            let free = (end - start) - used;
            free_blocks += free;
            desc.free_blocks_count = U16::new(u16::try_from(free).map_err(|_| Error::Internal("free blocks"))?);
            desc.block_bitmap_csum = U16::new((csum.bitmap(&bitmap) & 0xFFFF) as u16);
            block_bitmap_data.push(bitmap);

            // Inode bitmap: inodes are used from the first on, without gaps.
            let first = g * u64::from(ipg);
            let used_inodes = (u64::from(max_ino).saturating_sub(first)).min(u64::from(ipg));
            let mut bitmap = vec![0u8; BLOCK_SIZE];
            mark(&mut bitmap, 0, used_inodes);
            mark(&mut bitmap, u64::from(ipg), u64::from(MAX_INODES_PER_GROUP));
            let ipg_bytes = (ipg / 8) as usize;
            let checked = bitmap.get(..ipg_bytes).ok_or(Error::Internal("inode bitmap"))?;
            desc.inode_bitmap_csum = U16::new((csum.bitmap(checked) & 0xFFFF) as u16);
            inode_bitmap_data.push(bitmap);
            let unused = u64::from(ipg) - used_inodes;
            free_inodes += unused;
            desc.free_inodes_count = U16::new(unused as u16);
            desc.itable_unused = U16::new(unused as u16);

            let dirs = (first..first + used_inodes)
                .filter(|i| {
                    u32::try_from(i + 1)
                        .ok()
                        .and_then(slot)
                        .and_then(|s| nodes.get(s))
                        .is_some_and(|n| matches!(n.kind, Kind::Dir { .. }))
                })
                .count();
            desc.used_dirs_count = U16::new(dirs as u16);
            desc.flags = U16::new(BG_INODE_ZEROED);
            let at = |v: &[u64]| v.get(g as usize).copied().and_then(|b| u32::try_from(b).ok());
            desc.block_bitmap = U32::new(at(&block_bitmaps).ok_or(Error::Internal("block bitmap"))?);
            desc.inode_bitmap = U32::new(at(&inode_bitmaps).ok_or(Error::Internal("inode bitmap"))?);
            desc.inode_table = U32::new(at(&inode_tables).ok_or(Error::Internal("inode table"))?);
            let group = u32::try_from(g).map_err(|_| Error::Internal("group number"))?;
            desc.checksum = U16::new(csum.group_desc(group, desc.as_bytes()));
            descs.push(desc);
        }

        // Bitmaps and inode tables, in the order they were allocated.
        for (at, data) in block_bitmaps.iter().zip(&block_bitmap_data) {
            sink.put(*at, data)?;
        }
        for (at, data) in inode_bitmaps.iter().zip(&inode_bitmap_data) {
            sink.put(*at, data)?;
        }
        for (g, at) in inode_tables.iter().enumerate() {
            let mut table = Vec::with_capacity(ipg as usize * INODE_SIZE);
            for i in 0..ipg {
                let ino = u32::try_from(g)
                    .ok()
                    .and_then(|g| g.checked_mul(ipg))
                    .and_then(|base| base.checked_add(i + 1))
                    .ok_or(Error::TooManyInodes)?;
                match slot(ino).and_then(|s| Some((nodes.get(s)?, placed.get(s)?))) {
                    Some((node, placed)) => table.extend_from_slice(&inode_bytes(ino, node, placed, &csum)?),
                    None => table.extend_from_slice(&[0u8; INODE_SIZE]),
                }
            }
            sink.put(*at, &table)?;
        }
        sink.zero_to(blocks_count)?;

        // Superblock and descriptors: at the start and in each backup group.
        let mut gdt: Vec<u8> = descs.iter().flat_map(|d| d.as_bytes().iter().copied()).collect();
        gdt.resize(usize::try_from(gdt_blocks).unwrap_or(0) * BLOCK_SIZE, 0);
        let sb_fields = SbFields { groups, ipg, blocks_count, free_blocks, free_inodes };
        for g in (0..groups).filter(|&g| has_super(g)) {
            let sb = superblock(&options, &sb_fields, g)?;
            let block = g * BLOCKS_PER_GROUP;
            let sb_at = if g == 0 { SUPERBLOCK_OFFSET as u64 } else { block * BLOCK };
            sink.overwrite(sb_at, sb.as_bytes())?;
            sink.overwrite((block + 1) * BLOCK, &gdt)?;
        }
        sink.out.seek(SeekFrom::Start(blocks_count * BLOCK)).map_err(Error::Write)?;
        sink.out.flush().map_err(Error::Write)?;
        Ok(blocks_count * BLOCK)
    }
}

/// Set bits `[from, to)` of a bitmap.
fn mark(bitmap: &mut [u8], from: u64, to: u64) {
    for bit in from..to {
        if let Some(byte) = bitmap.get_mut((bit / 8) as usize) {
            *byte |= 1 << (bit % 8);
        }
    }
}

/// Lay out one inode's remaining blocks: a directory's blocks, extent index
/// blocks, an xattr block.
fn place<W: Write + Seek>(
    nodes: &[Node],
    node: &Node,
    ino: u32,
    csum: &Csum,
    alloc: &mut Allocator,
    sink: &mut Sink<W>,
) -> Result<Placed, Error> {
    let seed = csum.inode_seed(ino, 0);
    let mut placed = Placed { block: [0; 60], flags: 0, size: 0, blocks: 0, xattr_block: 0 };
    let mut dir_extents = Vec::new();
    let extents: Option<&[Extent]> = match &node.kind {
        Kind::File { size, extents } => {
            placed.size = *size;
            Some(extents)
        }
        Kind::Dir { parent, children, .. } => {
            let file_type = |child: u32| slot(child).and_then(|s| nodes.get(s)).map_or(0, |n| n.kind.types().1);
            let entries = [(&b"."[..], ino), (b"..", *parent)]
                .into_iter()
                .chain(children.iter().map(|(name, &child)| (&**name, child)))
                .map(|(name, ino)| dir::Entry { ino, file_type: file_type(ino), name });
            let data = dir::blocks(entries, seed).ok_or(Error::Internal("directory entry"))?;
            let count = data.len() as u64 / BLOCK;
            let mut done = 0u64;
            while done < count {
                let (start, len) = alloc.take((count - done).min(MAX_EXTENT_LEN))?;
                let from = usize::try_from(done * BLOCK).map_err(|_| Error::Internal("directory size"))?;
                let to = usize::try_from((done + len) * BLOCK).map_err(|_| Error::Internal("directory size"))?;
                sink.put(start, data.get(from..to).ok_or(Error::Internal("directory blocks"))?)?;
                dir_extents.push(Extent {
                    logical: u32::try_from(done).map_err(|_| Error::Internal("directory size"))?,
                    start: u32::try_from(start).map_err(|_| Error::Internal("block number over 32 bits"))?,
                    len: u16::try_from(len).map_err(|_| Error::Internal("extent over 32768 blocks"))?,
                });
                done += len;
            }
            placed.size = count * BLOCK;
            Some(&dir_extents)
        }
        Kind::Symlink(Link::Fast(target)) => {
            placed.size = target.len() as u64;
            placed.block.get_mut(..target.len()).ok_or(Error::Internal("fast symlink"))?.copy_from_slice(target);
            None
        }
        Kind::Symlink(Link::Slow { len, extent }) => {
            placed.size = *len;
            Some(std::slice::from_ref(extent))
        }
        Kind::Special(Special::CharDevice { major, minor } | Special::BlockDevice { major, minor }) => {
            // Old encoding when both fit in 8 bits, else the new one in the
            // second word (as the kernel's ext4_write_inode does).
            let (word, value) = if *major < 256 && *minor < 256 {
                (0, (major << 8) | minor)
            } else {
                (4, (minor & 0xFF) | (major << 8) | ((minor & !0xFF) << 12))
            };
            placed
                .block
                .get_mut(word..word + 4)
                .ok_or(Error::Internal("device"))?
                .copy_from_slice(&value.to_le_bytes());
            None
        }
        Kind::Special(Special::Fifo | Special::Socket) => None,
    };
    if let Some(extents) = extents {
        let tree = extent::build(extents, alloc, seed)?;
        for (at, data) in &tree.blocks {
            sink.put(*at, data)?;
        }
        placed.block = tree.root;
        placed.flags = EXTENTS_FL;
        placed.blocks = extents.iter().map(|e| u64::from(e.len)).sum::<u64>() + tree.blocks.len() as u64;
    }
    if !xattr::fits_inline(&node.attrs.xattrs) {
        let (at, _) = alloc.take(1)?;
        let data = xattr::block(&node.attrs.xattrs, at, csum).ok_or(Error::Internal("xattr block"))?;
        sink.put(at, &data)?;
        placed.xattr_block = u32::try_from(at).map_err(|_| Error::Internal("block number over 32 bits"))?;
        placed.blocks += 1;
    }
    Ok(placed)
}

/// Where the per-group metadata goes.
struct Plan {
    groups: u64,
    ipg: u32,
    blocks_count: u64,
    /// The allocator after placing it all.
    alloc: Allocator,
    block_bitmaps: Vec<u64>,
    inode_bitmaps: Vec<u64>,
    inode_tables: Vec<u64>,
}

/// Place bitmaps and inode tables after everything else. The group count
/// depends on where they end, so iterate until it is stable.
fn plan_groups(base: &Allocator, max_ino: u32, gdt_reserve: u64) -> Result<Plan, Error> {
    let max_groups = gdt_reserve * DESCS_PER_BLOCK;
    let inode_groups = u64::from(max_ino).div_ceil(u64::from(MAX_INODES_PER_GROUP));
    let mut groups = base.end().div_ceil(BLOCKS_PER_GROUP).max(inode_groups).max(1);
    loop {
        if groups > max_groups {
            return Err(Error::ImageTooLarge { max: max_groups * BLOCKS_PER_GROUP * BLOCK });
        }
        let per_group = u64::from(max_ino).div_ceil(groups);
        let ipg = u32::try_from(per_group.div_ceil(u64::from(INODES_PER_BLOCK)) * u64::from(INODES_PER_BLOCK))
            .map_err(|_| Error::TooManyInodes)?
            .max(INODES_PER_BLOCK);
        let table_blocks = u64::from(ipg / INODES_PER_BLOCK);
        let mut alloc = base.clone();
        let mut one = || alloc.take(1).map(|(at, _)| at);
        let block_bitmaps = (0..groups).map(|_| one()).collect::<Result<Vec<_>, _>>()?;
        let inode_bitmaps = (0..groups).map(|_| one()).collect::<Result<Vec<_>, _>>()?;
        let inode_tables = (0..groups).map(|_| alloc.take_contiguous(table_blocks)).collect::<Result<Vec<_>, _>>()?;
        let end = alloc.end();
        let needed = end.div_ceil(BLOCKS_PER_GROUP).max(inode_groups);
        if needed <= groups {
            // Groups added for inodes alone still need their superblock area.
            let last = (groups - 1) * BLOCKS_PER_GROUP;
            let last_min = if has_super(groups - 1) { 1 + groups.div_ceil(DESCS_PER_BLOCK) } else { 1 };
            let blocks_count = end.max(last + last_min);
            return Ok(Plan { groups, ipg, blocks_count, alloc, block_bitmaps, inode_bitmaps, inode_tables });
        }
        groups = needed;
    }
}

/// Counts that go in every superblock copy.
struct SbFields {
    groups: u64,
    ipg: u32,
    blocks_count: u64,
    free_blocks: u64,
    free_inodes: u64,
}

fn superblock(options: &Options, f: &SbFields, group: u64) -> Result<Superblock, Error> {
    let too_large = || Error::ImageTooLarge { max: u64::from(u32::MAX) * BLOCK };
    let mut sb = Superblock::new_zeroed();
    let inodes = u32::try_from(f.groups * u64::from(f.ipg)).map_err(|_| Error::TooManyInodes)?;
    sb.inodes_count = U32::new(inodes);
    sb.blocks_count_lo = U32::new(u32::try_from(f.blocks_count).map_err(|_| too_large())?);
    sb.free_blocks_count_lo = U32::new(u32::try_from(f.free_blocks).map_err(|_| too_large())?);
    sb.free_inodes_count = U32::new(u32::try_from(f.free_inodes).map_err(|_| Error::TooManyInodes)?);
    sb.log_block_size = U32::new(LOG_BLOCK_SIZE);
    sb.log_cluster_size = U32::new(LOG_BLOCK_SIZE);
    sb.blocks_per_group = U32::new(BLOCKS_PER_GROUP as u32);
    sb.clusters_per_group = U32::new(BLOCKS_PER_GROUP as u32);
    sb.inodes_per_group = U32::new(f.ipg);
    sb.max_mnt_count = U16::new(0xFFFF);
    sb.magic = U16::new(SUPER_MAGIC);
    sb.state = U16::new(1); // cleanly unmounted
    sb.errors = U16::new(1); // continue
    sb.rev_level = U32::new(1); // dynamic inode sizes
    sb.first_ino = U32::new(FIRST_INO);
    sb.inode_size = U16::new(INODE_SIZE as u16);
    sb.block_group_nr = U16::new(u16::try_from(group).unwrap_or(u16::MAX));
    sb.feature_compat = U32::new(COMPAT_EXT_ATTR);
    sb.feature_incompat = U32::new(INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG);
    sb.feature_ro_compat = U32::new(
        RO_COMPAT_SPARSE_SUPER
            | RO_COMPAT_LARGE_FILE
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE
            | RO_COMPAT_METADATA_CSUM,
    );
    sb.uuid = options.uuid;
    sb.hash_seed = options.hash_seed;
    sb.def_hash_version = 1; // half_md4, should dir_index ever be enabled
    sb.min_extra_isize = U16::new(EXTRA_ISIZE);
    sb.want_extra_isize = U16::new(EXTRA_ISIZE);
    sb.flags = U32::new(2); // unsigned directory hash
    sb.log_groups_per_flex = 4;
    sb.checksum_type = 1; // crc32c
    let len = core::mem::offset_of!(Superblock, checksum);
    let bytes = sb.as_bytes().get(..len).ok_or(Error::Internal("superblock"))?;
    sb.checksum = U32::new(Csum::superblock(bytes));
    Ok(sb)
}

/// The 256 bytes of inode `ino`.
fn inode_bytes(ino: u32, node: &Node, placed: &Placed, csum: &Csum) -> Result<[u8; INODE_SIZE], Error> {
    let a = &node.attrs;
    let mut inode = Inode::new_zeroed();
    let (type_bits, _) = node.kind.types();
    inode.mode = U16::new(type_bits | a.perm);
    inode.uid = U16::new(a.uid as u16);
    inode.uid_high = U16::new((a.uid >> 16) as u16);
    inode.gid = U16::new(a.gid as u16);
    inode.gid_high = U16::new((a.gid >> 16) as u16);
    inode.size_lo = U32::new(placed.size as u32);
    inode.size_high = U32::new((placed.size >> 32) as u32);
    inode.atime = U32::new(a.atime.0);
    inode.atime_extra = U32::new(a.atime.1);
    inode.mtime = U32::new(a.mtime.0);
    inode.mtime_extra = U32::new(a.mtime.1);
    inode.ctime = U32::new(a.ctime.0);
    inode.ctime_extra = U32::new(a.ctime.1);
    inode.crtime = U32::new(a.ctime.0);
    inode.crtime_extra = U32::new(a.ctime.1);
    let links = match &node.kind {
        Kind::Dir { subdirs, .. } if subdirs + 2 < LINK_MAX => subdirs + 2,
        Kind::Dir { .. } => 1, // dir_nlink: too many to count
        _ => node.links,
    };
    inode.links_count = U16::new(u16::try_from(links).map_err(|_| Error::Internal("link count"))?);
    let sectors = placed.blocks * (BLOCK / 512);
    inode.blocks_lo = U32::new(u32::try_from(sectors).map_err(|_| Error::Internal("i_blocks over 32 bits"))?);
    inode.flags = U32::new(placed.flags);
    inode.block = placed.block;
    inode.file_acl_lo = U32::new(placed.xattr_block);
    inode.extra_isize = U16::new(EXTRA_ISIZE);
    if placed.xattr_block == 0 {
        inode.xattrs = xattr::inline_area(&a.xattrs).ok_or(Error::Internal("inline xattrs"))?;
    }
    let sum = csum.inode(ino, 0, inode.as_bytes());
    inode.checksum_lo = U16::new(sum as u16);
    inode.checksum_hi = U16::new((sum >> 16) as u16);
    let mut out = [0u8; INODE_SIZE];
    out.copy_from_slice(inode.as_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_encode_with_epoch_bits() {
        assert_eq!(Timestamp::new(0, 0).encode(), Some((0, 0)));
        assert_eq!(Timestamp::new(-1, 5).encode(), Some((u32::MAX, 5 << 2)));
        // 2038-01-19T03:14:08Z, one past i32::MAX: epoch 1, low word wraps.
        assert_eq!(Timestamp::new(1 << 31, 0).encode(), Some((1 << 31, 1)));
        assert_eq!(Timestamp::new(1 << 32, 999_999_999).encode(), Some((0, (999_999_999 << 2) | 1)));
        assert_eq!(Timestamp::new(0, 1_000_000_000).encode(), None);
        assert_eq!(Timestamp::new(i64::from(i32::MIN) - 1, 0).encode(), None);
    }

    #[test]
    fn paths_split_and_refuse_bad_names() {
        assert_eq!(components(b"/a/b").unwrap(), [&b"a"[..], b"b"]);
        assert_eq!(components(b"a").unwrap(), [&b"a"[..]]);
        assert!(components(b"/").unwrap().is_empty());
        for bad in [&b"a//b"[..], b"a/", b"./a", b"a/..", b"a\0b"] {
            assert!(matches!(components(bad), Err(Error::InvalidPath { .. })), "{bad:?}");
        }
        assert!(matches!(components(&[b'x'; 256]), Err(Error::NameTooLong { .. })));
    }
}
