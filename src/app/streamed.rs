//! Uploads and upgrades: requests whose body streams from the client as it
//! arrives, and WebSocket upgrades to the app's own paths, each over
//! hyper's HTTP/1 client on one connection.
//!
//! An upload takes a connection from the pool (or a new one) and hands it
//! back under the pool's rule ([`super::pool::Outcome`]) once both the
//! request and the answer have ended: its body polled to the end, hyper's
//! connection finished without error, the answer's body read to the end of
//! its framing. An upgrade attempt always opens a connection of its own and
//! never hands it back, whatever the app answered.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::h1::{framing, keeps_alive, AppClient, Framing, MAX_HEAD, MAX_HEADERS};
use super::pool::{Conn, Outcome};
use crate::body::{self, Body, BoxError};
use crate::error::ProxyError;

/// The app's answer to a streamed request.
pub enum Answer {
    /// The app switched protocols: hyper hands over the connection through
    /// `hyper::upgrade::on`, and `file` stays with the tunnel.
    Switched {
        response: Response<Incoming>,
        file: Arc<OwnedSemaphorePermit>,
    },
    /// Any other answer, its body streaming from the app.
    Plain(Response<Body>),
}

/// Sends `request` to the app: an origin-form target, with `Host` and the
/// framing fields pushgate wrote itself. `upload` tracks the request body;
/// `None` makes this an upgrade attempt, on a connection never reused.
/// `file` is held as long as the connection is open.
pub async fn send(
    app: &AppClient,
    request: Request<Body>,
    upload: Option<Arc<UploadState>>,
    file: OwnedSemaphorePermit,
) -> Result<Answer, ProxyError> {
    let file = Arc::new(file);
    let pooled = upload.as_ref().and_then(|_| app.pool().checkout());
    let reused = pooled.is_some();
    let conn = match pooled {
        Some(conn) => conn,
        None => app.connect().await?,
    };
    // A request without a body and safe to repeat can be sent again as it
    // was, as the lean client does (RFC 9110 §9.2.2).
    let again = (reused && request.method().is_idempotent() && request.body().is_end_stream())
        .then(|| copy_bodiless(&request));
    let retry = match attempt(app, conn, request, upload.clone(), file.clone()).await {
        Ok(answer) => return Ok(answer),
        // A kept-alive connection the app closed while it sat idle: the
        // request never left, so it goes on a new connection.
        Err(Attempt::Unsent(request)) if reused => *request,
        // The app closed it with no answer: it may have acted on the
        // request, so only one safe to repeat goes again.
        Err(Attempt::Unanswered(_)) if again.is_some() => again.expect("checked"),
        Err(Attempt::Unsent(_)) => {
            return Err(ProxyError::UpstreamFailed(
                "the app closed the connection before the request was sent".into(),
            ))
        }
        Err(Attempt::Unanswered(err)) => return Err(ProxyError::UpstreamFailed(err.into())),
        Err(Attempt::Failed(err)) => return Err(err),
    };
    let conn = app.connect().await?;
    match attempt(app, conn, retry, upload, file).await {
        Ok(answer) => Ok(answer),
        Err(Attempt::Unsent(_)) => Err(ProxyError::UpstreamFailed(
            "the app closed a new connection before the request was sent".into(),
        )),
        Err(Attempt::Unanswered(err)) => Err(ProxyError::UpstreamFailed(err.into())),
        Err(Attempt::Failed(err)) => Err(err),
    }
}

