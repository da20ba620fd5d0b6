use super::*;
use proptest::prelude::*;
use serde_json::Value;

fn publish(data: &str) -> Publish {
    Publish {
        channels: vec![ChannelName::parse("c").unwrap()],
        data: serde_json::value::RawValue::from_string(data.to_owned()).unwrap(),
        event: None,
        idempotency_key: Some("k".into()),
        publisher: None,
    }
}

fn fingerprint(data: &str) -> u64 {
    publish(data).fingerprint()
}

#[test]
fn equal_json_values_are_the_same_publish() {
    for (a, b) in [
        (
            r#"{"a":1,"b":[1,2]}"#,
            "{ \"a\" : 1 ,\n\t\"b\" : [ 1 , 2 ] }\r\n",
        ),
        (r#"{"a":1,"b":2}"#, r#"{"b":2,"a":1}"#),
        (
            r#"{"x":{"z":null,"y":true}}"#,
            r#"{"x":{"y":true,"z":null}}"#,
        ),
        (r#""A\n""#, r#""\u0041\u000a""#),
        (r#""\/""#, r#""/""#),
        (r#""é""#, r#""\u00e9""#),
        (r#""😀""#, r#""\ud83d\ude00""#),
        ("1e2", "100.0"),
        ("1.5", "15e-1"),
        ("-0.0", "-0e0"),
        ("[]", "[ ]"),
        ("{}", "{ }"),
        (r#"{"a":1,"a":2}"#, r#"{"a":2}"#),
    ] {
        assert_eq!(fingerprint(a), fingerprint(b), "{a} and {b} are one value");
    }
}

#[test]
fn different_json_values_are_different_publishes() {
    for (a, b) in [
        ("1", "1.0"),
        ("1", "\"1\""),
        ("0", "-0.0"),
        ("null", "\"null\""),
        ("[1,2]", "[2,1]"),
        (r#"{"a":1}"#, r#"{"a":1,"b":null}"#),
        (r#"{"a":{"b":1}}"#, r#"{"a":[{"b":1}]}"#),
        (r#""a b""#, r#""ab""#),
        ("true", "false"),
    ] {
        assert_ne!(fingerprint(a), fingerprint(b), "{a} and {b} differ");
    }
    let base = publish("1");
    let mut other_channel = base.clone();
    other_channel.channels = vec![ChannelName::parse("d").unwrap()];
    let mut with_event = base.clone();
    with_event.event = Some(EventName::parse("e").unwrap());
    let mut two_channels = base.clone();
    two_channels.channels.push(ChannelName::parse("d").unwrap());
    let mut swapped = two_channels.clone();
    swapped.channels.reverse();
    let all = [base, other_channel, with_event, two_channels, swapped];
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a.fingerprint(), b.fingerprint(), "{a:?} and {b:?}");
        }
    }
}

/// Any JSON value; floats are finite, not integral (so they print with
/// a fraction and read back as floats) and read back exactly.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from).prop_filter(
            "a fraction that serde_json reads back exactly",
            |v| {
                v.as_f64().is_some_and(|f| f.fract() != 0.0)
                    && serde_json::from_str::<Value>(&v.to_string()).ok().as_ref() == Some(v)
            }
        ),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Writes `value` as JSON text in one of many equivalent ways, chosen
/// by `choices`: whitespace around every token, object keys in any
/// order, characters escaped or not, floats with an exponent or not.
fn write_any_way(value: &Value, choices: &mut impl Iterator<Item = u8>, out: &mut String) {
    let mut pick = || choices.next().unwrap_or(0);
    let space = |choice: u8, out: &mut String| {
        out.push_str(["", " ", "\n", "\t ", "\r\n  "][usize::from(choice % 5)]);
    };
    space(pick(), out);
    match value {
        Value::Number(number) => {
            // serde_json reads some exponent forms one bit off: those
            // are other values, and are written plainly.
            let exponent = number
                .as_f64()
                .filter(|_| number.is_f64())
                .map(|float| format!("{float:e}"))
                .filter(|text| serde_json::from_str::<Value>(text).ok() == Some(value.clone()));
            match exponent {
                Some(text) if pick() % 2 == 0 => out.push_str(&text),
                _ => out.push_str(&number.to_string()),
            }
        }
        Value::String(text) => {
            out.push('"');
            for c in text.chars() {
                let must = c == '"' || c == '\\' || c < ' ';
                if must || pick() % 3 == 0 {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                } else {
                    out.push(c);
                }
            }
            out.push('"');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_any_way(item, choices, out);
            }
            space(choices.next().unwrap_or(0), out);
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // A rotation and maybe a reversal: another order of keys.
            let turn = usize::from(pick()) % entries.len().max(1);
            entries.rotate_left(turn);
            if pick() % 2 == 0 {
                entries.reverse();
            }
            out.push('{');
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_any_way(&Value::String(key.clone()), choices, out);
                space(choices.next().unwrap_or(0), out);
                out.push(':');
                write_any_way(item, choices, out);
            }
            space(choices.next().unwrap_or(0), out);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
    space(choices.next().unwrap_or(0), out);
}

#[test]
fn depth_is_no_limit() {
    let depth = 100_000;
    let tight = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let loose = format!("{} 1 {}", "[ ".repeat(depth), "\n]".repeat(depth));
    assert_eq!(json_digest(&loose), json_digest(&tight));
    assert!(json_digest(&tight).is_some());
    assert_ne!(
        json_digest(&tight),
        json_digest(&tight.replacen("[", "", 1).replacen("]", "", 1))
    );
    // Objects deep down still compare by value, whatever their key order.
    let a = format!(
        r#"{}{{"b":1,"a":2}}{}"#,
        r#"{"x":"#.repeat(depth),
        "}".repeat(depth)
    );
    let b = format!(
        r#"{}{{"a":2, "b":1}}{}"#,
        r#"{ "x" :"#.repeat(depth),
        " }".repeat(depth)
    );
    assert_eq!(fingerprint(&a), fingerprint(&b));
    assert_ne!(
        fingerprint(&a),
        fingerprint(&a.replace(r#""a":2"#, r#""a":3"#))
    );
}

#[test]
fn what_is_not_json_has_no_digest() {
    for bad in [
        "",
        "[",
        "]",
        "{",
        "}",
        "[1",
        "{\"a\"}",
        "{\"a\":}",
        "{1:2}",
        "[}",
        "{]",
        "1 2",
        "\"open",
        "tru",
        "nul",
        "01x",
        "é",
        "{\"a\":1 \"b\"}x",
    ] {
        assert_eq!(json_digest(bad), None, "{bad:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn prop_the_digest_is_the_values(
        value in any_json(),
        choices in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut text = String::new();
        write_any_way(&value, &mut choices.into_iter(), &mut text);
        // The same value as serde_json writes it compactly.
        prop_assert_eq!(json_digest(&text), json_digest(&value.to_string()), "{}", text);
        prop_assert!(json_digest(&text).is_some());
    }

    #[test]
    fn prop_any_text_is_answered_without_a_panic(text in any::<String>()) {
        let _ = json_digest(&text);
    }

    #[test]
    fn prop_any_json_like_text_is_answered_without_a_panic(
        text in "[\\[\\]{}:,\" \\\\0-9a-z.eE+-]{0,64}"
    ) {
        let digest = json_digest(&text);
        // JSON always has one.
        if serde_json::from_str::<Value>(&text).is_ok() {
            prop_assert!(digest.is_some(), "{}", text);
        }
    }

    #[test]
    fn prop_one_value_written_two_ways_is_one_publish(
        value in any_json(),
        first in proptest::collection::vec(any::<u8>(), 0..512),
        second in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let (mut a, mut b) = (String::new(), String::new());
        write_any_way(&value, &mut first.into_iter(), &mut a);
        write_any_way(&value, &mut second.into_iter(), &mut b);
        // The writer is right: both texts read back as the value.
        prop_assert_eq!(&serde_json::from_str::<Value>(&a).unwrap(), &value);
        prop_assert_eq!(&serde_json::from_str::<Value>(&b).unwrap(), &value);
        prop_assert_eq!(fingerprint(&a), fingerprint(&b), "{} / {}", a, b);
    }

    #[test]
    fn prop_different_values_are_different_publishes(a in any_json(), b in any_json()) {
        prop_assume!(a != b);
        prop_assert_ne!(fingerprint(&a.to_string()), fingerprint(&b.to_string()));
    }
}

#[test]
fn recovery_decisions() {
    let e = Epoch::parse("now").unwrap();
    let old = Epoch::parse("old").unwrap();
    let at = |epoch, offset| Position::new(epoch, offset);
    // History holds offsets 5..=10.
    assert_eq!(replay_from(at(e, 7), e, 10, 5), Some(8));
    assert_eq!(replay_from(at(e, 4), e, 10, 5), Some(5), "exactly covered");
    assert_eq!(
        replay_from(at(e, 3), e, 10, 5),
        None,
        "gap older than history"
    );
    assert_eq!(replay_from(at(e, 10), e, 10, 5), Some(11), "up to date");
    assert_eq!(
        replay_from(at(e, 11), e, 10, 5),
        None,
        "ahead of the stream"
    );
    assert_eq!(replay_from(at(old, 7), e, 10, 5), None, "epoch changed");
    assert_eq!(
        replay_from(at(old, 0), e, 10, 1),
        Some(1),
        "offset 0 in any epoch"
    );
    assert_eq!(
        replay_from(at(old, 0), e, 10, 5),
        None,
        "offset 0, history trimmed"
    );
    assert_eq!(
        replay_from(at(old, 0), e, 0, 1),
        Some(1),
        "empty channel, new epoch"
    );
    // Nothing replayable (all expired): only an up-to-date reader recovers.
    assert_eq!(replay_from(at(e, 10), e, 10, 11), Some(11));
    assert_eq!(replay_from(at(e, 9), e, 10, 11), None);
}
/// Fingerprints are stored with idempotency keys and compared across
/// nodes, which may run different versions: they are a format, pinned
/// here, and must never change.
#[test]
fn fingerprints_are_a_stable_format() {
    assert_eq!(
        json_digest(r#"{"b":[1,2.5,"x"],"a":null}"#),
        Some(1696741338303704484)
    );
    assert_eq!(json_digest("true"), Some(12903026897238407959));
    assert_eq!(json_digest(r#""\u00e9""#), Some(17099416077135336752));
    assert_eq!(
        publish(r#"{"b":[1,2.5,"x"],"a":null}"#).fingerprint(),
        4456016426446453499
    );
}
