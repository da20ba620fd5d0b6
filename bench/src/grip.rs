//! The test upstream's GRIP answers: what an app behind Pushpin says so that
//! Pushpin holds a subscriber on a channel.
//!
//! - SSE: `GET /grip/sse?channel=<name>` is answered `200` with
//!   `Grip-Hold: stream`, `Grip-Channel: <name>`,
//!   `Content-Type: text/event-stream` and an empty body. Pushpin keeps the
//!   client's response open and appends each publication's `http-stream`
//!   content.
//! - WebSocket, through a route with `over_http` (WebSocket-over-HTTP):
//!   Pushpin POSTs each connection's events with
//!   `Content-Type: application/websocket-events`. `OPEN` is answered with
//!   `OPEN` and the control message
//!   `c:{"type":"subscribe","channel":"<name>"}` (the `grip` extension,
//!   accepted with `Sec-WebSocket-Extensions: grip`), `CLOSE` with `CLOSE`,
//!   `PING` with a `PONG` of the same content (Pushpin passes a client's
//!   ping frames to the app), anything else with no event. The channel is the `?channel=` of the
//!   WebSocket's own URL, which Pushpin forwards.
//!
//! - Authenticated (`pushgate-bench connect --target pushpin`): the same two
//!   under `/grip/auth/sse` and `/grip/auth/ws`, decided like pushgate's grant
//!   request ([`crate::upstream::session`]): a request (SSE) or an `OPEN`
//!   (WebSocket) without a `session=<name>` cookie is answered `401`, which
//!   Pushpin passes to the client; with one, the hold above. An SSE hold
//!   there starts its stream with `retry: 3000` and a blank line, so the
//!   client sees the stream open as it does on pushgate (`retry:`) and Nchan
//!   (a `: hi` comment).
//!
//! Channel names are taken from the query as they are, without
//! percent-decoding: the benchmark's names are letters, digits and `_.:-`.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;

use crate::subscriber::find;

/// The path of an SSE subscription through Pushpin.
pub const SSE_PATH: &str = "/grip/sse";
/// The path of a WebSocket subscription through Pushpin (any path would do:
/// the route's `over_http` decides).
pub const WS_PATH: &str = "/grip/ws";
/// The same, when the upstream decides from the `session` cookie.
pub const AUTH_SSE_PATH: &str = "/grip/auth/sse";
/// The same, when the upstream decides from the `session` cookie.
pub const AUTH_WS_PATH: &str = "/grip/auth/ws";
/// The media type of a WebSocket-over-HTTP request and answer.
const EVENTS: &str = "application/websocket-events";
/// The start of an authenticated SSE hold's stream.
const OPENING: &[u8] = b"retry: 3000\n\n";

/// A request that asks for a GRIP hold, and the channel it names.
pub enum Hold {
    /// An SSE hold; `true` when it starts with [`OPENING`].
    Stream(Option<String>, bool),
    WebSocket(Option<String>),
    /// An authenticated path without a `session` cookie.
    Unauthenticated,
}

impl Hold {
    pub fn of<B>(request: &Request<B>) -> Option<Hold> {
        let events = request
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(EVENTS.as_bytes()));
        let channel = || channel(request.uri());
        let path = request.uri().path();
        let auth = path == AUTH_SSE_PATH || path == AUTH_WS_PATH;
        let hold = if request.method() == Method::POST && events {
            Hold::WebSocket(channel())
        } else if request.method() == Method::GET && (path == SSE_PATH || path == AUTH_SSE_PATH) {
            Hold::Stream(channel(), auth)
        } else {
            return None;
        };
        // Pushpin sends the client's handshake headers, cookie included,
        // with every WebSocket-over-HTTP request, so only a connection that
        // had no cookie is refused, at its OPEN.
        if auth && crate::upstream::session(request.headers()).is_none() {
            return Some(Hold::Unauthenticated);
        }
        Some(hold)
    }

    /// The answer to the request, given its body.
    pub fn answer(self, body: &[u8]) -> Response<Full<Bytes>> {
        match self {
            Hold::Stream(Some(channel), opening) => {
                let start = if opening { OPENING } else { b"" };
                let mut response = Response::new(Full::new(Bytes::from_static(start)));
                let headers = response.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                headers.insert("grip-hold", HeaderValue::from_static("stream"));
                headers.insert("grip-channel", header_value(&channel));
                response
            }
            Hold::WebSocket(channel) => {
                let Some(events) = events(body) else {
                    return refuse("malformed websocket events");
                };
                let mut out = Vec::new();
                for (kind, content) in events {
                    match (kind, &channel) {
                        (b"OPEN", Some(channel)) => {
                            out.extend_from_slice(b"OPEN\r\n");
                            let control =
                                format!(r#"c:{{"type":"subscribe","channel":"{channel}"}}"#);
                            out.extend_from_slice(
                                format!("TEXT {:x}\r\n{control}\r\n", control.len()).as_bytes(),
                            );
                        }
                        (b"OPEN", None) => return refuse("no ?channel= in the WebSocket's URL"),
                        (b"CLOSE", _) => out.extend_from_slice(b"CLOSE\r\n"),
                        // Pushpin passes a client's ping to the app; the
                        // app's PONG is what the client gets back.
                        (b"PING", _) if content.is_empty() => out.extend_from_slice(b"PONG\r\n"),
                        (b"PING", _) => {
                            out.extend_from_slice(
                                format!("PONG {:x}\r\n", content.len()).as_bytes(),
                            );
                            out.extend_from_slice(content);
                            out.extend_from_slice(b"\r\n");
                        }
                        _ => {}
                    }
                }
                let mut response = Response::new(Full::new(Bytes::from(out)));
                let headers = response.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(EVENTS));
                headers.insert("sec-websocket-extensions", HeaderValue::from_static("grip"));
                response
            }
            Hold::Stream(None, _) => refuse("no ?channel="),
            Hold::Unauthenticated => {
                let mut response = Response::new(Full::new(Bytes::from_static(
                    br#"{"error":"no session cookie"}"#,
                )));
                *response.status_mut() = StatusCode::UNAUTHORIZED;
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                response
            }
        }
    }
}

