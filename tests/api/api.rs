//! The publish/admin API over real HTTP: publish forms, history, channels,
//! health, metrics, and every whole-request error.

use crate::common;

use bytes::Bytes;
use common::{Pushgate, Upstream, API_KEY};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|err| panic!("{err}: {}", self.text))
    }

    /// The `error.code` of a whole-request error.
    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

async fn call(
    gate: &Pushgate,
    method: Method,
    path: &str,
    key: Option<&str>,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gate.api_addr));
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let request = request.body(common::body(body.into())).unwrap();
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        common::client().request(request),
    )
    .await
    .expect("the API answers")
    .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn publish(gate: &Pushgate, body: Value) -> Answer {
    call(
        gate,
        Method::POST,
        "/api/publish",
        Some(API_KEY),
        Some("application/json"),
        body.to_string(),
    )
    .await
}

async fn get(gate: &Pushgate, path: &str) -> Answer {
    call(gate, Method::GET, path, Some(API_KEY), None, "").await
}

async fn start() -> (Upstream, Pushgate) {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "").await;
    (app, gate)
}

#[tokio::test]
async fn a_publish_is_stored_and_replayed_as_an_envelope() {
    let (_app, gate) = start().await;
    // Raw text, so the payload's number is written exactly as below.
    let answer = call(
        &gate,
        Method::POST,
        "/api/publish",
        Some(API_KEY),
        Some("application/json; charset=utf-8"),
        r#"{"channel": "chat:1", "data": {"text": "hi", "n": 1.50}, "event": "msg"}"#,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let results = answer.json()["results"].clone();
    assert_eq!(results.as_array().unwrap().len(), 1);
    assert_eq!(results[0]["channel"], "chat:1");
    assert_eq!(results[0]["offset"], 1);
    let epoch = results[0]["epoch"].as_str().unwrap().to_owned();

    let second = publish(&gate, json!({"channel": "chat:1", "data": null})).await;
    assert_eq!(second.status, StatusCode::OK, "null is valid data");
    assert_eq!(second.json()["results"][0]["offset"], 2);

    let history = get(&gate, "/api/history?channel=chat%3A1").await;
    assert_eq!(history.status, StatusCode::OK);
    let body = history.json();
    assert_eq!(body["epoch"], epoch.as_str());
    assert_eq!(body["offset"], 2);
    assert_eq!(body["recovered"], true);
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(
        messages[0],
        json!({"channel": "chat:1", "epoch": epoch, "offset": 1, "event": "msg", "data": {"text": "hi", "n": 1.50}})
    );
    assert_eq!(
        messages[1],
        json!({"channel": "chat:1", "epoch": epoch, "offset": 2, "data": null})
    );
    // The envelope never carries `op` or `id`.
    assert!(messages
        .iter()
        .all(|m| m.get("op").is_none() && m.get("id").is_none()));
    // Numbers pass through as the publisher wrote them.
    assert!(history.text.contains("\"n\":1.50"), "{}", history.text);
}

#[tokio::test]
async fn history_since_a_position_replays_or_says_it_cannot() {
    let (_app, gate) = start().await;
    let mut epoch = String::new();
    for n in 0..5 {
        let answer = publish(&gate, json!({"channel": "h", "data": n})).await;
        epoch = answer.json()["results"][0]["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    let since = get(&gate, &format!("/api/history?channel=h&since={epoch}:2")).await;
    let offsets: Vec<u64> = since.json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![3, 4, 5]);
    assert_eq!(since.json()["recovered"], true);

    let limited = get(
        &gate,
        &format!("/api/history?channel=h&since={epoch}:0&limit=2"),
    )
    .await;
    assert_eq!(limited.json()["messages"].as_array().unwrap().len(), 2);

    let ahead = get(&gate, &format!("/api/history?channel=h&since={epoch}:99")).await;
    assert_eq!(ahead.status, StatusCode::OK);
    assert_eq!(ahead.json()["recovered"], false);
    assert_eq!(ahead.json()["messages"], json!([]));
    assert_eq!(ahead.json()["offset"], 5);

    let other_epoch = get(&gate, "/api/history?channel=h&since=zzz:3").await;
    assert_eq!(other_epoch.json()["recovered"], false);
}

#[tokio::test]
async fn several_channels_in_one_publish_each_get_a_publication() {
    let (_app, gate) = start().await;
    let answer = publish(&gate, json!({"channels": ["a", "b", "c"], "data": "x"})).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let results = answer.json()["results"].clone();
    let names: Vec<&str> = results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["channel"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(results.as_array().unwrap().iter().all(|r| r["offset"] == 1));
}

#[tokio::test]
async fn a_batch_answers_each_item_in_order_and_a_bad_item_spoils_nothing() {
    let (_app, gate) = start().await;
    let answer = publish(
        &gate,
        json!([
            {"channel": "b1", "data": 1},
            {"channel": "bad channel", "data": 2},
            {"channel": "b1", "data": 3, "event": "no spaces allowed"},
            {"channel": "b1"},
            {"channel": "b2", "data": 5},
            "not an object",
        ]),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let items = answer.json();
    let items = items.as_array().unwrap();
    assert_eq!(items.len(), 6);
    assert_eq!(items[0]["results"][0]["offset"], 1);
    assert_eq!(items[1]["error"]["code"], "bad_channel");
    assert_eq!(items[2]["error"]["code"], "bad_event");
    assert_eq!(items[3]["error"]["code"], "missing_data");
    assert_eq!(items[4]["results"][0]["channel"], "b2");
    assert_eq!(items[5]["error"]["code"], "bad_json");
    let history = get(&gate, "/api/history?channel=b1").await;
    assert_eq!(history.json()["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn an_idempotency_key_is_answered_with_the_first_result() {
    let (_app, gate) = start().await;
    let body = json!({"channel": "pay", "data": {"id": 7}, "idempotency_key": "order-7"});
    let first = publish(&gate, body.clone()).await;
    let again = publish(&gate, body).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(first.json(), again.json());
    let history = get(&gate, "/api/history?channel=pay").await;
    assert_eq!(history.json()["messages"].as_array().unwrap().len(), 1);

    let metrics = call(&gate, Method::GET, "/metrics", None, None, "").await;
    assert!(
        metrics
            .text
            .contains("pushgate_publishes_total{outcome=\"duplicate\"} 1"),
        "{}",
        metrics.text
    );
}

#[tokio::test]
async fn the_api_needs_a_key() {
    let (_app, gate) = start().await;
    let body = json!({"channel": "c", "data": 1}).to_string();
    for key in [
        None,
        Some("wrong-key"),
        Some("test-ke"),
        Some("test-key-and-more"),
    ] {
        let answer = call(
            &gate,
            Method::POST,
            "/api/publish",
            key,
            Some("application/json"),
            body.clone(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(answer.code(), "unauthorized");
        assert_eq!(answer.headers["www-authenticate"], "Bearer");
    }
    // Unauthenticated callers do not learn which endpoints exist.
    let unknown = call(&gate, Method::GET, "/api/nothing", None, None, "").await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    // Nothing was published.
    let history = get(&gate, "/api/history?channel=c").await;
    assert_eq!(history.json()["offset"], 0);
}

#[tokio::test]
async fn whole_request_errors_say_what_was_wrong() {
    let (_app, gate) = start().await;
    let json_type = Some("application/json");
    let post = |body: &'static str, content_type: Option<&'static str>| {
        call(
            &gate,
            Method::POST,
            "/api/publish",
            Some(API_KEY),
            content_type,
            body,
        )
    };
    let cases: Vec<(Answer, StatusCode, &str)> = vec![
        (
            post("{not json", json_type).await,
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            post("42", json_type).await,
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            post(r#"{"data": 1}"#, json_type).await,
            StatusCode::BAD_REQUEST,
            "missing_channel",
        ),
        (
            post(r#"{"channel": "a b", "data": 1}"#, json_type).await,
            StatusCode::BAD_REQUEST,
            "bad_channel",
        ),
        (
            post(r#"{"channel": "", "data": 1}"#, json_type).await,
            StatusCode::BAD_REQUEST,
            "bad_channel",
        ),
        (
            post(r#"{"channels": [], "data": 1}"#, json_type).await,
            StatusCode::BAD_REQUEST,
            "bad_channel",
        ),
        (
            post(r#"{"channels": ["a", "a"], "data": 1}"#, json_type).await,
            StatusCode::BAD_REQUEST,
            "bad_channel",
        ),
        (
            post(
                r#"{"channel": "a", "channels": ["b"], "data": 1}"#,
                json_type,
            )
            .await,
            StatusCode::BAD_REQUEST,
            "bad_channel",
        ),
        (
            post(r#"{"channel": "a"}"#, json_type).await,
            StatusCode::BAD_REQUEST,
            "missing_data",
        ),
        (
            post(r#"{"channel": "a", "data": 1, "event": ""}"#, json_type).await,
            StatusCode::BAD_REQUEST,
            "bad_event",
        ),
        (
            post(
                r#"{"channel": "a", "data": 1, "event": "pushgate.reset"}"#,
                json_type,
            )
            .await,
            StatusCode::BAD_REQUEST,
            "bad_event",
        ),
        (
            post(r#"{"channel": "a", "data": 1, "event": 5}"#, json_type).await,
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            post(
                r#"{"channel": "a", "data": 1, "idempotency_key": ""}"#,
                json_type,
            )
            .await,
            StatusCode::BAD_REQUEST,
            "bad_idempotency_key",
        ),
        (
            post(r#"{"channel": "a", "data": 1, "colour": "red"}"#, json_type).await,
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            post(r#"{"channel": "a", "data": 1}"#, None).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            post(r#"{"channel": "a", "data": 1}"#, Some("text/plain")).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            get(&gate, "/api/history").await,
            StatusCode::BAD_REQUEST,
            "missing_channel",
        ),
        (
            get(&gate, "/api/history?channel=a&since=nope").await,
            StatusCode::BAD_REQUEST,
            "bad_position",
        ),
        (
            get(&gate, "/api/history?channel=a&limit=0").await,
            StatusCode::BAD_REQUEST,
            "bad_limit",
        ),
        (
            get(&gate, "/api/history?channel=a&limit=many").await,
            StatusCode::BAD_REQUEST,
            "bad_limit",
        ),
        (
            get(&gate, "/api/history?channel=a&colour=red").await,
            StatusCode::BAD_REQUEST,
            "bad_query",
        ),
        (
            get(&gate, "/api/history?channel=a&channel=b").await,
            StatusCode::BAD_REQUEST,
            "bad_query",
        ),
        (
            get(&gate, "/api/history?channel=%FF").await,
            StatusCode::BAD_REQUEST,
            "bad_channel",
        ),
        (
            get(&gate, "/api/nothing").await,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            get(&gate, "/api/publish").await,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            call(
                &gate,
                Method::DELETE,
                "/api/history",
                Some(API_KEY),
                None,
                "",
            )
            .await,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            get(&gate, "/elsewhere").await,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (index, (answer, status, code)) in cases.iter().enumerate() {
        assert_eq!(answer.status, *status, "case {index}: {}", answer.text);
        assert_eq!(answer.code(), *code, "case {index}: {}", answer.text);
        let message = answer.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        assert!(!message.is_empty(), "case {index} explains itself");
    }
    let metrics = call(&gate, Method::GET, "/metrics", None, None, "").await;
    assert!(
        metrics
            .text
            .contains("pushgate_publishes_total{outcome=\"stored\"} 0"),
        "{}",
        metrics.text
    );
}

#[tokio::test]
async fn an_oversized_body_gets_413_whether_or_not_its_length_is_declared() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "api:\n  max_body: 1KiB\n").await;
    let big = json!({"channel": "c", "data": "x".repeat(2000)}).to_string();
    let declared = call(
        &gate,
        Method::POST,
        "/api/publish",
        Some(API_KEY),
        Some("application/json"),
        big.clone(),
    )
    .await;
    assert_eq!(declared.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(declared.code(), "body_too_large");

    // Chunked, with no Content-Length: the limit still holds while reading.
    let chunks = futures_util::stream::iter(
        big.into_bytes()
            .chunks(100)
            .map(|c| Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::copy_from_slice(c))))
            .collect::<Vec<_>>(),
    );
    let request = Request::post(format!("http://{}/api/publish", gate.api_addr))
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .body(BodyExt::boxed(http_body_util::StreamBody::new(chunks)))
        .unwrap();
    let response = common::client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let fits = publish(&gate, json!({"channel": "c", "data": "x".repeat(500)})).await;
    assert_eq!(fits.status, StatusCode::OK);
}

#[tokio::test]
async fn health_readiness_and_metrics_are_open() {
    let (_app, gate) = start().await;
    let health = call(&gate, Method::GET, "/healthz", None, None, "").await;
    assert_eq!(
        (health.status, health.json()),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let ready = call(&gate, Method::GET, "/readyz", None, None, "").await;
    assert_eq!(
        (ready.status, ready.json()),
        (StatusCode::OK, json!({"status": "ready"}))
    );

    publish(&gate, json!({"channels": ["m1", "m2"], "data": 1})).await;
    let metrics = call(&gate, Method::GET, "/metrics", None, None, "").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for line in [
        "pushgate_publishes_total{outcome=\"stored\"} 2",
        "pushgate_engine_channels 2",
        "pushgate_history_publications 2",
        "# TYPE pushgate_publishes_total counter",
    ] {
        assert!(
            metrics.text.contains(line),
            "missing {line}: {}",
            metrics.text
        );
    }
}

#[tokio::test]
async fn channels_lists_local_subscribers() {
    let app = Upstream::start().await;
    let yaml = format!(
        "listen: 127.0.0.1:0\nupstream:\n  url: {}\napi:\n  listen: 127.0.0.1:0\n  keys: [{API_KEY}]\n",
        app.url()
    );
    let mut settings =
        pushgate::config::from_yaml(&yaml, "test.yaml", Vec::<(String, String)>::new()).unwrap();
    common::switch_fast_paths(&mut settings.config);
    let server = pushgate::Server::bind(settings).await.unwrap();
    let hub = server.hub();
    let api = server.api_addr();
    tokio::spawn(server.run(std::future::pending()));

    let limits = pushgate::hub::QueueLimits {
        messages: 10,
        bytes: 1 << 20,
        take: usize::MAX,
    };
    let outboxes: Vec<_> = (0..3).map(|_| pushgate::hub::Outbox::new(limits)).collect();
    let room = pushgate::message::ChannelName::parse("room:1").unwrap();
    let lobby = pushgate::message::ChannelName::parse("lobby").unwrap();
    hub.subscribe(&room, &outboxes[0]);
    hub.subscribe(&room, &outboxes[1]);
    hub.subscribe(&lobby, &outboxes[2]);

    let fetch = |path: &'static str| async move {
        let request = Request::get(format!("http://{api}{path}"))
            .header("authorization", format!("Bearer {API_KEY}"))
            .body(common::empty_body())
            .unwrap();
        let response = common::client().request(request).await.unwrap();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice::<Value>(&bytes).unwrap()
    };
    assert_eq!(
        fetch("/api/channels").await,
        json!({"channels": [{"channel": "lobby", "subscribers": 1}, {"channel": "room:1", "subscribers": 2}], "total": 2})
    );
    assert_eq!(
        fetch("/api/channels?prefix=room").await,
        json!({"channels": [{"channel": "room:1", "subscribers": 2}], "total": 1})
    );
    assert_eq!(
        fetch("/api/channels?limit=1").await,
        json!({"channels": [{"channel": "lobby", "subscribers": 1}], "total": 2})
    );
}

#[tokio::test]
async fn insecure_no_auth_works_only_on_loopback() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "api:\n  keys: []\n  insecure_no_auth: true\n").await;
    let answer = call(
        &gate,
        Method::POST,
        "/api/publish",
        None,
        Some("application/json"),
        json!({"channel": "open", "data": 1}).to_string(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);

    let refused = pushgate::config::from_yaml(
        "api:\n  listen: 0.0.0.0:0\n  insecure_no_auth: true\n",
        "test.yaml",
        Vec::<(String, String)>::new(),
    )
    .unwrap_err();
    assert!(
        refused
            .problems
            .iter()
            .any(|p| p.key == "api.insecure_no_auth"),
        "{refused}"
    );
}

#[tokio::test]
async fn reusing_an_idempotency_key_for_a_different_publish_is_refused() {
    let (_app, gate) = start().await;
    let first = publish(
        &gate,
        json!({"channel": "k", "data": 1, "idempotency_key": "shared"}),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    for different in [
        json!({"channel": "k", "data": 2, "idempotency_key": "shared"}),
        json!({"channel": "other", "data": 1, "idempotency_key": "shared"}),
        json!({"channel": "k", "data": 1, "event": "e", "idempotency_key": "shared"}),
    ] {
        let answer = publish(&gate, different).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
        assert_eq!(answer.code(), "idempotency_key_reused");
    }
    let history = get(&gate, "/api/history?channel=k").await;
    assert_eq!(history.json()["offset"], 1, "nothing else was published");
    let other = get(&gate, "/api/history?channel=other").await;
    assert_eq!(other.json()["offset"], 0);
}

#[tokio::test]
async fn method_not_allowed_names_the_allowed_methods() {
    let (_app, gate) = start().await;
    let answer = get(&gate, "/api/publish").await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.headers["allow"], "POST");
    let answer = call(&gate, Method::POST, "/api/history", Some(API_KEY), None, "").await;
    assert_eq!(answer.headers["allow"], "GET, HEAD");
    let head = call(
        &gate,
        Method::HEAD,
        "/api/history?channel=c",
        Some(API_KEY),
        None,
        "",
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
}

#[tokio::test]
async fn a_stalled_publish_body_gets_408() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "limits:\n  body_timeout: 300ms\n").await;
    let mut stream = tokio::net::TcpStream::connect(gate.api_addr).await.unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"channel\":"
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
        .await
        .unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut received),
    )
    .await
    .expect("answered and closed")
    .ok();
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("\"body_timeout\""), "{text}");
}
