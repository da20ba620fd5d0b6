//! What a WebSocket client asks for beyond listening: `rpc` calls to the
//! app, and publishes. Each runs as a future its connection keeps beside
//! the serve loop, at most `rpc.max_in_flight` at once, so a slow app never
//! holds up the connection's deliveries or its other commands.
//!
//! The invariant that keeps a client's publication honest: what names its
//! publisher is the connection's grant, set here and nowhere else; nothing
//! the client sends (nor anything the app answers about its data) can
//! change it.

use std::borrow::Cow;
use std::sync::Arc;

use http::StatusCode;
use serde_json::value::RawValue;
use serde_json::Value;

use super::Realtime;
use crate::app::call::Answer;
use crate::app::CallError;
use crate::auth::{printable, Credentials};
use crate::broker::Publish;
use crate::error::Refusal;
use crate::message::{ChannelName, EventName, Publication};

/// Who is calling: what the app is told about a connection.
pub(super) struct Caller {
    pub(super) user: Option<String>,
    pub(super) connection: String,
    pub(super) credentials: Credentials,
}

/// Why a call failed, as the client is told: pushgate's code, or the
/// app's own when the app refused.
#[derive(Debug, PartialEq)]
pub(super) struct Failure {
    pub(super) code: Cow<'static, str>,
    pub(super) message: String,
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Failure {
        Failure {
            code: Cow::Borrowed(refusal.code),
            message: refusal.message,
        }
    }
}

impl Failure {
    fn new(code: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            code: Cow::Borrowed(code),
            message: message.into(),
        }
    }
}

/// A publish a client asked for, checked against its grant and its
/// channel's rule before it was started.
pub(super) struct ClientPublish {
    pub(super) channel: ChannelName,
    pub(super) event: Option<EventName>,
    /// JSON text.
    pub(super) data: String,
    /// The app decides first (`publish: via_app`).
    pub(super) via_app: bool,
    /// Sent to whoever listens now, never stored (`ephemeral: true`).
    pub(super) ephemeral: bool,
}

/// `rpc`: the app's JSON answer, as JSON text, or why there is none.
pub(super) async fn rpc(
    realtime: Arc<Realtime>,
    caller: Arc<Caller>,
    method: String,
    data: String,
) -> Result<String, Failure> {
    let Some(path) = &realtime.rpc.call else {
        return Err(Failure::new(
            "rpc_disabled",
            "this server takes no rpc calls (rpc.path is not set)",
        ));
    };
    let body = call_body(&caller, &[("method", Value::String(method))], &data);
    let answer = realtime.call_app(path.as_str(), &caller, &body).await?;
    if answer.status.is_success() {
        return json_of(&answer.body).map(str::to_owned);
    }
    Err(refusal_of(&answer, "app_refused"))
}

/// A client's publish: the app's say first when its channel asks for it,
/// then stored and fanned out with the caller's user. Answers
/// `{"epoch", "offset"}` as JSON text.
pub(super) async fn publish(
    realtime: Arc<Realtime>,
    caller: Arc<Caller>,
    publish: ClientPublish,
) -> Result<String, Failure> {
    let mut data = publish.data;
    if publish.via_app {
        let path = realtime
            .rpc
            .publish
            .as_ref()
            .expect("config checks: via_app needs rpc.publish_path");
        let mut fields = vec![("channel", Value::String(publish.channel.to_string()))];
        if let Some(event) = &publish.event {
            fields.push(("event", Value::String(event.as_str().to_owned())));
        }
        let body = call_body(&caller, &fields, &data);
        let answer = realtime.call_app(path.as_str(), &caller, &body).await?;
        if !answer.status.is_success() {
            return Err(refusal_of(&answer, "publish_refused"));
        }
        if let Some(rewritten) = rewritten_data(&answer)? {
            data = rewritten;
        }
    }
    if data.len() > realtime.max_publication {
        return Err(Failure::new(
            "too_large",
            format!(
                "the data is over api.max_body ({} bytes)",
                realtime.max_publication
            ),
        ));
    }
    if publish.ephemeral {
        let publication = Publication::ephemeral(
            publish.channel,
            publish.event,
            caller.user.as_deref(),
            &data,
        );
        realtime
            .channels
            .broker
            .send_ephemeral(Arc::new(publication))
            .await
            .map_err(|err| Failure::from(Refusal::from(err)))?;
        return Ok("{}".to_owned());
    }
    let data = RawValue::from_string(data).expect("checked JSON");
    let outcome = realtime
        .channels
        .broker
        .publish(Publish {
            channels: vec![publish.channel],
            data,
            event: publish.event,
            idempotency_key: None,
            publisher: caller.user.clone(),
        })
        .await
        .map_err(|err| {
            tracing::warn!(error = %err, "a client's publish failed");
            Failure::from(Refusal::from(err))
        })?;
    let position = outcome.results[0].position();
    Ok(serde_json::json!({"epoch": position.epoch, "offset": position.offset}).to_string())
}

