//! An app that takes pushgate's connection events: it records every batch
//! POSTed to [`EVENTS_PATH`] with its signature header, answers it with the
//! status the test sets (200 until told otherwise, so a test can play an app
//! that is down). As the auth endpoint ([`AUTH_PATH`]) it grants user `42`
//! every channel; it answers anything else 200.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ring::hmac;
use serde_json::Value;
use tokio::net::TcpListener;

/// Where the app takes events.
pub const EVENTS_PATH: &str = "/realtime/events";
/// Where the app answers auth requests.
pub const AUTH_PATH: &str = "/realtime/auth";
/// The secret the tests sign with: 32 bytes.
pub const SECRET: &str = "test-secret-0123456789abcdef0123";

/// One batch as the app read it, and what it answered.
#[derive(Debug, Clone)]
pub struct Batch {
    pub signature: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    pub answered: u16,
}

impl Batch {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a batch is JSON")
    }

    pub fn events(&self) -> Vec<Value> {
        self.json()["events"].as_array().expect("events").clone()
    }

    /// Whether the signature header is `sha256=<hex HMAC-SHA256(SECRET,
    /// body)>`, checked as an app would: in constant time, by ring.
    pub fn signature_verifies(&self) -> bool {
        let Some(hex) = self
            .signature
            .as_deref()
            .and_then(|s| s.strip_prefix("sha256="))
        else {
            return false;
        };
        let Some(tag) = decode_hex(hex) else {
            return false;
        };
        let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
        hmac::verify(&key, &self.body, &tag).is_ok()
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The app, on `127.0.0.1:0`; stops when dropped.
pub struct EventsApp {
    pub addr: SocketAddr,
    batches: Arc<Mutex<Vec<Batch>>>,
    status: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EventsApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EventsApp {
    pub async fn start() -> EventsApp {
        EventsApp::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// The app on `addr`: a port pushgate was pointed at before the app
    /// listened there.
    pub async fn start_on(addr: SocketAddr) -> EventsApp {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let batches: Arc<Mutex<Vec<Batch>>> = Arc::default();
        let status = Arc::new(AtomicU16::new(200));
        let (record, answer) = (batches.clone(), status.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (record, answer) = (record.clone(), answer.clone());
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request| serve(request, record.clone(), answer.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        EventsApp {
            addr,
            batches,
            status,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the events path answers from now on.
    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Every batch received so far, in order.
    pub fn batches(&self) -> Vec<Batch> {
        self.batches.lock().unwrap().clone()
    }

    /// The events of the batches answered 2xx, in order.
    pub fn accepted_events(&self) -> Vec<Value> {
        self.batches()
            .iter()
            .filter(|batch| (200..300).contains(&batch.answered))
            .flat_map(Batch::events)
            .collect()
    }
}

async fn serve(
    request: Request<Incoming>,
    batches: Arc<Mutex<Vec<Batch>>>,
    status: Arc<AtomicU16>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() == AUTH_PATH {
        let grant = r#"{"user": "42", "channels": ["*"]}"#;
        return Ok(Response::new(Full::new(Bytes::from(grant))));
    }
    if request.uri().path() != EVENTS_PATH {
        return Ok(Response::new(Full::new(Bytes::from("hello from the app"))));
    }
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("").to_owned())
    };
    let signature = header("x-pushgate-signature");
    let content_type = header("content-type");
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let answered = status.load(Ordering::SeqCst);
    batches.lock().unwrap().push(Batch {
        signature,
        content_type,
        body,
        answered,
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::from_u16(answered).unwrap();
    Ok(response)
}
