//! `pushgate demo`: pushgate on the memory engine (or Redis) in front of a
//! small built-in app, so a newcomer sees push work with one command.
//!
//! The app runs in this process on its own ephemeral `127.0.0.1` port and is
//! pushgate's upstream, exactly as a real app would be:
//!
//! - `GET /` and `GET /demo.js`: a chat and notifications page that loads
//!   the browser client from pushgate (`/realtime/client.js`): no CDN, so it
//!   works offline.
//! - `POST /login`, `POST /logout`, `GET /me`: a toy login, a cookie holding
//!   the user's name (no password, not signed: a demo on loopback only).
//! - `POST /realtime/auth`: pushgate's auth request (`auth.mode: upstream`),
//!   answered from that cookie: the lobby, its typing channel and the user's
//!   own channels.
//! - `POST /say`, `POST /notify`, `GET /history`: publish and read history
//!   through pushgate's API with its key, as an app's backend does.
//! - `POST /rpc`: the pages' `rpc` calls, which pushgate passes on
//!   (`rpc.path`): `online` answers who is in the lobby, from pushgate's
//!   presence.
//!
//! Pages publish on the typing channel themselves (`publish: direct`,
//! `ephemeral`: heard by who is there, never stored): the app is not
//! involved, and pushgate sets the publisher's user.
//!
//! Both listeners must be loopback addresses: the toy login lets anyone be
//! anyone.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::body::Body;
use crate::config::{AuthMode, ChannelRule, ClientPublish, Config, EngineKind, Settings};
use crate::error::Error;
use crate::Server;

/// Where the demo listens when not told otherwise: the contract's defaults.
pub const DEFAULT_LISTEN: &str = crate::config::DEFAULT_LISTEN;
pub const DEFAULT_API_LISTEN: &str = crate::config::DEFAULT_API_LISTEN;

/// The chat everyone logged in hears.
pub const LOBBY: &str = "chat:lobby";
/// Who is typing in the lobby: pages publish here themselves.
pub const TYPING: &str = "typing:lobby";
/// Where pushgate passes on the pages' `rpc` calls (only pushgate reaches it).
pub const RPC_PATH: &str = "/rpc";
/// The cookie of the toy login: the user's name.
const COOKIE: &str = "pushgate_demo_user";
/// Longest chat line.
const MAX_TEXT: usize = 500;
/// Largest form the app reads.
const MAX_FORM: usize = 16 * 1024;
/// Lobby publications the page loads before going live.
const HISTORY_LIMIT: u32 = 50;
/// How long the app waits for pushgate's API.
const API_TIMEOUT: Duration = Duration::from_secs(5);

const PAGE: &str = include_str!("demo/page.html");
const SCRIPT: &str = include_str!("demo/page.js");

/// What `pushgate demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// pushgate's public listener: the page's address.
    pub listen: SocketAddr,
    /// pushgate's API listener.
    pub api_listen: SocketAddr,
    /// Use the Redis engine at this URL instead of the memory engine.
    pub redis: Option<String>,
    /// The API key; made up at start when not given.
    pub api_key: Option<String>,
}

impl DemoOptions {
    /// Why these options cannot run, if they cannot.
    pub fn problem(&self) -> Option<String> {
        [("--listen", self.listen), ("--api-listen", self.api_listen)]
            .into_iter()
            .find(|(_, addr)| !addr.ip().is_loopback())
            .map(|(flag, addr)| {
                format!(
                    "{flag} {addr}: the demo's toy login lets anyone be anyone, so it listens on loopback only (e.g. 127.0.0.1:8080)"
                )
            })
    }

    /// pushgate's config for the demo, in front of the app at `app`.
    pub fn config(&self, app: SocketAddr, key: &str) -> Config {
        let mut config = Config {
            listen: self.listen,
            ..Config::default()
        };
        config.upstream.url = format!("http://{app}");
        config.api.listen = self.api_listen;
        config.api.keys = vec![key.to_owned()];
        config.auth.mode = AuthMode::Upstream;
        config.auth.upstream.forward_headers = vec!["cookie".to_owned()];
        config.rpc.path = Some(RPC_PATH.to_owned());
        config.channels = vec![
            // `online` lists the lobby's presence.
            ChannelRule {
                prefix: "chat:".to_owned(),
                presence: true,
                ..ChannelRule::default()
            },
            // Who is typing is news only now: never stored.
            ChannelRule {
                prefix: "typing:".to_owned(),
                publish: ClientPublish::Direct,
                ephemeral: true,
                ..ChannelRule::default()
            },
        ];
        if let Some(url) = &self.redis {
            config.engine.kind = EngineKind::Redis;
            config.engine.redis.url = url.clone();
        }
        config.shutdown.grace = Duration::from_secs(2);
        config.log.level = "warn".to_owned();
        config
    }
}

