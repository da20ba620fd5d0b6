//! Long by design: one test per rule of the cursor grammar (docs/protocol.md)
//! and one property per promise of the codec.

use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

fn epoch(text: &str) -> Epoch {
    Epoch::parse(text).unwrap()
}

fn pos(text: &str) -> Position {
    Position::parse(text).unwrap()
}

/// Builds a cursor text with a correct checksum around `body`, so tests
/// reach the field checks rather than the checksum check.
fn sealed(body: &str) -> String {
    let mut text = body.to_owned();
    text.push('.');
    push_hex8(&mut text, fnv1a32(body.as_bytes()));
    text
}

fn decode_err(text: &str) -> CursorError {
    Cursor::decode(text).expect_err(text)
}

fn ch(name: &str) -> ChannelName {
    ChannelName::parse(name).unwrap()
}

/// What decoding `cursor`'s text must give.
fn decoded(cursor: &Cursor) -> DecodedCursor {
    DecodedCursor {
        entries: cursor
            .entries
            .iter()
            .map(|e| (e.hash, e.position))
            .collect(),
    }
}

// ---- FNV-1a

#[test]
fn fnv1a32_matches_published_vectors() {
    // From the FNV reference test suite.
    assert_eq!(fnv1a32(b""), 0x811c9dc5);
    assert_eq!(fnv1a32(b"a"), 0xe40c292c);
    assert_eq!(fnv1a32(b"foobar"), 0xbf9cf968);
    assert_eq!(channel_hash("foobar"), 0xbf9cf968);
}

// ---- Epoch

#[test]
fn epoch_accepts_the_allowed_alphabet_and_lengths() {
    for text in [
        "a",
        "Z",
        "0",
        "_",
        "-",
        "AbCdEfGh",
        "x9_K-2",
        "0123456789abcdef",
    ] {
        assert_eq!(epoch(text).as_str(), text);
        assert_eq!(epoch(text).to_string(), text);
        assert_eq!(format!("{:?}", epoch(text)), text);
    }
}

#[test]
fn epoch_rejects_empty_long_and_bad_characters() {
    assert_eq!(
        Epoch::parse(""),
        Err(CursorError::BadEpoch { what: "is empty" })
    );
    assert_eq!(
        Epoch::parse("0123456789abcdefg"),
        Err(CursorError::BadEpoch {
            what: "is longer than 16 bytes"
        })
    );
    for text in ["a.b", "a:b", " a", "a ", "a+b", "é", "ab/c", "\0"] {
        let err = Epoch::parse(text).expect_err(text);
        assert!(matches!(err, CursorError::BadEpoch { .. }), "{text}: {err}");
        assert_eq!(err.code(), "bad_position");
    }
    // Multi-byte characters count in bytes: 6 × 3 bytes > 16.
    assert!(Epoch::parse("€€€€€€").is_err());
}

