//! The WebSocket transport with a real client (tokio-tungstenite) over
//! sockets: commands and replies, resume without loss, resets, slow
//! consumers, the heartbeat, Origin, limits, malformed input, shutdown.

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{ws_close_code as close_code, ws_next_json as next_json};
use common::{Pushgate, StalledReader, Upstream, API_KEY};
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const PATIENCE: Duration = Duration::from_secs(10);

async fn connect(gate: &Pushgate, query: &str) -> Client {
    let url = format!("ws://{}/realtime/ws{query}", gate.addr);
    let (client, response) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake in time")
        .expect("handshake accepted");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    client
}

async fn command(client: &mut Client, command: Value) -> Value {
    client
        .send(Message::text(command.to_string()))
        .await
        .unwrap();
    let id = command["id"].clone();
    loop {
        let reply = next_json(client).await;
        if reply.get("id") == Some(&id) {
            return reply;
        }
    }
}

async fn publish(api: SocketAddr, channel: &str, data: Value) -> Value {
    let request = http::Request::post(format!("http://{api}/api/publish"))
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .body(common::body(
            json!({"channel": channel, "data": data}).to_string(),
        ))
        .unwrap();
    let response = common::client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    serde_json::from_slice::<Value>(&bytes).unwrap()["results"][0].clone()
}

async fn metric(api: SocketAddr, line_start: &str) -> i64 {
    let (_, text) = common::get(&format!("http://{api}/metrics")).await;
    text.lines()
        .find_map(|line| line.strip_prefix(line_start))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_start} in {text}"))
}

