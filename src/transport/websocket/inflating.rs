//! The client's compressed messages inflated under tungstenite, for a
//! connection that negotiated permessage-deflate (RFC 7692).
//!
//! tungstenite knows no extension and fails any frame with RSV1 set, so the
//! bytes it reads come through [`Inflating`], which follows the client's
//! frames as they arrive and keeps this invariant:
//!
//! **What tungstenite reads is exactly the uncompressed frame stream.**
//! Every frame outside a compressed message — control frames, uncompressed
//! messages and their fragments, and anything tungstenite refuses by
//! itself — reaches it byte for byte, in order. A compressed message (RSV1
//! on its first frame) is gathered across its fragments and reaches it, in
//! the place of its last fragment, as one final frame of the same type with
//! RSV1 clear, holding the inflated payload under an all-zero mask (a
//! client's frames are masked, and a zero mask leaves the bytes as they
//! are). Control frames between its fragments reach it at once, before it,
//! as they may (RFC 6455 §5.4).
//!
//! What tungstenite cannot judge is refused here, failing the read with a
//! [`Refused`]: RSV1 on a control or continuation frame, a compressed frame
//! unmasked or with RSV2/RSV3, a message begun inside a fragmented one
//! (1002); a compressed message over `max_message_size` on the wire or once
//! inflated, stopped at the limit so a deflate bomb costs no more than an
//! honest message (1009); data that does not inflate (1007). After a
//! refusal the layer steps aside: the closing only drains what follows.
//!
//! What it costs: a connection that did not negotiate holds an empty
//! `Option` and reads the socket directly. One that did holds a small
//! state; a message being gathered and a frame waiting to be read are
//! freed as soon as they are handed up, so an idle connection holds no
//! buffer.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::close;
use super::End;
use crate::deflate::{self, InflateError, TRAILER};

/// A connection's byte stream, with the client's compressed messages
/// inflated on the way to tungstenite; writes pass through untouched.
pub(in crate::transport) struct Inflating<S> {
    io: S,
    /// `None` when the connection did not negotiate permessage-deflate (or
    /// a refusal ended it): reads are the socket's own.
    frames: Option<Box<ClientFrames>>,
}

impl<S> Inflating<S> {
    /// `io` as it is, for a connection without the extension.
    pub fn plain(io: S) -> Inflating<S> {
        Inflating { io, frames: None }
    }

    /// `io` for a connection that negotiated permessage-deflate: each
    /// compressed message inflates to at most `max_message_size` bytes.
    pub fn deflate(io: S, max_message_size: usize) -> Inflating<S> {
        Inflating {
            io,
            frames: Some(Box::new(ClientFrames::new(max_message_size))),
        }
    }
}

/// Why the client's frames were refused: a read fails with this inside
/// its `io::Error`, and [`Refused::end`] says how the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(in crate::transport) enum Refused {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("compressed message over realtime.websocket.max_message_size")]
    TooBig,
    #[error("compressed message does not inflate")]
    Invalid,
}

impl Refused {
    /// The refusal inside a failed read, if it is one.
    pub fn of(err: &io::Error) -> Option<Refused> {
        err.get_ref()?.downcast_ref::<Refused>().copied()
    }

