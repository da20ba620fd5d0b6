//! How a WebSocket connection ends: its close codes, why it ended, the
//! closing handshake and the TCP close.

use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use super::inflating::Refused;
use super::Socket;
use crate::events::Reason;

/// Close codes (docs/protocol.md lists them all).
pub mod close {
    /// The session fell behind: reconnect and resume.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Too many commands or connections.
    pub const RATE_LIMITED: u16 = 4029;
    /// Shutting down: reconnect (with jitter) to another node or later.
    pub const GOING_AWAY: u16 = 1001;
    /// A message over `realtime.websocket.max_message_size`.
    pub const TOO_BIG: u16 = 1009;
    /// A frame that breaks RFC 6455 (reserved bits or opcodes, an unmasked
    /// frame, a fragmented or oversized control frame, a continuation out of
    /// place, a bad close payload).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message or close reason that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
}

/// How long the TCP close waits for the client to close its side, once the
/// closing handshake's frames are out: long enough for a client's answer to
/// cross the network, short enough that a client which never closes holds
/// nothing (the close is already under way; this only keeps its last bytes
/// from turning the close into a reset).
const LINGER: Duration = Duration::from_secs(1);

/// A Close frame with `code` and `reason`, the reason cut to the 123 bytes
/// a control frame leaves it, on a character boundary.
pub(super) fn close_frame(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason[..end].into(),
    }))
}

/// Why a connection ends.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::transport) enum End {
    /// The connection failed, was reset, or the peer stopped answering:
    /// nothing can reach it any more.
    Gone,
    /// The client sent a Close frame: answer it, then close.
    PeerClosed,
    /// Close with this code and reason.
    Close(u16, String),
}

impl End {
    /// Why the connection ended, as the app is told (`events`); a close the
    /// app ordered was recorded as such when the order was taken.
    pub(super) fn reason(&self) -> Reason {
        match self {
            End::Gone => Reason::ConnectionLost,
            End::PeerClosed => Reason::ClientClosed,
            End::Close(close::SLOW_CONSUMER, _) => Reason::SlowConsumer,
            End::Close(close::RATE_LIMITED, _) => Reason::RateLimited,
            End::Close(close::GOING_AWAY, _) => Reason::Shutdown,
            End::Close(close::TOO_BIG, _) => Reason::MessageTooBig,
            End::Close(close::PROTOCOL_ERROR | close::INVALID_DATA, _) => Reason::ProtocolError,
            End::Close(4001, _) => Reason::AuthExpired,
            End::Close(..) => Reason::AppDisconnect,
        }
    }

    pub(super) fn slow_consumer() -> End {
        End::Close(
            close::SLOW_CONSUMER,
            "slow consumer: reconnect and resume".into(),
        )
    }
}

/// How a failed read ends the connection. A frame that breaks the protocol
/// gets the close code RFC 6455 §7.4.1 names for it, in a Close frame:
/// tungstenite stops reading after the error, but its writing side is still
/// sound. A connection that failed or was reset has nobody left to tell.
pub(in crate::transport) fn read_failure(err: &tungstenite::Error) -> End {
    use tungstenite::Error;
    match err {
        Error::Capacity(_) => End::Close(
            close::TOO_BIG,
            "message over realtime.websocket.max_message_size".into(),
        ),
        Error::Utf8 => End::Close(close::INVALID_DATA, "text is not valid UTF-8".into()),
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        Error::Protocol(err) => End::Close(close::PROTOCOL_ERROR, format!("protocol error: {err}")),
        // The client's compressed frames, refused under tungstenite.
        Error::Io(err) => Refused::of(err).map_or(End::Gone, Refused::end),
        _ => End::Gone,
    }
}

/// The closing handshake and the TCP close (RFC 6455 §5.5.1, §7.1.1).
///
/// First the Close frame, handed to the socket within `within`: ours for
/// [`End::Close`] (it goes out right behind the bytes already written, never
/// behind publications still queued), or for [`End::PeerClosed`] the answer
/// tungstenite queued to the client's. A client that takes nothing for that
/// long reads nothing at all: the socket is dropped, and it sees the
/// connection fail.
///
/// Then our side of the TCP connection closes (a FIN, after TLS's
/// close_notify), and what the client still sends (its own Close frame) is
/// read and dropped until it closes its side, for at most [`LINGER`]:
/// closing a socket that holds unread bytes resets the connection, and a
/// reset can destroy our Close frame before the client reads it.
pub(in crate::transport) async fn finish(socket: &mut Socket, end: End, within: Duration) {
    let handshake = async {
        match end {
            End::Gone => Err(()),
            End::PeerClosed => socket.flush().await.map_err(drop),
            End::Close(code, reason) => socket.send(close_frame(code, &reason)).await.map_err(drop),
        }
    };
    if !matches!(tokio::time::timeout(within, handshake).await, Ok(Ok(()))) {
        return;
    }
    let io = socket.get_mut();
    let linger = async {
        io.shutdown().await?;
        let mut sink = [0u8; 256];
        while io.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(LINGER, linger).await;
}
