//! What the app (or a token) grants a connection: who it is, which
//! channels it may hear, until when.

use super::*;

/// Largest grant the app may answer with.
pub(super) const MAX_GRANT_BYTES: usize = 256 * 1024;
/// Longest a grant is taken to last (ten years); longer claims are capped.
pub(super) const MAX_GRANT_SECONDS: u64 = 10 * 365 * 86_400;
/// Most channel patterns in one grant.
pub(super) const MAX_GRANT_CHANNELS: usize = 10_000;

/// What a connection was granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Who the app says this is; `None` when nobody was asked.
    pub user: Option<String>,
    pub(super) channels: Channels,
    /// When the grant runs out (`expires_in`), if it does.
    pub expires_at: Option<Instant>,
    /// The app's `info`, kept as JSON text for presence.
    pub info: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Channels {
    /// Every channel (auth mode `none`).
    All,
    /// Exact names, and prefixes (from patterns ending in `*`). Boxed: every
    /// connection holds its grant, and `All` needs no room for lists.
    Listed(Box<Listed>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Listed {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl Grant {
    /// Everything, for auth mode `none`.
    pub fn everything() -> Grant {
        Grant {
            user: None,
            channels: Channels::All,
            expires_at: None,
            info: None,
        }
    }

    /// Adds one exact channel (the app allowed it through `subscribe_path`).
    pub fn allow(&mut self, channel: &ChannelName) {
        if let Channels::Listed(listed) = &mut self.channels {
            listed.exact.push(channel.as_str().to_owned());
        }
    }

    /// Whether this grant lets the connection hear `channel`.
    pub fn allows(&self, channel: &ChannelName) -> bool {
        match &self.channels {
            Channels::All => true,
            Channels::Listed(listed) => {
                let Listed { exact, prefixes } = &**listed;
                let name = channel.as_str();
                exact.iter().any(|e| e == name)
                    || prefixes.iter().any(|p| name.starts_with(p.as_str()))
            }
        }
    }
}

/// The app's answer to an auth request.
#[derive(Deserialize)]
pub(super) struct AppGrant {
    pub(super) user: String,
    pub(super) channels: Vec<String>,
    #[serde(default)]
    pub(super) expires_in: Option<u64>,
    #[serde(default)]
    pub(super) info: Option<Box<serde_json::value::RawValue>>,
}

/// A 200 grant, or the app's refusal with its reason, or 503.
pub(super) fn grant_or_refusal(
    status: StatusCode,
    body: &[u8],
    unavailable: impl Fn(&str) -> Refusal,
) -> Result<Grant, Refusal> {
    match status {
        StatusCode::OK => parse_grant(body).map_err(|why| unavailable(&why)),
        StatusCode::UNAUTHORIZED => Err(Refusal::new(
            Kind::Unauthenticated,
            "unauthenticated",
            reason(body, "the app does not know who this is"),
        )),
        StatusCode::FORBIDDEN => Err(Refusal::new(
            Kind::Forbidden,
            "forbidden",
            reason(body, "the app refused this connection"),
        )),
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => Err(unavailable(&format!(
            "the app answered {status}: it has no auth endpoint there; add one that answers \
             {{\"user\", \"channels\"}}, or set auth.upstream.path to it, or choose another \
             auth.mode"
        ))),
        other => Err(unavailable(&format!("the app answered {other}"))),
    }
}

pub(super) fn parse_grant(body: &[u8]) -> Result<Grant, String> {
    let grant: AppGrant = serde_json::from_slice(body).map_err(|err| {
        format!(
            "the app's 200 is not a grant ({{\"user\", \"channels\"}}): {err}; is \
             auth.upstream.path the app's auth endpoint?"
        )
    })?;
    if grant.user.is_empty() || grant.user.len() > 256 {
        return Err("the grant's user must be 1 to 256 bytes".into());
    }
    if grant.channels.len() > MAX_GRANT_CHANNELS {
        return Err(format!(
            "the grant lists over {MAX_GRANT_CHANNELS} channels"
        ));
    }
    Ok(grant_from(
        grant.user,
        grant.channels,
        grant.expires_in,
        grant.info,
    ))
}

/// A grant from its parts: channel patterns are exact names, or prefixes
/// when they end in `*`.
pub(super) fn grant_from(
    user: String,
    patterns: Vec<String>,
    expires_in: Option<u64>,
    info: Option<Box<serde_json::value::RawValue>>,
) -> Grant {
    let mut exact = Vec::new();
    let mut prefixes = Vec::new();
    for pattern in patterns.into_iter().take(MAX_GRANT_CHANNELS) {
        match pattern.strip_suffix('*') {
            Some(prefix) => prefixes.push(prefix.to_owned()),
            None => exact.push(pattern),
        }
    }
    Grant {
        user: Some(user),
        channels: Channels::Listed(Box::new(Listed { exact, prefixes })),
        expires_at: expires_in
            .map(|seconds| Instant::now() + Duration::from_secs(seconds.min(MAX_GRANT_SECONDS))),
        info: info.map(|info| info.get().to_owned()),
    }
}

/// The app's reason for a refusal, for the client: the JSON `reason` (or
/// `error`/`message`) field, or the text, printable and bounded.
pub(super) fn reason(body: &[u8], fallback: &str) -> String {
    let text = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| {
            ["reason", "error", "message"]
                .iter()
                .find_map(|key| value.get(key).and_then(|v| v.as_str()).map(str::to_owned))
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    printable(&text, fallback)
}

/// `text` for a client: control characters as spaces, trimmed, at most
/// [`MAX_REASON_BYTES`]; `fallback` when nothing is left.
pub fn printable(text: &str, fallback: &str) -> String {
    let mut clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned();
    if clean.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean.truncate(end);
    }
    if clean.is_empty() {
        fallback.to_owned()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(name: &str) -> ChannelName {
        ChannelName::parse(name).unwrap()
    }

    #[test]
    fn grants_allow_exact_names_and_prefixes() {
        let grant = parse_grant(br#"{"user": "42", "channels": ["chat:1", "user:42:*"], "expires_in": 60, "info": {"name": "Ada"}}"#).unwrap();
        assert_eq!(grant.user.as_deref(), Some("42"));
        assert!(grant.allows(&channel("chat:1")));
        assert!(!grant.allows(&channel("chat:10")));
        assert!(grant.allows(&channel("user:42:inbox")));
        assert!(grant.allows(&channel("user:42:")));
        assert!(!grant.allows(&channel("user:43:inbox")));
        assert!(grant.expires_at.is_some());
        assert_eq!(grant.info.as_deref(), Some(r#"{"name": "Ada"}"#));
        let all = parse_grant(br#"{"user": "root", "channels": ["*"]}"#).unwrap();
        assert!(all.allows(&channel("anything")));
    }

    #[test]
    fn a_200_that_is_not_a_grant_is_refused() {
        for body in [
            &b"<html>ok</html>"[..],
            br#"{"channels": []}"#,
            br#"{"user": "", "channels": []}"#,
            br#"{"user": 42, "channels": []}"#,
            br#"{"user": "a", "channels": "all"}"#,
        ] {
            assert!(
                parse_grant(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn an_app_without_an_auth_endpoint_is_told_what_to_do() {
        for status in [StatusCode::NOT_FOUND, StatusCode::METHOD_NOT_ALLOWED] {
            let why = std::cell::RefCell::new(String::new());
            let refused = grant_or_refusal(status, b"<html>", |text| {
                *why.borrow_mut() = text.to_owned();
                Refusal::new(Kind::Unavailable, "auth_unavailable", "x")
            });
            assert!(refused.is_err());
            assert!(
                why.borrow().contains("no auth endpoint"),
                "{}",
                why.borrow()
            );
        }
        let page = grant_or_refusal(StatusCode::OK, b"<html>", |text| {
            assert!(
                text.contains("is auth.upstream.path the app's auth endpoint"),
                "{text}"
            );
            Refusal::new(Kind::Unavailable, "auth_unavailable", "x")
        });
        assert!(page.is_err());
    }

    #[test]
    fn reasons_are_printable_and_bounded() {
        assert_eq!(reason(br#"{"reason": "banned"}"#, "x"), "banned");
        assert_eq!(reason(b"plain\ntext", "x"), "plain text");
        assert_eq!(reason(b"", "fallback"), "fallback");
        assert_eq!(
            reason("é".repeat(300).as_bytes(), "x").len(),
            MAX_REASON_BYTES
        );
    }
}