/// Waits, up to a bound, until the metric reads `value`.
async fn metric_becomes(api: SocketAddr, line_start: &str, value: i64) {
    let deadline = Instant::now() + PATIENCE;
    while metric(api, line_start).await != value {
        assert!(
            Instant::now() < deadline,
            "{line_start} never became {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start(extra: &str) -> (Upstream, Pushgate) {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), extra).await;
    (app, gate)
}

#[tokio::test]
async fn subscribe_then_receive_envelopes_without_op_or_id() {
    let (_app, gate) = start("").await;
    let mut client = connect(&gate, "").await;
    let reply = command(
        &mut client,
        json!({"id": 1, "op": "subscribe", "channel": "chat"}),
    )
    .await;
    assert_eq!(reply["result"]["recovered"], true);
    assert_eq!(reply["result"]["offset"], 0);
    assert!(reply["result"]["epoch"].is_string());

    let published = publish(gate.api_addr, "chat", json!({"text": "hi"})).await;
    let envelope = next_json(&mut client).await;
    assert_eq!(
        envelope,
        json!({"channel": "chat", "epoch": published["epoch"], "offset": 1, "data": {"text": "hi"}})
    );

    let pong = command(&mut client, json!({"id": "p", "op": "ping"})).await;
    assert_eq!(pong, json!({"id": "p", "result": {}}));
    let gone = command(
        &mut client,
        json!({"id": 2, "op": "unsubscribe", "channel": "chat"}),
    )
    .await;
    assert_eq!(gone["result"], json!({}));
    publish(gate.api_addr, "chat", json!(2)).await;
    let again = command(&mut client, json!({"id": 3, "op": "ping"})).await;
    assert_eq!(
        again["id"], 3,
        "nothing arrived for the dropped channel before this reply"
    );
}

#[tokio::test]
async fn channels_named_in_the_query_are_subscribed_at_connect() {
    let (_app, gate) = start("").await;
    let mut client = connect(&gate, "?channel=a&channel=b").await;
    // The subscriptions exist once the server says so.
    metric_becomes(
        gate.api_addr,
        "pushgate_subscriptions{transport=\"websocket\"}",
        2,
    )
    .await;
    publish(gate.api_addr, "b", json!("to b")).await;
    publish(gate.api_addr, "a", json!("to a")).await;
    assert_eq!(next_json(&mut client).await["data"], "to b");
    assert_eq!(next_json(&mut client).await["data"], "to a");
}

#[tokio::test]
async fn resume_with_since_across_a_disconnect_loses_and_repeats_nothing() {
    let (_app, gate) = start("history:\n  size: 1000\n").await;
    const TOTAL: u64 = 300;
    let api = gate.api_addr;
    let publisher = tokio::spawn(async move {
        for n in 1..=TOTAL {
            publish(api, "feed", json!(n)).await;
            if n % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    let mut received: Vec<u64> = Vec::new();
    let mut position: Option<String> = None;
    let mut round = 0;
    while received.len() < TOTAL as usize {
        round += 1;
        assert!(round < 100, "too many reconnects");
        let mut client = connect(&gate, "").await;
        let mut subscribe = json!({"id": round, "op": "subscribe", "channel": "feed"});
        if let Some(since) = &position {
            subscribe["since"] = json!(since);
        }
        let reply = command(&mut client, subscribe).await;
        assert_eq!(reply["result"]["recovered"], true, "{reply}");
        if position.is_none() {
            // Started from now: anything before the reply is not wanted.
            let start = reply["result"]["offset"].as_u64().unwrap();
            received.extend(1..=start);
        }
        // Read a few, then drop the connection mid-stream.
        for _ in 0..40 {
            if received.len() == TOTAL as usize {
                break;
            }
            let envelope = next_json(&mut client).await;
            let n = envelope["data"].as_u64().unwrap();
            assert_eq!(envelope["offset"].as_u64(), Some(n));
            received.push(n);
            position = Some(format!("{}:{}", envelope["epoch"].as_str().unwrap(), n));
        }
        drop(client);
    }
    publisher.await.unwrap();
    assert_eq!(
        received,
        (1..=TOTAL).collect::<Vec<_>>(),
        "every message once, in order"
    );
}

#[tokio::test]
async fn a_gap_older_than_history_is_reset_explicitly() {
    let (_app, gate) = start("history:\n  size: 5\n").await;
    let first = publish(gate.api_addr, "h", json!(1)).await;
    for n in 2..=20 {
        publish(gate.api_addr, "h", json!(n)).await;
    }
    let epoch = first["epoch"].as_str().unwrap();
    let mut client = connect(&gate, "").await;
    let reply = command(
        &mut client,
        json!({"id": 1, "op": "subscribe", "channel": "h", "since": format!("{epoch}:1")}),
    )
    .await;
    assert_eq!(reply["result"]["recovered"], false);
    assert_eq!(reply["result"]["offset"], 20);
    let reset = next_json(&mut client).await;
    assert_eq!(
        reset,
        json!({"op": "reset", "channel": "h", "epoch": epoch, "offset": 20})
    );
    publish(gate.api_addr, "h", json!(21)).await;
    assert_eq!(
        next_json(&mut client).await["offset"],
        21,
        "live after the reset"
    );

    // Inside history: an exact replay.
    let mut client = connect(&gate, "").await;
    let reply = command(
        &mut client,
        json!({"id": 1, "op": "subscribe", "channel": "h", "since": format!("{epoch}:18")}),
    )
    .await;
    assert_eq!(reply["result"]["recovered"], true);
    for offset in 19..=21 {
        assert_eq!(next_json(&mut client).await["offset"], offset);
    }
}

#[tokio::test]
async fn malformed_input_gets_error_replies_and_the_connection_stays() {
    let (_app, gate) = start("").await;
    let mut client = connect(&gate, "").await;
    let cases = [
        ("{not json", Value::Null, "bad_json"),
        (r#"{"id": 1}"#, json!(1), "bad_command"),
        (r#"{"id": 2, "op": "dance"}"#, json!(2), "unknown_op"),
        (
            r#"{"id": 3, "op": "subscribe"}"#,
            json!(3),
            "missing_channel",
        ),
        (
            r#"{"id": 4, "op": "subscribe", "channel": "no spaces"}"#,
            json!(4),
            "bad_channel",
        ),
        (
            r#"{"id": 5, "op": "subscribe", "channel": "c", "since": "nope"}"#,
            json!(5),
            "bad_position",
        ),
        (
            r#"{"id": 6, "op": "unsubscribe", "channel": "c"}"#,
            json!(6),
            "not_subscribed",
        ),
        (r#"{"op": "ping"}"#, Value::Null, "bad_command"),
        (r#"{"id": [1], "op": "ping"}"#, Value::Null, "bad_command"),
    ];
    for (text, id, code) in cases {
        client.send(Message::text(text)).await.unwrap();
        let reply = next_json(&mut client).await;
        assert_eq!(reply["id"], id, "{text}: {reply}");
        assert_eq!(reply["error"]["code"], code, "{text}: {reply}");
        assert!(reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    client.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    let reply = next_json(&mut client).await;
    assert_eq!(reply["error"]["code"], "binary_not_supported");
    let subscribed = command(
        &mut client,
        json!({"id": 7, "op": "subscribe", "channel": "c"}),
    )
    .await;
    assert!(
        subscribed.get("result").is_some(),
        "still usable: {subscribed}"
    );
    let twice = command(
        &mut client,
        json!({"id": 8, "op": "subscribe", "channel": "c"}),
    )
    .await;
    assert_eq!(twice["error"]["code"], "already_subscribed");
}

/// The read buffer is small (an idle connection holds it for good), so a
/// command over it must still arrive whole: a long channel name, a frame
/// bigger than the buffer, and a message in several fragments.
#[tokio::test]
async fn commands_bigger_than_the_read_buffer_arrive_whole() {
    let (_app, gate) = start("").await;
    let mut client = connect(&gate, "").await;
    let channel = format!("long:{}", "x".repeat(250));
    let reply = command(
        &mut client,
        json!({"id": 1, "op": "subscribe", "channel": channel, "pad": "y".repeat(4000)}),
    )
    .await;
    assert_eq!(reply["result"]["recovered"], true, "{reply}");

    // One text message in three frames, each over the buffer.
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let text = json!({"id": 2, "op": "ping", "pad": "z".repeat(3000)}).to_string();
    let (a, rest) = text.as_bytes().split_at(1000);
    let (b, c) = rest.split_at(1000);
    let frames = [
        Frame::message(a.to_vec(), OpCode::Data(Data::Text), false),
        Frame::message(b.to_vec(), OpCode::Data(Data::Continue), false),
        Frame::message(c.to_vec(), OpCode::Data(Data::Continue), true),
    ];
    for frame in frames {
        client.send(Message::Frame(frame)).await.unwrap();
    }
    let pong = next_json(&mut client).await;
    assert_eq!(pong, json!({"id": 2, "result": {}}));

    publish(gate.api_addr, &channel, json!("after")).await;
    let envelope = next_json(&mut client).await;
    assert_eq!(envelope["data"], "after");
}

#[tokio::test]
async fn a_message_over_the_size_limit_closes_with_1009() {
    let (_app, gate) = start("realtime:\n  websocket:\n    max_message_size: 1KiB\n").await;
    let mut client = connect(&gate, "").await;
    let big = json!({"id": 1, "op": "ping", "pad": "x".repeat(4096)}).to_string();
    client.send(Message::text(big)).await.unwrap();
    assert_eq!(close_code(&mut client).await, Some(1009));
}

#[tokio::test]
async fn a_foreign_origin_is_refused_at_the_handshake() {
    let (_app, gate) = start("").await;
    let url = format!("ws://{}/realtime/ws", gate.addr);
    let mut request = url.clone().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", "http://evil.example".parse().unwrap());
    let refused = tokio_tungstenite::connect_async(request).await.unwrap_err();
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), StatusCode::FORBIDDEN)
        }
        other => panic!("expected 403, got {other:?}"),
    }

    // The page's own origin is allowed.
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", format!("http://{}", gate.addr).parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .expect("same origin allowed");

    // A configured origin is allowed, others still refused.
    let app = Upstream::start().await;
    let gate = Pushgate::start(
        &app.url(),
        "realtime:\n  allowed_origins: [\"https://*.example.com\"]\n",
    )
    .await;
    for (origin, allowed) in [
        ("https://app.example.com", true),
        ("https://example.com", false),
        ("http://app.example.com", false),
        ("https://app.example.com.evil.net", false),
    ] {
        let mut request = format!("ws://{}/realtime/ws", gate.addr)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        let result = tokio_tungstenite::connect_async(request).await;
        assert_eq!(result.is_ok(), allowed, "{origin}");
    }
}

#[tokio::test]
async fn a_dead_peer_is_dropped_by_the_heartbeat() {
    let (_app, gate) =
        start("realtime:\n  websocket:\n    ping_interval: 200ms\n    ping_timeout: 200ms\n").await;
    // A client that never reads never answers the server's pings.
    let _silent = connect(&gate, "?channel=c").await;
    metric_becomes(
        gate.api_addr,
        "pushgate_connections{transport=\"websocket\"}",
        1,
    )
    .await;
    let started = Instant::now();
    metric_becomes(
        gate.api_addr,
        "pushgate_connections{transport=\"websocket\"}",
        0,
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));

    // A client that reads (and so answers pings) stays.
    let mut alive = connect(&gate, "?channel=c").await;
    let reader = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_millis(1200);
        while Instant::now() < deadline {
            if tokio::time::timeout(Duration::from_millis(100), alive.next())
                .await
                .is_ok_and(|m| m.is_none())
            {
                return false;
            }
        }
        true
    });
    assert!(
        reader.await.unwrap(),
        "a live peer is kept across several pings"
    );
}

#[tokio::test]
async fn a_slow_consumer_is_closed_with_4008_and_the_others_get_everything() {
    let (_app, gate) = start(
        "limits:\n  queue_messages: 5\nhistory:\n  size: 1000\nrealtime:\n  websocket:\n    ping_timeout: 30s\n",
    )
    .await;
    let mut slow = connect(&gate, "?channel=flood").await;
    let mut fast = connect(&gate, "?channel=flood").await;
    metric_becomes(
        gate.api_addr,
        "pushgate_subscriptions{transport=\"websocket\"}",
        2,
    )
    .await;

    let fast_reader = tokio::spawn(async move {
        let mut offsets = Vec::new();
        while offsets.len() < 400 {
            let envelope = next_json(&mut fast).await;
            offsets.push(envelope["offset"].as_u64().unwrap());
        }
        offsets
    });
    // Large publications fill the slow client's socket, then its queue.
    let pad = "x".repeat(32 * 1024);
    for n in 0..400 {
        publish(gate.api_addr, "flood", json!({"n": n, "pad": pad})).await;
    }
    metric_becomes(gate.api_addr, "pushgate_slow_consumers_total", 1).await;
    assert_eq!(
        fast_reader.await.unwrap(),
        (1..=400).collect::<Vec<_>>(),
        "the fast client got everything, in order"
    );
    // The slow client reads what was sent, then the 4008 close.
    assert_eq!(close_code(&mut slow).await, Some(4008));
}

/// What a client has not read is bounded by what pushgate counts: its
/// session's queue (`limits.queue_bytes`), the bytes the kernel may hold
/// unsent (`limits.unsent_bytes`) and the client's own receive buffer. A
/// client that stops reading is cut off as a slow consumer once those are
/// full, not after the kernel has grown the socket's send buffer to its
/// maximum (4 MiB by default) unseen.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_within_the_queue_and_the_unsent_bound() {
    let bound = StalledReader::SMALL;
    let (_app, gate) = start(&format!(
        "{}realtime: {{websocket: {{ping_timeout: 30s}}}}\n",
        bound.config()
    ))
    .await;
    let (stream, receive_buffer) = StalledReader::connect(gate.addr).await;
    let url = format!("ws://{}/realtime/ws?channel=stalled", gate.addr);
    let (_slow, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    metric_becomes(
        gate.api_addr,
        "pushgate_subscriptions{transport=\"websocket\"}",
        1,
    )
    .await;
    bound
        .publish_until_cut(gate.api_addr, "stalled", receive_buffer)
        .await;
}

#[tokio::test]
async fn persistent_command_floods_are_closed_with_4029() {
    let (_app, gate) = start("realtime:\n  commands_per_second: 1\n  command_burst: 3\n").await;
    let mut client = connect(&gate, "").await;
    let mut limited = 0;
    for id in 0..20 {
        let sent = client
            .send(Message::text(json!({"id": id, "op": "ping"}).to_string()))
            .await;
        if sent.is_err() {
            break;
        }
    }
    let code = loop {
        match tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(text))) => {
                let reply: Value = serde_json::from_str(text.as_str()).unwrap();
                if reply["error"]["code"] == "rate_limited" {
                    limited += 1;
                }
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert!(limited >= 1, "excess commands get error replies first");
    assert_eq!(code, Some(4029));
}

#[tokio::test]
async fn limits_per_address_and_per_connection_close_with_reasons() {
    let (_app, gate) = start("realtime:\n  max_connections_per_ip: 2\n  max_channels: 2\n").await;
    let _one = connect(&gate, "").await;
    let _two = connect(&gate, "").await;
    // The third is accepted, then closed with 4029 and a reason a browser
    // can read.
    let mut three = connect(&gate, "").await;
    assert_eq!(close_code(&mut three).await, Some(4029));

    drop(_one);
    metric_becomes(
        gate.api_addr,
        "pushgate_connections{transport=\"websocket\"}",
        1,
    )
    .await;
    let mut four = connect(&gate, "?channel=a&channel=b").await;
    let third = command(
        &mut four,
        json!({"id": 1, "op": "subscribe", "channel": "c"}),
    )
    .await;
    assert_eq!(third["error"]["code"], "too_many_channels");
}

#[tokio::test]
async fn shutdown_closes_websockets_with_1001() {
    let app = Upstream::start().await;
    let mut gate = Pushgate::start(&app.url(), "").await;
    let mut client = connect(&gate, "?channel=c").await;
    metric_becomes(
        gate.api_addr,
        "pushgate_connections{transport=\"websocket\"}",
        1,
    )
    .await;
    let done = gate.shutdown();
    assert_eq!(close_code(&mut client).await, Some(1001));
    tokio::time::timeout(PATIENCE, done)
        .await
        .expect("shutdown finishes")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_plain_get_on_the_websocket_path_is_told_to_upgrade() {
    let (_app, gate) = start("").await;
    let (status, body) = common::get(&format!("http://{}/realtime/ws", gate.addr)).await;
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED);
    assert!(body.contains("websocket_required"), "{body}");
    let (status, body) = common::get(&format!("http://{}/realtime/nothing", gate.addr)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("not_found"), "{body}");
    // Paths that only start like the prefix still go to the app.
    let (status, body) = common::get(&format!("http://{}/realtimeish", gate.addr)).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "hello from upstream")
    );
}

#[tokio::test]
async fn messages_closer_than_the_coalesce_window_wait_for_it_and_arrive_in_order() {
    let window = Duration::from_millis(600);
    let (_app, gate) = start("realtime:\n  coalesce_window: 600ms\n").await;
    let mut client = connect(&gate, "?channel=c").await;
    let reply = command(&mut client, json!({"id": 1, "op": "ping"})).await;
    assert_eq!(reply["id"], 1);

    // The first message after a quiet spell goes out at once…
    let start = Instant::now();
    publish(gate.api_addr, "c", json!(1)).await;
    assert_eq!(next_json(&mut client).await["data"], 1);
    // …the next ones, published right after, wait until a window has
    // passed since that write, and then come together in order.
    publish(gate.api_addr, "c", json!(2)).await;
    publish(gate.api_addr, "c", json!(3)).await;
    assert_eq!(next_json(&mut client).await["data"], 2);
    assert!(
        start.elapsed() >= window,
        "the second message came {:?} after the first was published, inside the window",
        start.elapsed()
    );
    assert_eq!(next_json(&mut client).await["data"], 3);
}

#[tokio::test]
async fn a_burst_within_the_coalesce_window_is_written_early_rather_than_cut_off() {
    let (_app, gate) = start(
        "realtime:\n  coalesce_window: 1s\nlimits:\n  queue_messages: 4\nhistory:\n  size: 100\n",
    )
    .await;
    let mut client = connect(&gate, "?channel=b").await;
    let reply = command(&mut client, json!({"id": 1, "op": "ping"})).await;
    assert_eq!(reply["id"], 1);

    // Twelve messages within the window would overflow a queue of four if
    // the connection waited the window out; past half full it writes now.
    for n in 0..12 {
        publish(gate.api_addr, "b", json!(n)).await;
    }
    for n in 0..12 {
        assert_eq!(next_json(&mut client).await["data"], n);
    }
    let reply = command(&mut client, json!({"id": 2, "op": "ping"})).await;
    assert_eq!(reply["id"], 2, "still open: not cut off as a slow consumer");
    assert_eq!(
        metric(gate.api_addr, "pushgate_slow_consumers_total").await,
        0
    );
}

/// A client that stops reading is cut off with 4008, and the Close frame
/// goes out as soon as the session is marked slow: directly behind what was
/// already written, not after the rest of its queue nor after a write
/// timeout that started before. It reads everything it was sent, then the
/// close, and resumes without a gap or a duplicate.
#[tokio::test]
async fn a_client_that_stops_reading_sees_4008_promptly_and_resumes_exactly() {
    // The write blocks from the first large publication on (the socket
    // takes limits.unsent_bytes, the client 16 KiB), and everything below
    // until the client reads must fit in the write timeout with room to
    // spare on a busy machine.
    let ping_timeout = Duration::from_secs(8);
    let away = Duration::from_secs(2);
    let (_app, gate) = start(
        "limits:\n  queue_messages: 200\n  queue_bytes: 32MiB\nhistory:\n  size: 5000\nrealtime:\n  websocket:\n    ping_timeout: 8s\n",
    )
    .await;
    // A small receive buffer, so the server's writes block early.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(gate.addr).await.unwrap();
    let url = format!("ws://{}/realtime/ws?channel=flood", gate.addr);
    let (mut slow, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    metric_becomes(
        gate.api_addr,
        "pushgate_subscriptions{transport=\"websocket\"}",
        1,
    )
    .await;

    // More than the socket buffers hold, but less than the queue: the
    // session's write blocks on the client, and it is not behind yet…
    let big = "x".repeat(64 * 1024);
    let blocked = Instant::now();
    let mut published = 0u64;
    for _ in 0..100 {
        publish(gate.api_addr, "flood", json!({"pad": big})).await;
        published += 1;
    }
    // …for a quarter of the write timeout, and then the queue overflows.
    tokio::time::sleep(away).await;
    let marked = loop {
        publish(gate.api_addr, "flood", json!({"pad": "y"})).await;
        published += 1;
        if published.is_multiple_of(20)
            && metric(gate.api_addr, "pushgate_slow_consumers_total").await == 1
        {
            break Instant::now();
        }
        assert!(published < 2000, "never marked slow");
    };
    // The client stays away a while longer (well inside ping_timeout after
    // it was marked slow), then reads: every envelope in order, then 4008.
    tokio::time::sleep(away).await;
    assert!(
        blocked.elapsed() < ping_timeout,
        "the test took its write timeout to get here"
    );
    let reading = Instant::now();
    let mut last = 0u64;
    let mut epoch = String::new();
    let code = loop {
        let message = tokio::time::timeout(PATIENCE, slow.next())
            .await
            .expect("the close in time");
        match message {
            Some(Ok(Message::Text(text))) => {
                let envelope: Value = serde_json::from_str(text.as_str()).unwrap();
                let offset = envelope["offset"].as_u64().unwrap();
                assert_eq!(offset, last + 1, "in order, nothing skipped");
                last = offset;
                epoch = envelope["epoch"].as_str().unwrap().to_owned();
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(err)) => panic!("the connection failed instead of closing: {err}"),
            None => panic!("the connection ended without a Close frame"),
        }
    };
    assert_eq!(code, Some(4008));
    assert!(
        reading.elapsed() < Duration::from_secs(2),
        "4008 came {:?} after the client began reading ({:?} after it was marked slow)",
        reading.elapsed(),
        marked.elapsed()
    );
    assert!(last < published, "a slow consumer missed something");

    // Resume from the last envelope read: exactly the rest, once.
    let mut client = connect(&gate, "").await;
    let reply = command(
        &mut client,
        json!({"id": 1, "op": "subscribe", "channel": "flood", "since": format!("{epoch}:{last}")}),
    )
    .await;
    assert_eq!(reply["result"]["recovered"], true, "{reply}");
    for offset in last + 1..=published {
        assert_eq!(next_json(&mut client).await["offset"], offset);
    }
    let pong = command(&mut client, json!({"id": 2, "op": "ping"})).await;
    assert_eq!(pong, json!({"id": 2, "result": {}}), "nothing more");
}

/// A masked client text frame (RFC 6455 §5.2) under an all-zero mask, so
/// its payload goes as it is.
fn masked_text(payload: &str) -> Vec<u8> {
    assert!(payload.len() < 126, "a short frame");
    let mut frame = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload.as_bytes());
    frame
}

/// The socket leaves hyper at the upgrade with whatever hyper had read past
/// the handshake, on a connection that answered an ordinary request first:
/// a command sent right behind the handshake, in the same write, is
/// answered, and the session then serves as any other.
#[tokio::test]
async fn a_websocket_after_an_earlier_request_keeps_the_bytes_behind_its_handshake() {
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::protocol::Role;

    // The binary itself, for its log: a reclaim that did not apply says so.
    let app = Upstream::start().await;
    let dir = common::TempDir::new("ws-reclaim");
    let gate = common::Process::start(
        &dir.0,
        &format!("listen: 127.0.0.1:0\nupstream:\n  url: {}\n", app.url()),
        &[],
    );
    let mut stream = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let host = gate.addr;
    stream
        .write_all(format!("GET /realtime/client.js HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // The earlier answer read whole, so nothing of it is left on the socket.
    let (head, _) = common::read_sized_answer(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    let mut handshake = format!(
        "GET /realtime/ws?channel=later HTTP/1.1\r\nhost: {host}\r\nconnection: upgrade\r\n\
         upgrade: websocket\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .into_bytes();
    handshake.extend(masked_text(r#"{"id":1,"op":"ping"}"#));
    stream.write_all(&handshake).await.unwrap();
    // The reply may come in the same read as the head: kept as bytes.
    let (head, behind) = common::read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "the accept key: {head}"
    );
    let mut client =
        tokio_tungstenite::WebSocketStream::from_partially_read(stream, behind, Role::Client, None)
            .await;

    let pong = tokio::time::timeout(PATIENCE, client.next())
        .await
        .expect("the reply in time")
        .expect("a frame")
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(pong.to_text().unwrap()).unwrap(),
        json!({"id": 1, "result": {}})
    );
    metric_becomes(
        gate.api_addr,
        "pushgate_subscriptions{transport=\"websocket\"}",
        1,
    )
    .await;
    if common::fast_path_on("WS_RECLAIM") {
        // The reply came after the socket was opened, and with it any
        // warning that the reclaim did not apply.
        assert_eq!(
            gate.wait_log(
                "could not be taken back out of hyper",
                Duration::from_millis(300)
            ),
            None,
            "the socket left hyper's wrapping"
        );
    }
    let published = publish(gate.api_addr, "later", json!("news")).await;
    let envelope = tokio::time::timeout(PATIENCE, client.next())
        .await
        .expect("the envelope in time")
        .expect("a frame")
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(envelope.to_text().unwrap()).unwrap(),
        json!({"channel": "later", "epoch": published["epoch"], "offset": 1, "data": "news"})
    );
    client.close(None).await.unwrap();
    let closed = tokio::time::timeout(PATIENCE, client.next())
        .await
        .expect("the close answered in time");
    assert!(
        matches!(closed, Some(Ok(Message::Close(_))) | None),
        "{closed:?}"
    );
}
