//! The publish/admin API on `api.listen`: publish, history, channels,
//! disconnect and unsubscribe (sessions by user), health, readiness and
//! metrics. Every endpoint is described in
//! docs/api.md and docs/openapi.yaml.
//!
//! `/api/*` needs `Authorization: Bearer <key>` with one of `api.keys`,
//! compared in constant time. `/healthz`, `/readyz` and `/metrics` are open,
//! for probes and scrapers; they reveal counts, never names or data.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::body::{Body, BoxError};
use crate::broker::{BrokerError, Publish, PublishOutcome};
use crate::channels::Channels;
use crate::config::Config;
use crate::cursor::Position;
use crate::error::{json, json_bytes, Kind, Refusal};
use crate::keyed::KeyedDigest;
use crate::message::{ChannelName, EventName};
use crate::metrics::{self, Metrics};
use crate::pusher::api::PusherApi;
use crate::pusher::PusherApps;
use crate::rate::{KeyedRate, Limit};
use crate::transport::Realtime;

mod service;
pub use service::{service, ApiService};

/// Most channels one publish may name.
pub const MAX_CHANNELS_PER_PUBLISH: usize = 1_000;
/// Most items in one batch.
pub const MAX_BATCH_ITEMS: usize = 1_000;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
/// `GET /api/history` without `limit`.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;
/// Largest `limit` for `GET /api/history`.
pub const MAX_HISTORY_LIMIT: usize = 10_000;
/// `GET /api/channels` without `limit`, and its largest.
pub const DEFAULT_CHANNELS_LIMIT: usize = 1_000;
pub const MAX_CHANNELS_LIMIT: usize = 100_000;

/// The API's state.
pub struct Api {
    channels: Arc<Channels>,
    realtime: Arc<Realtime>,
    metrics: Arc<Metrics>,
    /// `api.insecure_no_auth`: without keys, `/api/...` is open. Without
    /// keys and without it (a node serving Pusher's API only), every
    /// `/api/...` request is refused.
    insecure_no_auth: bool,
    /// The digests of `api.keys`; the keys themselves are not kept.
    /// Replaced whole by a reload.
    keys: ArcSwap<Vec<[u8; 32]>>,
    key_digest: KeyedDigest,
    max_body: u64,
    body_timeout: Duration,
    /// Requests served at once (`api.max_connections`).
    max_in_flight: usize,
    /// `api.publishes_per_second`, by the key's digest.
    publish_rate: ArcSwap<KeyedRate<[u8; 32]>>,
    /// Pusher's HTTP API at `/apps/…`, when `pusher.apps` has any.
    pusher: Option<PusherApi>,
}

impl Api {
    pub fn new(
        config: &Config,
        channels: Arc<Channels>,
        realtime: Arc<Realtime>,
        metrics: Arc<Metrics>,
        pusher: Option<Arc<PusherApps>>,
    ) -> Api {
        let channels_for_pusher = channels.clone();
        let key_digest = KeyedDigest::random();
        let keys = digests(&key_digest, &config.api.keys);
        Api {
            channels,
            realtime,
            metrics,
            insecure_no_auth: config.api.insecure_no_auth,
            keys: ArcSwap::from_pointee(keys),
            key_digest,
            max_body: config.api.max_body.bytes(),
            body_timeout: config.limits.body_timeout,
            max_in_flight: config.api.max_connections,
            publish_rate: ArcSwap::from_pointee(KeyedRate::new(
                config.api.publishes_per_second,
                config.api.publish_burst,
            )),
            pusher: pusher.map(|apps| PusherApi::new(apps, channels_for_pusher)),
        }
    }

    /// Takes the API keys and `api.publishes_per_second` of a reload. The
    /// old keys stop working at once; a request already past its check
    /// completes.
    pub fn reload(&self, config: &Config) {
        self.channels.hub.set_backpressure(&config.api.backpressure);
        self.keys
            .store(Arc::new(digests(&self.key_digest, &config.api.keys)));
        self.publish_rate.store(Arc::new(KeyedRate::new(
            config.api.publishes_per_second,
            config.api.publish_burst,
        )));
    }

