//! `pushgate-bench floor`: the least a server can do to broadcast over SSE,
//! to show what the machine itself allows.
//!
//! It speaks Nchan's wire (`GET /sub/<channel>` opens an event stream whose
//! events are the published bodies, `POST /pub/<channel>` publishes and is
//! answered `201` once every subscriber's write is done), so the load
//! generator drives it as it drives Nchan (`--target nchan --label floor`).
//! Behind that it does nothing a real server must: no auth, no history, no
//! queue per subscriber, no event loop. Each publication is formatted once
//! and written with one `write` per subscriber, in a tight loop, by one
//! thread per core, each holding its share of the sockets. So what it
//! measures is the kernel's cost of one small TCP send on loopback (and of
//! the reader it wakes), which no server can go under: a latency this floor
//! cannot hold, no server holds on the same machine.
//!
//! A subscriber whose socket cannot take a whole event at once (its send
//! buffer full) is closed and counted on stderr: a real server would queue
//! for it; this one does not pretend to.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;

use clap::Args as ClapArgs;

/// Request heads over this are refused (the connection is closed).
const MAX_HEAD: usize = 16 * 1024;
/// Publication bodies over this are refused.
const MAX_BODY: usize = 1 << 20;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Writer threads, each with its share of the subscribers; defaults to
    /// one per CPU.
    #[arg(long)]
    threads: Option<usize>,
}

/// What a writer thread is told.
enum Order {
    /// A new subscriber, its response head already written.
    Add(String, TcpStream),
    /// Write `event` to every subscriber of the channel, then say so.
    Publish {
        channel: String,
        event: Arc<[u8]>,
        done: mpsc::Sender<()>,
    },
}

/// Serves until the process is killed.
pub fn run(args: Args) -> io::Result<()> {
    let listener = TcpListener::bind(args.listen)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let writers: Vec<mpsc::Sender<Order>> = (0..threads)
        .map(|index| {
            let (orders, inbox) = mpsc::channel();
            std::thread::Builder::new()
                .name(format!("floor-writer-{index}"))
                .spawn(move || write_loop(inbox))
                .map(|_| orders)
        })
        .collect::<io::Result<_>>()?;
    let writers = Arc::new(writers);
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;

    let mut next = 0;
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(err) => {
                eprintln!("floor: accept: {err}");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let mut buf = Vec::new();
        let Some(head) = read_head(&mut stream, &mut buf) else {
            continue;
        };
        match head.path.strip_prefix("/sub/") {
            Some(channel) if head.method == "GET" => {
                let channel = channel.to_owned();
                let opened = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                          Cache-Control: no-cache\r\nConnection: close\r\n\r\n",
                    )
                    .and_then(|()| stream.set_nodelay(true))
                    .and_then(|()| stream.set_nonblocking(true));
                if opened.is_ok() {
                    let _ = writers[next % writers.len()].send(Order::Add(channel, stream));
                    next += 1;
                }
            }
            _ => {
                // Publishers keep their connection; each gets a thread.
                let writers = writers.clone();
                std::thread::spawn(move || publisher(stream, head, buf, &writers));
            }
        }
    }
    Ok(())
}

/// One writer thread: its subscribers by channel.
fn write_loop(inbox: mpsc::Receiver<Order>) {
    let mut channels: HashMap<String, Vec<TcpStream>> = HashMap::new();
    for order in inbox {
        match order {
            Order::Add(channel, stream) => channels.entry(channel).or_default().push(stream),
            Order::Publish {
                channel,
                event,
                done,
            } => {
                if let Some(subscribers) = channels.get_mut(&channel) {
                    let before = subscribers.len();
                    subscribers.retain_mut(
                        |stream| matches!(stream.write(&event), Ok(n) if n == event.len()),
                    );
                    let closed = before - subscribers.len();
                    if closed > 0 {
                        eprintln!("floor: {closed} subscribers on `{channel}` could not take an event at once; closed");
                    }
                }
                let _ = done.send(());
            }
        }
    }
}

/// A publishing connection: `POST /pub/<channel>` requests one after the
/// other, each answered `201` once every writer has written it.
fn publisher(
    mut stream: TcpStream,
    mut head: Head,
    mut buf: Vec<u8>,
    writers: &[mpsc::Sender<Order>],
) {
    let _ = stream.set_nodelay(true);
    loop {
        let answer: &[u8] = match (head.method.as_str(), head.path.strip_prefix("/pub/")) {
            ("POST", Some(channel)) if head.content_length <= MAX_BODY => {
                let Some(body) = read_body(&mut stream, &mut buf, head.content_length) else {
                    return;
                };
                let event = sse_event(&body);
                let (done, finished) = mpsc::channel();
                for writer in writers {
                    let _ = writer.send(Order::Publish {
                        channel: channel.to_owned(),
                        event: event.clone(),
                        done: done.clone(),
                    });
                }
                drop(done);
                // Every writer answers, or has gone (then the loop ends early).
                for () in finished {}
                b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
            }
            ("POST", Some(_)) => {
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            }
            // Anything else (a probe): answered, nothing published.
            _ => {
                if read_body(&mut stream, &mut buf, head.content_length.min(MAX_BODY)).is_none() {
                    return;
                }
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
            }
        };
        if stream.write_all(answer).is_err() {
            return;
        }
        match read_head(&mut stream, &mut buf) {
            Some(next) => head = next,
            None => return,
        }
    }
}

/// `data:` lines for `body`, one per line of it, and the blank line.
fn sse_event(body: &[u8]) -> Arc<[u8]> {
    let mut event = Vec::with_capacity(body.len() + 16);
    for line in body.split(|&b| b == b'\n') {
        event.extend_from_slice(b"data: ");
        event.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        event.push(b'\n');
    }
    event.push(b'\n');
    event.into()
}

/// The parts of a request head this server looks at.
struct Head {
    method: String,
    path: String,
    content_length: usize,
}

/// Reads a request head; what follows it stays in `buf`. `None` when the
/// connection ended, the head is too big or it is not HTTP.
fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Head> {
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if buf.len() > MAX_HEAD || !fill(stream, buf) {
            return None;
        }
    };
    let text = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = text.split("\r\n");
    let mut start = lines.next()?.split(' ');
    let (method, path) = (start.next()?.to_owned(), start.next()?.to_owned());
    let mut content_length = 0;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().ok()?;
            }
        }
    }
    buf.drain(..end + 4);
    Some(Head {
        method,
        path,
        content_length,
    })
}

/// Reads `length` bytes of body (some may be in `buf` already) and takes
/// them out of `buf`.
fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>, length: usize) -> Option<Vec<u8>> {
    while buf.len() < length {
        if !fill(stream, buf) {
            return None;
        }
    }
    Some(buf.drain(..length).collect())
}

/// One read into `buf`; `false` at the end of the stream or on an error.
fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0; 4096];
    match stream.read(&mut chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_has_a_data_line_per_line_of_the_body() {
        assert_eq!(&*sse_event(br#"{"seq":1}"#), b"data: {\"seq\":1}\n\n");
        assert_eq!(&*sse_event(b"a\r\nb"), b"data: a\ndata: b\n\n");
    }
}
