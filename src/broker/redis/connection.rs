//! Reaching Redis for commands: one server through a connection manager,
//! or a Redis Cluster routed by slot; and which failures mean a command
//! never ran.

use redis::aio::ConnectionManager;
use redis::{Client, Value};
use std::sync::Arc;

use super::router::Router;
use super::RedisOptions;
use crate::broker::BrokerError;

/// The connection a command goes through: the one server's, or the
/// connection to the cluster master serving the command's slot; `Asking`
/// sends each command after `ASKING`, in one write, for a slot that is
/// being imported by that master.
#[derive(Clone)]
pub(super) enum Commands {
    Single(ConnectionManager),
    Asking(ConnectionManager),
}

impl redis::aio::ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Commands::Single(conn) => conn.req_packed_command(cmd),
            Commands::Asking(conn) => Box::pin(async move {
                let mut pipeline = redis::pipe();
                pipeline.cmd("ASKING").add_command(cmd.clone());
                let mut replies = conn.req_packed_commands(&pipeline, 1, 1).await?;
                replies.pop().ok_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::Io, "no reply after ASKING"))
                })
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Commands::Single(conn) | Commands::Asking(conn) => {
                conn.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Commands::Single(conn) | Commands::Asking(conn) => conn.get_db(),
        }
    }
}

/// Where commands go: one server's connection manager (lazy,
/// reconnecting), or a cluster's router (one such connection per master).
pub(super) enum Connector {
    Single(ConnectionManager),
    Cluster(Arc<Router>),
}

/// A client for one server at `url`, with the configured CA.
pub(super) fn client_for(options: &RedisOptions, url: &str) -> Result<Client, String> {
    if url.starts_with("rediss://") {
        // rustls needs a process-wide provider; pushgate uses ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let client = match &options.tls_ca {
        Some(pem) => Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            },
        ),
        None => Client::open(url),
    };
    client.map_err(|err| format!("engine.redis.url: {err}"))
}

pub(super) fn client(options: &RedisOptions) -> Result<Client, String> {
    client_for(options, &options.url)
}

/// Server errors that refuse a command before it runs.
const REFUSED_BEFORE_RUNNING: &[&str] = &[
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
    "OOM",
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "BUSY",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "MOVED",
    "ASK",
    "MISCONF",
];

/// Classifies a failed command: nothing happened, or perhaps something did.
pub(super) fn failure(err: &redis::RedisError, may_have_run: bool) -> BrokerError {
    let text = err.to_string();
    let refused = err.is_connection_refusal()
        || err.kind() == redis::ErrorKind::AuthenticationFailed
        || err
            .code()
            .is_some_and(|code| REFUSED_BEFORE_RUNNING.contains(&code));
    if !may_have_run || refused {
        BrokerError::Unavailable(text)
    } else {
        BrokerError::OutcomeUnknown(text)
    }
}
