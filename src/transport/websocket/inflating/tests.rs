//! The layer's invariant — tungstenite reads exactly the uncompressed frame
//! stream — against random messages, fragments, pings and read splits,
//! checked both by a frame reader of its own and by tungstenite; and the
//! refusals.

use super::*;
use flate2::{Compress, Compression, FlushCompress};
use futures_util::StreamExt;
use proptest::prelude::*;
use std::collections::VecDeque;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const PING: u8 = 0x9;
const CLOSE: u8 = 0x8;
const LIMIT: usize = 64 * 1024;

/// One client frame, masked with `key` unless it is `None`.
fn frame(fin: bool, rsv: u8, opcode: u8, key: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
    let mask_bit = if key.is_some() { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => bytes.push(mask_bit | len as u8),
        len @ 126..=0xffff => {
            bytes.push(mask_bit | 126);
            bytes.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            bytes.push(mask_bit | 127);
            bytes.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    match key {
        Some(key) => {
            bytes.extend_from_slice(&key);
            bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => bytes.extend_from_slice(payload),
    }
    bytes
}

const KEY: Option<[u8; 4]> = Some([0x37, 0xfa, 0x21, 0x3d]);

/// `payload` deflated as a client does, whether or not that is smaller.
fn deflated(payload: &[u8]) -> Vec<u8> {
    let mut compressor = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() * 2 + 64);
    compressor
        .compress_vec(payload, &mut out, FlushCompress::Sync)
        .unwrap();
    assert!(out.ends_with(&TRAILER));
    out.truncate(out.len() - 4);
    out
}

/// Runs `chunks` through the frame follower as the layer would: what
/// tungstenite reads, or the refusal.
fn follow(limit: usize, chunks: &[&[u8]]) -> Result<Vec<u8>, Refused> {
    let mut frames = ClientFrames::new(limit);
    let mut upper = Vec::new();
    for chunk in chunks {
        let kept = frames.decode(chunk)?;
        upper.extend_from_slice(&chunk[..kept]);
        upper.extend_from_slice(&frames.out[frames.out_read..]);
        frames.out.clear();
        frames.out_read = 0;
    }
    Ok(upper)
}

/// A frame as the upper side reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Upper {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// Reads the upper stream's frames, checking that no reserved bit is set
/// and that every frame is masked.
fn upper_frames(mut bytes: &[u8]) -> Vec<Upper> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let head = Head::parse(bytes).unwrap_or_else(|_| panic!("a whole header: {bytes:?}"));
        assert!(
            !head.rsv1 && !head.rsv_other,
            "no reserved bit reaches tungstenite"
        );
        let key = head.mask.expect("masked");
        let end = head.size + head.len as usize;
        let payload = bytes[head.size..end]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        frames.push(Upper {
            fin: head.fin,
            opcode: head.opcode,
            payload,
        });
        bytes = &bytes[end..];
    }
    frames
}

/// What a reader of the upper stream makes of it: pings and whole
/// messages, in order.
fn events(frames: &[Upper]) -> Vec<(u8, Vec<u8>)> {
    let mut events = Vec::new();
    let mut message: Option<(u8, Vec<u8>)> = None;
    for frame in frames {
        match frame.opcode {
            CONTINUATION => {
                let (_, payload) = message.as_mut().expect("a continuation inside a message");
                payload.extend_from_slice(&frame.payload);
            }
            TEXT | BINARY => {
                assert!(message.is_none(), "a message inside another");
                message = Some((frame.opcode, frame.payload.clone()));
            }
            _ => events.push((frame.opcode, frame.payload.clone())),
        }
        if frame.fin && frame.opcode < 0x8 {
            events.push(message.take().expect("a message to end"));
        }
    }
    assert!(message.is_none(), "every message ended");
    events
}

/// A message as a test sends it.
#[derive(Debug, Clone)]
struct Sent {
    opcode: u8,
    payload: Vec<u8>,
    compressed: bool,
    /// Where the (wire) payload is cut into fragments, as fractions.
    cuts: Vec<u8>,
    /// Pings after each fragment but the last.
    pings: Vec<bool>,
    key: [u8; 4],
}

