//! Several pushgate nodes sharing one real redis-server: fan-out across
//! nodes, resuming on another node, and Redis outages (killed, then
//! restarted empty or with its data) while clients stay connected and a
//! publisher keeps publishing.

use crate::common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::{Pushgate, Upstream};
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Client = common::WsClient;

use common::PATIENCE;

async fn node(app: &Upstream, redis: &Redis) -> Pushgate {
    Pushgate::start(
        &app.url(),
        &format!(
            "engine:\n  kind: redis\n  redis:\n    url: {}\n    connect_timeout: 500ms\n    command_timeout: 1s\nhistory:\n  size: 1000\n",
            redis.url()
        ),
    )
    .await
}

async fn connect(gate: &Pushgate) -> Client {
    common::ws_connect(gate.addr, "").await
}

use common::{ws_close_code as close_code, ws_next_json as next_json};

async fn subscribe(client: &mut Client, channel: &str, since: Option<&str>) -> Value {
    let reply = common::ws_subscribe(client, 1, channel, since).await;
    assert!(reply.get("error").is_none(), "subscribe failed: {reply}");
    reply["result"].clone()
}

/// POSTs a publish; the status and JSON body.
async fn try_publish(api: SocketAddr, body: Value) -> (StatusCode, Value) {
    common::api_call(api, "POST", "/api/publish", Some(body)).await
}

