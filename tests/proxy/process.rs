//! The real `pushgate` binary: exit codes for bad config, environment
//! overrides, signals and the drain, memory while streaming, limits derived
//! from the open-file limit.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Process, TempDir, Upstream};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

const PATIENCE: Duration = Duration::from_secs(20);

fn pushgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pushgate"))
}

fn config_for(app: &Upstream, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nupstream:\n  url: {}\n{extra}",
        app.url()
    )
}

/// Runs `pushgate check-config` and `pushgate --config` on `yaml` and checks
/// that both exit 64 and name `key` on stderr.
fn assert_refused(yaml: &str, env: &[(&str, &str)], key: &str) {
    let dir = TempDir::new("bad-config");
    let path = dir.0.join("pushgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    for args in [
        vec!["check-config".to_owned(), path.display().to_string()],
        vec!["--config".to_owned(), path.display().to_string()],
    ] {
        let output = pushgate()
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(64),
            "{args:?} on {yaml:?}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("`{key}`")),
            "{args:?} should name `{key}`: {stderr}"
        );
        assert!(stderr.contains("fix:"), "{stderr}");
    }
}

#[test]
fn each_class_of_bad_config_exits_64_naming_the_key() {
    assert_refused("listen: 127.0.0.1:0\nlistne: 1\n", &[], "listne");
    assert_refused("upstream:\n  tiemout: 1s\n", &[], "upstream.tiemout");
    assert_refused("listen: everywhere\n", &[], "listen");
    assert_refused("upstream:\n  timeout: 30\n", &[], "upstream.timeout");
    assert_refused(
        "limits:\n  max_header_bytes: a lot\n",
        &[],
        "limits.max_header_bytes",
    );
    assert_refused(
        "limits:\n  max_header_bytes: 1KiB\n",
        &[],
        "limits.max_header_bytes",
    );
    assert_refused("upstream:\n  url: https://app:3000\n", &[], "upstream.url");
    assert_refused(
        "upstream:\n  trusted_proxies: [not-an-ip]\n",
        &[],
        "upstream.trusted_proxies[0]",
    );
    assert_refused(
        "tls:\n  cert: /nonexistent/cert.pem\n  key: /nonexistent/key.pem\n",
        &[],
        "tls.cert",
    );
    assert_refused("log:\n  format: xml\n", &[], "log.format");
    assert_refused(
        "",
        &[("PUSHGATE_UPSTREAM__TIMEOUT", "soon")],
        "upstream.timeout",
    );
    assert_refused("", &[("PUSHGATE_NO_SUCH_KEY", "1")], "no_such_key");
    assert_refused("listen: [\n", &[], "(file)");
}

#[test]
fn a_certificate_that_is_not_pem_is_refused_naming_the_file() {
    let dir = TempDir::new("bad-cert");
    let cert = dir.0.join("cert.pem");
    let key = dir.0.join("key.pem");
    std::fs::write(&cert, "this is not a certificate").unwrap();
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(&key, pair.key_pair.serialize_pem()).unwrap();
    let yaml = format!(
        "tls:\n  cert: {}\n  key: {}\n",
        cert.display(),
        key.display()
    );
    let path = dir.0.join("pushgate.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let output = pushgate().arg("check-config").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64));
    assert!(stderr.contains(&cert.display().to_string()), "{stderr}");

    // A key that belongs to another certificate is refused too.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, other.key_pair.serialize_pem()).unwrap();
    let output = pushgate().arg("check-config").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("`tls.key`"), "{stderr}");
}

