//! The standing adversarial suite for the proxy: request smuggling and
//! framing shapes over raw HTTP/1.1 and HTTP/2, each checked at a recording
//! app that reads strictly and answers before it reads a body.
//!
//! The rule every shape is held to (docs/security.md): no request reaches
//! the app that the client did not send as one request, every request that
//! does reach it carries pushgate's forwarding fields and one framing, and
//! the next users' requests, on the same pooled connections, arrive whole
//! and get their own answers.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::recording::{RecordingApp, Request, Seen};
use common::wire::{frame, H2Outcome, Http1, Http2};
use common::{Pushgate, PATIENCE};

/// Fields an app might read as the client's address or original URL, which
/// no client outside `upstream.trusted_proxies` may set.
const UNTRUSTED: [&str; 13] = [
    "forwarded",
    "x-real-ip",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "true-client-ip",
    "cf-connecting-ip",
    "x-client-ip",
    "client-ip",
    "x-cluster-client-ip",
    "fastly-client-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-original-forwarded-for",
];

/// Fields that describe one connection and must never cross the proxy
/// (an upgrade's own `Connection` and `Upgrade` aside).
const HOP_BY_HOP: [&str; 7] = [
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "connection",
    "expect",
];

/// What pushgate must do with a shape.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Answer with this status itself; nothing from this client reaches the
    /// app.
    Refused(u16),
    /// Forward each request (target, body) to the app and pass its `200`
    /// back, in order.
    Forwarded(&'static [(&'static str, &'static [u8])]),
    /// Either refuse (4xx, or close) or forward: both are safe; the rule and
    /// the next users' requests are what is checked.
    Either,
}

struct Case {
    name: &'static str,
    wire: Vec<u8>,
    expect: Expect,
    /// The request is a HEAD (its answer has no body).
    head: bool,
}

fn case(name: &'static str, wire: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name,
        wire: wire.into(),
        expect,
        head: false,
    }
}

const WS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

/// What a victim's request would look like, as a body that a desynced app
/// would take for a request of its own.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: evil\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n";

