//! The WebSocket protocol's commands and replies (docs/protocol.md,
//! "Commands and replies"): a text frame parsed once into a [`Command`],
//! and the JSON of replies and pushes.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::cursor::Position;
use crate::error::Refusal;
use crate::message::{ChannelName, EventName, Publication};

/// A client command (docs/protocol.md, "Commands and replies"), parsed at
/// the edge: nothing past [`parse_command`] looks at the JSON again.
#[derive(Debug, PartialEq)]
pub(super) enum Command {
    Subscribe {
        channel: ChannelName,
        since: Option<Position>,
    },
    Unsubscribe {
        channel: ChannelName,
    },
    Ping,
    Refresh {
        token: String,
    },
    /// Answered when it ends, while the connection goes on.
    Call(Call),
}

/// A command that waits on the app or the engine.
#[derive(Debug, PartialEq)]
pub(super) enum Call {
    /// A call to the app (`rpc.path`).
    Rpc {
        method: String,
        /// JSON text.
        data: String,
    },
    /// A publish from the client, where its channel's rule allows one.
    Publish {
        channel: ChannelName,
        event: Option<EventName>,
        /// JSON text.
        data: String,
    },
}

/// Longest `rpc` method name.
pub(super) const MAX_METHOD_LEN: usize = 128;

/// Parses one text frame into a command, or the error to answer it with;
/// either way with the id to answer under (null when the frame has no
/// usable one). Any text gives one or the other: JSON nested deeper than
/// serde_json's limit (128) is refused as `bad_json`, not recursed into.
pub(super) fn parse_command(text: &str) -> (Id, Result<Command, Refusal>) {
    let command = match serde_json::from_str::<Value>(text) {
        Ok(command) => command,
        Err(err) => {
            let error = Refusal::bad_request("bad_json", format!("invalid JSON: {err}"));
            return (Id::default(), Err(error));
        }
    };
    let id = Id::of(text, &command);
    if id.is_null() {
        let error = Refusal::bad_request(
            "bad_command",
            "a command is {\"id\": <number or string>, \"op\": \"...\", ...}",
        );
        return (id, Err(error));
    }
    (id, command_from(text, &command))
}

/// A command as it arrives: `op` picks the variant. The fields are taken
/// as any JSON, so that each missing or mistyped one is answered with its
/// own error code (docs/protocol.md) rather than serde's message.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(super) enum WireCommand {
    Subscribe {
        #[serde(default)]
        channel: Option<Value>,
        #[serde(default)]
        since: Option<Value>,
    },
    Unsubscribe {
        #[serde(default)]
        channel: Option<Value>,
    },
    Ping {},
    Refresh {
        #[serde(default)]
        token: Option<Value>,
    },
    /// `data` is read raw from the frame ([`raw_data`]).
    Rpc {
        #[serde(default)]
        method: Option<Value>,
    },
    /// `data` is read raw from the frame ([`raw_data`]).
    Publish {
        #[serde(default)]
        channel: Option<Value>,
        #[serde(default)]
        event: Option<Value>,
    },
    #[serde(other)]
    Unknown,
}

