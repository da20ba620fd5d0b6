//! Connection events sent to the app (`events`): batched and signed, each
//! sent once across two nodes on one Redis, and while the app is down held
//! up to the bound, the oldest dropped and counted, never blocking a client.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::events_app::{EventsApp, EVENTS_PATH, SECRET};
use common::redis::Redis;
use common::{Pushgate, PATIENCE};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Events on, for `app`, with `extra` YAML after the `events` keys.
fn config(extra: &str) -> String {
    format!(
        "events:\n  path: {EVENTS_PATH}\n  secret: {SECRET}\n{extra}channels:\n  - prefix: \"room:\"\n    presence: true\n"
    )
}

/// Waits, within [`PATIENCE`], until `check` gives a value.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `/metrics` samples whose names start with `pushgate_events`.
async fn event_metrics(api: SocketAddr) -> BTreeMap<String, u64> {
    let (status, text) = common::get(&format!("http://{api}/metrics")).await;
    assert!(status.is_success(), "{text}");
    text.lines()
        .filter(|line| line.starts_with("pushgate_events"))
        .filter_map(|line| line.rsplit_once(' '))
        .map(|(name, value)| (name.to_owned(), value.parse().unwrap()))
        .collect()
}

async fn metric(api: SocketAddr, name: &str) -> u64 {
    event_metrics(api)
        .await
        .get(name)
        .copied()
        .unwrap_or_else(|| panic!("{name} is not exposed"))
}

/// The fields of an event the tests compare: kind, channel and reason.
fn summary(event: &Value) -> (String, String, String) {
    let text = |key: &str| event[key].as_str().unwrap_or("").to_owned();
    (text("kind"), text("channel"), text("reason"))
}

fn summaries(events: &[&Value]) -> Vec<(String, String, String)> {
    events.iter().map(|e| summary(e)).collect()
}

fn expected(list: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    list.iter()
        .map(|(k, c, r)| (k.to_string(), c.to_string(), r.to_string()))
        .collect()
}

/// The events of `connection`, in the order the app received them.
fn of_connection<'a>(events: &'a [Value], connection: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["connection"] == connection)
        .collect()
}

/// Closes a WebSocket from the client's side and waits for the server's
/// answer.
async fn close(mut client: common::WsClient) {
    client.send(Message::Close(None)).await.unwrap();
    common::ws_close_code(&mut client).await;
}

