//! The Redis engine on a Redis Cluster of three real redis-server masters:
//! channels spread over slots, sharded pub/sub between pushgate nodes,
//! history, presence and orders.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::redis::RedisCluster;
use common::{Pushgate, Upstream};
use http::StatusCode;
use serde_json::{json, Value};

type Client = common::WsClient;

async fn node(app: &Upstream, cluster: &RedisCluster) -> Pushgate {
    Pushgate::start(
        &app.url(),
        &format!(
            "engine:\n  kind: redis\n  redis:\n    url: {}\n    cluster: true\nchannels:\n  - prefix: \"room:\"\n    presence: true\n    join_leave: true\n",
            cluster.url()
        ),
    )
    .await
}

async fn connect(addr: SocketAddr) -> Client {
    common::ws_connect(addr, "").await
}

use common::ws_next_json as next_json;

async fn subscribe(client: &mut Client, id: u64, channel: &str, since: Option<String>) -> Value {
    let reply = common::ws_subscribe(client, id, channel, since.as_deref()).await;
    assert!(reply.get("error").is_none(), "{reply}");
    reply["result"].clone()
}

use common::api_call as api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_over_every_slot_reach_every_node() {
    let cluster = RedisCluster::start(3);
    let app = Upstream::start().await;
    let (a, b) = (node(&app, &cluster).await, node(&app, &cluster).await);

    // Twelve channels land on all three masters' slots.
    let channels: Vec<String> = (0..12).map(|i| format!("feed:{i}")).collect();
    let mut listener = connect(a.addr).await;
    for (id, channel) in channels.iter().enumerate() {
        subscribe(&mut listener, id as u64 + 1, channel, None).await;
    }
    let mut published = Vec::new();
    for channel in &channels {
        let (status, body) = api(
            b.api_addr,
            "POST",
            "/api/publish",
            Some(json!({"channel": channel, "data": channel, "idempotency_key": format!("k-{channel}")})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        published.push(body["results"][0].clone());
    }
    let mut heard = Vec::new();
    for _ in &channels {
        let envelope = next_json(&mut listener).await;
        heard.push(envelope["channel"].as_str().unwrap().to_owned());
        assert_eq!(envelope["data"], envelope["channel"]);
        assert_eq!(envelope["offset"], 1);
    }
    heard.sort();
    let mut expected = channels.clone();
    expected.sort();
    assert_eq!(
        heard, expected,
        "every channel, on every slot, crossed nodes"
    );
    let used: std::collections::HashSet<_> = cluster
        .nodes
        .iter()
        .filter(|node| node.count_keys("pushgate:*") > 0)
        .map(|node| node.port)
        .collect();
    assert_eq!(
        used.len(),
        3,
        "the channels' keys are spread over every master"
    );

    // A retry with the same idempotency key is answered with the first result.
    let (_, again) = api(
        a.api_addr,
        "POST",
        "/api/publish",
        Some(json!({"channel": "feed:0", "data": "feed:0", "idempotency_key": "k-feed:0"})),
    )
    .await;
    assert_eq!(again["results"][0], published[0]);

    // History and resuming on the other node.
    let position = format!("{}:0", published[3]["epoch"].as_str().unwrap());
    let mut elsewhere = connect(b.addr).await;
    let result = subscribe(&mut elsewhere, 1, "feed:3", Some(position)).await;
    assert_eq!(result["recovered"], true);
    assert_eq!(next_json(&mut elsewhere).await["data"], "feed:3");
    let (status, history) = api(a.api_addr, "GET", "/api/history?channel=feed:7", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history["messages"][0]["data"], "feed:7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_join_events_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    let app = Upstream::start().await;
    let (a, b) = (node(&app, &cluster).await, node(&app, &cluster).await);
    let mut on_a = connect(a.addr).await;
    subscribe(&mut on_a, 1, "room:9", None).await;
    let mut on_b = connect(b.addr).await;
    subscribe(&mut on_b, 1, "room:9", None).await;
    loop {
        let event = next_json(&mut on_a).await;
        if event["op"] == "join" && event["connection"].as_str().is_some_and(|c| !c.is_empty()) {
            // Our own join first, then B's.
            let second = next_json(&mut on_a).await;
            assert_eq!(second["op"], "join");
            break;
        }
    }
    let (status, body) = api(a.api_addr, "GET", "/api/presence?channel=room:9", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["presence"].as_array().unwrap().len(), 2, "{body}");
}

/// Publishes `{"n": n}` until it is stored (a master may be down).
async fn publish_until_stored(api_addr: SocketAddr, channel: &str, n: u64) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut refused = 0;
    loop {
        let (status, body) = api(
            api_addr,
            "POST",
            "/api/publish",
            Some(json!({"channel": channel, "data": {"n": n}, "idempotency_key": format!("{channel}-{n}")})),
        )
        .await;
        if status == StatusCode::OK {
            return refused;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        refused += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restarted_empty_means_an_explicit_reset_then_new_messages() {
    let mut cluster = RedisCluster::start(3);
    let app = Upstream::start().await;
    let settings = format!(
        "engine:\n  kind: redis\n  redis:\n    url: {}\n    cluster: true\n    connect_timeout: 500ms\n    command_timeout: 1s\n",
        cluster.url()
    );
    let a = Pushgate::start(&app.url(), &settings).await;
    let b = Pushgate::start(&app.url(), &settings).await;
    let mut client = connect(a.addr).await;
    subscribe(&mut client, 1, "solo", None).await;
    for n in 1..=3 {
        assert_eq!(publish_until_stored(b.api_addr, "solo", n).await, 0);
        assert_eq!(next_json(&mut client).await["data"]["n"], n);
    }
    let owner = cluster
        .nodes
        .iter()
        .position(|node| node.count_keys("pushgate:{solo}*") > 0)
        .expect("some master holds the channel");

    let killed = &mut cluster.nodes[owner];
    killed.kill();
    let (status, _) = api(
        b.api_addr,
        "POST",
        "/api/publish",
        Some(json!({"channel": "solo", "data": {"n": 4}, "idempotency_key": "solo-4"})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "its master is down"
    );
    let restarted = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.nodes[owner].restart();
        cluster
    })
    .await
    .unwrap();
    for n in 4..=6 {
        publish_until_stored(b.api_addr, "solo", n).await;
    }
    // The master came back empty: a new epoch, announced, then the rest.
    let mut seen = Vec::new();
    loop {
        let value = next_json(&mut client).await;
        let done = value["data"]["n"] == 6;
        seen.push(value);
        if done {
            break;
        }
    }
    let reset = seen
        .iter()
        .rposition(|v| v["op"] == "reset")
        .unwrap_or_else(|| panic!("a reset before the new epoch's messages: {seen:?}"));
    let after: Vec<&Value> = seen[reset + 1..].iter().map(|v| &v["data"]["n"]).collect();
    assert_eq!(
        after,
        [&json!(4), &json!(5), &json!(6)],
        "everything the restarted master holds, once, in order: {seen:?}"
    );
    drop(restarted);
}

/// Pusher's channel queries on a cluster: channels heard on one node,
/// spread over the masters' slots, are listed and occupied through the
/// other node's HTTP API (each master asked for its sharded channels).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_channel_queries_span_the_cluster() {
    use futures_util::{SinkExt, StreamExt};
    use pushgate::pusher::sign;
    let cluster = RedisCluster::start(3);
    let app = Upstream::start().await;
    let config = format!(
        "engine: {{kind: redis, redis: {{url: '{}', cluster: true}}}}\npusher: {{apps: [{{id: '7', key: k7, secret: cluster-secret}}]}}\n",
        cluster.url()
    );
    let a = Pushgate::start(&app.url(), &config).await;
    let b = Pushgate::start(&app.url(), &config).await;
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/app/k7?protocol=7", a.addr))
            .await
            .unwrap();
    let names: Vec<String> = (0..12).map(|i| format!("feed-{i}")).collect();
    for name in &names {
        let event = json!({"event": "pusher:subscribe", "data": {"channel": name}});
        socket
            .send(tokio_tungstenite::tungstenite::Message::text(
                event.to_string(),
            ))
            .await
            .unwrap();
    }
    let mut succeeded = 0;
    while succeeded < names.len() {
        let frame = tokio::time::timeout(common::PATIENCE, socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let frame: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
        if frame["event"] == "pusher_internal:subscription_succeeded" {
            succeeded += 1;
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let signed = |path: &str| {
        let query = sign::sign_request("GET", path, &[], b"", "k7", "cluster-secret", now);
        format!("http://{}{path}?{query}", b.api_addr)
    };
    let (status, listed) = common::get(&signed("/apps/7/channels")).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let mut got: Vec<&String> = listed["channels"].as_object().unwrap().keys().collect();
    got.sort();
    let mut want: Vec<&String> = names.iter().collect();
    want.sort();
    assert_eq!(got, want);
    let (status, one) = common::get(&signed("/apps/7/channels/feed-3")).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(
        serde_json::from_str::<Value>(&one).unwrap()["occupied"],
        true
    );
    let (_, none) = common::get(&signed("/apps/7/channels/feed-99")).await;
    assert_eq!(
        serde_json::from_str::<Value>(&none).unwrap()["occupied"],
        false
    );
}