/// The command in `command`, read from `text`.
pub(super) fn command_from(text: &str, command: &Value) -> Result<Command, Refusal> {
    let no_op = || Refusal::bad_request("bad_command", "a command needs an \"op\"");
    // Only the tag can fail: every field takes any JSON.
    let wire = WireCommand::deserialize(command).map_err(|_| no_op())?;
    match wire {
        WireCommand::Subscribe { channel, since } => {
            Ok(Command::Subscribe {
                channel: channel_of(channel)?,
                since: match since {
                    None | Some(Value::Null) => None,
                    Some(Value::String(text)) => Some(text.parse::<Position>().map_err(|err| {
                        Refusal::bad_request(err.code(), format!("`since`: {err}"))
                    })?),
                    Some(_) => {
                        return Err(Refusal::bad_request(
                            "bad_position",
                            "`since` is a position string, \"<epoch>:<offset>\"",
                        ))
                    }
                },
            })
        }
        WireCommand::Unsubscribe { channel } => Ok(Command::Unsubscribe {
            channel: channel_of(channel)?,
        }),
        WireCommand::Ping {} => Ok(Command::Ping),
        WireCommand::Refresh { token } => match token {
            Some(Value::String(token)) => Ok(Command::Refresh { token }),
            _ => Err(Refusal::bad_request(
                "missing_token",
                "`refresh` needs a \"token\"",
            )),
        },
        WireCommand::Rpc { method } => {
            let method = match method {
                Some(Value::String(method)) => method,
                _ => {
                    return Err(Refusal::bad_request(
                        "missing_method",
                        "`rpc` needs a \"method\": \"...\"",
                    ))
                }
            };
            let valid = (1..=MAX_METHOD_LEN).contains(&method.len())
                && method.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-')
                });
            if !valid {
                return Err(Refusal::bad_request(
                    "bad_method",
                    format!("a method is 1-{MAX_METHOD_LEN} characters of [A-Za-z0-9_.:/-]"),
                ));
            }
            Ok(Command::Call(Call::Rpc {
                method,
                // `data: null` is there; no `data` is null too.
                data: match command.get("data") {
                    Some(_) => raw_data(text)?,
                    None => "null".to_owned(),
                },
            }))
        }
        WireCommand::Publish { channel, event } => {
            let channel = channel_of(channel)?;
            let event = match event {
                None | Some(Value::Null) => None,
                Some(Value::String(name)) => Some(EventName::parse(&name).map_err(|err| {
                    Refusal::bad_request("bad_event", format!("`{name}`: {err}"))
                })?),
                Some(_) => {
                    return Err(Refusal::bad_request(
                        "bad_event",
                        "`event` is a name: [A-Za-z0-9_.:-]{1,64}",
                    ))
                }
            };
            // `data: null` is data; no `data` is not.
            if command.get("data").is_none() {
                return Err(Refusal::bad_request(
                    "missing_data",
                    "`publish` needs \"data\": any JSON",
                ));
            }
            Ok(Command::Call(Call::Publish {
                channel,
                event,
                data: raw_data(text)?,
            }))
        }
        WireCommand::Unknown => match command.get("op").and_then(Value::as_str) {
            None | Some("") => Err(no_op()),
            Some(other) => Err(Refusal::bad_request(
                "unknown_op",
                format!(
                    "unknown op `{other}`; ops are subscribe, unsubscribe, ping, refresh, rpc, publish"
                ),
            )),
        },
    }
}

/// A command's `data` as the client wrote it: numbers keep every digit
/// (read into a `Value` they would round to an f64), so what reaches the
/// app and the channel is the client's JSON.
fn raw_data(text: &str) -> Result<String, Refusal> {
    #[derive(Deserialize)]
    struct Written<'a> {
        #[serde(borrow)]
        data: &'a serde_json::value::RawValue,
    }
    serde_json::from_str::<Written>(text)
        .map(|written| written.data.get().to_owned())
        .map_err(|err| Refusal::bad_request("bad_json", format!("`data`: {err}")))
}

/// A command's `channel`, checked against the naming rules.
pub(super) fn channel_of(channel: Option<Value>) -> Result<ChannelName, Refusal> {
    let Some(Value::String(name)) = channel else {
        return Err(Refusal::bad_request(
            "missing_channel",
            "name the channel: \"channel\": \"...\"",
        ));
    };
    ChannelName::parse(&name)
        .map_err(|err| Refusal::bad_request("bad_channel", format!("`{name}`: {err}")))
}

/// A command's result, and for a subscribe what to send after it.
pub(super) struct Reply {
    pub(super) result: Value,
    pub(super) replay: Replay,
}

#[derive(Default)]
pub(super) struct Replay {
    /// A reset push to send: the channel and where it now stands.
    pub(super) reset: Option<(ChannelName, Position)>,
    pub(super) publications: Vec<Arc<Publication>>,
    /// Channels a renewed grant no longer allows: `unsubscribed` pushes.
    pub(super) left: Vec<ChannelName>,
}

impl Reply {
    pub(super) fn plain(result: Value) -> Reply {
        Reply {
            result,
            replay: Replay::default(),
        }
    }
}

/// A command's `id`, as JSON text to answer under: the client's number or
/// string, else null.
///
/// A client matches a reply by the id it sent, so the id goes back exactly
/// as written. An integer or a string survives serde_json's reading as it
/// is; any other number is taken from the frame's text, because serde_json
/// reads it only to a nearby f64 (off by an ulp or so) and the client would
/// not recognise the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Id(pub(super) Box<str>);

