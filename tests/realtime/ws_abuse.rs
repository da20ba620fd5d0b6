//! Abuse of the WebSocket endpoint, over raw sockets that write whatever
//! bytes a broken or hostile client would: frames that break RFC 6455,
//! invalid UTF-8, bad close codes, oversized frames and messages, a ping
//! flood, data after a close, broken handshakes, and JSON nested or sized to
//! hurt (as commands and as the publish API's body).
//!
//! Each case asserts exactly what the client sees — the close code (in a
//! Close frame, followed by the TCP close, never a reset) or the error
//! reply — and that the server stays healthy: a fresh client still works
//! afterwards.
//!
//! `PUSHGATE_SUITE_SIZE=full` makes the floods and the property test larger.

use crate::common;
use common::command_json::json_value;

use std::net::SocketAddr;

use common::{Pushgate, Upstream, PATIENCE};
use futures_util::SinkExt;
use http::StatusCode;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

pub(crate) const TEXT: u8 = 0x1;
pub(crate) const BINARY: u8 = 0x2;
pub(crate) const CONTINUATION: u8 = 0x0;
pub(crate) const CLOSE: u8 = 0x8;
pub(crate) const PING: u8 = 0x9;
pub(crate) const PONG: u8 = 0xA;

/// Whether this is the full-size run (`PUSHGATE_SUITE_SIZE=full`).
fn full_size() -> bool {
    std::env::var("PUSHGATE_SUITE_SIZE").is_ok_and(|size| size == "full")
}

pub(crate) async fn start(extra: &str) -> (Upstream, Pushgate) {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), extra).await;
    (app, gate)
}

/// One frame as a client writes it: masked unless `masked` is false.
pub(crate) fn frame(fin: bool, rsv: u8, opcode: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => bytes.push(mask_bit | len as u8),
        len @ 126..=0xFFFF => {
            bytes.push(mask_bit | 126);
            bytes.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            bytes.push(mask_bit | 127);
            bytes.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        bytes.extend_from_slice(&key);
        bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        bytes.extend_from_slice(payload);
    }
    bytes
}

/// A final, masked frame.
pub(crate) fn whole(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(true, 0, opcode, true, payload)
}

/// A close frame's payload: the code, then the reason.
fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}

/// A frame the server sent.
#[derive(Debug)]
pub(crate) struct Received {
    pub fin: bool,
    /// RSV1: a compressed message (permessage-deflate).
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// A WebSocket client that writes raw bytes.
pub(crate) struct Raw {
    stream: TcpStream,
    /// Bytes read and not yet parsed.
    buffer: Vec<u8>,
    /// permessage-deflate was negotiated: RSV1 may come on a message.
    deflate: bool,
}

impl Raw {
    pub(crate) async fn connect(addr: SocketAddr) -> Raw {
        Raw::connect_with(addr, "").await.0
    }

    /// Connects with `fields` (each line ending in CRLF) added to the
    /// handshake; the connection and the 101's head.
    pub(crate) async fn connect_with(addr: SocketAddr, fields: &str) -> (Raw, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /realtime/ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{fields}\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Raw {
            stream,
            buffer: Vec::new(),
            deflate: false,
        };
        let end = loop {
            if let Some(at) = raw.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(raw.fill().await > 0, "the handshake's answer ended early");
        };
        let head = String::from_utf8_lossy(&raw.buffer[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw.buffer.drain(..end);
        raw.deflate = head
            .to_ascii_lowercase()
            .contains("\r\nsec-websocket-extensions: permessage-deflate");
        (raw, head)
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes into the buffer; how many (0: the server closed).
    /// A reset fails the test: the server closes without one.
    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let read = tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk))
            .await
            .expect("the server answers in time")
            .expect("the server closes without a reset");
        self.buffer.extend_from_slice(&chunk[..read]);
        read
    }

    /// The next frame, or `None` when the server closed the connection.
    pub(crate) async fn next(&mut self) -> Option<Received> {
        loop {
            if let Some((frame, used)) = parse(&self.buffer, self.deflate) {
                self.buffer.drain(..used);
                return Some(frame);
            }
            if self.fill().await == 0 {
                assert!(self.buffer.is_empty(), "the server cut a frame short");
                return None;
            }
        }
    }

