//! Raw-socket clients for the adversarial tests: HTTP/1.1 answers read off
//! a socket byte by byte as framed, and an HTTP/2 client that writes any
//! frame, however malformed, so a test decides what reaches pushgate.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::PATIENCE;

/// One answer read off an HTTP/1.1 connection.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub fields: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 connection that reads answers as framed.
pub struct Http1 {
    reader: OwnedReadHalf,
    /// `None` once taken to write from elsewhere.
    writer: Option<OwnedWriteHalf>,
    buf: Vec<u8>,
    closed: bool,
}

impl Http1 {
    pub async fn connect(addr: SocketAddr) -> Http1 {
        let (reader, writer) = TcpStream::connect(addr).await.unwrap().into_split();
        Http1 {
            reader,
            writer: Some(writer),
            buf: Vec::new(),
            closed: false,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        // The server may have answered and closed before the whole of a
        // refused request was written: that is an answer, not a failure.
        let writer = self.writer.as_mut().expect("the writer is here");
        let _ = writer.write_all(bytes).await;
    }

    /// The writing half, to write while this reads.
    pub fn take_writer(&mut self) -> OwnedWriteHalf {
        self.writer.take().expect("the writer is here")
    }

    /// Reads more bytes; false when the server closed.
    async fn fill(&mut self, deadline: tokio::time::Instant) -> Result<bool, String> {
        if self.closed {
            return Ok(false);
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, self.reader.read(&mut chunk)).await {
            Err(_) => Err(format!(
                "no answer in time; read so far: {:?}",
                String::from_utf8_lossy(&self.buf)
            )),
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.closed = true;
                Ok(false)
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
        }
    }

    /// The next final answer (interim 1xx answers are skipped), or `None`
    /// when the server closed the connection first. `head`: the request was
    /// a HEAD, so the answer has no body whatever its fields say.
    pub async fn answer(&mut self, head: bool) -> Result<Option<Answer>, String> {
        self.answer_within(head, PATIENCE).await
    }

    pub async fn answer_within(
        &mut self,
        head: bool,
        patience: Duration,
    ) -> Result<Option<Answer>, String> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let (status, fields, len) = loop {
                let mut parsed = [httparse::EMPTY_HEADER; 64];
                let mut response = httparse::Response::new(&mut parsed);
                match response.parse(&self.buf) {
                    Ok(httparse::Status::Complete(len)) => {
                        let fields = response
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_ascii_lowercase(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect::<Vec<_>>();
                        break (response.code.unwrap(), fields, len);
                    }
                    Ok(httparse::Status::Partial) => {
                        if !self.fill(deadline).await? {
                            return if self.buf.is_empty() {
                                Ok(None)
                            } else {
                                Err(format!(
                                    "closed inside an answer head: {:?}",
                                    String::from_utf8_lossy(&self.buf)
                                ))
                            };
                        }
                    }
                    Err(err) => {
                        return Err(format!(
                            "not an HTTP answer ({err}): {:?}",
                            String::from_utf8_lossy(&self.buf)
                        ))
                    }
                }
            };
            self.buf.drain(..len);
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let field = |name: &str| {
                fields
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
            };
            let body = if head || status == 204 || status == 304 || status == 101 {
                Vec::new()
            } else if field("transfer-encoding").is_some() {
                self.chunked(deadline).await?
            } else if let Some(len) = field("content-length") {
                let len: usize = len.trim().parse().map_err(|_| "bad content-length")?;
                while self.buf.len() < len {
                    if !self.fill(deadline).await? {
                        return Err("closed inside an answer body".into());
                    }
                }
                self.buf.drain(..len).collect()
            } else {
                while self.fill(deadline).await? {}
                std::mem::take(&mut self.buf)
            };
            return Ok(Some(Answer {
                status,
                fields,
                body,
            }));
        }
    }