    pub fn end(self) -> End {
        let code = match self {
            Refused::Protocol(_) => close::PROTOCOL_ERROR,
            Refused::TooBig => close::TOO_BIG,
            Refused::Invalid => close::INVALID_DATA,
        };
        End::Close(code, self.to_string())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Inflating<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(frames) = this.frames.as_deref_mut() else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if frames.hand_up(buf) {
                return Poll::Ready(Ok(()));
            }
            // Read straight into tungstenite's buffer: what passes through
            // stays there, in place.
            let start = buf.filled().len();
            ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            if buf.filled().len() == start {
                return Poll::Ready(Ok(()));
            }
            match frames.decode(&buf.filled()[start..]) {
                Ok(kept) => {
                    buf.set_filled(start + kept);
                    if kept > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(refused) => {
                    buf.set_filled(start);
                    this.frames = None;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, refused)));
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Inflating<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The longest frame header: 2 bytes, a 64-bit length, a mask key.
const MAX_HEAD: usize = 14;

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;

/// The client's frame stream, followed byte by byte (no I/O: the layer
/// hands it what it read).
struct ClientFrames {
    /// `max_message_size`.
    limit: usize,
    at: At,
    /// A header read so far, when a read ended inside one.
    head: [u8; MAX_HEAD],
    head_len: u8,
    /// Inside an uncompressed message sent in fragments (tungstenite's to
    /// gather).
    plain_fragments: bool,
    /// A compressed message being gathered: its opcode and what came so
    /// far, unmasked.
    gathered: Option<(u8, Vec<u8>)>,
    /// Bytes for tungstenite that could not stay in place in its buffer
    /// (an inflated frame, and what follows it in the same read), and how
    /// many of them it has read.
    out: Vec<u8>,
    out_read: usize,
}

/// Where the stream stands.
#[derive(Debug, Clone, Copy)]
enum At {
    Head,
    /// Inside a frame that passes through: this many payload bytes left.
    Passing(u64),
    /// Inside a frame of a compressed message.
    Gathering {
        left: u64,
        mask: [u8; 4],
        /// Payload bytes unmasked so far, modulo 4.
        phase: usize,
        fin: bool,
    },
}

/// A frame header, parsed.
struct Head {
    fin: bool,
    rsv1: bool,
    /// RSV2 or RSV3.
    rsv_other: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    /// Its own length in bytes.
    size: usize,
}

impl Head {
    /// The header at the front of `bytes`, or how many bytes it needs when
    /// they are not all there.
    fn parse(bytes: &[u8]) -> Result<Head, usize> {
        let [first, second, ..] = *bytes else {
            return Err(2);
        };
        let (len_bytes, mask_bytes) = (
            match second & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            },
            if second & 0x80 != 0 { 4 } else { 0 },
        );
        let size = 2 + len_bytes + mask_bytes;
        if bytes.len() < size {
            return Err(size);
        }
        let len = match len_bytes {
            0 => u64::from(second & 0x7f),
            n => bytes[2..2 + n]
                .iter()
                .fold(0u64, |len, &b| (len << 8) | u64::from(b)),
        };
        let mask = (mask_bytes == 4).then(|| {
            let at = 2 + len_bytes;
            [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]
        });
        Ok(Head {
            fin: first & 0x80 != 0,
            rsv1: first & 0x40 != 0,
            rsv_other: first & 0x30 != 0,
            opcode: first & 0x0f,
            mask,
            len,
            size,
        })
    }
}

/// What becomes of a frame.
enum Route {
    Pass,
    Gather,
}

impl ClientFrames {
    fn new(limit: usize) -> ClientFrames {
        ClientFrames {
            limit,
            at: At::Head,
            head: [0; MAX_HEAD],
            head_len: 0,
            plain_fragments: false,
            gathered: None,
            out: Vec::new(),
            out_read: 0,
        }
    }

    /// Copies what waits in `out` into `buf`; whether there was any.
    fn hand_up(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let waiting = &self.out[self.out_read..];
        if waiting.is_empty() {
            return false;
        }
        let n = waiting.len().min(buf.remaining());
        buf.put_slice(&waiting[..n]);
        self.out_read += n;
        if self.out_read == self.out.len() {
            self.out = Vec::new();
            self.out_read = 0;
        }
        true
    }

    /// Follows the frames through `input`, the bytes just read. The first
    /// `kept` bytes (the return value) pass through where they are; what
    /// tungstenite reads after them is appended to `out`.
    fn decode(&mut self, input: &[u8]) -> Result<usize, Refused> {
        // Invariant: while `in_place`, every byte taken so far is kept
        // (`kept == i`), so the next byte to pass through may stay too.
        let mut in_place = self.out.len() == self.out_read;
        let mut kept = 0;
        let mut i = 0;
        loop {
            match self.at {
                At::Passing(0) => self.at = At::Head,
                At::Gathering { left: 0, fin, .. } => {
                    self.at = At::Head;
                    if fin {
                        in_place = false;
                        self.inflate_message()?;
                    }
                }
                _ if i == input.len() => return Ok(kept),
                At::Head => {
                    let started_here = self.head_len == 0;
                    let head = loop {
                        match Head::parse(&self.head[..usize::from(self.head_len)]) {
                            Ok(head) => break head,
                            Err(_) if i == input.len() => return Ok(kept),
                            Err(_) => {
                                self.head[usize::from(self.head_len)] = input[i];
                                self.head_len += 1;
                                i += 1;
                            }
                        }
                    };
                    self.head_len = 0;
                    match self.route(&head)? {
                        Route::Pass => {
                            if in_place && started_here {
                                kept = i;
                            } else {
                                in_place = false;
                                self.out.extend_from_slice(&self.head[..head.size]);
                            }
                            self.at = At::Passing(head.len);
                        }
                        Route::Gather => {
                            in_place = false;
                            self.at = At::Gathering {
                                left: head.len,
                                mask: head.mask.unwrap_or_default(),
                                phase: 0,
                                fin: head.fin,
                            };
                        }
                    }
                }
                At::Passing(left) => {
                    let n = take(left, input.len() - i);
                    if in_place {
                        kept = i + n;
                    } else {
                        self.out.extend_from_slice(&input[i..i + n]);
                    }
                    i += n;
                    self.at = At::Passing(left - n as u64);
                }
                At::Gathering {
                    left,
                    mask,
                    phase,
                    fin,
                } => {
                    in_place = false;
                    let n = take(left, input.len() - i);
                    let (_, gathered) = self.gathered.as_mut().expect("gathering a message");
                    gathered.extend(
                        input[i..i + n]
                            .iter()
                            .enumerate()
                            .map(|(k, byte)| byte ^ mask[(phase + k) % 4]),
                    );
                    i += n;
                    self.at = At::Gathering {
                        left: left - n as u64,
                        mask,
                        phase: (phase + n) % 4,
                        fin,
                    };
                }
            }
        }
    }