/// A bodiless request again, for a second attempt.
fn copy_bodiless(request: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(body::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// How an attempt on one connection failed.
enum Attempt {
    /// Nothing of the request was written; here it is back.
    Unsent(Box<Request<Body>>),
    /// The app closed the connection before a whole answer.
    Unanswered(hyper::Error),
    Failed(ProxyError),
}

async fn attempt(
    app: &AppClient,
    conn: Conn,
    request: Request<Body>,
    upload: Option<Arc<UploadState>>,
    file: Arc<OwnedSemaphorePermit>,
) -> Result<Answer, Attempt> {
    // The pool hands out only connections with nothing unread.
    debug_assert!(conn.buf.is_empty());
    let method = request.method().clone();
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        // The lean client's limits on an answer's head, so that both paths
        // refuse the same answers.
        .max_header_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .handshake::<_, Body>(TokioIo::new(conn.stream))
        .await
        .map_err(|err| Attempt::Failed(ProxyError::UpstreamFailed(err.into())))?;
    let (ended, answer_end) = oneshot::channel::<AnswerEnd>();
    match &upload {
        Some(upload) => {
            let pool = app.pool().clone();
            let upload = upload.clone();
            let file = file.clone();
            tokio::spawn(async move {
                let parts = connection.without_shutdown().await;
                // Known once the client's side is done with the answer.
                let answer = answer_end.await.unwrap_or_default();
                if let Ok(parts) = parts {
                    let outcome = Outcome {
                        request_whole: upload.is_complete(),
                        answer_whole: answer.whole,
                        keep_alive: answer.keep_alive,
                    };
                    let conn = Conn {
                        stream: parts.io.into_inner(),
                        buf: BytesMut::from(&parts.read_buf[..]),
                    };
                    pool.release(conn, outcome);
                }
                drop(file);
            });
        }
        None => {
            let file = file.clone();
            tokio::spawn(async move {
                let _ = connection.with_upgrades().await;
                drop(answer_end);
                drop(file);
            });
        }
    }

    let response = match sender.try_send_request(request).await {
        Ok(response) => response,
        Err(mut err) => {
            return Err(match err.take_message() {
                Some(request) => Attempt::Unsent(Box::new(request)),
                None if err.error().is_incomplete_message() => {
                    Attempt::Unanswered(err.into_error())
                }
                None => Attempt::Failed(ProxyError::UpstreamFailed(err.into_error().into())),
            })
        }
    };
    // The connection ends once this exchange has: one request per hand-out.
    drop(sender);

    if upload.is_none() && response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Answer::Switched { response, file });
    }
    let framed = match framing(response.status(), response.headers()) {
        _ if method == Method::HEAD => true,
        Ok(Framing::Close) | Err(_) => false,
        Ok(_) => true,
    };
    let minor = u8::from(response.version() == Version::HTTP_11);
    let keep_alive = keeps_alive(minor, response.headers());
    let (parts, incoming) = response.into_parts();
    let body = Watched {
        body: incoming,
        framed,
        keep_alive,
        ended: Some(ended),
    };
    Ok(Answer::Plain(Response::from_parts(
        parts,
        body::stream(body),
    )))
}

/// How the client's side ended with an answer.
#[derive(Debug, Clone, Copy, Default)]
struct AnswerEnd {
    /// Read to the end of its framing.
    whole: bool,
    keep_alive: bool,
}

/// The app's answer body on its way to the client, telling the
/// connection's task how it ended.
struct Watched {
    body: Incoming,
    /// The answer is framed by a length or chunks (not by the app closing).
    framed: bool,
    keep_alive: bool,
    ended: Option<oneshot::Sender<AnswerEnd>>,
}

impl Watched {
    fn end(&mut self, read_to_end: bool) {
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(AnswerEnd {
                whole: read_to_end && self.framed,
                keep_alive: self.keep_alive,
            });
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let read_to_end = self.body.is_end_stream();
        self.end(read_to_end);
    }
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            // Trailers come last; and the client may stop asking once the
            // body says it has ended.
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() || this.body.is_end_stream() => {
                this.end(true)
            }
            Poll::Ready(None) => this.end(true),
            Poll::Ready(Some(Err(_))) => this.end(false),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// How an upload to the app is going, shared between the request body
/// (which the app's connection polls), the request's deadline and the
/// connection's task.
#[derive(Default)]
pub struct UploadState(AtomicU8);

const PENDING: u8 = 0;
const COMPLETE: u8 = 1;
const STALLED: u8 = 2;
const CLIENT_ERROR: u8 = 3;

/// Why an upload failed on the client's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadFailure {
    /// No frame for `limits.body_timeout`.
    Stalled,
    /// The client's body failed (it went away mid-upload).
    ClientError,
}

