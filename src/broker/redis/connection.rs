//! Reaching Redis for commands: one server through a connection manager,
//! or a Redis Cluster routed by slot; and which failures mean a command
//! never ran.

use redis::aio::ConnectionManager;
use redis::{Client, ScriptInvocation, Value};
use std::sync::Arc;
use std::time::Duration;

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
            Commands::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Commands::Asking(conn) => Box::pin(async move {
                let mut asking = redis::pipe();
                asking.cmd("ASKING");
                for cmd in pipeline.cmd_iter() {
                    asking.add_command(cmd.clone());
                }
                conn.req_packed_commands(&asking, offset + 1, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Commands::Single(conn) | Commands::Asking(conn) => conn.get_db(),
        }
    }
}

/// Runs a script and then `WAIT`s until `replicas` replicas confirm they
/// hold what it wrote, or `timeout` passes: both in one write on one
/// connection, so the `WAIT` counts from this script's write (Redis waits
/// for everything the connection wrote before it). Answers the script's
/// reply and how many replicas confirmed.
pub(super) async fn invoke_replicated(
    invocation: &ScriptInvocation<'_>,
    replicas: u32,
    timeout: Duration,
    conn: &mut Commands,
) -> redis::RedisResult<(Value, u32)> {
    let mut pipeline = redis::pipe();
    pipeline
        .ignore_errors()
        .invoke_script(invocation)
        .cmd("WAIT")
        .arg(replicas)
        .arg(timeout.as_millis().max(1) as u64);
    let mut loaded = false;
    loop {
        let replies: Vec<Value> = pipeline.query_async(conn).await?;
        let [reply, confirmed] = <[Value; 2]>::try_from(replies).map_err(|_| {
            redis::RedisError::from((
                redis::ErrorKind::Parse,
                "WAIT after a script: not two replies",
            ))
        })?;
        match reply {
            // Nothing ran: the server lacks the script (restarted, or a new
            // master). Load it, and once more.
            Value::ServerError(err)
                if !loaded && err.kind() == Some(redis::ServerErrorKind::NoScript) =>
            {
                invocation.load_async(conn).await?;
                loaded = true;
            }
            Value::ServerError(err) => return Err(err.into()),
            reply => {
                let confirmed = match confirmed {
                    Value::Int(n) => u32::try_from(n).unwrap_or(0),
                    Value::ServerError(err) => return Err(err.into()),
                    other => {
                        return Err(redis::RedisError::from((
                            redis::ErrorKind::UnexpectedReturnType,
                            "WAIT answered",
                            format!("{other:?}"),
                        )))
                    }
                };
                return Ok((reply, confirmed));
            }
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
