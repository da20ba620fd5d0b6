//! The Pusher Channels protocol, for apps built on pusher-js, Laravel Echo
//! and the Pusher server SDKs (docs/pusher.md).
//!
//! Pusher's channels live in pushgate's engine like any other: Pusher
//! channel `C` of app `ID` is the pushgate channel `pusher/ID/C'`, where
//! `C'` is `C` with the two characters pushgate's names lack escaped (`,`
//! as `:c`, `;` as `:s`, the `#` of a user's channel as `:h`; Pusher names
//! have no `:`, so the escape cannot be
//! mistaken). An event is stored as one publication whose data is
//! [`Stored`], and framed for Pusher clients once per publication
//! ([`frame`]), whichever node it came from.
//!
//! - `pusher::sign`: the signatures: HTTP API requests, channel
//!   authorizations, webhooks.
//! - `pusher::api`: the HTTP API at `/apps/{id}/…`.
//! - `pusher::webhooks`: webhooks to the app, each once across nodes.
//!
//! The WebSocket side is a transport (`transport::pusher`).

pub mod api;
pub mod sign;
pub mod webhooks;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::config::{ByteSize, PusherAppSettings, Settings};
use crate::message::{ChannelName, Publication};

/// The prefix of every Pusher channel's name inside pushgate.
pub const CHANNEL_PREFIX: &str = "pusher/";
/// Longest Pusher channel name, in bytes (Pusher's own limit).
pub const MAX_CHANNEL_LEN: usize = 164;
/// Longest event name, in bytes (Pusher's own limit).
pub const MAX_EVENT_LEN: usize = 200;

/// The Pusher apps a node serves, the protocol's settings, and the
/// webhooks' queues.
pub struct PusherApps {
    apps: Vec<Arc<PusherAppSettings>>,
    /// Started with the node ([`PusherApps::start_webhooks`]).
    webhooks: std::sync::OnceLock<webhooks::Webhooks>,
    pub activity_timeout: Duration,
    pub client_events_per_second: u32,
    pub max_presence_members: usize,
    pub max_event_size: usize,
}

impl PusherApps {
    /// The apps of `settings`; `None` when there are none (the protocol is
    /// off).
    pub fn new(settings: &Settings) -> Option<Arc<PusherApps>> {
        if settings.pusher.is_empty() {
            return None;
        }
        let config = &settings.config.pusher;
        Some(Arc::new(PusherApps {
            apps: settings.pusher.iter().cloned().map(Arc::new).collect(),
            webhooks: std::sync::OnceLock::new(),
            activity_timeout: config.activity_timeout,
            client_events_per_second: config.client_events_per_second,
            max_presence_members: config.max_presence_members,
            max_event_size: size(config.max_event_size),
        }))
    }

