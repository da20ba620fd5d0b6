//! `pusher`: the Pusher Channels protocol for apps built on pusher-js,
//! Laravel Echo and the Pusher server SDKs, checked.

use std::time::Duration;

use http::uri::PathAndQuery;
use http::Uri;
use serde::{Deserialize, Serialize};

use super::units::{duration, ByteSize};
use super::upstream::Upstream;

/// `pusher.activity_timeout`: what clients are told to ping within.
pub const DEFAULT_PUSHER_ACTIVITY_TIMEOUT: Duration = Duration::from_secs(120);
/// `pusher.client_events_per_second`: Pusher's own limit.
pub const DEFAULT_PUSHER_CLIENT_EVENTS_PER_SECOND: u32 = 10;
/// `pusher.max_presence_members`: Pusher's own limit.
pub const DEFAULT_PUSHER_MAX_PRESENCE_MEMBERS: usize = 100;
/// `pusher.max_event_size`: Pusher's limit on an event's data.
pub const DEFAULT_PUSHER_MAX_EVENT_SIZE: ByteSize = ByteSize(10 * 1024);
/// Largest `pusher.max_presence_members`: each subscriber of a presence
/// channel keeps its member list.
pub const MAX_PUSHER_PRESENCE_MEMBERS: usize = 10_000;

/// The Pusher Channels protocol: its WebSocket at `/app/{key}` on the
/// public listener, its HTTP API at `/apps/{id}/…` on the API listener.
/// Off while `apps` is empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PusherConfig {
    /// The apps served, each with its own key and secret.
    pub apps: Vec<PusherApp>,
    /// Told to clients at connect: they ping when idle this long, and a
    /// client silent for this long (and a ping timeout more) is dropped.
    #[serde(with = "duration")]
    pub activity_timeout: Duration,
    /// `client-*` events one connection may send per second.
    pub client_events_per_second: u32,
    /// Members one presence channel may have.
    pub max_presence_members: usize,
    /// The largest event data accepted, from the HTTP API or a client.
    pub max_event_size: ByteSize,
}

impl Default for PusherConfig {
    fn default() -> Self {
        PusherConfig {
            apps: Vec::new(),
            activity_timeout: DEFAULT_PUSHER_ACTIVITY_TIMEOUT,
            client_events_per_second: DEFAULT_PUSHER_CLIENT_EVENTS_PER_SECOND,
            max_presence_members: DEFAULT_PUSHER_MAX_PRESENCE_MEMBERS,
            max_event_size: DEFAULT_PUSHER_MAX_EVENT_SIZE,
        }
    }
}

/// One Pusher app: the three values its client and server SDKs are
/// configured with.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PusherApp {
    /// `app_id` in the server SDKs: the HTTP API's `/apps/{id}`.
    pub id: String,
    /// The public key clients connect with: `/app/{key}`.
    pub key: String,
    /// Signs the HTTP API's requests and channel authorizations.
    pub secret: Option<String>,
    /// The environment variable holding `secret`, to keep it out of the
    /// file.
    pub secret_env: Option<String>,
    /// Clients may send `client-*` events on private and presence channels.
    pub client_events: bool,
    /// Webhooks to the app.
    pub webhook: PusherWebhook,
}

/// Pusher's webhooks: what happened to channels, posted to the app.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PusherWebhook {
    /// Where on the app: a path, or a URL on `upstream.url`'s host and
    /// port. None: no webhooks.
    pub url: Option<String>,
    /// Which are sent.
    pub events: Vec<WebhookKind>,
}

impl Default for PusherWebhook {
    fn default() -> Self {
        PusherWebhook {
            url: None,
            events: WebhookKind::ALL.to_vec(),
        }
    }
}

/// A webhook's `name`, as Pusher names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookKind {
    /// A channel has its first subscriber, on any node.
    ChannelOccupied,
    /// A channel lost its last subscriber, on every node.
    ChannelVacated,
    /// A user's first connection joined a presence channel.
    MemberAdded,
    /// A user's last connection left a presence channel.
    MemberRemoved,
    /// A client sent a `client-*` event.
    ClientEvent,
    /// A subscriber to a cache channel found no event to be sent.
    CacheMiss,
}