fn http1_cases() -> Vec<Case> {
    use Expect::*;
    let smuggled_len = SMUGGLED.len();
    let chunked_smuggled = format!("{smuggled_len:x}\r\n{SMUGGLED}\r\n0\r\n\r\n");
    let mut cases = vec![
        // Content-Length and Transfer-Encoding together: the chunks frame it.
        case(
            "cl.te",
            "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n",
            Either,
        ),
        case(
            "te.cl",
            format!("POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{chunked_smuggled}"),
            Either,
        ),
        case(
            "te.cl zero",
            "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Either,
        ),
        case(
            "te xchunked",
            format!("POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: xchunked\r\nContent-Length: {smuggled_len}\r\n\r\n{SMUGGLED}"),
            Refused(400),
        ),
        case(
            "te space before colon",
            format!("POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\n{chunked_smuggled}"),
            Refused(400),
        ),
        case(
            "te tab",
            "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Forwarded(&[("/a", b"hello")]),
        ),
        case(
            "te line fold",
            format!("POST /a HTTP/1.1\r\nHost: app\r\nX-A: b\r\n Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{chunked_smuggled}"),
            Refused(400),
        ),
        case(
            "te chunked, identity",
            format!("POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked, identity\r\n\r\n{chunked_smuggled}"),
            Refused(400),
        ),
        case(
            "te identity, chunked",
            "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: identity, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Either,
        ),
        case(
            "te twice, last not chunked",
            format!("POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n{chunked_smuggled}"),
            Refused(400),
        ),
        case(
            "te mixed case",
            "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: cHuNkEd\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Forwarded(&[("/a", b"hello")]),
        ),
        case(
            "te quoted",
            format!("POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: \"chunked\"\r\n\r\n{chunked_smuggled}"),
            Refused(400),
        ),
        case(
            "te on HTTP/1.0",
            format!("POST /a HTTP/1.0\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_smuggled}"),
            Refused(400),
        ),
        case(
            "te with NUL",
            "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\0\r\n\r\n0\r\n\r\n",
            Refused(400),
        ),
        case(
            "cl twice, different",
            format!("POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nContent-Length: {smuggled_len}\r\n\r\nhello{SMUGGLED}"),
            Refused(400),
        ),
        case(
            "cl twice, same",
            "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            Forwarded(&[("/a", b"hello")]),
        ),
        case(
            "cl list of one value",
            "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 5, 5\r\n\r\nhello",
            Refused(400),
        ),
        case(
            "cl list of zeros on a GET",
            "GET /a HTTP/1.1\r\nHost: app\r\nContent-Length: 0, 0\r\n\r\n",
            Refused(400),
        ),
        case(
            "cl in zeros on a POST",
            "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 000\r\n\r\n",
            Forwarded(&[("/a", b"")]),
        ),
        case(
            "cl plus sign",
            format!("POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: +{smuggled_len}\r\n\r\n{SMUGGLED}"),
            Refused(400),
        ),
        case(
            "cl hex",
            "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 0x5\r\n\r\nhello",
            Refused(400),
        ),
        case(
            "cl negative",
            "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: -1\r\n\r\nhello",
            Refused(400),
        ),
        case(
            "cl overflow",
            "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 184467440737095516160\r\n\r\nhello",
            Refused(400),
        ),
        case(
            "cl empty",
            "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: \r\n\r\nhello",
            Refused(400),
        ),
        case(
            "cl leading zeros",
            "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 0005\r\n\r\nhello",
            Forwarded(&[("/a", b"hello")]),
        ),
        case(
            "cl with spaces",
            "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length:   5  \r\n\r\nhello",
            Forwarded(&[("/a", b"hello")]),
        ),
        case(
            "cl body then a pipelined request",
            "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhelloGET /second HTTP/1.1\r\nHost: app\r\n\r\n",
            Forwarded(&[("/a", b"hello"), ("/second", b"")]),
        ),
        case(
            "chunk size with 0x",
            format!("POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n0x{smuggled_len:x}\r\n{SMUGGLED}\r\n0\r\n\r\n"),
            Either,
        ),
        case(
            "chunk size overflow",
            "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF1\r\nhello\r\n0\r\n\r\n",
            Either,
        ),
        case(
            "chunk extension",
            "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5;name=\"v\"\r\nhello\r\n0\r\n\r\n",
            Forwarded(&[("/a", b"hello")]),
        ),
        case(
            "chunk with a bare LF",
            format!("POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n{SMUGGLED}"),
            Either,
        ),
        case(
            "chunk longer than its size",
            format!("POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n{SMUGGLED}"),
            Either,
        ),
        case(
            "chunk trailer with framing fields",
            "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nTrailer: content-length\r\n\r\n5\r\nhello\r\n0\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n",
            Forwarded(&[("/a", b"hello")]),
        ),
        case(
            "bare LF head",
            "GET /a HTTP/1.1\nHost: app\n\n",
            Either,
        ),
        case(
            "bare CR in head",
            "GET /a HTTP/1.1\rHost: app\r\n\r\n",
            Refused(400),
        ),
        case(
            "NUL in a value",
            "GET /a HTTP/1.1\r\nHost: app\r\nX-A: a\0b\r\n\r\n",
            Refused(400),
        ),
        case(
            "field without colon",
            "GET /a HTTP/1.1\r\nHost: app\r\nX-A\r\n\r\n",
            Refused(400),
        ),
        case(
            "space in a name",
            "GET /a HTTP/1.1\r\nHost: app\r\nX A: b\r\n\r\n",
            Refused(400),
        ),
        case(
            "absolute form",
            "GET http://other.example/a?b=c HTTP/1.1\r\nHost: app\r\n\r\n",
            Forwarded(&[("/a?b=c", b"")]),
        ),
        case(
            "absolute form without Host",
            "GET http://other.example/a HTTP/1.1\r\n\r\n",
            Forwarded(&[("/a", b"")]),
        ),
        case(
            "absolute form with userinfo",
            "GET http://user@other.example/a HTTP/1.1\r\nHost: app\r\n\r\n",
            Refused(400),
        ),
        case(
            "absolute form of another scheme",
            "GET ftp://other.example/a HTTP/1.1\r\nHost: app\r\n\r\n",
            Refused(400),
        ),
        case("HTTP/1.1 without Host", "GET /a HTTP/1.1\r\n\r\n", Refused(400)),
        case(
            "two Host fields",
            "GET /a HTTP/1.1\r\nHost: app\r\nHost: evil\r\n\r\n",
            Refused(400),
        ),
        case(
            "Host with userinfo",
            "GET /a HTTP/1.1\r\nHost: user@app\r\n\r\n",
            Refused(400),
        ),
        case(
            "Host with a space",
            "GET /a HTTP/1.1\r\nHost: app evil\r\n\r\n",
            Refused(400),
        ),
        case(
            "HTTP/1.0 without Host",
            "GET /a HTTP/1.0\r\n\r\n",
            Forwarded(&[("/a", b"")]),
        ),
        case("HTTP/0.9", "GET /a\r\n\r\n", Refused(400)),
        case("HTTP/1.2", "GET /a HTTP/1.2\r\nHost: app\r\n\r\n", Refused(400)),
        case(
            "unknown method",
            "PURGE /a HTTP/1.1\r\nHost: app\r\n\r\n",
            Forwarded(&[("/a", b"")]),
        ),
        case(
            "bad method",
            "G(T /a HTTP/1.1\r\nHost: app\r\n\r\n",
            Refused(400),
        ),
        case(
            "space in target",
            "GET /a /smuggled HTTP/1.1\r\nHost: app\r\n\r\n",
            Refused(400),
        ),
        case(
            "asterisk form",
            "OPTIONS * HTTP/1.1\r\nHost: app\r\n\r\n",
            Either,
        ),
        case(
            "CONNECT",
            "CONNECT app:443 HTTP/1.1\r\nHost: app:443\r\n\r\n",
            Refused(405),
        ),
        case(
            "upgrade with a body",
            format!("GET /upgrade/refuse HTTP/1.1\r\nHost: app\r\n{WS}Content-Length: {smuggled_len}\r\n\r\n{SMUGGLED}"),
            Refused(400),
        ),
        case(
            "upgrade with a chunked body",
            format!("GET /upgrade/refuse HTTP/1.1\r\nHost: app\r\n{WS}Transfer-Encoding: chunked\r\n\r\n{chunked_smuggled}"),
            Refused(400),
        ),
        case(
            "upgrade with an empty body",
            format!("GET /upgrade/refuse HTTP/1.1\r\nHost: app\r\n{WS}Content-Length: 0\r\n\r\n"),
            Either,
        ),
        case(
            "upgrade refused by the app",
            format!("GET /upgrade/refuse HTTP/1.1\r\nHost: app\r\n{WS}\r\n"),
            Either,
        ),
        case(
            "upgrade refused, then more on the client connection",
            format!("GET /upgrade/refuse HTTP/1.1\r\nHost: app\r\n{WS}\r\nGET /second HTTP/1.1\r\nHost: app\r\n\r\n"),
            Either,
        ),
        case(
            "upgrade with Expect",
            format!("GET /upgrade/refuse HTTP/1.1\r\nHost: app\r\n{WS}Expect: 100-continue\r\nContent-Length: {smuggled_len}\r\n\r\n{SMUGGLED}"),
            Refused(400),
        ),
        case(
            "h2c upgrade",
            "GET /a HTTP/1.1\r\nHost: app\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
            Forwarded(&[("/a", b"")]),
        ),
        case(
            "upgrade without Connection",
            "GET /upgrade/refuse HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\n\r\n",
            Forwarded(&[("/upgrade/refuse", b"")]),
        ),
        case(
            "upgrade on HTTP/1.0",
            format!("GET /upgrade/refuse HTTP/1.0\r\nHost: app\r\n{WS}\r\n"),
            Forwarded(&[("/upgrade/refuse", b"")]),
        ),
        case(
            "Connection names Content-Length",
            "POST /a HTTP/1.1\r\nHost: app\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
            Forwarded(&[("/a", b"hello")]),
        ),
        case(
            "Connection names Transfer-Encoding",
            "POST /a HTTP/1.1\r\nHost: app\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Forwarded(&[("/a", b"hello")]),
        ),
        case(
            "Connection names Host and X-Forwarded-For",
            "GET /a HTTP/1.1\r\nHost: app\r\nConnection: Host, X-Forwarded-For, X-Forwarded-Proto\r\n\r\n",
            Forwarded(&[("/a", b"")]),
        ),
        case(
            "Expect 100-continue with its body",
            "POST /a HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
            Forwarded(&[("/a", b"hello")]),
        ),
        case(
            "GET with a body",
            "GET /a HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello",
            Forwarded(&[("/a", b"hello")]),
        ),
        case(
            "GET with a chunked body",
            "GET /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Forwarded(&[("/a", b"hello")]),
        ),
        case(
            "DELETE with a chunked body",
            "DELETE /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Forwarded(&[("/a", b"hello")]),
        ),
        case(
            "POST without a length",
            "POST /a HTTP/1.1\r\nHost: app\r\n\r\n",
            Forwarded(&[("/a", b"")]),
        ),
        case(
            "two pipelined requests",
            "GET /first HTTP/1.1\r\nHost: app\r\n\r\nGET /second HTTP/1.1\r\nHost: app\r\n\r\n",
            Forwarded(&[("/first", b""), ("/second", b"")]),
        ),
        case(
            "HTTP/1.0 keep-alive upload, then another",
            "POST /first HTTP/1.0\r\nHost: app\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhelloGET /second HTTP/1.0\r\nHost: app\r\n\r\n",
            Forwarded(&[("/first", b"hello"), ("/second", b"")]),
        ),
        case(
            "a request, then garbage",
            "GET /first HTTP/1.1\r\nHost: app\r\n\r\nNOT HTTP AT ALL\r\n\r\n",
            Forwarded(&[("/first", b"")]),
        ),
        case(
            "forged forwarding fields",
            "GET /a HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Port: 1\r\nX-Forwarded-Prefix: /admin\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nCF-Connecting-IP: 6.6.6.6\r\nX-Client-IP: 6.6.6.6\r\nClient-IP: 6.6.6.6\r\nX-Cluster-Client-IP: 6.6.6.6\r\nFastly-Client-IP: 6.6.6.6\r\nX-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nX-Original-Forwarded-For: 6.6.6.6\r\n\r\n",
            Forwarded(&[("/a", b"")]),
        ),
        case(
            "forged forwarding fields in odd case",
            "GET /a HTTP/1.1\r\nHost: app\r\nx-REAL-ip: 6.6.6.6\r\nTRUE-CLIENT-IP: 6.6.6.6\r\nx-original-url: /admin\r\n\r\n",
            Forwarded(&[("/a", b"")]),
        ),
        case(
            "hop-by-hop fields",
            "GET /a HTTP/1.1\r\nHost: app\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\r\n",
            Forwarded(&[("/a", b"")]),
        ),
        case(
            "obs-text in a value",
            b"GET /a HTTP/1.1\r\nHost: app\r\nX-A: caf\xe9\r\n\r\n".to_vec(),
            Forwarded(&[("/a", b"")]),
        ),
        case(
            "head over the limit",
            format!("GET /a HTTP/1.1\r\nHost: app\r\nX-A: {}\r\n\r\n", "a".repeat(40 * 1024)),
            Refused(431),
        ),
        case(
            "too many fields",
            format!(
                "GET /a HTTP/1.1\r\nHost: app\r\n{}\r\n",
                (0..150).map(|i| format!("X-{i}: v\r\n")).collect::<String>()
            ),
            Refused(431),
        ),
    ];
    // pushgate's own paths keep the same rules.
    cases.extend([
        case(
            "realtime: two Host fields",
            "GET /realtime/sse?channel=a HTTP/1.1\r\nHost: app\r\nHost: evil\r\n\r\n",
            Refused(400),
        ),
        case(
            "realtime: HTTP/1.1 without Host",
            "GET /realtime/poll?channel=a HTTP/1.1\r\n\r\n",
            Refused(400),
        ),
        case(
            "realtime: upgrade with a body",
            format!("GET /realtime/ws HTTP/1.1\r\nHost: app\r\n{WS}Content-Length: {smuggled_len}\r\n\r\n{SMUGGLED}"),
            Refused(400),
        ),
    ]);
    let mut head = case(
        "HEAD with a body",
        "HEAD /a HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello",
        Forwarded(&[("/a", b"hello")]),
    );
    head.head = true;
    cases.push(head);
    cases
}

