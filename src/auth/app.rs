//! `auth.mode: upstream`: asking the app.

use super::grant::MAX_GRANT_BYTES;
use super::*;

/// `auth.mode: upstream`.
pub(super) struct AppAuth {
    /// The proxy's client and its budget of files: a connect's request to
    /// the app is written and answered on the thread that serves the
    /// connect, over that thread's kept-alive connections.
    pub(super) calls: AppCalls,
    pub(super) url: Uri,
    pub(super) refresh_url: Option<Uri>,
    pub(super) subscribe_url: Option<Uri>,
    pub(super) forward: Vec<HeaderName>,
    /// `log.access`: each auth request carries the connect's request id.
    pub(super) request_ids: bool,
    pub(super) timeout: Duration,
    pub(super) trusted_proxies: Vec<IpNet>,
    pub(super) cache: GrantCache,
    pub(super) stats: Mutex<AuthStats>,
}

impl AppAuth {
    pub(super) fn new(settings: &Settings, paths: &AuthPaths, calls: AppCalls) -> AppAuth {
        let upstream = &settings.upstream;
        let options = &settings.config.auth.upstream;
        AppAuth {
            calls,
            url: upstream.uri(Some(&paths.check)),
            refresh_url: paths.refresh.as_ref().map(|path| upstream.uri(Some(path))),
            subscribe_url: paths
                .subscribe
                .as_ref()
                .map(|path| upstream.uri(Some(path))),
            forward: settings.forward_headers.clone(),
            request_ids: settings.config.log.access,
            timeout: options.timeout,
            trusted_proxies: settings.trusted_proxies.clone(),
            cache: GrantCache::new(options.cache_size, options.cache_ttl),
            stats: Mutex::default(),
        }
    }

    pub(super) async fn authorize(&self, request: AuthRequest<'_>) -> Result<Grant, Refusal> {
        let body = auth_body(&request);
        let credentials = self.credentials(request.headers, request.conn);
        let key = self.cache.key(&credentials, &body);
        if let Some(grant) = self.cache.get(&key) {
            self.stats.lock().expect("auth stats lock").cached += 1;
            return Ok(grant);
        }
        let started = Instant::now();
        // The request's id (set with `log.access`) goes to the app too, so
        // its logs and pushgate's name the same connect; it stays out of
        // the credentials, which key the grant cache.
        let sent = match request.headers.get(crate::conn::REQUEST_ID) {
            Some(id) if self.request_ids => {
                let mut with_id = credentials.headers().clone();
                with_id.insert(crate::conn::REQUEST_ID, id.clone());
                std::borrow::Cow::Owned(Credentials::new(with_id))
            }
            _ => std::borrow::Cow::Borrowed(&credentials),
        };
        let outcome = self
            .exchange(&self.url, &sent, &body)
            .await
            .and_then(|answer| {
                let grant = grant_or_refusal(answer.status, &answer.body, |why| {
                    self.unavailable(&self.url, why)
                })?;
                Ok((grant, answer.no_store))
            });
        let mut stats = self.stats.lock().expect("auth stats lock");
        stats.request_seconds.observe(started.elapsed());
        match outcome {
            Ok((grant, no_store)) => {
                stats.allowed += 1;
                drop(stats);
                if !no_store {
                    self.cache.put(key, grant.clone());
                }
                Ok(grant)
            }
            Err(err) => {
                match err.kind {
                    Kind::Unauthenticated => stats.unauthenticated += 1,
                    Kind::Forbidden => stats.forbidden += 1,
                    _ => stats.unavailable += 1,
                }
                Err(err)
            }
        }
    }

    /// The headers the app is sent on this connection's behalf.
    pub(super) fn credentials(&self, headers: &HeaderMap, conn: ConnInfo) -> Credentials {
        forwarded(&self.forward, &self.trusted_proxies, headers, conn)
    }

    /// One request to the app: POST `body` to `url` with the credentials.
    /// Returns the status and the body; no answer in time, a failed
    /// connection or an unreadable body is `503 auth_unavailable`.
    pub(super) async fn exchange(
        &self,
        url: &Uri,
        credentials: &Credentials,
        body: &[u8],
    ) -> Result<AppAnswer, Refusal> {
        let target = url.path_and_query().map_or("/", |target| target.as_str());
        let answer = self
            .calls
            .post(
                target,
                credentials.headers(),
                body,
                self.timeout,
                MAX_GRANT_BYTES,
            )
            .await
            .map_err(|err| {
                let why = match err {
                    CallError::NoAnswer => "no answer within auth.upstream.timeout".to_owned(),
                    err => err.to_string(),
                };
                self.unavailable(url, &why)
            })?;
        Ok(AppAnswer {
            no_store: says_no_store(&answer.headers),
            status: answer.status,
            body: answer.body,
        })
    }