/// Runs the demo until `shutdown` resolves. `ready` is told the public and
/// API addresses and the API key once both listeners are bound.
pub async fn run(
    options: DemoOptions,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&Running),
) -> Result<(), Error> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let listener = TcpListener::bind(any)
        .await
        .map_err(|source| Error::Bind { addr: any, source })?;
    let app_addr = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr: any, source })?;
    let given = options.api_key.is_some();
    let key = options
        .api_key
        .clone()
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    let settings = Settings::new(options.config(app_addr, &key))?;
    let server = Server::bind(settings).await?;
    let running = Running {
        url: format!("http://{}/", server.local_addr()),
        api: format!("http://{}", server.api_addr()),
        key,
        key_given: given,
        engine: if options.redis.is_some() {
            "redis"
        } else {
            "memory"
        },
    };
    let app = Arc::new(App {
        api: running.api.clone(),
        key: running.key.clone(),
        client: Client::builder(TokioExecutor::new()).build_http(),
    });
    let serving = tokio::spawn(serve(listener, app));
    ready(&running);
    let result = server.run(shutdown).await;
    serving.abort();
    result
}

/// A running demo's addresses.
#[derive(Debug, Clone)]
pub struct Running {
    /// The page.
    pub url: String,
    /// pushgate's API.
    pub api: String,
    /// The API key, given or made up at start.
    pub key: String,
    /// The key was given (`--api-key`): the printed command outlives a
    /// restart.
    pub key_given: bool,
    pub engine: &'static str,
}

impl Running {
    /// What `pushgate demo` prints. Tests read the `open`, `api` and `key`
    /// lines.
    pub fn banner(&self) -> String {
        let Running {
            url,
            api,
            key,
            key_given,
            engine,
        } = self;
        let kept = if *key_given {
            ""
        } else {
            "          (a new one at each start; --api-key or PUSHGATE_DEMO_API_KEY keeps one)\n"
        };
        let engine = match *engine {
            "redis" => "redis: history survives a restart of pushgate",
            _ => "memory: one node; a restart loses history (pages get a reset)",
        };
        format!(
            "pushgate demo: open {url} in two windows (one private), log in, and chat.\n\
             \n  engine  {engine}\n  api     {api}\n  key     {key}\n{kept}\
             \nPublish from a terminal:\n  curl -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n    \
             -d '{{\"channel\": \"{LOBBY}\", \"event\": \"message\", \"data\": {{\"from\": \"curl\", \"text\": \"hello\"}}}}' \\\n    \
             {api}/api/publish\n\nCtrl-C stops it.\n"
        )
    }
}

