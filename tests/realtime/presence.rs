//! Presence and join/leave events, per `channels` rule: on one node with
//! the memory engine, and across nodes (one of them the real binary, killed
//! without warning) with Redis.

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::{Process, Pushgate, TempDir, Upstream};
use http::StatusCode;
use serde_json::Value;

type Client = common::WsClient;

use common::PATIENCE;

const RULES: &str = "channels:\n  - prefix: \"room:\"\n    presence: true\n    join_leave: true\n  - prefix: \"quiet:\"\n    presence: true\n";

async fn connect(addr: SocketAddr) -> Client {
    common::ws_connect(addr, "").await
}

use common::ws_next_json as next_json;

/// Subscribes; the subscribe reply, skipping anything pushed before it.
async fn subscribe(client: &mut Client, channel: &str) -> Value {
    common::ws_subscribe(client, 1, channel, None).await
}

/// The next join or leave event.
async fn next_event(client: &mut Client) -> Value {
    loop {
        let value = next_json(client).await;
        if matches!(value["op"].as_str(), Some("join" | "leave")) {
            return value;
        }
    }
}

async fn presence(api: SocketAddr, channel: &str) -> (StatusCode, Value) {
    common::api_call(
        api,
        "GET",
        &format!("/api/presence?channel={channel}"),
        None,
    )
    .await
}

async fn members(api: SocketAddr, channel: &str) -> Vec<Value> {
    let (status, body) = presence(api, channel).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["presence"].as_array().unwrap().clone()
}

/// Waits until `channel` lists `count` members (as seen from `api`).
async fn members_become(
    api: SocketAddr,
    channel: &str,
    count: usize,
    within: Duration,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let now = members(api, channel).await;
        if now.len() == count {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{channel} never listed {count} members: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_node_lists_members_and_announces_joins_and_leaves() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), RULES).await;
    let mut ann = connect(gate.addr).await;
    let mut bob = connect(gate.addr).await;

    assert!(subscribe(&mut ann, "room:1").await.get("result").is_some());
    let own = next_event(&mut ann).await;
    assert_eq!(own["op"], "join", "a subscriber hears its own join");
    assert!(subscribe(&mut bob, "room:1").await.get("result").is_some());
    let joined = next_event(&mut ann).await;
    assert_eq!(joined["op"], "join");
    assert_eq!(joined["channel"], "room:1");
    assert_ne!(joined["connection"], own["connection"]);

    let listed = members(gate.api_addr, "room:1").await;
    assert_eq!(listed.len(), 2);
    let connections: Vec<&Value> = listed.iter().map(|m| &m["connection"]).collect();
    assert!(connections.contains(&&own["connection"]));
    assert!(connections.contains(&&joined["connection"]));
    assert!(listed.iter().all(|m| m["node"] == listed[0]["node"]));

    drop(bob);
    let left = next_event(&mut ann).await;
    assert_eq!(left["op"], "leave");
    assert_eq!(left["connection"], joined["connection"]);
    members_become(gate.api_addr, "room:1", 1, PATIENCE).await;

    // Presence without events: listed, but nobody is told.
    assert!(subscribe(&mut ann, "quiet:1").await.get("result").is_some());
    assert_eq!(members(gate.api_addr, "quiet:1").await.len(), 1);

    // A channel no rule covers keeps no presence, and says so.
    let (status, body) = presence(gate.api_addr, "other").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "presence_disabled");
    let (status, _) = presence(gate.api_addr, "bad%20name").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_nodes_and_a_killed_node_vanishes_within_the_ttl() {
    let redis = Redis::start();
    let app = Upstream::start().await;
    let engine = format!(
        "engine:\n  kind: redis\n  redis:\n    url: {}\n    presence_ttl: 3s\n{RULES}",
        redis.url()
    );
    let a = Pushgate::start(&app.url(), &engine).await;
    let dir = TempDir::new("presence");
    let b = Process::start(
        &dir.0,
        &format!(
            "listen: 127.0.0.1:0\nupstream:\n  url: {}\n{engine}",
            app.url()
        ),
        &[],
    );

    let mut on_a = connect(a.addr).await;
    subscribe(&mut on_a, "room:x").await;
    let own = next_event(&mut on_a).await;
    assert_eq!(own["op"], "join");
    let mut on_b = connect(b.addr).await;
    subscribe(&mut on_b, "room:x").await;
    let joined = next_event(&mut on_a).await;
    assert_eq!(joined["op"], "join", "a join on node B is heard on node A");

    let listed = members_become(a.api_addr, "room:x", 2, PATIENCE).await;
    let nodes: std::collections::HashSet<&str> =
        listed.iter().map(|m| m["node"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 2, "one member per node: {listed:?}");
    assert_eq!(
        members(b.api_addr, "room:x").await.len(),
        2,
        "same answer on B"
    );

    // Node B dies without a word: its entry goes within presence_ttl.
    b.signal("KILL");
    drop(on_b);
    let started = Instant::now();
    let left = members_become(a.api_addr, "room:x", 1, Duration::from_secs(8)).await;
    assert_eq!(left[0]["connection"], own["connection"], "A's member stays");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "B's entry outlived B for a while, as no one removed it"
    );
}

