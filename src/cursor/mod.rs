//! Positions and the cursor codec.
//!
//! Invariant (write every change so that it still holds, and keep the
//! property tests at the bottom honest about it): **any input is either
//! rejected with a clear reason or accepted; no input ever panics.** Cursors
//! and positions come straight from clients (`Last-Event-ID`, `?since=`), so
//! this module is the first thing an attacker's bytes reach. Parsing therefore
//! splits only on ASCII separators (which always fall on `char` boundaries),
//! checks bytes instead of slicing at computed indices, uses checked
//! arithmetic for numbers, and refuses oversized input before any other work.
//!
//! - An [`Epoch`] names one life of a channel's stream; it changes whenever
//!   history was lost, so a position from an older life is recognisably stale.
//! - A [`Position`] is `<epoch>:<offset>`. Offset 0 means "before the first
//!   publication" and is valid in any epoch: a client that joined an empty
//!   channel is not reset just because the channel was freed and re-created.
//! - A [`Cursor`] holds the positions of every channel of one connection as
//!   one URL-safe string: the SSE `id:` of every event and the long-poll
//!   `cursor`. Channels appear in it only as a hash of their name
//!   ([`channel_hash`]); the server already knows which channels the
//!   connection asked for, and matches them to the entries of a
//!   [`DecodedCursor`] by hash ([`DecodedCursor::resolve`], which also tells
//!   apart channels whose hashes collide).
//!
//! The text formats are specified in `docs/protocol.md` ("Positions and
//! cursors") so that clients can build cursors themselves.
//!
//! A cursor is not authenticated: its checksum catches corruption and
//! truncation, not forgery. That is enough because a cursor never chooses
//! channels: only the connection's own channels, each authorized on its
//! own, are looked up in it, so a forged cursor can at most move the
//! connection's own positions (which history or a reset then answers).

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use rand::distr::Alphanumeric;
use rand::Rng;
use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde::{Serialize, Serializer};

use crate::names::ChannelName;

/// Longest epoch, in bytes.
pub const MAX_EPOCH_LEN: usize = 16;
/// Longest cursor accepted by [`Cursor::decode`], in bytes. Checked before
/// anything else, so a huge header costs nothing to refuse.
pub const MAX_CURSOR_BYTES: usize = 8 * 1024;

/// The cursor format this code writes and reads.
const CURSOR_VERSION: &str = "1";
/// Characters of a fresh random epoch.
const RANDOM_EPOCH_LEN: usize = 8;

const FNV_OFFSET_BASIS: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";
const BASE36_DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
/// `u64::MAX` in base 36 is 13 digits.
const MAX_BASE36_DIGITS: usize = 13;

