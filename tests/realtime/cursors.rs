//! Cursors from clients, over real SSE streams and long-polls: channels
//! whose name hashes collide both resume from one cursor, and forged,
//! oversized, corrupt or impossible cursors never grant a channel, never
//! leave a silent gap, and are refused with a reason when they are not
//! cursors at all.

use crate::common;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{Pushgate, Upstream, PATIENCE};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use pushgate::cursor::{Cursor, Epoch, Position, Start};
use pushgate::message::ChannelName;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Two channel names whose FNV-1a 32 hashes (the cursor's channel hash)
/// are the same.
const A: &str = "room:46wu";
const B: &str = "room:bwfa";

fn channel(name: &str) -> ChannelName {
    ChannelName::parse(name).unwrap()
}

async fn gate(auth: &str) -> (Upstream, Pushgate) {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), auth).await;
    (app, gate)
}

/// Publishes `data` to `channel`; its position.
async fn publish(gate: &Pushgate, channel: &str, data: Value) -> Position {
    let (status, body) = common::api_call(
        gate.api_addr,
        "POST",
        "/api/publish",
        Some(json!({"channel": channel, "data": data})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let result = &body["results"][0];
    Position::new(
        Epoch::parse(result["epoch"].as_str().unwrap()).unwrap(),
        result["offset"].as_u64().unwrap(),
    )
}

// ------------------------------------------------------------ SSE

#[derive(Debug)]
struct Event {
    event: Option<String>,
    data: Value,
    id: Option<String>,
}

/// An SSE response read from the socket: HTTP/1 streams leave hyper after
/// their head and are written raw, up to the close.
struct Sse {
    stream: TcpStream,
    text: String,
    /// How far `text` has been handed out as events.
    read: usize,
    /// The stream came in chunks (SSE through hyper, with
    /// `fast_paths.sse_detach` off): `raw` holds what is not yet decoded.
    chunked: bool,
    raw: Vec<u8>,
}

/// What `GET /realtime/sse?{query}` answered: a stream, or a refusal with
/// its status and JSON body.
enum Opened {
    Stream(Sse),
    Refused(StatusCode, Value),
}

impl Opened {
    fn stream(self) -> Sse {
        match self {
            Opened::Stream(stream) => stream,
            Opened::Refused(status, body) => panic!("refused with {status}: {body}"),
        }
    }

    fn refused(self) -> (StatusCode, Value) {
        match self {
            Opened::Refused(status, body) => (status, body),
            Opened::Stream(_) => panic!("a stream, not a refusal"),
        }
    }
}

async fn sse(addr: SocketAddr, query: &str, last_event_id: Option<&str>) -> Opened {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let resume = last_event_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
    stream
        .write_all(
            format!(
                "GET /realtime/sse?{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{resume}\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut sse = Sse {
        stream,
        text: String::new(),
        read: 0,
        chunked: false,
        raw: Vec::new(),
    };
    sse.fill_until(|text| text.contains("\r\n\r\n")).await;
    let (head, rest) = sse.text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let status = StatusCode::from_u16(status).unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let rest = rest.to_owned();
    if status == StatusCode::OK {
        sse.text = String::new();
        sse.chunked = chunked;
        sse.take(rest.as_bytes());
        return Opened::Stream(sse);
    }
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .expect("a refusal has a length");
    sse.text = rest;
    sse.fill_until(|text| text.len() >= length).await;
    Opened::Refused(status, serde_json::from_str(&sse.text).unwrap())
}

impl Sse {
    async fn fill_until(&mut self, done: impl Fn(&str) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut buffer = [0u8; 4096];
        while !done(&self.text) {
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut buffer))
                .await
                .unwrap_or_else(|_| panic!("nothing more in time after {:?}", self.text))
                .unwrap();
            assert!(read > 0, "the stream ended: {:?}", self.text);
            self.take(&buffer[..read]);
        }
    }

    /// Adds bytes read off the socket to `text`, out of their chunks when
    /// the stream is chunked.
    fn take(&mut self, bytes: &[u8]) {
        if !self.chunked {
            self.text.push_str(std::str::from_utf8(bytes).unwrap());
            return;
        }
        self.raw.extend_from_slice(bytes);
        loop {
            let Some(end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size = std::str::from_utf8(&self.raw[..end]).unwrap();
            let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
            if self.raw.len() < end + 2 + size + 2 {
                return;
            }
            let data = self.raw[end + 2..end + 2 + size].to_vec();
            self.raw.drain(..end + 2 + size + 2);
            self.text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }

    /// The next block: an event, or the opening (`retry:` and `id:`), whose
    /// data is `null`. Keep-alive comments are skipped.
    async fn next_block(&mut self) -> Event {
        loop {
            let read = self.read;
            self.fill_until(|text| text[read..].contains("\n\n")).await;
            let end = self.text[read..].find("\n\n").unwrap() + read;
            let block = self.text[read..end].to_owned();
            self.read = end + 2;
            let mut event = Event {
                event: None,
                data: Value::Null,
                id: None,
            };
            let mut any = false;
            for line in block.lines() {
                if line.starts_with(':') {
                    continue;
                }
                any = true;
                let (field, value) = line.split_once(": ").unwrap_or((line, ""));
                match field {
                    "event" => event.event = Some(value.to_owned()),
                    "data" => event.data = serde_json::from_str(value).unwrap(),
                    "id" => event.id = Some(value.to_owned()),
                    "retry" => {}
                    other => panic!("unknown field {other:?} in {block:?}"),
                }
            }
            if any {
                return event;
            }
        }
    }

    /// The opening's cursor.
    async fn opening(&mut self) -> String {
        let opening = self.next_block().await;
        assert_eq!(opening.data, Value::Null, "{opening:?}");
        opening.id.expect("the opening carries the cursor")
    }

    /// The next event with data.
    async fn next_event(&mut self) -> Event {
        loop {
            let event = self.next_block().await;
            if event.data != Value::Null {
                return event;
            }
        }
    }
}

// ------------------------------------------------------------ long-poll

async fn poll(addr: SocketAddr, query: &str) -> (StatusCode, Value) {
    let request = Request::get(format!("http://{addr}/realtime/poll?{query}"))
        .body(common::empty_body())
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, common::client().request(request))
        .await
        .unwrap()
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

/// `(channel, data)` of each message of a poll answer.
fn messages(body: &Value) -> Vec<(String, Value)> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["channel"].as_str().unwrap().to_owned(), m["data"].clone()))
        .collect()
}

