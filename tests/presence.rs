//! Presence and join/leave events, per `channels` rule: on one node with
//! the memory engine, and across nodes (one of them the real binary, killed
//! without warning) with Redis.

mod common;

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
