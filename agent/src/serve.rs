//! One connection: read bytes, decode frames, dispatch, write responses.
//!
//! Transport-independent: the same loop serves a vsock connection and the
//! virtio-serial port. Framing errors are answered and survived; the loop
//! ends only on end of stream, an I/O error, or a shutdown request.

use parma_protocol::{AgentError, Decoder, Response, encode_response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::dispatch::{After, Dispatcher};

/// Read size per system call.
const CHUNK: usize = 64 * 1024;

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The host closed its side (mid-frame or not: a partial frame is dropped).
    Eof,
    /// The host asked for a shutdown and got its answer.
    Shutdown,
}

/// Serve one stream until it ends.
pub async fn serve<S>(stream: &mut S, dispatcher: &Dispatcher) -> std::io::Result<Ended>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = stream.read(&mut buf).await?;
        let Some(bytes) = buf.get(..n).filter(|bytes| !bytes.is_empty()) else {
            if decoder.buffered() > 0 {
                tracing::warn!("peer left in the middle of a frame ({} bytes dropped)", decoder.buffered());
            }
            return Ok(Ended::Eof);
        };
        decoder.push(bytes);
        while let Some(item) = decoder.next_frame() {
            let (id, response, after) = match item {
                Ok(frame) => {
                    let (response, after) = dispatcher.dispatch(&frame).await;
                    (frame.id, response, after)
                }
                Err(err) => {
                    tracing::warn!("bad frame: {err}");
                    (err.id(), Response::Error(AgentError::from(&err)), After::Continue)
                }
            };
            stream.write_all(&encode_response(id, &response)).await?;
            stream.flush().await?;
            if after == After::Shutdown {
                return Ok(Ended::Shutdown);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parma_protocol::{ErrorCode, FrameKind, Request, encode_request};

    async fn exchange(input: Vec<u8>) -> (Vec<Response>, Ended) {
        let (mut agent_side, mut host_side) = tokio::io::duplex(1 << 22);
        let dispatcher = Dispatcher::new(crate::attest::Provider::Emulated { host_data: [0; 32] });
        host_side.write_all(&input).await.unwrap();
        host_side.shutdown().await.unwrap();
        let ended = serve(&mut agent_side, &dispatcher).await.unwrap();
        drop(agent_side);
        let mut out = Vec::new();
        host_side.read_to_end(&mut out).await.unwrap();
        let mut decoder = Decoder::new();
        decoder.push(&out);
        let responses = std::iter::from_fn(|| decoder.next_frame())
            .map(|frame| {
                let frame = frame.unwrap();
                assert_eq!(frame.kind, FrameKind::Response);
                Response::decode(&frame.body).unwrap()
            })
            .collect();
        (responses, ended)
    }

    #[tokio::test]
    async fn garbage_then_ping_on_the_same_stream() {
        let mut input = b"\x00\x01garbage".to_vec();
        input.extend(encode_request(1, &Request::Ping));
        let (responses, ended) = exchange(input).await;
        assert_eq!(ended, Ended::Eof);
        assert!(matches!(&responses[0], Response::Error(e) if e.code == ErrorCode::BadMagic));
        assert!(matches!(&responses[1], Response::Pong(_)));
        assert_eq!(responses.len(), 2);
    }

    #[tokio::test]
    async fn half_a_frame_then_eof() {
        let input = encode_request(1, &Request::Ping);
        let (responses, ended) = exchange(input[..10].to_vec()).await;
        assert!(responses.is_empty());
        assert_eq!(ended, Ended::Eof);
    }

    #[tokio::test]
    async fn shutdown_stops_after_answering() {
        let mut input = encode_request(1, &Request::Shutdown);
        input.extend(encode_request(2, &Request::Ping));
        let (responses, ended) = exchange(input).await;
        assert_eq!(responses, vec![Response::ShuttingDown]);
        assert_eq!(ended, Ended::Shutdown);
    }
}