impl Default for Id {
    fn default() -> Id {
        Id("null".into())
    }
}

impl Id {
    /// The id of `command`, which was read from `text`.
    pub(super) fn of(text: &str, command: &Value) -> Id {
        match command.get("id") {
            Some(Value::Number(number)) if number.is_f64() => {
                /// The id's text, where the frame holds one `id`.
                #[derive(serde::Deserialize)]
                struct Written<'a> {
                    #[serde(borrow)]
                    id: &'a serde_json::value::RawValue,
                }
                let written = serde_json::from_str::<Written>(text)
                    .map(|written| written.id.get().trim().into());
                Id(written.unwrap_or_else(|_| number.to_string().into()))
            }
            Some(id @ (Value::Number(_) | Value::String(_))) => Id(id.to_string().into()),
            _ => Id::default(),
        }
    }

    pub(super) fn is_null(&self) -> bool {
        &*self.0 == "null"
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub(super) fn result_reply(id: &Id, result: &Value) -> String {
    format!(r#"{{"id":{id},"result":{result}}}"#)
}

pub(super) fn error_reply(id: &Id, error: &Refusal) -> String {
    format!(r#"{{"id":{id},"error":{}}}"#, error.body())
}

/// An error reply with a code that is not pushgate's own (an app's).
pub(super) fn error_reply_from(id: &Id, code: &str, message: &str) -> String {
    let error = json!({"code": code, "message": message});
    format!(r#"{{"id":{id},"error":{error}}}"#)
}

pub(super) fn reset_push(channel: &ChannelName, position: Position) -> String {
    json!({
        "op": "reset",
        "channel": channel,
        "epoch": position.epoch,
        "offset": position.offset,
    })
    .to_string()
}

#[cfg(test)]
#[path = "../../../tests/common/command_json.rs"]
mod command_json;

#[cfg(test)]
mod tests {
    use super::command_json::json_value;
    use super::*;
    use crate::error::Kind;
    use proptest::prelude::*;

    /// Each shape of command is answered with the code docs/protocol.md
    /// gives it: the op decides the variant, then each field its own error.
    #[test]
    fn each_malformed_command_has_its_own_code() {
        for (frame, expected) in [
            (r#"{"id":1}"#, Err("bad_command")),
            (r#"{"id":1,"op":""}"#, Err("bad_command")),
            (r#"{"id":1,"op":5}"#, Err("bad_command")),
            (r#"{"id":1,"op":null}"#, Err("bad_command")),
            (r#"[1,"subscribe"]"#, Err("bad_command")),
            ("nonsense", Err("bad_json")),
            (r#"{"id":1,"op":"fly"}"#, Err("unknown_op")),
            (
                r#"{"id":1,"op":"Subscribe","channel":"a"}"#,
                Err("unknown_op"),
            ),
            (r#"{"id":1,"op":"subscribe"}"#, Err("missing_channel")),
            (
                r#"{"id":1,"op":"subscribe","channel":5}"#,
                Err("missing_channel"),
            ),
            (
                r#"{"id":1,"op":"subscribe","channel":"a b"}"#,
                Err("bad_channel"),
            ),
            (
                r#"{"id":1,"op":"subscribe","channel":"a","since":5}"#,
                Err("bad_position"),
            ),
            (
                r#"{"id":1,"op":"unsubscribe","channel":[]}"#,
                Err("missing_channel"),
            ),
            (r#"{"id":1,"op":"refresh"}"#, Err("missing_token")),
            (r#"{"id":1,"op":"refresh","token":7}"#, Err("missing_token")),
            (
                r#"{"id":1,"op":"subscribe","channel":"a","since":null}"#,
                Ok("subscribe"),
            ),
            (
                r#"{"id":1,"op":"subscribe","channel":"a","since":"e1:4"}"#,
                Ok("subscribe"),
            ),
            (
                r#"{"id":1,"op":"unsubscribe","channel":"a"}"#,
                Ok("unsubscribe"),
            ),
            (r#"{"id":1,"op":"ping","extra":{"x":1}}"#, Ok("ping")),
            (r#"{"op":"refresh","token":"t","id":"r"}"#, Ok("refresh")),
            (r#"{"id":1,"op":"rpc"}"#, Err("missing_method")),
            (r#"{"id":1,"op":"rpc","method":7}"#, Err("missing_method")),
            (r#"{"id":1,"op":"rpc","method":""}"#, Err("bad_method")),
            (r#"{"id":1,"op":"rpc","method":"a b"}"#, Err("bad_method")),
            (r#"{"id":1,"op":"rpc","method":"likes.add"}"#, Ok("rpc")),
            (
                r#"{"id":1,"op":"rpc","method":"m","data":{"x":[1]}}"#,
                Ok("rpc"),
            ),
            (
                r#"{"id":1,"op":"publish","data":1}"#,
                Err("missing_channel"),
            ),
            (
                r#"{"id":1,"op":"publish","channel":"a b","data":1}"#,
                Err("bad_channel"),
            ),
            (
                r#"{"id":1,"op":"publish","channel":"a"}"#,
                Err("missing_data"),
            ),
            (
                r#"{"id":1,"op":"publish","channel":"a","data":1,"event":"a b"}"#,
                Err("bad_event"),
            ),
            (
                r#"{"id":1,"op":"publish","channel":"a","data":1,"event":3}"#,
                Err("bad_event"),
            ),
            (
                r#"{"id":1,"op":"publish","channel":"a","data":null}"#,
                Ok("publish"),
            ),
            (
                r#"{"id":1,"op":"publish","channel":"a","data":{},"event":"typing"}"#,
                Ok("publish"),
            ),
        ] {
            let got = match parse_command(frame).1 {
                Ok(Command::Subscribe { .. }) => Ok("subscribe"),
                Ok(Command::Unsubscribe { .. }) => Ok("unsubscribe"),
                Ok(Command::Ping) => Ok("ping"),
                Ok(Command::Refresh { .. }) => Ok("refresh"),
                Ok(Command::Call(Call::Rpc { .. })) => Ok("rpc"),
                Ok(Command::Call(Call::Publish { .. })) => Ok("publish"),
                Err(error) => Err(error.code),
            };
            assert_eq!(got, expected, "{frame}");
        }
    }

    #[test]
    fn an_id_is_answered_exactly_as_written() {
        for (text, id) in [
            (
                r#"{"id": 2.1631291219746346e-75, "op": "ping"}"#,
                "2.1631291219746346e-75",
            ),
            (r#"{"id": 1.50, "op": "ping"}"#, "1.50"),
            (r#"{"id": 1e400, "op": "ping"}"#, "null"),
            (
                r#"{"id": 18446744073709551616, "op": "ping"}"#,
                "18446744073709551616",
            ),
            (r#"{"id": -7, "op": "ping"}"#, "-7"),
            (r#"{"id": "a\u00e9\"", "op": "ping"}"#, r#""aé\"""#),
            (r#"{"id": null, "op": "ping"}"#, "null"),
            (r#"{"id": [1], "op": "ping"}"#, "null"),
        ] {
            let (got, _) = parse_command(text);
            assert_eq!(&*got.0, id, "{text}");
            let reply: Value = serde_json::from_str(&result_reply(&got, &json!({}))).unwrap();
            assert_eq!(reply["result"], json!({}));
        }
    }

    /// Nesting far past serde_json's limit is refused, not recursed into.
    #[test]
    fn deeply_nested_json_is_bad_json_not_a_stack_overflow() {
        for depth in [129, 10_000, 1_000_000] {
            for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
                let text = format!(
                    "{{\"id\": 1, \"op\": \"ping\", \"x\": {}0{}}}",
                    open.repeat(depth),
                    close.repeat(depth)
                );
                let (id, command) = parse_command(&text);
                assert!(id.is_null());
                let error = command.unwrap_err();
                assert_eq!(error.code, "bad_json");
                assert!(
                    error.message.contains("recursion limit"),
                    "{}",
                    error.message
                );
            }
        }
    }

    /// The rules a parsed frame follows, whatever it held.
    fn check(text: &str) -> Result<(), TestCaseError> {
        let (id, command) = parse_command(text);
        let id: Value = serde_json::from_str(&id.0).expect("an id is JSON");
        prop_assert!(id.is_null() || id.is_number() || id.is_string());
        match command {
            Ok(command) => {
                let value: Value = serde_json::from_str(text).expect("a command is JSON");
                prop_assert_eq!(&value["id"], &id);
                let op = match &command {
                    Command::Subscribe { channel, .. } | Command::Unsubscribe { channel } => {
                        prop_assert_eq!(value["channel"].as_str(), Some(channel.as_str()));
                        if let Command::Subscribe { .. } = command {
                            "subscribe"
                        } else {
                            "unsubscribe"
                        }
                    }
                    Command::Ping => "ping",
                    Command::Refresh { token } => {
                        prop_assert_eq!(value["token"].as_str(), Some(token.as_str()));
                        "refresh"
                    }
                    Command::Call(Call::Rpc { method, data }) => {
                        prop_assert_eq!(value["method"].as_str(), Some(method.as_str()));
                        let sent = value.get("data").cloned().unwrap_or(Value::Null);
                        prop_assert_eq!(serde_json::from_str::<Value>(data).ok(), Some(sent));
                        "rpc"
                    }
                    Command::Call(Call::Publish { channel, data, .. }) => {
                        prop_assert_eq!(value["channel"].as_str(), Some(channel.as_str()));
                        prop_assert_eq!(
                            serde_json::from_str::<Value>(data).ok(),
                            Some(value["data"].clone())
                        );
                        "publish"
                    }
                };
                prop_assert_eq!(value["op"].as_str(), Some(op));
            }
            Err(error) => {
                prop_assert_eq!(error.kind, Kind::Invalid);
                prop_assert!(!error.message.is_empty());
                prop_assert!(
                    !id.is_null() || ["bad_json", "bad_command"].contains(&error.code),
                    "a usable id is answered under it: {}",
                    error.code
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any JSON value gives a command or an error to answer, never a
        /// panic.
        #[test]
        fn any_json_value_is_a_command_or_an_error(value in json_value()) {
            check(&value.to_string())?;
        }

        /// Any text, JSON or not, likewise.
        #[test]
        fn any_text_is_a_command_or_an_error(text in ".{0,64}") {
            check(&text)?;
        }

        /// Every well-formed command parses to what it says.
        #[test]
        fn well_formed_commands_parse(
            id in prop_oneof![any::<u32>().prop_map(Value::from), "[a-z0-9]{1,8}".prop_map(Value::from)],
            channel in "[A-Za-z0-9_:.@=/-]{1,40}",
            offset in any::<u64>(),
        ) {
            let subscribe = json!({"id": id, "op": "subscribe", "channel": channel, "since": format!("e1:{offset}")});
            let (got, command) = parse_command(&subscribe.to_string());
            prop_assert_eq!(&*got.0, id.to_string());
            let command = command.expect("well formed");
            prop_assert!(
                matches!(&command, Command::Subscribe { channel: c, since: Some(p) } if c.as_str() == channel && p.offset == offset),
                "{:?}", command
            );
            let unsubscribe = json!({"id": id, "op": "unsubscribe", "channel": channel});
            let parsed = parse_command(&unsubscribe.to_string()).1;
            prop_assert!(matches!(parsed, Ok(Command::Unsubscribe { .. })), "{:?}", parsed);
        }

        /// A call's data reaches the app and the channel as the client's
        /// JSON, whatever it holds.
        #[test]
        fn calls_carry_any_data(
            channel in "[A-Za-z0-9_:.@=/-]{1,40}",
            method in "[A-Za-z0-9_.:/-]{1,128}",
            data in json_value(),
        ) {
            let publish = json!({"id": 1, "op": "publish", "channel": channel, "data": data});
            match parse_command(&publish.to_string()).1 {
                Ok(Command::Call(Call::Publish { channel: c, data: sent, event: None })) => {
                    prop_assert_eq!(c.as_str(), channel.as_str());
                    prop_assert_eq!(sent, data.to_string());
                }
                other => prop_assert!(false, "{:?}", other),
            }
            let rpc = json!({"id": 1, "op": "rpc", "method": method, "data": data});
            match parse_command(&rpc.to_string()).1 {
                Ok(Command::Call(Call::Rpc { method: m, data: sent })) => {
                    prop_assert_eq!(m, method);
                    prop_assert_eq!(sent, data.to_string());
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