    /// Reads up to the server's Close frame (skipping anything before it),
    /// answers it as a client does, and checks that the server then closes
    /// the TCP connection. The close code (`None`: an empty Close frame).
    pub(crate) async fn closed(&mut self) -> Option<u16> {
        let close = loop {
            match self.next().await {
                Some(frame) if frame.opcode == CLOSE => break frame,
                Some(_) => continue,
                None => panic!("the server closed the connection without a Close frame"),
            }
        };
        assert!(close.fin, "a control frame is never fragmented");
        let code = match close.payload.len() {
            0 => None,
            1 => panic!("a close payload of one byte"),
            _ => {
                let reason = std::str::from_utf8(&close.payload[2..]);
                assert!(reason.is_ok(), "the close reason is UTF-8");
                Some(u16::from_be_bytes([close.payload[0], close.payload[1]]))
            }
        };
        // The client's answer; the server may have closed its side already.
        let _ = self.stream.write_all(&whole(CLOSE, &close.payload)).await;
        assert!(self.next().await.is_none(), "nothing after the Close frame");
        code
    }
}

/// One server frame from the front of `bytes`, and how many bytes it took;
/// RSV1 only on a data frame, and only with permessage-deflate.
fn parse(bytes: &[u8], deflate: bool) -> Option<(Received, usize)> {
    if bytes.len() < 2 {
        return None;
    }
    assert_eq!(bytes[1] & 0x80, 0, "a server never masks");
    let rsv1 = bytes[0] & 0x40 != 0;
    assert_eq!(bytes[0] & 0x30, 0, "no RSV2 or RSV3 from the server");
    assert!(
        !rsv1 || (deflate && matches!(bytes[0] & 0x0f, TEXT | BINARY)),
        "RSV1 only on a message, and only with permessage-deflate"
    );
    let (len, header) = match bytes[1] & 0x7f {
        126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
        127 if bytes.len() >= 10 => (
            u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        len => (len as usize, 2),
    };
    if bytes.len() < header + len {
        return None;
    }
    let frame = Received {
        fin: bytes[0] & 0x80 != 0,
        rsv1,
        opcode: bytes[0] & 0x0f,
        payload: bytes[header..header + len].to_vec(),
    };
    Some((frame, header + len))
}

/// A fresh client connects, runs a command and gets its reply.
pub(crate) async fn still_serves(gate: &Pushgate) {
    let mut client = common::ws_connect(gate.addr, "").await;
    client
        .send(Message::text(json!({"id": "ok", "op": "ping"}).to_string()))
        .await
        .unwrap();
    assert_eq!(
        common::ws_next_json(&mut client).await,
        json!({"id": "ok", "result": {}})
    );
}

/// Sends `bytes` on a fresh connection and checks the close code the server
/// answers with; then that the server still serves.
async fn expect_close(gate: &Pushgate, case: &str, bytes: &[u8], code: Option<u16>) {
    let mut raw = Raw::connect(gate.addr).await;
    raw.send(bytes).await;
    assert_eq!(raw.closed().await, code, "{case}");
    still_serves(gate).await;
}

#[tokio::test]
async fn frames_that_break_the_protocol_close_with_1002() {
    let (_app, gate) = start("").await;
    let ping = whole(PING, b"x");
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        (
            "an unmasked text frame".into(),
            frame(true, 0, TEXT, false, br#"{"id":1,"op":"ping"}"#),
        ),
        ("an unmasked ping".into(), frame(true, 0, PING, false, b"")),
        (
            "a fragmented ping".into(),
            frame(false, 0, PING, true, b"x"),
        ),
        ("a ping of 126 bytes".into(), whole(PING, &[b'p'; 126])),
        (
            "a close of 126 bytes".into(),
            whole(CLOSE, &close_payload(1000, &[b'r'; 124])),
        ),
        (
            "a continuation without a start".into(),
            frame(true, 0, CONTINUATION, true, b"x"),
        ),
        (
            "a new text message inside a fragmented one".into(),
            [frame(false, 0, TEXT, true, b"[1"), whole(TEXT, b"[2]")].concat(),
        ),
        (
            "a binary message inside a fragmented text".into(),
            [frame(false, 0, TEXT, true, b"[1"), whole(BINARY, b"x")].concat(),
        ),
        ("a close payload of one byte".into(), whole(CLOSE, b"\x03")),
    ];
    for rsv in 1..=7 {
        cases.push((
            format!("reserved bits {rsv:03b} on text"),
            frame(true, rsv, TEXT, true, b"{}"),
        ));
    }
    cases.push((
        "a reserved bit on a ping".into(),
        frame(true, 4, PING, true, b""),
    ));
    for opcode in (3..=7).chain(11..=15) {
        cases.push((format!("reserved opcode {opcode}"), whole(opcode, b"x")));
    }
    // RFC 6455 §7.4: codes an endpoint must never receive in a Close frame.
    for code in [
        0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        cases.push((
            format!("close code {code}"),
            whole(CLOSE, &close_payload(code, b"")),
        ));
    }
    for (case, bytes) in cases {
        // A ping first: the connection was sound until the bad frame.
        let mut raw = Raw::connect(gate.addr).await;
        raw.send(&ping).await;
        let pong = raw.next().await.expect("a pong");
        assert_eq!(
            (pong.opcode, pong.payload.as_slice()),
            (PONG, &b"x"[..]),
            "{case}"
        );
        raw.send(&bytes).await;
        assert_eq!(raw.closed().await, Some(1002), "{case}");
        still_serves(&gate).await;
    }
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let (_app, gate) = start("").await;
    let bad: [&[u8]; 5] = [
        b"\xff",
        b"{\"id\": 1, \"op\": \"\xc0\xaf\"}", // an overlong '/'
        b"\xed\xa0\x80",                      // a UTF-16 surrogate
        b"\xf4\x90\x80\x80",                  // past U+10FFFF
        b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
    ];
    for bytes in bad {
        expect_close(&gate, "a text frame", &whole(TEXT, bytes), Some(1007)).await;
        // In fragments: the bad bytes in the middle, or split across two.
        let fragments = [
            frame(false, 0, TEXT, true, b"{\"a\": \""),
            frame(false, 0, CONTINUATION, true, bytes),
            frame(true, 0, CONTINUATION, true, b"\"}"),
        ]
        .concat();
        expect_close(&gate, "a fragmented text", &fragments, Some(1007)).await;
        // The reason of a Close frame is UTF-8 too.
        let close = whole(CLOSE, &close_payload(1000, bytes));
        expect_close(&gate, "a close reason", &close, Some(1007)).await;
    }
    // A character split between two fragments is fine.
    let mut raw = Raw::connect(gate.addr).await;
    let text = r#"{"id": "κόσμε", "op": "ping"}"#.as_bytes();
    let split = text.iter().position(|&b| b == 0xce).unwrap() + 1;
    raw.send(&frame(false, 0, TEXT, true, &text[..split])).await;
    raw.send(&frame(true, 0, CONTINUATION, true, &text[split..]))
        .await;
    let reply = raw.next().await.expect("a reply");
    assert_eq!(reply.opcode, TEXT);
    assert_eq!(
        serde_json::from_slice::<Value>(&reply.payload).unwrap(),
        json!({"id": "κόσμε", "result": {}})
    );
}

#[tokio::test]
async fn a_clients_close_is_answered_with_a_close_then_the_tcp_close() {
    let (_app, gate) = start("").await;
    for code in [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
    ] {
        let close = whole(CLOSE, &close_payload(code, b"bye"));
        expect_close(&gate, "a valid code", &close, Some(code)).await;
    }
    // An empty Close frame is answered with an empty one.
    expect_close(&gate, "an empty close", &whole(CLOSE, b""), None).await;
    // Whatever follows a Close frame is not read as commands, and does not
    // turn the close into a reset.
    let after = [
        whole(CLOSE, &close_payload(1000, b"")),
        whole(TEXT, br#"{"id": 1, "op": "ping"}"#),
        whole(PING, b"late"),
        vec![0xde, 0xad, 0xbe, 0xef],
    ]
    .concat();
    let mut raw = Raw::connect(gate.addr).await;
    raw.send(&after).await;
    let first = raw.next().await.expect("the Close frame");
    assert_eq!(first.opcode, CLOSE, "no reply to the command: {first:?}");
    assert_eq!(first.payload, 1000u16.to_be_bytes());
    assert!(raw.next().await.is_none(), "then the TCP close");
    still_serves(&gate).await;
}

#[tokio::test]
async fn oversized_frames_and_messages_close_with_1009() {
    let (_app, gate) = start("realtime:\n  websocket:\n    max_message_size: 1KiB\n").await;
    let big = vec![b' '; 2048];
    expect_close(
        &gate,
        "a text frame over the limit",
        &whole(TEXT, &big),
        Some(1009),
    )
    .await;
    expect_close(
        &gate,
        "a binary frame over the limit",
        &whole(BINARY, &big),
        Some(1009),
    )
    .await;
    // A header that claims more than the limit is refused before any of it
    // arrives: the server does not wait for (or buffer) the 1 GiB.
    let mut claim = vec![0x80 | TEXT, 0x80 | 127];
    claim.extend_from_slice(&(1u64 << 30).to_be_bytes());
    claim.extend_from_slice(&[1, 2, 3, 4]);
    expect_close(&gate, "a 1 GiB header", &claim, Some(1009)).await;
    let mut claim = vec![0x80 | TEXT, 0x80 | 127];
    claim.extend_from_slice(&u64::MAX.to_be_bytes());
    claim.extend_from_slice(&[1, 2, 3, 4]);
    expect_close(&gate, "a 2^64-1 header", &claim, Some(1009)).await;
    // Small fragments that add up past the limit.
    let mut fragments = frame(false, 0, TEXT, true, &[b' '; 500]);
    for _ in 0..3 {
        fragments.extend(frame(false, 0, CONTINUATION, true, &[b' '; 500]));
    }
    expect_close(&gate, "fragments over the limit", &fragments, Some(1009)).await;
    // Exactly the limit is accepted: a JSON command padded to 1024 bytes.
    let mut command = br#"{"id": 1, "op": "ping"}"#.to_vec();
    command.resize(1024, b' ');
    let mut raw = Raw::connect(gate.addr).await;
    raw.send(&whole(TEXT, &command)).await;
    let reply = raw.next().await.expect("a reply");
    assert_eq!(
        serde_json::from_slice::<Value>(&reply.payload).unwrap(),
        json!({"id": 1, "result": {}})
    );
}

#[tokio::test]
async fn a_ping_flood_is_answered_and_the_connection_stays_usable() {
    let (_app, gate) = start("").await;
    let pings: usize = if full_size() { 200_000 } else { 5_000 };
    let mut raw = Raw::connect(gate.addr).await;
    // The largest ping payload a control frame may carry, numbered.
    let payload = |n: usize| {
        let mut payload = format!("{n:08}").into_bytes();
        payload.resize(125, b'.');
        payload
    };
    let mut flood = Vec::new();
    for n in 0..pings {
        flood.extend(whole(PING, &payload(n)));
    }
    flood.extend(whole(TEXT, br#"{"id": "after", "op": "ping"}"#));
    let (mut read, mut write) = raw.stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(&flood).await.unwrap();
        write
    });
    // Pongs carry the payload of a ping (tungstenite answers the latest when
    // several wait), in order; the pong to the last ping comes before the
    // reply to the command sent after it.
    let mut last_pong = None;
    let mut buffer = std::mem::take(&mut raw.buffer);
    let reply = loop {
        if let Some((frame, used)) = parse(&buffer, false) {
            buffer.drain(..used);
            match frame.opcode {
                PONG => {
                    let n: usize = std::str::from_utf8(&frame.payload[..8])
                        .unwrap()
                        .parse()
                        .unwrap();
                    assert_eq!(frame.payload, payload(n));
                    assert!(last_pong.is_none_or(|last| n > last), "pongs in order");
                    last_pong = Some(n);
                }
                TEXT => break frame,
                other => panic!("unexpected opcode {other}"),
            }
            continue;
        }
        let mut chunk = [0u8; 64 * 1024];
        let n = tokio::time::timeout(PATIENCE, read.read(&mut chunk))
            .await
            .expect("in time")
            .unwrap();
        assert!(n > 0, "the server closed the connection during the flood");
        buffer.extend_from_slice(&chunk[..n]);
    };
    assert_eq!(last_pong, Some(pings - 1), "the last ping is answered");
    assert_eq!(
        serde_json::from_slice::<Value>(&reply.payload).unwrap(),
        json!({"id": "after", "result": {}})
    );
    let write = writer.await.unwrap();
    let mut raw = Raw {
        stream: read.reunite(write).unwrap(),
        buffer,
        deflate: false,
    };
    raw.send(&whole(CLOSE, &close_payload(1000, b""))).await;
    assert_eq!(raw.closed().await, Some(1000));
    still_serves(&gate).await;
}

/// Sends a handshake with `headers` (after the Host line); the status and
/// the answer: its head, and for a refusal its body (to the end).
async fn handshake(addr: SocketAddr, headers: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request =
        format!("GET /realtime/ws HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut chunk))
            .await
            .expect("answered in time")
            .unwrap();
        answer.extend_from_slice(&chunk[..read]);
        // An accepted upgrade stays open after its head.
        let upgraded =
            answer.starts_with(b"HTTP/1.1 101") && answer.windows(4).any(|w| w == b"\r\n\r\n");
        if read == 0 || upgraded {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer[9..12].parse().unwrap();
    (status, answer)
}

#[tokio::test]
async fn an_invalid_handshake_is_refused_with_400() {
    let (_app, gate) = start("").await;
    let upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\n";
    let good_key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let version = "Sec-WebSocket-Version: 13\r\n";
    let keys = [
        ("no key", String::new(), "websocket_key"),
        (
            "an empty key",
            "Sec-WebSocket-Key: \r\n".into(),
            "websocket_key",
        ),
        (
            "not base64",
            "Sec-WebSocket-Key: not a websocket key!!\r\n".into(),
            "websocket_key",
        ),
        (
            "15 bytes",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j\r\n".into(),
            "websocket_key",
        ),
        (
            "17 bytes",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZWE=\r\n".into(),
            "websocket_key",
        ),
        (
            "no padding",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n".into(),
            "websocket_key",
        ),
        ("two keys", format!("{good_key}{good_key}"), "websocket_key"),
    ];
    for (case, key, code) in keys {
        let (status, answer) = handshake(gate.addr, &format!("{upgrade}{version}{key}")).await;
        assert_eq!(status, 400, "{case}: {answer}");
        assert!(answer.contains(code), "{case}: {answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("sec-websocket-version: 13"),
            "{case}: {answer}"
        );
    }
    let versions = [
        ("no version", String::new()),
        ("version 8", "Sec-WebSocket-Version: 8\r\n".into()),
        ("version 14", "Sec-WebSocket-Version: 14\r\n".into()),
        ("version 13 twice", format!("{version}{version}")),
        ("version 13, 8", "Sec-WebSocket-Version: 13, 8\r\n".into()),
    ];
    for (case, version) in versions {
        let (status, answer) = handshake(gate.addr, &format!("{upgrade}{version}{good_key}")).await;
        assert_eq!(status, 400, "{case}: {answer}");
        assert!(answer.contains("websocket_version"), "{case}: {answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("sec-websocket-version: 13"),
            "{case}: {answer}"
        );
    }
    let (status, answer) = handshake(gate.addr, &format!("{upgrade}{version}{good_key}")).await;
    assert_eq!(status, 101, "{answer}");
    assert!(
        answer.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "RFC 6455's example accept: {answer}"
    );
    still_serves(&gate).await;
}

/// JSON nested past any reasonable depth, inside a command's padding.
fn nested(depth: usize) -> String {
    format!("{}0{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn deeply_nested_json_commands_get_an_error_and_the_connection_stays() {
    let (_app, gate) = start("").await;
    let mut client = common::ws_connect(gate.addr, "").await;
    for depth in [129, 30_000] {
        let text = format!(r#"{{"id": 1, "op": "ping", "pad": {}}}"#, nested(depth));
        client.send(Message::text(text)).await.unwrap();
        let reply = common::ws_next_json(&mut client).await;
        assert_eq!(reply["id"], Value::Null, "{reply}");
        assert_eq!(reply["error"]["code"], "bad_json", "{reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains("recursion limit"), "{message}");
    }
    // 128 levels is within the limit.
    let text = format!(r#"{{"id": 2, "op": "ping", "pad": {}}}"#, nested(126));
    client.send(Message::text(text)).await.unwrap();
    assert_eq!(
        common::ws_next_json(&mut client).await,
        json!({"id": 2, "result": {}})
    );
    still_serves(&gate).await;
}

#[tokio::test]
async fn deeply_nested_and_oversized_publish_bodies_are_refused_clearly() {
    let (_app, gate) = start("api:\n  max_body: 64KiB\n").await;
    let post = |body: String| async move {
        let request = http::Request::post(format!("http://{}/api/publish", gate.api_addr))
            .header("authorization", format!("Bearer {}", common::API_KEY))
            .header("content-type", "application/json")
            .body(common::body(body))
            .unwrap();
        let response = common::client().request(request).await.unwrap();
        let status = response.status();
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (
            status,
            serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
        )
    };
    for body in [
        format!(r#"{{"channel": "c", "data": {}}}"#, nested(30_000)),
        format!(r#"{{"channel": "c", "data": {{"a": {}}}}}"#, nested(200)),
        "{\"a\":".repeat(10_000),
    ] {
        let (status, reply) = post(body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
        assert_eq!(reply["error"]["code"], "bad_json", "{reply}");
        let message = reply["error"]["message"].as_str().unwrap_or("");
        assert!(!message.is_empty(), "a reason: {reply}");
    }
    // In a batch, each item is answered on its own.
    let batch = format!(
        r#"[{{"channel": "c", "data": {}}}, {}, {{"channel": "c", "data": 1}}]"#,
        nested(129),
        nested(30_000)
    );
    let (status, reply) = post(batch).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply[0]["error"]["code"], "bad_json", "{reply}");
    let message = reply[0]["error"]["message"].as_str().unwrap();
    assert!(message.contains("deeper than 128"), "{message}");
    assert_eq!(reply[1]["error"]["code"], "bad_json", "{reply}");
    assert_eq!(reply[2]["results"][0]["offset"], 1, "{reply}");
    let (status, reply) = post(format!(
        r#"{{"channel": "c", "data": "{}"}}"#,
        "x".repeat(70 * 1024)
    ))
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{reply}");
    assert_eq!(reply["error"]["code"], "body_too_large");
    // Nesting up to the limit is published as sent.
    let (status, reply) = post(format!(r#"{{"channel": "c", "data": {}}}"#, nested(128))).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    still_serves(&gate).await;
}

/// Over one real connection: whatever a text frame holds, JSON or not, it
/// gets exactly one reply — under the command's id when it has a usable
/// one, with either `result` or `error` — and the connection goes on.
#[test]
fn any_text_frame_gets_one_reply_and_the_connection_stays_usable() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_app, gate) = runtime.block_on(start(
        "realtime:\n  commands_per_second: 100000\n  command_burst: 100000\n",
    ));
    // The runner's closure is `Fn`: the client sits behind a lock.
    let client = tokio::sync::Mutex::new(runtime.block_on(common::ws_connect(gate.addr, "")));
    let cases = if full_size() { 5_000 } else { 300 };
    let texts = prop_oneof![json_value().prop_map(|value| value.to_string()), ".{0,40}",];
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let sentinel = std::sync::atomic::AtomicU64::new(0);
    let result = runner.run(&texts, |text| {
        let sentinel = sentinel.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let expected_id = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|value| value.get("id").cloned())
            .filter(|id| id.is_number() || id.is_string())
            .unwrap_or(Value::Null);
        let marker = json!(format!("\u{1}sentinel {sentinel}"));
        let replies = runtime.block_on(async {
            let mut client = client.lock().await;
            client.send(Message::text(text.clone())).await.unwrap();
            let ping = json!({"id": marker, "op": "ping"}).to_string();
            client.send(Message::text(ping)).await.unwrap();
            let mut replies = Vec::new();
            loop {
                let message = common::ws_next_json(&mut client).await;
                if message["id"] == marker {
                    break replies;
                }
                // Control pushes (a reset after a subscribe that could not
                // resume) carry `op` and no `id`.
                if message.get("id").is_some() {
                    replies.push(message);
                }
            }
        });
        prop_assert_eq!(replies.len(), 1, "{}: {:?}", text, replies);
        let reply = &replies[0];
        prop_assert_eq!(&reply["id"], &expected_id, "{}", text);
        let has_result = reply.get("result").is_some();
        let has_error = reply["error"]["code"].is_string() && reply["error"]["message"].is_string();
        prop_assert!(has_result != has_error, "{}: {}", text, reply);
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    runtime.block_on(still_serves(&gate));
}