/// The JSON body of a call: who calls, the command's own fields, then
/// `data` as the client sent it.
fn call_body(caller: &Caller, fields: &[(&str, Value)], data: &str) -> Vec<u8> {
    let mut body = serde_json::Map::new();
    body.insert(
        "user".into(),
        caller.user.clone().map_or(Value::Null, Value::String),
    );
    body.insert(
        "connection".into(),
        Value::String(caller.connection.clone()),
    );
    for (name, value) in fields {
        body.insert((*name).into(), value.clone());
    }
    let mut body = serde_json::to_vec(&body).expect("a JSON object serializes");
    // `data` goes in as written: the client's JSON, never re-encoded.
    body.pop();
    body.extend_from_slice(b",\"data\":");
    body.extend_from_slice(data.as_bytes());
    body.push(b'}');
    body
}

/// A 2xx answer's body as JSON text (`null` when empty).
fn json_of(body: &[u8]) -> Result<&str, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok("null");
    }
    serde_json::from_slice::<&RawValue>(body)
        .map(RawValue::get)
        .map_err(|_| Failure::new("app_error", "the app's answer is not JSON"))
}

/// What a `via_app` answer says of the data: `{"data": …}` replaces it; an
/// empty answer or an object without `data` keeps it.
fn rewritten_data(answer: &Answer) -> Result<Option<String>, Failure> {
    let text = json_of(&answer.body)?;
    if text == "null" {
        return Ok(None);
    }
    // An object only: a struct would also be read from an array.
    let decision: std::collections::HashMap<String, &RawValue> = serde_json::from_str(text)
        .map_err(|_| {
            Failure::new(
                "app_error",
                "the app's answer to a publish is not an object such as {\"data\": …}",
            )
        })?;
    Ok(decision
        .get("data")
        .map(|data| data.get())
        .filter(|data| *data != "null")
        .map(str::to_owned))
}

/// The app refused: its own `{"error": {"code", "message"}}` (or
/// `{"code", "message"}`) from a 4xx, else `fallback`; anything but a 4xx
/// is the app failing.
fn refusal_of(answer: &Answer, fallback: &'static str) -> Failure {
    let status = answer.status;
    if !status.is_client_error() {
        return Failure::new(
            "app_error",
            format!("the app answered HTTP {}", status.as_u16()),
        );
    }
    let value = serde_json::from_slice::<Value>(&answer.body).unwrap_or(Value::Null);
    let error = value
        .get("error")
        .filter(|e| e.is_object())
        .unwrap_or(&value);
    let code = error
        .get("code")
        .and_then(Value::as_str)
        .filter(|code| is_code(code))
        .map_or(Cow::Borrowed(fallback), |code| Cow::Owned(code.to_owned()));
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .map(|message| printable(message, ""))
        .filter(|message| !message.is_empty())
        .unwrap_or_else(|| format!("the app refused (HTTP {})", StatusCode::as_u16(&status)));
    Failure { code, message }
}