    pub fn by_key(&self, key: &str) -> Option<&Arc<PusherAppSettings>> {
        self.apps.iter().find(|app| app.key == key)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<PusherAppSettings>> {
        self.apps.iter().find(|app| app.id == id)
    }

    /// What the start-up log says of the protocol: each app, where its
    /// clients connect and where its webhooks go.
    pub fn describe(&self) -> String {
        let apps: Vec<String> = self
            .apps
            .iter()
            .map(|app| {
                let webhooks = app
                    .webhook
                    .as_ref()
                    .map_or("no webhooks".to_owned(), |w| format!("webhooks to {}", w.target));
                format!(
                    "app {} (WebSocket /app/{}, HTTP API /apps/{}/..., client events {}, {webhooks})",
                    app.id,
                    app.key,
                    app.id,
                    if app.client_events { "on" } else { "off" },
                )
            })
            .collect();
        format!("Pusher protocol: {}", apps.join("; "))
    }

    /// Starts the webhooks' queues, for the apps with `webhook.url` set.
    /// Must be called within a tokio runtime.
    pub fn start_webhooks(
        &self,
        calls: &crate::app::AppCalls,
        broker: Arc<dyn crate::broker::Broker>,
    ) {
        let _ = self
            .webhooks
            .set(webhooks::Webhooks::start(&self.apps, calls, broker));
    }

    /// Queues a webhook of `app`, if it wants that kind.
    pub fn webhook(
        &self,
        app: &PusherAppSettings,
        kind: crate::config::WebhookKind,
        hook: webhooks::Hook,
    ) {
        let (Some(webhooks), Some(index)) = (
            self.webhooks.get(),
            self.apps.iter().position(|a| a.id == app.id),
        ) else {
            return;
        };
        webhooks.send(self, index, kind, hook);
    }

    /// Whether `app` sends webhooks of `kind`: build one only when it does.
    pub fn wants(app: &PusherAppSettings, kind: crate::config::WebhookKind) -> bool {
        app.webhook
            .as_ref()
            .is_some_and(|webhook| webhook.wants(kind))
    }

    /// The webhooks' counts for /metrics; `None` with no webhooks.
    pub fn webhook_stats(&self) -> Option<crate::posting::PostStats> {
        self.webhooks.get()?.stats()
    }

    /// Stops the webhooks' queues once they have tried to send what they
    /// hold.
    pub async fn close(&self) {
        if let Some(webhooks) = self.webhooks.get() {
            webhooks.close().await;
        }
    }

    /// The app (by its place) whose channel the pushgate channel `engine`
    /// is.
    fn app_of_channel(&self, engine: &str) -> Option<usize> {
        let (id, _) = engine.strip_prefix(CHANNEL_PREFIX)?.split_once('/')?;
        self.apps.iter().position(|app| app.id == id)
    }

    /// The app whose WebSocket path `/app/{key}` this is.
    pub fn socket_app(&self, path: &str) -> Option<&Arc<PusherAppSettings>> {
        self.by_key(path.strip_prefix("/app/")?)
    }
}

fn size(bytes: ByteSize) -> usize {
    usize::try_from(bytes.bytes()).unwrap_or(usize::MAX)
}

/// Who may subscribe to a channel, by its name's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    Public,
    /// A connection the app signed for (`private-`).
    Private,
    /// A member the app signed for, with its user (`presence-`).
    Presence,
    /// The connections signed in as one user (`#server-to-user-{id}`).
    User,
}

/// What a channel's name makes of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub access: Access,
    /// `private-encrypted-`: payloads are end-to-end encrypted; relayed
    /// untouched, and clients may not send events on it.
    pub encrypted: bool,
    /// `cache-` (also after `private-`, `presence-`,
    /// `private-encrypted-`): a subscriber is sent the last event at once.
    pub cache: bool,
}

impl Kind {
    pub fn of(channel: &str) -> Kind {
        if channel.starts_with(USER_CHANNEL_PREFIX) {
            return Kind {
                access: Access::User,
                encrypted: false,
                cache: false,
            };
        }
        let (access, encrypted, rest) = if let Some(rest) = channel.strip_prefix("private-") {
            match rest.strip_prefix("encrypted-") {
                Some(rest) => (Access::Private, true, rest),
                None => (Access::Private, false, rest),
            }
        } else if let Some(rest) = channel.strip_prefix("presence-") {
            (Access::Presence, false, rest)
        } else {
            (Access::Public, false, channel)
        };
        Kind {
            access,
            encrypted,
            cache: rest.starts_with("cache-"),
        }
    }
}

/// The channel of the connections signed in as one user: the prefix, then
/// the user's id.
pub const USER_CHANNEL_PREFIX: &str = "#server-to-user-";

/// Why a channel name is refused, in Pusher's words. Only a user's channel
/// ([`USER_CHANNEL_PREFIX`]) may hold a `#`, at its start.
pub fn check_channel(name: &str) -> Result<(), String> {
    if name.starts_with('#') && !name.starts_with(USER_CHANNEL_PREFIX) {
        return Err(format!(
            "only a user's channel ({USER_CHANNEL_PREFIX}{{id}}) starts with #"
        ));
    }
    let name = name.strip_prefix('#').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_CHANNEL_LEN {
        return Err(format!(
            "a channel name is 1-{MAX_CHANNEL_LEN} characters, not {}",
            name.len()
        ));
    }
    match name.chars().find(|&c| !is_channel_char(c)) {
        Some(bad) => Err(format!(
            "channel names may hold A-Z a-z 0-9 and _ - = @ , . ; (not {bad:?})"
        )),
        None => Ok(()),
    }
}

fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '=' | '@' | ',' | '.' | ';')
}

