//! One connection: read bytes, decode frames, dispatch, write responses.
//!
//! Transport-independent: the same loop serves a vsock connection and the
//! virtio-serial port. Framing errors are answered and survived; the loop
//! ends only on end of stream (a vsock connection's; see [`OnEof`]), an I/O
//! error, or a shutdown request.
//!
//! Requests that act on the guest run one at a time per connection, in the
//! order they came, on a blocking thread (a mount on a disk the host stalls
//! may take as long as the host likes); meanwhile the loop keeps reading and
//! answers `Ping` and `Shutdown` at once. At most [`MAX_QUEUED`] requests,
//! of at most [`MAX_QUEUED_BYTES`] of frame bodies together, wait behind the
//! one running; more are answered `busy`, so a connection holds a bounded
//! amount of memory whatever the host sends.
//!
//! A request that waits on the outside world for long (`ProvisionSecret`'s
//! key broker exchange) is decided and begun in that order; its rest runs
//! beside the later requests ([`Handled::Aside`]), at most
//! `parma_protocol::MAX_ASIDE` at once in the whole agent (the dispatcher
//! answers more `busy`; one outlives its connection, its answer lost with
//! it), and is answered when it ends, after answers to later requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parma_protocol::{AgentError, Decoder, ErrorCode, Request, Response, encode_response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::dispatch::{self, After, Dispatcher, Handled};

/// Read size per system call.
const CHUNK: usize = 64 * 1024;
/// Requests that may wait behind the one being carried out, per connection.
pub const MAX_QUEUED: usize = 8;
/// Bytes of frame bodies those may hold together (a decoded request takes
/// several times its body's size).
pub const MAX_QUEUED_BYTES: usize = 1 << 20;

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The host closed its side (mid-frame or not: a partial frame is dropped).
    Eof,
    /// The host asked for a shutdown and got its answer.
    Shutdown,
}

/// What an end of file from the peer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnEof {
    /// The connection is over (vsock: the next host makes a new one).
    End,
    /// Only the framing restarts (virtio-serial: one port for every host,
    /// an end of file between them). Half a frame from a host that left is
    /// dropped, but requests already taken keep running and their answers
    /// go out: the guest may see a new host's bytes before the old host's
    /// end of file (the port's open and its data travel on different
    /// virtqueues), and ending the session there lost the new request's
    /// answer. A host client skips answers whose id it did not send.
    ResetFraming,
}

/// A queued request and the size of its frame's body.
type Queued = (u32, Request, usize);

/// Carry out queued requests in order, each on a blocking thread; the rest
/// of one that runs aside goes on beside the next ones.
async fn work(
    dispatcher: Arc<Dispatcher>,
    mut queue: mpsc::Receiver<Queued>,
    done: mpsc::Sender<(u32, Response, After)>,
    queued_bytes: Arc<AtomicUsize>,
) {
    while let Some((id, request, bytes)) = queue.recv().await {
        let begun = {
            let dispatcher = dispatcher.clone();
            tokio::task::spawn_blocking(move || dispatcher.begin(id, request)).await
        };
        queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        let answer = match begun {
            Ok(Handled::Now(response, after)) => (id, response, after),
            Ok(Handled::Aside(rest)) => {
                // It holds one of the agent's slots (`MAX_ASIDE`) until it ends.
                let (dispatcher, done) = (dispatcher.clone(), done.clone());
                tokio::spawn(async move {
                    let response = finish(dispatcher, rest).await;
                    // The connection may have ended meanwhile: the answer is lost with it.
                    let _ = done.send((id, response, After::Continue)).await;
                });
                continue;
            }
            // Only reachable in an unwinding build: the guest aborts on a panic.
            Err(_) => crate::fail_closed("a request handler panicked"),
        };
        if done.send(answer).await.is_err() {
            return;
        }
    }
}

/// The rest of a request, on a blocking thread.
async fn finish(dispatcher: Arc<Dispatcher>, rest: dispatch::Aside) -> Response {
    match tokio::task::spawn_blocking(move || rest(&dispatcher)).await {
        Ok(response) => response,
        Err(_) => crate::fail_closed("a request handler panicked"),
    }
}

/// Serve one stream until it ends.
pub async fn serve<S>(stream: &mut S, dispatcher: &Arc<Dispatcher>, on_eof: OnEof) -> std::io::Result<Ended>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (queue, work_queue) = mpsc::channel::<Queued>(MAX_QUEUED);
    let (done_tx, mut done) = mpsc::channel::<(u32, Response, After)>(1);
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let worker = tokio::spawn(work(dispatcher.clone(), work_queue, done_tx, queued_bytes.clone()));
    let ended = serve_with(stream, &queue, &mut done, &queued_bytes, on_eof).await;
    // Requests not started yet are dropped with the queue. One already
    // running completes on its own (it holds the guest's lock; a shutdown
    // does not wait for it) and its answer is lost with the connection.
    drop(worker);
    ended
}