    /// Whether a frame passes through or belongs to a compressed message;
    /// refuses what breaks RFC 7692 (or RFC 6455 in a compressed message).
    fn route(&mut self, head: &Head) -> Result<Route, Refused> {
        let compressed = self.gathered.is_some();
        match (head.rsv1, head.opcode) {
            (true, CONTINUATION) => Err(Refused::Protocol("RSV1 on a continuation frame")),
            (true, TEXT | BINARY) if compressed || self.plain_fragments => {
                Err(Refused::Protocol("a new message inside a fragmented one"))
            }
            (true, TEXT | BINARY) => {
                self.check_gathered(head)?;
                self.gathered = Some((head.opcode, Vec::new()));
                Ok(Route::Gather)
            }
            (true, 0x8..=0xf) => Err(Refused::Protocol("RSV1 on a control frame")),
            (true, _) => Err(Refused::Protocol("RSV1 on a reserved opcode")),
            (false, CONTINUATION) if compressed => {
                self.check_gathered(head)?;
                Ok(Route::Gather)
            }
            (false, TEXT | BINARY) if compressed => {
                Err(Refused::Protocol("a new message inside a fragmented one"))
            }
            (false, opcode) => {
                match opcode {
                    TEXT | BINARY => self.plain_fragments = !head.fin,
                    CONTINUATION if head.fin => self.plain_fragments = false,
                    _ => {}
                }
                Ok(Route::Pass)
            }
        }
    }

    /// A frame of a compressed message: masked, no other reserved bit, and
    /// the message still within the limit on the wire.
    fn check_gathered(&self, head: &Head) -> Result<(), Refused> {
        if head.rsv_other {
            return Err(Refused::Protocol("RSV2 or RSV3 set"));
        }
        if head.mask.is_none() {
            return Err(Refused::Protocol("an unmasked frame from the client"));
        }
        let so_far = self.gathered.as_ref().map_or(0, |(_, bytes)| bytes.len());
        if head.len > (self.limit - so_far) as u64 {
            return Err(Refused::TooBig);
        }
        Ok(())
    }

    /// The gathered message's last frame came: its inflated frame goes to
    /// `out`, and nothing of it is kept.
    fn inflate_message(&mut self) -> Result<(), Refused> {
        let (opcode, mut compressed) = self.gathered.take().expect("gathering a message");
        compressed.extend_from_slice(&TRAILER);
        let payload = deflate::inflate(&compressed, self.limit).map_err(|err| match err {
            InflateError::TooBig => Refused::TooBig,
            InflateError::Invalid => Refused::Invalid,
        })?;
        drop(compressed);
        write_frame_head(&mut self.out, opcode, payload.len());
        self.out.extend_from_slice(&payload);
        Ok(())
    }
}

/// How many of `left` frame bytes the `available` input holds.
fn take(left: u64, available: usize) -> usize {
    usize::try_from(left).map_or(available, |left| left.min(available))
}

/// A final frame's header as a client sends it, masked with the all-zero
/// key (so the payload follows as it is).
fn write_frame_head(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(0x80 | opcode);
    match len {
        0..=125 => out.push(0x80 | len as u8),
        126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0; 4]);
}

#[cfg(test)]
mod tests;
