//! JWT mode: tokens from every place, every way a token can be wrong, and the
//! refresh command.

use crate::common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{Pushgate, TempDir, Upstream};
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";
const PATIENCE: Duration = Duration::from_secs(10);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn claims(sub: &str, exp: u64) -> Value {
    json!({"sub": sub, "exp": exp, "channels": ["chat:1", "user:ann:*"]})
}

async fn hs256_gate(extra: &str) -> (Upstream, Pushgate) {
    hs256_gate_with_leeway("0s", extra).await
}

async fn hs256_gate_with_leeway(leeway: &str, extra: &str) -> (Upstream, Pushgate) {
    let app = Upstream::start().await;
    let config = format!(
        "auth:\n  mode: jwt\n  jwt:\n    algorithm: HS256\n    secret: \"{SECRET}\"\n    cookie: jwt\n    leeway: {leeway}\n{extra}"
    );
    let gate = Pushgate::start(&app.url(), &config).await;
    (app, gate)
}

/// Long-polls with a token placed by `place`; the status and error code.
async fn poll(
    gate: &Pushgate,
    channel: &str,
    place: impl FnOnce(http::request::Builder, &str) -> http::request::Builder,
    token: &str,
) -> (StatusCode, String) {
    let url = format!(
        "http://{}/realtime/poll?channel={channel}&timeout=0",
        gate.addr
    );
    let request = place(Request::get(url), token)
        .body(common::empty_body())
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, common::client().request(request))
        .await
        .unwrap()
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let detail = body["error"]["message"].as_str().unwrap_or("").to_owned();
    (status, detail)
}

fn bearer(builder: http::request::Builder, token: &str) -> http::request::Builder {
    builder.header("authorization", format!("Bearer {token}"))
}

