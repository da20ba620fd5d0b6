//! Any JSON value, leaning towards the shapes of WebSocket commands (the
//! ops, `id`, `channel`, `since`, `token`, channel-like strings): the one
//! generator for the command parser's unit properties
//! (src/transport/websocket/commands.rs includes this file) and for the
//! properties over a real connection (tests/realtime/ws_abuse.rs).

use proptest::prelude::*;
use serde_json::Value;

pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,16}".prop_map(Value::from),
        prop_oneof![
            Just("subscribe"),
            Just("unsubscribe"),
            Just("ping"),
            Just("refresh")
        ]
        .prop_map(Value::from),
        "[a-z]{1,6}(:[0-9]{1,3})?".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("id".to_owned()),
                    Just("op".to_owned()),
                    Just("channel".to_owned()),
                    Just("since".to_owned()),
                    Just("token".to_owned()),
                    ".{0,5}"
                ],
                inner,
                0..5
            )
            .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}