#[test]
fn random_epochs_are_8_alphanumerics_and_differ() {
    let a = Epoch::random();
    let b = Epoch::random();
    assert_eq!(a.as_str().len(), 8);
    assert!(a.as_str().bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_ne!(a, b);
    assert_eq!(Epoch::parse(a.as_str()), Ok(a));
}

#[test]
fn epoch_equality_and_hash_depend_only_on_the_text() {
    use std::collections::HashSet;
    let set: HashSet<Epoch> = [epoch("ab"), epoch("ab"), Epoch::random()].into();
    assert_eq!(set.len(), 2);
    assert_ne!(epoch("ab"), epoch("abc"));
}

#[test]
fn epoch_serde_is_a_plain_string() {
    let e = epoch("AbC_-9");
    assert_eq!(serde_json::to_string(&e).unwrap(), "\"AbC_-9\"");
    assert_eq!(serde_json::from_str::<Epoch>("\"AbC_-9\"").unwrap(), e);
    // Owned strings (escapes, `Value`) go through the same parse.
    assert_eq!(
        serde_json::from_str::<Epoch>("\"\\u0041bC_-9\"").unwrap(),
        epoch("AbC_-9")
    );
    let value = serde_json::json!("AbC_-9");
    assert_eq!(serde_json::from_value::<Epoch>(value).unwrap(), e);
    let err = serde_json::from_str::<Epoch>("\"a.b\"").unwrap_err();
    assert!(err.to_string().contains("bad epoch"), "{err}");
    assert!(serde_json::from_str::<Epoch>("42").is_err());
}

// ---- Position

#[test]
fn position_parses_and_displays() {
    let p = pos("AbCdEfGh:42");
    assert_eq!(p, Position::new(epoch("AbCdEfGh"), 42));
    assert_eq!(p.to_string(), "AbCdEfGh:42");
    assert_eq!("e:0".parse::<Position>(), Ok(Position::new(epoch("e"), 0)));
    assert_eq!(pos("e:18446744073709551615").offset, u64::MAX);
    assert_eq!(pos("e:007").offset, 7);
    assert_eq!(format!("{p:?}"), "Position { epoch: AbCdEfGh, offset: 42 }");
}

#[test]
fn position_rejects_each_malformation() {
    let cases: &[(&str, CursorError)] = &[
        ("", CursorError::MissingColon),
        ("abc", CursorError::MissingColon),
        ("abc42", CursorError::MissingColon),
        (":1", CursorError::BadEpoch { what: "is empty" }),
        (
            "0123456789abcdefg:1",
            CursorError::BadEpoch {
                what: "is longer than 16 bytes",
            },
        ),
        (
            "a b:1",
            CursorError::BadEpoch {
                what: "may contain only A-Z, a-z, 0-9, '_' and '-'",
            },
        ),
        (
            " e:1",
            CursorError::BadEpoch {
                what: "may contain only A-Z, a-z, 0-9, '_' and '-'",
            },
        ),
        ("e:", CursorError::BadOffset { what: "is empty" }),
        (
            "e:+1",
            CursorError::BadOffset {
                what: "must be decimal digits only (no sign, no spaces)",
            },
        ),
        (
            "e:-1",
            CursorError::BadOffset {
                what: "must be decimal digits only (no sign, no spaces)",
            },
        ),
        (
            "e: 1",
            CursorError::BadOffset {
                what: "must be decimal digits only (no sign, no spaces)",
            },
        ),
        (
            "e:1 ",
            CursorError::BadOffset {
                what: "must be decimal digits only (no sign, no spaces)",
            },
        ),
        (
            "e:1:2",
            CursorError::BadOffset {
                what: "must be decimal digits only (no sign, no spaces)",
            },
        ),
        (
            "e:0x10",
            CursorError::BadOffset {
                what: "must be decimal digits only (no sign, no spaces)",
            },
        ),
        (
            "e:١",
            CursorError::BadOffset {
                what: "must be decimal digits only (no sign, no spaces)",
            },
        ),
        (
            "e:18446744073709551616",
            CursorError::BadOffset {
                what: "does not fit in 64 bits",
            },
        ),
    ];
    for (text, expected) in cases {
        let err = Position::parse(text).expect_err(text);
        assert_eq!(&err, expected, "{text:?}");
        assert_eq!(err.code(), "bad_position");
    }
}

// ---- Cursor: encoding

#[test]
fn empty_cursor_is_version_and_checksum() {
    let cursor = Cursor::new();
    assert!(cursor.is_empty());
    let text = cursor.encode();
    assert_eq!(text, sealed("1"));
    assert_eq!(text, "1.340ca71c");
    assert_eq!(Cursor::decode(&text), Ok(decoded(&cursor)));
}

#[test]
fn encoding_uses_hex_hashes_and_base36_offsets() {
    let mut cursor = Cursor::new();
    cursor.set(&ch("c"), Position::new(epoch("AbCdEfGh"), 95));
    let text = cursor.encode();
    let hash = format!("{:08x}", channel_hash("c"));
    assert_eq!(text, sealed(&format!("1.{hash}.AbCdEfGh.2n")));
    cursor.set(&ch("c"), Position::new(epoch("z"), u64::MAX));
    assert_eq!(
        cursor.encode(),
        sealed(&format!("1.{hash}.z.3w5e11264sgsf"))
    );
    cursor.set(&ch("c"), Position::new(epoch("z"), 0));
    assert_eq!(cursor.encode(), sealed(&format!("1.{hash}.z.0")));
}

#[test]
fn encode_into_appends_and_checksums_only_its_own_part() {
    let mut cursor = Cursor::new();
    cursor.set(&ch("chat:1"), pos("AbCdEfGh:42"));
    let mut out = String::from("id: ");
    cursor.encode_into(&mut out);
    assert_eq!(out, format!("id: {}", cursor.encode()));
}

#[test]
fn set_replaces_in_place_and_keeps_order() {
    let mut cursor = Cursor::new();
    cursor.set(&ch("a"), pos("e:1"));
    cursor.set(&ch("b"), pos("e:2"));
    cursor.set(&ch("a"), pos("f:3"));
    assert_eq!(cursor.len(), 2);
    assert_eq!(cursor.position_of("a"), Some(pos("f:3")));
    assert_eq!(cursor.position_of("b"), Some(pos("e:2")));
    assert_eq!(cursor.position_of("c"), None);
    let text = cursor.encode();
    let a = format!("{:08x}", channel_hash("a"));
    assert!(text.starts_with(&format!("1.{a}.f.3.")), "{text}");
    assert_eq!(Cursor::decode(&text), Ok(decoded(&cursor)));
}

/// The worked example in docs/protocol.md. If this fails, the code and
/// the document disagree: fix whichever is wrong, never just this test.
#[test]
fn protocol_doc_example() {
    const EXAMPLE: &str = "1.6e3ac076.AbCdEfGh.16.2f6b7b82.x9_K-2.0.048abcb3";
    assert_eq!(channel_hash("chat:1"), 0x6e3ac076);
    assert_eq!(channel_hash("user:42"), 0x2f6b7b82);
    assert_eq!(
        fnv1a32(b"1.6e3ac076.AbCdEfGh.16.2f6b7b82.x9_K-2.0"),
        0x048abcb3
    );

    let mut cursor = Cursor::new();
    cursor.set(&ch("chat:1"), pos("AbCdEfGh:42"));
    cursor.set(&ch("user:42"), pos("x9_K-2:0"));
    assert_eq!(cursor.encode(), EXAMPLE);
    assert_eq!(Cursor::decode(EXAMPLE), Ok(decoded(&cursor)));

    let doc = include_str!("../../docs/protocol.md");
    assert!(
        doc.contains(EXAMPLE),
        "docs/protocol.md lost the example cursor"
    );
    assert!(doc.contains("1.6e3ac076.AbCdEfGh.16.2f6b7b82.x9_K-2.0"));
    assert!(doc.contains("0x6e3ac076") && doc.contains("0x2f6b7b82") && doc.contains("0x048abcb3"));
}

// ---- Cursor: rejections

#[test]
fn decode_checks_length_before_anything_else() {
    let long = "x".repeat(MAX_CURSOR_BYTES + 1);
    assert_eq!(
        decode_err(&long),
        CursorError::TooLong {
            len: MAX_CURSOR_BYTES + 1
        }
    );
    // Exactly the limit is judged on its content, not its length.
    let at_limit = "x".repeat(MAX_CURSOR_BYTES);
    assert!(matches!(
        decode_err(&at_limit),
        CursorError::UnknownVersion { .. }
    ));
    // The limit is in bytes, not characters.
    let wide = "é".repeat(MAX_CURSOR_BYTES / 2 + 1);
    assert!(matches!(decode_err(&wide), CursorError::TooLong { .. }));
}

#[test]
fn decode_rejects_empty_and_unknown_versions() {
    assert_eq!(decode_err(""), CursorError::Empty);
    for (text, version) in [
        ("2.340ca71c", "2"),
        ("0.340ca71c", "0"),
        ("01.340ca71c", "01"),
        (" 1.340ca71c", " 1"),
        ("x1.340ca71c", "x1"),
        (".1.340ca71c", ""),
        ("v1", "v1"),
        ("é.340ca71c", "\\u{e9}"),
    ] {
        assert_eq!(
            decode_err(text),
            CursorError::UnknownVersion {
                version: version.to_owned()
            },
            "{text:?}"
        );
    }
    let long_version = format!("{}.340ca71c", "9".repeat(40));
    assert_eq!(
        decode_err(&long_version),
        CursorError::UnknownVersion {
            version: format!("{}…", "9".repeat(16))
        }
    );
}

#[test]
fn decode_rejects_a_missing_or_malformed_checksum() {
    assert!(matches!(decode_err("1"), CursorError::Malformed { .. }));
    let cases: &[(&str, &str)] = &[
        ("1.", "is missing (an empty field, or a '.' too many)"),
        (
            "1.340CA71C",
            "must be lowercase hex; uppercase letters are not accepted",
        ),
        ("1.340ca71", "must be exactly 8 hex digits"),
        ("1.340ca71c0", "must be exactly 8 hex digits"),
        ("1.340ca71g", "must be 8 hex digits (0-9, a-f)"),
        ("1.340ca71c ", "must be exactly 8 hex digits"),
        ("1.340ca7é", "must be 8 hex digits (0-9, a-f)"),
    ];
    for (text, what) in cases {
        assert_eq!(
            decode_err(text),
            CursorError::BadChecksum { what },
            "{text:?}"
        );
    }
    // A valid cursor with a trailing dot: the checksum field is now empty.
    let mut cursor = Cursor::new();
    cursor.set(&ch("a"), pos("e:1"));
    let trailing = format!("{}.", cursor.encode());
    assert!(matches!(
        decode_err(&trailing),
        CursorError::BadChecksum { .. }
    ));
}

#[test]
fn decode_rejects_a_checksum_mismatch() {
    assert_eq!(decode_err("1.340ca71d"), CursorError::ChecksumMismatch);
    let mut cursor = Cursor::new();
    cursor.set(&ch("a"), pos("e:1"));
    let text = cursor.encode();
    let altered = text.replacen(".e.1.", ".e.2.", 1);
    assert_ne!(altered, text);
    assert_eq!(decode_err(&altered), CursorError::ChecksumMismatch);
    let other_epoch = text.replacen(".e.1.", ".f.1.", 1);
    assert_eq!(decode_err(&other_epoch), CursorError::ChecksumMismatch);
}

#[test]
fn decode_rejects_a_wrong_field_count() {
    for body in [
        "1.0000000a",
        "1.0000000a.e",
        "1.0000000a.e.1.0000000b",
        "1.0000000a.e.1.0000000b.f",
    ] {
        let err = decode_err(&sealed(body));
        assert!(
            matches!(err, CursorError::Malformed { .. }),
            "{body}: {err}"
        );
        assert_eq!(err.code(), "bad_cursor");
    }
}

#[test]
fn decode_rejects_bad_hashes() {
    let cases: &[(&str, &str)] = &[
        ("1..e.1", "is missing (an empty field, or a '.' too many)"),
        (
            "1.0000000A.e.1",
            "must be lowercase hex; uppercase letters are not accepted",
        ),
        ("1.0000000.e.1", "must be exactly 8 hex digits"),
        ("1.000000000.e.1", "must be exactly 8 hex digits"),
        ("1.0000000g.e.1", "must be 8 hex digits (0-9, a-f)"),
        ("1.+0000000.e.1", "must be 8 hex digits (0-9, a-f)"),
        ("1.000000é.e.1", "must be 8 hex digits (0-9, a-f)"),
    ];
    for (body, what) in cases {
        assert_eq!(
            decode_err(&sealed(body)),
            CursorError::BadHash { entry: 1, what },
            "{body}"
        );
    }
    assert_eq!(
        decode_err(&sealed("1.0000000a.e.1.0000000B.e.1")),
        CursorError::BadHash {
            entry: 2,
            what: "must be lowercase hex; uppercase letters are not accepted"
        }
    );
}

#[test]
fn decode_rejects_bad_epochs() {
    let cases: &[(&str, &str)] = &[
        ("1.0000000a..1", "is empty"),
        ("1.0000000a.0123456789abcdefg.1", "is longer than 16 bytes"),
        (
            "1.0000000a.a:b.1",
            "may contain only A-Z, a-z, 0-9, '_' and '-'",
        ),
        (
            "1.0000000a.a b.1",
            "may contain only A-Z, a-z, 0-9, '_' and '-'",
        ),
        (
            "1.0000000a.é.1",
            "may contain only A-Z, a-z, 0-9, '_' and '-'",
        ),
    ];
    for (body, what) in cases {
        let err = decode_err(&sealed(body));
        assert_eq!(
            err,
            CursorError::BadCursorEpoch { entry: 1, what },
            "{body}"
        );
        assert_eq!(err.code(), "bad_cursor");
    }
}

#[test]
fn decode_rejects_bad_offsets() {
    let cases: &[(&str, &str)] = &[
        (
            "1.0000000a.e.",
            "is missing (an empty field, or a '.' too many)",
        ),
        (
            "1.0000000a.e.2N",
            "must be lowercase base 36; uppercase letters are not accepted",
        ),
        ("1.0000000a.e.-1", "must be base 36 (0-9, a-z)"),
        ("1.0000000a.e.+1", "must be base 36 (0-9, a-z)"),
        ("1.0000000a.e. 1", "must be base 36 (0-9, a-z)"),
        ("1.0000000a.e.1_", "must be base 36 (0-9, a-z)"),
        ("1.0000000a.e.é", "must be base 36 (0-9, a-z)"),
        ("1.0000000a.e.01", "has a leading zero"),
        ("1.0000000a.e.00", "has a leading zero"),
        ("1.0000000a.e.3w5e11264sgsg", "does not fit in 64 bits"),
        (
            "1.0000000a.e.zzzzzzzzzzzzzzzzzzzzzzzzz",
            "does not fit in 64 bits",
        ),
    ];
    for (body, what) in cases {
        assert_eq!(
            decode_err(&sealed(body)),
            CursorError::BadCursorOffset { entry: 1, what },
            "{body}"
        );
    }
    // The largest offset is accepted.
    let max = Cursor::decode(&sealed("1.0000000a.e.3w5e11264sgsf")).unwrap();
    assert_eq!(max.entries, vec![(0xa, pos("e:18446744073709551615"))]);
}

#[test]
fn decode_keeps_entries_that_share_a_hash_in_order() {
    let cursor = Cursor::decode(&sealed("1.0000000a.e.1.0000000b.e.2.0000000a.f.3")).unwrap();
    assert_eq!(
        cursor.entries,
        vec![(0xa, pos("e:1")), (0xb, pos("e:2")), (0xa, pos("f:3"))]
    );
}

#[test]
fn decode_rejects_stray_dots_and_garbage() {
    for text in [
        "..",
        ".",
        "1..",
        "1...340ca71c",
        "1.340ca71c.",
        "1.340ca71c..",
        "1.\u{0}.340ca71c",
    ] {
        let err = decode_err(text);
        assert_eq!(err.code(), "bad_cursor", "{text:?}: {err}");
    }
    let mut cursor = Cursor::new();
    cursor.set(&ch("a"), pos("e:1"));
    let text = cursor.encode();
    for wrapped in [
        format!(" {text}"),
        format!("{text} "),
        format!("{text}\n"),
        format!("x{text}"),
    ] {
        assert!(Cursor::decode(&wrapped).is_err(), "{wrapped:?}");
    }
}

#[test]
fn error_messages_are_readable_and_codes_split_by_input() {
    assert_eq!(
        decode_err(&"x".repeat(9000)).to_string(),
        "the cursor is 9000 bytes long; at most 8192 (8 KiB) are accepted"
    );
    assert_eq!(
        decode_err("2.00000000").to_string(),
        "the cursor has version \"2\"; this pushgate reads version 1 only"
    );
    assert_eq!(
        decode_err(&sealed("1.0000000a.e.2N")).to_string(),
        "cursor entry 1: the offset must be lowercase base 36; uppercase letters are not accepted"
    );
    assert_eq!(
        Position::parse("e:+1").unwrap_err().to_string(),
        "bad offset: must be decimal digits only (no sign, no spaces)"
    );
    assert_eq!(decode_err("").code(), "bad_cursor");
    assert_eq!(CursorError::ChecksumMismatch.code(), "bad_cursor");
    assert_eq!(CursorError::MissingColon.code(), "bad_position");
}

// ---- channels whose hashes collide

/// Channel names whose FNV-1a 32 hashes collide, pair by pair (found by
/// brute force). Appending the same suffix to both keeps them colliding:
/// FNV-1a's state after equal hashes goes on equally.
const COLLIDING: [(&str, &str); 4] = [
    ("room:46wu", "room:bwfa"),
    ("room:46wv", "room:bwfb"),
    ("room:46ww", "room:bwfc"),
    ("room:46wp", "room:bwfd"),
];

#[test]
fn the_colliding_names_collide() {
    for (a, b) in COLLIDING {
        assert_ne!(a, b);
        assert_eq!(channel_hash(a), channel_hash(b), "{a} {b}");
        for suffix in ["", ":1", "/x.y"] {
            assert_eq!(
                channel_hash(&format!("{a}{suffix}")),
                channel_hash(&format!("{b}{suffix}"))
            );
        }
    }
}

/// The bug this guards: two channels of one hash shared one entry, so
/// one of them was reset on every resume, forever.
#[test]
fn two_channels_with_one_hash_both_resume() {
    let (a, b) = COLLIDING[0];
    let (at_a, at_b) = (pos("AAAAAAAA:7"), pos("BBBBBBBB:9"));
    for order in [[a, b], [b, a]] {
        let mut cursor = Cursor::new();
        for name in order {
            cursor.set(&ch(name), if name == a { at_a } else { at_b });
        }
        assert_eq!(cursor.len(), 2);
        // Written in name order, whatever order they were added in.
        let text = cursor.encode();
        let hash = format!("{:08x}", channel_hash(a));
        assert_eq!(
            text,
            sealed(&format!("1.{hash}.AAAAAAAA.7.{hash}.BBBBBBBB.9"))
        );
        let decoded = Cursor::decode(&text).unwrap();
        for channels in [[a, b], [b, a]] {
            let expected: Vec<Start> = channels
                .iter()
                .map(|&c| Start::After(if c == a { at_a } else { at_b }))
                .collect();
            assert_eq!(decoded.resolve(&channels), expected);
        }
        // Moving one keeps both entries in place.
        cursor.set(&ch(b), pos("BBBBBBBB:10"));
        assert_eq!(cursor.position_of(a), Some(at_a));
        assert_eq!(cursor.position_of(b), Some(pos("BBBBBBBB:10")));
    }
}

/// The colliding example in docs/protocol.md ("Matching entries to
/// channels"); clients build cursors from that page.
#[test]
fn protocol_doc_collision_example() {
    const EXAMPLE: &str = "1.f5e16c9a.A.7.f5e16c9a.B.9.4916c2a3";
    assert_eq!(channel_hash("room:46wu"), 0xf5e16c9a);
    for order in [["room:46wu", "room:bwfa"], ["room:bwfa", "room:46wu"]] {
        let mut cursor = Cursor::new();
        for name in order {
            let at = if name == "room:46wu" { "A:7" } else { "B:9" };
            cursor.set(&ch(name), pos(at));
        }
        assert_eq!(cursor.encode(), EXAMPLE);
    }
    let doc = include_str!("../../docs/protocol.md");
    assert!(doc.contains(EXAMPLE), "docs/protocol.md lost the example");
    assert!(doc.contains("0xf5e16c9a"));
}

#[test]
fn a_changed_set_of_colliding_channels_is_lost_never_started_from_now() {
    let (a, b) = COLLIDING[1];
    let mut only_a = Cursor::new();
    only_a.set(&ch(a), pos("AAAAAAAA:7"));
    let only_a = Cursor::decode(&only_a.encode()).unwrap();
    // One entry of that hash, two channels: which is whose cannot be
    // told, so both are reset.
    assert_eq!(
        only_a.resolve(&[a, b, "news"]),
        [Start::Lost, Start::Lost, Start::Now]
    );
    assert_eq!(only_a.resolve(&[a]), [Start::After(pos("AAAAAAAA:7"))]);

    let mut both = Cursor::new();
    both.set(&ch(a), pos("AAAAAAAA:7"));
    both.set(&ch(b), pos("BBBBBBBB:9"));
    let both = Cursor::decode(&both.encode()).unwrap();
    assert_eq!(both.resolve(&[b]), [Start::Lost]);
    assert_eq!(both.position_of(a), None);
    // A channel named twice is one channel.
    assert_eq!(
        both.resolve(&[a, b, a]),
        [
            Start::After(pos("AAAAAAAA:7")),
            Start::After(pos("BBBBBBBB:9")),
            Start::After(pos("AAAAAAAA:7"))
        ]
    );
    assert_eq!(Cursor::new().encode(), "1.340ca71c");
    assert_eq!(
        Cursor::decode("1.340ca71c").unwrap().resolve(&[a, b]),
        [Start::Now, Start::Now]
    );
}

// ---- properties

fn channel_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_:.@=/-]{1,40}"
}