#[tokio::test]
async fn events_arrive_batched_signed_and_in_order_for_websocket_and_sse_but_not_poll() {
    let app = EventsApp::start().await;
    let mut gate =
        Pushgate::start(&app.url(), &config("  batch_size: 3\n  interval: 50ms\n")).await;

    let mut ws = common::ws_connect(gate.addr, "?channel=news").await;
    let reply = common::ws_subscribe(&mut ws, 1, "room:1", None).await;
    assert!(reply.get("result").is_some(), "{reply}");
    ws.send(Message::text(
        json!({"id": 2, "op": "unsubscribe", "channel": "room:1"}).to_string(),
    ))
    .await
    .unwrap();
    loop {
        if common::ws_next_json(&mut ws).await["id"] == 2 {
            break;
        }
    }
    close(ws).await;

    let mut sse = common::realtime::Sse::open(gate.addr, &["feed"], None)
        .await
        .unwrap();
    sse.next().await.unwrap().expect("the opening block");
    drop(sse);

    // A long-poll is a short request: it sends nothing.
    common::realtime::poll(gate.addr, &["news"], None, 0)
        .await
        .unwrap();

    let events = eventually("both connections' disconnects reach the app", || async {
        let events = app.accepted_events();
        let disconnects = events.iter().filter(|e| e["kind"] == "disconnect").count();
        (disconnects == 2).then_some(events)
    })
    .await;

    let batches = app.batches();
    for batch in &batches {
        assert!(batch.signature_verifies(), "{batch:?}");
        assert_eq!(batch.content_type.as_deref(), Some("application/json"));
        let body = batch.json();
        let events = body["events"].as_array().unwrap();
        assert!(
            (1..=3).contains(&events.len()),
            "events.batch_size bounds a batch: {body}"
        );
        let sent = body["time_ms"].as_u64().unwrap();
        for event in events {
            assert!(event["time_ms"].as_u64().unwrap() <= sent, "{body}");
        }
    }
    assert!(
        batches.iter().any(|batch| batch.events().len() > 1),
        "events that come together share a batch"
    );
    // A signature over other bytes does not verify.
    let mut forged = batches[0].clone();
    forged.body.push(b' ');
    assert!(!forged.signature_verifies());

    let ids: BTreeSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events.len(), "each event once: {events:#?}");
    assert!(
        events.iter().all(|e| e["transport"] != "poll"),
        "{events:#?}"
    );

    let connections: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "connect")
        .map(|e| e["connection"].as_str().unwrap())
        .collect();
    assert_eq!(connections.len(), 2, "{events:#?}");
    let ws_events = of_connection(&events, connections[0]);
    assert!(ws_events.iter().all(|e| e["transport"] == "websocket"));
    assert!(
        ws_events.iter().all(|e| e["user"].is_null()),
        "auth.mode none names no user"
    );
    assert_eq!(
        summaries(&ws_events),
        expected(&[
            ("connect", "", ""),
            ("subscribe", "news", ""),
            ("subscribe", "room:1", ""),
            ("join", "room:1", ""),
            ("leave", "room:1", "client_unsubscribed"),
            ("unsubscribe", "room:1", "client_unsubscribed"),
            ("unsubscribe", "news", "client_closed"),
            ("disconnect", "", "client_closed"),
        ])
    );
    let sse_events = of_connection(&events, connections[1]);
    assert!(sse_events.iter().all(|e| e["transport"] == "sse"));
    assert_eq!(
        summaries(&sse_events),
        expected(&[
            ("connect", "", ""),
            ("subscribe", "feed", ""),
            ("unsubscribe", "feed", "client_closed"),
            ("disconnect", "", "client_closed"),
        ])
    );

    let metrics = event_metrics(gate.api_addr).await;
    assert_eq!(
        metrics["pushgate_events_sent_total"],
        events.len() as u64,
        "{metrics:?}"
    );
    assert_eq!(metrics["pushgate_events_queued"], 0);
    assert_eq!(
        metrics["pushgate_events_dropped_total{reason=\"queue_full\"}"],
        0
    );
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    for family in [
        "pushgate_events_sent_total",
        "pushgate_events_dropped_total",
        "pushgate_events_retries_total",
        "pushgate_events_queued",
    ] {
        assert!(
            docs.contains(&format!("`{family}")),
            "{family} is not in docs/api.md"
        );
    }

    // Shutting down closes the connections left with `shutdown`, and
    // their last events still reach the app.
    let mut ws = common::ws_connect(gate.addr, "?channel=news").await;
    eventually("the connect of the connection left open", || async {
        (app.accepted_events().len() > events.len()).then_some(())
    })
    .await;
    let stopped = gate.shutdown();
    assert_eq!(common::ws_close_code(&mut ws).await, Some(1001));
    stopped.await.unwrap().unwrap();
    let last: Vec<Value> = app.accepted_events()[events.len()..].to_vec();
    assert_eq!(
        summaries(&last.iter().collect::<Vec<_>>()),
        expected(&[
            ("connect", "", ""),
            ("subscribe", "news", ""),
            ("unsubscribe", "news", "shutdown"),
            ("disconnect", "", "shutdown"),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_redis_each_send_only_their_own_connections_events_once() {
    let redis = Redis::start();
    let app = EventsApp::start().await;
    let engine = format!(
        "engine:\n  kind: redis\n  redis:\n    url: {}\n    presence_ttl: 3s\n",
        redis.url()
    );
    let yaml = format!("{engine}{}", config("  interval: 20ms\n"));
    let one = Pushgate::start(&app.url(), &yaml).await;
    let two = Pushgate::start(&app.url(), &yaml).await;

    // Both hear room:1, whose joins and leaves cross the nodes through
    // Redis: only the node that holds a connection tells the app of it.
    let mut ann = common::ws_connect(one.addr, "").await;
    let mut bob = common::ws_connect(two.addr, "").await;
    for client in [&mut ann, &mut bob] {
        let reply = common::ws_subscribe(client, 1, "room:1", None).await;
        assert!(reply.get("result").is_some(), "{reply}");
    }
    close(ann).await;
    close(bob).await;

    let events = eventually("both disconnects reach the app", || async {
        let events = app.accepted_events();
        let disconnects = events.iter().filter(|e| e["kind"] == "disconnect").count();
        (disconnects == 2).then_some(events)
    })
    .await;
    let ids: BTreeSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events.len(), "no event twice: {events:#?}");
    let connections: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "connect")
        .map(|e| e["connection"].as_str().unwrap())
        .collect();
    assert_eq!(connections.len(), 2, "{events:#?}");
    let nodes: BTreeSet<&str> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().split(':').next().unwrap())
        .collect();
    assert_eq!(nodes.len(), 2, "both nodes sent events: {events:#?}");
    for connection in connections {
        let mine = of_connection(&events, connection);
        assert_eq!(
            summaries(&mine),
            expected(&[
                ("connect", "", ""),
                ("subscribe", "room:1", ""),
                ("join", "room:1", ""),
                ("leave", "room:1", "client_closed"),
                ("unsubscribe", "room:1", "client_closed"),
                ("disconnect", "", "client_closed"),
            ]),
            "{connection}: {events:#?}"
        );
        // Sent by the node that holds the connection (connection ids
        // start with their node's name).
        for event in mine {
            let node = event["id"].as_str().unwrap().split(':').next().unwrap();
            assert!(connection.starts_with(&format!("{node}-")), "{event}");
        }
    }
    // Every batch verifies, and none was sent twice.
    assert!(app.batches().iter().all(|b| b.signature_verifies()));
    for gate in [&one, &two] {
        assert_eq!(
            metric(gate.api_addr, "pushgate_events_retries_total").await,
            0
        );
    }
}

