//! JWT keys from a JWKS document (`auth.jwt.jwks_url`), served over real
//! HTTPS by a test server with its own CA: tokens signed with a listed key
//! pass, others are refused, a rotated key is picked up, made-up kids
//! cannot hammer the JWKS server, and no keys means "try again", never a
//! pass.

use crate::common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use common::{Pushgate, TempDir, Upstream, PATIENCE};
use futures_util::StreamExt;
use http::StatusCode;
use http_body_util::Full;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// An ES256 signing key and its public JWK.
struct Key {
    pair: rcgen::KeyPair,
    kid: String,
}

impl Key {
    fn new(kid: &str) -> Key {
        Key {
            pair: rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
            kid: kid.to_owned(),
        }
    }

    fn jwk(&self) -> Value {
        // An uncompressed P-256 point: 0x04, x, y.
        let point = self.pair.public_key_raw();
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65]),
               "kid": self.kid, "use": "sig", "alg": "ES256"})
    }

    /// A token for `user`, signed with this key but naming `kid`.
    fn token_as(&self, kid: &str, user: &str) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(
            &header,
            &json!({"sub": user, "exp": exp, "channels": ["chat:*"]}),
            &jsonwebtoken::EncodingKey::from_ec_pem(self.pair.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn token(&self, user: &str) -> String {
        self.token_as(&self.kid, user)
    }
}

/// An HTTPS server for one JWKS document, counting requests.
struct JwksServer {
    addr: SocketAddr,
    document: Arc<Mutex<String>>,
    requests: Arc<AtomicU64>,
    ca_file: std::path::PathBuf,
    _dir: TempDir,
}

impl JwksServer {
    async fn start(keys: &[&Key]) -> JwksServer {
        let dir = TempDir::new("jwks");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "jwks test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "127.0.0.1");
        let leaf = params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let ca_file = dir.0.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let document = Arc::new(Mutex::new(String::new()));
        let requests = Arc::new(AtomicU64::new(0));
        let (doc, count) = (document.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, doc, count) = (acceptor.clone(), doc.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |_request| {
                        count.fetch_add(1, Ordering::SeqCst);
                        let body = doc.lock().unwrap().clone();
                        async move {
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let server = JwksServer {
            addr,
            document,
            requests,
            ca_file,
            _dir: dir,
        };
        server.serve(keys);
        server
    }

    fn serve(&self, keys: &[&Key]) {
        let keys: Vec<Value> = keys.iter().map(|key| key.jwk()).collect();
        *self.document.lock().unwrap() = json!({ "keys": keys }).to_string();
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    fn url(&self) -> String {
        format!(
            "https://127.0.0.1:{}/.well-known/jwks.json",
            self.addr.port()
        )
    }
}

async fn gate(app: &Upstream, url: &str, ca_file: &std::path::Path) -> Pushgate {
    Pushgate::start(
        &app.url(),
        &format!(
            "auth:\n  mode: jwt\n  jwt:\n    algorithm: ES256\n    jwks_url: \"{url}\"\n    jwks_ca_file: {}\n    jwks_min_refetch: 300ms\n",
            ca_file.display()
        ),
    )
    .await
}

/// What a WebSocket connection with `token` comes to: `None` while open
/// (it answered a ping), or the close code.
async fn ws_outcome(gate: &Pushgate, token: &str) -> Option<u16> {
    let mut client = common::ws_connect(gate.addr, &format!("?token={token}")).await;
    let _ = futures_util::SinkExt::send(
        &mut client,
        Message::text(json!({"id": 1, "op": "ping"}).to_string()),
    )
    .await;
    loop {
        match tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("an answer in time")
        {
            Some(Ok(Message::Text(_))) => return None,
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code.into()),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Some(0),
        }
    }
}

/// The status of an SSE request with `token`.
async fn sse_status(gate: &Pushgate, token: &str) -> StatusCode {
    let request = http::Request::get(gate.url("/realtime/sse?channel=chat:1"))
        .header("authorization", format!("Bearer {token}"))
        .header("accept", "text/event-stream")
        .body(common::empty_body())
        .unwrap();
    common::client().request(request).await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_keys_pass_others_are_refused_and_rotation_is_picked_up() {
    let (k1, k2, stranger) = (Key::new("k1"), Key::new("k2"), Key::new("k1"));
    let jwks = JwksServer::start(&[&k1]).await;
    let app = Upstream::start().await;
    let gate = gate(&app, &jwks.url(), &jwks.ca_file).await;

    assert_eq!(
        ws_outcome(&gate, &k1.token("ann")).await,
        None,
        "a listed key passes"
    );
    assert_eq!(sse_status(&gate, &k1.token("ann")).await, StatusCode::OK);
    // The right kid, the wrong key.
    assert_eq!(ws_outcome(&gate, &stranger.token("eve")).await, Some(4001));
    assert_eq!(
        sse_status(&gate, &stranger.token("eve")).await,
        StatusCode::UNAUTHORIZED
    );
    // An unknown kid.
    assert_eq!(ws_outcome(&gate, &k2.token("bob")).await, Some(4001));

    // The provider rotates in k2: after the refetch interval it is used.
    jwks.serve(&[&k1, &k2]);
    let deadline = Instant::now() + PATIENCE;
    while sse_status(&gate, &k2.token("bob")).await != StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "the rotated key was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ws_outcome(&gate, &k2.token("bob")).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_kids_cannot_hammer_the_jwks_server() {
    let k1 = Key::new("k1");
    let jwks = JwksServer::start(&[&k1]).await;
    let app = Upstream::start().await;
    let gate = gate(&app, &jwks.url(), &jwks.ca_file).await;
    assert_eq!(sse_status(&gate, &k1.token("ann")).await, StatusCode::OK);

    let before = jwks.requests();
    let started = Instant::now();
    for n in 0..40 {
        let token = k1.token_as(&format!("random-{n}"), "eve");
        assert_eq!(sse_status(&gate, &token).await, StatusCode::UNAUTHORIZED);
    }
    let spent = started.elapsed();
    let fetched = jwks.requests() - before;
    // At most one fetch per jwks_min_refetch (300 ms), plus the one due.
    let allowed = spent.as_millis() as u64 / 300 + 2;
    assert!(
        fetched <= allowed,
        "{fetched} fetches for 40 made-up kids in {spent:?} (at most {allowed})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_connections_are_told_to_try_again_never_let_in() {
    let k1 = Key::new("k1");
    let jwks = JwksServer::start(&[&k1]).await;
    // Nothing listens here.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let app = Upstream::start().await;
    let gate = gate(
        &app,
        &format!("https://127.0.0.1:{port}/jwks.json"),
        &jwks.ca_file,
    )
    .await;
    assert_eq!(
        sse_status(&gate, &k1.token("ann")).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(ws_outcome(&gate, &k1.token("ann")).await, Some(1013));
}

#[test]
fn jwks_settings_are_checked() {
    let check = |jwt: &str| {
        let yaml = format!("api:\n  keys: [k]\nauth:\n  mode: jwt\n  jwt:\n{jwt}");
        match pushgate::config::from_yaml(&yaml, "t.yaml", Vec::<(String, String)>::new()) {
            Ok(_) => Vec::new(),
            Err(err) => err.problems.into_iter().map(|p| p.key).collect(),
        }
    };
    // HS256 has no use for a JWKS document.
    let hs = check("    algorithm: HS256\n    secret: an-hs256-secret-of-at-least-32-bytes!\n    jwks_url: https://id.example.com/jwks\n");
    assert!(hs.iter().any(|k| k.contains("auth.jwt.jwks_url")), "{hs:?}");
    // Plain http only on loopback.
    let plain = check("    algorithm: RS256\n    jwks_url: http://id.example.com/jwks\n");
    assert!(
        plain.iter().any(|k| k.contains("auth.jwt.jwks_url")),
        "{plain:?}"
    );
    let local = check("    algorithm: RS256\n    jwks_url: http://127.0.0.1:9/jwks\n");
    assert!(local.is_empty(), "{local:?}");
    // One source of keys.
    let both = check("    algorithm: ES256\n    jwks_url: https://id.example.com/jwks\n    public_key_file: /nope.pem\n");
    assert!(
        both.iter().any(|k| k.contains("auth.jwt.jwks_url")),
        "{both:?}"
    );
}