/// The demo app: pushgate's upstream.
struct App {
    api: String,
    key: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

async fn serve(listener: TcpListener, app: Arc<App>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of files or similar: pushgate's own accept loop logs it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.handle(request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

impl App {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let user = user(request.headers());
        let method = request.method().clone();
        if method == Method::POST && !same_origin(request.headers()) {
            return answer(
                StatusCode::FORBIDDEN,
                json!({"error": "cross-site request"}),
            );
        }
        match (method, request.uri().path()) {
            (Method::GET, "/") => file(PAGE, "text/html; charset=utf-8"),
            (Method::GET, "/demo.js") => file(SCRIPT, "text/javascript; charset=utf-8"),
            (Method::GET, "/me") => answer(StatusCode::OK, json!({ "user": user })),
            (Method::GET, "/history") => {
                let path = format!("/api/history?channel={LOBBY}&limit={HISTORY_LIMIT}");
                self.api_call(Method::GET, &path, None).await
            }
            (Method::POST, "/login") => match form(request).await.get("name") {
                Some(name) if valid_name(name) => redirect(Some(name)),
                _ => answer(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "a name is 1 to 32 of A-Z a-z 0-9 _ -"}),
                ),
            },
            (Method::POST, "/logout") => {
                if let Some(user) = &user {
                    // Close the user's realtime connections, and forget
                    // their cached grants.
                    let body = json!({"user": user, "reason": "logged out"});
                    let _ = self
                        .api_call(Method::POST, "/api/disconnect", Some(body))
                        .await;
                }
                redirect(None)
            }
            // pushgate asks who a realtime connection is.
            (Method::POST, "/realtime/auth") => match user {
                Some(user) => answer(
                    StatusCode::OK,
                    json!({
                        "user": user,
                        "channels": [LOBBY, TYPING, format!("user:{user}:*")],
                        "info": {"name": user},
                    }),
                ),
                None => answer(StatusCode::UNAUTHORIZED, json!({"reason": "not logged in"})),
            },
            // pushgate passes on a page's `rpc` call.
            (Method::POST, RPC_PATH) => self.rpc(request).await,
            (Method::POST, "/say") => {
                let Some(user) = user else {
                    return not_logged_in();
                };
                let form = form(request).await;
                match text(&form) {
                    Some(text) => {
                        let body = json!({
                            "channel": LOBBY,
                            "event": "message",
                            "data": {"from": user, "text": text},
                        });
                        self.api_call(Method::POST, "/api/publish", Some(body))
                            .await
                    }
                    None => bad_text(),
                }
            }
            (Method::POST, "/notify") => {
                let Some(user) = user else {
                    return not_logged_in();
                };
                let form = form(request).await;
                let to = form.get("to").map(String::as_str).unwrap_or(&user);
                if !valid_name(to) {
                    return answer(StatusCode::BAD_REQUEST, json!({"error": "no such user"}));
                }
                match text(&form) {
                    Some(text) => {
                        let body = json!({
                            "channel": format!("user:{to}:notifications"),
                            "event": "notification",
                            "data": {"from": user, "text": text},
                        });
                        self.api_call(Method::POST, "/api/publish", Some(body))
                            .await
                    }
                    None => bad_text(),
                }
            }
            _ => answer(StatusCode::NOT_FOUND, json!({"error": "not found"})),
        }
    }

    /// A page's `rpc` call, as pushgate sends it: `{"user", "connection",
    /// "method", "data"}`, `user` from the connection's grant. The answer's
    /// JSON is the call's result; a 4xx `{"error": {"code", "message"}}` is
    /// its error.
    async fn rpc(&self, request: Request<Incoming>) -> Response<Body> {
        let call: Value = match Limited::new(request.into_body(), MAX_FORM).collect().await {
            Ok(body) => serde_json::from_slice(&body.to_bytes()).unwrap_or_default(),
            Err(_) => Value::Null,
        };
        match call["method"].as_str() {
            Some("online") => {
                let path = format!("/api/presence?channel={LOBBY}");
                match self.api_send(Method::GET, &path, None).await {
                    Ok((StatusCode::OK, presence)) => {
                        let presence = serde_json::from_slice(&presence).unwrap_or_default();
                        let caller = call["user"].as_str();
                        answer(
                            StatusCode::OK,
                            json!({ "users": online(&presence, caller) }),
                        )
                    }
                    Ok((status, _)) => call_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "presence_unavailable",
                        &format!("pushgate's presence answered {status}"),
                    ),
                    Err(why) => call_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "presence_unavailable",
                        &why,
                    ),
                }
            }
            _ => call_error(
                StatusCode::NOT_FOUND,
                "no_such_method",
                "this app answers the method `online`",
            ),
        }
    }

    /// Calls pushgate's API with the key; passes its status and JSON on.
    async fn api_call(&self, method: Method, path: &str, body: Option<Value>) -> Response<Body> {
        match self.api_send(method, path, body).await {
            Ok((status, json)) => {
                let mut answer = Response::new(crate::body::full(json));
                *answer.status_mut() = status;
                answer.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                answer
            }
            Err(why) => answer(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": format!("pushgate's API: {why}")}),
            ),
        }
    }

    /// Calls pushgate's API with the key: its status and body, or why there
    /// is none.
    async fn api_send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Bytes), String> {
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.api))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .expect("a valid request");
        let response = match tokio::time::timeout(API_TIMEOUT, self.client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => return Err(err.to_string()),
            Err(_) => return Err("no answer".to_owned()),
        };
        let status = response.status();
        let body = Limited::new(response.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|err| err.to_string())?;
        Ok((status, body.to_bytes()))
    }
}

/// The users of a presence answer (`{"presence": [{"user", ...}]}`) and the
/// caller, whose connection is up even before its subscription is listed:
/// each once, in name order (a user may have several pages open).
fn online(presence: &Value, caller: Option<&str>) -> Vec<String> {
    let users: std::collections::BTreeSet<&str> = presence["presence"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry["user"].as_str())
        .chain(caller)
        .collect();
    users.into_iter().map(str::to_owned).collect()
}

/// An `rpc` call's error: pushgate passes the code and message on.
fn call_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    answer(status, json!({"error": {"code": code, "message": message}}))
}

