use super::closing::close_frame;
use super::*;
use proptest::prelude::*;
use std::time::Duration;
use tokio_tungstenite::tungstenite::error::ProtocolError;

/// Serves a WebSocket echo on `listener` through pushgate's own frame
/// handling — the handshake's checks, the socket's configuration, the
/// close codes for bad frames, the answer to pings and the closing
/// handshake — so that conformance suites whose cases expect an echo
/// (Autobahn's; docs/websocket-conformance.md) can judge that handling.
/// Only what a message does differs from a session: it comes back.
async fn serve_echo(listener: tokio::net::TcpListener, ws: crate::config::WebSocketConfig) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ws = ws.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                let ws = ws.clone();
                async move {
                    let key = match handshake_key(&request) {
                        Ok(key) => key,
                        Err(refusal) => return Ok(refusal.into_response()),
                    };
                    let upgrade = hyper::upgrade::on(&mut request);
                    tokio::spawn(async move {
                        let Ok(upgraded) = upgrade.await else { return };
                        let socket = open_socket(upgraded, None, socket_config(&ws), false);
                        echo(socket, ws.ping_timeout).await;
                    });
                    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
                    Response::builder()
                        .status(StatusCode::SWITCHING_PROTOCOLS)
                        .header(header::CONNECTION, "upgrade")
                        .header(header::UPGRADE, "websocket")
                        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
                        .body(crate::body::empty())
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

/// A session's read loop (see `Connection::serve` and `on_message`),
/// echoing messages instead of running them as commands.
async fn echo(mut socket: Socket, within: Duration) {
    let end = loop {
        match socket.next().await {
            None => break End::Gone,
            Some(Err(err)) => break read_failure(&err),
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                if socket.send(message).await.is_err() {
                    break End::Gone;
                }
            }
            Some(Ok(Message::Ping(_))) => {
                if socket.flush().await.is_err() {
                    break End::Gone;
                }
            }
            Some(Ok(Message::Close(_))) => break End::PeerClosed,
            Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
        }
    };
    finish(&mut socket, end, within).await;
}

/// The echo server answers fragments with the whole message and pings
/// in between, and closes by the rules. With
/// `PUSHGATE_WS_ECHO_SECS=<n>` it first serves for n seconds, printing
/// its address, for a conformance suite to run against.
#[tokio::test]
async fn the_frame_handling_echoes_and_closes_by_the_rules() {
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::Frame;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ws = crate::config::WebSocketConfig {
        // Autobahn's largest messages (its limits cases, 9.x), read and
        // echoed: a session's own writes are publications, at most half
        // of max_write_buffer_size (config validation).
        max_message_size: crate::config::ByteSize(16 << 20),
        max_write_buffer_size: crate::config::ByteSize(64 << 20),
        ..crate::config::WebSocketConfig::default()
    };
    tokio::spawn(serve_echo(listener, ws));
    let serve_for = std::env::var("PUSHGATE_WS_ECHO_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .unwrap_or(0);
    if serve_for > 0 {
        eprintln!("WebSocket echo at ws://{addr}/ for {serve_for} s");
        tokio::time::sleep(Duration::from_secs(serve_for)).await;
    }

    let url = format!("ws://{addr}/");
    let (mut client, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let frames = [
        Frame::message(&b"frag"[..], OpCode::Data(Data::Text), false),
        Frame::ping(&b"between"[..]),
        Frame::message(&b"mented"[..], OpCode::Data(Data::Continue), true),
    ];
    for frame in frames {
        client.send(Message::Frame(frame)).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(client.next().await.unwrap().unwrap());
    }
    assert_eq!(
        got,
        [Message::Pong("between".into()), Message::text("fragmented")]
    );
    client.send(Message::binary(vec![0, 1, 2])).await.unwrap();
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::binary(vec![0, 1, 2])
    );
    // The client closes: the same code comes back, then the end.
    client.close(None).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), Message::Close(None));
    assert!(client.next().await.is_none(), "a clean end");

    // Invalid UTF-8: 1007, then the end.
    let (mut client, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let bad = Frame::message(&b"\xff"[..], OpCode::Data(Data::Text), true);
    client.send(Message::Frame(bad)).await.unwrap();
    match client.next().await.unwrap().unwrap() {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1007),
        other => panic!("expected 1007, got {other:?}"),
    }
    assert!(client.next().await.is_none(), "a clean end");
}