impl WebhookKind {
    pub const ALL: [WebhookKind; 6] = [
        WebhookKind::ChannelOccupied,
        WebhookKind::ChannelVacated,
        WebhookKind::MemberAdded,
        WebhookKind::MemberRemoved,
        WebhookKind::ClientEvent,
        WebhookKind::CacheMiss,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookKind::ChannelOccupied => "channel_occupied",
            WebhookKind::ChannelVacated => "channel_vacated",
            WebhookKind::MemberAdded => "member_added",
            WebhookKind::MemberRemoved => "member_removed",
            WebhookKind::ClientEvent => "client_event",
            WebhookKind::CacheMiss => "cache_miss",
        }
    }
}

impl std::fmt::Debug for PusherApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret has no business in a log line.
        f.debug_struct("PusherApp")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("secret_env", &self.secret_env)
            .field("client_events", &self.client_events)
            .field("webhook", &self.webhook)
            .finish()
    }
}

/// A Pusher app as a node serves it: its secret found.
#[derive(Clone)]
pub struct PusherAppSettings {
    pub id: String,
    pub key: String,
    pub secret: String,
    pub client_events: bool,
    /// Where webhooks go on the app, and which: none when `webhook.url` is
    /// not set.
    pub webhook: Option<WebhookSettings>,
}

/// `webhook` with its url set, as a node runs it.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// The path (and query) on the app.
    pub target: PathAndQuery,
    /// Which are sent, by `WebhookKind as usize`.
    pub kinds: [bool; 6],
}

impl WebhookSettings {
    pub fn wants(&self, kind: WebhookKind) -> bool {
        self.kinds[kind as usize]
    }
}

