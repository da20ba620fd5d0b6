//! WebSocket compression (permessage-deflate, RFC 7692) over raw sockets:
//! what each shape of offer is answered, the bytes of compressed and
//! uncompressed publications on the wire, compressed commands from the
//! client, and the refusals of what breaks the extension — each followed by
//! a check that the server still serves.

use crate::common;
use crate::ws_abuse::{
    frame, start, still_serves, whole, Raw, Received, BINARY, CONTINUATION, PING, PONG, TEXT,
};

use http::StatusCode;
use pushgate::deflate::{compress, inflate, TRAILER};
use serde_json::{json, Value};

/// What pushgate answers an offer it takes.
const ACCEPTED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// RSV1, in the bits `frame` takes.
const RSV1: u8 = 0b100;

fn offer(value: &str) -> String {
    format!("Sec-WebSocket-Extensions: {value}\r\n")
}

/// The 101's `Sec-WebSocket-Extensions` value, if any.
fn extensions(head: &str) -> Option<String> {
    head.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| value.trim().to_owned())
    })
}

/// A text message as the client sends it: compressed (RSV1) or not.
fn text(json: &Value, compressed: bool) -> Vec<u8> {
    let bytes = json.to_string().into_bytes();
    if compressed {
        let body = compress(&bytes).expect("the test's commands compress");
        frame(true, RSV1, TEXT, true, &body)
    } else {
        whole(TEXT, &bytes)
    }
}

/// A message's payload as the client reads it: inflated when RSV1 is set.
fn payload(message: &Received) -> Vec<u8> {
    if message.rsv1 {
        let mut wire = message.payload.clone();
        wire.extend_from_slice(&TRAILER);
        inflate(&wire, 1 << 20).expect("the server's compressed message inflates")
    } else {
        message.payload.clone()
    }
}

/// The next text message (skipping pongs): whether it came compressed,
/// and its JSON text.
async fn next_text(raw: &mut Raw) -> (bool, Vec<u8>) {
    loop {
        let message = raw.next().await.expect("a message before the close");
        match message.opcode {
            PONG => continue,
            TEXT => {
                assert!(message.fin, "a message in one frame");
                return (message.rsv1, payload(&message));
            }
            other => panic!("unexpected opcode {other}"),
        }
    }
}

/// Sends a command (compressed or not) and returns its reply.
async fn command(raw: &mut Raw, json: Value, compressed: bool) -> Value {
    raw.send(&text(&json, compressed)).await;
    let (_, reply) = next_text(raw).await;
    serde_json::from_slice(&reply).unwrap()
}

/// A publication's data of about `len` bytes of JSON that compresses well.
fn data_of(len: usize) -> Value {
    let words = ["price", "volume", "bid", "ask", "symbol"];
    let mut rows = Vec::new();
    let mut size = 0;
    let mut n = 0;
    while size < len {
        let mut row = serde_json::Map::new();
        row.insert("symbol".into(), format!("S{n}").into());
        row.insert(words[n % 5].into(), (n * 7).into());
        let row = Value::Object(row);
        size += row.to_string().len() + 1;
        rows.push(row);
        n += 1;
    }
    Value::Array(rows)
}

