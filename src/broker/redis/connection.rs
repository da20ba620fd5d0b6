//! Reaching Redis for commands: one server through a connection manager,
//! or a Redis Cluster routed by slot; and which failures mean a command
//! never ran.

use redis::aio::ConnectionManager;
use redis::{Client, Value};
use tokio::sync::mpsc;

use super::url::read_ca_file;
use super::RedisOptions;
use crate::broker::BrokerError;

/// The connection commands go through: one server, or a Redis Cluster
/// (commands routed by key slot).
#[derive(Clone)]
pub(super) enum Commands {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Commands::Single(conn) => conn.req_packed_command(cmd),
            Commands::Cluster(conn) => conn.req_packed_command(cmd),
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
            Commands::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Commands::Single(conn) => conn.get_db(),
            Commands::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Makes the command connection: a connection manager (lazy, reconnecting)
/// for one server; a cluster connection, made on first use and remade after
/// it failed, for a cluster.
pub(super) enum Connector {
    Single(ConnectionManager),
    Cluster(Box<LazyCluster>),
}

pub(super) struct LazyCluster {
    pub(super) client: redis::cluster::ClusterClient,
    pub(super) conn: tokio::sync::Mutex<Option<redis::cluster_async::ClusterConnection>>,
}

impl Connector {
    pub(super) async fn get(&self) -> redis::RedisResult<Commands> {
        match self {
            Connector::Single(manager) => Ok(Commands::Single(manager.clone())),
            Connector::Cluster(lazy) => {
                let mut conn = lazy.conn.lock().await;
                if let Some(conn) = conn.as_ref() {
                    return Ok(Commands::Cluster(conn.clone()));
                }
                let made = lazy.client.get_async_connection().await?;
                *conn = Some(made.clone());
                Ok(Commands::Cluster(made))
            }
        }
    }
}

/// client whose pub/sub messages go there.
pub(super) fn cluster_client(
    options: &RedisOptions,
    pushes: Option<mpsc::UnboundedSender<redis::PushInfo>>,
) -> Result<redis::cluster::ClusterClient, String> {
    if options.url.starts_with("rediss://") {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let mut builder = redis::cluster::ClusterClientBuilder::new(vec![options.url.as_str()])
        .connection_timeout(options.connect_timeout)
        .response_timeout(options.command_timeout)
        .use_protocol(redis::ProtocolVersion::RESP3);
    if let Some(file) = &options.tls_ca_file {
        builder = builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(read_ca_file(file)?),
        });
    }
    if let Some(pushes) = pushes {
        builder = builder.push_sender(pushes);
    }
    builder
        .build()
        .map_err(|err| format!("engine.redis.url: {err}"))
}

pub(super) fn client(options: &RedisOptions) -> Result<Client, String> {
    if options.url.starts_with("rediss://") {
        // rustls needs a process-wide provider; pushgate uses ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let client = match &options.tls_ca_file {
        Some(file) => Client::build_with_tls(
            options.url.as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(read_ca_file(file)?),
            },
        ),
        None => Client::open(options.url.as_str()),
    };
    client.map_err(|err| format!("engine.redis.url: {err}"))
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