async fn serve_with<S>(
    stream: &mut S,
    queue: &mpsc::Sender<Queued>,
    done: &mut mpsc::Receiver<(u32, Response, After)>,
    queued_bytes: &AtomicUsize,
    on_eof: OnEof,
) -> std::io::Result<Ended>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Reading is cancel-safe: a finished request's answer goes out first.
        let n = tokio::select! {
            biased;
            Some((id, response, after)) = done.recv() => {
                write(stream, id, &response).await?;
                if after == After::Shutdown {
                    return Ok(Ended::Shutdown);
                }
                continue;
            }
            read = stream.read(&mut buf) => read?,
        };
        let Some(bytes) = buf.get(..n).filter(|bytes| !bytes.is_empty()) else {
            if decoder.buffered() > 0 {
                tracing::warn!("peer left in the middle of a frame ({} bytes dropped)", decoder.buffered());
            }
            match on_eof {
                OnEof::End => return Ok(Ended::Eof),
                OnEof::ResetFraming => {
                    decoder = Decoder::new();
                    continue;
                }
            }
        };
        decoder.push(bytes);
        while let Some(item) = decoder.next_frame() {
            let frame = match item {
                Ok(frame) => frame,
                Err(err) => {
                    tracing::warn!("bad frame: {err}");
                    write(stream, err.id(), &Response::Error(AgentError::from(&err))).await?;
                    continue;
                }
            };
            let request = match dispatch::decode(&frame) {
                Ok(request) => request,
                Err(response) => {
                    write(stream, frame.id, &response).await?;
                    continue;
                }
            };
            if let Some((response, after)) = dispatch::immediate(&request) {
                write(stream, frame.id, &response).await?;
                if after == After::Shutdown {
                    return Ok(Ended::Shutdown);
                }
                continue;
            }
            let bytes = frame.body.len();
            let busy = |message: String| Response::Error(AgentError::new(ErrorCode::Busy, message));
            if queued_bytes.load(Ordering::Relaxed).saturating_add(bytes) > MAX_QUEUED_BYTES {
                let message =
                    format!("busy: requests of {MAX_QUEUED_BYTES} bytes wait on this connection; nothing was done");
                write(stream, frame.id, &busy(message)).await?;
                continue;
            }
            queued_bytes.fetch_add(bytes, Ordering::Relaxed);
            if let Err(err) = queue.try_send((frame.id, request, bytes)) {
                queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                let message = match err {
                    mpsc::error::TrySendError::Full(_) => {
                        format!("busy: {MAX_QUEUED} requests already wait on this connection; nothing was done")
                    }
                    mpsc::error::TrySendError::Closed(_) => "the agent is stopping; nothing was done".into(),
                };
                write(stream, frame.id, &busy(message)).await?;
            }
        }
    }
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, id: u32, response: &Response) -> std::io::Result<()> {
    stream.write_all(&encode_response(id, response)).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use parma_protocol::{FrameKind, encode_request};

    fn dispatcher() -> Arc<Dispatcher> {
        Arc::new(Dispatcher::new(crate::attest::Provider::Emulated { host_data: [0; 32], measurement: [0; 48] }))
    }

    async fn exchange(input: Vec<u8>) -> (Vec<Response>, Ended) {
        let (mut agent_side, mut host_side) = tokio::io::duplex(1 << 22);
        host_side.write_all(&input).await.unwrap();
        host_side.shutdown().await.unwrap();
        let ended = serve(&mut agent_side, &dispatcher(), OnEof::End).await.unwrap();
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

    /// Read whole response frames from `host` until `count` came.
    async fn answers(host: &mut tokio::io::DuplexStream, count: usize) -> Vec<(u32, Response)> {
        let mut decoder = Decoder::new();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < count {
            let n = host.read(&mut buf).await.unwrap();
            assert!(n > 0, "the agent closed after {got:?}");
            decoder.push(&buf[..n]);
            while let Some(frame) = decoder.next_frame() {
                let frame = frame.unwrap();
                got.push((frame.id, Response::decode(&frame.body).unwrap()));
            }
        }
        got
    }

    #[tokio::test]
    async fn queued_requests_are_answered_in_order() {
        // GuestInfo goes through the lock and a blocking thread, one after
        // the other; a ping among them is answered as it comes.
        let (mut agent_side, mut host_side) = tokio::io::duplex(1 << 22);
        let server = tokio::spawn(async move { serve(&mut agent_side, &dispatcher(), OnEof::End).await });
        let mut input = Vec::new();
        for id in 1..=3 {
            input.extend(encode_request(id, &Request::GuestInfo));
        }
        input.extend(encode_request(4, &Request::Ping));
        host_side.write_all(&input).await.unwrap();
        let got = answers(&mut host_side, 4).await;
        let infos: Vec<u32> =
            got.iter().filter(|(_, r)| matches!(r, Response::GuestInfo(_))).map(|(id, _)| *id).collect();
        assert_eq!(infos, vec![1, 2, 3], "{got:?}");
        assert!(got.iter().any(|(id, r)| *id == 4 && matches!(r, Response::Pong(_))));
        drop(host_side);
        assert_eq!(server.await.unwrap().unwrap(), Ended::Eof);
    }

    #[tokio::test]
    async fn a_stuck_request_does_not_hold_up_ping_or_shutdown() {
        let dispatcher = dispatcher();
        // Another handler holds the guest's records (a stalled disk).
        let held = dispatcher.clone();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (locked_tx, locked_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || held.hold_lock_until(&locked_tx, &release_rx));
        locked_rx.recv().unwrap();
        let (mut agent_side, mut host_side) = tokio::io::duplex(1 << 22);
        let server = tokio::spawn({
            let dispatcher = dispatcher.clone();
            async move { serve(&mut agent_side, &dispatcher, OnEof::End).await }
        });
        let mut input = encode_request(1, &Request::GuestInfo);
        input.extend(encode_request(2, &Request::Ping));
        // More than the queue holds: the rest are answered busy at once.
        for id in 3..(4 + MAX_QUEUED as u32) {
            input.extend(encode_request(id, &Request::GuestInfo));
        }
        input.extend(encode_request(99, &Request::Shutdown));
        host_side.write_all(&input).await.unwrap();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), server).await.unwrap().unwrap().unwrap();
        assert_eq!(ended, Ended::Shutdown, "the shutdown did not wait for the stuck request");
        let got = answers(&mut host_side, 3).await;
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        assert!(matches!(got.first(), Some((2, Response::Pong(_)))), "{got:?}");
        let rest = {
            let mut out = Vec::new();
            drop(host_side.shutdown().await);
            let _ = host_side.read_to_end(&mut out).await;
            let mut decoder = Decoder::new();
            decoder.push(&out);
            std::iter::from_fn(|| decoder.next_frame())
                .map(|f| {
                    let f = f.unwrap();
                    (f.id, Response::decode(&f.body).unwrap())
                })
                .collect::<Vec<_>>()
        };
        let all: Vec<_> = got.into_iter().chain(rest).collect();
        assert!(all.iter().any(|(_, r)| matches!(r, Response::Error(e) if e.code == ErrorCode::Busy)), "{all:?}");
        assert!(matches!(all.last(), Some((99, Response::ShuttingDown))), "{all:?}");
        assert!(!all.iter().any(|(id, _)| *id == 1), "the stuck request was not answered: {all:?}");
    }

    /// A port the way virtio-serial shows it: chunks of bytes with ends of
    /// file between hosts, then nothing more (pending forever).
    struct Port {
        script: std::collections::VecDeque<Option<Vec<u8>>>,
        written: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl tokio::io::AsyncRead for Port {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            match self.script.pop_front() {
                Some(Some(bytes)) => buf.put_slice(&bytes),
                Some(None) => {}
                None => return std::task::Poll::Pending,
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    impl tokio::io::AsyncWrite for Port {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.written.lock().unwrap().extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// The virtio-serial race: a new host's request arrives, then the old
    /// host's end of file. The request is answered all the same, half a
    /// frame before an end of file is dropped, and the next whole frame
    /// after it is answered.
    #[tokio::test]
    async fn on_the_serial_port_an_end_of_file_only_resets_the_framing() {
        let ping = encode_request(3, &Request::Ping);
        let script = vec![
            Some(encode_request(1, &Request::GuestInfo)),
            None,
            Some(ping[..7].to_vec()),
            None,
            Some(encode_request(2, &Request::Ping)),
            None,
            None,
        ];
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut port = Port { script: script.into(), written: written.clone() };
        let server = tokio::spawn(async move { serve(&mut port, &dispatcher(), OnEof::ResetFraming).await });
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let got = loop {
            let mut decoder = Decoder::new();
            decoder.push(&written.lock().unwrap());
            let got: Vec<(u32, Response)> = std::iter::from_fn(|| decoder.next_frame())
                .map(|f| {
                    let f = f.unwrap();
                    (f.id, Response::decode(&f.body).unwrap())
                })
                .collect();
            if got.len() >= 2 || tokio::time::Instant::now() > deadline {
                break got;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert!(!server.is_finished(), "the session ended on an end of file");
        server.abort();
        assert!(got.iter().any(|(id, r)| *id == 1 && matches!(r, Response::GuestInfo(_))), "{got:?}");
        assert!(got.iter().any(|(id, r)| *id == 2 && matches!(r, Response::Pong(_))), "{got:?}");
        assert_eq!(got.len(), 2, "half a frame was answered: {got:?}");
    }
}