    pub(super) fn unavailable(&self, url: &Uri, why: &str) -> Refusal {
        tracing::warn!(%url, why, "request to the app failed; refused with 503");
        Refusal::new(
            Kind::Unavailable,
            "auth_unavailable",
            "the app could not confirm this connection; try again later",
        )
    }
}

/// The headers the app is sent on a connection's behalf: the client's
/// `forward` headers and `X-Forwarded-For`.
pub(super) fn forwarded(
    forward: &[HeaderName],
    trusted_proxies: &[IpNet],
    headers: &HeaderMap,
    conn: ConnInfo,
) -> Credentials {
    let mut forwarded = HeaderMap::new();
    for name in forward {
        for value in headers.get_all(name) {
            forwarded.append(name.clone(), value.clone());
        }
    }
    forwarded.insert(
        "x-forwarded-for",
        forwarded_for(headers, conn, trusted_proxies),
    );
    // The JSON content type and accept are added when a call is sent
    // (`AppCalls::post`), not kept per connection.
    Credentials::new(forwarded)
}

/// The JSON body of an auth request.
pub(super) fn auth_body(request: &AuthRequest<'_>) -> Vec<u8> {
    let body = serde_json::json!({
        "transport": request.transport,
        "channels": request.channels,
        "path": request.path,
        "query": query_for_app(request.query),
    });
    serde_json::to_vec(&body).expect("a JSON value serializes")
}

/// The app's answer to one request.
pub(super) struct AppAnswer {
    pub(super) status: StatusCode,
    pub(super) body: Bytes,
    /// `Cache-Control: no-store`: the app asks that the grant not be kept.
    pub(super) no_store: bool,
}

/// Whether `Cache-Control` holds `no-store`. Only that directive is
/// honoured: web frameworks send `no-cache`, `private` or `max-age=0` on
/// every answer by default, which says nothing about a grant, while
/// `no-store` is asked for on purpose.
pub(super) fn says_no_store(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|directive| directive.trim().eq_ignore_ascii_case("no-store"))
}