async fn publish(api: SocketAddr, channel: &str, data: Value) -> Value {
    let (status, body) = try_publish(api, json!({"channel": channel, "data": data})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["results"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_one_node_hears_a_publish_sent_to_another() {
    let redis = Redis::start();
    let app = Upstream::start().await;
    let (a, b, c) = (
        node(&app, &redis).await,
        node(&app, &redis).await,
        node(&app, &redis).await,
    );
    let mut on_a = connect(&a).await;
    let mut on_c = connect(&c).await;
    subscribe(&mut on_a, "news", None).await;
    subscribe(&mut on_c, "news", None).await;

    let first = publish(b.api_addr, "news", json!({"n": 1})).await;
    let second = publish(c.api_addr, "news", json!({"n": 2})).await;
    assert_eq!(first["epoch"], second["epoch"], "one stream for all nodes");
    assert_eq!(
        (first["offset"].clone(), second["offset"].clone()),
        (json!(1), json!(2))
    );
    for client in [&mut on_a, &mut on_c] {
        assert_eq!(next_json(client).await["data"], json!({"n": 1}));
        assert_eq!(next_json(client).await["data"], json!({"n": 2}));
    }

    // History is shared: B answers for what was published through C.
    let history = api_get(b.api_addr, "/api/history?channel=news").await;
    let data: Vec<Value> = history["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("{history}"))
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    assert_eq!(data, vec![json!({"n": 1}), json!({"n": 2})]);
}

async fn api_get(api: SocketAddr, path: &str) -> Value {
    let (status, body) = common::api_call(api, "GET", path, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_without_loss() {
    let redis = Redis::start();
    let app = Upstream::start().await;
    let (a, b) = (node(&app, &redis).await, node(&app, &redis).await);

    let mut client = connect(&a).await;
    subscribe(&mut client, "room", None).await;
    publish(b.api_addr, "room", json!(1)).await;
    let seen = next_json(&mut client).await;
    let position = format!("{}:{}", seen["epoch"].as_str().unwrap(), seen["offset"]);
    drop(client);

    // Published while the client is away.
    for n in 2..=5 {
        publish(a.api_addr, "room", json!(n)).await;
    }
    let mut back = connect(&b).await;
    let result = subscribe(&mut back, "room", Some(&position)).await;
    assert_eq!(result["recovered"], true);
    for n in 2..=5 {
        let envelope = next_json(&mut back).await;
        assert_eq!(envelope["data"], json!(n));
        assert_eq!(envelope["offset"], json!(n));
    }
    publish(a.api_addr, "room", json!(6)).await;
    assert_eq!(next_json(&mut back).await["data"], json!(6));
}

/// What a client saw: publications (by their `seq`) and resets, in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Seq {
        seq: u64,
        epoch: String,
        offset: u64,
    },
    Reset,
}

/// Reads a client until `stop` says so, recording what it saw.
async fn record(mut client: Client, seen: Arc<Mutex<Vec<Seen>>>) -> Client {
    loop {
        let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(30), client.next()).await
        else {
            panic!(
                "the client was disconnected or starved: {:?}",
                seen.lock().unwrap().last()
            );
        };
        let Message::Text(text) = message.expect("a valid frame") else {
            continue;
        };
        let value: Value = serde_json::from_str(text.as_str()).unwrap();
        let entry = if value["op"] == "reset" {
            Seen::Reset
        } else if value.get("data").is_some() {
            Seen::Seq {
                seq: value["data"]["seq"].as_u64().unwrap(),
                epoch: value["epoch"].as_str().unwrap().to_owned(),
                offset: value["offset"].as_u64().unwrap(),
            }
        } else {
            continue;
        };
        let done = matches!(entry, Seen::Seq { seq, .. } if seq == u64::MAX);
        seen.lock().unwrap().push(entry);
        if done {
            return client;
        }
    }
}

/// Publishes `{"seq": n}` with idempotency key `seq-n`, retrying 503s with
/// the same key until it is stored; returns how many 503s it met.
async fn publish_until_stored(api: SocketAddr, seq: u64) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut refused = 0;
    loop {
        let (status, body) = try_publish(
            api,
            json!({"channel": "feed", "data": {"seq": seq}, "idempotency_key": format!("seq-{seq}")}),
        )
        .await;
        match status {
            StatusCode::OK => return refused,
            StatusCode::SERVICE_UNAVAILABLE => {
                let code = body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                assert!(
                    code == "engine_unavailable" || code == "outcome_unknown",
                    "{body}"
                );
                refused += 1;
                assert!(Instant::now() < deadline, "Redis never came back");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("publish answered {other}: {body}"),
        }
    }
}

async fn readyz(api: SocketAddr) -> StatusCode {
    common::get(&format!("http://{api}/readyz")).await.0
}

/// Redis is killed and restarted while a client listens on node A and a
/// publisher keeps publishing through node B. Returns what the client saw
/// and the number of publishes answered 200.
async fn outage(keep_data: bool) -> (Vec<Seen>, u64) {
    let mut redis = if keep_data {
        Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    } else {
        Redis::start()
    };
    let app = Upstream::start().await;
    let (a, b) = (node(&app, &redis).await, node(&app, &redis).await);
    let mut client = connect(&a).await;
    subscribe(&mut client, "feed", None).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reader = tokio::spawn(record(client, seen.clone()));

    const BEFORE: u64 = 50;
    const TOTAL: u64 = 150;
    for seq in 1..=BEFORE {
        assert_eq!(publish_until_stored(b.api_addr, seq).await, 0);
    }
    redis.kill();
    let (status, body) = try_publish(
        b.api_addr,
        json!({"channel": "feed", "data": {"seq": BEFORE + 1}, "idempotency_key": format!("seq-{}", BEFORE + 1)}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "never 200 while Redis is down: {body}"
    );
    assert_eq!(readyz(a.api_addr).await, StatusCode::SERVICE_UNAVAILABLE);
    let (metrics_status, metrics) = common::get(&format!("http://{}/metrics", b.api_addr)).await;
    assert_eq!(metrics_status, StatusCode::OK);
    assert!(metrics.contains("pushgate_redis_up 0"), "{metrics}");

    // The publisher keeps trying (same keys) while Redis comes back.
    let publisher = tokio::spawn(async move {
        let mut refused = 0;
        for seq in BEFORE + 1..=TOTAL {
            refused += publish_until_stored(b.api_addr, seq).await;
        }
        (b, refused)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _redis = tokio::task::spawn_blocking(move || {
        redis.restart();
        redis
    })
    .await
    .unwrap();
    let (b, refused) = publisher.await.unwrap();
    assert!(refused > 0, "the outage was seen by the publisher");
    // The end marker, through the other node.
    publish(a.api_addr, "feed", json!({"seq": u64::MAX})).await;
    let client = tokio::time::timeout(PATIENCE, reader)
        .await
        .expect("the client heard everything")
        .unwrap();
    drop(client);

    let deadline = Instant::now() + PATIENCE;
    while readyz(a.api_addr).await != StatusCode::OK {
        assert!(Instant::now() < deadline, "/readyz never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(b);
    let seen = seen.lock().unwrap().clone();
    (seen, TOTAL)
}

/// Checks what a client saw against everything answered 200: in order,
/// never twice within an epoch, and anything missing is covered by an
/// explicit reset between its neighbours.
fn check_delivery(seen: &[Seen], total: u64) {
    let mut last_in_epoch: Option<(String, u64, u64)> = None;
    for entry in seen {
        if let Seen::Seq { seq, epoch, offset } = entry {
            if *seq == u64::MAX {
                continue;
            }
            if let Some((last_epoch, last_offset, last_seq)) = &last_in_epoch {
                if last_epoch == epoch {
                    assert_eq!(*offset, last_offset + 1, "offsets follow on: {seen:?}");
                    assert!(seq > last_seq, "in order, once: {seen:?}");
                }
            }
            last_in_epoch = Some((epoch.clone(), *offset, *seq));
        }
    }
    for missing in (1..=total).filter(|s| {
        !seen
            .iter()
            .any(|entry| matches!(entry, Seen::Seq { seq, .. } if seq == s))
    }) {
        // A reset must sit between the last seq before it and the first after.
        let before = seen
            .iter()
            .rposition(|entry| matches!(entry, Seen::Seq { seq, .. } if *seq < missing));
        let after = seen.iter().position(
            |entry| matches!(entry, Seen::Seq { seq, .. } if *seq > missing && *seq != u64::MAX),
        );
        let window = &seen[before.map_or(0, |i| i + 1)..after.unwrap_or(seen.len())];
        assert!(
            window.contains(&Seen::Reset),
            "seq {missing} was answered 200 but neither delivered nor announced by a reset: {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_with_its_data_loses_nothing_and_resets_no_one() {
    let (seen, total) = outage(true).await;
    check_delivery(&seen, total);
    assert!(
        !seen.contains(&Seen::Reset),
        "with the data kept, the gap is recovered from history: {seen:?}"
    );
    let delivered: Vec<u64> = seen
        .iter()
        .filter_map(|entry| match entry {
            Seen::Seq { seq, .. } if *seq != u64::MAX => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(
        delivered,
        (1..=total).collect::<Vec<_>>(),
        "every publish answered 200, once, in order (idempotent retries included)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_resets_explicitly_and_goes_on() {
    let (seen, total) = outage(false).await;
    check_delivery(&seen, total);
    assert!(
        seen.contains(&Seen::Reset),
        "a Redis that lost everything means a new epoch, announced: {seen:?}"
    );
    let epochs: std::collections::HashSet<&str> = seen
        .iter()
        .filter_map(|entry| match entry {
            Seen::Seq { epoch, .. } => Some(epoch.as_str()),
            Seen::Reset => None,
        })
        .collect();
    assert_eq!(epochs.len(), 2, "one epoch before, one after: {seen:?}");
}

const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";

/// A node that authenticates with HS256 tokens and allows two connections
/// per user.
async fn jwt_node(app: &Upstream, redis: &Redis) -> Pushgate {
    Pushgate::start(
        &app.url(),
        &format!(
            "engine:\n  kind: redis\n  redis:\n    url: {}\nauth:\n  mode: jwt\n  jwt:\n    algorithm: HS256\n    secret: \"{SECRET}\"\nlimits:\n  connections_per_user: 2\n",
            redis.url()
        ),
    )
    .await
}

fn token(user: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "exp": exp, "channels": ["chat:*"]}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn connect_as(gate: &Pushgate, user: &str) -> Client {
    common::ws_connect(gate.addr, &format!("?token={}", token(user))).await
}

/// Whether the connection is still open: a ping is answered.
async fn still_open(client: &mut Client) -> bool {
    client
        .send(Message::text(json!({"id": "p", "op": "ping"}).to_string()))
        .await
        .is_ok()
        && tokio::time::timeout(PATIENCE, async {
            loop {
                match client.next().await {
                    Some(Ok(Message::Text(text))) if text.contains("\"p\"") => return true,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return false,
                    Some(Ok(_)) => continue,
                }
            }
        })
        .await
        .unwrap_or(false)
}

async fn api_post(api: SocketAddr, path: &str, body: Value) -> (StatusCode, Value) {
    common::api_call(api, "POST", path, Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_limit_counts_connections_on_every_node() {
    let redis = Redis::start();
    let app = Upstream::start().await;
    let (a, b) = (jwt_node(&app, &redis).await, jwt_node(&app, &redis).await);

    let mut first = connect_as(&a, "ann").await;
    let mut second = connect_as(&b, "ann").await;
    assert!(still_open(&mut first).await && still_open(&mut second).await);
    // A third, on either node, is one too many for the user.
    let mut third = connect_as(&a, "ann").await;
    assert_eq!(close_code(&mut third).await, Some(4029));
    let mut fourth = connect_as(&b, "ann").await;
    assert_eq!(close_code(&mut fourth).await, Some(4029));
    // Another user is counted apart.
    let mut bob = connect_as(&b, "bob").await;
    assert!(still_open(&mut bob).await);

    // A closed connection gives its place back, across nodes.
    drop(second);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut again = connect_as(&a, "ann").await;
        if still_open(&mut again).await {
            break;
        }
        assert!(Instant::now() < deadline, "the place was never given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_and_unsubscribe_through_one_node_reach_every_node() {
    let redis = Redis::start();
    let app = Upstream::start().await;
    let (a, b) = (jwt_node(&app, &redis).await, jwt_node(&app, &redis).await);

    let mut on_a = connect_as(&a, "ann").await;
    subscribe(&mut on_a, "chat:1", None).await;
    subscribe(&mut on_a, "chat:2", None).await;
    let mut bob = connect_as(&a, "bob").await;
    assert!(still_open(&mut bob).await);

    let (status, body) = api_post(
        b.api_addr,
        "/api/unsubscribe",
        json!({"user": "ann", "channel": "chat:1"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["unsubscribed"], 0, "nobody on the node that was asked");
    let pushed = loop {
        let value = next_json(&mut on_a).await;
        if value["op"] == "unsubscribed" {
            break value;
        }
    };
    assert_eq!(pushed["channel"], "chat:1");
    publish(b.api_addr, "chat:2", json!("still here")).await;
    assert_eq!(next_json(&mut on_a).await["data"], "still here");

    let (status, body) = api_post(
        b.api_addr,
        "/api/disconnect",
        json!({"user": "ann", "code": 4000, "reason": "bye"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(close_code(&mut on_a).await, Some(4000));
    assert!(still_open(&mut bob).await, "only that user");
}

/// The pub/sub connection is pinged every few seconds to notice a dead
/// Redis; a subscribed connection answers that ping in its own form, and
/// the answer must keep the connection, not drop and resubscribe it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pubsub_connection_outlives_its_keepalive_pings() {
    let redis = Redis::start();
    let app = Upstream::start().await;
    let gate = node(&app, &redis).await;
    let mut client = connect(&gate).await;
    subscribe(&mut client, "kept", None).await;

    // Redis's view of the node's subscribed connection: its id and last
    // command.
    let subscribed = || -> Option<(String, String)> {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "CLIENT", "LIST"])
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let field = |name: &str| {
                    line.split(' ')
                        .find_map(|kv| kv.strip_prefix(name))
                        .map(str::to_owned)
                };
                let channels: u32 = field("sub=")?.parse().ok()?;
                if channels == 0 {
                    return None;
                }
                Some((field("id=")?, field("cmd=")?))
            })
    };
    let (id, _) = subscribed().expect("the node subscribed in Redis");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (now, cmd) = subscribed().expect("the subscribed connection stays");
        assert_eq!(now, id, "the node dropped its pub/sub connection");
        if cmd == "ping" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node never pinged its pub/sub connection"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The answer was taken: the same connection carries the next publish.
    publish(gate.api_addr, "kept", json!("still here")).await;
    assert_eq!(next_json(&mut client).await["data"], json!("still here"));
    let (still, _) = subscribed().expect("the subscribed connection stays");
    assert_eq!(still, id, "the node dropped its pub/sub connection");
    let (_, metrics) = common::get(&format!("http://{}/metrics", gate.api_addr)).await;
    assert!(
        metrics.contains("pushgate_redis_reconnects_total 0"),
        "{metrics}"
    );
}