impl Sent {
    /// Its frames, and the events a reader sees for it.
    fn wire(&self) -> (Vec<u8>, Vec<(u8, Vec<u8>)>) {
        let body = if self.compressed {
            deflated(&self.payload)
        } else {
            self.payload.clone()
        };
        let mut points: Vec<usize> = self
            .cuts
            .iter()
            .map(|&cut| body.len() * usize::from(cut) / 255)
            .collect();
        points.sort_unstable();
        points.dedup();
        points.retain(|&p| p > 0 && p < body.len());
        let mut pieces = Vec::new();
        let mut from = 0;
        for point in points {
            pieces.push(&body[from..point]);
            from = point;
        }
        pieces.push(&body[from..]);

        let mut wire = Vec::new();
        let mut seen = Vec::new();
        let last = pieces.len() - 1;
        for (n, piece) in pieces.iter().enumerate() {
            let opcode = if n == 0 { self.opcode } else { CONTINUATION };
            let rsv = if n == 0 && self.compressed { 4 } else { 0 };
            wire.extend(frame(n == last, rsv, opcode, Some(self.key), piece));
            if n < last && self.pings.get(n).copied().unwrap_or(false) {
                let ping = vec![n as u8; n % 5];
                wire.extend(frame(true, 0, PING, Some(self.key), &ping));
                seen.push((PING, ping));
            }
        }
        seen.push((self.opcode, self.payload.clone()));
        (wire, seen)
    }
}

fn any_sent() -> impl Strategy<Value = Sent> {
    let text = prop_oneof![
        // Text that compresses.
        "[a-c {}\":,é]{0,600}".prop_map(String::into_bytes),
        // Long enough for 16- and 64-bit lengths.
        (0usize..70_000).prop_map(|len| b"{\"k\":1}".repeat(len / 7)),
    ];
    let message = prop_oneof![
        (prop_oneof![Just(TEXT), Just(BINARY)], text),
        // Bytes that are not UTF-8 go as binary.
        (Just(BINARY), proptest::collection::vec(any::<u8>(), 0..300)),
    ];
    (
        message,
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..4),
        proptest::collection::vec(any::<bool>(), 0..4),
        any::<[u8; 4]>(),
    )
        .prop_map(|((opcode, payload), compressed, cuts, pings, key)| Sent {
            opcode,
            payload,
            compressed,
            cuts,
            pings,
            key,
        })
}

/// `bytes` cut at the given points (fractions of its length).
fn split<'a>(bytes: &'a [u8], cuts: &[u16]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&cut| bytes.len() * usize::from(cut) / usize::from(u16::MAX))
        .collect();
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for point in points {
        chunks.push(&bytes[from..point]);
        from = point;
    }
    chunks.push(&bytes[from..]);
    chunks
}

