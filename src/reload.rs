//! Live reload: `SIGHUP` reads the config file again and a running node
//! takes what can change without dropping a connection.
//!
//! A new config is taken whole or not at all: one with any problem is
//! refused, every problem logged, and the running config stays. Taken
//! live: `api.keys` and the API's publish rate, `realtime` (origins, limits
//! and timings, except `realtime.prefix`), `auth` (mode, JWT keys and JWKS,
//! the app's auth paths; the grant cache starts empty), `channels` and
//! `log.level`. Open connections keep their grants and subscriptions; a
//! limit or timing reaches them when they next read it, a rule reaches new
//! subscriptions. What the listeners, the engine and the queues were built
//! from stays as started; a change there is named in the log, to be taken
//! by a restart ([`NOT_LIVE`]).

use std::path::PathBuf;
use std::sync::Arc;

use crate::api::Api;
use crate::app::AppCalls;
use crate::auth::Auth;
use crate::channels::{ChannelRules, Channels};
use crate::config::{Config, Settings};
use crate::transport::Realtime;

/// Reads one part of a config, to compare.
type Read = fn(&Config) -> serde_yaml::Value;

/// The keys a running node cannot take, each with how to read it from a
/// config.
pub const NOT_LIVE: [(&str, Read); 19] = [
    ("listen", |c| value(&c.listen)),
    ("tls", |c| value(&c.tls)),
    ("upstream", |c| value(&c.upstream)),
    ("api.listen", |c| value(&c.api.listen)),
    ("api.insecure_no_auth", |c| value(&c.api.insecure_no_auth)),
    ("api.max_body", |c| value(&c.api.max_body)),
    ("api.idempotency_window", |c| {
        value(&c.api.idempotency_window)
    }),
    ("api.max_connections", |c| value(&c.api.max_connections)),
    ("realtime.prefix", |c| value(&c.realtime.prefix)),
    ("engine", |c| value(&c.engine)),
    ("history", |c| value(&c.history)),
    ("shutdown", |c| value(&c.shutdown)),
    ("limits", |c| value(&c.limits)),
    ("fast_paths", |c| value(&c.fast_paths)),
    ("events", |c| value(&c.events)),
    ("rpc", |c| value(&c.rpc)),
    ("pusher", |c| value(&c.pusher)),
    ("log.format", |c| value(&c.log.format)),
    ("log.access", |c| value(&c.log.access)),
];

fn value(part: &impl serde::Serialize) -> serde_yaml::Value {
    serde_yaml::to_value(part).unwrap_or(serde_yaml::Value::Null)
}

/// Hands a new config to the parts of a running node.
pub struct Reloader {
    api: Arc<Api>,
    realtime: Arc<Realtime>,
    channels: Arc<Channels>,
    calls: AppCalls,
    /// The config the node started with: what is not live stays as here.
    started: Config,
}

impl Reloader {
    pub fn new(
        api: Arc<Api>,
        realtime: Arc<Realtime>,
        channels: Arc<Channels>,
        calls: AppCalls,
        started: Config,
    ) -> Reloader {
        Reloader {
            api,
            realtime,
            channels,
            calls,
            started,
        }
    }

    /// Takes what `settings` may change live; returns the keys that
    /// changed but wait for a restart. Must be called within the node's
    /// runtime.
    pub fn apply(&self, settings: &Settings) -> Vec<&'static str> {
        let config = &settings.config;
        self.api.reload(config);
        self.realtime
            .reload(settings, Auth::new(settings, self.calls.clone()));
        self.channels.reload(ChannelRules::new(&config.channels));
        crate::logging::set_level(settings);
        NOT_LIVE
            .iter()
            .filter(|(_, read)| read(&self.started) != read(config))
            .map(|(key, _)| *key)
            .collect()
    }
}

/// Reads `path` again at each `SIGHUP` (with the process's environment
/// laid over it, as at start) and hands a config without problems to
/// `reloader`. Runs until the process ends.
pub async fn on_hangup(path: PathBuf, reloader: Arc<Reloader>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("SIGHUP cannot be caught here: no live reload");
        return;
    };
    while hangups.recv().await.is_some() {
        reload(&path, &reloader);
    }
}

/// One reload from `path`: taken whole, or refused whole and logged.
pub fn reload(path: &std::path::Path, reloader: &Reloader) {
    match crate::config::load(path, std::env::vars()) {
        Err(err) => {
            for problem in &err.problems {
                tracing::error!(
                    key = %problem.key,
                    origin = %problem.origin,
                    why = %problem.why,
                    fix = %problem.fix,
                    "config reload refused: the running config stays"
                );
            }
        }
        Ok(settings) => {
            let waiting = reloader.apply(&settings);
            if waiting.is_empty() {
                tracing::info!(file = %path.display(), "config reloaded");
            } else {
                tracing::warn!(
                    file = %path.display(),
                    restart_needed = ?waiting,
                    "config reloaded; these keys changed but are taken only by a restart"
                );
            }
        }
    }
}
