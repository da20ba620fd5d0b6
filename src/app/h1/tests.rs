use super::*;

fn steps(framing: &mut Framing, input: &[u8], eof: bool) -> Result<Vec<Step>, BoxError> {
    let mut buf = BytesMut::from(input);
    let mut out = Vec::new();
    loop {
        match framing.step(&mut buf, eof)? {
            Step::More => return Ok(out),
            Step::End => {
                out.push(Step::End);
                return Ok(out);
            }
            step => out.push(step),
        }
    }
}

fn data(steps: &[Step]) -> Vec<u8> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Data(d) => Some(d.to_vec()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn chunked_bodies_decode_with_extensions_and_trailers() {
    let mut framing = Framing::Chunked(Chunked::Size);
    let out = steps(
        &mut framing,
        b"5;name=value\r\nhello\r\nA \r\n, chunked!\r\n0\r\nx-digest: abc\r\n\r\n",
        false,
    )
    .unwrap();
    assert_eq!(data(&out), b"hello, chunked!");
    let trailers = out.iter().find_map(|s| match s {
        Step::Trailers(t) => Some(t.clone()),
        _ => None,
    });
    assert_eq!(trailers.unwrap()["x-digest"], "abc");
    assert!(matches!(out.last(), Some(Step::End)));
    assert!(framing.is_done());
}

#[test]
fn chunked_bodies_decode_across_any_split() {
    let wire: &[u8] = b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n";
    for split in 0..wire.len() {
        let mut framing = Framing::Chunked(Chunked::Size);
        let mut buf = BytesMut::from(&wire[..split]);
        let mut got = Vec::new();
        let mut ended = false;
        for more in [&wire[split..], &b""[..]] {
            loop {
                match framing.step(&mut buf, false).unwrap() {
                    Step::Data(d) => got.extend_from_slice(&d),
                    Step::End => {
                        ended = true;
                        break;
                    }
                    Step::Trailers(_) => unreachable!("no trailers sent"),
                    Step::More => break,
                }
            }
            buf.extend_from_slice(more);
        }
        assert!(ended, "split at {split}");
        assert_eq!(got, b"abc0123456789abcdef", "split at {split}");
    }
}

#[test]
fn malformed_chunked_bodies_are_errors() {
    for wire in [
        &b"zz\r\nhello\r\n"[..],
        b"\r\n",
        b"5\r\nhelloX\r\n",
        b"5 garbage\r\n",
        b"11111111111111111\r\n",
    ] {
        let mut framing = Framing::Chunked(Chunked::Size);
        assert!(steps(&mut framing, wire, false).is_err(), "{wire:?}");
    }
    let long_line = vec![b'1'; MAX_CHUNK_LINE + 1];
    let mut framing = Framing::Chunked(Chunked::Size);
    assert!(steps(&mut framing, &long_line, false).is_err());
}

#[test]
fn a_body_cut_short_by_the_app_is_an_error_but_one_framed_by_close_ends() {
    let mut framing = Framing::Length(10);
    assert!(steps(&mut framing, b"12345", true).is_err());
    let mut framing = Framing::Chunked(Chunked::Size);
    assert!(steps(&mut framing, b"5\r\nhel", true).is_err());
    let mut framing = Framing::Close;
    let out = steps(&mut framing, b"all of it", true).unwrap();
    assert_eq!(data(&out), b"all of it");
    assert!(matches!(out.last(), Some(Step::End)));
}

#[test]
fn a_length_framed_body_stops_at_its_length() {
    let mut framing = Framing::Length(5);
    let mut buf = BytesMut::from(&b"helloHTTP/1.1 200"[..]);
    let Step::Data(first) = framing.step(&mut buf, false).unwrap() else {
        panic!("data expected")
    };
    assert_eq!(first, "hello");
    assert!(framing.is_done());
    assert_eq!(buf, &b"HTTP/1.1 200"[..]);
}

fn head(wire: &str) -> Result<Option<Head>, ProxyError> {
    parse_head(&mut BytesMut::from(wire))
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// A field the answer might carry: framing and keep-alive fields in
    /// any case, and others.
    fn field() -> impl Strategy<Value = (String, String)> {
        let name = prop_oneof![
            Just("Content-Length".to_owned()),
            Just("content-length".to_owned()),
            Just("Transfer-Encoding".to_owned()),
            Just("TRANSFER-ENCODING".to_owned()),
            Just("Connection".to_owned()),
            "[Xx]-[a-z]{1,8}",
        ];
        let value = prop_oneof![
            (0u64..100_000).prop_map(|n| n.to_string()),
            Just("chunked".to_owned()),
            Just("gzip, chunked".to_owned()),
            Just("chunked, gzip".to_owned()),
            Just("close".to_owned()),
            Just("keep-alive".to_owned()),
            "[ -~]{0,20}".prop_map(|v| v.trim().to_owned()),
        ];
        (name, value)
    }

    /// What RFC 9112 §6.3 says an answer's body is framed by, read
    /// from the fields independently of the parser.
    fn expected_framing(status: u16, fields: &[(String, String)]) -> Option<Framing> {
        if status == 204 || status == 304 {
            return Some(Framing::Length(0));
        }
        let of = |name: &'static str| {
            fields
                .iter()
                .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        if of("transfer-encoding").next().is_some() {
            let last = of("transfer-encoding")
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .rfind(|t| !t.is_empty());
            return Some(match last {
                Some(t) if t.eq_ignore_ascii_case("chunked") => Framing::Chunked(Chunked::Size),
                _ => Framing::Close,
            });
        }
        let lengths: Vec<&str> = of("content-length")
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        if lengths.is_empty() {
            return Some(Framing::Close);
        }
        let first: u64 = lengths[0]
            .parse()
            .ok()
            .filter(|_| lengths[0].bytes().all(|b| b.is_ascii_digit()))?;
        lengths
            .iter()
            .all(|l| l.parse() == Ok(first) && l.bytes().all(|b| b.is_ascii_digit()))
            .then_some(Framing::Length(first))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Rule: no bytes from the app make the head parser panic; it
        /// answers a head, "more", or an error.
        #[test]
        fn prop_any_bytes_leave_the_head_parser_standing(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = parse_head(&mut buf);
            let mut prefixed = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
            prefixed.extend_from_slice(&bytes);
            let _ = parse_head(&mut prefixed);
        }

        /// Rule: an answer head is read with every field kept in order,
        /// and framed exactly as RFC 9112 §6.3 says; an invalid length is
        /// an error, never a guess.
        #[test]
        fn prop_answer_heads_keep_their_fields_and_frame_by_the_rfc(
            status in prop_oneof![200u16..=299, 300u16..=599],
            fields in proptest::collection::vec(field(), 0..8),
            minor in 0u8..=1,
        ) {
            let mut wire = format!("HTTP/1.{minor} {status} Whatever\r\n");
            for (name, value) in &fields {
                wire.push_str(&format!("{name}: {value}\r\n"));
            }
            wire.push_str("\r\nbody");
            let mut buf = BytesMut::from(wire.as_str());
            let parsed = parse_head(&mut buf);
            match expected_framing(status, &fields) {
                None => prop_assert!(parsed.is_err()),
                Some(framing) => {
                    let head = parsed.unwrap().unwrap();
                    prop_assert_eq!(head.framing, framing);
                    prop_assert_eq!(&buf[..], b"body");
                    let close = fields.iter().any(|(n, v)| n.eq_ignore_ascii_case("connection")
                        && v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
                    prop_assert_eq!(head.keep_alive, minor == 1 && !close);
                    for (name, value) in &fields {
                        let kept: Vec<&[u8]> = head.headers.get_all(name.as_str()).iter().map(HeaderValue::as_bytes).collect();
                        prop_assert!(kept.contains(&value.as_bytes()), "{} lost", name);
                    }
                    prop_assert_eq!(head.headers.len(), fields.len());
                }
            }
        }

        /// Rule: a chunked body decodes to exactly its bytes, however it
        /// is cut into chunks, whatever extensions and trailers it
        /// carries, and wherever the reads split it; nothing after the
        /// last chunk is taken.
        #[test]
        fn prop_chunked_bodies_decode_whatever_the_cuts(
            body in proptest::collection::vec(any::<u8>(), 0..2048),
            cuts in proptest::collection::vec(1usize..300, 1..20),
            extension in prop_oneof![Just(""), Just(";a=b"), Just(" ; x=\"y\"")],
            trailer in prop_oneof![Just(""), Just("X-Sum: 1\r\n")],
            reads in proptest::collection::vec(1usize..64, 1..50),
        ) {
            let mut wire = Vec::new();
            let mut rest = &body[..];
            let mut cut = cuts.iter().cycle();
            while !rest.is_empty() {
                let take = (*cut.next().unwrap()).min(rest.len());
                wire.extend_from_slice(format!("{take:X}{extension}\r\n").as_bytes());
                wire.extend_from_slice(&rest[..take]);
                wire.extend_from_slice(b"\r\n");
                rest = &rest[take..];
            }
            wire.extend_from_slice(format!("0{extension}\r\n{trailer}\r\n").as_bytes());
            wire.extend_from_slice(b"HTTP/1.1 next");

            let mut framing = Framing::Chunked(Chunked::Size);
            let mut buf = BytesMut::new();
            let mut fed = 0;
            let mut read = reads.iter().cycle();
            let mut got = Vec::new();
            let mut trailers = None;
            loop {
                match framing.step(&mut buf, false).unwrap() {
                    Step::Data(data) => got.extend_from_slice(&data),
                    Step::Trailers(t) => trailers = Some(t),
                    Step::End => break,
                    Step::More => {
                        prop_assert!(fed < wire.len(), "wanted more after the whole body");
                        let n = (*read.next().unwrap()).min(wire.len() - fed);
                        buf.extend_from_slice(&wire[fed..fed + n]);
                        fed += n;
                    }
                }
            }
            prop_assert_eq!(got, body);
            prop_assert_eq!(trailers.is_some(), !trailer.is_empty());
            let mut left = buf.to_vec();
            left.extend_from_slice(&wire[fed..]);
            prop_assert_eq!(&left[..], b"HTTP/1.1 next");
        }

        /// Rule: no bytes make the chunked decoder panic or loop; each
        /// step takes bytes, ends, errs, or asks for more.
        #[test]
        fn prop_any_bytes_leave_the_chunked_decoder_standing(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            eof in any::<bool>(),
        ) {
            let mut framing = Framing::Chunked(Chunked::Size);
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..=bytes.len() + 2 {
                match framing.step(&mut buf, eof) {
                    Ok(Step::End) | Ok(Step::More) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }
}

#[test]
fn answer_heads_give_status_fields_framing_and_keep_alive() {
    let parsed = head("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nX-A: 2\r\n\r\nok")
        .unwrap()
        .unwrap();
    assert_eq!(parsed.status, StatusCode::OK);
    assert_eq!(parsed.framing, Framing::Length(2));
    assert!(parsed.keep_alive);
    assert_eq!(parsed.headers.get_all("x-a").iter().count(), 2);

    let chunked =
        head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n")
            .unwrap()
            .unwrap();
    assert_eq!(chunked.framing, Framing::Chunked(Chunked::Size));

    let closing = head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(!closing.keep_alive);
    let old = head("HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
    assert!(!old.keep_alive);
    assert_eq!(old.framing, Framing::Close);
    let unknown_coding = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(unknown_coding.framing, Framing::Close);
    let not_modified = head("HTTP/1.1 304 Not Modified\r\nContent-Length: 40\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(not_modified.framing, Framing::Length(0));

    assert!(head("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
}

#[test]
fn framing_and_keep_alive_read_every_field_of_their_name_in_any_case() {
    let framing = |wire: &str| head(wire).unwrap().unwrap().framing;
    // The last coding over all Transfer-Encoding fields decides.
    assert_eq!(
        framing(
            "HTTP/1.1 200 OK\r\nTRANSFER-encoding: gzip\r\ntransfer-encoding: ,Chunked ,\r\n\r\n"
        ),
        Framing::Chunked(Chunked::Size)
    );
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n"),
        Framing::Close
    );
    // A Transfer-Encoding with no coding in it still rules out a length.
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\nContent-Length: 3\r\n\r\n"),
        Framing::Close
    );
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\ncontent-LENGTH: 7\r\n\r\n"),
        Framing::Length(7)
    );
    assert!(head("HTTP/1.1 200 OK\r\nContent-Length: 7\r\ncontent-length: 8\r\n\r\n").is_err());

    let keep_alive = |wire: &str| head(wire).unwrap().unwrap().keep_alive;
    assert!(!keep_alive(
        "HTTP/1.1 200 OK\r\nconnection: keep-alive, CLOSE\r\nContent-Length: 0\r\n\r\n"
    ));
    assert!(!keep_alive(
        "HTTP/1.1 200 OK\r\nConnection: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    ));
    assert!(keep_alive(
        "HTTP/1.1 200 OK\r\nConnection: closed, keep-alive\r\nContent-Length: 0\r\n\r\n"
    ));
    // A field merely ending in the name is another field.
    assert!(keep_alive(
        "HTTP/1.1 200 OK\r\nX-Connection: close\r\nContent-Length: 0\r\n\r\n"
    ));
}

#[test]
fn every_field_of_a_long_answer_head_is_kept_up_to_the_limit() {
    let wire = |count: usize| {
        let fields: String = (0..count).map(|i| format!("X-F{i}: v{i}\r\n")).collect();
        format!("HTTP/1.1 200 OK\r\n{fields}\r\n")
    };
    // More fields than the spans keep inline, and the most accepted.
    for count in [40, MAX_HEADERS] {
        let parsed = head(&wire(count)).unwrap().unwrap();
        assert_eq!(parsed.headers.len(), count);
        for i in 0..count {
            assert_eq!(
                parsed.headers[format!("x-f{i}").as_str()],
                format!("v{i}").as_str()
            );
        }
    }
    assert!(head(&wire(MAX_HEADERS + 1)).is_err());
}

#[test]
fn interim_answers_are_skipped() {
    let parsed = head(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap()
    .unwrap();
    assert_eq!(parsed.status, StatusCode::CREATED);
    assert!(!parsed.headers.contains_key("link"));
}

#[test]
fn invalid_answer_heads_are_errors() {
    for wire in [
        "SSH-2.0-OpenSSH\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    ] {
        assert!(head(wire).is_err(), "{wire}");
    }
    let agreeing = head("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(agreeing.framing, Framing::Length(5));
}

#[test]
fn requests_are_written_with_host_and_an_explicit_empty_body() {
    let mut headers = HeaderMap::new();
    headers.insert("x-forwarded-for", HeaderValue::from_static("127.0.0.1"));
    let host = HeaderValue::from_static("app:3000");
    let get = String::from_utf8(encode_request(
        &Method::GET,
        "/a?b=c",
        &headers,
        &Added::default(),
        &host,
        None,
    ))
    .unwrap();
    assert_eq!(
        get,
        "GET /a?b=c HTTP/1.1\r\nhost: app:3000\r\nx-forwarded-for: 127.0.0.1\r\n\r\n"
    );
    headers.insert(header::HOST, HeaderValue::from_static("example.com"));
    let post = String::from_utf8(encode_request(
        &Method::POST,
        "/",
        &headers,
        &Added::default(),
        &host,
        None,
    ))
    .unwrap();
    assert_eq!(
        post,
        "POST / HTTP/1.1\r\nx-forwarded-for: 127.0.0.1\r\nhost: example.com\r\ncontent-length: 0\r\n\r\n"
    );
    // A length in any form hyper took is written as pushgate's own.
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0, 00"));
    let get = String::from_utf8(encode_request(
        &Method::GET,
        "/",
        &headers,
        &Added::default(),
        &host,
        None,
    ))
    .unwrap();
    assert_eq!(
        get,
        "GET / HTTP/1.1\r\nx-forwarded-for: 127.0.0.1\r\nhost: example.com\r\ncontent-length: 0\r\n\r\n"
    );
}

#[test]
fn a_whole_body_follows_its_length_in_the_same_buffer() {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // Framing that came with the headers gives way to the body's own.
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
    headers.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    let host = HeaderValue::from_static("app:3000");
    let post = String::from_utf8(encode_request(
        &Method::POST,
        "/auth",
        &headers,
        &Added::default(),
        &host,
        Some(br#"{"a":1}"#),
    ))
    .unwrap();
    assert_eq!(
        post,
        "POST /auth HTTP/1.1\r\nhost: app:3000\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{\"a\":1}"
    );
}
