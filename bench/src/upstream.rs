//! `pushgate-bench upstream`: the app behind the proxy, made as cheap as
//! possible so that a benchmark measures the proxy and not the app.
//!
//! Every request, whatever its method or path, is answered `200` with the
//! same small JSON body and `content-type: application/json`, over HTTP/1.1
//! keep-alive, on a multi-threaded tokio runtime. Once bound, it prints
//! `listening on ADDR` on stdout, so a script can ask for port 0 and read the
//! port it got.

use std::convert::Infallible;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Args as ClapArgs;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

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

/// Reads the request body (if any), so the connection stays reusable, and
/// answers with [`BODY`].
async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // An error here means the client went away; the answer is moot then.
    let _ = request.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
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