impl UploadState {
    fn set(&self, state: u8) {
        // The first end wins: a body that completed cannot fail after.
        let _ = self
            .0
            .compare_exchange(PENDING, state, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Every frame of the body was taken, without error.
    pub fn is_complete(&self) -> bool {
        self.0.load(Ordering::Acquire) == COMPLETE
    }

    pub fn failure(&self) -> Option<UploadFailure> {
        match self.0.load(Ordering::Acquire) {
            STALLED => Some(UploadFailure::Stalled),
            CLIENT_ERROR => Some(UploadFailure::ClientError),
            _ => None,
        }
    }
}

/// The waits that bound an upload: the app has `timeout` to start taking
/// the body (connecting), and `timeout` to answer once it has all of it.
pub struct UploadProgress {
    /// Fires (or drops) when the app's connection first asks for the body.
    started: oneshot::Receiver<()>,
    /// Fires (or drops) when the body has been sent in full, or failed.
    finished: oneshot::Receiver<()>,
}

impl UploadProgress {
    /// Progress of a request with nothing to upload.
    pub fn done() -> UploadProgress {
        let (_, started) = oneshot::channel();
        let (_, finished) = oneshot::channel();
        UploadProgress { started, finished }
    }

    /// Resolves when the app has taken too long: `timeout` to start taking
    /// the body (connecting), or `timeout` after the body was sent. The
    /// upload in between goes at the client's pace, bounded by
    /// `limits.body_timeout` between frames.
    pub async fn deadline(self, timeout: Duration) {
        if tokio::time::timeout(timeout, self.started).await.is_err() {
            return;
        }
        let _ = self.finished.await;
        tokio::time::sleep(timeout).await
    }
}

/// The client's request body on its way to the app: reports when sending
/// starts and ends, and fails the upload when the client stalls.
pub struct UploadBody {
    inner: Body,
    idle: Duration,
    /// Armed while waiting for the client; re-armed lazily from
    /// `last_frame`, so a fast upload costs no timer work per frame.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    last_frame: tokio::time::Instant,
    started: Option<oneshot::Sender<()>>,
    finished: Option<oneshot::Sender<()>>,
    state: Arc<UploadState>,
}

impl UploadBody {
    /// Wraps the client's body; `idle` is `limits.body_timeout`.
    pub fn wrap(inner: Body, idle: Duration) -> (Body, UploadProgress, Arc<UploadState>) {
        let (started_tx, started) = oneshot::channel();
        let (finished_tx, finished) = oneshot::channel();
        let state = Arc::new(UploadState::default());
        if inner.is_end_stream() {
            // hyper never polls a body that says it has ended: it is whole
            // as it stands.
            state.set(COMPLETE);
        }
        let body = UploadBody {
            inner,
            idle,
            timer: None,
            last_frame: tokio::time::Instant::now(),
            started: Some(started_tx),
            finished: Some(finished_tx),
            state: state.clone(),
        };
        let progress = UploadProgress { started, finished };
        (http_body_util::BodyExt::boxed(body), progress, state)
    }

    fn finish(&mut self, state: u8) {
        self.state.set(state);
        if let Some(finished) = self.finished.take() {
            let _ = finished.send(());
        }
        self.timer = None;
    }
}

impl http_body::Body for UploadBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Some(started) = this.started.take() {
            let _ = started.send(());
            this.last_frame = tokio::time::Instant::now();
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_frame = tokio::time::Instant::now();
                if this.inner.is_end_stream() {
                    this.finish(COMPLETE);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                this.finish(CLIENT_ERROR);
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                this.finish(COMPLETE);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let deadline = this.last_frame + this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    this.finish(STALLED);
                    return Poll::Ready(Some(Err("the client's request body stalled".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
