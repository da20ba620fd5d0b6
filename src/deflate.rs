//! Raw DEFLATE for one WebSocket message at a time: permessage-deflate
//! (RFC 7692) without context takeover, so every message is compressed and
//! inflated on its own: each thread's compressor and inflater are reset for
//! every message, and no window carries over.
//!
//! A message is compressed as RFC 7692 §7.2.1 says: a raw DEFLATE stream
//! (no zlib header) ended with a sync flush, whose closing empty block
//! `00 00 ff ff` is left off. It is inflated by appending those four bytes
//! back (§7.2.2), into at most a given number of bytes: a small message that
//! inflates into a huge one stops at the limit.

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// What ends every sync-flushed message, left off on the wire.
pub const TRAILER: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// A thread's compressor, and the buffer it compresses into.
struct Compressor {
    deflate: Compress,
    out: Vec<u8>,
}

/// Scratch a thread keeps between messages; a larger buffer (grown for a
/// larger message) is let go.
const KEPT_SCRATCH: usize = 64 << 10;

thread_local! {
    /// Each thread's compressor, reset for every message. Making one
    /// allocates and zeroes about 300 KiB (miniz's window, hash chains and
    /// buffers): on fresh pages that cost a server about 150 µs per message
    /// (docs/perf-log/2026-12-07-websocket-compression.md).
    static COMPRESSOR: RefCell<Compressor> = RefCell::new(Compressor {
        deflate: Compress::new(Compression::default(), false),
        out: Vec::new(),
    });
    /// Each thread's inflater (about 40 KiB), reset for every message, for
    /// the same reason.
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// `message` compressed, when that is smaller than the message itself;
/// `None` when compressing does not pay (short or random bytes). The bytes
/// returned hold no more than the compressed length.
pub fn compress(message: &[u8]) -> Option<Bytes> {
    COMPRESSOR.with_borrow_mut(|Compressor { deflate, out }| {
        // Every message on its own: no context taken over from the last.
        deflate.reset();
        out.clear();
        out.reserve(message.len() + TRAILER.len());
        let compressed = compress_into(deflate, message, out).map(Bytes::copy_from_slice);
        if out.capacity() > KEPT_SCRATCH {
            *out = Vec::new();
        }
        compressed
    })
}

/// Compresses `message` into `out`, whose room is the message's length
/// and the trailer's; the compressed bytes, without the trailer.
fn compress_into<'a>(
    compressor: &mut Compress,
    message: &[u8],
    out: &'a mut Vec<u8>,
) -> Option<&'a [u8]> {
    let room = out.len() + message.len() + TRAILER.len();
    loop {
        let consumed = compressor.total_in() as usize;
        let written = out.len();
        compressor
            .compress_vec(&message[consumed..], out, FlushCompress::Sync)
            .ok()?;
        let taken = compressor.total_in() as usize;
        if taken == message.len() && out.ends_with(&TRAILER) {
            break;
        }
        // The output has room for the whole message and the trailer: once
        // it is full (or stuck), the result would be no smaller.
        if out.len() >= room || (taken == consumed && out.len() == written) {
            return None;
        }
    }
    let compressed = &out[..out.len() - TRAILER.len()];
    (compressed.len() < message.len()).then_some(compressed)
}

/// Why a message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit.
    TooBig,
    /// It is not DEFLATE data.
    Invalid,
}

/// Inflates one message, `compressed` being what was on the wire with the
/// [`TRAILER`] appended; at most `limit` bytes come out.
pub fn inflate(compressed: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with_borrow_mut(|inflater| {
        inflater.reset(false);
        inflate_with(inflater, compressed, limit)
    })
}

