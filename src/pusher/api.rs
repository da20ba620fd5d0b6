//! Pusher's HTTP API at `/apps/{id}/…` on the API listener: what the Pusher
//! server SDKs call. Every request is signed with the app's secret
//! (`pusher::sign`); `api.keys` play no part here.
//!
//! Answers are Pusher's: JSON on success, a short plain-text reason with
//! Pusher's status on failure (`400` a bad request, `401` a signature that
//! does not hold, `404` an unknown app or path, `413` an event over
//! `pusher.max_event_size`, `503` an engine that could not store the event).

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Method, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{check_channel, engine_channel, engine_prefix, pusher_name, sign, Access, Kind};
use super::{PusherApps, Stored, MAX_EVENT_LEN};
use crate::body::Body;
use crate::broker::{BrokerError, Publish};
use crate::channels::Channels;
use crate::config::PusherAppSettings;
use crate::error::{json as json_answer, plain};
use crate::message::ChannelName;

/// Most channels one event may go to (Pusher's limit).
pub const MAX_EVENT_CHANNELS: usize = 100;
/// Most events in one `batch_events` (Pusher's limit).
pub const MAX_BATCH: usize = 10;

/// The HTTP API's state.
pub struct PusherApi {
    apps: Arc<PusherApps>,
    channels: Arc<Channels>,
}

/// What a request asks for that the caller carries out: closing a user's
/// connections reaches every node, through the API's own disconnect.
pub enum Answer {
    Done(Response<Body>),
    /// Close every connection signed in as `user` (a key in the registry),
    /// then answer `{}`.
    Terminate {
        user: String,
    },
}

/// A refusal: Pusher's status and a reason.
struct Refused(StatusCode, String);

impl Refused {
    fn bad(why: impl Into<String>) -> Refused {
        Refused(StatusCode::BAD_REQUEST, why.into())
    }
}

impl From<BrokerError> for Refused {
    fn from(err: BrokerError) -> Refused {
        Refused(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
    }
}

/// The registry's name for a user signed in to `app_id`: users of one app
/// never meet another app's, nor pushgate's own.
pub fn user_key(app_id: &str, user: &str) -> String {
    format!("{}{user}", engine_prefix(app_id))
}

impl PusherApi {
    pub fn new(apps: Arc<PusherApps>, channels: Arc<Channels>) -> PusherApi {
        PusherApi { apps, channels }
    }

    /// Answers a request whose path starts with `/apps/`; `body` was read
    /// whole (within `api.max_body`).
    pub async fn handle(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        body: &[u8],
    ) -> Answer {
        match self.route(method, path, query, body).await {
            Ok(answer) => answer,
            Err(Refused(status, why)) => Answer::Done(plain(status, why)),
        }
    }

    async fn route(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<Answer, Refused> {
        let rest = path.strip_prefix("/apps/").unwrap_or_default();
        let (id, rest) = rest.split_once('/').unwrap_or((rest, ""));
        let app = self
            .apps
            .by_id(id)
            .ok_or_else(|| Refused(StatusCode::NOT_FOUND, format!("unknown app `{id}`")))?;
        // Checked before anything else: an unsigned caller learns nothing
        // more than that the app exists.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |now| now.as_secs());
        sign::verify_request(
            method.as_str(),
            path,
            query,
            body,
            &app.key,
            &app.secret,
            now,
        )
        .map_err(|err| Refused(err.status(), err.to_string()))?;
        let params = Params::parse(query);
        let segments: Vec<&str> = rest.split('/').collect();
        let done = |value: Value| Ok(Answer::Done(json_answer(StatusCode::OK, &value)));
        let publishes = matches!(segments.as_slice(), ["events" | "batch_events"]);
        if method == Method::POST && publishes && !self.channels.hub.caught_up().await {
            // Before anything is stored, as for pushgate's own API, and
            // with the same Retry-After.
            let refusal = crate::error::Refusal::overloaded();
            let mut answer = plain(StatusCode::SERVICE_UNAVAILABLE, refusal.message);
            if let Some(wait) = refusal.retry_after {
                answer
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, crate::error::retry_after(wait));
            }
            return Ok(Answer::Done(answer));
        }
        match (method, segments.as_slice()) {
            (&Method::POST, ["events"]) => {
                let event = parse_json::<Event>(body)?;
                done(self.trigger(app, event).await?)
            }
            (&Method::POST, ["batch_events"]) => {
                #[derive(Deserialize)]
                struct Batch {
                    batch: Vec<Event>,
                }
                let batch = parse_json::<Batch>(body)?.batch;
                if batch.len() > MAX_BATCH {
                    return Err(Refused::bad(format!(
                        "a batch holds at most {MAX_BATCH} events"
                    )));
                }
                let mut infos = Vec::with_capacity(batch.len());
                let mut any_info = false;
                for event in batch {
                    any_info |= event.info.is_some();
                    infos.push(self.trigger(app, event).await?);
                }
                if any_info {
                    // One entry per event, each its channel's info.
                    let batch: Vec<Value> = infos
                        .into_iter()
                        .map(|info| {
                            info.get("channels")
                                .and_then(Value::as_object)
                                .and_then(|channels| channels.values().next().cloned())
                                .unwrap_or_else(|| json!({}))
                        })
                        .collect();
                    done(json!({ "batch": batch }))
                } else {
                    done(json!({}))
                }
            }
            (&Method::GET, ["channels"]) => done(self.list(app, &params).await?),
            (&Method::GET, ["channels", name]) => {
                let name = decoded(name)?;
                done(self.channel(app, &name, &params).await?)
            }
            (&Method::GET, ["channels", name, "users"]) => {
                let name = decoded(name)?;
                done(self.users(app, &name).await?)
            }
            (&Method::POST, ["users", user, "terminate_connections"]) => {
                let user = decoded(user)?;
                Ok(Answer::Terminate {
                    user: user_key(&app.id, &user),
                })
            }
            (_, ["events" | "batch_events"]) | (_, ["users", _, "terminate_connections"]) => {
                Err(Refused(StatusCode::METHOD_NOT_ALLOWED, "use POST".into()))
            }
            (_, ["channels"] | ["channels", _] | ["channels", _, "users"]) => {
                Err(Refused(StatusCode::METHOD_NOT_ALLOWED, "use GET".into()))
            }
            _ => Err(Refused(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {path}"),
            )),
        }
    }