/// Where `url` points on the app: a path, or a URL on the app's own host
/// and port (webhooks go to the app pushgate stands beside).
fn webhook_target(url: &str, upstream: Option<&Upstream>) -> Result<PathAndQuery, String> {
    let uri: Uri = url
        .parse()
        .map_err(|err| format!("`{url}` is not a URL: {err}"))?;
    if uri.scheme().is_some() || uri.authority().is_some() {
        let app = upstream.map(|upstream| upstream.authority());
        if uri.scheme_str() != Some("http") || uri.authority() != app {
            return Err(format!(
                "`{url}` is not on the app (upstream.url): webhooks go to the app pushgate stands beside"
            ));
        }
    } else if !url.starts_with('/') {
        return Err(format!("`{url}` is neither a path nor a URL"));
    }
    Ok(uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/")))
}

/// Whether `text` may be an app id or key: 1–64 of `[A-Za-z0-9_-]`, so it
/// sits in a path segment and a channel name as it is.
fn valid_label(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Finds each app's secret (`secret`, or `secret_env` in `env`), so the
/// checks see it. Problems go through `problem(key, why, fix)`.
pub(super) fn find_secrets(
    pusher: &mut PusherConfig,
    env: &[(String, String)],
    problem: &mut impl FnMut(&str, String, &str),
) {
    for (index, app) in pusher.apps.iter_mut().enumerate() {
        let Some(name) = &app.secret_env else {
            continue;
        };
        let key = format!("pusher.apps[{index}].secret_env");
        if app.secret.is_some() {
            problem(
                &key,
                "both secret and secret_env are set".into(),
                "keep one: secret_env names the environment variable that holds the secret",
            );
            continue;
        }
        match env.iter().find(|(var, _)| var == name) {
            Some((_, secret)) => app.secret = Some(secret.clone()),
            None => problem(
                &key,
                format!("the environment has no variable `{name}`"),
                "set it to the app's secret, or write the secret in pusher.apps[].secret",
            ),
        }
    }
}

/// Checks `pusher`; reports each problem through `problem(key, why, fix)`.
/// `upstream` is the app, when its URL parsed.
pub(super) fn check(
    pusher: &PusherConfig,
    upstream: Option<&Upstream>,
    problem: &mut impl FnMut(&str, String, &str),
) -> Vec<PusherAppSettings> {
    let mut apps = Vec::with_capacity(pusher.apps.len());
    for (index, app) in pusher.apps.iter().enumerate() {
        let key = |field: &str| format!("pusher.apps[{index}].{field}");
        let mut ok = true;
        if !valid_label(&app.id) {
            ok = false;
            problem(
                &key("id"),
                format!("`{}` is not 1-64 of A-Z a-z 0-9 _ -", app.id),
                "use the app_id your server SDK is configured with, e.g. \"1001\"",
            );
        }
        if !valid_label(&app.key) {
            ok = false;
            problem(
                &key("key"),
                format!("`{}` is not 1-64 of A-Z a-z 0-9 _ -", app.key),
                "use the key your clients connect with, e.g. from `openssl rand -hex 10`",
            );
        }
        if pusher.apps[..index].iter().any(|other| other.id == app.id) {
            ok = false;
            problem(
                &key("id"),
                format!("`{}` names two apps", app.id),
                "give each app its own id",
            );
        }
        if pusher.apps[..index]
            .iter()
            .any(|other| other.key == app.key)
        {
            ok = false;
            problem(
                &key("key"),
                format!("`{}` is the key of two apps", app.key),
                "give each app its own key",
            );
        }
        let secret = match &app.secret {
            Some(secret) if secret.len() >= 8 => Some(secret.clone()),
            Some(_) => {
                problem(
                    &key("secret"),
                    "shorter than 8 bytes: anyone could guess it".into(),
                    "use a random string, e.g. from `openssl rand -hex 20`",
                );
                None
            }
            None if app.secret_env.is_some() => None, // reported by find_secrets
            None => {
                problem(
                    &key("secret"),
                    "no secret signs this app's requests".into(),
                    "set pusher.apps[].secret, or secret_env to the variable that holds it",
                );
                None
            }
        };
        let webhook = match &app.webhook.url {
            None => None,
            Some(url) => match webhook_target(url, upstream) {
                Ok(target) => {
                    let mut kinds = [false; 6];
                    for kind in &app.webhook.events {
                        kinds[*kind as usize] = true;
                    }
                    Some(WebhookSettings { target, kinds })
                }
                Err(why) => {
                    ok = false;
                    problem(
                        &key("webhook.url"),
                        why,
                        "give the app's webhook endpoint as a path, e.g. /pusher/webhook",
                    );
                    None
                }
            },
        };
        if let (Some(secret), true) = (secret, ok) {
            apps.push(PusherAppSettings {
                id: app.id.clone(),
                key: app.key.clone(),
                secret,
                client_events: app.client_events,
                webhook,
            });
        }
    }
    if pusher.activity_timeout < Duration::from_secs(1) {
        problem(
            "pusher.activity_timeout",
            "shorter than a second".into(),
            "use e.g. 120s, as Pusher does",
        );
    }
    if pusher.client_events_per_second == 0 {
        problem(
            "pusher.client_events_per_second",
            "must be at least 1 (turn client events off with pusher.apps[].client_events)".into(),
            "use e.g. 10, as Pusher does",
        );
    }
    if !(1..=MAX_PUSHER_PRESENCE_MEMBERS).contains(&pusher.max_presence_members) {
        problem(
            "pusher.max_presence_members",
            format!(
                "{} is outside 1..={MAX_PUSHER_PRESENCE_MEMBERS}",
                pusher.max_presence_members
            ),
            "use e.g. 100, as Pusher does",
        );
    }
    if pusher.max_event_size.bytes() == 0 {
        problem(
            "pusher.max_event_size",
            "must be larger than zero".into(),
            "use e.g. 10KiB, as Pusher does",
        );
    }
    apps
}