#[tokio::test]
async fn while_the_app_is_down_the_oldest_events_are_dropped_and_counted_and_clients_never_wait() {
    let app = EventsApp::start().await;
    app.answer(503);
    let gate = Pushgate::start(
        &app.url(),
        &config("  batch_size: 2\n  queue: 5\n  interval: 10ms\n  timeout: 1s\n"),
    )
    .await;

    // Ten connections come and go (a connect and a disconnect each) while
    // every batch is answered 503: none of them waits for the app.
    let started = Instant::now();
    for _ in 0..10 {
        let mut client = common::ws_connect(gate.addr, "").await;
        let reply = common::ws_subscribe(&mut client, 1, "room:1", None).await;
        assert!(reply.get("result").is_some(), "{reply}");
        client
            .send(Message::text(
                json!({"id": 2, "op": "unsubscribe", "channel": "room:1"}).to_string(),
            ))
            .await
            .unwrap();
        loop {
            if common::ws_next_json(&mut client).await["id"] == 2 {
                break;
            }
        }
        close(client).await;
    }
    assert!(
        started.elapsed() < PATIENCE,
        "clients waited for the app: {:?}",
        started.elapsed()
    );
    // Six events a connection: connect, subscribe, join, leave,
    // unsubscribe, disconnect. Five are kept; the other 55 were dropped,
    // oldest first.
    let api = gate.api_addr;
    eventually("sixty events queued or dropped", || async {
        let metrics = event_metrics(api).await;
        (metrics["pushgate_events_dropped_total{reason=\"queue_full\"}"] == 55).then_some(())
    })
    .await;
    let metrics = event_metrics(api).await;
    assert_eq!(metrics["pushgate_events_queued"], 5, "{metrics:?}");
    assert_eq!(metrics["pushgate_events_sent_total"], 0, "{metrics:?}");
    eventually("the failed batch is sent again", || async {
        (metric(api, "pushgate_events_retries_total").await >= 1).then_some(())
    })
    .await;
    assert!(app
        .batches()
        .iter()
        .all(|b| b.answered == 503 && b.signature_verifies()));

    // The app is back: the five kept (the newest) arrive, in order, once.
    app.answer(200);
    let delivered = eventually("the kept events are delivered", || async {
        let events = app.accepted_events();
        (events.len() >= 5).then_some(events)
    })
    .await;
    eventually("the queue is empty", || async {
        (metric(api, "pushgate_events_queued").await == 0).then_some(())
    })
    .await;
    assert_eq!(app.accepted_events().len(), 5, "{delivered:#?}");
    let numbers: Vec<u64> = delivered
        .iter()
        .map(|e| {
            let id = e["id"].as_str().unwrap();
            id.rsplit_once(':').unwrap().1.parse().unwrap()
        })
        .collect();
    assert_eq!(numbers, [55, 56, 57, 58, 59], "the newest five, in order");
    assert_eq!(
        summaries(&delivered.iter().skip(4).collect::<Vec<_>>()),
        expected(&[("disconnect", "", "client_closed")])
    );
    let metrics = event_metrics(api).await;
    assert_eq!(metrics["pushgate_events_sent_total"], 5, "{metrics:?}");
    assert_eq!(
        metrics["pushgate_events_dropped_total{reason=\"queue_full\"}"],
        55
    );

    // An app that refuses a batch (a 4xx) is not asked again: the batch is
    // dropped and counted.
    app.answer(400);
    close(common::ws_connect(gate.addr, "").await).await;
    eventually("the refused batch is counted", || async {
        let metrics = event_metrics(api).await;
        (metrics["pushgate_events_dropped_total{reason=\"refused\"}"] == 2).then_some(())
    })
    .await;
    assert_eq!(metric(api, "pushgate_events_queued").await, 0);
}