    async fn chunked(&mut self, deadline: tokio::time::Instant) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        loop {
            let end = loop {
                if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break end;
                }
                if !self.fill(deadline).await? {
                    return Err("closed inside a chunk size".into());
                }
            };
            let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                .map_err(|_| format!("bad chunk size {line:?}"))?;
            self.buf.drain(..end + 2);
            if size == 0 {
                loop {
                    let end = loop {
                        if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                            break end;
                        }
                        if !self.fill(deadline).await? {
                            return Err("closed inside trailers".into());
                        }
                    };
                    self.buf.drain(..end + 2);
                    if end == 0 {
                        return Ok(body);
                    }
                }
            }
            while self.buf.len() < size + 2 {
                if !self.fill(deadline).await? {
                    return Err("closed inside a chunk".into());
                }
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Whether the server closes the connection within `patience` (bytes
    /// that arrive meanwhile are kept for [`Http1::answer`]).
    pub async fn closes_within(&mut self, patience: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match self.fill(deadline).await {
                Ok(true) => continue,
                Ok(false) => return true,
                Err(_) => return false,
            }
        }
    }

    /// Bytes received and not yet read as an answer.
    pub fn unread(&self) -> &[u8] {
        &self.buf
    }
}

/// The body of a raw HTTP/1.1 answer read so far (`raw` holds its head
/// too), out of its chunks when the answer is chunked: an SSE stream
/// through hyper is (with `fast_paths.sse_detach` off); one pushgate writes
/// itself ends with the connection. A last chunk not wholly read yet is
/// left out.
pub fn body_so_far(raw: &str) -> String {
    let (head, body) = raw.split_once("\r\n\r\n").expect("a whole head");
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_owned();
    }
    let mut rest = body.as_bytes();
    let mut text = Vec::new();
    while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
        let line = std::str::from_utf8(&rest[..end]).unwrap();
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
            .unwrap_or_else(|_| panic!("a bad chunk size {line:?}"));
        if size == 0 || rest.len() < end + 2 + size + 2 {
            break;
        }
        text.extend_from_slice(&rest[end + 2..end + 2 + size]);
        rest = &rest[end + 2 + size + 2..];
    }
    String::from_utf8(text).unwrap()
}

/// HTTP/2 frame types used here.
pub mod frame {
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;
    pub const CONTINUATION: u8 = 9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;
}

/// How an HTTP/2 stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum H2Outcome {
    /// An answer: its status and body.
    Answered(u16, Vec<u8>),
    /// The stream was reset with this error code.
    Reset(u32),
    /// The whole connection was ended with this error code.
    GoAway(u32),
}

/// An HTTP/2 connection (prior knowledge, over plain TCP) that writes
/// whatever frames a test gives it.
pub struct Http2 {
    stream: TcpStream,
    buf: Vec<u8>,
    decoder: hpack::Decoder<'static>,
}