#[test]
fn a_handshake_key_is_16_bytes_in_base64() {
    // RFC 6455 §1.3's example, and the extremes of each position.
    for key in [
        "dGhlIHNhbXBsZSBub25jZQ==",
        "AAAAAAAAAAAAAAAAAAAAAA==",
        "/////////////////////w==",
        "+++++++++++++++++++++Q==",
        "abcdefghijklmnopqrstug==",
    ] {
        assert!(is_handshake_key(key.as_bytes()), "{key}");
    }
    for key in [
        "",
        "dGhlIHNhbXBsZSBub25jZQ",        // no padding
        "dGhlIHNhbXBsZSBub25jZQ=",       // short padding
        "dGhlIHNhbXBsZSBub25jZQ===",     // 25 characters
        "dGhlIHNhbXBsZSBub25jZR==",      // trailing bits set: not canonical
        "dGhlIHNhbXBsZSBub25j",          // 15 bytes
        "dGhlIHNhbXBsZSBub25jZWE=",      // 17 bytes
        "dGhlIHNhbXBsZSBub25jZQ-_",      // URL-safe alphabet
        "dGhlIHNhbXBsZSBub25j ZQ==",     // a space
        "dGhlIHNhbXBsZSBub25jZ\u{e9}==", // not ASCII
        "========================",
    ] {
        assert!(!is_handshake_key(key.as_bytes()), "{key:?}");
    }
}

proptest! {
    /// Any 16 bytes, base64-encoded, are a key; any other length is not.
    #[test]
    fn base64_of_16_bytes_and_nothing_else_is_a_key(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD.encode(&bytes);
        prop_assert_eq!(is_handshake_key(key.as_bytes()), bytes.len() == 16);
    }
}

#[test]
fn read_failures_close_with_the_code_rfc_6455_names() {
    use tungstenite::error::CapacityError;
    use tungstenite::Error;
    let code = |err: Error| match read_failure(&err) {
        End::Close(code, reason) => {
            assert!(!reason.is_empty(), "{err}: a reason");
            Some(code)
        }
        End::Gone | End::PeerClosed => None,
    };
    for protocol in [
        ProtocolError::NonZeroReservedBits,
        ProtocolError::UnmaskedFrameFromClient,
        ProtocolError::FragmentedControlFrame,
        ProtocolError::ControlFrameTooBig,
        ProtocolError::UnknownControlFrameType(11),
        ProtocolError::UnknownDataFrameType(3),
        ProtocolError::UnexpectedContinueFrame,
        ProtocolError::ExpectedFragment(tungstenite::protocol::frame::coding::Data::Text),
        ProtocolError::InvalidCloseSequence,
        ProtocolError::InvalidOpcode(3),
    ] {
        assert_eq!(code(Error::Protocol(protocol)), Some(1002));
    }
    assert_eq!(code(Error::Utf8), Some(1007));
    let too_long = CapacityError::MessageTooLong {
        size: 2,
        max_size: 1,
    };
    assert_eq!(code(Error::Capacity(too_long)), Some(1009));
    // Nobody is left to read a Close frame.
    assert_eq!(
        code(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)),
        None
    );
    assert_eq!(code(Error::ConnectionClosed), None);
    assert_eq!(
        code(Error::Io(std::io::ErrorKind::ConnectionReset.into())),
        None
    );
}

#[test]
fn a_close_reason_is_cut_to_123_bytes_on_a_character_boundary() {
    let reason = "é".repeat(100);
    let Message::Close(Some(frame)) = close_frame(4008, &reason) else {
        panic!("a close frame");
    };
    assert_eq!(frame.reason.len(), 122);
    assert_eq!(u16::from(frame.code), 4008);
}

/// The app is told why a connection ended by the close that ended it: a
/// failed read's close (`read_failure`) and each close pushgate sends.
#[test]
fn every_end_names_its_reason_for_the_app() {
    let close_of = |err: tungstenite::Error| read_failure(&err).reason().as_str();
    assert_eq!(
        close_of(tungstenite::Error::Capacity(
            tungstenite::error::CapacityError::MessageTooLong {
                size: 2,
                max_size: 1
            }
        )),
        "message_too_big"
    );
    assert_eq!(close_of(tungstenite::Error::Utf8), "protocol_error");
    assert_eq!(
        close_of(tungstenite::Error::Protocol(
            ProtocolError::UnmaskedFrameFromClient
        )),
        "protocol_error"
    );
    assert_eq!(
        close_of(tungstenite::Error::ConnectionClosed),
        "connection_lost"
    );
    for (end, reason) in [
        (End::slow_consumer(), "slow_consumer"),
        (End::PeerClosed, "client_closed"),
        (End::Gone, "connection_lost"),
        (
            End::Close(close::RATE_LIMITED, String::new()),
            "rate_limited",
        ),
        (End::Close(close::GOING_AWAY, String::new()), "shutdown"),
        (End::Close(4001, String::new()), "auth_expired"),
        (End::Close(4000, String::new()), "app_disconnect"),
    ] {
        assert_eq!(end.reason().as_str(), reason, "{end:?}");
    }
}

/// An idle connection holds its task: tokio's cell, 112 bytes around the
/// future [`run`] makes, rounded up to 128. At most 784 bytes of future keep
/// the cell in jemalloc's 896-byte class; past that, every connection costs
/// 128 bytes more (docs/benchmarks.md, scenario c).
#[test]
fn an_idle_connections_task_stays_in_the_896_byte_class() {
    fn future_size<F: std::future::Future>(_: fn(Box<Opening>) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    let size = future_size(run);
    assert!(
        size <= 784,
        "a WebSocket connection's task future is {size} bytes: over 784, its task \
         cell leaves the 896-byte class"
    );
}
