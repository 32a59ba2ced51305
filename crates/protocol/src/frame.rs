//! Framing: a fixed 16-byte header, then a bounded JSON body.
//!
//! ```text
//! offset  size  field
//!      0     4  magic    "PRMA"
//!      4     2  version  protocol version, little endian (1)
//!      6     2  kind     1 = request, 2 = response, little endian
//!      8     4  id       request id chosen by the host, echoed in the response
//!     12     4  len      body length in bytes, at most MAX_BODY
//! ```
//!
//! The decoder is a streaming state machine fed with whatever bytes the
//! transport delivers. It never buffers more than one header plus `MAX_BODY`
//! bytes, never panics, and after any framing error it resynchronises on the
//! next magic, so a host that sends garbage cannot wedge the agent.

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"PRMA";
/// The protocol version this crate speaks.
pub const VERSION: u16 = 1;
/// Size of [`Header`] on the wire.
pub const HEADER_LEN: usize = 16;
/// Largest body either side accepts (1 MiB).
pub const MAX_BODY: u32 = 1 << 20;

/// The frame header, exactly as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Header {
    /// Always [`MAGIC`].
    pub magic: [u8; 4],
    /// Protocol version of the sender.
    pub version: U16,
    /// [`FrameKind`] as a number.
    pub kind: U16,
    /// Request id.
    pub id: U32,
    /// Body length.
    pub len: U32,
}

const _: () = assert!(core::mem::size_of::<Header>() == HEADER_LEN);

/// Whether a frame carries a request or a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Host to agent.
    Request,
    /// Agent to host.
    Response,
}

impl FrameKind {
    fn to_wire(self) -> u16 {
        match self {
            FrameKind::Request => 1,
            FrameKind::Response => 2,
        }
    }

    fn from_wire(value: u16) -> Option<Self> {
        match value {
            1 => Some(FrameKind::Request),
            2 => Some(FrameKind::Response),
            _ => None,
        }
    }
}

/// One complete, well-framed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Request or response.
    pub kind: FrameKind,
    /// Request id.
    pub id: u32,
    /// The JSON body, at most [`MAX_BODY`] bytes.
    pub body: Vec<u8>,
}

/// A framing error: the bytes on the wire were not a valid frame.
///
/// `id` is the request id from the header when the header could be read, so
/// the agent can answer the request it refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A header did not start with [`MAGIC`]; the decoder skips to the next one.
    #[error("bad magic {found:02x?}, expected \"PRMA\"")]
    BadMagic {
        /// The four bytes found instead.
        found: [u8; 4],
    },
    /// The header names a protocol version this side does not speak.
    #[error("protocol version {version} is not supported (this side speaks {VERSION})")]
    UnsupportedVersion {
        /// Request id from the header.
        id: u32,
        /// The version the peer sent.
        version: u16,
    },
    /// The header names an unknown frame kind.
    #[error("unknown frame kind {kind}")]
    UnknownKind {
        /// Request id from the header.
        id: u32,
        /// The kind the peer sent.
        kind: u16,
    },
    /// The body length exceeds [`MAX_BODY`].
    #[error("body of {len} bytes exceeds the limit of {MAX_BODY} bytes")]
    Oversize {
        /// Request id from the header.
        id: u32,
        /// The length the peer announced.
        len: u32,
    },
}

impl FrameError {
    /// The request id the error refers to, when the header was readable.
    pub fn id(&self) -> u32 {
        match self {
            FrameError::BadMagic { .. } => 0,
            FrameError::UnsupportedVersion { id, .. }
            | FrameError::UnknownKind { id, .. }
            | FrameError::Oversize { id, .. } => *id,
        }
    }
}

/// The encoder refused to build a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("body of {len} bytes exceeds the limit of {MAX_BODY} bytes")]
pub struct BodyTooLarge {
    /// The body length that was refused.
    pub len: usize,
}

