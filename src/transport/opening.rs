//! How an HTTP realtime request opens: the method, the Origin, and the
//! query naming its channels and resume position.

use super::*;

/// What an HTTP (SSE or long-poll) realtime request opens with: the method
/// (GET, or a CORS preflight answered at once), the Origin, and a query
/// naming at least one channel.
pub(super) enum Opening {
    Preflight(Result<Response<Body>, Refusal>),
    Stream(OriginCheck, RealtimeQuery),
}

pub(super) fn open_http(
    realtime: &Realtime,
    request: &Request<Incoming>,
    known: &[&str],
) -> Result<Opening, Refusal> {
    if let Some(answer) = get_or_preflight(realtime, request) {
        return Ok(Opening::Preflight(answer));
    }
    let origin = realtime.origins().check(request);
    if origin == OriginCheck::Refused {
        return Err(origin_refused());
    }
    let query = RealtimeQuery::parse(request.uri().query(), known, realtime.auth().token_param())?;
    if query.channels.is_empty() {
        return Err(Refusal::bad_request(
            "missing_channel",
            "name at least one channel: ?channel=...",
        ));
    }
    Ok(Opening::Stream(origin, query))
}

/// SSE and long-poll answer GET and CORS preflights only.
pub(super) fn get_or_preflight(
    realtime: &Realtime,
    request: &Request<Incoming>,
) -> Option<Result<Response<Body>, Refusal>> {
    match *request.method() {
        Method::GET => None,
        Method::OPTIONS => Some(preflight(&realtime.origins(), request)),
        _ => Some(Err(Refusal::method_not_allowed("GET, OPTIONS"))),
    }
}

/// The realtime query string: `channel=` (repeated), and per transport
/// `since`, `last_event_id`, `timeout`.
#[derive(Debug, Default)]
pub(super) struct RealtimeQuery {
    pub(super) channels: Vec<ChannelName>,
    pub(super) since: Option<String>,
    pub(super) last_event_id: Option<String>,
    pub(super) timeout: Option<String>,
}

impl RealtimeQuery {
    /// Parses the query, accepting only `known` parameters besides `channel`.
    /// `token_param` is the JWT query parameter, when tokens may come that
    /// way; auth reads it.
    pub(super) fn parse(
        query: Option<&str>,
        known: &[&str],
        token_param: Option<&str>,
    ) -> Result<RealtimeQuery, Refusal> {
        let query = query.unwrap_or("");
        if query.len() > 16 * 1024 {
            return Err(Refusal::bad_request(
                "bad_query",
                "the query string is over 16 KiB",
            ));
        }
        let mut parsed = RealtimeQuery::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let single = |slot: &mut Option<String>| {
                if slot.is_some() {
                    return Err(Refusal::bad_request(
                        "bad_query",
                        format!("parameter `{key}` is given twice"),
                    ));
                }
                *slot = Some(value.clone().into_owned());
                Ok(())
            };
            match key.as_ref() {
                "channel" => {
                    let channel = ChannelName::parse(&value).map_err(|err| {
                        Refusal::bad_request("bad_channel", format!("`{value}`: {err}"))
                    })?;
                    if parsed.channels.contains(&channel) {
                        return Err(Refusal::bad_request(
                            "bad_channel",
                            format!("`{value}` is named twice"),
                        ));
                    }
                    parsed.channels.push(channel);
                }
                "since" if known.contains(&"since") => single(&mut parsed.since)?,
                "last_event_id" if known.contains(&"last_event_id") => {
                    single(&mut parsed.last_event_id)?
                }
                "timeout" if known.contains(&"timeout") => single(&mut parsed.timeout)?,
                name if Some(name) == token_param => {}
                other => {
                    let mut takes = vec!["channel"];
                    takes.extend_from_slice(known);
                    return Err(Refusal::bad_request(
                        "bad_query",
                        format!(
                            "unknown parameter `{other}`; this endpoint takes {}",
                            takes.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(parsed)
    }
}

/// Parses a cursor from a client, as a 400 with the codec's reason.
pub(super) fn parse_cursor(text: &str) -> Result<DecodedCursor, Refusal> {
    Cursor::decode(text).map_err(|err| Refusal::bad_request(err.code(), format!("cursor: {err}")))
}