fn inflate_with(
    inflater: &mut Decompress,
    compressed: &[u8],
    limit: usize,
) -> Result<Vec<u8>, InflateError> {
    // A guess that fits most messages at once; never past the limit (and
    // one byte, to tell "exactly the limit" from "over it").
    let first = compressed.len().saturating_mul(4).max(256);
    let mut out = Vec::with_capacity(first.min(limit.saturating_add(1)));
    loop {
        let consumed = inflater.total_in() as usize;
        let written = out.len();
        let status = inflater
            .decompress_vec(&compressed[consumed..], &mut out, FlushDecompress::Sync)
            .map_err(|_| InflateError::Invalid)?;
        if out.len() > limit {
            return Err(InflateError::TooBig);
        }
        let input_left = inflater.total_in() as usize != compressed.len();
        let room_left = out.len() < out.capacity();
        match status {
            Status::StreamEnd => return Ok(out),
            // All input taken and the output not full: all of it is out.
            _ if !input_left && room_left => return Ok(out),
            _ if room_left && out.len() == written && inflater.total_in() as usize == consumed => {
                // No progress with room to spare: the data stops mid-block.
                return Err(InflateError::Invalid);
            }
            _ => {}
        }
        if !room_left {
            let grow = out.len().max(256).min(limit + 1 - out.len());
            out.reserve_exact(grow);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(message: &[u8]) -> Vec<u8> {
        let compressed = compress(message).expect("smaller");
        let mut wire = compressed.to_vec();
        wire.extend_from_slice(&TRAILER);
        inflate(&wire, message.len()).unwrap()
    }

    #[test]
    fn repetitive_json_compresses_and_inflates_back() {
        let message = br#"{"channel":"prices","epoch":"e1","offset":1,"data":{"a":1,"a":1,"a":1,"a":1,"a":1}}"#;
        let compressed = compress(message).unwrap();
        assert!(compressed.len() < message.len());
        assert!(!compressed.ends_with(&TRAILER));
        assert_eq!(round_trip(message), message);
    }

    #[test]
    fn each_message_is_compressed_on_its_own() {
        // The same message twice: the second compresses exactly as the
        // first, so no context was taken over (it would be shorter).
        let message = br#"{"channel":"a","data":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}"#;
        let first = compress(message).unwrap();
        let second = compress(message).unwrap();
        assert_eq!(first, second);
        let mut wire = second.to_vec();
        wire.extend_from_slice(&TRAILER);
        assert_eq!(inflate(&wire, 1000).unwrap(), message);
    }

    #[test]
    fn what_does_not_shrink_is_not_compressed() {
        assert_eq!(compress(b""), None);
        assert_eq!(compress(b"{}"), None);
        // xorshift: bytes with nothing to repeat.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..2000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        assert_eq!(compress(&noise), None);
    }

    #[test]
    fn the_limit_holds_exactly() {
        let message = vec![b'a'; 10_000];
        let mut wire = compress(&message).unwrap().to_vec();
        wire.extend_from_slice(&TRAILER);
        assert_eq!(inflate(&wire, 10_000).unwrap(), message);
        assert_eq!(inflate(&wire, 9_999), Err(InflateError::TooBig));
        assert_eq!(inflate(&wire, 0), Err(InflateError::TooBig));
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        // 64 MiB of zeros in about 64 KiB.
        let bomb = vec![0u8; 64 << 20];
        let mut wire = compress(&bomb).unwrap().to_vec();
        assert!(wire.len() < 128 << 10);
        wire.extend_from_slice(&TRAILER);
        assert_eq!(inflate(&wire, 64 << 10), Err(InflateError::TooBig));
    }

    #[test]
    fn data_that_is_not_deflate_is_refused() {
        // Block type 3 is reserved.
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff], 1000),
            Err(InflateError::Invalid)
        );
        // A stored block whose length and its complement disagree.
        let mut stored = vec![0x00, 0x05, 0x00, 0x00, 0x00];
        stored.extend_from_slice(&TRAILER);
        assert_eq!(inflate(&stored, 1000), Err(InflateError::Invalid));
    }

    #[test]
    fn a_final_block_before_the_trailer_is_accepted() {
        // RFC 7692 §7.2.3.3: a message may end with a final block; the
        // appended trailer then follows the end of the stream.
        let mut compressor = Compress::new(Compression::default(), false);
        let mut wire = Vec::with_capacity(100);
        compressor
            .compress_vec(b"hello hello hello", &mut wire, FlushCompress::Finish)
            .unwrap();
        wire.extend_from_slice(&TRAILER);
        assert_eq!(inflate(&wire, 100).unwrap(), b"hello hello hello");
    }

    proptest! {
        #[test]
        fn prop_compressed_messages_inflate_back(
            message in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'{'), any::<u8>()], 0..5000),
        ) {
            if let Some(compressed) = compress(&message) {
                prop_assert!(compressed.len() < message.len());
                let mut wire = compressed.to_vec();
                wire.extend_from_slice(&TRAILER);
                prop_assert_eq!(inflate(&wire, message.len()).unwrap(), message);
            }
        }

        #[test]
        fn prop_any_bytes_inflate_or_are_refused_within_the_limit(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            limit in 0usize..5000,
        ) {
            let mut wire = bytes;
            wire.extend_from_slice(&TRAILER);
            if let Ok(out) = inflate(&wire, limit) {
                prop_assert!(out.len() <= limit);
            }
        }
    }
}