#[tokio::test]
async fn a_valid_token_is_accepted_from_header_cookie_or_query() {
    let (_app, gate) = hs256_gate("").await;
    let token = hs256(claims("ann", now() + 600));
    let (status, _) = poll(&gate, "chat:1", bearer, &token).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = poll(
        &gate,
        "user:ann:inbox",
        |b, t| b.header("cookie", format!("other=1; jwt={t}")),
        &token,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let url = format!(
        "http://{}/realtime/poll?channel=chat:1&timeout=0&token={token}",
        gate.addr
    );
    let (status, _) = common::get(&url).await;
    assert_eq!(status, StatusCode::OK);
    // An absurdly distant exp is capped, not an overflow.
    let (status, _) = poll(&gate, "chat:1", bearer, &hs256(claims("ann", u64::MAX / 2))).await;
    assert_eq!(status, StatusCode::OK);
    // The grant is the token's channels.
    let (status, detail) = poll(&gate, "chat:2", bearer, &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{detail}");
}

#[tokio::test]
async fn every_bad_token_is_refused_with_401_and_a_reason() {
    let (_app, gate) = hs256_gate("").await;
    let good = hs256(claims("ann", now() + 600));
    let (head, rest) = good.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;

    let expired = hs256(claims("ann", now() - 120));
    let other_secret = encode(
        &Header::new(Algorithm::HS256),
        &claims("ann", now() + 600),
        &EncodingKey::from_secret(b"another-secret-another-secret-another"),
    )
    .unwrap();
    let hs384 = encode(
        &Header::new(Algorithm::HS384),
        &claims("ann", now() + 600),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let none = format!(
        "{}.{payload}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#)
    );
    let mut flipped = signature.as_bytes().to_vec();
    flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
    let altered_signature = format!("{head}.{payload}.{}", String::from_utf8(flipped).unwrap());
    let altered_payload = format!(
        "{head}.{}.{signature}",
        b64.encode(claims("root", now() + 600).to_string())
    );
    let no_sub = hs256(json!({"exp": now() + 600}));
    let no_exp = hs256(json!({"sub": "ann"}));

    for (name, token, why) in [
        ("expired", expired.as_str(), "expired"),
        ("wrong secret", other_secret.as_str(), "signature"),
        ("wrong algorithm", hs384.as_str(), "algorithm"),
        ("alg none", none.as_str(), ""),
        ("altered signature", altered_signature.as_str(), "signature"),
        ("altered payload", altered_payload.as_str(), "signature"),
        ("no sub", no_sub.as_str(), "sub"),
        ("no exp", no_exp.as_str(), "exp"),
        ("garbage", "not.a.token", "malformed"),
    ] {
        let (status, detail) = poll(&gate, "chat:1", bearer, token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {detail}");
        assert!(detail.contains(why), "{name}: {detail}");
    }
    let (status, detail) = poll(&gate, "chat:1", |b, _| b, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(detail.contains("no token"), "{detail}");
}

#[tokio::test]
async fn es256_tokens_verify_and_key_type_confusion_is_refused() {
    let dir = TempDir::new("jwt-es256");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let public = dir.0.join("public.pem");
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let app = Upstream::start().await;
    let gate = Pushgate::start(
        &app.url(),
        &format!(
            "auth:\n  mode: jwt\n  jwt:\n    algorithm: ES256\n    public_key_file: {}\n",
            public.display()
        ),
    )
    .await;
    let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let token = encode(
        &Header::new(Algorithm::ES256),
        &claims("ann", now() + 600),
        &signing,
    )
    .unwrap();
    let (status, detail) = poll(&gate, "chat:1", bearer, &token).await;
    assert_eq!(status, StatusCode::OK, "{detail}");

    // The classic confusion: an HS256 token whose secret is the public key.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims("ann", now() + 600),
        &EncodingKey::from_secret(key.public_key_pem().as_bytes()),
    )
    .unwrap();
    let (status, detail) = poll(&gate, "chat:1", bearer, &confused).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(detail.contains("algorithm"), "{detail}");
}

#[tokio::test]
async fn bad_jwt_settings_are_config_errors() {
    for (yaml, key) in [
        ("auth:\n  mode: jwt\n", "auth.jwt.secret"),
        ("auth:\n  mode: jwt\n  jwt:\n    secret: short\n", "auth.jwt.secret"),
        (
            "auth:\n  mode: jwt\n  jwt:\n    algorithm: RS256\n",
            "auth.jwt.public_key_file",
        ),
        (
            "auth:\n  mode: jwt\n  jwt:\n    algorithm: ES256\n    public_key_file: /nonexistent.pem\n",
            "auth.jwt.public_key_file",
        ),
        ("auth:\n  mode: jwt\n  jwt:\n    algorithm: none\n", "auth.jwt.algorithm"),
    ] {
        let err = pushgate::config::from_yaml(
            &format!("api:\n  keys: [k]\n{yaml}"),
            "test.yaml",
            Vec::<(String, String)>::new(),
        )
        .unwrap_err();
        assert!(err.problems.iter().any(|p| p.key == key), "{yaml}: {err}");
    }
}

async fn websocket(gate: &Pushgate, token: &str) -> common_ws::Client {
    let request = format!(
        "ws://{}/realtime/ws?channel=chat:1&token={token}",
        gate.addr
    )
    .into_client_request()
    .unwrap();
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

mod common_ws {
    pub type Client = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;
}

/// The next reply or push, or the close code.
async fn next(client: &mut common_ws::Client) -> Result<Value, Option<u16>> {
    loop {
        match tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(text))) => {
                return Ok(serde_json::from_str(text.as_str()).unwrap())
            }
            Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(None),
        }
    }
}

#[tokio::test]
async fn a_token_that_runs_out_closes_with_4001_unless_refreshed() {
    let (_app, gate) = hs256_gate("").await;
    let mut lapsing = websocket(&gate, &hs256(claims("ann", now() + 2))).await;
    let mut renewed = websocket(&gate, &hs256(claims("ann", now() + 2))).await;

    // A new token for another user is refused; the connection stays.
    let wrong = json!({"id": 1, "op": "refresh", "token": hs256(claims("bob", now() + 600))});
    renewed
        .send(Message::text(wrong.to_string()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut renewed).await.unwrap()["error"]["code"],
        "forbidden"
    );
    // A new token that no longer grants chat:1: unsubscribed.
    let narrower = hs256(json!({"sub": "ann", "exp": now() + 600, "channels": ["user:ann:*"]}));
    let refresh = json!({"id": 2, "op": "refresh", "token": narrower});
    renewed
        .send(Message::text(refresh.to_string()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut renewed).await.unwrap(),
        json!({"id": 2, "result": {}})
    );
    assert_eq!(
        next(&mut renewed).await.unwrap(),
        json!({"op": "unsubscribed", "channel": "chat:1"})
    );

    assert_eq!(next(&mut lapsing).await, Err(Some(4001)));
    // Past the first token's exp, the refreshed connection still answers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    renewed
        .send(Message::text(json!({"id": 3, "op": "ping"}).to_string()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut renewed).await.unwrap(),
        json!({"id": 3, "result": {}})
    );
}

/// A token with exactly this header and payload JSON, signed with the
/// HS256 secret: for headers and claims the library's encoder cannot write.
fn hs256_raw(header: &str, payload: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let message = format!("{}.{}", b64.encode(header), b64.encode(payload));
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{message}.{signature}")
}

/// Asserts a token is refused with 401 and a reason naming `claim` in
/// parentheses, and never called malformed.
async fn refused_naming(gate: &Pushgate, name: &str, token: &str, claim: &str) {
    let (status, detail) = poll(gate, "chat:1", bearer, token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {detail}");
    assert!(detail.contains(&format!("({claim}")), "{name}: {detail}");
    assert!(!detail.contains("malformed"), "{name}: {detail}");
}

async fn accepted(gate: &Pushgate, name: &str, token: &str) {
    let (status, detail) = poll(gate, "chat:1", bearer, token).await;
    assert_eq!(status, StatusCode::OK, "{name}: {detail}");
}

#[tokio::test]
async fn nbf_is_honoured_with_the_leeway() {
    let (_app, gate) = hs256_gate_with_leeway("30s", "").await;
    let with_nbf = |nbf: Value| {
        hs256(json!({"sub": "ann", "exp": now() + 600, "nbf": nbf, "channels": ["chat:1"]}))
    };
    accepted(&gate, "nbf passed", &with_nbf(json!(now() - 5))).await;
    accepted(&gate, "nbf now", &with_nbf(json!(now()))).await;
    accepted(&gate, "nbf within the leeway", &with_nbf(json!(now() + 20))).await;
    accepted(
        &gate,
        "a fractional nbf",
        &with_nbf(json!(now() as f64 - 0.5)),
    )
    .await;
    refused_naming(
        &gate,
        "nbf past the leeway",
        &with_nbf(json!(now() + 120)),
        "nbf",
    )
    .await;
    refused_naming(
        &gate,
        "nbf far ahead",
        &with_nbf(json!(u64::MAX / 2)),
        "nbf",
    )
    .await;
    // The library skips an nbf that is not a number; pushgate does not.
    refused_naming(&gate, "nbf as text", &with_nbf(json!("2099-01-01")), "nbf").await;
    refused_naming(&gate, "nbf negative", &with_nbf(json!(-1)), "nbf").await;
    // exp with the same leeway: just past is still accepted, long past not.
    accepted(
        &gate,
        "exp within the leeway",
        &hs256(claims("ann", now() - 10)),
    )
    .await;
    refused_naming(
        &gate,
        "exp past the leeway",
        &hs256(claims("ann", now() - 120)),
        "exp",
    )
    .await;
}

#[tokio::test]
async fn a_token_with_a_crit_header_is_refused() {
    let (_app, gate) = hs256_gate("").await;
    let payload = claims("ann", now() + 600).to_string();
    accepted(
        &gate,
        "plain header",
        &hs256_raw(r#"{"alg":"HS256","typ":"JWT"}"#, &payload),
    )
    .await;
    for header in [
        r#"{"alg":"HS256","crit":["exp"],"exp":1}"#,
        r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
        r#"{"alg":"HS256","crit":[]}"#,
        r#"{"crit":["x"],"alg":"HS256","x":1}"#,
    ] {
        refused_naming(&gate, header, &hs256_raw(header, &payload), "crit").await;
    }
    // Through the WebSocket refresh command too.
    let mut client = websocket(&gate, &hs256(claims("ann", now() + 600))).await;
    let crit = hs256_raw(r#"{"alg":"HS256","crit":["x"],"x":1}"#, &payload);
    let refresh = json!({"id": 1, "op": "refresh", "token": crit});
    client
        .send(Message::text(refresh.to_string()))
        .await
        .unwrap();
    let reply = next(&mut client).await.unwrap();
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("(crit)"),
        "{reply}"
    );
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_configured() {
    let (_app, gate) = hs256_gate("    audience: pushgate\n    issuer: https://id.example\n").await;
    let token = |extra: Value| {
        let mut claims = claims("ann", now() + 600);
        for (key, value) in extra.as_object().unwrap() {
            claims[key] = value.clone();
        }
        hs256(claims)
    };
    let iss = "https://id.example";
    accepted(
        &gate,
        "both match",
        &token(json!({"aud": "pushgate", "iss": iss})),
    )
    .await;
    accepted(
        &gate,
        "one audience of several",
        &token(json!({"aud": ["billing", "pushgate"], "iss": iss})),
    )
    .await;
    for (name, extra, claim) in [
        (
            "another audience",
            json!({"aud": "billing", "iss": iss}),
            "aud",
        ),
        (
            "other audiences",
            json!({"aud": ["a", "b"], "iss": iss}),
            "aud",
        ),
        ("no audience", json!({"iss": iss}), "aud"),
        (
            "another issuer",
            json!({"aud": "pushgate", "iss": "https://evil.example"}),
            "iss",
        ),
        ("no issuer", json!({"aud": "pushgate"}), "iss"),
    ] {
        refused_naming(&gate, name, &token(extra), claim).await;
    }

    // Without them configured, an issuer is not checked, and a token meant
    // for a named audience is not taken as meant for pushgate.
    let (_app, open) = hs256_gate("").await;
    accepted(
        &open,
        "any issuer",
        &token(json!({"iss": "https://any.example"})),
    )
    .await;
    refused_naming(
        &open,
        "an audience",
        &token(json!({"aud": "pushgate"})),
        "aud",
    )
    .await;
}

/// Well-formed tokens whose claims have the wrong shape are refused with
/// the claim's name; only a token that is not JWT at all is "malformed".
#[tokio::test]
async fn claims_of_the_wrong_type_are_named_not_malformed() {
    let (_app, gate) = hs256_gate("").await;
    let exp = now() + 600;
    accepted(
        &gate,
        "a fractional exp",
        &hs256(json!({"sub": "ann", "exp": exp as f64 + 0.25, "channels": ["chat:1"]})),
    )
    .await;
    for (name, claims, claim) in [
        ("sub a number", json!({"sub": 42, "exp": exp}), "sub"),
        ("sub empty", json!({"sub": "", "exp": exp}), "sub"),
        (
            "sub too long",
            json!({"sub": "x".repeat(257), "exp": exp}),
            "sub",
        ),
        (
            "exp as text",
            json!({"sub": "ann", "exp": "tomorrow"}),
            "exp",
        ),
        (
            "channels a string",
            json!({"sub": "ann", "exp": exp, "channels": "chat:1"}),
            "channels",
        ),
        (
            "channels of numbers",
            json!({"sub": "ann", "exp": exp, "channels": [1]}),
            "channels",
        ),
    ] {
        refused_naming(&gate, name, &hs256(claims), claim).await;
    }
    for (name, token) in [
        ("two parts", "abc.def".to_owned()),
        (
            "a header that is not JSON",
            format!("bm90IGpzb24.{}", "e30.sig"),
        ),
        (
            "a payload that is not an object",
            hs256_raw(r#"{"alg":"HS256"}"#, "[1,2]"),
        ),
    ] {
        let (status, detail) = poll(&gate, "chat:1", bearer, &token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {detail}");
        assert!(detail.contains("malformed"), "{name}: {detail}");
    }
}
