//! A recording app: a raw HTTP/1.1 server that keeps every request it reads,
//! byte-exact, so a test can check what reached the app through pushgate.
//!
//! It parses strictly (RFC 9112: CRLF line ends, one framing per request)
//! and, like many app servers (Node's `http` among them), answers as soon as
//! it has a request's head, before it reads the body: a proxy that
//! announces a body it does not send, or sends one it did not announce, is
//! caught in the act, because the app then reads the next request on that
//! connection from the wrong byte. Bytes that do not parse as a request are
//! kept too, as [`Seen::Garbage`], and end the connection.
//!
//! Routes: `/upgrade/accept` answers a WebSocket upgrade with `101` and
//! then echoes bytes; `/upgrade/refuse` answers one with `400` and keeps the
//! connection; everything else answers `200` naming the request (its number,
//! target and `X-Victim`), framed by `Content-Length`.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the app read it.
#[derive(Debug, Clone)]
pub struct Request {
    /// Which of the app's connections it came on (0, 1, …).
    pub conn: u64,
    pub method: String,
    pub target: String,
    /// Fields in order, names lower-cased.
    pub fields: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The values of the fields called `name` (lower case).
    pub fn values(&self, name: &str) -> Vec<String> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The one value of `name`, when there is exactly one.
    pub fn value(&self, name: &str) -> Option<String> {
        match self.values(name).as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        }
    }
}

/// What the app saw on a connection.
#[derive(Debug, Clone)]
pub enum Seen {
    Request(Request),
    /// Bytes that are not a request (the connection was closed after them).
    Garbage {
        conn: u64,
        bytes: Vec<u8>,
        why: String,
    },
    /// The connection closed inside a request: an upload cut short, which
    /// is no desync.
    Aborted {
        conn: u64,
        why: String,
    },
}

/// The app, on `127.0.0.1:0`; stops when dropped.
pub struct RecordingApp {
    pub addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RecordingApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RecordingApp {
    pub async fn start() -> RecordingApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut next_conn = 0;
            while let Ok((stream, _)) = listener.accept().await {
                let conn = next_conn;
                next_conn += 1;
                tokio::spawn(serve(stream, conn, record.clone()));
            }
        });
        RecordingApp { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything seen so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The requests seen so far.
    pub fn requests(&self) -> Vec<Request> {
        self.seen()
            .into_iter()
            .filter_map(|seen| match seen {
                Seen::Request(request) => Some(request),
                Seen::Garbage { .. } | Seen::Aborted { .. } => None,
            })
            .collect()
    }

    /// Forgets what was seen (between cases of a battery).
    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

async fn serve(mut stream: TcpStream, conn: u64, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let head = match read_head(&mut stream, &mut buf).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(why) => {
                let bytes = std::mem::take(&mut buf);
                seen.lock().unwrap().push(garbage(conn, bytes, why));
                return;
            }
        };
        let (method, target, fields, framing) = head;
        let upgrade = fields
            .iter()
            .any(|(n, v)| n == "upgrade" && v.eq_ignore_ascii_case(b"websocket"));
        let number = seen.lock().unwrap().len();
        let victim = fields
            .iter()
            .find(|(n, _)| n == "x-victim")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();

        // The answer goes out before the body is read.
        if upgrade && target == "/upgrade/accept" {
            let _ = stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                .await;
            seen.lock().unwrap().push(Seen::Request(Request {
                conn,
                method,
                target,
                fields,
                body: Vec::new(),
            }));
            // Echo whatever follows, as the upgraded protocol.
            let mut chunk = [0u8; 4096];
            if !buf.is_empty() {
                let _ = stream.write_all(&buf).await;
            }
            while let Ok(n) = stream.read(&mut chunk).await {
                if n == 0 || stream.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
            }
            return;
        }
        let answer = if upgrade && target == "/upgrade/refuse" {
            let text = "not here\n";
            format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )
        } else {
            let text = format!("request={number} target={target} victim={victim}\n");
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )
        };
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        let body = match read_body(&mut stream, &mut buf, framing).await {
            Ok(body) => body,
            Err(why) => {
                let bytes = std::mem::take(&mut buf);
                seen.lock().unwrap().push(garbage(conn, bytes, why));
                return;
            }
        };
        seen.lock().unwrap().push(Seen::Request(Request {
            conn,
            method,
            target,
            fields,
            body,
        }));
    }
}

/// What a failed read means: a connection closed mid-request, or bytes
/// that are no request.
fn garbage(conn: u64, bytes: Vec<u8>, why: String) -> Seen {
    if why.starts_with("closed inside") {
        Seen::Aborted { conn, why }
    } else {
        Seen::Garbage { conn, bytes, why }
    }
}