/// The connection's query as the app is sent it: without the client's
/// resume position (`since`, `last_event_id`), which moves with every
/// long-poll and says nothing about who the client is. Every other
/// parameter is passed as the client wrote it.
pub(super) fn query_for_app(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(name, _)| name);
            let name: String = form_urlencoded::parse(name.as_bytes())
                .next()
                .map(|(name, _)| name.into_owned())
                .unwrap_or_default();
            !pair.is_empty() && name != "since" && name != "last_event_id"
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn channel(name: &str) -> ChannelName {
        ChannelName::parse(name).unwrap()
    }

    #[test]
    fn only_no_store_keeps_an_answer_out_of_the_cache() {
        let says = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::CACHE_CONTROL, HeaderValue::from_str(value).unwrap());
            }
            says_no_store(&headers)
        };
        assert!(says(&["no-store"]));
        assert!(says(&["private, No-Store"]));
        assert!(says(&["max-age=60", "no-store"]));
        assert!(!says(&[]));
        // What frameworks send on every answer says nothing about grants.
        assert!(!says(&["no-cache, private"]));
        assert!(!says(&["max-age=0, private, must-revalidate"]));
        assert!(!says(&["no-storex", "x-no-store"]));
    }

    #[test]
    fn the_app_is_sent_the_query_without_the_resume_position() {
        for (query, sent) in [
            ("channel=a&timeout=0", "channel=a&timeout=0"),
            (
                "channel=a&since=1.340ca71c&timeout=5",
                "channel=a&timeout=5",
            ),
            ("last_event_id=1.x&channel=a", "channel=a"),
            ("%73ince=1.x&channel=a", "channel=a"),
            ("channel=a&since", "channel=a"),
            ("channel=a&&channel=b", "channel=a&channel=b"),
            ("channel=a%26since%3Dx", "channel=a%26since%3Dx"),
            ("sincere=1&token=t", "sincere=1&token=t"),
            ("", ""),
        ] {
            assert_eq!(query_for_app(query), sent, "{query}");
        }
    }

    /// Everything a client's connect can vary that reaches the auth
    /// request, or might wrongly be thought to.
    #[derive(Debug, Clone)]
    struct Connect {
        cookies: Vec<String>,
        authorization: Option<String>,
        /// Not forwarded: must not matter.
        user_agent: Option<String>,
        peer: std::net::IpAddr,
        /// Taken into the chain only from a trusted proxy (10.0.0.0/8).
        x_forwarded_for: Option<String>,
        transport: String,
        channels: Vec<String>,
        path: String,
        query: String,
    }

    const FORWARD: [HeaderName; 2] = [header::COOKIE, header::AUTHORIZATION];

    impl Connect {
        /// The auth request this connect makes: its credentials and body.
        fn request(&self) -> (Credentials, Vec<u8>) {
            let mut headers = HeaderMap::new();
            for cookie in &self.cookies {
                headers.append(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
            }
            let optional = [
                (header::AUTHORIZATION, &self.authorization),
                (header::USER_AGENT, &self.user_agent),
                (
                    HeaderName::from_static("x-forwarded-for"),
                    &self.x_forwarded_for,
                ),
            ];
            for (name, value) in optional {
                if let Some(value) = value {
                    headers.insert(name, HeaderValue::from_str(value).unwrap());
                }
            }
            let conn = ConnInfo {
                peer: std::net::SocketAddr::new(self.peer, 40000),
                tls: false,
            };
            let trusted = ["10.0.0.0/8".parse().unwrap()];
            let credentials = forwarded(&FORWARD, &trusted, &headers, conn);
            let channels: Vec<ChannelName> = self.channels.iter().map(|c| channel(c)).collect();
            let body = auth_body(&AuthRequest {
                transport: &self.transport,
                channels: &channels,
                headers: &headers,
                path: &self.path,
                query: &self.query,
                conn,
            });
            (credentials, body)
        }

        /// What the app sees of that request, byte for byte.
        fn seen_by_app(&self) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
            let (credentials, body) = self.request();
            let headers = credentials
                .headers()
                .iter()
                .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
                .collect();
            (headers, body)
        }
    }

    /// One change to a connect, for the battery below.
    type Change = Box<dyn Fn(&mut Connect)>;

    fn alice() -> Connect {
        Connect {
            cookies: vec!["session=alice".into()],
            authorization: None,
            user_agent: Some("a browser".into()),
            peer: "127.0.0.2".parse().unwrap(),
            x_forwarded_for: None,
            transport: "sse".into(),
            channels: vec!["chat:1".into()],
            path: "/realtime/sse".into(),
            query: "channel=chat:1".into(),
        }
    }

    /// Invariant of [`GrantCache::key`], in a battery: a change to any one
    /// thing the app is sent changes the key; a change to anything it is not
    /// sent does not.
    #[test]
    fn the_cache_key_changes_with_every_input_of_the_auth_request() {
        let cache = GrantCache::new(100, Duration::from_secs(60));
        let key = |connect: &Connect| {
            let (credentials, body) = connect.request();
            cache.key(&credentials, &body)
        };
        let base = key(&alice());
        assert_eq!(base, key(&alice()), "the same request, the same key");

        let changed: Vec<(&str, Change)> = vec![
            (
                "cookie",
                Box::new(|c| c.cookies = vec!["session=alicf".into()]),
            ),
            (
                "a second cookie header",
                Box::new(|c| c.cookies.push("x=1".into())),
            ),
            ("no cookie", Box::new(|c| c.cookies.clear())),
            (
                "authorization",
                Box::new(|c| c.authorization = Some("Bearer t".into())),
            ),
            (
                "client address",
                Box::new(|c| c.peer = "127.0.0.3".parse().unwrap()),
            ),
            ("IPv6 client", Box::new(|c| c.peer = "::2".parse().unwrap())),
            ("transport", Box::new(|c| c.transport = "poll".into())),
            ("channels", Box::new(|c| c.channels = vec!["chat:2".into()])),
            (
                "another channel",
                Box::new(|c| c.channels.push("news".into())),
            ),
            (
                "channel order",
                Box::new(|c| c.channels.insert(0, "news".into())),
            ),
            ("no channels", Box::new(|c| c.channels.clear())),
            ("path", Box::new(|c| c.path = "/realtime/poll".into())),
            (
                "query",
                Box::new(|c| c.query = "channel=chat:1&timeout=5".into()),
            ),
            // From a trusted proxy, the chain it forwards is sent on.
            (
                "the chain from a trusted proxy",
                Box::new(|c| {
                    c.peer = "10.1.2.3".parse().unwrap();
                    c.x_forwarded_for = Some("203.0.113.9".into());
                }),
            ),
        ];
        let mut keys = vec![base];
        for (what, change) in &changed {
            let mut connect = alice();
            change(&mut connect);
            let changed = key(&connect);
            assert!(!keys.contains(&changed), "changing the {what} kept a key");
            keys.push(changed);
        }

        let same: Vec<(&str, Change)> = vec![
            (
                "user agent",
                Box::new(|c| c.user_agent = Some("another".into())),
            ),
            // An untrusted peer's X-Forwarded-For is replaced, not sent.
            (
                "forged X-Forwarded-For",
                Box::new(|c| c.x_forwarded_for = Some("10.9.9.9".into())),
            ),
            (
                "resume position",
                Box::new(|c| c.query = "channel=chat:1&last_event_id=1.340ca71c".into()),
            ),
        ];
        for (what, change) in &same {
            let mut connect = alice();
            change(&mut connect);
            assert_eq!(alice().seen_by_app(), connect.seen_by_app(), "{what}");
            assert_eq!(key(&connect), base, "changing the {what} changed the key");
        }

        // Parts are length-prefixed: moving bytes between two values, or
        // between a value and the body, is a different request.
        let split = |cookies: &[&str]| {
            let mut connect = alice();
            connect.cookies = cookies.iter().map(|c| (*c).to_owned()).collect();
            key(&connect)
        };
        assert_ne!(split(&["a", "bc"]), split(&["ab", "c"]));
        assert_ne!(split(&["a", ""]), split(&["a"]));
        let mut both = alice();
        both.authorization = Some("x".into());
        let mut cookie_only = alice();
        cookie_only.cookies = vec!["session=alicex".into()];
        assert_ne!(key(&both), key(&cookie_only));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_connect() -> impl Strategy<Value = Connect> {
            let value = "[ -~]{0,10}";
            (
                proptest::collection::vec(value, 0..3),
                proptest::option::of(value),
                proptest::option::of(value),
                prop_oneof![
                    Just("127.0.0.2".parse().unwrap()),
                    Just("127.0.0.3".parse().unwrap()),
                    Just("10.0.0.1".parse().unwrap()),
                    Just("::1".parse().unwrap()),
                ],
                proptest::option::of(prop_oneof![
                    Just("203.0.113.9".to_owned()),
                    Just("203.0.113.9, 10.0.0.2".to_owned())
                ]),
                prop_oneof![Just("sse"), Just("poll"), Just("websocket")],
                proptest::collection::vec("[a-z:]{1,6}", 0..3),
                prop_oneof![Just("/realtime/sse"), Just("/realtime/poll")],
                "(channel=[a-z]{1,3}|since=[0-9.]{1,4}|timeout=[0-9])(&(channel=[a-z]{1,3}|since=[0-9.]{1,4}|timeout=[0-9])){0,2}",
            )
                .prop_map(
                    |(cookies, authorization, user_agent, peer, x_forwarded_for, transport, channels, path, query)| Connect {
                        cookies,
                        authorization,
                        user_agent,
                        peer,
                        x_forwarded_for,
                        transport: transport.to_owned(),
                        channels,
                        path: path.to_owned(),
                        query,
                    },
                )
        }

        /// Changes one thing of a connect, picked by `which`.
        fn mutate(connect: &mut Connect, which: u8, text: String) {
            match which % 9 {
                0 => connect.cookies.push(text),
                1 => connect.authorization = Some(text),
                2 => connect.user_agent = Some(text),
                3 => connect.peer = "127.0.0.9".parse().unwrap(),
                4 => connect.x_forwarded_for = Some("198.51.100.1".into()),
                5 => connect.transport = "websocket".into(),
                6 => connect.channels.push("z".into()),
                7 => connect.path = "/realtime/ws".into(),
                _ => connect.query.push_str("&since=1.2"),
            }
        }

        proptest! {
            /// Invariant of [`GrantCache::key`]: two connects share a key
            /// exactly when the app would be sent the same request.
            #[test]
            fn prop_keys_are_equal_exactly_when_the_app_sees_the_same(
                a in any_connect(),
                which in any::<u8>(),
                text in "[ -~]{0,10}",
                other in any_connect(),
            ) {
                let cache = GrantCache::new(10, Duration::from_secs(60));
                let key = |connect: &Connect| {
                    let (credentials, body) = connect.request();
                    cache.key(&credentials, &body)
                };
                let mut b = a.clone();
                mutate(&mut b, which, text);
                for b in [&b, &other] {
                    prop_assert_eq!(
                        key(&a) == key(b),
                        a.seen_by_app() == b.seen_by_app(),
                        "{:?} / {:?}", a, b
                    );
                }
            }
        }
    }
}