fn resets(body: &Value) -> Vec<String> {
    body["reset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["channel"].as_str().unwrap().to_owned())
        .collect()
}

// ------------------------------------------------------------ the tests

#[tokio::test]
async fn channels_whose_hashes_collide_both_resume_from_one_cursor() {
    assert_eq!(
        pushgate::cursor::channel_hash(A),
        pushgate::cursor::channel_hash(B)
    );
    let (_app, gate) = gate("").await;
    publish(&gate, A, json!("a1")).await;
    publish(&gate, B, json!("b1")).await;

    // SSE: read a while, drop, miss some, come back with the last id.
    let query = format!("channel={A}&channel={B}");
    let mut stream = sse(gate.addr, &query, None).await.stream();
    stream.opening().await;
    publish(&gate, A, json!("a2")).await;
    publish(&gate, B, json!("b2")).await;
    let mut last = String::new();
    for expected in ["a2", "b2"] {
        let event = stream.next_event().await;
        assert_eq!(event.data["data"], expected, "{event:?}");
        last = event.id.unwrap();
    }
    drop(stream);
    for round in 3..6 {
        publish(&gate, A, json!(format!("a{round}"))).await;
        publish(&gate, B, json!(format!("b{round}"))).await;
        // The channels named in the other order: the cursor does not care.
        let query = if round % 2 == 0 {
            format!("channel={A}&channel={B}")
        } else {
            format!("channel={B}&channel={A}")
        };
        let mut stream = sse(gate.addr, &query, Some(&last)).await.stream();
        stream.opening().await;
        let mut got = Vec::new();
        for _ in 0..2 {
            let event = stream.next_event().await;
            assert_eq!(event.event, None, "round {round}: no reset, {event:?}");
            got.push(event.data["data"].as_str().unwrap().to_owned());
        }
        got.sort();
        assert_eq!(got, [format!("a{round}"), format!("b{round}")]);
        // And it is live.
        publish(&gate, B, json!("live")).await;
        let event = stream.next_event().await;
        assert_eq!(event.data["data"], "live");
        assert_eq!(event.data["channel"], B);
        last = event.id.unwrap();
    }

    // Long-poll: every round trip resumes both, never a reset.
    let (status, body) = poll(gate.addr, &format!("channel={A}&channel={B}&timeout=0")).await;
    assert_eq!(status, StatusCode::OK);
    let mut cursor = body["cursor"].as_str().unwrap().to_owned();
    for round in 0..3 {
        publish(&gate, A, json!(format!("pa{round}"))).await;
        publish(&gate, B, json!(format!("pb{round}"))).await;
        let (status, body) = poll(
            gate.addr,
            &format!("channel={B}&channel={A}&timeout=0&since={cursor}"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(resets(&body), Vec::<String>::new(), "round {round}: {body}");
        let mut got = messages(&body);
        got.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            got,
            [
                (A.to_owned(), json!(format!("pa{round}"))),
                (B.to_owned(), json!(format!("pb{round}")))
            ],
            "{body}"
        );
        cursor = body["cursor"].as_str().unwrap().to_owned();
        let held = Cursor::decode(&cursor).unwrap();
        assert_eq!(held.len(), 2, "one entry each: {cursor}");
    }
}

/// A cursor holding one entry for two channels of that hash cannot say
/// whose it is: both are reset, on both transports, never started from now
/// without a word.
#[tokio::test]
async fn a_cursor_that_cannot_tell_colliding_channels_apart_resets_them() {
    let (_app, gate) = gate("").await;
    let at = publish(&gate, A, json!(1)).await;
    publish(&gate, B, json!(1)).await;
    let mut only_a = Cursor::new();
    only_a.set(&channel(A), at);
    let only_a = only_a.encode();

    let mut stream = sse(
        gate.addr,
        &format!("channel={A}&channel={B}"),
        Some(&only_a),
    )
    .await
    .stream();
    stream.opening().await;
    let mut reset = Vec::new();
    for _ in 0..2 {
        let event = stream.next_event().await;
        assert_eq!(event.event.as_deref(), Some("pushgate.reset"), "{event:?}");
        reset.push(event.data["channel"].as_str().unwrap().to_owned());
    }
    reset.sort();
    assert_eq!(reset, [A, B]);

    let (status, body) = poll(
        gate.addr,
        &format!("channel={A}&channel={B}&timeout=5&since={only_a}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let mut reset = resets(&body);
    reset.sort();
    assert_eq!(reset, [A, B], "{body}");
    // With the channel alone, the same cursor resumes it.
    let (_, body) = poll(gate.addr, &format!("channel={A}&timeout=0&since={only_a}")).await;
    assert_eq!(resets(&body), Vec::<String>::new(), "{body}");
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";

/// A token for `open` only.
fn token() -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "ann", "exp": now() + 600, "channels": ["open"]}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A cursor decides nothing about channels: one that names a channel the
/// connection may not hear (from offset 0, which would replay everything)
/// gives none of it, on either transport.
#[tokio::test]
async fn a_forged_cursor_grants_nothing() {
    let (_app, gate) = gate(&format!(
        "auth:\n  mode: jwt\n  jwt:\n    secret: \"{SECRET}\"\n"
    ))
    .await;
    let token = token();
    let mut secret_at = Position::new(Epoch::parse("x").unwrap(), 0);
    for n in 1..=3 {
        secret_at = publish(&gate, "secret", json!(format!("secret {n}"))).await;
    }
    let open_at = publish(&gate, "open", json!("open 1")).await;
    publish(&gate, "open", json!("open 2")).await;
    let before_everything = |position: Position| Position::new(position.epoch, 0);
    let mut forged = Cursor::new();
    forged.set(&channel("secret"), before_everything(secret_at));
    forged.set(&channel("open"), open_at);
    let forged = forged.encode();

    // Asking for the channel itself is refused, cursor or not.
    let (status, body) = sse(
        gate.addr,
        &format!("channel=secret&token={token}"),
        Some(&forged),
    )
    .await
    .refused();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = poll(
        gate.addr,
        &format!("channel=secret&timeout=0&since={forged}&token={token}"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = poll(
        gate.addr,
        &format!("channel=open&channel=secret&timeout=0&since={forged}&token={token}"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // With its own channel, the connection hears that channel only.
    let mut stream = sse(
        gate.addr,
        &format!("channel=open&token={token}"),
        Some(&forged),
    )
    .await
    .stream();
    let opening = stream.opening().await;
    let held = Cursor::decode(&opening).unwrap();
    assert_eq!(held.len(), 1, "only its own channel: {opening}");
    assert_eq!(held.position_of("open"), Some(open_at));
    let event = stream.next_event().await;
    assert_eq!(event.data["data"], "open 2", "{event:?}");
    publish(&gate, "secret", json!("secret 4")).await;
    publish(&gate, "open", json!("open 3")).await;
    let event = stream.next_event().await;
    assert_eq!(event.data["data"], "open 3", "{event:?}");
    assert_eq!(
        Cursor::decode(event.id.as_deref().unwrap()).unwrap().len(),
        1
    );

    let (status, body) = poll(
        gate.addr,
        &format!("channel=open&timeout=0&since={forged}&token={token}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(messages(&body).iter().all(|(c, _)| c == "open"), "{body}");
    assert_eq!(messages(&body).len(), 2, "{body}");
    let cursor = Cursor::decode(body["cursor"].as_str().unwrap()).unwrap();
    assert_eq!(cursor.len(), 1);

    // A cursor naming only the other channel: this one starts from now.
    let mut elsewhere = Cursor::new();
    elsewhere.set(&channel("secret"), before_everything(secret_at));
    let (status, body) = poll(
        gate.addr,
        &format!(
            "channel=open&timeout=0&since={}&token={token}",
            elsewhere.encode()
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(messages(&body), [], "{body}");
    assert_eq!(resets(&body), Vec::<String>::new(), "{body}");
}

#[tokio::test]
async fn cursors_that_are_too_long_or_corrupt_are_refused_with_400_and_a_reason() {
    let (_app, gate) = gate("").await;
    let at = publish(&gate, "c", json!(1)).await;
    let mut cursor = Cursor::new();
    cursor.set(&channel("c"), at);
    let good = cursor.encode();
    let (body, checksum) = good.rsplit_once('.').unwrap();
    let flipped = format!(
        "{body}.{}{}",
        &checksum[..7],
        if checksum.ends_with('0') { '1' } else { '0' }
    );
    let altered = good.replacen(&format!(".{}.", at.offset), ".9.", 1);
    assert_ne!(altered, good);
    let long = format!("{good}{}", "x".repeat(8 * 1024));

    for (name, text, says) in [
        ("over 8 KiB", long.as_str(), "8 KiB"),
        ("a flipped checksum", flipped.as_str(), "checksum"),
        ("an altered offset", altered.as_str(), "checksum"),
        ("cut short", &good[..good.len() - 3], "checksum"),
        ("not a cursor", "hello", "version"),
    ] {
        let (status, body) = sse(gate.addr, "channel=c", Some(text)).await.refused();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body}");
        assert_eq!(body["error"]["code"], "bad_cursor", "{name}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{name}: {message}");
        assert!(message.len() < 200, "{name}: the input is not echoed");

        let (status, body) = sse(gate.addr, &format!("channel=c&last_event_id={text}"), None)
            .await
            .refused();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name} (query): {body}");
        assert_eq!(body["error"]["code"], "bad_cursor");

        let (status, body) = poll(gate.addr, &format!("channel=c&timeout=0&since={text}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name} (poll): {body}");
        assert_eq!(body["error"]["code"], "bad_cursor");
        assert!(body["error"]["message"].as_str().unwrap().contains(says));
    }
    // The good one is fine.
    let (status, body) = poll(gate.addr, &format!("channel=c&timeout=0&since={good}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// A well-formed cursor whose position is ahead of the stream (the store
/// lost data, or the client made it up) gets an explicit reset for that
/// channel; the connection's other channel resumes exactly.
#[tokio::test]
async fn a_cursor_ahead_of_the_stream_is_reset_never_a_silent_gap() {
    let (_app, gate) = gate("").await;
    let mut kept = Vec::new();
    for n in 1..=3 {
        kept.push(publish(&gate, "kept", json!(n)).await);
    }
    let mut ahead_at = Position::new(Epoch::parse("x").unwrap(), 0);
    for n in 1..=3 {
        ahead_at = publish(&gate, "ahead", json!(n)).await;
    }
    let cursor_with = |ahead: Position| {
        let mut cursor = Cursor::new();
        cursor.set(&channel("kept"), kept[0]);
        cursor.set(&channel("ahead"), ahead);
        cursor.encode()
    };
    let same_epoch = Position::new(ahead_at.epoch, ahead_at.offset + 50);
    let unknown_epoch = Position::new(Epoch::parse("NoSuchEp").unwrap(), 2);

    for (name, ahead) in [("ahead", same_epoch), ("another epoch", unknown_epoch)] {
        let cursor = cursor_with(ahead);
        let mut stream = sse(gate.addr, "channel=kept&channel=ahead", Some(&cursor))
            .await
            .stream();
        stream.opening().await;
        let mut kept_data = Vec::new();
        let mut reset = None;
        for _ in 0..3 {
            let event = stream.next_event().await;
            match event.event.as_deref() {
                Some("pushgate.reset") => reset = Some(event.data),
                None => {
                    assert_eq!(event.data["channel"], "kept", "{name}: {event:?}");
                    kept_data.push(event.data["data"].clone());
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(kept_data, [json!(2), json!(3)], "{name}");
        let reset = reset.unwrap_or_else(|| panic!("{name}: no reset"));
        assert_eq!(reset["channel"], "ahead", "{name}");
        drop(stream);

        let (status, body) = poll(
            gate.addr,
            &format!("channel=kept&channel=ahead&timeout=5&since={cursor}"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        assert_eq!(resets(&body), ["ahead"], "{name}: {body}");
        assert_eq!(
            messages(&body),
            [("kept".to_owned(), json!(2)), ("kept".to_owned(), json!(3))],
            "{name}: {body}"
        );
        // The answer's cursor resumes cleanly: nothing new, no reset.
        let next = body["cursor"].as_str().unwrap();
        let starts = Cursor::decode(next).unwrap().resolve(&["kept", "ahead"]);
        assert!(
            matches!(starts[..], [Start::After(_), Start::After(_)]),
            "{starts:?}"
        );
        let (_, body) = poll(
            gate.addr,
            &format!("channel=kept&channel=ahead&timeout=0&since={next}"),
        )
        .await;
        assert_eq!(resets(&body), Vec::<String>::new(), "{name}: {body}");
        assert_eq!(messages(&body), [], "{name}: {body}");
    }
}
