//! A request pushgate makes to the app on a client's behalf (the auth
//! request and its refresh and subscribe checks, `rpc`, a publish the app
//! decides on): a JSON body POSTed with the connection's forwarded headers
//! over the proxy's kept-alive connections, and an answer of bounded size
//! read within a deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Collected, Limited};
use tokio::sync::Semaphore;

use super::AppClient;
use crate::body::{Body, BoxError};
use crate::error::error_chain;
use crate::timer;

/// The app's client and the budget of files its connections draw on.
#[derive(Clone)]
pub struct AppCalls {
    client: AppClient,
    files: Arc<Semaphore>,
}

/// The app's answer, read whole.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why a call got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the open-file limit is spent on connections")]
    NoFiles,
    #[error("no answer within the timeout")]
    NoAnswer,
    #[error("{0}")]
    Failed(String),
    #[error("the answer could not be read or was too large")]
    Unreadable,
    #[error("the answer's body did not arrive in time")]
    BodyLate,
}

impl AppCalls {
    pub fn new(client: AppClient, files: Arc<Semaphore>) -> AppCalls {
        AppCalls { client, files }
    }

    /// POSTs `body` to `target` with `headers`. The answer's head must
    /// arrive within `timeout`, and its body (at most `max_answer` bytes)
    /// within `timeout` after that.
    pub async fn post(
        &self,
        target: &str,
        headers: &HeaderMap,
        body: &[u8],
        timeout: Duration,
        max_answer: usize,
    ) -> Result<Answer, CallError> {
        let Ok(file) = self.files.clone().try_acquire_owned() else {
            return Err(CallError::NoFiles);
        };
        // Every call is JSON both ways. Added here, not kept in each
        // connection's credentials: a connection holds no header map of its
        // own unless the app's auth forwards some of its headers.
        let mut added = super::Added::default();
        for name in [http::header::CONTENT_TYPE, http::header::ACCEPT] {
            if !headers.contains_key(&name) {
                added.push(name, http::HeaderValue::from_static("application/json"));
            }
        }
        let sent = self
            .client
            .send_full(&Method::POST, target, headers, &added, body, file);
        let response = match timer::within(timeout, sent).await {
            None => return Err(CallError::NoAnswer),
            Some(Err(err)) => return Err(CallError::Failed(error_chain(&err))),
            Some(Ok(response)) => response,
        };
        let (head, body) = response.into_parts();
        match timer::within(timeout, collect_at_most(body, max_answer)).await {
            Some(Ok(collected)) => Ok(Answer {
                status: head.status,
                headers: head.headers,
                body: collected.to_bytes(),
            }),
            Some(Err(_)) => Err(CallError::Unreadable),
            None => Err(CallError::BodyLate),
        }
    }
}

/// The whole of `body`, failing past `max` bytes. Named, with `Send` in
/// its type: rustc cannot prove `Limited`'s future `Send` for every
/// lifetime when it is written inside the spawned future that awaits it.
pub fn collect_at_most(
    body: Body,
    max: usize,
) -> impl Future<Output = Result<Collected<Bytes>, BoxError>> + Send {
    Limited::new(body, max).collect()
}