/// pushgate in front of `app`, with short limits so stalled shapes end fast.
async fn pushgate(app: &RecordingApp) -> Pushgate {
    Pushgate::start(
        &app.url(),
        "limits: {body_timeout: 2s, header_timeout: 5s, max_header_bytes: 32KiB}\nupstream: {timeout: 5s}\n",
    )
    .await
}

/// Plays `case` against pushgate; a description of every way it broke the
/// rule (empty when it held).
async fn play(case: &Case, pushgate: SocketAddr, app: &RecordingApp) -> Vec<String> {
    let mut broken = Vec::new();
    app.clear();
    let mut conn = Http1::connect(pushgate).await;
    conn.send(&case.wire).await;
    let mut statuses = Vec::new();
    let wanted = match case.expect {
        Expect::Refused(_) | Expect::Either => 1,
        Expect::Forwarded(requests) => requests.len(),
    };
    while statuses.len() < wanted {
        match conn.answer(case.head).await {
            Ok(Some(answer)) => statuses.push(answer.status),
            Ok(None) => break,
            Err(err) => {
                broken.push(format!("the client's answer: {err}"));
                break;
            }
        }
    }
    drop(conn);
    match case.expect {
        Expect::Refused(status) => {
            if statuses != [status] {
                broken.push(format!("answered {statuses:?}, not [{status}]"));
            }
        }
        Expect::Forwarded(requests) => {
            if statuses != vec![200; requests.len()] {
                broken.push(format!("answered {statuses:?}, not the app's 200s"));
            }
        }
        Expect::Either => {}
    }
    if let Expect::Forwarded(requests) = case.expect {
        // The app records a request once it has read its body.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while attackers(app).len() < requests.len() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let seen: Vec<(String, Vec<u8>)> = attackers(app)
            .into_iter()
            .map(|r| (r.target, r.body))
            .collect();
        let expected: Vec<(String, Vec<u8>)> = requests
            .iter()
            .map(|(t, b)| (t.to_string(), b.to_vec()))
            .collect();
        if seen != expected {
            broken.push(format!(
                "the app saw {:?}, not {:?}",
                printable(&seen),
                printable(&expected)
            ));
        }
    }

    broken.extend(victims(pushgate, app).await);
    if let Expect::Refused(_) = case.expect {
        let reached = attackers(app);
        if !reached.is_empty() {
            broken.push(format!("refused, yet the app saw {reached:?}"));
        }
    }
    broken.extend(rule_broken(app, case));
    broken
}

