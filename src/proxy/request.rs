//! What a client's request must be to go to the app, and the fields it
//! goes with.
//!
//! pushgate forwards a request only in a form the app cannot read
//! differently from pushgate: one `Host` (or the authority of an
//! absolute-form target, RFC 9112 §3.2.2), framing pushgate writes itself,
//! no hop-by-hop fields, and, from a client that is not a trusted proxy, no
//! field that claims the client's address or original URL other than the
//! ones pushgate writes. A request it cannot forward exactly as framed is
//! refused with 400, never altered (docs/security.md).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};
use ipnet::IpNet;

use crate::app::Added;
use crate::conn::{chain_for, is_trusted, ConnInfo, X_FORWARDED_FOR};
use crate::headers::has_token;

/// Why a request is refused before it reaches the app (answered 400).
pub type Refusal = &'static str;

/// Fields that claim where a request came from or what URL it had before a
/// proxy rewrote it, which apps and frameworks commonly read: from a client
/// outside `upstream.trusted_proxies` each is removed (the three
/// `X-Forwarded-*` that pushgate writes are replaced). Documented in
/// docs/security.md; `upstream.untrusted_headers` adds to it.
pub const UNTRUSTED: [&str; 17] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-original-forwarded-for",
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-client-ip",
    "client-ip",
    "x-cluster-client-ip",
    "x-original-url",
    "x-rewrite-url",
];

/// Where the `Host` the app sees comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSource {
    /// The client's one `Host` field, as it is.
    Field(HeaderValue),
    /// The request target's authority (absolute form, or HTTP/2's
    /// `:authority`), which replaces any `Host` field.
    Authority(HeaderValue),
    /// None given (HTTP/1.0): the app's own authority is written.
    None,
}

impl HostSource {
    /// The value, when the client gave one.
    pub fn value(&self) -> Option<&HeaderValue> {
        match self {
            HostSource::Field(value) | HostSource::Authority(value) => Some(value),
            HostSource::None => None,
        }
    }
}

/// The checks every proxied request passes before anything is sent:
/// returns where its `Host` comes from, or why it is refused.
///
/// - HTTP/1.1 needs exactly one `Host`; more than one is refused in any
///   version (RFC 9112 §3.2).
/// - A `Host`, or a target's authority, is `host[:port]` and nothing else:
///   no user information, no spaces.
/// - An absolute-form target names `http` or `https`; its authority is the
///   host, whatever `Host` says. Over HTTP/2 a `Host` that disagrees with
///   `:authority` is refused: one of them would be a lie to somebody.
/// - A WebSocket upgrade carries no body: the app would read it as the
///   first bytes of the upgraded protocol, or as the next request.
pub fn admit<B>(
    request: &Request<B>,
    upgrade: bool,
    has_body: bool,
) -> Result<HostSource, Refusal> {
    if upgrade && has_body {
        return Err("a WebSocket upgrade request must not carry a body");
    }
    let headers = request.headers();
    let mut hosts = headers.get_all(header::HOST).iter();
    let field = hosts.next();
    if hosts.next().is_some() {
        return Err("the request has more than one Host field");
    }
    if let Some(field) = field {
        if !is_host(field.as_bytes()) {
            return Err("the Host field is not a host and an optional port");
        }
    }
    let uri = request.uri();
    if let Some(authority) = uri.authority() {
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err("the request target names a scheme other than http or https");
        }
        if !is_host(authority.as_str().as_bytes()) {
            return Err("the request target's authority is not a host and an optional port");
        }
        let value = HeaderValue::from_str(authority.as_str())
            .map_err(|_| "the request target's authority is not a host and an optional port")?;
        if request.version() == Version::HTTP_2 {
            if let Some(field) = field {
                if !field.as_bytes().eq_ignore_ascii_case(value.as_bytes()) {
                    return Err("the Host field and :authority name different hosts");
                }
            }
        }
        return Ok(HostSource::Authority(value));
    }
    match field {
        Some(field) => Ok(HostSource::Field(field.clone())),
        None if request.version() == Version::HTTP_11 => {
            Err("an HTTP/1.1 request needs a Host field")
        }
        None if request.version() >= Version::HTTP_2 => {
            Err("the request names no host (:authority or Host)")
        }
        None => Ok(HostSource::None),
    }
}