/// An error code a client can match on: 1-64 of [a-z0-9_].
fn is_code(code: &str) -> bool {
    (1..=64).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Realtime {
    /// POSTs `body` to the app's `path` on `caller`'s behalf.
    async fn call_app(&self, path: &str, caller: &Caller, body: &[u8]) -> Result<Answer, Failure> {
        let max = usize::try_from(self.rpc_config.max_answer.bytes()).unwrap_or(usize::MAX);
        self.calls
            .post(
                path,
                caller.credentials.headers(),
                body,
                self.rpc_config.timeout,
                max,
            )
            .await
            .map_err(|err| {
                tracing::warn!(path, error = %err, "a client's call to the app failed");
                match err {
                    CallError::NoAnswer | CallError::BodyLate => {
                        Failure::new("app_timeout", "the app did not answer within rpc.timeout")
                    }
                    CallError::Unreadable => {
                        Failure::new("app_error", "the app's answer was too large or unreadable")
                    }
                    CallError::NoFiles | CallError::Failed(_) => {
                        Failure::new("app_unavailable", "the app could not be reached")
                    }
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    #[test]
    fn the_app_refuses_in_its_own_words_within_bounds() {
        let cases = [
            (
                403,
                r#"{"error":{"code":"banned","message":"no"}}"#,
                "banned",
                "no",
            ),
            (
                409,
                r#"{"code":"taken","message":"name taken"}"#,
                "taken",
                "name taken",
            ),
            (
                400,
                r#"{"code":"Not A Code","message":"m"}"#,
                "app_refused",
                "m",
            ),
            (422, "not json", "app_refused", "the app refused (HTTP 422)"),
            (
                500,
                r#"{"code":"x","message":"y"}"#,
                "app_error",
                "the app answered HTTP 500",
            ),
            (302, "", "app_error", "the app answered HTTP 302"),
        ];
        for (status, body, code, message) in cases {
            let failure = refusal_of(&answer(status, body), "app_refused");
            assert_eq!(
                (failure.code.as_ref(), failure.message.as_str()),
                (code, message)
            );
        }
        let long = format!(r#"{{"code":"c","message":"{}\u0007"}}"#, "é".repeat(300));
        let failure = refusal_of(&answer(400, &long), "app_refused");
        assert!(failure.message.len() <= crate::auth::MAX_REASON_BYTES);
        assert!(!failure.message.contains('\u{7}'));
    }

    #[test]
    fn the_app_may_keep_or_rewrite_a_publish() {
        assert_eq!(rewritten_data(&answer(200, "")).unwrap(), None);
        assert_eq!(rewritten_data(&answer(204, " ")).unwrap(), None);
        assert_eq!(rewritten_data(&answer(200, "{}")).unwrap(), None);
        assert_eq!(
            rewritten_data(&answer(200, r#"{"data": {"text": "***"}}"#)).unwrap(),
            Some(r#"{"text": "***"}"#.to_owned())
        );
        assert_eq!(
            rewritten_data(&answer(200, r#"{"data": null}"#)).unwrap(),
            None,
            "null data is no rewrite"
        );
        // Keys as JSON allows them to be written, escapes included.
        assert_eq!(
            rewritten_data(&answer(200, r#"{"d\u0061ta": 1, "n\u00e9": 2}"#)).unwrap(),
            Some("1".to_owned())
        );
        for bad in ["[1]", "not json", "\"text\""] {
            assert_eq!(
                rewritten_data(&answer(200, bad)).unwrap_err().code,
                "app_error",
                "{bad}"
            );
        }
    }

    #[test]
    fn a_call_body_carries_the_callers_identity_and_the_data_as_sent() {
        let caller = Caller {
            user: Some("42".into()),
            connection: "n1-7".into(),
            credentials: Credentials::default(),
        };
        let body = call_body(
            &caller,
            &[("method", Value::String("like".into()))],
            r#"{"user":"forged","n":1.50}"#,
        );
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["user"], "42");
        assert_eq!(value["connection"], "n1-7");
        assert_eq!(value["method"], "like");
        assert_eq!(
            value["data"]["user"], "forged",
            "data is the client's, as is"
        );
        assert!(String::from_utf8(body)
            .unwrap()
            .ends_with(r#""data":{"user":"forged","n":1.50}}"#));
    }
}