/// The logged-in user's name, from the cookie.
fn user(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|name| valid_name(name))
}

/// Names go into channel names (`user:<name>:notifications`) and the grant's
/// `user:<name>:*`, so no `:` and no `*`.
fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A POST from a page must come from this page's origin (a foreign page
/// cannot make the user say things); one without `Origin` is not a browser's
/// cross-site request.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest);
    matches!((host, origin_host), (Some(h), Some(o)) if h.eq_ignore_ascii_case(o))
}

/// The form fields of a urlencoded body (empty when unreadable).
async fn form(request: Request<Incoming>) -> std::collections::HashMap<String, String> {
    match Limited::new(request.into_body(), MAX_FORM).collect().await {
        Ok(body) => form_urlencoded::parse(&body.to_bytes())
            .into_owned()
            .collect(),
        Err(_) => Default::default(),
    }
}

/// The form's `text`: trimmed, not empty, at most [`MAX_TEXT`] characters.
fn text(form: &std::collections::HashMap<String, String>) -> Option<String> {
    let text = form.get("text").map(|t| t.trim()).unwrap_or_default();
    (!text.is_empty() && text.chars().count() <= MAX_TEXT).then(|| text.to_owned())
}

fn bad_text() -> Response<Body> {
    answer(
        StatusCode::BAD_REQUEST,
        json!({"error": format!("say 1 to {MAX_TEXT} characters")}),
    )
}

fn not_logged_in() -> Response<Body> {
    answer(StatusCode::UNAUTHORIZED, json!({"error": "log in first"}))
}

fn answer(status: StatusCode, body: Value) -> Response<Body> {
    let mut response = Response::new(crate::body::full(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn file(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(crate::body::full(text));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Back to the page, logged in as `name` or logged out.
fn redirect(name: Option<&str>) -> Response<Body> {
    let cookie = match name {
        Some(name) => format!("{COOKIE}={name}; Path=/; HttpOnly; SameSite=Lax"),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"),
    };
    let mut response = Response::new(crate::body::empty());
    *response.status_mut() = StatusCode::SEE_OTHER;
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static("/"));
    headers.insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("names are header-safe"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_in_channels_and_cookies() {
        assert!(valid_name("ada"));
        assert!(valid_name("A_b-9"));
        assert!(valid_name(&"a".repeat(32)));
        for bad in ["", "a:b", "a*", "a b", "é", "a;b", "a=b", &"a".repeat(33)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_user_comes_from_the_cookie_only_when_valid() {
        let mut headers = HeaderMap::new();
        assert_eq!(user(&headers), None);
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("other=1; pushgate_demo_user=ada"),
        );
        assert_eq!(user(&headers).as_deref(), Some("ada"));
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("pushgate_demo_user=a:b"),
        );
        assert_eq!(user(&headers), None);
    }

    #[test]
    fn posts_from_another_origin_are_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&headers));
    }

    #[test]
    fn online_lists_each_user_once_with_the_caller() {
        let presence = json!({"channel": LOBBY, "presence": [
            {"user": "bob", "connection": "n-1"},
            {"user": "ada", "connection": "n-2"},
            {"user": "bob", "connection": "n-3"},
            {"user": null, "connection": "n-4"},
        ]});
        assert_eq!(online(&presence, Some("cy")), ["ada", "bob", "cy"]);
        assert_eq!(online(&presence, Some("ada")), ["ada", "bob"]);
        assert_eq!(online(&json!({}), None), Vec::<String>::new());
    }

    #[test]
    fn loopback_only() {
        let options = |listen: &str| DemoOptions {
            listen: listen.parse().unwrap(),
            api_listen: "127.0.0.1:0".parse().unwrap(),
            redis: None,
            api_key: None,
        };
        assert!(options("127.0.0.1:0").problem().is_none());
        assert!(options("[::1]:8080").problem().is_none());
        assert!(options("0.0.0.0:8080")
            .problem()
            .unwrap()
            .contains("--listen"));
    }

    #[test]
    fn the_config_is_valid() {
        let options = DemoOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            api_listen: "127.0.0.1:0".parse().unwrap(),
            redis: Some("redis://127.0.0.1:6379".into()),
            api_key: None,
        };
        let config = options.config("127.0.0.1:9".parse().unwrap(), "k".repeat(32).as_str());
        assert_eq!(config.engine.kind, EngineKind::Redis);
        if let Err(err) = Settings::new(config) {
            panic!("{err}");
        }
    }
}