/// The code block of `language` in docs/api.md's "Verifying the signature".
fn documented_verifier(language: &str) -> String {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    let section = docs
        .split("### Verifying the signature")
        .nth(1)
        .expect("docs/api.md has the section");
    let fence = format!("```{language}\n");
    let start = section.find(&fence).expect("a code block") + fence.len();
    let end = start + section[start..].find("```").unwrap();
    section[start..end].to_owned()
}

/// Runs the verifier documented for `language` on `body` and `signature`:
/// whether it accepted them.
fn documented_verifier_accepts(language: &str, body: &[u8], signature: &str) -> bool {
    let scratch = common::TempDir::new("events-verifier");
    let file = scratch.0.join("body");
    std::fs::write(&file, body).unwrap();
    let file = file.to_str().unwrap();
    let snippet = documented_verifier(language);
    let mut command = match language {
        "python" => {
            let mut command = std::process::Command::new("python3");
            let script = format!(
                "{snippet}\nimport sys\nverify(sys.argv[1].encode(), open(sys.argv[2], 'rb').read(), sys.argv[3])\n"
            );
            command.args(["-c", &script]);
            command
        }
        _ => {
            let mut command = std::process::Command::new("node");
            let script = format!(
                "{snippet}\nverify(process.argv[1], require('fs').readFileSync(process.argv[2]), process.argv[3]);\n"
            );
            command.args(["-e", &script]);
            command
        }
    };
    command.args([SECRET, file, signature]);
    let ran = common::pyenv::run(&mut command, &scratch.0, PATIENCE)
        .unwrap_or_else(|err| panic!("this test runs python3 and node: {err}"));
    assert!(ran.status.is_some(), "{}", ran.describe(PATIENCE));
    ran.ok()
}

