//! examples/deploy/nginx: the recipe's own nginx.conf and node configs,
//! with only addresses and paths changed, in front of two real pushgate
//! binaries on one real redis-server, with real clients of every transport
//! going through nginx.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;

use super::{read_recipe, substitute};
use crate::common::events_app::EventsApp;
use crate::common::realtime::{self, Got, Sse, Ws};
use crate::common::redis::Redis;
use crate::common::{self, Process, TempDir, PATIENCE};

/// nginx, installed with apt-get when this machine lacks it (as .ci/run
/// does).
fn nginx_binary() -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let found = || {
        ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
    };
    if let Some(path) = found() {
        return path;
    }
    // Install only: the package's own nginx service must not start (it
    // would take port 80); policy-rc.d tells the package scripts so.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let placed = !policy.exists()
        && std::fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok()
        && Command::new("chmod")
            .args(["+x", "/usr/sbin/policy-rc.d"])
            .status()
            .is_ok_and(|s| s.success());
    let installed = Command::new("apt-get")
        .args(["install", "-y", "-qq", "nginx"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    if placed {
        let _ = std::fs::remove_file(policy);
    }
    assert!(
        installed.is_ok_and(|s| s.success()),
        "this test needs nginx: `apt-get install -y nginx` failed (run as root, or install it)"
    );
    found().expect("nginx installed")
}

/// A port free a moment ago, for nginx (which cannot say which port it
/// took): [`Nginx::start`] tries another when it was taken meanwhile.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// nginx in the foreground with everything it writes in its own folder, on
/// an ephemeral port; stopped (with its workers) on drop.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Nginx {
    /// Runs the recipe's nginx.conf in front of `nodes` (their public
    /// addresses, in the recipe's order).
    fn start(nodes: [SocketAddr; 2]) -> Nginx {
        let binary = nginx_binary();
        let dir = TempDir::new("nginx");
        let logs = format!("{}/", dir.0.display());
        let mut conf = read_recipe("nginx/nginx.conf");
        conf = substitute(&conf, "/var/log/nginx/", &logs);
        conf = substitute(
            &conf,
            "server 127.0.0.1:8080 ",
            &format!("server {} ", nodes[0]),
        );
        conf = substitute(
            &conf,
            "server 127.0.0.1:8180 ",
            &format!("server {} ", nodes[1]),
        );
        // Temporary files in the test's folder, not the system's; and the
        // nodes' X-Accel-Buffering ignored, so that SSE arriving event by
        // event proves the recipe's own `proxy_buffering off`.
        let temp = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .map(|kind| format!("    {kind}_temp_path {logs}{kind};\n"))
            .concat();
        conf = substitute(
            &conf,
            "http {\n",
            &format!("http {{\n{temp}    proxy_ignore_headers X-Accel-Buffering;\n"),
        );
        for _ in 0..20 {
            let port = free_port();
            let text = substitute(&conf, "listen 80;", &format!("listen 127.0.0.1:{port};"));
            let path = dir.0.join("nginx.conf");
            std::fs::write(&path, text).unwrap();
            // What the last attempt logged is not this one's reason.
            let _ = std::fs::remove_file(dir.0.join("error.log"));
            let mut child = Command::new(&binary)
                .arg("-p")
                .arg(&dir.0)
                .arg("-c")
                .arg(&path)
                .arg("-e")
                .arg(dir.0.join("error.log"))
                .arg("-g")
                .arg(format!(
                    "daemon off; pid {};",
                    dir.0.join("nginx.pid").display()
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nginx runs");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = Instant::now() + PATIENCE;
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    let log = std::fs::read_to_string(dir.0.join("error.log")).unwrap_or_default();
                    assert!(
                        log.contains("Address already in use"),
                        "nginx exited ({status}): {log}"
                    );
                    break;
                }
                if TcpStream::connect(addr).is_ok() {
                    return Nginx { child, addr, dir };
                }
                assert!(Instant::now() < deadline, "nginx did not listen in time");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("nginx found no free port");
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master stops its workers too; a killed master
        // would leave them holding the port.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two nodes started from the recipe's node-a.yaml and node-b.yaml, with
/// ephemeral ports and this test's app and Redis.
struct Cluster {
    // Dropped in this order: nginx first, then the nodes, then Redis.
    nginx: Nginx,
    nodes: [Option<Process>; 2],
    _dirs: [TempDir; 2],
    _redis: Redis,
    _app: EventsApp,
}

fn node_config(file: &str, app: &EventsApp, redis: &Redis) -> String {
    let mut config = read_recipe(file);
    for (public, api) in [("8080", "8081"), ("8180", "8181")] {
        for port in [public, api] {
            let line = format!("listen: 127.0.0.1:{port}\n");
            if config.contains(&line) {
                config = config.replace(&line, "listen: 127.0.0.1:0\n");
            }
        }
    }
    assert_eq!(
        config.matches("listen: 127.0.0.1:0\n").count(),
        2,
        "{file}: a public and an API listener on the recipe's ports"
    );
    config = substitute(
        &config,
        "url: http://127.0.0.1:3000",
        &format!("url: {}", app.url()),
    );
    substitute(
        &config,
        "url: redis://127.0.0.1:6379",
        &format!("url: {}", redis.url()),
    )
}

impl Cluster {
    async fn start() -> Cluster {
        let redis = Redis::start();
        let app = EventsApp::start().await;
        let dirs = [TempDir::new("node-a"), TempDir::new("node-b")];
        // The key is not in the recipe: it comes from the environment.
        let env = [("PUSHGATE_API__KEYS", common::API_KEY)];
        let a = Process::start_plain(
            &dirs[0].0,
            &node_config("nginx/node-a.yaml", &app, &redis),
            &env,
        );
        let b = Process::start_plain(
            &dirs[1].0,
            &node_config("nginx/node-b.yaml", &app, &redis),
            &env,
        );
        for node in [&a, &b] {
            wait_for("a node's /readyz to answer 200", || async {
                common::get(&format!("http://{}/readyz", node.api_addr))
                    .await
                    .0
                    == StatusCode::OK
            })
            .await;
        }
        let nginx = Nginx::start([a.addr, b.addr]);
        Cluster {
            nginx,
            nodes: [Some(a), Some(b)],
            _dirs: dirs,
            _redis: redis,
            _app: app,
        }
    }

    fn node(&self, index: usize) -> &Process {
        self.nodes[index].as_ref().expect("the node runs")
    }
}

/// Waits until `condition` holds; fails the test after [`PATIENCE`].
async fn wait_for<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !condition().await {
        assert!(Instant::now() < deadline, "waited too long for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `future`'s output, failing the test after [`PATIENCE`]: nothing a test
/// waits on through nginx may hang it.
async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("waited too long for {what}"))
}

/// `pushgate_connections{transport}` on one node.
async fn connections(node: &Process, transport: &str) -> u64 {
    let (status, text) = common::get(&format!("http://{}/metrics", node.api_addr)).await;
    assert_eq!(status, StatusCode::OK);
    let prefix = format!("pushgate_connections{{transport=\"{transport}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |value| value.trim().parse::<f64>().unwrap() as u64)
}

async fn publish(node: &Process, channel: &str, n: u64) {
    let (status, body) = common::api_call(
        node.api_addr,
        "POST",
        "/api/publish",
        Some(json!({"channel": channel, "data": {"n": n}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "publish: {body}");
}

fn number(got: &Got) -> u64 {
    match got {
        Got::Message { data, .. } => data["n"].as_u64().expect("data.n"),
        Got::Reset { .. } => panic!("a reset where a publication was due: {got:?}"),
    }
}

/// The next publication on an SSE stream, with the cursor after it.
async fn sse_next(sse: &mut Sse) -> (u64, String) {
    loop {
        let block = tokio::time::timeout(PATIENCE, sse.next())
            .await
            .expect("an SSE event in time (is nginx buffering?)")
            .expect("the stream reads")
            .expect("the stream stays open");
        if let (Some(got), Some(id)) = block {
            return (number(&got), id);
        }
    }
}

/// Opens connections with `open` until both nodes hold one (round robin
/// sends them to both; nginx's workers each keep their own turn).
async fn spread<T, F, Fut>(cluster: &Cluster, transport: &str, mut open: F) -> Vec<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(open().await);
        let (a, b) = (
            connections(cluster.node(0), transport).await,
            connections(cluster.node(1), transport).await,
        );
        assert_eq!(a + b, clients.len() as u64, "{transport} connections");
        if a > 0 && b > 0 {
            return clients;
        }
    }
    panic!("nginx sent every {transport} connection to one node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_works_through_nginx_on_either_node() {
    let cluster = Cluster::start().await;
    let nginx = cluster.nginx.addr;

    // The app's own pages pass through nginx and a node.
    let page = format!("http://{nginx}/index.html");
    let (status, _) = within("a page through nginx", common::get(&page)).await;
    assert_eq!(status, StatusCode::OK, "{}", cluster.nginx.error_log());

    let mut sockets = spread(&cluster, "websocket", || async {
        let mut socket = common::ws_connect(nginx, "").await;
        let reply = common::ws_subscribe(&mut socket, 1, "news", None).await;
        assert!(reply.get("error").is_none(), "subscribe: {reply}");
        socket
    })
    .await;
    let mut streams = spread(&cluster, "sse", || async {
        let mut sse = within("an SSE stream's head", Sse::open(nginx, &["news"], None))
            .await
            .unwrap_or_else(|err| panic!("SSE through nginx: {err}"));
        // The first block (retry and the starting cursor) comes once the
        // stream is subscribed.
        let (got, id) = tokio::time::timeout(PATIENCE, sse.next())
            .await
            .expect("the first SSE block in time")
            .unwrap()
            .expect("the stream is open");
        assert!(got.is_none() && id.is_some());
        sse
    })
    .await;
    let from_start = realtime::cursor_from_start(&["news"]);
    let poller =
        tokio::spawn(async move { realtime::poll(nginx, &["news"], Some(&from_start), 30).await });
    wait_for("the long-poll to wait on a node", || async {
        connections(cluster.node(0), "poll").await + connections(cluster.node(1), "poll").await == 1
    })
    .await;

    // Published on node a, heard wherever each client landed; SSE events
    // arrive one at a time while the stream stays open.
    for n in 1..=3 {
        publish(cluster.node(0), "news", n).await;
        for socket in &mut sockets {
            let message = common::ws_next_json(socket).await;
            assert_eq!(message["data"], json!({"n": n}), "{message}");
        }
        for sse in &mut streams {
            assert_eq!(sse_next(sse).await.0, n);
        }
    }
    let polled = within("the long-poll's answer", poller)
        .await
        .unwrap()
        .expect("the long-poll answers");
    assert_eq!(
        polled.got.iter().map(number).collect::<Vec<_>>().first(),
        Some(&1),
        "the long-poll answers with the first publication"
    );
    // The poller comes back with its cursor, through whichever node.
    let rest = within(
        "the next poll",
        realtime::poll(nginx, &["news"], Some(&polled.cursor), 5),
    )
    .await
    .expect("the next poll");
    let mut heard: Vec<u64> = polled.got.iter().map(number).collect();
    heard.extend(rest.got.iter().map(number));
    assert_eq!(heard, vec![1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_client_moves_to_the_other_node_when_its_node_stops_and_misses_nothing() {
    let mut cluster = Cluster::start().await;
    let nginx = cluster.nginx.addr;

    let mut sse = within("an SSE stream's head", Sse::open(nginx, &["moved"], None))
        .await
        .unwrap();
    let (_, cursor) = tokio::time::timeout(PATIENCE, sse.next())
        .await
        .expect("the first SSE block in time")
        .unwrap()
        .expect("the stream is open");
    let mut cursor = cursor.expect("a starting cursor");
    let on = if connections(cluster.node(0), "sse").await == 1 {
        0
    } else {
        assert_eq!(connections(cluster.node(1), "sse").await, 1);
        1
    };
    let other = 1 - on;

    for n in 1..=3 {
        publish(cluster.node(other), "moved", n).await;
        let (heard, id) = sse_next(&mut sse).await;
        assert_eq!(heard, n);
        cursor = id;
    }

    // The node stops: the stream ends, the node exits within its grace.
    cluster.node(on).signal("TERM");
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match sse.next().await {
                Ok(Some((Some(got), _))) => panic!("nothing was published: {got:?}"),
                Ok(Some((None, _))) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ends when its node stops");
    let mut stopped = cluster.nodes[on].take().unwrap();
    assert_eq!(stopped.wait_exit(PATIENCE), Some(0), "a clean drain");

    // Published while the client is away.
    for n in 4..=10 {
        publish(cluster.node(other), "moved", n).await;
    }

    // Back through nginx, which finds the stopped node refusing and sends
    // the client to the other one; the cursor brings back the gap.
    let mut sse = within(
        "the resumed stream's head",
        Sse::open(nginx, &["moved"], Some(&cursor)),
    )
    .await
    .unwrap_or_else(|err| {
        panic!(
            "reconnect through nginx: {err}\n{}",
            cluster.nginx.error_log()
        )
    });
    let mut heard = Vec::new();
    for _ in 4..=10 {
        heard.push(sse_next(&mut sse).await.0);
    }
    assert_eq!(
        heard,
        (4..=10).collect::<Vec<_>>(),
        "every publication, in order"
    );
    publish(cluster.node(other), "moved", 11).await;
    assert_eq!(sse_next(&mut sse).await.0, 11, "and live ones after");
    assert!(connections(cluster.node(other), "sse").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_moves_to_the_other_node_with_its_position() {
    let mut cluster = Cluster::start().await;
    let nginx = cluster.nginx.addr;

    let mut socket = within("a WebSocket through nginx", Ws::connect(nginx))
        .await
        .unwrap();
    let mut early = Vec::new();
    let subscribed = within(
        "the subscribe reply",
        socket.subscribe("moved", None, &mut early),
    )
    .await
    .unwrap();
    let mut position = subscribed.position;
    let on = if connections(cluster.node(0), "websocket").await == 1 {
        0
    } else {
        assert_eq!(connections(cluster.node(1), "websocket").await, 1);
        1
    };
    let other = 1 - on;

    for n in 1..=3 {
        publish(cluster.node(other), "moved", n).await;
        let got = within("a publication", socket.next())
            .await
            .unwrap()
            .expect("the connection is open");
        assert_eq!(number(&got), n);
        position = got.position();
    }

    // The node stops: it closes the connection (1001), and exits.
    cluster.node(on).signal("TERM");
    let after = within("the close", socket.next()).await;
    assert!(
        matches!(after, Ok(None) | Err(_)),
        "nothing was published: {after:?}"
    );
    let mut stopped = cluster.nodes[on].take().unwrap();
    assert_eq!(stopped.wait_exit(PATIENCE), Some(0), "a clean drain");

    for n in 4..=10 {
        publish(cluster.node(other), "moved", n).await;
    }

    // Back through nginx to the other node, subscribing since the last
    // position it had: the gap comes from Redis's history, then live.
    let mut socket = within("a WebSocket through nginx again", Ws::connect(nginx))
        .await
        .unwrap_or_else(|err| {
            panic!(
                "reconnect through nginx: {err}\n{}",
                cluster.nginx.error_log()
            )
        });
    let mut heard = Vec::new();
    let subscribed = within(
        "the resuming subscribe",
        socket.subscribe("moved", Some(position), &mut heard),
    )
    .await
    .unwrap();
    assert!(subscribed.recovered, "history covers the gap");
    while heard.len() < 7 {
        let got = within("a missed publication", socket.next())
            .await
            .unwrap()
            .expect("the connection is open");
        heard.push(got);
    }
    assert_eq!(
        heard.iter().map(number).collect::<Vec<_>>(),
        (4..=10).collect::<Vec<_>>(),
        "every publication, in order"
    );
    publish(cluster.node(other), "moved", 11).await;
    let live = within("a live publication", socket.next())
        .await
        .unwrap()
        .expect("the connection is open");
    assert_eq!(number(&live), 11);
    assert_eq!(connections(cluster.node(other), "websocket").await, 1);
}
