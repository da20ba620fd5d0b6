//! The metrics an operator alerts on, counted where things happen and read
//! in a real scrape: connects refused by reason, resumes by outcome,
//! proxied requests by status class with their latency, and the latency
//! from publish to socket.

use crate::common;

use common::{api_call, get, ws_next_json, ws_subscribe, Pushgate, Upstream};
use http::StatusCode;
use serde_json::json;

/// The value of the sample `line` names (`name{labels}`), 0 when absent.
fn sample(metrics: &str, line: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn refusals_resumes_proxied_answers_and_delivery_are_counted() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "rpc: {path: /rpc}\n").await;
    let scrape = || async {
        let (status, text) = get(&format!("http://{}/metrics", gate.api_addr)).await;
        assert_eq!(status, StatusCode::OK);
        text
    };

    // Proxied: one 2xx from the app, one 404 of pushgate's own (the app's
    // rpc endpoint, which only pushgate calls).
    assert_eq!(get(&gate.url("/headers")).await.0, StatusCode::OK);
    assert_eq!(get(&gate.url("/rpc")).await.0, StatusCode::NOT_FOUND);
    let before = scrape().await;
    assert_eq!(
        sample(&before, "pushgate_proxied_requests_total{class=\"2xx\"}"),
        1.0
    );
    assert_eq!(
        sample(&before, "pushgate_proxied_requests_total{class=\"4xx\"}"),
        1.0
    );
    assert_eq!(
        sample(&before, "pushgate_proxy_response_seconds_count"),
        2.0
    );

    // A connect from a foreign Origin, refused and counted by its code.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/realtime/ws",
            gate.addr
        ))
        .unwrap();
    request
        .headers_mut()
        .insert("origin", "https://elsewhere.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_err());

    // Resumes: one from the stream's position (recovered), one from an
    // epoch the stream never had (reset).
    let (status, published) = api_call(
        gate.api_addr,
        "POST",
        "/api/publish",
        Some(json!({"channel": "m", "data": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let at = format!(
        "{}:{}",
        published["results"][0]["epoch"].as_str().unwrap(),
        1
    );
    let mut ws = common::ws_connect(gate.addr, "").await;
    let reply = ws_subscribe(&mut ws, 1, "m", Some(&at)).await;
    assert_eq!(reply["result"]["recovered"], true, "{reply}");
    let reply = ws_subscribe(&mut ws, 2, "n", Some("Zz9:5")).await;
    assert_eq!(reply["result"]["recovered"], false, "{reply}");
    // A delivery, timed from its storing.
    api_call(
        gate.api_addr,
        "POST",
        "/api/publish",
        Some(json!({"channel": "m", "data": 2})),
    )
    .await;
    loop {
        if ws_next_json(&mut ws).await["data"] == 2 {
            break;
        }
    }

    let after = scrape().await;
    assert_eq!(
        sample(
            &after,
            "pushgate_connects_refused_total{reason=\"origin_not_allowed\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&after, "pushgate_resumes_total{outcome=\"recovered\"}"),
        1.0
    );
    assert_eq!(
        sample(&after, "pushgate_resumes_total{outcome=\"reset\"}"),
        1.0
    );
    assert!(
        sample(&after, "pushgate_delivery_latency_seconds_count") >= 1.0,
        "{after}"
    );
    assert_eq!(sample(&after, "pushgate_calls_in_flight"), 0.0);
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    for family in after.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let family = family.split_whitespace().next().unwrap();
        assert!(
            docs.contains(&format!("`{family}")),
            "{family} is not in docs/api.md"
        );
    }
}
