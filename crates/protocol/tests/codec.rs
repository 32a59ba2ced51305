//! Encode/decode tests for frames and messages, including hostile input.

use parma_protocol::frame::{HEADER_LEN, Header, MAGIC};
use parma_protocol::*;
use proptest::prelude::*;
use zerocopy::FromBytes;

fn decode_all(bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
    let mut decoder = Decoder::new();
    decoder.push(bytes);
    std::iter::from_fn(|| decoder.next_frame()).collect()
}

fn header_with(version: u16, kind: u16, id: u32, len: u32) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out
}

#[test]
fn header_layout_is_little_endian_and_16_bytes() {
    let bytes = encode_request(0x0102_0304, &Request::Ping);
    let (header, body) = Header::read_from_prefix(&bytes).unwrap();
    assert_eq!(&bytes[..4], b"PRMA");
    assert_eq!(&bytes[4..6], &[1, 0]);
    assert_eq!(&bytes[6..8], &[1, 0]);
    assert_eq!(&bytes[8..12], &[4, 3, 2, 1]);
    assert_eq!(header.len.get() as usize, body.len());
    assert_eq!(body, br#"{"type":"Ping"}"#);
    assert_eq!(bytes.len(), HEADER_LEN + body.len());
}

#[test]
fn request_round_trip() {
    for request in
        [Request::Ping, Request::GuestInfo, Request::Shutdown, Request::SetPolicy { policy: "package policy\n".into() }]
    {
        let frames = decode_all(&encode_request(7, &request));
        let [Ok(frame)] = frames.as_slice() else { panic!("{frames:?}") };
        assert_eq!(frame.kind, FrameKind::Request);
        assert_eq!(frame.id, 7);
        assert_eq!(Request::decode(&frame.body).unwrap(), request);
    }
}

#[test]
fn response_round_trip() {
    let responses = [
        Response::Pong(PingInfo {
            protocol_version: VERSION,
            agent_version: "0.1.0".into(),
            kernel_release: "6.12.57".into(),
            uptime_ms: 1234,
        }),
        Response::GuestInfo(GuestInfo {
            memory_total_kib: 1,
            memory_available_kib: 2,
            cpus: 3,
            mounts: vec![MountInfo {
                source: "proc".into(),
                target: "/proc".into(),
                fstype: "proc".into(),
                options: "rw".into(),
            }],
            sev_guest_device: false,
            tsm_report: true,
        }),
        Response::ShuttingDown,
        Response::PolicySet { sha256: "ab".repeat(32) },
        Response::Error(AgentError::new(ErrorCode::PolicyDenied, "no")),
    ];
    for response in responses {
        let frames = decode_all(&encode_response(9, &response));
        let [Ok(frame)] = frames.as_slice() else { panic!("{frames:?}") };
        assert_eq!(frame.kind, FrameKind::Response);
        assert_eq!(Response::decode(&frame.body).unwrap(), response);
    }
}

#[test]
fn unknown_type_and_malformed_are_told_apart() {
    assert_eq!(Request::decode(br#"{"type":"FormatDisk"}"#), Err(DecodeError::UnknownType("FormatDisk".into())));
    for body in [
        &b"not json"[..],
        b"{}",
        b"[1,2]",
        br#"{"type":"Ping","extra":1}"#,
        br#"{"type":7}"#,
        b"",
        br#"{"type":"SetPolicy"}"#,
        br#"{"type":"SetPolicy","policy":7}"#,
        br#"{"type":"SetPolicy","policy":"p","hash":"x"}"#,
    ] {
        assert!(matches!(Request::decode(body), Err(DecodeError::Malformed(_))), "{:?}", String::from_utf8_lossy(body));
    }
    let long = format!(r#"{{"type":"{}"}}"#, "x".repeat(10_000));
    let Err(DecodeError::UnknownType(ty)) = Request::decode(long.as_bytes()) else { panic!() };
    assert_eq!(ty.len(), 128);
}

#[test]
fn oversize_is_refused_then_decoder_resynchronises() {
    let mut bytes = header_with(VERSION, 1, 5, MAX_BODY + 1);
    bytes.extend_from_slice(b"junk that is not a frame");
    bytes.extend_from_slice(&encode_request(6, &Request::Ping));
    let frames = decode_all(&bytes);
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[0], Err(FrameError::Oversize { id: 5, len: MAX_BODY + 1 }));
    assert_eq!(frames[1].as_ref().unwrap().id, 6);
}

#[test]
fn bad_version_and_kind_skip_their_body() {
    let mut bytes = header_with(99, 1, 1, 3);
    bytes.extend_from_slice(b"abc");
    bytes.extend_from_slice(&header_with(VERSION, 42, 2, 2));
    bytes.extend_from_slice(b"xy");
    bytes.extend_from_slice(&encode_request(3, &Request::GuestInfo));
    let frames = decode_all(&bytes);
    assert_eq!(frames[0], Err(FrameError::UnsupportedVersion { id: 1, version: 99 }));
    assert_eq!(frames[1], Err(FrameError::UnknownKind { id: 2, kind: 42 }));
    assert_eq!(frames[2].as_ref().unwrap().id, 3);
    assert_eq!(frames.len(), 3);
}

#[test]
fn garbage_gives_one_error_then_the_next_frame() {
    let mut bytes = b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n".to_vec();
    bytes.extend_from_slice(&encode_request(11, &Request::Ping));
    let frames = decode_all(&bytes);
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert!(matches!(frames[0], Err(FrameError::BadMagic { found }) if &found == b"GET "));
    assert_eq!(frames[1].as_ref().unwrap().id, 11);
}

#[test]
fn byte_at_a_time_delivery() {
    let bytes = [encode_request(1, &Request::Ping), encode_request(2, &Request::Shutdown)].concat();
    let mut decoder = Decoder::new();
    let mut ids = Vec::new();
    for byte in bytes {
        decoder.push(&[byte]);
        while let Some(frame) = decoder.next_frame() {
            ids.push(frame.unwrap().id);
        }
    }
    assert_eq!(ids, [1, 2]);
    assert_eq!(decoder.buffered(), 0);
}

#[test]
fn half_a_frame_yields_nothing() {
    let bytes = encode_request(1, &Request::Ping);
    assert!(decode_all(&bytes[..HEADER_LEN + 3]).is_empty());
    assert!(decode_all(&bytes[..5]).is_empty());
}

#[test]
fn error_messages_are_bounded() {
    let err = AgentError::new(ErrorCode::Failed, "é".repeat(10_000));
    assert!(err.message.len() <= message::MAX_MESSAGE);
    assert!(err.message.chars().all(|c| c == 'é'));
}

#[test]
fn encoder_refuses_oversize_bodies() {
    let body = vec![b' '; MAX_BODY as usize + 1];
    assert!(encode(FrameKind::Request, 1, &body).is_err());
    assert!(encode(FrameKind::Request, 1, &body[1..]).is_ok());
}

proptest! {
    #[test]
    fn decoder_never_panics_and_stays_bounded(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..512), 0..16)) {
        let mut decoder = Decoder::new();
        for chunk in &chunks {
            decoder.push(chunk);
            while let Some(frame) = decoder.next_frame() {
                if let Ok(frame) = frame {
                    prop_assert!(frame.body.len() <= MAX_BODY as usize);
                    let _ = Request::decode(&frame.body);
                }
            }
            prop_assert!(decoder.buffered() <= HEADER_LEN + MAX_BODY as usize);
        }
    }

    #[test]
    fn frames_survive_any_split_and_leading_garbage(
        ids in proptest::collection::vec(any::<u32>(), 1..8),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
        split in 1usize..64,
    ) {
        // Garbage without the magic in it, then a stream of valid frames.
        let garbage: Vec<u8> = garbage.into_iter().filter(|b| *b != b'P').collect();
        let mut bytes = garbage.clone();
        for id in &ids {
            bytes.extend_from_slice(&encode_request(*id, &Request::GuestInfo));
        }
        let mut decoder = Decoder::new();
        let mut got = Vec::new();
        let mut errors = 0;
        for chunk in bytes.chunks(split) {
            decoder.push(chunk);
            while let Some(frame) = decoder.next_frame() {
                match frame {
                    Ok(frame) => got.push(frame.id),
                    Err(FrameError::BadMagic { .. }) => errors += 1,
                    Err(other) => prop_assert!(false, "unexpected {other:?}"),
                }
            }
        }
        prop_assert_eq!(got, ids);
        prop_assert!(errors <= usize::from(!garbage.is_empty()) * garbage.len());
    }

    #[test]
    fn request_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Request::decode(&body);
        let _ = Response::decode(&body);
    }
}
