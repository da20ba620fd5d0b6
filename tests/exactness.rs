//! Exactness under faults, each case over real sockets to real processes:
//! long-polls on a Redis node are reset only when history cannot cover
//! their gap; idempotent publishes compare JSON values, not bytes; a drain
//! answers every long-poll in flight.

mod common;

use std::net::SocketAddr;
use std::time::Instant;

use common::realtime::{cursor_from_start, poll, Got};
use common::redis::Redis;
use common::{Pushgate, Upstream, PATIENCE};
use http::StatusCode;
use serde_json::{json, Value};

async fn redis_node(app: &Upstream, redis: &Redis) -> Pushgate {
    Pushgate::start(
        &app.url(),
        &format!(
            "engine:\n  kind: redis\n  redis:\n    url: {}\nhistory:\n  size: 10000\n",
            redis.url()
        ),
    )
    .await
}

async fn publish(api: SocketAddr, body: Value) -> (StatusCode, Value) {
    common::api_call(api, "POST", "/api/publish", Some(body)).await
}

/// Many long-pollers in lock step on node A, which hears the channels only
/// through them (so it subscribes in Redis as their polls come and may
/// unsubscribe between them), while node B publishes a numbered stream on
/// each: with history covering everything, every poller gets every message
/// once, in order, and never a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_step_long_polls_on_a_redis_node_get_everything_and_no_reset() {
    const CHANNELS: usize = 4;
    const POLLERS_PER_CHANNEL: usize = 8;
    const MESSAGES: u64 = 300;
    let redis = Redis::start();
    let app = Upstream::start().await;
    let a = redis_node(&app, &redis).await;
    let b = redis_node(&app, &redis).await;

    let channels: Vec<String> = (0..CHANNELS).map(|c| format!("lp{c}")).collect();
    let mut pollers = Vec::new();
    for channel in &channels {
        for index in 0..POLLERS_PER_CHANNEL {
            let name = format!("{channel} poller {index}");
            let (addr, channel) = (a.addr, channel.clone());
            let poller = tokio::spawn(async move {
                let mut cursor = cursor_from_start(&[&channel]);
                let mut got: Vec<Got> = Vec::new();
                let deadline = Instant::now() + 4 * PATIENCE;
                while !got
                    .iter()
                    .any(|g| matches!(g, Got::Message { data, .. } if *data == json!(MESSAGES)))
                {
                    assert!(Instant::now() < deadline, "the poller starved: {got:?}");
                    let polled = poll(addr, &[&channel], Some(&cursor), 10)
                        .await
                        .unwrap_or_else(|err| panic!("poll failed: {err}"));
                    got.extend(polled.got);
                    cursor = polled.cursor;
                }
                got
            });
            pollers.push((name, poller));
        }
    }
    let publishers: Vec<_> = channels
        .iter()
        .map(|channel| {
            let (api, channel) = (b.api_addr, channel.clone());
            tokio::spawn(async move {
                for n in 1..=MESSAGES {
                    let (status, body) = publish(api, json!({"channel": channel, "data": n})).await;
                    assert_eq!(status, StatusCode::OK, "{body}");
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    for (name, poller) in pollers {
        let got = tokio::time::timeout(4 * PATIENCE, poller)
            .await
            .expect("the poller finishes")
            .unwrap();
        let resets: Vec<&Got> = got
            .iter()
            .filter(|g| matches!(g, Got::Reset { .. }))
            .collect();
        assert!(
            resets.is_empty(),
            "{name} was reset although history covers everything: {resets:?}"
        );
        let data: Vec<u64> = got
            .iter()
            .filter_map(|g| match g {
                Got::Message { data, .. } => data.as_u64(),
                Got::Reset { .. } => None,
            })
            .collect();
        assert_eq!(
            data,
            (1..=MESSAGES).collect::<Vec<_>>(),
            "{name}: every message once, in order"
        );
    }
}