async fn publish(gate: &common::Pushgate, channel: &str, data: &Value) -> Value {
    let (status, body) = common::api_call(
        gate.api_addr,
        "POST",
        "/api/publish",
        Some(json!({"channel": channel, "data": data})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["results"][0].clone()
}

#[tokio::test]
async fn every_shape_of_offer_gets_the_answer_it_should_and_the_connection_works() {
    let (_app, gate) = start("").await;
    let cases: &[(&str, String, bool)] = &[
        ("no offer", String::new(), false),
        (
            "Chromium's",
            offer("permessage-deflate; client_max_window_bits"),
            true,
        ),
        ("bare", offer("permessage-deflate"), true),
        (
            "Python websockets'",
            offer("permessage-deflate; client_max_window_bits=12"),
            true,
        ),
        (
            "both no_context_takeover",
            offer("permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
            true,
        ),
        (
            "server_max_window_bits=15, quoted",
            offer("permessage-deflate; server_max_window_bits=\"15\""),
            true,
        ),
        (
            "a smaller server window",
            offer("permessage-deflate; server_max_window_bits=10"),
            false,
        ),
        (
            "a smaller server window, then a fallback",
            offer("permessage-deflate; server_max_window_bits=10, permessage-deflate; client_max_window_bits"),
            true,
        ),
        (
            "across two fields",
            format!("{}{}", offer("x-webkit-deflate-frame"), offer("permessage-deflate")),
            true,
        ),
        ("another extension", offer("x-webkit-deflate-frame"), false),
        ("an unknown parameter", offer("permessage-deflate; mystery"), false),
        (
            "a parameter twice",
            offer("permessage-deflate; client_no_context_takeover; client_no_context_takeover"),
            false,
        ),
        (
            "a window out of range",
            offer("permessage-deflate; client_max_window_bits=16"),
            false,
        ),
        ("malformed: an open quote", offer("permessage-deflate; a=\"b"), false),
        ("malformed: no name", offer(";;, ;"), false),
        (
            "malformed beside a good field",
            format!("{}{}", offer("permessage-deflate"), offer("permessage-deflate x")),
            false,
        ),
    ];
    for (case, fields, accepted) in cases {
        let (mut raw, head) = Raw::connect_with(gate.addr, fields).await;
        let answer = extensions(&head);
        assert_eq!(
            answer.as_deref(),
            accepted.then_some(ACCEPTED),
            "{case}: {head}"
        );
        let reply = command(&mut raw, json!({"id": 1, "op": "ping"}), false).await;
        assert_eq!(reply, json!({"id": 1, "result": {}}), "{case}");
        if *accepted {
            let padded = json!({"id": 2, "op": "ping", "pad": "x".repeat(100)});
            let reply = command(&mut raw, padded, true).await;
            assert_eq!(reply, json!({"id": 2, "result": {}}), "{case}");
        }
    }
}

#[tokio::test]
async fn a_large_publication_goes_compressed_and_a_small_one_does_not() {
    let (_app, gate) = start("").await;
    let (mut deflating, head) = Raw::connect_with(
        gate.addr,
        &offer("permessage-deflate; client_max_window_bits"),
    )
    .await;
    assert_eq!(extensions(&head).as_deref(), Some(ACCEPTED));
    let mut plain = Raw::connect(gate.addr).await;
    for raw in [&mut deflating, &mut plain] {
        let reply = command(
            raw,
            json!({"id": 1, "op": "subscribe", "channel": "prices"}),
            false,
        )
        .await;
        assert!(reply["result"].is_object(), "{reply}");
    }

    let large = data_of(2048);
    let small = json!({"n": 1});
    let first = publish(&gate, "prices", &large).await;
    let second = publish(&gate, "prices", &small).await;

    let (compressed, large_text) = next_text(&mut deflating).await;
    let (plain_compressed, plain_large) = next_text(&mut plain).await;
    assert!(compressed, "a 2 KiB publication goes compressed");
    assert!(!plain_compressed);
    // The same envelope, byte for byte, whichever way it travelled.
    assert_eq!(large_text, plain_large);
    let envelope: Value = serde_json::from_slice(&large_text).unwrap();
    assert_eq!(
        envelope,
        json!({"channel": "prices", "epoch": first["epoch"], "offset": first["offset"], "data": large})
    );

    let (compressed, small_text) = next_text(&mut deflating).await;
    let (_, plain_small) = next_text(&mut plain).await;
    assert!(!compressed, "a small publication goes as it is");
    assert_eq!(small_text, plain_small);
    assert_eq!(
        serde_json::from_slice::<Value>(&small_text).unwrap(),
        json!({"channel": "prices", "epoch": second["epoch"], "offset": second["offset"], "data": small})
    );

    // A replay on subscribe goes compressed too.
    let mut late = Raw::connect_with(gate.addr, &offer("permessage-deflate"))
        .await
        .0;
    let since = format!("{}:0", first["epoch"].as_str().unwrap());
    let reply = command(
        &mut late,
        json!({"id": 1, "op": "subscribe", "channel": "prices", "since": since}),
        false,
    )
    .await;
    assert_eq!(reply["result"]["recovered"], true, "{reply}");
    assert_eq!(next_text(&mut late).await, (true, large_text));
    assert_eq!(next_text(&mut late).await, (false, small_text));
}

#[tokio::test]
async fn compression_can_be_turned_off_or_kept_for_larger_publications() {
    let (_app, off) =
        start("realtime:\n  websocket:\n    compression:\n      enabled: false\n").await;
    let (_, head) = Raw::connect_with(off.addr, &offer("permessage-deflate")).await;
    assert_eq!(extensions(&head), None, "{head}");

    let (_app, larger) =
        start("realtime:\n  websocket:\n    compression:\n      min_size: 4KiB\n").await;
    let (mut raw, head) = Raw::connect_with(larger.addr, &offer("permessage-deflate")).await;
    assert_eq!(extensions(&head).as_deref(), Some(ACCEPTED));
    command(
        &mut raw,
        json!({"id": 1, "op": "subscribe", "channel": "c"}),
        false,
    )
    .await;
    publish(&larger, "c", &data_of(2048)).await;
    publish(&larger, "c", &data_of(8192)).await;
    assert!(!next_text(&mut raw).await.0, "under min_size: as it is");
    assert!(next_text(&mut raw).await.0, "over min_size: compressed");
}

#[tokio::test]
async fn compressed_commands_are_carried_out_however_they_are_framed() {
    let (_app, gate) = start("").await;
    let (mut raw, _) = Raw::connect_with(gate.addr, &offer("permessage-deflate")).await;
    let subscribe = json!({"id": 1, "op": "subscribe", "channel": "news", "note": "n".repeat(200)});
    let reply = command(&mut raw, subscribe, true).await;
    assert_eq!(reply["id"], 1);
    assert!(reply["result"]["epoch"].is_string(), "{reply}");

    // In three fragments, a ping between the first two, the compressed
    // and plain messages mixed.
    let ping_command = json!({"id": 2, "op": "ping", "pad": "abc".repeat(100)});
    let body = compress(ping_command.to_string().as_bytes()).unwrap();
    let (a, rest) = body.split_at(body.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let bytes = [
        frame(false, RSV1, TEXT, true, a),
        whole(PING, b"between"),
        frame(false, 0, CONTINUATION, true, b),
        frame(true, 0, CONTINUATION, true, c),
        whole(TEXT, json!({"id": 3, "op": "ping"}).to_string().as_bytes()),
    ]
    .concat();
    raw.send(&bytes).await;
    let pong = raw.next().await.unwrap();
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (PONG, &b"between"[..])
    );
    let replies = [next_text(&mut raw).await.1, next_text(&mut raw).await.1];
    let replies: Vec<Value> = replies
        .iter()
        .map(|r| serde_json::from_slice(r).unwrap())
        .collect();
    assert_eq!(
        replies,
        [
            json!({"id": 2, "result": {}}),
            json!({"id": 3, "result": {}})
        ]
    );
    // Replies go uncompressed, whatever the command was.
    let padded = json!({"id": 4, "op": "ping", "pad": "z".repeat(1000)});
    raw.send(&text(&padded, true)).await;
    let (compressed, reply) = next_text(&mut raw).await;
    assert!(!compressed);
    assert_eq!(
        serde_json::from_slice::<Value>(&reply).unwrap(),
        json!({"id": 4, "result": {}})
    );
}

#[tokio::test]
async fn what_breaks_the_extension_closes_with_its_code() {
    let (_app, gate) = start("").await;
    // 16 MiB of spaces in a JSON string: about 16 KiB compressed.
    let mut bomb = b"{\"id\":1,\"op\":\"ping\",\"x\":\"".to_vec();
    bomb.resize(16 << 20, b' ');
    let bomb = compress(&bomb).unwrap();
    assert!(bomb.len() < 64 << 10, "under max_message_size on the wire");
    let invalid_utf8 = compress(&[b"\"".as_slice(), &[0xff; 300], b"\""].concat()).unwrap();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("a deflate bomb", frame(true, RSV1, TEXT, true, &bomb), 1009),
        ("RSV1 on a ping", frame(true, RSV1, PING, true, b""), 1002),
        (
            "RSV1 on a continuation",
            [
                frame(false, RSV1, BINARY, true, &[0x00]),
                frame(true, RSV1, CONTINUATION, true, &[0x00]),
            ]
            .concat(),
            1002,
        ),
        (
            "data that does not inflate",
            frame(true, RSV1, TEXT, true, &[0xff, 0xff]),
            1007,
        ),
        (
            "text that inflates to invalid UTF-8",
            frame(true, RSV1, TEXT, true, &invalid_utf8),
            1007,
        ),
    ];
    for (case, bytes, code) in cases {
        let (mut raw, head) = Raw::connect_with(gate.addr, &offer("permessage-deflate")).await;
        assert_eq!(extensions(&head).as_deref(), Some(ACCEPTED), "{case}");
        raw.send(&whole(PING, b"sound")).await;
        assert_eq!(raw.next().await.unwrap().opcode, PONG, "{case}");
        raw.send(&bytes).await;
        assert_eq!(raw.closed().await, Some(code), "{case}");
        still_serves(&gate).await;
    }
    // Without the extension, RSV1 is tungstenite's to refuse, as before.
    let mut raw = Raw::connect(gate.addr).await;
    raw.send(&frame(
        true,
        RSV1,
        TEXT,
        true,
        &compress(&[b'a'; 100]).unwrap(),
    ))
    .await;
    assert_eq!(raw.closed().await, Some(1002));
}