#[test]
fn check_config_accepts_the_example_and_a_missing_file_is_usage_error() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml");
    let output = pushgate().args(["check-config", example]).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let output = pushgate()
        .args(["check-config", "/nonexistent/pushgate.yaml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let output = pushgate().output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(64),
        "no arguments is a usage error"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_environment_override_reaches_its_key() {
    let app = Upstream::start().await;
    let dir = TempDir::new("env");
    // The file points at nothing; the environment points at the app.
    let yaml = "listen: 127.0.0.1:0\nupstream:\n  url: http://127.0.0.1:1\n";
    let gate = Process::start(&dir.0, yaml, &[("PUSHGATE_UPSTREAM__URL", &app.url())]);
    let (status, body) = common::get(&format!("http://{}/", gate.addr)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_requests_finish_and_refuses_new_ones() {
    let app = Upstream::start().await;
    let dir = TempDir::new("drain");
    let mut gate = Process::start(&dir.0, &config_for(&app, "shutdown:\n  grace: 10s\n"), &[]);
    let addr = gate.addr;

    // A response that streams for about 1.5 s.
    let url = format!("http://{addr}/stream?chunks=15&interval_ms=100");
    let in_flight = tokio::spawn(async move { common::get(&url).await });
    let reached = Instant::now();
    while app.hits.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            reached.elapsed() < PATIENCE,
            "the request never reached the app"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    gate.signal("TERM");
    gate.wait_log("stopped accepting", PATIENCE)
        .expect("drain begins");
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "new connections are refused once draining"
    );

    let (status, body) = tokio::time::timeout(PATIENCE, in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.lines().count(), 15, "the whole stream arrived: {body}");
    assert_eq!(gate.wait_exit(PATIENCE), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_with_work_past_the_grace_still_exits_0() {
    let app = Upstream::start().await;
    let dir = TempDir::new("grace");
    let mut gate = Process::start(
        &dir.0,
        &config_for(&app, "shutdown:\n  grace: 300ms\n"),
        &[],
    );
    let stuck = tokio::spawn(common::get_raw(format!("http://{}/silent", gate.addr)));
    let reached = Instant::now();
    while app.hits.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(reached.elapsed() < PATIENCE);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let signalled = Instant::now();
    gate.signal("INT");
    assert_eq!(gate.wait_exit(PATIENCE), Some(0));
    assert!(signalled.elapsed() < Duration::from_secs(5));
    gate.wait_log("shutdown.grace passed", Duration::from_secs(1))
        .expect("the cut-off work is logged");
    // The stuck request's connection is closed, not left hanging.
    let result = tokio::time::timeout(PATIENCE, stuck)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_err(), "the client sees the connection end");
}

/// 1 GiB each way: far more than the memory pushgate is allowed to use.
const UPLOAD_BYTES: u64 = 1 << 30;
/// Peak resident memory allowed while streaming (the process starts near 10 MiB).
const STREAMING_RSS_LIMIT_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_stream_through_in_bounded_memory() {
    let app = Upstream::start().await;
    let dir = TempDir::new("stream");
    let gate = Process::start(&dir.0, &config_for(&app, ""), &[]);

    // Upload: 1 GiB in 64 KiB chunks, produced as they are sent.
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let chunks = UPLOAD_BYTES / chunk.len() as u64;
    let stream = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    let request = Request::post(format!("http://{}/count", gate.addr))
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap();
    let response =
        tokio::time::timeout(Duration::from_secs(120), common::client().request(request))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let counted = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(counted, UPLOAD_BYTES.to_string());

    // Download: the same size, counted as it arrives.
    let response = common::client()
        .request(
            Request::get(format!("http://{}/big?bytes={UPLOAD_BYTES}", gate.addr))
                .body(common::empty_body())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, UPLOAD_BYTES);

    let peak = gate.peak_rss_kib();
    eprintln!("pushgate peak RSS: {peak} KiB");
    assert!(
        peak < STREAMING_RSS_LIMIT_KIB,
        "peak RSS {peak} KiB while streaming {} MiB each way",
        UPLOAD_BYTES >> 20
    );
}

/// A child process killed when dropped, so a failing test leaves none behind.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary with an open-file limit of `nofile`; the child, its
/// "listening" event and the rest of its log lines.
fn start_with_nofile(
    app: &Upstream,
    dir: &TempDir,
    nofile: u32,
    extra: &str,
) -> (Killed, serde_json::Value, std::sync::mpsc::Receiver<String>) {
    let path = dir.0.join("pushgate.yaml");
    std::fs::write(
        &path,
        config_for(
            app,
            &format!(
                "realtime:\n  max_connections_per_ip: 100000\n  connects_per_second: 1000000\n  connect_burst: 1000000\n{extra}"
            ),
        ),
    )
    .unwrap();
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg(env!("CARGO_BIN_EXE_pushgate"))
        .arg("--config")
        .arg(&path)
        .env("PUSHGATE_LOG__FORMAT", "json")
        .env("PUSHGATE_API__LISTEN", "127.0.0.1:0")
        .env("PUSHGATE_API__KEYS", common::API_KEY)
        .env("PUSHGATE_AUTH__MODE", "none")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = Killed(child);
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let listening = loop {
        let line = lines
            .recv_timeout(PATIENCE)
            .expect("pushgate logs a listening line");
        if line.contains("\"listening\"") {
            break serde_json::from_str(&line).unwrap();
        }
    };
    (child, listening, lines)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connection_limit_defaults_from_the_open_file_limit() {
    let app = Upstream::start().await;
    let dir = TempDir::new("nofile");
    let (child, event, _) = start_with_nofile(&app, &dir, 1064, "");
    drop(child);
    // 1064 files - 64 reserved, less the app's idle pool (at most a quarter):
    // every client connection takes one file.
    assert_eq!(event["max_connections"], 750);
}

#[tokio::test(flavor = "multi_thread")]
async fn realtime_connections_cost_one_file() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = Upstream::start().await;
    let dir = TempDir::new("files");
    // 200 files: 136 after the reserve, 102 after the idle pool's quarter.
    let (child, event, _) = start_with_nofile(&app, &dir, 200, "");
    assert_eq!(event["max_connections"], 102);
    let addr: std::net::SocketAddr = event["addr"].as_str().unwrap().parse().unwrap();

    // 100 SSE streams at once: more than the 68 that two files per
    // connection would allow. (Each shard's accept loop holds one file in
    // hand while it waits, hence 100 of the 102.)
    let mut streams = Vec::new();
    for n in 0..100 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET /realtime/sse?channel=c{n} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut head))
            .await
            .expect("the stream starts in time")
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "stream {n}");
        streams.push(stream);
    }
    drop(child);
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_to_the_app_over_the_file_budget_answer_503_at_once() {
    let app = Upstream::start().await;
    let dir = TempDir::new("app-files");
    // 102 files of budget, 100 kept for client connections: 2 for the app.
    let (child, event, lines) =
        start_with_nofile(&app, &dir, 200, "limits:\n  max_connections: 100\n");
    assert_eq!(event["max_connections"], 100);
    let addr: std::net::SocketAddr = event["addr"].as_str().unwrap().parse().unwrap();

    // Two slow requests hold both files to the app once the app has them.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(common::get_raw(format!(
                "http://{addr}/slow-headers?ms=4000"
            )))
        })
        .collect();
    let deadline = Instant::now() + PATIENCE;
    while app.hits.load(std::sync::atomic::Ordering::Relaxed) < 2 {
        assert!(
            Instant::now() < deadline,
            "the slow requests never reached the app: {:?}",
            slow.iter().map(|s| s.is_finished()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, refused) =
        tokio::time::timeout(PATIENCE, common::get(&format!("http://{addr}/hello")))
            .await
            .expect("answered at once");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    assert!(refused.contains("open-file limit"), "{refused}");
    let logged = std::iter::from_fn(|| lines.recv_timeout(PATIENCE).ok())
        .any(|line| line.contains("limit: the open-file limit"));
    assert!(logged, "the limit is logged");
    for request in slow {
        let (status, _) = request.await.unwrap().expect("the slow ones are answered");
        assert_eq!(status, StatusCode::OK);
    }
    // Their files came back with their answers.
    let (status, _) = common::get(&format!("http://{addr}/hello")).await;
    assert_eq!(status, StatusCode::OK);
    drop(child);
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_are_logged_when_they_bite() {
    let app = Upstream::start().await;
    let dir = TempDir::new("limit-log");
    let gate = Process::start(
        &dir.0,
        &config_for(&app, "limits:\n  header_timeout: 200ms\n"),
        &[],
    );
    let mut slow = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET / HTTP/1.1\r\nHost: ")
        .await
        .unwrap();
    let line = gate
        .wait_log("limits.header_timeout", PATIENCE)
        .expect("the head deadline is logged");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["level"], "INFO");
    assert!(event["peer"].as_str().unwrap().starts_with("127.0.0.1:"));

    let mut greedy = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nCookie: {}\r\n\r\n",
        "c".repeat(64 * 1024)
    );
    // pushgate may answer 431 and close before it has read everything.
    let _ = tokio::io::AsyncWriteExt::write_all(&mut greedy, head.as_bytes()).await;
    gate.wait_log("limits.max_header_bytes", PATIENCE)
        .expect("the header size limit is logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_the_app_cannot_take_is_logged_with_its_method_and_path() {
    // A port nothing listens on: every request to the app is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = TempDir::new("proxy-error-log");
    let gate = Process::start(
        &dir.0,
        &format!("listen: 127.0.0.1:0\nupstream:\n  url: http://127.0.0.1:{port}\n"),
        &[],
    );
    // One path kept inline for the log line, one longer than that.
    let long = format!("/reports/{}/summary", "q".repeat(120));
    for path in ["/short", long.as_str()] {
        let (status, _) = common::get(&format!("http://{}{path}?page=2", gate.addr)).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        let line = gate
            .wait_log("\"proxy error\"", PATIENCE)
            .expect("the failure is logged");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(event["level"], "WARN", "{line}");
        assert_eq!(event["method"], "GET", "{line}");
        assert_eq!(event["path"], path, "{line}");
    }
}

/// pushgate as a process on the config at `path`, with `env`; its log
/// lines as they come (stderr is a pipe).
fn spawn_logging(
    path: &std::path::Path,
    env: &[(&str, &str)],
) -> (Killed, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .arg("--config")
        .arg(path)
        .env("PUSHGATE_API__LISTEN", "127.0.0.1:0")
        .env("PUSHGATE_API__KEYS", common::API_KEY)
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    (Killed(child), lines)
}

#[tokio::test(flavor = "multi_thread")]
async fn text_logs_to_a_file_or_pipe_carry_no_colour_codes() {
    let app = Upstream::start().await;
    let dir = TempDir::new("plain-log");
    let path = dir.0.join("pushgate.yaml");
    std::fs::write(&path, config_for(&app, "log:\n  format: text\n")).unwrap();
    let (_child, lines) = spawn_logging(&path, &[("PUSHGATE_AUTH__MODE", "none")]);
    let mut seen = String::new();
    while !seen.contains("listening") {
        let line = lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("pushgate logs a listening line; it logged {seen:?}"));
        seen.push_str(&line);
        seen.push('\n');
    }
    assert!(!seen.contains('\u{1b}'), "colour codes in a pipe: {seen:?}");
}

