//! `pushgate-bench upstream`: the app behind the proxy, made as cheap as
//! possible so that a benchmark measures the proxy and not the app.
//!
//! Every request, whatever its method or path, is answered `200` with the
//! same small JSON body and `content-type: application/json`, over HTTP/1.1
//! keep-alive, on a multi-threaded tokio runtime. Once bound, it prints
//! `listening on ADDR` on stdout, so a script can ask for port 0 and read the
//! port it got.
//!
//! The one exception is `POST /realtime/auth` (pushgate's `auth.mode:
//! upstream` grant request): a `session=<name>` cookie is answered
//! `200 {"user":"<name>","channels":["bench","user:<name>:*"],"expires_in":3600}`,
//! no such cookie `401`.
//!
//! Behind Pushpin it also plays a GRIP app (see [`grip`]): `GET /grip/sse?channel=<name>`
//! is answered with a stream hold on that channel, and WebSocket-over-HTTP
//! events (`Content-Type: application/websocket-events`, Pushpin's `over_http`
//! route) are answered by subscribing the connection to its `?channel=`.

use std::convert::Infallible;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Args as ClapArgs;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE, COOKIE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::grip;

/// The body of every response.
pub const BODY: &[u8] = br#"{"ok":true,"n":42}"#;

/// Pause after an accept error that is not about one connection (e.g. out of
/// open files), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// Runtime worker threads; defaults to one per CPU.
    #[arg(long)]
    threads: Option<usize>,
}

/// Builds the runtime and serves until the process is killed.
pub fn run(args: Args) -> io::Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    runtime.build()?.block_on(serve(args.listen))
}

async fn serve(listen: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    // Scripts wait for this line; say it once the port is really bound.
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "listening on {addr}")?;
    stdout.flush()?;
    drop(stdout);

    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream));
            }
            Err(err) if is_per_connection(&err) => {}
            Err(err) => {
                eprintln!("pushgate-bench upstream: accept failed: {err}; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    // Keep-alive is on by default; errors (a client that hung up) only end
    // this connection, and a benchmark has no use for them.
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service_fn(answer))
        .await;
}

/// The path pushgate POSTs grant requests to (`auth.upstream.path`).
pub const AUTH_PATH: &str = "/realtime/auth";

/// Reads the request body (if any), so the connection stays reusable, and
/// answers with [`BODY`], or with a grant for `POST` [`AUTH_PATH`].
async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some(hold) = grip::Hold::of(&request) {
        let events = request.into_body().collect().await.map(|b| b.to_bytes());
        return Ok(hold.answer(&events.unwrap_or_default()));
    }
    let grant = (request.method() == Method::POST && request.uri().path() == AUTH_PATH)
        .then(|| session(request.headers()));
    // An error here means the client went away; the answer is moot then.
    let _ = request.into_body().collect().await;
    let mut response = match grant {
        None => Response::new(Full::new(Bytes::from_static(BODY))),
        Some(Some(user)) => {
            let body = serde_json::json!({
                "user": user,
                "channels": ["bench", format!("user:{user}:*")],
                "expires_in": 3600,
            });
            Response::new(Full::new(Bytes::from(body.to_string())))
        }
        Some(None) => {
            let mut response = Response::new(Full::new(Bytes::from_static(
                br#"{"error":"no session cookie"}"#,
            )));
            *response.status_mut() = StatusCode::UNAUTHORIZED;
            response
        }
    };
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// The user named by a `session=<name>` cookie among these headers, if any:
/// the one decision behind every grant, pushgate's, Nchan's and Pushpin's.
pub fn session(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix("session="))
        .find(|name| !name.is_empty())
        .map(str::to_owned)
}

/// Accept errors that concern only the connection being accepted.
fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}