fn printable(requests: &[(String, Vec<u8>)]) -> Vec<(String, String)> {
    requests
        .iter()
        .map(|(t, b)| (t.clone(), String::from_utf8_lossy(b).into_owned()))
        .collect()
}

/// Requests at the app that were not a victim's.
fn attackers(app: &RecordingApp) -> Vec<Request> {
    app.requests()
        .into_iter()
        .filter(|r| r.value("x-victim").is_none())
        .collect()
}

/// After an upload the app answered early and the client then broke: the
/// app's connection must end inside the request (the app reads it as cut
/// short), never carry it on as whole or take the next request as its body.
async fn cut_short(app: &RecordingApp) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let seen = app.seen();
        if seen.iter().any(|s| matches!(s, Seen::Aborted { .. })) {
            return Vec::new();
        }
        if tokio::time::Instant::now() >= deadline {
            return vec![format!(
                "the app answered early, but its upload was never cut short: {seen:?}"
            )];
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Other users' requests right after a shape, on whatever connections the
/// pool hands out: each must reach the app whole and get its own answer.
async fn victims(pushgate: SocketAddr, app: &RecordingApp) -> Vec<String> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut broken = Vec::new();
    let mut sent = Vec::new();
    for _ in 0..2 {
        let mut conn = Http1::connect(pushgate).await;
        for method in ["POST", "GET", "PUT"] {
            let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let body = if method == "GET" {
                String::new()
            } else {
                format!("the body of victim {id}")
            };
            let request = format!(
                "{method} /victim HTTP/1.1\r\nHost: app\r\nX-Victim: {id}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            conn.send(request.as_bytes()).await;
            match conn.answer(false).await {
                Ok(Some(answer)) if answer.status == 200 => {
                    if !answer.text().contains(&format!("victim={id}\n")) {
                        broken.push(format!(
                            "victim {id} got another request's answer: {:?}",
                            answer.text()
                        ));
                    }
                }
                other => broken.push(format!("victim {id} was answered {other:?}")),
            }
            sent.push((id.to_string(), body.into_bytes()));
        }
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let seen: Vec<(String, Vec<u8>)> = app
            .requests()
            .into_iter()
            .filter_map(|r| Some((r.value("x-victim")?, r.body)))
            .collect();
        if seen.len() >= sent.len() || tokio::time::Instant::now() > deadline {
            if seen != sent {
                broken.push(format!(
                    "the victims' requests reached the app as {:?}, not {:?}",
                    printable(&seen),
                    printable(&sent)
                ));
            }
            return broken;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every way the app's record breaks the rule.
fn rule_broken(app: &RecordingApp, case: &Case) -> Vec<String> {
    let mut broken = Vec::new();
    let seen = app.seen();
    let mut upgrade_conns = Vec::new();
    for entry in &seen {
        let request = match entry {
            Seen::Garbage { bytes, why, .. } => {
                broken.push(format!(
                    "the app read bytes that are no request ({why}): {:?}",
                    String::from_utf8_lossy(bytes)
                ));
                continue;
            }
            Seen::Aborted { .. } => continue,
            Seen::Request(request) => request,
        };
        let upgrade = request.value("upgrade").is_some();
        if upgrade {
            upgrade_conns.push(request.conn);
        }
        if request.target.contains("smuggled") {
            broken.push(format!("a smuggled request reached the app: {request:?}"));
        }
        if request.values("x-forwarded-for") != ["127.0.0.1"] {
            broken.push(format!(
                "X-Forwarded-For {:?} at {}",
                request.values("x-forwarded-for"),
                request.target
            ));
        }
        if request.values("x-forwarded-proto") != ["http"] {
            broken.push(format!(
                "X-Forwarded-Proto {:?} at {}",
                request.values("x-forwarded-proto"),
                request.target
            ));
        }
        if request.values("host").len() != 1 {
            broken.push(format!(
                "Host {:?} at {}",
                request.values("host"),
                request.target
            ));
        }
        let forwarded_host = request.values("x-forwarded-host");
        if !forwarded_host.is_empty() && forwarded_host != request.values("host") {
            broken.push(format!(
                "X-Forwarded-Host {:?} is not the Host {:?}",
                request.values("x-forwarded-host"),
                request.values("host")
            ));
        }
        for name in UNTRUSTED {
            if !request.values(name).is_empty() {
                broken.push(format!("{name} reached the app from an untrusted client"));
            }
        }
        for name in HOP_BY_HOP {
            let allowed = upgrade && (name == "upgrade" || name == "connection");
            if !allowed && !request.values(name).is_empty() {
                broken.push(format!("hop-by-hop {name} reached the app"));
            }
        }
        if request.value("x-secret").is_some() {
            broken.push("a field named in Connection reached the app".into());
        }
        if case.name.starts_with("absolute form")
            && request.value("x-victim").is_none()
            && request.value("host").as_deref() != Some("other.example")
        {
            broken.push(format!(
                "an absolute-form target's authority is not the Host: {:?}",
                request.values("host")
            ));
        }
    }
    // An upgrade attempt's connection carries nothing else, whatever the
    // app answered.
    for entry in &seen {
        if let Seen::Request(request) = entry {
            if request.value("upgrade").is_none() && upgrade_conns.contains(&request.conn) {
                broken.push(format!(
                    "{} {} went on the connection of an upgrade attempt",
                    request.method, request.target
                ));
            }
        }
    }
    broken
}

#[tokio::test]
async fn no_http1_shape_desyncs_pushgate_from_the_app() {
    let app = RecordingApp::start().await;
    let pushgate = pushgate(&app).await;
    let cases = http1_cases();
    assert!(cases.len() >= 80, "the battery has {} shapes", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let broken = play(case, pushgate.addr, &app).await;
        if !broken.is_empty() {
            failures.push(format!("{}:\n    {}", case.name, broken.join("\n    ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} shapes broke the rule:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// An HTTP/2 request: its fields, its DATA frames, and whether its last
/// frame ends the stream.
struct H2Case {
    name: &'static str,
    fields: Vec<(&'static [u8], Vec<u8>)>,
    data: Vec<&'static [u8]>,
    expect: H2Expect,
}

#[derive(Debug, Clone, Copy)]
enum H2Expect {
    /// pushgate answers this status itself; nothing reaches the app.
    Refused(u16),
    /// The stream (or connection) is reset as malformed; nothing reaches the app.
    Reset,
    /// The lie is in the DATA, which HTTP/2 checks only as it arrives:
    /// the stream is reset then. The head may have reached the app first,
    /// and an app may answer on the head alone (as the recording app does),
    /// so the client may see that answer before the reset. Either way the
    /// app never reads the request whole: its upload is cut short.
    ResetByData,
    /// Forwarded: the app sees this target and body, and this Host and Cookie.
    Forwarded {
        target: &'static str,
        body: &'static [u8],
        host: &'static str,
        cookie: Option<&'static str>,
    },
}

fn h2_cases() -> Vec<H2Case> {
    use H2Expect::*;
    let get = |path: &'static [u8]| -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"GET".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":authority", b"app".to_vec()),
            (b":path", path.to_vec()),
        ]
    };
    let post = |path: &'static [u8]| -> Vec<(&'static [u8], Vec<u8>)> {
        let mut fields = get(path);
        fields[0].1 = b"POST".to_vec();
        fields
    };
    let with = |mut fields: Vec<(&'static [u8], Vec<u8>)>, name: &'static [u8], value: &[u8]| {
        fields.push((name, value.to_vec()));
        fields
    };
    let forwarded = |target, body| Forwarded {
        target,
        body,
        host: "app",
        cookie: None,
    };
    vec![
        H2Case {
            name: "plain GET",
            fields: get(b"/a"),
            data: vec![],
            expect: forwarded("/a", b""),
        },
        H2Case {
            name: "Host agrees with :authority",
            fields: with(get(b"/a"), b"host", b"app"),
            data: vec![],
            expect: forwarded("/a", b""),
        },
        H2Case {
            name: "Host disagrees with :authority",
            fields: with(get(b"/a"), b"host", b"evil"),
            data: vec![],
            expect: Refused(400),
        },
        H2Case {
            name: "Host alone",
            fields: vec![
                (b":method", b"GET".to_vec()),
                (b":scheme", b"http".to_vec()),
                (b":path", b"/a".to_vec()),
                (b"host", b"app".to_vec()),
            ],
            data: vec![],
            expect: forwarded("/a", b""),
        },
        H2Case {
            name: ":authority with userinfo",
            fields: {
                let mut fields = get(b"/a");
                fields[2].1 = b"user@app".to_vec();
                fields
            },
            data: vec![],
            expect: Refused(400),
        },
        H2Case {
            name: "content-length without DATA",
            fields: with(post(b"/a"), b"content-length", b"5"),
            data: vec![],
            expect: Reset,
        },
        H2Case {
            name: "content-length under the DATA",
            fields: with(post(b"/a"), b"content-length", b"3"),
            data: vec![b"hello"],
            expect: ResetByData,
        },
        H2Case {
            name: "content-length over the DATA",
            fields: with(post(b"/a"), b"content-length", b"10"),
            data: vec![b"hello"],
            expect: ResetByData,
        },
        H2Case {
            name: "content-length matching the DATA",
            fields: with(post(b"/a"), b"content-length", b"5"),
            data: vec![b"hel", b"lo"],
            expect: forwarded("/a", b"hello"),
        },
        H2Case {
            name: "DATA without content-length",
            fields: post(b"/a"),
            data: vec![b"hel", b"lo"],
            expect: forwarded("/a", b"hello"),
        },
        H2Case {
            name: "GET with DATA",
            fields: get(b"/a"),
            data: vec![b"hello"],
            expect: forwarded("/a", b"hello"),
        },
        H2Case {
            name: "transfer-encoding",
            fields: with(post(b"/a"), b"transfer-encoding", b"chunked"),
            data: vec![b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n"],
            expect: Reset,
        },
        H2Case {
            name: "connection",
            fields: with(get(b"/a"), b"connection", b"keep-alive"),
            data: vec![],
            expect: Reset,
        },
        H2Case {
            name: "upgrade",
            fields: with(get(b"/upgrade/refuse"), b"upgrade", b"websocket"),
            data: vec![],
            expect: Reset,
        },
        H2Case {
            name: "te other than trailers",
            fields: with(get(b"/a"), b"te", b"gzip"),
            data: vec![],
            expect: Reset,
        },
        H2Case {
            name: "upper-case name",
            fields: with(get(b"/a"), b"X-Upper", b"1"),
            data: vec![],
            expect: Reset,
        },
        H2Case {
            name: "CRLF in a value",
            fields: with(get(b"/a"), b"x-a", b"1\r\nX-Forwarded-For: 6.6.6.6"),
            data: vec![],
            expect: Reset,
        },
        H2Case {
            name: "pseudo-field after a field",
            fields: {
                let mut fields = get(b"/a");
                let path = fields.pop().unwrap();
                fields.push((b"x-a", b"1".to_vec()));
                fields.push(path);
                fields
            },
            data: vec![],
            expect: Reset,
        },
        H2Case {
            name: "no :path",
            fields: {
                let mut fields = get(b"/a");
                fields.pop();
                fields
            },
            data: vec![],
            expect: Reset,
        },
        H2Case {
            name: "cookie crumbs",
            fields: with(with(get(b"/a"), b"cookie", b"a=1"), b"cookie", b"b=2"),
            data: vec![],
            expect: Forwarded {
                target: "/a",
                body: b"",
                host: "app",
                cookie: Some("a=1; b=2"),
            },
        },
        H2Case {
            name: "forged forwarding fields",
            fields: with(
                with(
                    with(get(b"/a"), b"x-real-ip", b"6.6.6.6"),
                    b"true-client-ip",
                    b"6.6.6.6",
                ),
                b"x-forwarded-for",
                b"6.6.6.6",
            ),
            data: vec![],
            expect: forwarded("/a", b""),
        },
        H2Case {
            name: "CONNECT",
            fields: vec![
                (b":method", b"CONNECT".to_vec()),
                (b":authority", b"app:443".to_vec()),
            ],
            data: vec![],
            expect: Refused(405),
        },
    ]
}

#[tokio::test]
async fn no_http2_shape_desyncs_pushgate_from_the_app() {
    let app = RecordingApp::start().await;
    let pushgate = pushgate(&app).await;
    let cases = h2_cases();
    let mut failures = Vec::new();
    for case in &cases {
        app.clear();
        let mut broken = Vec::new();
        let mut h2 = Http2::connect(pushgate.addr).await;
        let fields: Vec<(&[u8], &[u8])> = case.fields.iter().map(|(n, v)| (*n, &v[..])).collect();
        h2.request(1, &fields, &case.data, true).await;
        let outcome = h2.outcome(1).await;
        drop(h2);
        match (case.expect, &outcome) {
            (H2Expect::Refused(status), Ok(H2Outcome::Answered(got, _))) if *got == status => {}
            (
                H2Expect::Reset | H2Expect::ResetByData,
                Ok(H2Outcome::Reset(_) | H2Outcome::GoAway(_)),
            ) => {}
            (H2Expect::ResetByData, Ok(H2Outcome::Answered(200, _))) => {
                broken.extend(cut_short(&app).await);
            }
            (H2Expect::Forwarded { .. }, Ok(H2Outcome::Answered(200, _))) => {}
            (expect, outcome) => broken.push(format!("{outcome:?}, expected {expect:?}")),
        }
        if let H2Expect::Forwarded {
            target,
            body,
            host,
            cookie,
        } = case.expect
        {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            while attackers(&app).is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            match attackers(&app).as_slice() {
                [request] => {
                    if request.target != target || request.body != body {
                        broken.push(format!(
                            "the app saw {} {:?}",
                            request.target,
                            String::from_utf8_lossy(&request.body)
                        ));
                    }
                    if request.values("host") != [host] {
                        broken.push(format!("Host {:?}", request.values("host")));
                    }
                    if request.values("cookie") != cookie.into_iter().collect::<Vec<_>>() {
                        broken.push(format!("Cookie {:?}", request.values("cookie")));
                    }
                }
                other => broken.push(format!("the app saw {other:?}")),
            }
        }
        broken.extend(victims(pushgate.addr, &app).await);
        if !matches!(case.expect, H2Expect::Forwarded { .. }) && !attackers(&app).is_empty() {
            broken.push(format!("refused, yet the app saw {:?}", attackers(&app)));
        }
        let as_case = Case {
            name: case.name,
            wire: Vec::new(),
            expect: Expect::Either,
            head: false,
        };
        broken.extend(rule_broken(&app, &as_case));
        if !broken.is_empty() {
            failures.push(format!("{}:\n    {}", case.name, broken.join("\n    ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} HTTP/2 shapes broke the rule:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The order the battery above leaves to chance, made certain: the app has
/// answered on the head alone and the client has that answer before its
/// DATA shows the length was a lie. The stream is reset, the app's upload
/// is cut short rather than completed, and the connection that carried it
/// serves nobody after.
#[tokio::test]
async fn an_http2_length_lie_after_the_apps_early_answer_cuts_the_upload_short() {
    let app = RecordingApp::start().await;
    let pushgate = pushgate(&app).await;
    let shapes: [(&[u8], &[&[u8]]); 3] = [
        (b"10", &[b"hello"]),
        (b"3", &[b"hello"]),
        (b"4", &[b"he", b"llo"]),
    ];
    for (length, data) in shapes {
        app.clear();
        let mut h2 = Http2::connect(pushgate.addr).await;
        let fields: [(&[u8], &[u8]); 5] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"app"),
            (b":path", b"/early"),
            (b"content-length", length),
        ];
        h2.request(1, &fields, &[], false).await;
        let answer = h2.outcome(1).await;
        assert!(
            matches!(answer, Ok(H2Outcome::Answered(200, _))),
            "the app's early answer: {answer:?}"
        );
        for (i, chunk) in data.iter().enumerate() {
            let flags = if i + 1 == data.len() {
                frame::END_STREAM
            } else {
                0
            };
            h2.frame(frame::DATA, flags, 1, chunk).await;
        }
        let reset = h2.outcome(1).await;
        assert!(
            matches!(reset, Ok(H2Outcome::Reset(_) | H2Outcome::GoAway(_))),
            "content-length {}: {reset:?}",
            String::from_utf8_lossy(length)
        );
        drop(h2);
        let mut broken = cut_short(&app).await;
        if !attackers(&app).is_empty() {
            broken.push(format!("the app read it whole: {:?}", attackers(&app)));
        }
        broken.extend(victims(pushgate.addr, &app).await);
        broken.extend(rule_broken(&app, &case("early", "", Expect::Either)));
        assert!(
            broken.is_empty(),
            "content-length {}:\n{}",
            String::from_utf8_lossy(length),
            broken.join("\n")
        );
    }
}

/// `full` under `PUSHGATE_SUITE_SIZE=full` (integration/adversarial.sh),
/// else the size that fits CI.
fn full_size() -> bool {
    std::env::var("PUSHGATE_SUITE_SIZE").is_ok_and(|size| size == "full")
}

/// Many slow clients at once (slowloris: heads dripped a byte at a time,
/// and uploads that stop) hold no connection past their deadlines, and
/// the app's ordinary traffic goes on meanwhile.
#[tokio::test]
async fn slow_clients_by_the_hundred_are_cut_off_while_others_are_served() {
    let app = RecordingApp::start().await;
    let pushgate = Pushgate::start(
        &app.url(),
        "limits: {header_timeout: 1s, body_timeout: 1s}\n",
    )
    .await;
    let slow = if full_size() { 4000 } else { 200 };
    let mut drips = tokio::task::JoinSet::new();
    for i in 0..slow {
        let addr = pushgate.addr;
        drips.spawn(async move {
            let mut conn = Http1::connect(addr).await;
            if i % 2 == 0 {
                conn.send(b"GET /slow HTTP/1.1\r\nHost: app\r\nX-Drip: ")
                    .await;
            } else {
                conn.send(b"POST /slow HTTP/1.1\r\nHost: app\r\nContent-Length: 100\r\n\r\nabc")
                    .await;
            }
            // A byte every 300 ms keeps a head going but never ends it;
            // the upload stops outright.
            let started = tokio::time::Instant::now();
            loop {
                if i % 2 == 0 {
                    conn.send(b"x").await;
                }
                if conn.closes_within(Duration::from_millis(300)).await {
                    return started.elapsed();
                }
                if started.elapsed() > PATIENCE {
                    panic!("a slow client was never cut off");
                }
            }
        });
    }
    // Ordinary requests while the slow ones drip.
    for round in 0..20 {
        let mut conn = Http1::connect(pushgate.addr).await;
        conn.send(format!("GET /ok/{round} HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes())
            .await;
        let answer = conn.answer(false).await.unwrap().unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert!(answer.text().contains(&format!("target=/ok/{round}")));
    }
    let mut longest = Duration::ZERO;
    while let Some(held) = drips.join_next().await {
        longest = longest.max(held.unwrap());
    }
    assert!(longest < Duration::from_secs(5), "held for {longest:?}");
}

/// A flood of pipelined requests on one connection is answered one by one,
/// in order, each its own answer: pushgate reads a client no faster than it
/// answers it, so the flood waits in the client's socket, not in memory.
#[tokio::test]
async fn a_pipelined_flood_is_answered_in_order() {
    let app = RecordingApp::start().await;
    let pushgate = pushgate(&app).await;
    let count = if full_size() { 20_000 } else { 1_000 };
    let mut conn = Http1::connect(pushgate.addr).await;
    let mut writer = conn.take_writer();
    let writing = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut batch = String::new();
        for i in 0..count {
            batch.push_str(&format!("GET /flood/{i} HTTP/1.1\r\nHost: app\r\n\r\n"));
            if batch.len() > 64 * 1024 {
                writer.write_all(batch.as_bytes()).await.unwrap();
                batch.clear();
            }
        }
        writer.write_all(batch.as_bytes()).await.unwrap();
        writer
    });
    for i in 0..count {
        let answer = conn.answer(false).await.unwrap().expect("an answer");
        assert_eq!(answer.status, 200);
        assert!(
            answer.text().contains(&format!("target=/flood/{i} ")),
            "answer {i}: {}",
            answer.text()
        );
    }
    drop(writing.await.unwrap());
    assert_eq!(attackers(&app).len(), count);
    assert!(victims(pushgate.addr, &app).await.is_empty());
}

/// Connections opened and dropped as fast as a client can, some mid-head,
/// some mid-upload: the server stays up and serves the next client.
#[tokio::test]
async fn a_flood_of_abandoned_connections_leaves_pushgate_serving() {
    let app = RecordingApp::start().await;
    let pushgate = pushgate(&app).await;
    let count = if full_size() { 20_000 } else { 1_000 };
    let shapes: [&[u8]; 4] = [
        b"",
        b"GET /a HTTP/1.1\r\nHost: a",
        b"POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nab",
        b"GET /a HTTP/1.1\r\nHost: app\r\n\r\n",
    ];
    for i in 0..count {
        let mut conn = Http1::connect(pushgate.addr).await;
        conn.send(shapes[i % shapes.len()]).await;
        drop(conn);
    }
    assert!(victims(pushgate.addr, &app).await.is_empty());
    assert!(rule_broken(&app, &case("flood", "", Expect::Either)).is_empty());
}