/// How a request's body ends.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(usize),
    Chunked,
}

type Head = (String, String, Vec<(String, Vec<u8>)>, Framing);

/// Reads one request head off the front of `buf` (reading more as needed);
/// `None` when the peer closed between requests.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Head>, String> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = buf[..end].to_vec();
            buf.drain(..end + 4);
            return parse_head(&head).map(Some);
        }
        if buf.len() > 256 * 1024 {
            return Err("head over 256 KiB".into());
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) if buf.is_empty() => return Ok(None),
            Ok(0) | Err(_) => return Err("closed inside a head".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn parse_head(head: &[u8]) -> Result<Head, String> {
    let text = head;
    if text.contains(&b'\n')
        && text.windows(2).filter(|w| w == b"\r\n").count()
            != text.iter().filter(|&&b| b == b'\n').count()
    {
        return Err("a bare LF in the head".into());
    }
    let mut lines = text
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = lines.next().unwrap_or_default();
    let line = std::str::from_utf8(line).map_err(|_| "request line is not text".to_string())?;
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts.as_slice() else {
        return Err(format!("bad request line {line:?}"));
    };
    if *version != "HTTP/1.1" && *version != "HTTP/1.0" {
        return Err(format!("bad version in {line:?}"));
    }
    if method.is_empty() || !method.bytes().all(is_token) {
        return Err(format!("bad method in {line:?}"));
    }
    let mut fields = Vec::new();
    for line in lines {
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Err("an obsolete line fold".into());
        }
        let colon = line.iter().position(|&b| b == b':').ok_or_else(|| {
            format!(
                "a field without a colon: {:?}",
                String::from_utf8_lossy(line)
            )
        })?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().copied().all(is_token) {
            return Err(format!(
                "a bad field name {:?}",
                String::from_utf8_lossy(name)
            ));
        }
        let value = line[colon + 1..].trim_ascii();
        if value.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
            return Err("a control byte in a field value".into());
        }
        fields.push((
            String::from_utf8_lossy(name).to_ascii_lowercase(),
            value.to_vec(),
        ));
    }
    let lengths: Vec<&Vec<u8>> = fields
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v)
        .collect();
    let codings: Vec<&Vec<u8>> = fields
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .map(|(_, v)| v)
        .collect();
    let framing = match (lengths.as_slice(), codings.as_slice()) {
        (_, [_, ..]) if !lengths.is_empty() => {
            return Err("both Content-Length and Transfer-Encoding".into())
        }
        ([], []) => Framing::Length(0),
        ([one], []) => {
            let text = std::str::from_utf8(one).map_err(|_| "a bad Content-Length")?;
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("a bad Content-Length {text:?}"));
            }
            Framing::Length(text.parse().map_err(|_| "a huge Content-Length")?)
        }
        ([], [one]) if one.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
        _ => return Err("an unusual framing".into()),
    };
    Ok((method.to_string(), target.to_string(), fields, framing))
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, want: usize) -> Result<(), String> {
    while buf.len() < want {
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err("closed inside a body".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(())
}

async fn read_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    framing: Framing,
) -> Result<Vec<u8>, String> {
    match framing {
        Framing::Length(len) => {
            fill(stream, buf, len).await?;
            Ok(buf.drain(..len).collect())
        }
        Framing::Chunked => {
            let mut body = Vec::new();
            loop {
                let end = loop {
                    if let Some(end) = find(buf, b"\r\n") {
                        break end;
                    }
                    let want = buf.len() + 1;
                    fill(stream, buf, want).await?;
                };
                let line = String::from_utf8_lossy(&buf[..end]).into_owned();
                let size = line.split(';').next().unwrap_or_default();
                if size.is_empty() || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!("a bad chunk size {line:?}"));
                }
                let size = usize::from_str_radix(size, 16).map_err(|_| "a huge chunk")?;
                buf.drain(..end + 2);
                if size == 0 {
                    // Trailers, then an empty line.
                    loop {
                        let end = loop {
                            if let Some(end) = find(buf, b"\r\n") {
                                break end;
                            }
                            let want = buf.len() + 1;
                            fill(stream, buf, want).await?;
                        };
                        buf.drain(..end + 2);
                        if end == 0 {
                            return Ok(body);
                        }
                    }
                }
                fill(stream, buf, size + 2).await?;
                if &buf[size..size + 2] != b"\r\n" {
                    return Err("a chunk longer than its size".into());
                }
                body.extend(buf.drain(..size));
                buf.drain(..2);
            }
        }
    }
}

/// A `tchar` of RFC 9110 §5.6.2.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
