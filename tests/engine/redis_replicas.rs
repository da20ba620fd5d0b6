//! `engine.redis.wait_replicas`: a publish is answered 200 only once the
//! master's replicas hold it, so a replica that takes the master's place
//! holds every publication answered 200. Against a real master and its
//! real replica, and two pushgate nodes.

use crate::common;

use std::time::{Duration, Instant};

use common::redis::Redis;
use common::{Pushgate, Upstream};
use http::StatusCode;
use serde_json::{json, Value};

/// How long a publish waits for the replica here.
const WAIT: Duration = Duration::from_millis(300);

fn config(master: &Redis) -> String {
    format!(
        "engine:\n  kind: redis\n  redis:\n    url: {}\n    command_timeout: 2s\n    wait_replicas: 1\n    wait_timeout: {}ms\n",
        master.url(),
        WAIT.as_millis()
    )
}

/// Where the replica's copy of `channel` stands: its `top` offset.
fn replica_top(replica: &Redis, channel: &str) -> u64 {
    replica
        .cli(&["HGET", &format!("pushgate:{{{channel}}}:m"), "top"])
        .trim()
        .parse()
        .unwrap_or(0)
}

async fn publish(
    api: std::net::SocketAddr,
    channel: &str,
    seq: u64,
    key: &str,
) -> (StatusCode, Value) {
    let body = json!({"channel": channel, "data": {"seq": seq}, "idempotency_key": key});
    common::api_call(api, "POST", "/api/publish", Some(body)).await
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_is_answered_200_only_once_a_replica_holds_it() {
    let master = Redis::start();
    let replica = Redis::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !replica
        .cli(&["INFO", "replication"])
        .contains("master_link_status:up")
    {
        assert!(Instant::now() < deadline, "the replica never linked up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let app = Upstream::start().await;
    let a = Pushgate::start(&app.url(), &config(&master)).await;
    let b = Pushgate::start(&app.url(), &config(&master)).await;

    // A battery of channels and both nodes: at the moment each 200 is
    // answered, the replica already holds that publication.
    for seq in 1..=24u64 {
        let channel = format!("wait:{}", seq % 6);
        let node = if seq % 2 == 0 { &a } else { &b };
        let (status, answer) = publish(node.api_addr, &channel, seq, &format!("k{seq}")).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let offset = answer["results"][0]["offset"].as_u64().unwrap();
        assert!(
            replica_top(&replica, &channel) >= offset,
            "answered 200 for {channel} at {offset} before the replica held it"
        );
    }

    // The replica hangs: the master stores, the replica never confirms.
    let channel = "wait:held";
    let before = replica_top(&replica, channel);
    replica.pause();
    let (status, answer) = publish(a.api_addr, channel, 100, "held").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"]["code"], "not_replicated", "{answer}");
    // The same publish retried through the other node, whose connection
    // never wrote it, waits for the replica too: a duplicate is answered
    // 200 no sooner than the publication it repeats is replicated.
    let (status, answer) = publish(b.api_addr, channel, 100, "held").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"]["code"], "not_replicated", "{answer}");
    // A publish with no key is refused the same way.
    let body = json!({"channel": "wait:nokey", "data": {"seq": 1}});
    let (status, answer) = common::api_call(b.api_addr, "POST", "/api/publish", Some(body)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"]["code"], "not_replicated", "{answer}");
    let (_, metrics) = common::get(&format!("http://{}/metrics", a.api_addr)).await;
    assert_eq!(metric(&metrics, "pushgate_redis_not_replicated_total"), 1);
    // Every command, the waiting ones too, is in the latency histogram.
    let commands = metric(&metrics, "pushgate_redis_command_seconds_count");
    assert!(commands >= 12, "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "pushgate_redis_command_seconds_bucket{le=\"+Inf\"}"
        ),
        commands
    );

    // The replica goes on: the retry completes the first publish, once.
    replica.resume();
    let (status, answer) = publish(b.api_addr, channel, 100, "held").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let offset = answer["results"][0]["offset"].as_u64().unwrap();
    assert_eq!(offset, before + 1, "the retry published it again: {answer}");
    assert!(replica_top(&replica, channel) >= offset);
    let (status, again) = publish(a.api_addr, channel, 100, "held").await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["results"], answer["results"]);
    let (_, history) = common::api_call(
        a.api_addr,
        "GET",
        &format!("/api/history?channel={channel}"),
        None,
    )
    .await;
    let held = history["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no history: {history}"));
    assert_eq!(held.len(), 1, "{history}");
}