#[tokio::test]
async fn sse_subscribers_hear_joins_and_leaves_as_named_events_without_ids() {
    use tokio::io::AsyncWriteExt;
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), RULES).await;
    let mut sse = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    sse.write_all(
        format!(
            "GET /realtime/sse?channel=room:s HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            gate.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Its own join first.
    common::read_until(&mut sse, "event: pushgate.join").await;
    let mut other = connect(gate.addr).await;
    subscribe(&mut other, "room:s").await;
    drop(other);
    let text = common::read_until(&mut sse, "event: pushgate.leave").await;
    let leave = text
        .split("\n\n")
        .find(|event| event.contains("event: pushgate.leave"))
        .unwrap();
    assert!(!leave.contains("\nid:"), "not a position: {leave}");
    let data = leave
        .lines()
        .find_map(|line| line.strip_prefix("data: "))
        .unwrap();
    let event: Value = serde_json::from_str(data).unwrap();
    assert_eq!(event["op"], "leave");
    assert_eq!(event["channel"], "room:s");
}

/// An app whose auth endpoint answers with a pretty-printed grant: its
/// `info` spans many lines, and one string in it holds text that would be
/// read as SSE fields if a line break ever let it start a line.
async fn pretty_auth_app() -> SocketAddr {
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let grant = serde_json::to_string_pretty(&serde_json::json!({
        "user": "ada",
        "channels": ["room:*"],
        "info": {
            "name": "Ada",
            "tags": ["a", "b"],
            "bio": "line one\nid: 1.00000000.x.0.00000000\ndata: forged",
            "nested": {"deep": [1, {"x": null}]}
        }
    }))
    .unwrap()
    .replace('\n', "\r\n");
    assert!(grant.lines().count() > 10, "{grant}");
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let grant = grant.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_request| {
                    let grant = grant.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            bytes::Bytes::from(grant),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_apps_pretty_printed_info_never_breaks_an_sse_line() {
    use tokio::io::AsyncWriteExt;
    let app = pretty_auth_app().await;
    let gate = Pushgate::start(
        &format!("http://{app}"),
        &format!("{RULES}auth:\n  mode: upstream\n"),
    )
    .await;
    let mut sse = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    sse.write_all(
        format!(
            "GET /realtime/sse?channel=room:p HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            gate.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut text = String::new();
    // Its own join, whole.
    read_until_end_of(&mut sse, &mut text, "event: pushgate.join").await;
    // A second member joins and leaves: its info travels in both events.
    let mut other = connect(gate.addr).await;
    subscribe(&mut other, "room:p").await;
    drop(other);
    read_until_end_of(&mut sse, &mut text, "event: pushgate.leave").await;

    let stream = common::wire::body_so_far(&text);
    let stream = stream.as_str();
    let mut events = 0;
    for line in stream.split('\n') {
        // Only the fields pushgate writes; any other line is a fragment
        // of a data line that a line break cut off.
        let field = line.split_once(':').map_or(line, |(field, _)| field);
        assert!(
            matches!(field, "" | "retry" | "id" | "event" | "data"),
            "a stray line {line:?} in\n{stream}"
        );
        assert!(!line.contains('\r'), "a CR in {line:?}");
        if let Some(data) = line.strip_prefix("data: ") {
            let event: Value = serde_json::from_str(data)
                .unwrap_or_else(|err| panic!("{err}: a data line that is not JSON: {data:?}"));
            assert_eq!(event["info"]["name"], "Ada", "{event}");
            assert_eq!(
                event["info"]["bio"],
                "line one\nid: 1.00000000.x.0.00000000\ndata: forged"
            );
            assert_eq!(
                event["info"]["nested"]["deep"][1],
                serde_json::json!({"x": null})
            );
            events += 1;
        }
    }
    assert_eq!(events, 3, "two joins and a leave:\n{stream}");
}

/// Reads into `seen` until the SSE event that starts with `needle` has
/// ended (its blank line has arrived), within [`PATIENCE`].
async fn read_until_end_of(stream: &mut tokio::net::TcpStream, seen: &mut String, needle: &str) {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut buffer = [0u8; 4096];
    while !seen
        .find(needle)
        .is_some_and(|at| seen[at..].contains("\n\n"))
    {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buffer))
            .await
            .unwrap_or_else(|_| panic!("no whole {needle:?} in {seen}"))
            .unwrap();
        assert!(read > 0, "the stream ended before {needle:?}: {seen}");
        seen.push_str(std::str::from_utf8(&buffer[..read]).unwrap());
    }
}