fn stream_of(messages: &[Sent]) -> (Vec<u8>, Vec<(u8, Vec<u8>)>) {
    let mut wire = Vec::new();
    let mut seen = Vec::new();
    for message in messages {
        let (bytes, events) = message.wire();
        wire.extend(bytes);
        seen.extend(events);
    }
    (wire, seen)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The upper side reads exactly the messages and pings sent, however
    /// the stream is fragmented and read.
    #[test]
    fn prop_the_upper_side_reads_exactly_what_was_sent(
        messages in proptest::collection::vec(any_sent(), 0..6),
        cuts in proptest::collection::vec(any::<u16>(), 0..12),
    ) {
        let (wire, seen) = stream_of(&messages);
        let upper = follow(LIMIT * 2, &split(&wire, &cuts)).unwrap();
        prop_assert_eq!(events(&upper_frames(&upper)), seen);
        if messages.iter().all(|m| !m.compressed) {
            // Nothing compressed: the very same bytes.
            prop_assert_eq!(upper, wire);
        }
    }

    /// The same through the layer and tungstenite itself, each read
    /// returning one chunk (and a pending read between chunks).
    #[test]
    fn prop_tungstenite_reads_exactly_what_was_sent(
        messages in proptest::collection::vec(any_sent(), 0..4),
        cuts in proptest::collection::vec(any::<u16>(), 0..12),
    ) {
        let (wire, seen) = stream_of(&messages);
        // An empty read is the end of the stream: none in the middle.
        let chunks = split(&wire, &cuts)
            .into_iter()
            .filter(|chunk| !chunk.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let read = runtime.block_on(read_messages(chunks, LIMIT * 2));
        let read: Vec<(u8, Vec<u8>)> = read.unwrap();
        prop_assert_eq!(read, seen);
    }
}

/// A socket whose reads return the chunks one at a time, pending once
/// before each.
struct Chunks {
    chunks: VecDeque<Vec<u8>>,
    pending: bool,
}

impl AsyncRead for Chunks {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.pending = !self.pending;
        if self.pending {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let Some(chunk) = self.chunks.front_mut() else {
            return Poll::Ready(Ok(()));
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..n]);
        chunk.drain(..n);
        if chunk.is_empty() {
            self.chunks.pop_front();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunks {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What tungstenite reads (messages and pings) through the layer from a
/// socket giving `chunks`, until the stream ends; or the error it fails
/// with.
async fn read_messages(
    chunks: Vec<Vec<u8>>,
    limit: usize,
) -> Result<Vec<(u8, Vec<u8>)>, tokio_tungstenite::tungstenite::Error> {
    let io = Inflating::deflate(
        Chunks {
            chunks: chunks.into(),
            pending: false,
        },
        limit,
    );
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(256)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let mut socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let mut read = Vec::new();
    while let Some(message) = socket.next().await {
        match message {
            Ok(Message::Text(text)) => read.push((TEXT, text.as_bytes().to_vec())),
            Ok(Message::Binary(bytes)) => read.push((BINARY, bytes.to_vec())),
            Ok(Message::Ping(bytes)) => read.push((PING, bytes.to_vec())),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tokio_tungstenite::tungstenite::Error::Protocol(
                tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )) => break,
            Err(err) => return Err(err),
        }
    }
    Ok(read)
}

/// How a stream's read fails through the layer and tungstenite.
fn refusal(chunks: &[&[u8]]) -> Option<Refused> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let chunks = chunks.iter().map(|c| c.to_vec()).collect();
    match runtime.block_on(read_messages(chunks, LIMIT)) {
        Err(tokio_tungstenite::tungstenite::Error::Io(err)) => Refused::of(&err),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_compressed_text_message_reaches_tungstenite_inflated() {
    let text = br#"{"id":1,"op":"subscribe","channel":"news","channel":"news"}"#;
    let wire = frame(true, 4, TEXT, KEY, &deflated(text));
    let upper = follow(LIMIT, &[&wire]).unwrap();
    assert_eq!(
        upper_frames(&upper),
        vec![Upper {
            fin: true,
            opcode: TEXT,
            payload: text.to_vec()
        }]
    );
    // Byte by byte, too.
    let bytes: Vec<&[u8]> = wire.chunks(1).collect();
    assert_eq!(follow(LIMIT, &bytes).unwrap(), upper);
}

#[test]
fn an_empty_compressed_message_inflates_to_nothing() {
    // RFC 7692 §7.2.3.6: an empty message may be sent as a lone 0x00.
    for body in [&[0x00][..], &deflated(b"")] {
        let upper = follow(LIMIT, &[&frame(true, 4, BINARY, KEY, body)]).unwrap();
        assert_eq!(events(&upper_frames(&upper)), vec![(BINARY, vec![])]);
    }
}

#[test]
fn rsv1_where_it_has_no_meaning_is_a_protocol_error() {
    let protocol = |chunks: &[&[u8]]| match follow(LIMIT, chunks) {
        Err(Refused::Protocol(why)) => why,
        other => panic!("expected a protocol error, got {other:?}"),
    };
    assert_eq!(
        protocol(&[&frame(true, 4, PING, KEY, b"")]),
        "RSV1 on a control frame"
    );
    assert_eq!(
        protocol(&[&frame(true, 4, CLOSE, KEY, &[0x03, 0xe8])]),
        "RSV1 on a control frame"
    );
    let first = frame(false, 4, TEXT, KEY, &deflated(b"abc")[..2]);
    let rest = frame(true, 4, CONTINUATION, KEY, &deflated(b"abc")[2..]);
    assert_eq!(protocol(&[&first, &rest]), "RSV1 on a continuation frame");
    assert_eq!(
        protocol(&[&frame(true, 4, CONTINUATION, KEY, b"x")]),
        "RSV1 on a continuation frame"
    );
    assert_eq!(
        protocol(&[&frame(true, 4, 0x3, KEY, b"x")]),
        "RSV1 on a reserved opcode"
    );
    assert_eq!(
        protocol(&[&frame(true, 6, TEXT, KEY, &deflated(b"x"))]),
        "RSV2 or RSV3 set"
    );
    assert_eq!(
        protocol(&[&frame(true, 4, TEXT, None, &deflated(b"x"))]),
        "an unmasked frame from the client"
    );
    // A compressed message begun inside a plain fragmented one, and the
    // other way round.
    let plain = frame(false, 0, TEXT, KEY, b"[1");
    assert_eq!(
        protocol(&[&plain, &frame(true, 4, TEXT, KEY, &deflated(b"x"))]),
        "a new message inside a fragmented one"
    );
    let compressed = frame(false, 4, TEXT, KEY, &deflated(b"x"));
    assert_eq!(
        protocol(&[&compressed, &frame(true, 0, TEXT, KEY, b"x")]),
        "a new message inside a fragmented one"
    );
    // Through tungstenite: the read fails with the refusal.
    assert_eq!(
        refusal(&[&frame(true, 4, PING, KEY, b"")]),
        Some(Refused::Protocol("RSV1 on a control frame"))
    );
}

#[test]
fn a_deflate_bomb_stops_at_the_limit() {
    // 16 MiB of spaces inside a JSON string, about 16 KiB on the wire.
    let mut bomb = b"{\"id\":1,\"op\":\"ping\",\"x\":\"".to_vec();
    bomb.resize(16 << 20, b' ');
    let body = deflated(&bomb);
    assert!(body.len() < LIMIT);
    assert_eq!(
        follow(LIMIT, &[&frame(true, 4, TEXT, KEY, &body)]),
        Err(Refused::TooBig)
    );
    assert_eq!(
        refusal(&[&frame(true, 4, TEXT, KEY, &body)]),
        Some(Refused::TooBig)
    );
    // Exactly at the limit is fine.
    let full = vec![b'a'; LIMIT];
    let upper = follow(LIMIT, &[&frame(true, 4, BINARY, KEY, &deflated(&full))]).unwrap();
    assert_eq!(events(&upper_frames(&upper)), vec![(BINARY, full)]);
}

#[test]
fn a_compressed_message_over_the_limit_on_the_wire_is_refused_at_its_header() {
    // Only the header is sent: the refusal does not wait for the payload.
    let mut head = vec![0x80 | 0x40 | BINARY, 0x80 | 127];
    head.extend_from_slice(&(LIMIT as u64 + 1).to_be_bytes());
    head.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(follow(LIMIT, &[&head]), Err(Refused::TooBig));
    // Across fragments.
    let first = frame(false, 4, BINARY, KEY, &vec![0; LIMIT / 2]);
    let second = frame(false, 0, CONTINUATION, KEY, &vec![0; LIMIT / 2]);
    let third = frame(true, 0, CONTINUATION, KEY, &[0]);
    assert_eq!(
        follow(LIMIT, &[&first, &second, &third]),
        Err(Refused::TooBig)
    );
}

#[test]
fn data_that_does_not_inflate_is_invalid() {
    assert_eq!(
        follow(LIMIT, &[&frame(true, 4, TEXT, KEY, &[0xff, 0xff, 0xff])]),
        Err(Refused::Invalid)
    );
    assert_eq!(
        refusal(&[&frame(true, 4, TEXT, KEY, &[0xff, 0xff, 0xff])]),
        Some(Refused::Invalid)
    );
    assert_eq!(
        Refused::Invalid.end(),
        End::Close(1007, Refused::Invalid.to_string())
    );
    assert!(matches!(Refused::TooBig.end(), End::Close(1009, _)));
    assert!(matches!(Refused::Protocol("x").end(), End::Close(1002, _)));
}

#[test]
fn without_the_extension_reads_pass_straight_through() {
    // A plain connection's tungstenite sees RSV1 and refuses it itself.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let read = runtime.block_on(async {
        let io = Inflating::plain(Chunks {
            chunks: vec![frame(true, 4, TEXT, KEY, &deflated(b"abc"))].into(),
            pending: false,
        });
        let mut socket = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        socket.next().await
    });
    assert!(matches!(
        read,
        Some(Err(tokio_tungstenite::tungstenite::Error::Protocol(
            tokio_tungstenite::tungstenite::error::ProtocolError::NonZeroReservedBits
        )))
    ));
}

#[test]
fn an_idle_connection_holds_no_buffer() {
    let text = vec![b'x'; 5000];
    let mut frames = ClientFrames::new(LIMIT);
    let wire = frame(true, 4, TEXT, KEY, &deflated(&text));
    assert_eq!(frames.decode(&wire), Ok(0));
    assert!(frames.gathered.is_none());
    let mut storage = vec![0u8; 100_000];
    let mut buf = ReadBuf::new(&mut storage);
    while frames.hand_up(&mut buf) {}
    assert_eq!(frames.out.capacity(), 0);
    assert_eq!(upper_frames(buf.filled())[0].payload, text);
    // A header cut short is held inline.
    assert_eq!(frames.decode(&wire[..3]), Ok(0));
    assert_eq!(frames.out.capacity(), 0);
}