/// The pushgate channel that holds Pusher channel `name` of app `app_id`,
/// for a name that passed [`check_channel`]. Refused when the escaped name
/// is longer than a pushgate name may be (a name of many `,` and `;`).
pub fn engine_channel(app_id: &str, name: &str) -> Result<ChannelName, String> {
    let mut engine = String::with_capacity(CHANNEL_PREFIX.len() + app_id.len() + 1 + name.len());
    engine.push_str(CHANNEL_PREFIX);
    engine.push_str(app_id);
    engine.push('/');
    for c in name.chars() {
        match c {
            ',' => engine.push_str(":c"),
            ';' => engine.push_str(":s"),
            '#' => engine.push_str(":h"),
            c => engine.push(c),
        }
    }
    ChannelName::parse(&engine)
        .map_err(|_| "this channel name has too many `,` and `;` to be stored".to_owned())
}

/// The prefix of every pushgate channel that holds one of `app_id`'s.
pub fn engine_prefix(app_id: &str) -> String {
    format!("{CHANNEL_PREFIX}{app_id}/")
}

/// The Pusher name inside pushgate channel `engine`, if it is one of
/// `app_id`'s: [`engine_channel`] undone.
pub fn pusher_name<'a>(app_id: &str, engine: &'a str) -> Option<Cow<'a, str>> {
    let escaped = engine
        .strip_prefix(CHANNEL_PREFIX)?
        .strip_prefix(app_id)?
        .strip_prefix('/')?;
    Some(unescape(escaped))
}

/// The Pusher name inside any pushgate channel `pusher/ID/…`.
fn any_pusher_name(engine: &str) -> Option<Cow<'_, str>> {
    let rest = engine.strip_prefix(CHANNEL_PREFIX)?;
    let (_, escaped) = rest.split_once('/')?;
    Some(unescape(escaped))
}

fn unescape(escaped: &str) -> Cow<'_, str> {
    if !escaped.contains(':') {
        return Cow::Borrowed(escaped);
    }
    Cow::Owned(
        escaped
            .replace(":c", ",")
            .replace(":s", ";")
            .replace(":h", "#"),
    )
}

/// An event as stored in a publication's data.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stored<'a> {
    /// The event's name, as the publisher gave it.
    #[serde(borrow)]
    pub event: Cow<'a, str>,
    /// As the publisher gave it: a string from the HTTP API, any JSON from
    /// a client.
    #[serde(borrow)]
    pub data: &'a RawValue,
    /// The user who sent a client event on a presence channel.
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub user_id: Option<Cow<'a, str>>,
    /// The connection not to deliver to: the sender of a client event, or
    /// the `socket_id` of an HTTP API event.
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub except: Option<Cow<'a, str>>,
}

/// A publication as Pusher clients are sent it.
pub struct Frame {
    /// `{"event","channel","data","user_id"?}`.
    pub text: Utf8Bytes,
    /// The connection it is not for.
    pub except: Option<Box<str>>,
}

/// Frames `publication` for Pusher clients. A publication that is not a
/// [`Stored`] event (one from pushgate's own publish API) is the event
/// named as its publisher named it (`message` when unnamed), its data the
/// JSON text as a string. `None` for what no Pusher client is sent: a
/// channel outside the Pusher namespace, or a presence event, which each
/// connection reads itself ([`member_change`]).
pub fn frame(publication: &Publication) -> Option<Frame> {
    let channel = any_pusher_name(publication.channel().as_str())?;
    let envelope = std::str::from_utf8(publication.envelope()).ok()?;
    let data = if publication.is_aside() {
        // An ephemeral event: the data sits in its envelope.
        #[derive(Deserialize)]
        struct Aside<'a> {
            #[serde(borrow)]
            data: Option<&'a RawValue>,
        }
        serde_json::from_str::<Aside>(envelope).ok()?.data?.get()
    } else {
        publication.data()
    };
    #[derive(Serialize)]
    struct Out<'a> {
        event: &'a str,
        channel: &'a str,
        data: &'a RawValue,
        #[serde(skip_serializing_if = "Option::is_none")]
        user_id: Option<&'a str>,
    }
    let (text, except) = match serde_json::from_str::<Stored>(data) {
        Ok(stored) => {
            let text = serde_json::to_string(&Out {
                event: &stored.event,
                channel: &channel,
                data: stored.data,
                user_id: stored.user_id.as_deref(),
            });
            (text, stored.except.map(|except| except.into()))
        }
        Err(_) => {
            let event = publication.event().map_or("message", |e| e.as_str());
            let as_string = serde_json::to_string(data).ok()?;
            let text = serde_json::to_string(&Out {
                event,
                channel: &channel,
                data: &RawValue::from_string(as_string).ok()?,
                user_id: None,
            });
            (text, None)
        }
    };
    Some(Frame {
        text: text.ok()?.into(),
        except,
    })
}