    /// Publishes one event to each of its channels: stored in each one's
    /// history before the answer, like every publication pushgate accepts.
    async fn trigger(&self, app: &PusherAppSettings, event: Event) -> Result<Value, Refused> {
        if event.name.is_empty() || event.name.len() > MAX_EVENT_LEN {
            return Err(Refused::bad(format!(
                "an event name is 1-{MAX_EVENT_LEN} bytes"
            )));
        }
        let data_len = event.data.get().len();
        if data_len > self.apps.max_event_size {
            return Err(Refused(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the event's data is {data_len} bytes; the limit is {} (pusher.max_event_size)",
                    self.apps.max_event_size
                ),
            ));
        }
        let names = match (event.channel, event.channels) {
            (Some(one), None) => vec![one],
            (None, Some(many)) if !many.is_empty() => many,
            _ => {
                return Err(Refused::bad(
                    "give the event's channels: `channels` (a list) or `channel`",
                ))
            }
        };
        if names.len() > MAX_EVENT_CHANNELS {
            return Err(Refused::bad(format!(
                "an event goes to at most {MAX_EVENT_CHANNELS} channels"
            )));
        }
        if let Some(socket_id) = &event.socket_id {
            if !sign::valid_socket_id(socket_id) {
                return Err(Refused::bad(format!("`{socket_id}` is not a socket_id")));
            }
        }
        let channels = names
            .iter()
            .map(|name| {
                check_channel(name)?;
                engine_channel(&app.id, name)
            })
            .collect::<Result<Vec<ChannelName>, String>>()
            .map_err(Refused::bad)?;
        let stored = Stored {
            event: event.name.as_str().into(),
            data: &event.data,
            user_id: None,
            except: event.socket_id.as_deref().map(Into::into),
        };
        let data = serde_json::value::to_raw_value(&stored).expect("plain fields serialize");
        self.channels
            .broker
            .publish(Publish {
                channels: channels.clone(),
                data,
                event: None,
                idempotency_key: None,
                publisher: None,
            })
            .await?;
        match event.info {
            None => Ok(json!({})),
            Some(info) => {
                let wanted = Info::parse(&info)?;
                let mut out = serde_json::Map::new();
                for (name, engine) in names.iter().zip(&channels) {
                    out.insert(name.clone(), self.info(name, engine, wanted).await?);
                }
                Ok(json!({ "channels": out }))
            }
        }
    }