/// Why a position, an epoch or a cursor was refused.
///
/// The messages are meant for the client that sent the input; none of them
/// echoes more than a short, escaped excerpt of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    // ---- positions and epochs (code "bad_position") ----
    #[error("bad position: it must be written <epoch>:<offset>, and there is no ':'")]
    MissingColon,
    #[error("bad epoch: {what}")]
    BadEpoch { what: &'static str },
    #[error("bad offset: {what}")]
    BadOffset { what: &'static str },

    // ---- cursors (code "bad_cursor") ----
    #[error("the cursor is empty")]
    Empty,
    #[error("the cursor is {len} bytes long; at most {MAX_CURSOR_BYTES} (8 KiB) are accepted")]
    TooLong { len: usize },
    #[error(
        "the cursor has version \"{version}\"; this pushgate reads version {CURSOR_VERSION} only"
    )]
    UnknownVersion { version: String },
    #[error("the cursor is malformed: {what}")]
    Malformed { what: &'static str },
    #[error("cursor entry {entry}: the channel hash {what}")]
    BadHash { entry: usize, what: &'static str },
    #[error("cursor entry {entry}: the epoch {what}")]
    BadCursorEpoch { entry: usize, what: &'static str },
    #[error("cursor entry {entry}: the offset {what}")]
    BadCursorOffset { entry: usize, what: &'static str },
    #[error("the cursor's checksum {what}")]
    BadChecksum { what: &'static str },
    #[error("the cursor's checksum does not match its content: it was altered or cut short")]
    ChecksumMismatch,
}

impl CursorError {
    /// The machine-readable code sent with a 400: `bad_position` for a
    /// position or an epoch on its own, `bad_cursor` for anything inside a
    /// cursor.
    pub fn code(&self) -> &'static str {
        match self {
            CursorError::MissingColon
            | CursorError::BadEpoch { .. }
            | CursorError::BadOffset { .. } => "bad_position",
            CursorError::Empty
            | CursorError::TooLong { .. }
            | CursorError::UnknownVersion { .. }
            | CursorError::Malformed { .. }
            | CursorError::BadHash { .. }
            | CursorError::BadCursorEpoch { .. }
            | CursorError::BadCursorOffset { .. }
            | CursorError::BadChecksum { .. }
            | CursorError::ChecksumMismatch => "bad_cursor",
        }
    }
}

// ---------------------------------------------------------------- Epoch

/// A stream's epoch: 1..=16 bytes of `[A-Za-z0-9_-]`; changes whenever
/// history was lost.
///
/// Stored inline (no heap) because one is copied into every envelope,
/// position and cursor entry. Bytes past `len` are always zero, so the
/// derived `Eq` and `Hash` compare only the text.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch {
    len: u8,
    bytes: [u8; MAX_EPOCH_LEN],
}

impl Epoch {
    /// Parses an epoch, refusing anything but 1..=16 bytes of `[A-Za-z0-9_-]`.
    pub fn parse(text: &str) -> Result<Epoch, CursorError> {
        check_epoch(text.as_bytes()).map_err(|what| CursorError::BadEpoch { what })?;
        Ok(Epoch::from_checked(text.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored, so this cannot fail; an empty string
        // rather than a panic keeps the no-panic invariant trivially true.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }

    /// A fresh random epoch: 8 characters of `[A-Za-z0-9]` (about 47 bits,
    /// so a re-created stream does not repeat an old epoch by chance).
    pub fn random() -> Epoch {
        let mut bytes = [0u8; MAX_EPOCH_LEN];
        let mut rng = rand::rng();
        for byte in &mut bytes[..RANDOM_EPOCH_LEN] {
            *byte = rng.sample(Alphanumeric);
        }
        Epoch {
            len: RANDOM_EPOCH_LEN as u8,
            bytes,
        }
    }

    /// `bytes` must have passed [`check_epoch`].
    fn from_checked(text: &[u8]) -> Epoch {
        let mut bytes = [0u8; MAX_EPOCH_LEN];
        bytes[..text.len()].copy_from_slice(text);
        Epoch {
            len: text.len() as u8,
            bytes,
        }
    }
}

/// The epoch rules, shared by [`Epoch::parse`] and [`Cursor::decode`]; the
/// message completes "the epoch …".
fn check_epoch(text: &[u8]) -> Result<(), &'static str> {
    if text.is_empty() {
        return Err("is empty");
    }
    if text.len() > MAX_EPOCH_LEN {
        return Err("is longer than 16 bytes");
    }
    if !text.iter().all(|&b| is_epoch_byte(b)) {
        return Err("may contain only A-Z, a-z, 0-9, '_' and '-'");
    }
    Ok(())
}

fn is_epoch_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Prints the bare text, like `Display`, so a `Position`'s derived `Debug`
/// reads `Position { epoch: AbCdEfGh, offset: 42 }`.
impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Epoch {
    type Err = CursorError;

    fn from_str(text: &str) -> Result<Epoch, CursorError> {
        Epoch::parse(text)
    }
}

impl Serialize for Epoch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Epoch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Epoch, D::Error> {
        struct EpochVisitor;

        impl Visitor<'_> for EpochVisitor {
            type Value = Epoch;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an epoch: 1 to 16 characters of A-Z, a-z, 0-9, '_' and '-'")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Epoch, E> {
                Epoch::parse(text).map_err(E::custom)
            }
        }

        // A visitor rather than `<&str>::deserialize`, so owned strings (from
        // a `serde_json::Value`, or an escaped JSON string) work too.
        deserializer.deserialize_str(EpochVisitor)
    }
}

// ---------------------------------------------------------------- Position

/// `<epoch>:<offset>`; offset 0 = before the first publication, valid in any
/// epoch. "Since P" means every publication after P in P's epoch.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Position {
    pub epoch: Epoch,
    pub offset: u64,
}