/// Two names whose real hashes collide.
fn colliding_pair() -> impl Strategy<Value = (String, String)> {
    (0..COLLIDING.len(), "[a-z0-9:]{0,6}").prop_map(|(i, suffix)| {
        let (a, b) = COLLIDING[i];
        (format!("{a}{suffix}"), format!("{b}{suffix}"))
    })
}

/// Distinct channel names, some of them in colliding pairs, in a random
/// order.
fn channel_set() -> impl Strategy<Value = Vec<String>> {
    (
        proptest::collection::vec(channel_name(), 0..12),
        proptest::collection::vec(colliding_pair(), 0..4),
    )
        .prop_flat_map(|(names, pairs)| {
            let mut set: Vec<String> = names;
            for (a, b) in pairs {
                set.push(a);
                set.push(b);
            }
            set.sort();
            set.dedup();
            Just(set).prop_shuffle()
        })
}

fn any_epoch() -> impl Strategy<Value = Epoch> {
    "[A-Za-z0-9_-]{1,16}".prop_map(|text| Epoch::parse(&text).unwrap())
}

fn any_offset() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..1000, any::<u64>(), Just(u64::MAX)]
}

fn any_position() -> impl Strategy<Value = Position> {
    (any_epoch(), any_offset()).prop_map(|(epoch, offset)| Position::new(epoch, offset))
}