    /// `GET /apps/{id}/channels`: the occupied channels.
    async fn list(&self, app: &PusherAppSettings, params: &Params) -> Result<Value, Refused> {
        let prefix = params.get("filter_by_prefix").unwrap_or("");
        let wanted = Info::parse(params.get("info").unwrap_or(""))?;
        if wanted.subscription_count {
            return Err(Refused::bad(
                "info=subscription_count is given for one channel, not a list",
            ));
        }
        if wanted.user_count && !prefix.starts_with("presence-") {
            return Err(Refused::bad(
                "info=user_count needs filter_by_prefix=presence-",
            ));
        }
        // Heard on any node: the engine knows.
        let mut listed = BTreeMap::new();
        for engine in self.channels.broker.heard(&engine_prefix(&app.id)).await? {
            let Some(name) = pusher_name(&app.id, engine.as_str()) else {
                continue;
            };
            if name.starts_with(prefix) {
                listed.insert(name.into_owned(), engine);
            }
        }
        let mut out = serde_json::Map::new();
        for (name, engine) in listed {
            let info = self.info(&name, &engine, wanted).await?;
            out.insert(name, info);
        }
        Ok(json!({ "channels": out }))
    }

    /// `GET /apps/{id}/channels/{name}`.
    async fn channel(
        &self,
        app: &PusherAppSettings,
        name: &str,
        params: &Params,
    ) -> Result<Value, Refused> {
        check_channel(name).map_err(Refused::bad)?;
        let engine = engine_channel(&app.id, name).map_err(Refused::bad)?;
        let wanted = Info::parse(params.get("info").unwrap_or(""))?;
        let mut info = self.info(name, &engine, wanted).await?;
        // Heard by a node, on any node.
        let occupied = self.channels.broker.hearing(&engine).await? > 0;
        info["occupied"] = Value::Bool(occupied);
        Ok(info)
    }

    /// `GET /apps/{id}/channels/{name}/users`: a presence channel's users.
    async fn users(&self, app: &PusherAppSettings, name: &str) -> Result<Value, Refused> {
        check_channel(name).map_err(Refused::bad)?;
        if Kind::of(name).access != Access::Presence {
            return Err(Refused::bad("users are listed for presence- channels only"));
        }
        let engine = engine_channel(&app.id, name).map_err(Refused::bad)?;
        let users: Vec<Value> = self
            .members(&engine)
            .await?
            .into_keys()
            .map(|id| json!({ "id": id }))
            .collect();
        Ok(json!({ "users": users }))
    }

    /// The users on a presence channel, each once however many connections
    /// they have there.
    async fn members(&self, engine: &ChannelName) -> Result<BTreeMap<String, ()>, Refused> {
        Ok(self
            .channels
            .broker
            .presence(engine)
            .await?
            .into_iter()
            .filter_map(|member| member.user)
            .map(|user| (user, ()))
            .collect())
    }

    /// The `info` attributes asked for one channel.
    async fn info(&self, name: &str, engine: &ChannelName, wanted: Info) -> Result<Value, Refused> {
        let mut info = serde_json::Map::new();
        if wanted.user_count {
            if Kind::of(name).access != Access::Presence {
                return Err(Refused::bad(
                    "info=user_count is given for presence- channels only",
                ));
            }
            info.insert(
                "user_count".into(),
                self.members(engine).await?.len().into(),
            );
        }
        if wanted.subscription_count {
            info.insert(
                "subscription_count".into(),
                self.channels.hub.subscribers(engine.as_str()).into(),
            );
        }
        Ok(Value::Object(info))
    }
}

/// `POST /apps/{id}/events`'s body, and each of a batch's.
#[derive(Deserialize)]
struct Event {
    name: String,
    /// A string, as Pusher's API takes it; relayed as it is.
    data: Box<RawValue>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    socket_id: Option<String>,
    #[serde(default)]
    info: Option<String>,
}

/// The attributes of `info=`.
#[derive(Debug, Clone, Copy, Default)]
struct Info {
    user_count: bool,
    subscription_count: bool,
}

impl Info {
    fn parse(text: &str) -> Result<Info, Refused> {
        let mut info = Info::default();
        for attribute in text.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            match attribute {
                "user_count" => info.user_count = true,
                "subscription_count" => info.subscription_count = true,
                other => {
                    return Err(Refused::bad(format!(
                    "info attribute `{other}` is not known; use user_count or subscription_count"
                )))
                }
            }
        }
        Ok(info)
    }
}

/// The query's parameters, decoded.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: Option<&str>) -> Params {
        let params = query
            .unwrap_or("")
            .split('&')
            .filter_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                Some((decoded(key).ok()?, decoded(value).ok()?))
            })
            .collect();
        Params(params)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A path segment or query part, percent-decoded (a `+` stays a `+`, as the
/// SDKs sign it).
fn decoded(text: &str) -> Result<String, Refused> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|text| text.into_owned())
        .map_err(|_| Refused::bad("the path or query is not UTF-8 once decoded"))
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Refused> {
    serde_json::from_slice(body).map_err(|err| Refused::bad(format!("the body: {err}")))
}