/// Encode one frame: header then body.
pub fn encode(kind: FrameKind, id: u32, body: &[u8]) -> Result<Vec<u8>, BodyTooLarge> {
    let len = u32::try_from(body.len()).ok().filter(|len| *len <= MAX_BODY).ok_or(BodyTooLarge { len: body.len() })?;
    let header = Header {
        magic: MAGIC,
        version: U16::new(VERSION),
        kind: U16::new(kind.to_wire()),
        id: U32::new(id),
        len: U32::new(len),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

#[derive(Debug)]
enum State {
    /// Collecting header bytes.
    Header,
    /// Collecting a body for this header.
    Body { kind: FrameKind, id: u32, len: usize },
    /// Discarding a body whose header was refused (bad version or kind).
    Skip { remaining: usize },
    /// Looking for the next magic after a bad magic or an untrusted length.
    Resync,
}

/// Streaming frame decoder.
///
/// Feed it bytes with [`Decoder::push`], take frames and errors out with
/// [`Decoder::next_frame`]. Errors do not stop the decoder: it recovers and
/// goes on with the bytes that follow.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    state: State,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder waiting for the first header.
    pub fn new() -> Self {
        Self { buf: Vec::new(), state: State::Header }
    }

    /// Append bytes read from the transport.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame or framing error, or `None` if more bytes are needed.
    ///
    /// Call it until it returns `None` after each [`Decoder::push`]: between
    /// calls the buffer never holds more than a header plus [`MAX_BODY`] bytes
    /// of a frame being collected.
    pub fn next_frame(&mut self) -> Option<Result<Frame, FrameError>> {
        loop {
            match self.state {
                State::Header => {
                    let header = Header::read_from_prefix(&self.buf).ok()?.0;
                    if header.magic != MAGIC {
                        // Drop the first byte so the scan cannot find this spot again.
                        self.buf.drain(..1);
                        self.state = State::Resync;
                        return Some(Err(FrameError::BadMagic { found: header.magic }));
                    }
                    self.buf.drain(..HEADER_LEN);
                    let id = header.id.get();
                    let len = header.len.get();
                    if len > MAX_BODY {
                        // The announced length is not trusted: scan for the next magic.
                        self.state = State::Resync;
                        return Some(Err(FrameError::Oversize { id, len }));
                    }
                    let len = len as usize;
                    let version = header.version.get();
                    if version != VERSION {
                        self.state = State::Skip { remaining: len };
                        return Some(Err(FrameError::UnsupportedVersion { id, version }));
                    }
                    let Some(kind) = FrameKind::from_wire(header.kind.get()) else {
                        self.state = State::Skip { remaining: len };
                        return Some(Err(FrameError::UnknownKind { id, kind: header.kind.get() }));
                    };
                    self.state = State::Body { kind, id, len };
                }
                State::Body { kind, id, len } => {
                    if self.buf.len() < len {
                        return None;
                    }
                    let rest = self.buf.split_off(len);
                    let body = std::mem::replace(&mut self.buf, rest);
                    self.state = State::Header;
                    return Some(Ok(Frame { kind, id, body }));
                }
                State::Skip { remaining } => {
                    let n = remaining.min(self.buf.len());
                    self.buf.drain(..n);
                    if n < remaining {
                        self.state = State::Skip { remaining: remaining - n };
                        return None;
                    }
                    self.state = State::Header;
                }
                State::Resync => match find_magic(&self.buf) {
                    Some(pos) => {
                        self.buf.drain(..pos);
                        self.state = State::Header;
                    }
                    None => {
                        // Keep the last three bytes: they may start a magic.
                        let keep = self.buf.len().min(MAGIC.len() - 1);
                        let drop = self.buf.len() - keep;
                        self.buf.drain(..drop);
                        return None;
                    }
                },
            }
        }
    }
}

fn find_magic(buf: &[u8]) -> Option<usize> {
    buf.windows(MAGIC.len()).position(|w| w == MAGIC)
}