impl Position {
    pub const fn new(epoch: Epoch, offset: u64) -> Position {
        Position { epoch, offset }
    }

    /// Parses `<epoch>:<offset>`, the offset in plain decimal: no sign, no
    /// spaces, at most `u64::MAX`. Leading zeros are accepted (`e:007` is
    /// offset 7); positions may be typed by people.
    pub fn parse(text: &str) -> Result<Position, CursorError> {
        let (epoch, offset) = text.split_once(':').ok_or(CursorError::MissingColon)?;
        let epoch = Epoch::parse(epoch)?;
        let offset =
            parse_decimal(offset.as_bytes()).map_err(|what| CursorError::BadOffset { what })?;
        Ok(Position { epoch, offset })
    }
}

/// A decimal `u64` written with digits only. `u64::from_str` would accept a
/// leading `+`, which the position syntax does not.
fn parse_decimal(text: &[u8]) -> Result<u64, &'static str> {
    if text.is_empty() {
        return Err("is empty");
    }
    let mut value: u64 = 0;
    for &b in text {
        if !b.is_ascii_digit() {
            return Err("must be decimal digits only (no sign, no spaces)");
        }
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or("does not fit in 64 bits")?;
    }
    Ok(value)
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)
    }
}

impl FromStr for Position {
    type Err = CursorError;

    fn from_str(text: &str) -> Result<Position, CursorError> {
        Position::parse(text)
    }
}

// ---------------------------------------------------------------- hashing

/// FNV-1a 32-bit of the channel name's bytes (trivial to compute in
/// JavaScript with `Math.imul`).
pub fn channel_hash(channel: &str) -> u32 {
    fnv1a32(channel.as_bytes())
}

/// FNV-1a, 32 bits: offset basis 0x811c9dc5, prime 0x01000193. Also the
/// cursor's checksum. Any single changed byte changes the result (each step
/// is a bijection of the state), which is what the checksum needs.
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(FNV_PRIME)
    })
}

// ---------------------------------------------------------------- Cursor

/// The positions of all channels of one connection, as pushgate writes them
/// into one URL-safe string.
///
/// Text form (version 1): `1.<entry>.<entry>…<checksum>`, each entry
/// `<channel hash: 8 lowercase hex>.<epoch>.<offset: lowercase base36>`, the
/// checksum the FNV-1a 32 of everything before the last `.`, as 8 lowercase
/// hex. No channels: `1.<checksum>`.
///
/// A cursor names channels only by [`channel_hash`], so two channels of one
/// connection may share a hash. Each still has its own entry, and entries
/// of one hash stand in the byte order of their channels' names: that order
/// is how a reader tells them apart ([`DecodedCursor::resolve`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// In the order channels were added, except that entries of one hash
    /// stand in the byte order of their names. One entry per channel.
    entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// [`channel_hash`] of `channel`, kept: it is written with every event.
    hash: u32,
    channel: ChannelName,
    position: Position,
}

impl Cursor {
    pub fn new() -> Cursor {
        Cursor::default()
    }