/// Whether `bytes` is `host[:port]` as a URI authority has it (RFC 3986
/// §3.2.2: a reg-name, an IPv4 address, or an IP literal in brackets),
/// without user information, path, or anything else.
fn is_host(bytes: &[u8]) -> bool {
    // One pass: every byte of the allowed set, a `[` only first, at most
    // one `]`, and only after a `[`.
    let mut brackets = (false, false);
    for (at, &b) in bytes.iter().enumerate() {
        match b {
            b'[' if at == 0 => brackets.0 = true,
            b']' if brackets.0 && !brackets.1 => brackets.1 = true,
            b'[' | b']' => return false,
            b if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%:".contains(&b) => {}
            _ => return false,
        }
    }
    !bytes.is_empty() && brackets.0 == brackets.1
}

/// The `Upgrade` value when this is an HTTP/1.1 WebSocket upgrade request.
pub fn websocket_upgrade<B>(request: &Request<B>) -> Option<HeaderValue> {
    if request.version() != Version::HTTP_11 {
        return None;
    }
    let headers = request.headers();
    // `Upgrade` first: most requests have none, and a browser's every
    // request has a `Connection` to read through.
    (has_token(headers, header::UPGRADE, "websocket")
        && has_token(headers, header::CONNECTION, "upgrade"))
    .then(|| request.headers().get(header::UPGRADE).cloned())
    .flatten()
}

/// What one pass over a request's field names found.
#[derive(Debug, Default)]
struct Found {
    /// Which of [`HOP_BY_HOP`] are present, a bit each.
    hop_by_hop: u16,
    /// Which of [`UNTRUSTED`] are present, a bit each.
    claims: u32,
    /// One of `upstream.untrusted_headers` is present.
    extra_claims: bool,
    expect: bool,
}

/// Looks at each field name once, by its length first: most names of a
/// browser's request are none of these, and are told so in a comparison
/// or two.
fn find(headers: &HeaderMap, extra: &[HeaderName]) -> Found {
    let mut found = Found::default();
    for name in headers.keys() {
        let text = name.as_str();
        if let Some(at) = HOP_BY_HOP.iter().position(|hop| *hop == text) {
            found.hop_by_hop |= 1 << at;
        } else if let Some(at) = claims_may_start(text)
            .then(|| UNTRUSTED.iter().position(|claim| *claim == text))
            .flatten()
        {
            found.claims |= 1 << at;
        } else if name == header::EXPECT {
            found.expect = true;
        } else if !extra.is_empty() && extra.contains(name) {
            found.extra_claims = true;
        }
    }
    found
}

/// Whether `name` starts as a name of [`UNTRUSTED`] does: a browser's
/// fields (`host`, `accept`, `user-agent`, `sec-fetch-*`...) mostly do not,
/// and skip the list.
fn claims_may_start(name: &str) -> bool {
    matches!(name.as_bytes().first(), Some(b'x' | b'f' | b't' | b'c'))
}

/// Who the client is to the app: whether its forwarding fields are
/// believed, and which fields are removed when they are not.
#[derive(Debug, Clone, Default)]
pub struct Forwarding {
    pub trusted_proxies: Vec<IpNet>,
    /// `upstream.untrusted_headers`, lower-cased.
    pub extra_untrusted: Vec<HeaderName>,
}

impl Forwarding {
    pub fn is_trusted(&self, conn: ConnInfo) -> bool {
        is_trusted(&self.trusted_proxies, conn)
    }

