//! The Redis engine's connection forms against real redis-server
//! processes: a password and a database number, an ACL user, TLS with a
//! private CA, and a wrong password (refused plainly, never published).

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::{Pushgate, Upstream};
use http::StatusCode;
use serde_json::{json, Value};

async fn publish(api: SocketAddr, channel: &str) -> (StatusCode, Value) {
    common::api_call(
        api,
        "POST",
        "/api/publish",
        Some(json!({"channel": channel, "data": 1})),
    )
    .await
}

async fn node(app: &Upstream, redis_yaml: &str) -> Pushgate {
    Pushgate::start(
        &app.url(),
        &format!("engine:\n  kind: redis\n  redis:\n{redis_yaml}"),
    )
    .await
}

/// Waits for /readyz to answer `want`.
async fn ready_becomes(api: SocketAddr, want: StatusCode) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = common::get(&format!("http://{api}/readyz")).await;
        if status == want {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_password_and_a_database_number() {
    let redis = Redis::start_with(&["--requirepass", "s3cret"]);
    let app = Upstream::start().await;
    let gate = node(
        &app,
        &format!("    url: redis://:s3cret@127.0.0.1:{}/3\n", redis.port),
    )
    .await;
    ready_becomes(gate.api_addr, StatusCode::OK).await;
    let (status, body) = publish(gate.api_addr, "db").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The keys are in database 3, not 0.
    let count = |db: &str| {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &redis.port.to_string(),
                "-a",
                "s3cret",
                "--no-auth-warning",
                "-n",
                db,
                "DBSIZE",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    assert!(count("3") >= 2, "meta and stream in db 3");
    assert_eq!(count("0"), 0);
}

#[tokio::test]
async fn an_acl_user() {
    let redis = Redis::start_with(&[
        "--user", "default", "off", "--user", "gate", "on", ">pw", "~*", "&*", "+@all",
    ]);
    let app = Upstream::start().await;
    let gate = node(
        &app,
        &format!("    url: redis://gate:pw@127.0.0.1:{}\n", redis.port),
    )
    .await;
    ready_becomes(gate.api_addr, StatusCode::OK).await;
    assert_eq!(publish(gate.api_addr, "acl").await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_wrong_password_is_refused_plainly_and_nothing_is_published() {
    let redis = Redis::start_with(&["--requirepass", "s3cret"]);
    let app = Upstream::start().await;
    let gate = node(
        &app,
        &format!("    url: redis://:wrong@127.0.0.1:{}\n", redis.port),
    )
    .await;
    let body = ready_becomes(gate.api_addr, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(body.contains("unavailable"), "{body}");
    let (status, body) = publish(gate.api_addr, "nope").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "engine_unavailable");
}

#[tokio::test]
async fn tls_with_a_private_ca() {
    let redis = Redis::start_tls();
    let app = Upstream::start().await;
    let gate = node(
        &app,
        &format!(
            "    url: rediss://127.0.0.1:{}\n    tls_ca_file: {}\n",
            redis.port,
            redis.ca_file().display()
        ),
    )
    .await;
    ready_becomes(gate.api_addr, StatusCode::OK).await;
    let (status, body) = publish(gate.api_addr, "tls").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Without the CA, the server's certificate is not trusted.
    let untrusted = node(
        &app,
        &format!("    url: rediss://127.0.0.1:{}\n", redis.port),
    )
    .await;
    ready_becomes(untrusted.api_addr, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(
        publish(untrusted.api_addr, "tls").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}