    /// Sets (or adds) the position of `channel`. A channel already present
    /// keeps its place in the order.
    pub fn set(&mut self, channel: &ChannelName, position: Position) {
        self.set_hashed(channel, channel_hash(channel.as_str()), position);
    }

    /// [`Cursor::set`] with the hash given, so tests can force collisions.
    fn set_hashed(&mut self, channel: &ChannelName, hash: u32, position: Position) {
        if let Some(entry) = self
            .entries
            .iter_mut()
            .find(|e| e.hash == hash && e.channel == *channel)
        {
            entry.position = position;
            return;
        }
        // Before the first entry of this hash whose name sorts after it
        // (see `resolve`), else last.
        let at = self
            .entries
            .iter()
            .position(|e| e.hash == hash && e.channel.as_str() > channel.as_str())
            .unwrap_or(self.entries.len());
        // Room for one entry first (a Vec's first growth is to four): most
        // connections hear one channel.
        if self.entries.is_empty() {
            self.entries.reserve_exact(1);
        }
        self.entries.insert(
            at,
            Entry {
                hash,
                channel: channel.clone(),
                position,
            },
        );
    }

    /// The position held for `channel`.
    pub fn position_of(&self, channel: &str) -> Option<Position> {
        self.entries
            .iter()
            .find(|e| e.channel.as_str() == channel)
            .map(|e| e.position)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The one entry, `(channel_hash, position)`, of a cursor that holds
    /// exactly one channel.
    pub fn sole(&self) -> Option<(u32, &Position)> {
        match self.entries.as_slice() {
            [entry] => Some((entry.hash, &entry.position)),
            _ => None,
        }
    }

    /// Appends the encoded cursor to `out` without allocating beyond `out`'s
    /// growth. It is written for every SSE event of a connection, so it
    /// formats digits by hand and checksums the bytes it just wrote.
    pub fn encode_into(&self, out: &mut String) {
        encode_entries(
            self.entries.iter().map(|e| (e.hash, &e.position)),
            self.entries.len(),
            out,
        );
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        self.encode_into(&mut out);
        out
    }

    /// Decodes a cursor, refusing anything [`Cursor::encode`] would not have
    /// written: the format is canonical (lowercase only, no leading zeros in
    /// offsets), so `decode(s)?.encode() == s`.
    ///
    /// Structure is checked before the checksum, so a hand-built cursor with
    /// a wrong field gets a message about that field, not "checksum mismatch".
    pub fn decode(text: &str) -> Result<DecodedCursor, CursorError> {
        if text.len() > MAX_CURSOR_BYTES {
            return Err(CursorError::TooLong { len: text.len() });
        }
        if text.is_empty() {
            return Err(CursorError::Empty);
        }

        // `.` is ASCII, so every split below lands on a char boundary.
        let version = text.split('.').next().unwrap_or_default();
        if version != CURSOR_VERSION {
            return Err(CursorError::UnknownVersion {
                version: excerpt(version),
            });
        }
        let (body, checksum) = text.rsplit_once('.').ok_or(CursorError::Malformed {
            what: "it ends after the version; the checksum is missing",
        })?;
        let checksum =
            parse_hex8(checksum.as_bytes()).map_err(|what| CursorError::BadChecksum { what })?;

        let mut entries = Vec::new();
        if let Some(list) = body.strip_prefix("1.") {
            let mut fields = list.split('.');
            while let Some(hash) = fields.next() {
                let entry = entries.len() + 1;
                let (Some(epoch), Some(offset)) = (fields.next(), fields.next()) else {
                    return Err(CursorError::Malformed {
                        what: "the fields between the version and the checksum do not come in \
                               threes (<hash>.<epoch>.<offset>)",
                    });
                };
                let hash = parse_hex8(hash.as_bytes())
                    .map_err(|what| CursorError::BadHash { entry, what })?;
                check_epoch(epoch.as_bytes())
                    .map_err(|what| CursorError::BadCursorEpoch { entry, what })?;
                let epoch = Epoch::from_checked(epoch.as_bytes());
                let offset = parse_base36(offset.as_bytes())
                    .map_err(|what| CursorError::BadCursorOffset { entry, what })?;
                entries.push((hash, Position { epoch, offset }));
            }
        }

        if fnv1a32(body.as_bytes()) != checksum {
            return Err(CursorError::ChecksumMismatch);
        }
        Ok(DecodedCursor { entries })
    }
}

/// Writes `1`, the entries and the checksum.
fn encode_entries<'a>(
    entries: impl Iterator<Item = (u32, &'a Position)>,
    count: usize,
    out: &mut String,
) {
    // "1" + per entry ".hhhhhhhh.<epoch>.<offset>" + ".cccccccc"
    out.reserve(1 + count * (1 + 8 + 1 + MAX_EPOCH_LEN + 1 + MAX_BASE36_DIGITS) + 9);
    let start = out.len();
    out.push_str(CURSOR_VERSION);
    for (hash, position) in entries {
        out.push('.');
        push_hex8(out, hash);
        out.push('.');
        out.push_str(position.epoch.as_str());
        out.push('.');
        push_base36(out, position.offset);
    }
    let checksum = fnv1a32(&out.as_bytes()[start..]);
    out.push('.');
    push_hex8(out, checksum);
}

/// A cursor as a client sent it back: positions keyed by channel hash, in
/// the cursor's order. Only [`DecodedCursor::resolve`] turns it into
/// positions of named channels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecodedCursor {
    /// `(channel_hash, position)`; a hash may appear more than once.
    entries: Vec<(u32, Position)>,
}