#[tokio::test]
async fn the_documented_verifiers_accept_a_real_batch_and_refuse_a_forged_one() {
    let app = EventsApp::start().await;
    let gate = Pushgate::start(&app.url(), &config("  interval: 10ms\n")).await;
    close(common::ws_connect(gate.addr, "").await).await;
    let batch = eventually("a batch reaches the app", || async {
        app.batches().into_iter().next()
    })
    .await;
    let signature = batch.signature.clone().unwrap();
    let mut forged = batch.body.clone();
    forged.extend_from_slice(b" ");
    for language in ["python", "js"] {
        assert!(
            documented_verifier_accepts(language, &batch.body, &signature),
            "the {language} verifier refused a real batch"
        );
        assert!(
            !documented_verifier_accepts(language, &forged, &signature),
            "the {language} verifier accepted a forged batch"
        );
    }
}

#[tokio::test]
async fn the_app_is_told_of_its_own_orders_with_the_user_it_named() {
    let app = EventsApp::start().await;
    let extra = format!("auth:\n  mode: upstream\n{}", config("  interval: 10ms\n"));
    let gate = Pushgate::start(&app.url(), &extra).await;
    let mut ws = common::ws_connect(gate.addr, "?channel=news").await;
    let reply = common::ws_subscribe(&mut ws, 1, "room:1", None).await;
    assert!(reply.get("result").is_some(), "{reply}");

    let (status, body) = common::api_call(
        gate.api_addr,
        "POST",
        "/api/unsubscribe",
        Some(json!({"user": "42", "channel": "room:1"})),
    )
    .await;
    assert!(status.is_success(), "{body}");
    loop {
        if common::ws_next_json(&mut ws).await["op"] == "unsubscribed" {
            break;
        }
    }
    let (status, body) = common::api_call(
        gate.api_addr,
        "POST",
        "/api/disconnect",
        Some(json!({"user": "42"})),
    )
    .await;
    assert!(status.is_success(), "{body}");
    assert_eq!(common::ws_close_code(&mut ws).await, Some(4000));

    let events = eventually("the disconnect reaches the app", || async {
        let events = app.accepted_events();
        events
            .iter()
            .any(|e| e["kind"] == "disconnect")
            .then_some(events)
    })
    .await;
    assert!(events.iter().all(|e| e["user"] == "42"), "{events:#?}");
    assert_eq!(
        summaries(&events.iter().collect::<Vec<_>>()),
        expected(&[
            ("connect", "", ""),
            ("subscribe", "news", ""),
            ("subscribe", "room:1", ""),
            ("join", "room:1", ""),
            ("leave", "room:1", "app_unsubscribe"),
            ("unsubscribe", "room:1", "app_unsubscribe"),
            ("unsubscribe", "news", "app_disconnect"),
            ("disconnect", "", "app_disconnect"),
        ])
    );
}

#[tokio::test]
async fn events_wait_for_an_app_that_is_not_listening_yet_within_the_bound() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gate = Pushgate::start(
        &format!("http://{addr}"),
        &config("  batch_size: 2\n  queue: 4\n  interval: 10ms\n  timeout: 1s\n"),
    )
    .await;
    // Three connections come and go: six events, of which four are kept.
    for _ in 0..3 {
        close(common::ws_connect(gate.addr, "").await).await;
    }
    let api = gate.api_addr;
    eventually(
        "two events dropped and the refused connections retried",
        || async {
            let metrics = event_metrics(api).await;
            (metrics["pushgate_events_dropped_total{reason=\"queue_full\"}"] == 2
                && metrics["pushgate_events_retries_total"] >= 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(metric(api, "pushgate_events_queued").await, 4);

    let app = EventsApp::start_on(addr).await;
    eventually("the queue is empty", || async {
        (metric(api, "pushgate_events_queued").await == 0).then_some(())
    })
    .await;
    let numbers: Vec<u64> = app
        .accepted_events()
        .iter()
        .map(|e| {
            let id = e["id"].as_str().unwrap();
            id.rsplit_once(':').unwrap().1.parse().unwrap()
        })
        .collect();
    assert_eq!(numbers, [2, 3, 4, 5], "the newest four, in order, once");
    assert_eq!(metric(api, "pushgate_events_sent_total").await, 4);
}