    /// Answers one API request. Never fails: errors become JSON answers.
    /// The listener serves it behind [`service`]'s layers.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        match self.route(request).await {
            Ok(response) => response,
            Err(err) => err.into_response(),
        }
    }

    async fn route<B>(&self, request: Request<B>) -> Result<Response<Body>, Refusal>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let path = request.uri().path();
        match path {
            "/healthz" => return only_get(&request).map(|()| health()),
            "/readyz" => {
                only_get(&request)?;
                return Ok(self.ready().await);
            }
            "/metrics" => {
                only_get(&request)?;
                return Ok(self.metrics());
            }
            _ => {}
        }
        if let (Some(pusher), true) = (&self.pusher, path.starts_with("/apps/")) {
            return self.pusher(pusher, request).await;
        }
        if !path.starts_with("/api/") {
            return Err(Refusal::not_found());
        }
        // Before anything else, so an unauthenticated caller learns nothing,
        // not even which endpoints exist.
        let key = self.authorize(request.headers())?;
        match (path, request.method()) {
            ("/api/publish", &Method::POST) => {
                if let Err(wait) = self.publish_rate.load().take(&key) {
                    self.metrics.refused.count(Limit::ApiPublishes);
                    let mut refusal = Refusal::new(
                        Kind::OverLimit,
                        "rate_limited",
                        "too many publish requests for this key (api.publishes_per_second); retry later",
                    );
                    refusal.retry_after = Some(wait);
                    return Err(refusal);
                }
                self.publish(request).await
            }
            ("/api/publish", _) => Err(Refusal::method_not_allowed("POST")),
            ("/api/disconnect", &Method::POST) => self.disconnect(request).await,
            ("/api/unsubscribe", &Method::POST) => self.unsubscribe(request).await,
            ("/api/disconnect" | "/api/unsubscribe", _) => Err(Refusal::method_not_allowed("POST")),
            ("/api/history", &Method::GET) => self.history(request.uri().query()).await,
            ("/api/channels", &Method::GET) => self.channels(request.uri().query()),
            ("/api/presence", &Method::GET) => self.presence(request.uri().query()).await,
            // HEAD is answered like GET; hyper leaves the body out.
            ("/api/history", &Method::HEAD) => self.history(request.uri().query()).await,
            ("/api/channels", &Method::HEAD) => self.channels(request.uri().query()),
            ("/api/presence", &Method::HEAD) => self.presence(request.uri().query()).await,
            ("/api/history" | "/api/channels" | "/api/presence", _) => {
                Err(Refusal::method_not_allowed("GET, HEAD"))
            }
            _ => Err(Refusal::not_found()),
        }
    }

    /// Checks the request's key; answers its digest (the API's one
    /// identity, all zeros without keys), which rate limits are kept by.
    fn authorize(&self, headers: &HeaderMap) -> Result<[u8; 32], Refusal> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        let keys = self.keys.load();
        if keys.is_empty() && self.insecure_no_auth {
            // Only on a loopback listener (checked with the config).
            return Ok([0; 32]);
        }
        let Some(presented) = presented else {
            return Err(Refusal::unauthorized());
        };
        // Keys are compared as 256-bit keyed digests: all of one length, so
        // the timing tells nothing of the keys' lengths, and every key is
        // checked in constant time, so it tells neither which key matched
        // nor how much of one did.
        let digest = self.key_digest.of(presented.as_bytes());
        let matched = keys.iter().fold(subtle::Choice::from(0), |found, key| {
            found | key.ct_eq(&digest)
        });
        if bool::from(matched) {
            Ok(digest)
        } else {
            Err(Refusal::unauthorized())
        }
    }

    async fn ready(&self) -> Response<Body> {
        match self.channels.broker.ready().await {
            Ok(()) => json(StatusCode::OK, &serde_json::json!({ "status": "ready" })),
            Err(err) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "status": "unavailable", "reason": err.to_string() }),
            ),
        }
    }

    fn metrics(&self) -> Response<Body> {
        let text = self.metrics.render(
            self.channels.broker.stats(),
            &self.channels.hub,
            self.realtime.auth_stats(),
            self.realtime.events().stats(),
            self.realtime
                .pusher()
                .and_then(|pusher| pusher.webhook_stats()),
        );
        let mut response = Response::new(crate::body::full(text));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(metrics::CONTENT_TYPE),
        );
        response
    }

    /// `POST /api/disconnect {"user", "code"?, "reason"?}`: closes the user's
    /// realtime connections (default code 4000) and forgets their cached
    /// grants, so the next connection asks the app again.
    async fn disconnect<B>(&self, request: Request<B>) -> Result<Response<Body>, Refusal>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Disconnect {
            user: String,
            #[serde(default)]
            code: Option<i64>,
            #[serde(default)]
            reason: Option<String>,
        }
        let body = self.json_body(request).await?;
        let order: Disconnect = serde_json::from_slice(&body).map_err(|err| {
            Refusal::bad_request("bad_json", format!("invalid disconnect: {err}"))
        })?;
        let user = valid_user(&order.user)?;
        let code = match order.code {
            None => DEFAULT_DISCONNECT_CODE,
            Some(code @ 4000..=4999) => code as u16,
            Some(_) => {
                return Err(Refusal::bad_request(
                    "bad_code",
                    "`code` must be a WebSocket application code, 4000 to 4999",
                ))
            }
        };
        let reason = order
            .reason
            .unwrap_or_else(|| "disconnected by the app".to_owned());
        if reason.len() > MAX_CLOSE_REASON_BYTES {
            return Err(Refusal::bad_request(
                "bad_reason",
                format!(
                    "`reason` is at most {MAX_CLOSE_REASON_BYTES} bytes (a close frame's limit)"
                ),
            ));
        }
        let count = self.realtime.disconnect_user(user, code, &reason).await?;
        tracing::info!(
            user,
            code,
            connections = count,
            "disconnected through the API"
        );
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "disconnected": count }),
        ))
    }

    /// `POST /api/unsubscribe {"user", "channel"}`: removes the channel from
    /// the user's live sessions; each client is told.
    async fn unsubscribe<B>(&self, request: Request<B>) -> Result<Response<Body>, Refusal>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Unsubscribe {
            user: String,
            channel: String,
        }
        let body = self.json_body(request).await?;
        let order: Unsubscribe = serde_json::from_slice(&body).map_err(|err| {
            Refusal::bad_request("bad_json", format!("invalid unsubscribe: {err}"))
        })?;
        let user = valid_user(&order.user)?;
        let channel = channel_name(&order.channel)?;
        let count = self.realtime.unsubscribe_user(user, &channel).await?;
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "unsubscribed": count }),
        ))
    }

    async fn publish<B>(&self, request: Request<B>) -> Result<Response<Body>, Refusal>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let result = self.publish_request(request).await;
        if let Err(err) = &result {
            if err.kind.is_client_error() {
                self.metrics.publish(metrics::PublishOutcome::Rejected, 1);
            }
        }
        result
    }

    async fn publish_request<B>(&self, request: Request<B>) -> Result<Response<Body>, Refusal>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let body = self.json_body(request).await?;
        // Before anything is stored: a batch waits once, and is refused
        // whole.
        if !self.channels.hub.caught_up().await {
            self.metrics.publish(metrics::PublishOutcome::Overloaded, 1);
            return Err(Refusal::overloaded());
        }
        let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
        if first == Some(b'[') {
            return self.publish_batch(&body).await;
        }
        let item: &RawValue = serde_json::from_slice(&body)
            .map_err(|err| Refusal::bad_request("bad_json", format!("invalid JSON: {err}")))?;
        let outcome = self.publish_one(parse_publish(item)?).await?;
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "results": outcome.results }),
        ))
    }

    /// A JSON array of publish objects, answered with an array of the same
    /// length: `{"results": [...]}` or `{"error": {...}}` per item, in order.
    async fn publish_batch(&self, body: &[u8]) -> Result<Response<Body>, Refusal> {
        let items: Vec<&RawValue> = serde_json::from_slice(body)
            .map_err(|err| Refusal::bad_request("bad_json", format!("invalid JSON: {err}")))?;
        if items.len() > MAX_BATCH_ITEMS {
            return Err(Refusal::bad_request(
                "batch_too_large",
                format!("a batch holds at most {MAX_BATCH_ITEMS} items"),
            ));
        }
        let mut answers = Vec::with_capacity(items.len());
        for item in items {
            let answer = match parse_publish(item) {
                Ok(publish) => match self.publish_one(publish).await {
                    Ok(outcome) => serde_json::json!({ "results": outcome.results }),
                    Err(err) => {
                        if err.kind.is_client_error() {
                            self.metrics.publish(metrics::PublishOutcome::Rejected, 1);
                        }
                        serde_json::json!({ "error": err.body() })
                    }
                },
                Err(err) => {
                    self.metrics.publish(metrics::PublishOutcome::Rejected, 1);
                    serde_json::json!({ "error": err.body() })
                }
            };
            answers.push(answer);
        }
        Ok(json(StatusCode::OK, &answers))
    }

    async fn publish_one(&self, publish: Publish) -> Result<PublishOutcome, Refusal> {
        let channels = publish.channels.len();
        match self.channels.broker.publish(publish).await {
            Ok(outcome) => {
                let kind = if outcome.duplicate {
                    metrics::PublishOutcome::Duplicate
                } else {
                    metrics::PublishOutcome::Stored
                };
                self.metrics.publish(kind, outcome.results.len());
                Ok(outcome)
            }
            Err(BrokerError::KeyReused) => Err(BrokerError::KeyReused.into()),
            Err(err) => {
                tracing::warn!(error = %err, "publish failed");
                self.metrics
                    .publish(metrics::PublishOutcome::Failed, channels);
                Err(err.into())
            }
        }
    }

    /// Answers Pusher's HTTP API (`pusher::api`), which is signed with the
    /// app's secret rather than `api.keys`.
    async fn pusher<B>(
        &self,
        pusher: &PusherApi,
        request: Request<B>,
    ) -> Result<Response<Body>, Refusal>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = request.into_parts();
        let body = self.body(body).await?;
        let answer = pusher
            .handle(&parts.method, parts.uri.path(), parts.uri.query(), &body)
            .await;
        match answer {
            crate::pusher::api::Answer::Done(response) => Ok(response),
            crate::pusher::api::Answer::Terminate { user } => {
                let code = crate::transport::PUSHER_TERMINATED;
                self.realtime
                    .disconnect_user(&user, code, "terminated by the app")
                    .await?;
                Ok(json(StatusCode::OK, &serde_json::json!({})))
            }
        }
    }

    /// Reads a JSON request body of at most `api.max_body` bytes.
    async fn json_body<B>(&self, request: Request<B>) -> Result<Bytes, Refusal>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(Refusal::not_json());
        }
        self.body(request.into_body()).await
    }

    /// Reads a request body of at most `api.max_body` bytes.
    async fn body<B>(&self, body: B) -> Result<Bytes, Refusal>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        // The listener's layers bound the body: its size (api.max_body) and
        // each pause in it (limits.body_timeout); here their errors are
        // answered.
        match body.collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(err) => {
                let err: BoxError = err.into();
                if err.is::<http_body_util::LengthLimitError>() {
                    Err(Refusal::body_too_large(self.max_body))
                } else if err.is::<tower_http::timeout::TimeoutError>() {
                    Err(Refusal::new(
                        Kind::TimedOut,
                        "body_timeout",
                        "the request body paused longer than limits.body_timeout",
                    ))
                } else {
                    Err(Refusal::bad_request(
                        "bad_body",
                        format!("the request body could not be read: {err}"),
                    ))
                }
            }
        }
    }

    async fn history(&self, query: Option<&str>) -> Result<Response<Body>, Refusal> {
        let query = Query::parse(query, &["channel", "since", "limit"])?;
        let channel = query.channel()?;
        let since = query
            .get("since")
            .map(|text| {
                text.parse::<Position>()
                    .map_err(|err| Refusal::bad_request("bad_position", format!("`since`: {err}")))
            })
            .transpose()?;
        let limit = query.limit(DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT)?;
        let history = self.channels.broker.history(&channel, since, limit).await?;

        // The envelopes are JSON already: splice them in, no re-encoding.
        let mut body = Vec::with_capacity(
            128 + history
                .publications
                .iter()
                .map(|p| p.envelope().len() + 1)
                .sum::<usize>(),
        );
        let head = serde_json::json!({
            "channel": channel,
            "epoch": history.position.epoch,
            "offset": history.position.offset,
            "recovered": history.recovered,
        })
        .to_string();
        body.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
        body.extend_from_slice(b",\"messages\":[");
        for (index, publication) in history.publications.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            body.extend_from_slice(publication.envelope());
        }
        body.extend_from_slice(b"]}");
        Ok(json_bytes(StatusCode::OK, body))
    }

    /// Who is subscribed to a channel, on every node the engine spans.
    async fn presence(&self, query: Option<&str>) -> Result<Response<Body>, Refusal> {
        let query = Query::parse(query, &["channel"])?;
        let channel = query.channel()?;
        if !self.channels.rules().presence(channel.as_str()).listed {
            return Err(Refusal::bad_request(
                "presence_disabled",
                format!(
                    "presence is not kept for `{channel}`: add a `channels` rule with \
                     `presence: true` for its prefix"
                ),
            ));
        }
        let members = self.channels.broker.presence(&channel).await?;
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "channel": channel, "presence": members }),
        ))
    }

    fn channels(&self, query: Option<&str>) -> Result<Response<Body>, Refusal> {
        let query = Query::parse(query, &["prefix", "limit"])?;
        let prefix = query.get("prefix").unwrap_or("");
        let limit = query.limit(DEFAULT_CHANNELS_LIMIT, MAX_CHANNELS_LIMIT)?;
        let matching: Vec<_> = self
            .channels
            .hub
            .channels()
            .into_iter()
            .filter(|(name, _)| name.as_str().starts_with(prefix))
            .collect();
        let total = matching.len();
        let channels: Vec<_> = matching
            .into_iter()
            .take(limit)
            .map(|(channel, subscribers)| {
                serde_json::json!({ "channel": channel, "subscribers": subscribers })
            })
            .collect();
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "channels": channels, "total": total }),
        ))
    }
}