/// Where one channel of a resuming connection starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The cursor does not hold the channel: it starts from now, as a
    /// channel the client has just added.
    Now,
    /// Resume after this position.
    After(Position),
    /// The cursor holds the channel's hash but cannot say which entry is
    /// this channel's: the client is told it lost its place (a reset) and
    /// goes on from now.
    Lost,
}

impl Start {
    /// The position to resume after, if any.
    pub fn after(self) -> Option<Position> {
        match self {
            Start::After(position) => Some(position),
            Start::Now | Start::Lost => None,
        }
    }
}

impl DecodedCursor {
    /// Where each of `channels` (a connection's channels, in any order)
    /// starts, index for index.
    ///
    /// Invariant: **every channel gets its own entry back when the cursor
    /// was written for the same set of channels, whatever their hashes;
    /// and a channel whose hash the cursor holds never silently starts from
    /// now.** Entries of one hash are matched to the channels of that hash
    /// in the byte order of their names, which is the order
    /// [`Cursor::set`] writes them in. When the numbers differ (the client
    /// changed a set of channels whose hashes collide) nothing can be told
    /// apart, and every channel of that hash is [`Start::Lost`]: reset,
    /// never resumed from another channel's position or from now without a
    /// word. A channel the cursor does not hold at all starts from now.
    ///
    /// A channel swapped for another of the same hash, the same count on
    /// both sides, takes over the other's position; its epoch (random per
    /// stream) then does not match, and the client gets a reset.
    pub fn resolve<S: Borrow<str>>(&self, channels: &[S]) -> Vec<Start> {
        self.resolve_by(channels, channel_hash)
    }