fn any_cursor() -> impl Strategy<Value = Cursor> {
    channel_set()
        .prop_flat_map(|names| {
            let count = names.len();
            (
                Just(names),
                proptest::collection::vec(any_position(), count),
            )
        })
        .prop_map(|(names, positions)| {
            let mut cursor = Cursor::new();
            for (name, position) in names.iter().zip(positions) {
                cursor.set(&ch(name), position);
            }
            cursor
        })
}

/// A deliberately weak hash, so that most channels collide: the
/// resolution is tested with groups of every size, not only pairs.
fn weak_hash(name: &str) -> u32 {
    (name.len() % 3) as u32
}

/// Builds a cursor over `channels` (with `hash`), setting each one's
/// position, some of them twice, in the given order.
fn build(
    channels: &[String],
    positions: &[Position],
    hash: impl Fn(&str) -> u32,
) -> (Cursor, HashMap<String, Position>) {
    let mut cursor = Cursor::new();
    let mut expected = HashMap::new();
    for (name, position) in channels.iter().zip(positions) {
        // A first position, then the real one: `set` moves an entry.
        cursor.set_hashed(&ch(name), hash(name), Position::new(position.epoch, 0));
        cursor.set_hashed(&ch(name), hash(name), *position);
        expected.insert(name.clone(), *position);
    }
    (cursor, expected)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Encode, decode, resolve against the same channels in any order:
    /// every channel gets its own position back, colliding or not.
    #[test]
    fn prop_cursor_round_trips(
        (channels, positions, order) in channel_set().prop_flat_map(|names| {
            let count = names.len();
            (Just(names.clone()), proptest::collection::vec(any_position(), count), Just(names).prop_shuffle())
        })
    ) {
        let (cursor, expected) = build(&channels, &positions, channel_hash);
        prop_assert_eq!(cursor.len(), channels.len());
        let text = cursor.encode();
        prop_assert!(text.len() <= MAX_CURSOR_BYTES);
        prop_assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'));
        let decoded = Cursor::decode(&text).unwrap();
        prop_assert_eq!(decoded.len(), channels.len());
        prop_assert_eq!(decoded.encode(), text);
        prop_assert_eq!(&decoded, &super::tests::decoded(&cursor));
        let starts = decoded.resolve(&order);
        for (name, start) in order.iter().zip(starts) {
            prop_assert_eq!(start, Start::After(expected[name]), "{}", name);
        }
    }

    /// The same with a hash under which most channels collide, in
    /// groups of every size.
    #[test]
    fn prop_colliding_groups_of_any_size_round_trip(
        (channels, positions, order) in proptest::collection::btree_set("[a-z]{1,6}", 0..16)
            .prop_flat_map(|names| {
                let names: Vec<String> = names.into_iter().collect();
                let count = names.len();
                (Just(names.clone()).prop_shuffle(), proptest::collection::vec(any_position(), count), Just(names).prop_shuffle())
            })
    ) {
        let (cursor, expected) = build(&channels, &positions, weak_hash);
        let decoded = Cursor::decode(&cursor.encode()).unwrap();
        let starts = decoded.resolve_by(&order, weak_hash);
        for (name, start) in order.iter().zip(starts) {
            prop_assert_eq!(start, Start::After(expected[name]), "{}", name);
        }
    }

    /// A client that comes back with other channels than its cursor was
    /// written for: a channel whose hash group is unchanged resumes
    /// exactly; a channel whose hash the cursor does not hold starts
    /// from now; a channel the cursor holds never starts from now.
    #[test]
    fn prop_a_changed_channel_set_never_starts_a_held_channel_from_now(
        (before, positions, after) in proptest::collection::btree_set("[a-z]{1,5}", 0..12)
            .prop_flat_map(|names| {
                let names: Vec<String> = names.into_iter().collect();
                let count = names.len();
                (
                    Just(names.clone()),
                    proptest::collection::vec(any_position(), count),
                    (proptest::sample::subsequence(names, 0..=count), proptest::collection::btree_set("[a-z]{1,5}", 0..4))
                        .prop_map(|(kept, added)| {
                            let mut after: Vec<String> = kept;
                            after.extend(added);
                            after
                        }),
                )
            })
    ) {
        let (cursor, expected) = build(&before, &positions, weak_hash);
        let decoded = Cursor::decode(&cursor.encode()).unwrap();
        fn group(names: &[String], hash: u32) -> Vec<&String> {
            let mut group: Vec<&String> = names.iter().filter(|n| weak_hash(n) == hash).collect();
            group.sort();
            group.dedup();
            group
        }
        let starts = decoded.resolve_by(&after, weak_hash);
        for (name, start) in after.iter().zip(starts) {
            let hash = weak_hash(name);
            let (was, is) = (group(&before, hash), group(&after, hash));
            if was.is_empty() {
                prop_assert_eq!(start, Start::Now, "{}", name);
            } else if was == is {
                prop_assert_eq!(start, Start::After(expected[name]), "{}", name);
            } else if was.len() == is.len() {
                // Swapped within a group: some position of that group,
                // which its epoch then tells apart.
                let held: Vec<Position> = was.iter().map(|n| expected[*n]).collect();
                prop_assert!(matches!(start, Start::After(p) if held.contains(&p)), "{}: {:?}", name, start);
            } else {
                prop_assert_eq!(start, Start::Lost, "{}", name);
            }
            if expected.contains_key(name) {
                prop_assert_ne!(start, Start::Now, "{}", name);
            }
        }
    }

    #[test]
    fn prop_decode_never_panics_on_strings(text in any::<String>()) {
        let _ = Cursor::decode(&text).map(|c| c.resolve(&["a", "b"]));
        let _ = Position::parse(&text);
        let _ = Epoch::parse(&text);
    }

    #[test]
    fn prop_decode_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = Cursor::decode(&text);
        let _ = Position::parse(&text);
    }

    /// Strings made of the cursor's own alphabet, plus a multi-byte
    /// character, get past the early checks into the field parsers.
    #[test]
    fn prop_decode_never_panics_on_near_cursors(body in "1(\\.[0-9a-fA-F]{0,9}\\.[A-Za-z0-9_é-]{0,17}\\.[0-9a-zA-Z+é]{0,14}){0,4}", seal in any::<bool>()) {
        let text = if seal { sealed(&body) } else { format!("{body}.00000000") };
        if let Ok(cursor) = Cursor::decode(&text) {
            prop_assert_eq!(cursor.encode(), text);
            let _ = cursor.resolve(&["a", "b", "c"]);
        }
    }

    /// Any one byte replaced by another is refused: inside the body the
    /// checksum no longer matches (each FNV-1a step is one-to-one), and
    /// inside the checksum it no longer matches the body.
    #[test]
    fn prop_single_byte_changes_are_refused(
        cursor in any_cursor(),
        index in any::<prop::sample::Index>(),
        replacement in any::<u8>(),
    ) {
        let text = cursor.encode();
        let mut bytes = text.clone().into_bytes();
        let at = index.index(bytes.len());
        prop_assume!(bytes[at] != replacement);
        bytes[at] = replacement;
        let altered = String::from_utf8_lossy(&bytes);
        let err = Cursor::decode(&altered).expect_err(&altered);
        prop_assert_eq!(err.code(), "bad_cursor");
    }

    /// Every cut-short cursor is refused. (One could pass only if its
    /// last 8 characters happened to be the FNV-1a of the rest: odds of
    /// 2^-32 per cut.)
    #[test]
    fn prop_truncations_are_refused(cursor in any_cursor(), index in any::<prop::sample::Index>()) {
        let text = cursor.encode();
        let cut = index.index(text.len());
        let err = Cursor::decode(&text[..cut]).expect_err(&text[..cut]);
        prop_assert_eq!(err.code(), "bad_cursor");
    }

    #[test]
    fn prop_single_character_changes_are_caught(
        cursor in any_cursor(),
        index in any::<prop::sample::Index>(),
        replacement in any::<char>(),
        kind in 0u8..3,
    ) {
        let text = cursor.encode();
        let mut chars: Vec<char> = text.chars().collect();
        let at = index.index(chars.len());
        match kind {
            0 => chars[at] = replacement,
            1 => { chars.remove(at); }
            _ => chars.insert(at, replacement),
        }
        let altered: String = chars.into_iter().collect();
        match Cursor::decode(&altered) {
            Err(err) => prop_assert_eq!(err.code(), "bad_cursor"),
            Ok(decoded) => prop_assert_eq!(decoded, super::tests::decoded(&cursor)),
        }
    }

    #[test]
    fn prop_position_round_trips(epoch in any_epoch(), offset in any_offset()) {
        let position = Position::new(epoch, offset);
        let text = position.to_string();
        prop_assert_eq!(Position::parse(&text), Ok(position));
        prop_assert_eq!(text.parse::<Position>(), Ok(position));
    }
}
