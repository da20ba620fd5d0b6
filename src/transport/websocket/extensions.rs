//! `Sec-WebSocket-Extensions` (RFC 6455 §9.1): the client's offers read
//! with a parser that refuses what is malformed rather than guessing, and
//! the one extension pushgate takes, permessage-deflate (RFC 7692), when an
//! offer's parameters allow how pushgate compresses.
//!
//! pushgate compresses each message on its own (no context takeover) with
//! a full 32 KiB window, and inflates each of the client's messages on its
//! own too, with a fresh inflater that reads any window size. So an offer
//! is taken unless it asks for a smaller server window (the compressor
//! cannot shrink its window), names a parameter pushgate does not know, or
//! names one twice. The answer always adds `client_no_context_takeover`
//! (RFC 7692 §7.1.1.1 lets a server add it): no connection keeps an
//! inflater's window between messages.

use http::header::SEC_WEBSOCKET_EXTENSIONS;
use http::{HeaderMap, HeaderValue};

/// The extension pushgate takes.
const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// The answer to an accepted permessage-deflate offer.
pub(in crate::transport) fn deflate_accepted() -> HeaderValue {
    HeaderValue::from_static(
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    )
}

/// One extension offered: its name and parameters, in order; a quoted
/// value is unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Offer {
    pub name: String,
    pub params: Vec<(String, Option<String>)>,
}

/// A `Sec-WebSocket-Extensions` field that breaks the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Malformed;

/// Whether the handshake's `Sec-WebSocket-Extensions` fields offer
/// permessage-deflate in a form pushgate takes. Any malformed field means
/// no extension at all: what the client meant cannot be known.
pub(in crate::transport) fn offers_deflate(headers: &HeaderMap) -> bool {
    let mut offers = Vec::new();
    for field in headers.get_all(SEC_WEBSOCKET_EXTENSIONS) {
        match parse(field.as_bytes()) {
            Ok(more) => offers.extend(more),
            Err(Malformed) => return false,
        }
    }
    offers.iter().any(deflate_acceptable)
}

/// Whether `offer` is permessage-deflate with parameters pushgate honours.
fn deflate_acceptable(offer: &Offer) -> bool {
    if !offer.name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE) {
        return false;
    }
    let mut seen: Vec<&str> = Vec::with_capacity(offer.params.len());
    for (name, value) in &offer.params {
        if seen.iter().any(|seen| seen.eq_ignore_ascii_case(name)) {
            return false;
        }
        seen.push(name);
        let value = value.as_deref();
        let honoured = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
            // The client's window is the client's choice: any inflates.
            "client_max_window_bits" => value.is_none_or(|bits| window_bits(bits).is_some()),
            // The compressor always uses the full window.
            "server_max_window_bits" => value.and_then(window_bits) == Some(15),
            _ => false,
        };
        if !honoured {
            return false;
        }
    }
    true
}

/// A window size's bits: a decimal 8 to 15 without leading zeros
/// (RFC 7692 §7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    match value.as_bytes() {
        [digit @ b'8'..=b'9'] => Some(digit - b'0'),
        [b'1', digit @ b'0'..=b'5'] => Some(10 + digit - b'0'),
        _ => None,
    }
}

/// The offers of one field:
///
/// ```text
/// extension-list = 1#extension                   (empty elements allowed)
/// extension      = token *( OWS ";" OWS param )
/// param          = token [ OWS "=" OWS ( token / quoted-string ) ]
/// ```
///
/// A quoted value must still be a token once unquoted (RFC 6455 §9.1).
pub(super) fn parse(field: &[u8]) -> Result<Vec<Offer>, Malformed> {
    let mut reader = Reader {
        bytes: field,
        at: 0,
    };
    let mut offers = Vec::new();
    loop {
        reader.skip_space();
        match reader.peek() {
            None => break,
            Some(b',') => {
                reader.at += 1;
                continue;
            }
            Some(_) => {}
        }
        let name = reader.token()?;
        let mut params = Vec::new();
        loop {
            reader.skip_space();
            match reader.peek() {
                Some(b';') => {
                    reader.at += 1;
                    reader.skip_space();
                    params.push(reader.param()?);
                }
                Some(b',') | None => break,
                Some(_) => return Err(Malformed),
            }
        }
        offers.push(Offer { name, params });
    }
    if offers.is_empty() {
        return Err(Malformed);
    }
    Ok(offers)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    fn token(&mut self) -> Result<String, Malformed> {
        let start = self.at;
        while self.peek().is_some_and(is_tchar) {
            self.at += 1;
        }
        if self.at == start {
            return Err(Malformed);
        }
        Ok(ascii(&self.bytes[start..self.at]))
    }

    fn param(&mut self) -> Result<(String, Option<String>), Malformed> {
        let name = self.token()?;
        self.skip_space();
        if self.peek() != Some(b'=') {
            return Ok((name, None));
        }
        self.at += 1;
        self.skip_space();
        let value = if self.peek() == Some(b'"') {
            self.quoted()?
        } else {
            self.token()?
        };
        Ok((name, Some(value)))
    }

    /// A quoted string whose content, unescaped, is a token.
    fn quoted(&mut self) -> Result<String, Malformed> {
        self.at += 1;
        let mut value = Vec::new();
        loop {
            let byte = self.peek().ok_or(Malformed)?;
            self.at += 1;
            match byte {
                b'"' => break,
                b'\\' => {
                    let escaped = self.peek().ok_or(Malformed)?;
                    self.at += 1;
                    value.push(escaped);
                }
                _ => value.push(byte),
            }
        }
        if value.is_empty() || !value.iter().copied().all(is_tchar) {
            return Err(Malformed);
        }
        Ok(ascii(&value))
    }
}