/// The keyed digests of `keys`.
fn digests(key_digest: &KeyedDigest, keys: &[String]) -> Vec<[u8; 32]> {
    keys.iter()
        .map(|key| key_digest.of(key.as_bytes()))
        .collect()
}

/// The close code of `POST /api/disconnect` without one.
pub const DEFAULT_DISCONNECT_CODE: u16 = 4000;
/// A WebSocket close reason's limit.
pub const MAX_CLOSE_REASON_BYTES: usize = 123;

fn valid_user(user: &str) -> Result<&str, Refusal> {
    if user.is_empty() || user.len() > 256 {
        return Err(Refusal::bad_request(
            "bad_user",
            "`user` must be 1 to 256 bytes",
        ));
    }
    Ok(user)
}

fn only_get<B>(request: &Request<B>) -> Result<(), Refusal> {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        Ok(())
    } else {
        Err(Refusal::method_not_allowed("GET, HEAD"))
    }
}

fn health() -> Response<Body> {
    json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

/// One publish object as sent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishItem<'a> {
    #[serde(default, borrow)]
    channel: Option<&'a RawValue>,
    #[serde(default, borrow)]
    channels: Option<&'a RawValue>,
    /// Present (even as `null`) or absent; `null` is valid data.
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    event: Option<&'a RawValue>,
    #[serde(default, borrow)]
    idempotency_key: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

fn string_field(raw: &RawValue, field: &str) -> Result<String, Refusal> {
    serde_json::from_str::<String>(raw.get())
        .map_err(|_| Refusal::bad_request("bad_json", format!("`{field}` must be a string")))
}

fn channel_name(name: &str) -> Result<ChannelName, Refusal> {
    ChannelName::parse(name)
        .map_err(|err| Refusal::bad_request("bad_channel", format!("`{name}`: {err}")))
}

/// Deepest nesting of arrays and objects a publication's `data` may have.
/// `data` is kept as sent (never parsed into a tree here), but every
/// subscriber parses it, most with a recursive parser: serde_json's own
/// limit, which pushgate's WebSocket commands also live with.
pub const MAX_DATA_DEPTH: usize = 128;

/// Whether the valid JSON `text` nests arrays and objects deeper than
/// `max`: a scan that counts brackets outside strings, with no recursion.
fn nested_deeper_than(text: &str, max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in text.as_bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Validates one publish object.
fn parse_publish(item: &RawValue) -> Result<Publish, Refusal> {
    if !item.get().trim_start().starts_with('{') {
        return Err(Refusal::bad_request(
            "bad_json",
            "a publish is a JSON object with `channel` (or `channels`) and `data`",
        ));
    }
    let item: PublishItem = serde_json::from_str(item.get())
        .map_err(|err| Refusal::bad_request("bad_json", format!("invalid publish: {err}")))?;

    let channels = match (item.channel, item.channels) {
        (Some(_), Some(_)) => {
            return Err(Refusal::bad_request(
                "bad_channel",
                "give `channel` or `channels`, not both",
            ))
        }
        (None, None) => {
            return Err(Refusal::bad_request(
                "missing_channel",
                "name the channel: `channel` (or `channels`, a list)",
            ))
        }
        (Some(one), None) => vec![channel_name(&string_field(one, "channel")?)?],
        (None, Some(many)) => {
            let names: Vec<String> = serde_json::from_str(many.get()).map_err(|_| {
                Refusal::bad_request("bad_json", "`channels` must be a list of strings")
            })?;
            if names.is_empty() || names.len() > MAX_CHANNELS_PER_PUBLISH {
                return Err(Refusal::bad_request(
                    "bad_channel",
                    format!("`channels` must list 1 to {MAX_CHANNELS_PER_PUBLISH} channels"),
                ));
            }
            let mut channels: Vec<ChannelName> = Vec::with_capacity(names.len());
            for name in &names {
                let channel = channel_name(name)?;
                if channels.contains(&channel) {
                    return Err(Refusal::bad_request(
                        "bad_channel",
                        format!("`{name}` is listed twice in `channels`"),
                    ));
                }
                channels.push(channel);
            }
            channels
        }
    };
    let data = item.data.ok_or_else(|| {
        Refusal::bad_request(
            "missing_data",
            "`data` is required (any JSON, null included)",
        )
    })?;
    if nested_deeper_than(data.get(), MAX_DATA_DEPTH) {
        return Err(Refusal::bad_request(
            "bad_json",
            format!("`data` nests arrays and objects deeper than {MAX_DATA_DEPTH} levels"),
        ));
    }
    let event = item
        .event
        .map(|raw| {
            let name = string_field(raw, "event")?;
            EventName::parse(&name)
                .map_err(|err| Refusal::bad_request("bad_event", format!("`{name}`: {err}")))
        })
        .transpose()?;
    let idempotency_key = item
        .idempotency_key
        .map(|raw| {
            let key = string_field(raw, "idempotency_key")?;
            let printable = key.bytes().all(|b| b.is_ascii_graphic());
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN || !printable {
                return Err(Refusal::bad_request(
                    "bad_idempotency_key",
                    format!(
                        "`idempotency_key` must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters"
                    ),
                ));
            }
            Ok(key)
        })
        .transpose()?;
    Ok(Publish {
        channels,
        data: data.to_owned(),
        event,
        idempotency_key,
        publisher: None,
    })
}

/// A decoded query string, refusing unknown and repeated parameters.
struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    fn parse(query: Option<&str>, known: &[&str]) -> Result<Query, Refusal> {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        for (index, (key, _)) in pairs.iter().enumerate() {
            if !known.contains(&key.as_str()) {
                return Err(Refusal::bad_request(
                    "bad_query",
                    format!(
                        "unknown parameter `{key}`; this endpoint takes {}",
                        known.join(", ")
                    ),
                ));
            }
            if pairs[..index].iter().any(|(earlier, _)| earlier == key) {
                return Err(Refusal::bad_request(
                    "bad_query",
                    format!("parameter `{key}` is given twice"),
                ));
            }
        }
        Ok(Query { pairs })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn channel(&self) -> Result<ChannelName, Refusal> {
        let name = self.get("channel").ok_or_else(|| {
            Refusal::bad_request("missing_channel", "name the channel: `?channel=`")
        })?;
        channel_name(name)
    }

    fn limit(&self, default: usize, max: usize) -> Result<usize, Refusal> {
        match self.get("limit") {
            None => Ok(default),
            Some(text) => match text.parse::<usize>() {
                Ok(limit)
                    if text.bytes().all(|b| b.is_ascii_digit()) && (1..=max).contains(&limit) =>
                {
                    Ok(limit)
                }
                _ => Err(Refusal::bad_request(
                    "bad_limit",
                    format!("`limit` must be a whole number from 1 to {max}"),
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests;