/// A new user's first question when every realtime connect is refused:
/// the log says at start how connections are authorized, and says what to
/// do when the app has no auth endpoint (here the app answers every path
/// with a page, as a catch-all route does).
#[tokio::test(flavor = "multi_thread")]
async fn the_log_names_the_auth_mode_and_what_to_do_without_an_auth_endpoint() {
    let app = Upstream::start().await;
    let dir = TempDir::new("auth-hint");
    let path = dir.0.join("pushgate.yaml");
    std::fs::write(&path, config_for(&app, "")).unwrap();
    let (_child, lines) = spawn_logging(
        &path,
        &[
            ("PUSHGATE_LOG__FORMAT", "json"),
            ("PUSHGATE_AUTH__MODE", "upstream"),
        ],
    );
    let next = |what: &str| -> serde_json::Value {
        loop {
            let line = lines
                .recv_timeout(PATIENCE)
                .unwrap_or_else(|_| panic!("pushgate logs {what}"));
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            if event["message"].as_str().is_some_and(|m| m.contains(what)) {
                return event;
            }
        }
    };
    let listening = next("listening");
    let mode = next("auth.mode upstream");
    let message = mode["message"].as_str().unwrap();
    assert!(message.contains("/realtime/auth"), "{message}");
    let public = listening["addr"].as_str().unwrap();
    let (status, _) = common::get(&format!("http://{public}/realtime/sse?channel=a")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let failed = next("request to the app failed");
    let why = failed["why"].as_str().unwrap_or_default();
    assert!(
        why.contains("is auth.upstream.path the app's auth endpoint"),
        "{failed}"
    );
}