    /// Makes an admitted request's fields ready for the app, in one pass
    /// over their names, and returns the fields pushgate adds (written
    /// after the others, so the lean client need not grow the map):
    ///
    /// - hop-by-hop fields go, and every field `Connection` names;
    /// - `Expect: 100-continue` goes: pushgate tells the client to go on
    ///   and sends the body it gets; an app told to expect it might answer
    ///   before the body and read the body as the next request;
    /// - HTTP/2's split `Cookie` fields become one (RFC 9113 §8.2.3);
    /// - `Host` is `host` ([`admit`]);
    /// - the forwarding fields: a chain that came with the request is kept
    ///   (and extended) only when the peer is a trusted proxy; from anyone
    ///   else every field of [`UNTRUSTED`] (and the configured extra ones)
    ///   goes, since anyone could have written it.
    pub fn fields_for_app(
        &self,
        headers: &mut HeaderMap,
        version: Version,
        conn: ConnInfo,
        host: HostSource,
    ) -> Added {
        let found = find(headers, &self.extra_untrusted);
        if found.expect
            && headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        {
            headers.remove(header::EXPECT);
        }
        if version == Version::HTTP_2 {
            join_cookies(headers);
        }
        let named_gone = remove_found(headers, found.hop_by_hop);

        let trusted = self.is_trusted(conn);
        let mut added = Added::default();
        added.push(X_FORWARDED_FOR, chain_for(headers, conn, trusted));
        let claims = found.claims != 0 || found.extra_claims;
        let kept = |name| trusted && claims && headers.contains_key(name);
        let (keep_proto, keep_host) = (kept(X_FORWARDED_PROTO), kept(X_FORWARDED_HOST));
        if !keep_proto {
            let proto = if conn.tls { "https" } else { "http" };
            added.push(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if let (false, Some(host)) = (keep_host, host.value()) {
            added.push(X_FORWARDED_HOST, host.clone());
        }
        if claims {
            headers.remove(X_FORWARDED_FOR);
            if !keep_proto {
                headers.remove(X_FORWARDED_PROTO);
            }
            if !keep_host {
                headers.remove(X_FORWARDED_HOST);
            }
            if !trusted {
                for (at, name) in UNTRUSTED.iter().enumerate() {
                    if found.claims & 1 << at != 0 {
                        headers.remove(*name);
                    }
                }
                if found.extra_claims {
                    for name in &self.extra_untrusted {
                        headers.remove(name);
                    }
                }
            }
        }

        match host {
            // The common case: the client's one `Host` stays where it is,
            // unless `Connection` named it.
            HostSource::Field(host) if named_gone && !headers.contains_key(header::HOST) => {
                added.push(header::HOST, host)
            }
            HostSource::Field(_) | HostSource::None => {}
            HostSource::Authority(host) => {
                headers.remove(header::HOST);
                added.push(header::HOST, host);
            }
        }
        added
    }
}

/// HTTP/2 may split `Cookie` into several fields; HTTP/1.1 wants one,
/// joined with `; ` (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for crumb in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
/// Compared as text: every field of every proxied message is checked
/// against these, and unequal lengths settle most comparisons at once.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Where `connection` stands in [`HOP_BY_HOP`].
const HOP_BY_HOP_CONNECTION: usize = 0;

/// Drops hop-by-hop headers, including every header the `Connection` header
/// names.
///
/// Only what is there is removed: one pass over the names marks which of
/// [`HOP_BY_HOP`] are present, so a browser's request, whose only one is
/// `Connection: keep-alive`, costs one removal rather than one per name
/// (each a hash and a probe, 10 of them about 2,900 instructions). A
/// token that is itself hop-by-hop (`keep-alive`, `upgrade`) is removed
/// as such, not looked up again.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let present = headers.keys().fold(0u16, |present, name| {
        HOP_BY_HOP
            .iter()
            .position(|hop| *hop == name.as_str())
            .map_or(present, |at| present | 1 << at)
    });
    remove_found(headers, present);
}

/// Removes the hop-by-hop fields marked in `present` (a bit per
/// [`HOP_BY_HOP`] name), and those `Connection` names; whether any field
/// `Connection` named was removed.
fn remove_found(headers: &mut HeaderMap, present: u16) -> bool {
    if present == 0 {
        return false;
    }
    let mut named_gone = false;
    if present & 1 << HOP_BY_HOP_CONNECTION != 0 {
        // Empty, and so never allocated, when every token is a hop-by-hop
        // name itself (a browser's `keep-alive`).
        let named: Vec<HeaderName> = connection_options(headers)
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in &named {
            named_gone |= headers.remove(name).is_some();
        }
    }
    for (at, name) in HOP_BY_HOP.iter().enumerate() {
        if present & 1 << at != 0 {
            headers.remove(*name);
        }
    }
    named_gone
}