impl Http2 {
    pub async fn connect(addr: SocketAddr) -> Http2 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut h2 = Http2 {
            stream,
            buf: Vec::new(),
            decoder: hpack::Decoder::new(),
        };
        h2.frame(frame::SETTINGS, 0, 0, &[]).await;
        h2
    }

    pub async fn frame(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        bytes.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
        bytes.extend_from_slice(payload);
        let _ = self.stream.write_all(&bytes).await;
    }

    /// A header block for `fields`, written literally (never indexed, no
    /// Huffman), so any name or value goes on the wire as given.
    pub fn block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in fields {
            // Literal header field never indexed, new name (RFC 7541 §6.2.3).
            block.push(0x10);
            put_string(&mut block, name);
            put_string(&mut block, value);
        }
        block
    }

    /// Sends a request on `stream_id` as one HEADERS frame (ending the
    /// stream when `data` is empty and `end` is set), then each of `data` as a
    /// DATA frame, the last one ending the stream when `end` is set.
    pub async fn request(
        &mut self,
        stream_id: u32,
        fields: &[(&[u8], &[u8])],
        data: &[&[u8]],
        end: bool,
    ) {
        let mut flags = frame::END_HEADERS;
        if data.is_empty() && end {
            flags |= frame::END_STREAM;
        }
        self.frame(frame::HEADERS, flags, stream_id, &Self::block(fields))
            .await;
        for (i, chunk) in data.iter().enumerate() {
            let last = i + 1 == data.len();
            let flags = if last && end { frame::END_STREAM } else { 0 };
            self.frame(frame::DATA, flags, stream_id, chunk).await;
        }
    }

    async fn read_frame(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<Option<(u8, u8, u32, Vec<u8>)>, String> {
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let kind = self.buf[3];
                    let flags = self.buf[4];
                    let id = u32::from_be_bytes(self.buf[5..9].try_into().unwrap()) & 0x7fff_ffff;
                    let payload = self.buf[9..9 + len].to_vec();
                    self.buf.drain(..9 + len);
                    return Ok(Some((kind, flags, id, payload)));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err("no HTTP/2 frame in time".into()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until `stream_id` ends: answered, reset, or the
    /// connection ended.
    pub async fn outcome(&mut self, stream_id: u32) -> Result<H2Outcome, String> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut status = None;
        let mut body = Vec::new();
        let mut block = Vec::new();
        loop {
            let Some((kind, flags, id, payload)) = self.read_frame(deadline).await? else {
                return Ok(H2Outcome::GoAway(u32::MAX));
            };
            match kind {
                frame::SETTINGS if flags & frame::ACK == 0 => {
                    self.frame(frame::SETTINGS, frame::ACK, 0, &[]).await;
                }
                frame::PING if flags & frame::ACK == 0 => {
                    self.frame(frame::PING, frame::ACK, 0, &payload).await;
                }
                frame::GOAWAY => {
                    let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                    // A graceful GOAWAY (NO_ERROR) still lets this stream finish.
                    if code != 0 {
                        return Ok(H2Outcome::GoAway(code));
                    }
                }
                frame::RST_STREAM if id == stream_id => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    return Ok(H2Outcome::Reset(code));
                }
                frame::HEADERS | frame::CONTINUATION if id == stream_id => {
                    let mut fragment = &payload[..];
                    if kind == frame::HEADERS {
                        // Padded and priority flags.
                        if flags & 0x8 != 0 {
                            let pad = usize::from(fragment[0]);
                            fragment = &fragment[1..fragment.len() - pad];
                        }
                        if flags & 0x20 != 0 {
                            fragment = &fragment[5..];
                        }
                    }
                    block.extend_from_slice(fragment);
                    if flags & frame::END_HEADERS != 0 {
                        let fields = self
                            .decoder
                            .decode(&block)
                            .map_err(|err| format!("bad header block: {err:?}"))?;
                        block.clear();
                        if status.is_none() {
                            let code = fields
                                .iter()
                                .find(|(n, _)| n == b":status")
                                .map(|(_, v)| String::from_utf8_lossy(v).parse::<u16>().unwrap())
                                .ok_or("an answer without :status")?;
                            if code >= 200 {
                                status = Some(code);
                            }
                        }
                    }
                    if flags & frame::END_STREAM != 0 {
                        if let Some(status) = status {
                            return Ok(H2Outcome::Answered(status, body));
                        }
                    }
                }
                frame::DATA if id == stream_id => {
                    let mut data = &payload[..];
                    if flags & 0x8 != 0 {
                        let pad = usize::from(data[0]);
                        data = &data[1..data.len() - pad];
                    }
                    body.extend_from_slice(data);
                    if flags & frame::END_STREAM != 0 {
                        let status = status.ok_or("DATA before HEADERS")?;
                        return Ok(H2Outcome::Answered(status, body));
                    }
                }
                _ => {}
            }
        }
    }
}

fn put_string(block: &mut Vec<u8>, bytes: &[u8]) {
    // Length as a 7-bit-prefix integer (RFC 7541 §5.1), Huffman bit clear.
    let mut len = bytes.len();
    if len < 127 {
        block.push(len as u8);
    } else {
        block.push(127);
        len -= 127;
        while len >= 128 {
            block.push((len % 128 + 128) as u8);
            len /= 128;
        }
        block.push(len as u8);
    }
    block.extend_from_slice(bytes);
}
