use super::*;
use proptest::prelude::*;

/// How deep `value` nests arrays and objects.
fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    // Strings full of brackets, quotes and backslashes, which the scan
    // must not count.
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<i32>().prop_map(serde_json::Value::from),
        r#"[\[\]{}"\\a]{0,8}"#.prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(12, 64, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(r#"[\[{"\\k]{0,4}"#, inner, 0..4)
                .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn the_scan_measures_nesting_as_a_parse_does(value in json_value(), max in 0usize..14) {
        let text = value.to_string();
        prop_assert_eq!(nested_deeper_than(&text, max), depth(&value) > max, "{}", text);
    }
}

#[test]
fn nesting_far_past_the_limit_is_found_without_recursion() {
    let deep = format!("{}{}", "[{\"a\":".repeat(500_000), "0}]".repeat(500_000));
    assert!(nested_deeper_than(&deep, MAX_DATA_DEPTH));
    let flat = format!("[{}]", "[],".repeat(100_000) + "[]");
    assert!(!nested_deeper_than(&flat, MAX_DATA_DEPTH));
}