fn refuse(why: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(why.as_bytes())));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    response
}

fn header_value(channel: &str) -> HeaderValue {
    HeaderValue::from_str(channel).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The first `channel=` of the query.
fn channel(uri: &Uri) -> Option<String> {
    uri.query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("channel="))
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
}

/// The events of a WebSocket-over-HTTP body, `(type, content)`: each is
/// `TYPE\r\n` or `TYPE <hex length>\r\n<content>\r\n`. `None` if malformed.
pub fn events(mut body: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let end = find(body, b"\r\n")?;
        let line = &body[..end];
        body = &body[end + 2..];
        match line.iter().position(|&b| b == b' ') {
            None => out.push((line, &b""[..])),
            Some(space) => {
                let len = std::str::from_utf8(&line[space + 1..]).ok()?;
                let len = usize::from_str_radix(len, 16).ok()?;
                if body.len() < len + 2 || &body[len..len + 2] != b"\r\n" {
                    return None;
                }
                out.push((&line[..space], &body[..len]));
                body = &body[len + 2..];
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn events_with_and_without_content() {
        let body = b"OPEN\r\nTEXT 5\r\nhello\r\nCLOSE 2\r\n\x03\xe8\r\n";
        let events = events(body).unwrap();
        assert_eq!(
            events,
            vec![
                (&b"OPEN"[..], &b""[..]),
                (&b"TEXT"[..], &b"hello"[..]),
                (&b"CLOSE"[..], &b"\x03\xe8"[..]),
            ]
        );
        assert!(super::events(b"TEXT 9\r\nshort\r\n").is_none());
        assert!(super::events(b"OPEN").is_none());
    }

    #[tokio::test]
    async fn open_subscribes_to_the_urls_channel() {
        let request = Request::post("/grip/ws?channel=bench-1")
            .header(CONTENT_TYPE, EVENTS)
            .body(())
            .unwrap();
        let response = Hold::of(&request).unwrap().answer(b"OPEN\r\n");
        assert_eq!(response.headers()["sec-websocket-extensions"], "grip");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let control = r#"c:{"type":"subscribe","channel":"bench-1"}"#;
        let want = format!("OPEN\r\nTEXT {:x}\r\n{control}\r\n", control.len());
        assert_eq!(body, want.as_bytes());
    }

    #[tokio::test]
    async fn authenticated_holds_need_the_session_cookie() {
        let refused = Request::get("/grip/auth/sse?channel=c").body(()).unwrap();
        let response = Hold::of(&refused).unwrap().answer(b"");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let refused = Request::post("/grip/auth/ws?channel=c")
            .header(CONTENT_TYPE, EVENTS)
            .body(())
            .unwrap();
        let response = Hold::of(&refused).unwrap().answer(b"OPEN\r\n");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

        let allowed = Request::get("/grip/auth/sse?channel=c")
            .header("cookie", "a=b; session=u7")
            .body(())
            .unwrap();
        let response = Hold::of(&allowed).unwrap().answer(b"");
        assert_eq!(response.headers()["grip-hold"], "stream");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, OPENING);
        let allowed = Request::post("/grip/auth/ws?channel=c")
            .header(CONTENT_TYPE, EVENTS)
            .header("cookie", "session=u7")
            .body(())
            .unwrap();
        let response = Hold::of(&allowed)
            .unwrap()
            .answer(b"PING 2\r\nhi\r\nPING\r\n");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, &b"PONG 2\r\nhi\r\nPONG\r\n"[..]);
    }

    #[test]
    fn sse_holds_a_stream_on_the_channel() {
        let request = Request::get("/grip/sse?channel=c7").body(()).unwrap();
        let response = Hold::of(&request).unwrap().answer(b"");
        assert_eq!(response.headers()["grip-hold"], "stream");
        assert_eq!(response.headers()["grip-channel"], "c7");
        assert_eq!(response.headers()[CONTENT_TYPE], "text/event-stream");
        let plain = Request::get("/bench").body(()).unwrap();
        assert!(Hold::of(&plain).is_none());
    }
}