/// A member joining or leaving a presence channel, read from pushgate's
/// presence event (`{"op":"join"|"leave","user","connection","info"}`).
#[derive(Debug, Deserialize)]
pub struct MemberChange {
    pub op: String,
    pub user: Option<String>,
    pub connection: String,
    pub info: Option<Box<RawValue>>,
}

/// The presence event `publication` carries, read once.
pub fn member_change(publication: &Publication) -> Option<MemberChange> {
    serde_json::from_slice::<MemberChange>(publication.envelope()).ok()
}

/// A server event: `{"event","channel"?,"data"}` with `data` as a JSON
/// string, as protocol 7 sends its own events.
pub fn server_event(event: &str, channel: Option<&str>, data: &serde_json::Value) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        event: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
        data: String,
    }
    serde_json::to_string(&Out {
        event,
        channel,
        data: data.to_string(),
    })
    .expect("plain fields serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kinds_follow_the_prefixes() {
        let kind = |name| Kind::of(name);
        assert_eq!(kind("chat").access, Access::Public);
        assert!(!kind("chat").cache);
        assert!(kind("cache-chat").cache);
        assert_eq!(kind("private-x").access, Access::Private);
        assert!(!kind("private-x").encrypted);
        assert!(kind("private-encrypted-x").encrypted);
        assert!(kind("private-encrypted-cache-x").cache);
        assert!(kind("private-cache-x").cache);
        assert_eq!(kind("presence-cache-x").access, Access::Presence);
        assert!(kind("presence-cache-x").cache);
        assert!(!kind("presencex").cache);
        assert_eq!(kind("presencex").access, Access::Public);
        assert_eq!(kind("#server-to-user-7").access, Access::User);
    }

    proptest! {
        /// Every Pusher name maps to a valid pushgate name, back to itself,
        /// and no two names (or apps) share one.
        #[test]
        fn names_map_one_to_one(
            a in "(#server-to-user-)?[A-Za-z0-9_=@,.;-]{1,140}",
            b in "(#server-to-user-)?[A-Za-z0-9_=@,.;-]{1,140}",
            app in "[A-Za-z0-9_-]{1,64}",
        ) {
            prop_assert!(check_channel(&a).is_ok());
            let escaped_len = |name: &str| {
                CHANNEL_PREFIX.len() + app.len() + 1 + name.len() + name.matches([',', ';', '#']).count()
            };
            // Refused only when the escaped name is longer than a pushgate name.
            let (engine, other) = match (engine_channel(&app, &a), engine_channel(&app, &b)) {
                (Ok(engine), Ok(other)) => (engine, other),
                (engine, other) => {
                    prop_assert_eq!(engine.is_err(), escaped_len(&a) > crate::message::MAX_CHANNEL_LEN);
                    prop_assert_eq!(other.is_err(), escaped_len(&b) > crate::message::MAX_CHANNEL_LEN);
                    return Ok(());
                }
            };
            prop_assert_eq!(pusher_name(&app, engine.as_str()).unwrap(), a.as_str());
            prop_assert_eq!(any_pusher_name(engine.as_str()).unwrap(), a.as_str());
            prop_assert_eq!(a == b, engine == other);
            let other_app = format!("{app}x");
            prop_assert!(pusher_name(&other_app, engine.as_str()).is_none());
        }
    }

    #[test]
    fn names_outside_pushers_rules_are_refused() {
        for bad in [
            "",
            "#",
            "a b",
            "a:b",
            "a/b",
            "a#b",
            "##a",
            "#server-to-user",
            "#private-a",
            "é",
            &"x".repeat(165),
        ] {
            assert!(check_channel(bad).is_err(), "{bad:?}");
        }
    }
}