    /// [`DecodedCursor::resolve`] with the hash given, so tests can force
    /// collisions.
    fn resolve_by<S: Borrow<str>>(&self, channels: &[S], hash: impl Fn(&str) -> u32) -> Vec<Start> {
        let mut starts = vec![Start::Now; channels.len()];
        if self.entries.is_empty() {
            return starts;
        }
        // The channels by hash, then name; the entries by hash, keeping the
        // cursor's order within a hash.
        let mut named: Vec<(u32, &str, usize)> = channels
            .iter()
            .enumerate()
            .map(|(index, channel)| (hash(channel.borrow()), channel.borrow(), index))
            .collect();
        named.sort_unstable();
        let mut held: Vec<(u32, usize)> = self
            .entries
            .iter()
            .enumerate()
            .map(|(index, &(hash, _))| (hash, index))
            .collect();
        held.sort_unstable();

        let mut names: Vec<&str> = Vec::new();
        for group in named.chunk_by(|a, b| a.0 == b.0) {
            let hash = group[0].0;
            let from = held.partition_point(|&(h, _)| h < hash);
            let to = held.partition_point(|&(h, _)| h <= hash);
            let entries = &held[from..to];
            if entries.is_empty() {
                continue;
            }
            // Sorted by name already; a channel named twice counts once.
            names.clear();
            names.extend(group.iter().map(|&(_, name, _)| name));
            names.dedup();
            for &(_, name, index) in group {
                starts[index] = if names.len() == entries.len() {
                    let rank = names
                        .binary_search(&name)
                        .expect("the name is in its group");
                    Start::After(self.entries[entries[rank].1].1)
                } else {
                    Start::Lost
                };
            }
        }
        starts
    }

    /// Where `channel` starts when it is the connection's only channel.
    pub fn position_of(&self, channel: &str) -> Option<Position> {
        self.resolve(&[channel])[0].after()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cursor's text again: `Cursor::decode(s)?.encode() == s`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode_entries(
            self.entries
                .iter()
                .map(|(hash, position)| (*hash, position)),
            self.entries.len(),
            &mut out,
        );
        out
    }
}

fn push_hex8(out: &mut String, value: u32) {
    for shift in (0..8).rev() {
        out.push(char::from(
            HEX_DIGITS[((value >> (shift * 4)) & 0xf) as usize],
        ));
    }
}

fn push_base36(out: &mut String, mut value: u64) {
    let mut digits = [0u8; MAX_BASE36_DIGITS];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = BASE36_DIGITS[(value % 36) as usize];
        value /= 36;
        if value == 0 {
            break;
        }
    }
    for &digit in &digits[at..] {
        out.push(char::from(digit));
    }
}

/// Exactly 8 lowercase hex digits. The message completes "the … hash" or
/// "the checksum".
fn parse_hex8(text: &[u8]) -> Result<u32, &'static str> {
    if text.is_empty() {
        return Err("is missing (an empty field, or a '.' too many)");
    }
    if text.iter().any(|b| b.is_ascii_uppercase()) {
        return Err("must be lowercase hex; uppercase letters are not accepted");
    }
    if text.len() != 8 {
        return Err("must be exactly 8 hex digits");
    }
    let mut value: u32 = 0;
    for &b in text {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return Err("must be 8 hex digits (0-9, a-f)"),
        };
        value = (value << 4) | u32::from(digit);
    }
    Ok(value)
}

/// Lowercase base 36, canonical (no leading zeros), at most `u64::MAX`.
fn parse_base36(text: &[u8]) -> Result<u64, &'static str> {
    if text.is_empty() {
        return Err("is missing (an empty field, or a '.' too many)");
    }
    if text.len() > 1 && text[0] == b'0' {
        return Err("has a leading zero");
    }
    let mut value: u64 = 0;
    for &b in text {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'z' => b - b'a' + 10,
            b'A'..=b'Z' => {
                return Err("must be lowercase base 36; uppercase letters are not accepted")
            }
            _ => return Err("must be base 36 (0-9, a-z)"),
        };
        value = value
            .checked_mul(36)
            .and_then(|v| v.checked_add(u64::from(digit)))
            .ok_or("does not fit in 64 bits")?;
    }
    Ok(value)
}

/// At most 16 characters of client input, escaped, for an error message.
fn excerpt(text: &str) -> String {
    const MAX_CHARS: usize = 16;
    let mut out: String = text
        .chars()
        .take(MAX_CHARS)
        .flat_map(char::escape_default)
        .collect();
    if text.chars().nth(MAX_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests;