/// The tokens of the `Connection` fields that are not hop-by-hop names
/// themselves: the fields they name are hop-by-hop too.
fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| {
            !token.is_empty() && !HOP_BY_HOP.iter().any(|hop| token.eq_ignore_ascii_case(hop))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, target: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::get(target).version(version);
        for host in hosts {
            builder = builder.header(header::HOST, *host);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn host_rules_hold_for_every_shape() {
        use HostSource::*;
        let v = |s: &'static str| HeaderValue::from_static(s);
        type Case = (
            Version,
            &'static str,
            &'static [&'static str],
            Result<HostSource, ()>,
        );
        let cases: Vec<Case> = vec![
            (Version::HTTP_11, "/a", &["app"], Ok(Field(v("app")))),
            (
                Version::HTTP_11,
                "/a",
                &["app:8080"],
                Ok(Field(v("app:8080"))),
            ),
            (
                Version::HTTP_11,
                "/a",
                &["[::1]:8080"],
                Ok(Field(v("[::1]:8080"))),
            ),
            (Version::HTTP_11, "/a", &[], Err(())),
            (Version::HTTP_11, "/a", &["app", "app"], Err(())),
            (Version::HTTP_11, "/a", &["user@app"], Err(())),
            (Version::HTTP_11, "/a", &["app evil"], Err(())),
            (Version::HTTP_11, "/a", &["app/x"], Err(())),
            (Version::HTTP_11, "/a", &[""], Err(())),
            (Version::HTTP_10, "/a", &[], Ok(None)),
            (Version::HTTP_10, "/a", &["app", "evil"], Err(())),
            (
                Version::HTTP_11,
                "http://other/a",
                &["app"],
                Ok(Authority(v("other"))),
            ),
            (
                Version::HTTP_11,
                "https://other:1/a",
                &[],
                Ok(Authority(v("other:1"))),
            ),
            (Version::HTTP_11, "ftp://other/a", &["app"], Err(())),
            (Version::HTTP_11, "http://u@other/a", &["app"], Err(())),
            (
                Version::HTTP_2,
                "http://app/a",
                &["app"],
                Ok(Authority(v("app"))),
            ),
            (
                Version::HTTP_2,
                "http://app/a",
                &["APP"],
                Ok(Authority(v("app"))),
            ),
            (Version::HTTP_2, "http://app/a", &["evil"], Err(())),
            (
                Version::HTTP_2,
                "http://app/a",
                &[],
                Ok(Authority(v("app"))),
            ),
            (Version::HTTP_2, "/a", &["app"], Ok(Field(v("app")))),
            (Version::HTTP_2, "/a", &[], Err(())),
        ];
        for (version, target, hosts, expected) in cases {
            let got = admit(&request(version, target, hosts), false, false).map_err(|_| ());
            assert_eq!(got, expected, "{version:?} {target} {hosts:?}");
        }
    }

    #[test]
    fn an_upgrade_with_a_body_is_refused_and_without_one_admitted() {
        let request = request(Version::HTTP_11, "/ws", &["app"]);
        assert!(admit(&request, true, true).is_err());
        assert!(admit(&request, true, false).is_ok());
        assert!(admit(&request, false, true).is_ok());
    }

    #[test]
    fn expect_goes_and_http2_cookies_are_joined() {
        let mut headers = HeaderMap::new();
        headers.insert(header::EXPECT, HeaderValue::from_static("100-Continue"));
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        let forwarding = Forwarding::default();
        let host = || HostSource::Field(HeaderValue::from_static("app"));
        let mut h1 = headers.clone();
        forwarding.fields_for_app(&mut h1, Version::HTTP_11, conn("192.0.2.1:5"), host());
        assert!(!h1.contains_key(header::EXPECT));
        assert_eq!(h1.get_all(header::COOKIE).iter().count(), 2);
        forwarding.fields_for_app(&mut headers, Version::HTTP_2, conn("192.0.2.1:5"), host());
        assert_eq!(
            headers.get_all(header::COOKIE).iter().collect::<Vec<_>>(),
            ["a=1; b=2"]
        );
    }

    fn conn(peer: &str) -> ConnInfo {
        ConnInfo {
            peer: peer.parse().unwrap(),
            tls: false,
        }
    }

    #[test]
    fn an_untrusted_client_loses_every_claim_and_a_trusted_one_keeps_them() {
        // The quick test by first letter lets every listed name through.
        assert!(UNTRUSTED.iter().all(|name| claims_may_start(name)));
        let forwarding = Forwarding {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            extra_untrusted: vec![HeaderName::from_static("x-my-client")],
        };
        let mut claims = HeaderMap::new();
        for name in UNTRUSTED.iter().chain(&["x-my-client"]) {
            claims.insert(*name, HeaderValue::from_static("6.6.6.6"));
        }
        claims.insert("x-other", HeaderValue::from_static("kept"));

        let mut untrusted = claims.clone();
        let host = || HostSource::Field(HeaderValue::from_static("app"));
        let added = forwarding.fields_for_app(
            &mut untrusted,
            Version::HTTP_11,
            conn("192.0.2.1:5"),
            host(),
        );
        assert_eq!(untrusted.keys().collect::<Vec<_>>(), ["x-other"]);
        let added: Vec<_> = added
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            added,
            [
                ("x-forwarded-for", "192.0.2.1"),
                ("x-forwarded-proto", "http"),
                ("x-forwarded-host", "app")
            ]
        );

        let mut trusted = claims.clone();
        let added =
            forwarding.fields_for_app(&mut trusted, Version::HTTP_11, conn("10.1.2.3:5"), host());
        assert_eq!(
            trusted.len(),
            claims.len() - 1,
            "only X-Forwarded-For is rewritten"
        );
        let added: Vec<_> = added
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(added, [("x-forwarded-for", "6.6.6.6, 10.1.2.3")]);
    }

    #[test]
    fn the_app_sees_the_admitted_host_whatever_connection_names() {
        let forwarding = Forwarding::default();
        let hosts = |headers: &HeaderMap, added: &Added| -> Vec<String> {
            headers
                .get_all(header::HOST)
                .iter()
                .chain(
                    added
                        .iter()
                        .filter(|(n, _)| *n == header::HOST)
                        .map(|(_, v)| v),
                )
                .map(|v| v.to_str().unwrap().to_owned())
                .collect()
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("app"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Host"));
        let field = HostSource::Field(HeaderValue::from_static("app"));
        let added =
            forwarding.fields_for_app(&mut headers, Version::HTTP_11, conn("192.0.2.1:5"), field);
        assert_eq!(hosts(&headers, &added), ["app"]);

        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("app"));
        let authority = HostSource::Authority(HeaderValue::from_static("other"));
        let added = forwarding.fields_for_app(
            &mut headers,
            Version::HTTP_11,
            conn("192.0.2.1:5"),
            authority,
        );
        assert_eq!(hosts(&headers, &added), ["other"]);
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_go() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn only_the_hop_by_hop_headers_present_go_whatever_their_case() {
        assert_eq!(HOP_BY_HOP[HOP_BY_HOP_CONNECTION], "connection");
        // A browser's request: `Connection: keep-alive` and nothing else of the kind.
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), [header::COOKIE]);

        // Every name of the list, and fields named in two `Connection`
        // fields in any case, one of them repeated.
        let mut headers = HeaderMap::new();
        for name in HOP_BY_HOP {
            headers.append(name, HeaderValue::from_static("x"));
        }
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("X-One, upgrade"),
        );
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static(" x-two ,x-one"),
        );
        for name in ["x-one", "x-two", "x-three"] {
            headers.append(name, HeaderValue::from_static("1"));
        }
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-three"]);
    }
}