/// RFC 7230 §3.2.6 `tchar`.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Bytes already checked to be token characters, as text.
fn ascii(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(fields: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for field in fields {
            headers.append(
                SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_str(field).unwrap(),
            );
        }
        headers
    }

    fn takes(fields: &[&str]) -> bool {
        offers_deflate(&headers(fields))
    }

    #[test]
    fn parses_offers_params_and_quoted_values() {
        let offers = parse(br#"permessage-deflate; client_max_window_bits="10" ;server_no_context_takeover, ,x-foo;a=b"#)
            .unwrap();
        assert_eq!(
            offers,
            vec![
                Offer {
                    name: "permessage-deflate".into(),
                    params: vec![
                        ("client_max_window_bits".into(), Some("10".into())),
                        ("server_no_context_takeover".into(), None),
                    ],
                },
                Offer {
                    name: "x-foo".into(),
                    params: vec![("a".into(), Some("b".into()))],
                },
            ]
        );
        let escaped = parse(br#"e; p = "1\5""#).unwrap();
        assert_eq!(escaped[0].params[0], ("p".into(), Some("15".into())));
    }

    #[test]
    fn refuses_what_breaks_the_grammar() {
        for field in [
            "",
            " , ,",
            ";",
            "permessage-deflate;",
            "permessage-deflate; ;",
            "permessage-deflate x",
            "permessage-deflate; a=",
            "permessage-deflate; a=\"\"",
            "permessage-deflate; a=\"b c\"",
            "permessage-deflate; a=\"unterminated",
            "permessage-deflate; a=\"\\",
            "permessage-deflate; a=b=c",
            "permessage-deflate; a=(b)",
            "per/message",
            "permessage-deflate; a=\"x\"y",
        ] {
            assert_eq!(parse(field.as_bytes()), Err(Malformed), "{field:?}");
        }
        assert_eq!(parse(b"permessage-deflate\xff"), Err(Malformed));
    }

    #[test]
    fn takes_the_offers_browsers_and_libraries_make() {
        // Chromium and Firefox.
        assert!(takes(&["permessage-deflate; client_max_window_bits"]));
        // Python websockets, and RFC 7692's examples.
        assert!(takes(&["permessage-deflate; client_max_window_bits=12"]));
        assert!(takes(&["permessage-deflate"]));
        assert!(takes(&[
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ]));
        assert!(takes(&["permessage-deflate; server_max_window_bits=15"]));
        assert!(takes(&[
            "permessage-deflate; server_max_window_bits=\"15\""
        ]));
        assert!(takes(&["PerMessage-Deflate; Client_Max_Window_Bits=8"]));
    }

    #[test]
    fn takes_the_first_offer_it_can_honour() {
        // A smaller server window first, then a fallback.
        assert!(takes(&[
            "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        ]));
        // Across fields.
        assert!(takes(&["x-webkit-deflate-frame", "permessage-deflate"]));
    }

    #[test]
    fn declines_offers_it_cannot_honour() {
        for field in [
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=08",
            "permessage-deflate; client_max_window_bits=+9",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=9",
            "permessage-deflate; mystery",
        ] {
            assert!(!takes(&[field]), "{field:?}");
        }
        assert!(!takes(&[]));
        // A malformed field anywhere: nothing is taken.
        assert!(!takes(&["permessage-deflate", "permessage-deflate; a=\""]));
    }

    proptest! {
        /// Any bytes: an answer, never a panic; what parses holds only
        /// tokens.
        #[test]
        fn prop_any_field_parses_or_is_refused(field in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(offers) = parse(&field) {
                prop_assert!(!offers.is_empty());
                for offer in offers {
                    prop_assert!(!offer.name.is_empty() && offer.name.bytes().all(is_tchar));
                    for (name, value) in offer.params {
                        prop_assert!(!name.is_empty() && name.bytes().all(is_tchar));
                        prop_assert!(value.is_none_or(|v| !v.is_empty() && v.bytes().all(is_tchar)));
                    }
                }
            }
        }

        /// Fields made from the grammar's own pieces, spaced and quoted
        /// every way, parse back to what they were made from.
        #[test]
        fn prop_written_offers_parse_back(
            offers in proptest::collection::vec(
                (
                    "[a-z][a-z_-]{0,12}",
                    proptest::collection::vec(("[a-z_]{1,12}", proptest::option::of("[0-9a-z]{1,3}"), any::<bool>()), 0..4),
                ),
                1..4,
            ),
            space in "[ \t]{0,2}",
        ) {
            let field = offers
                .iter()
                .map(|(name, params)| {
                    let mut text = name.clone();
                    for (param, value, quoted) in params {
                        text.push_str(&format!("{space};{space}{param}"));
                        if let Some(value) = value {
                            if *quoted {
                                text.push_str(&format!("{space}={space}\"{value}\""));
                            } else {
                                text.push_str(&format!("={value}"));
                            }
                        }
                    }
                    text
                })
                .collect::<Vec<_>>()
                .join(&format!("{space},{space}"));
            let parsed = parse(field.as_bytes()).unwrap();
            prop_assert_eq!(parsed.len(), offers.len());
            for (offer, (name, params)) in parsed.iter().zip(&offers) {
                prop_assert_eq!(&offer.name, name);
                let want: Vec<(String, Option<String>)> =
                    params.iter().map(|(p, v, _)| (p.clone(), v.clone())).collect();
                prop_assert_eq!(&offer.params, &want);
            }
        }
    }
}
