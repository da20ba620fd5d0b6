//! A real `redis-server` for tests, on an ephemeral port, stopped on drop.
//! It can be killed and started again on the same port, with or without its
//! data, to play outages.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TempDir;

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
    args: Vec<String>,
    /// The CA to trust when the server speaks TLS only.
    tls_ca: Option<std::path::PathBuf>,
    /// The TLS files, removed with the server.
    keep: Option<TempDir>,
}

/// The server binary: `REDIS_SERVER` or `redis-server` on the PATH.
fn server_binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// redis-cli's output for one command on the server at `port`; nothing
/// after 10 s (a stopped server never answers).
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .args(["10", "redis-cli", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    /// A server that keeps nothing on disk: killed, it comes back empty.
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// A server with extra arguments, e.g. `--appendonly yes --appendfsync
    /// always` so that a killed server comes back with its data.
    pub fn start_with(args: &[&str]) -> Redis {
        Redis::launch(args.iter().map(|a| a.to_string()).collect(), None)
    }

    /// A server that speaks TLS only, with a certificate for 127.0.0.1
    /// signed by a fresh CA; [`Redis::ca_file`] is that CA.
    pub fn start_tls() -> Redis {
        let dir = TempDir::new("redis-tls");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Distinct names, or the server's certificate looks self-signed.
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pushgate test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "127.0.0.1");
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.0.join(name);
            std::fs::write(&path, pem).unwrap();
            path.to_string_lossy().into_owned()
        };
        let ca_file = write("ca.pem", ca.pem());
        let args = vec![
            "--tls-cert-file".into(),
            write("cert.pem", cert.pem()),
            "--tls-key-file".into(),
            write("key.pem", key.serialize_pem()),
            "--tls-ca-cert-file".into(),
            ca_file.clone(),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        let mut redis = Redis::launch(args, Some(ca_file.into()));
        // The files live as long as the server.
        redis.keep = Some(dir);
        redis
    }

    /// The CA a TLS server's certificate is signed by.
    pub fn ca_file(&self) -> &std::path::Path {
        self.tls_ca.as_deref().expect("a TLS server")
    }

    fn launch(args: Vec<String>, tls_ca: Option<std::path::PathBuf>) -> Redis {
        let mut redis = Redis {
            child: None,
            port: 0,
            dir: TempDir::new("redis"),
            args,
            tls_ca,
            keep: None,
        };
        // Another process may take the port between the probe and the
        // bind: then try another.
        for _ in 0..20 {
            redis.port = free_port();
            if redis.spawn() {
                return redis;
            }
        }
        panic!("redis-server did not start; see {}", redis.dir.0.display());
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server on `self.port`; `false` when it exited at once
    /// (the port was taken).
    fn spawn(&mut self) -> bool {
        let log = std::fs::File::create(self.dir.0.join("redis.log")).unwrap();
        let port = self.port.to_string();
        let ports = match self.tls_ca {
            Some(_) => vec!["--port", "0", "--tls-port", &port],
            None => vec!["--port", &port],
        };
        let mut child = Command::new(server_binary())
            .args(ports)
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir.0)
            .args(&self.args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if self.ping() {
                self.child = Some(child);
                return true;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-server did not answer on port {}: {}",
                    self.port,
                    std::fs::read_to_string(self.dir.0.join("redis.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the server answers PING (loading an AOF answers LOADING).
    /// Up to here, the server's files are in its folder; the log is
    /// `redis.log`.
    pub fn ping(&self) -> bool {
        match &self.tls_ca {
            // A server that wants a password is up too.
            None => self
                .command(&["PING"])
                .is_some_and(|reply| reply == "+PONG" || reply.starts_with("-NOAUTH")),
            Some(ca) => Command::new("redis-cli")
                .args(["--tls", "--cacert"])
                .arg(ca)
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "PING"])
                .output()
                .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "PONG"),
        }
    }

    /// Runs one command; the first line of the reply.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read(&mut byte).ok()? == 1 {
            if byte[0] == b'\n' {
                break;
            }
            reply.push(byte[0]);
        }
        Some(String::from_utf8_lossy(&reply).trim_end().to_owned())
    }

    /// redis-cli's output for one command (plain TCP servers only).
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// Keys matching `pattern` (for tests that check what is left behind).
    pub fn count_keys(&self, pattern: &str) -> usize {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--scan", "--pattern", pattern])
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).lines().count()
    }

    /// Kills the server at once (SIGKILL): no shutdown, no final save.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server without closing anything (SIGSTOP): connections
    /// stay open and nothing answers, as a hung host.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let pid = self.child.as_ref().expect("a running server").id();
        let status = Command::new("kill")
            .args([which, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {which} {pid} failed");
    }

    /// Starts the server again on the same port, with whatever its
    /// arguments keep on disk.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "redis-server could not take port {} again",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Redis {
    /// Kills the server and starts it again on the same port with nothing
    /// on disk, as a server without persistence comes back: everything it
    /// held is lost. A cluster node keeps `nodes.conf`, its place in the
    /// cluster, which is not data.
    pub fn restart_empty(&mut self) {
        self.kill();
        for entry in std::fs::read_dir(&self.dir.0).unwrap().flatten() {
            if entry.file_name() == "redis.log" || entry.file_name() == "nodes.conf" {
                continue;
            }
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
        self.restart();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of real redis-server processes on ephemeral ports;
/// stopped on drop. It serves the slots it still covers while a master is
/// away (`cluster-require-full-coverage no`, as pushgate's docs ask).
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// Marked failed (`fail`) or unreachable (`fail?`, `noaddr`).
    pub failed: bool,
    /// Slot ranges it serves, inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// `n` masters, no replicas, nothing kept on disk.
    pub fn start(n: usize) -> RedisCluster {
        RedisCluster::start_with(n, 0, &[])
    }

    /// `masters` masters with `replicas` replicas each; `args` go to every
    /// server (e.g. AOF).
    pub fn start_with(masters: usize, replicas: usize, args: &[&str]) -> RedisCluster {
        let nodes: Vec<Redis> = (0..masters * (1 + replicas))
            .map(|_| {
                let bus = free_port().to_string();
                let mut all = vec![
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-require-full-coverage",
                    "no",
                ];
                all.extend_from_slice(args);
                Redis::start_with(&all)
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(Duration::from_secs(30));
        if replicas > 0 {
            // Every replica has synced with its master.
            let deadline = Instant::now() + Duration::from_secs(30);
            for node in &cluster.nodes {
                while cluster.cli(node.port, &["ROLE"]).starts_with("slave")
                    && !cluster.cli(node.port, &["ROLE"]).contains("connected")
                {
                    assert!(Instant::now() < deadline, "a replica never synced");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        cluster
    }

    /// A seed URL: the first node.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// redis-cli's output for one command on the node at `port`.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(port, args)
    }

    /// Waits until every live node says `cluster_state:ok` and agrees on
    /// who serves every slot.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let live: Vec<&Redis> = self.nodes.iter().filter(|n| n.child.is_some()).collect();
            let ok = live.iter().all(|n| {
                self.cli(n.port, &["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")
            });
            let views: Vec<Vec<(u16, u16, u16)>> = live
                .iter()
                .map(|n| {
                    let mut owners: Vec<(u16, u16, u16)> =
                        parse_nodes(&self.cli(n.port, &["CLUSTER", "NODES"]))
                            .into_iter()
                            .filter(|node| node.master && !node.failed)
                            .flat_map(|node| {
                                node.slots.into_iter().map(move |(a, b)| (a, b, node.port))
                            })
                            .collect();
                    owners.sort();
                    owners
                })
                .collect();
            if ok && views.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster never settled: {views:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `CLUSTER NODES` as a live node sees it.
    pub fn view(&self) -> Vec<ClusterNode> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.child.is_some() && n.ping())
            .expect("a live node");
        parse_nodes(&self.cli(node.port, &["CLUSTER", "NODES"]))
    }

    /// The slot of a pushgate channel's keys (its name is the hash tag).
    pub fn slot_of(&self, channel: &str) -> u16 {
        let port = self.nodes.iter().find(|n| n.child.is_some()).unwrap().port;
        self.cli(port, &["CLUSTER", "KEYSLOT", channel])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answers a number")
    }

    /// The index in `nodes` of the master serving `slot` now.
    pub fn master_of(&self, slot: u16) -> usize {
        let port = self
            .view()
            .into_iter()
            .find(|n| n.master && !n.failed && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .expect("a master serves the slot")
            .port;
        self.index_of(port)
    }

    pub fn index_of(&self, port: u16) -> usize {
        self.nodes.iter().position(|n| n.port == port).unwrap()
    }

    /// Kills the master at `index` and waits until one of its replicas
    /// serves its slots and the cluster is ok again. Returns the new
    /// master's index.
    pub fn kill_and_fail_over(&mut self, index: usize) -> usize {
        let old = self.nodes[index].port;
        let slots = self
            .view()
            .into_iter()
            .find(|n| n.port == old)
            .expect("the master is in the cluster")
            .slots;
        let slot = slots.first().expect("the master serves slots").0;
        self.nodes[index].kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let promoted = self.view().into_iter().find(|n| {
                n.master
                    && !n.failed
                    && n.port != old
                    && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
            });
            if let Some(promoted) = promoted {
                self.wait_ok(Duration::from_secs(30));
                return self.index_of(promoted.port);
            }
            assert!(
                Instant::now() < deadline,
                "no replica took over from port {old}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The index in `nodes` of a replica of the master at `index`.
    pub fn replica_of(&self, index: usize) -> usize {
        let id = self
            .cli(self.nodes[index].port, &["CLUSTER", "MYID"])
            .trim()
            .to_owned();
        let port = self
            .cli(self.nodes[index].port, &["CLUSTER", "NODES"])
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let replica = fields.len() > 3 && fields[2].contains("slave") && fields[3] == id;
                replica.then(|| fields[1].split(['@', ':']).nth(1)?.parse::<u16>().ok())?
            })
            .expect("the master has a replica");
        self.index_of(port)
    }

    /// Waits until the replica at `replica` has everything its master at
    /// `master` wrote so far (its replication offset reached the master's).
    pub fn wait_replicated(&self, master: usize, replica: usize) {
        let offset = |port: u16, line: usize| -> u64 {
            self.cli(port, &["ROLE"])
                .lines()
                .nth(line)
                .and_then(|l| l.trim().parse().ok())
                .unwrap_or(0)
        };
        let target = offset(self.nodes[master].port, 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while offset(self.nodes[replica].port, 4) < target {
            assert!(Instant::now() < deadline, "the replica never caught up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Makes the replica at `replica` take over its master's slots at once
    /// (`CLUSTER FAILOVER TAKEOVER`: no agreement of the master or the
    /// others asked), and waits until the cluster names it and is ok.
    pub fn take_over(&self, replica: usize) {
        let port = self.nodes[replica].port;
        let reply = self.cli(port, &["CLUSTER", "FAILOVER", "TAKEOVER"]);
        // Refused only if the replica was elected on its own meanwhile.
        assert!(
            reply.trim() == "OK" || self.cli(port, &["ROLE"]).starts_with("master"),
            "CLUSTER FAILOVER TAKEOVER: {reply}"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .view()
            .into_iter()
            .any(|n| n.port == port && n.master && !n.slots.is_empty())
        {
            assert!(Instant::now() < deadline, "port {port} never took over");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.wait_ok(Duration::from_secs(30));
    }

    /// Moves `slot` with its keys from the master at `from` to the master
    /// at `to`, the way `redis-cli --cluster reshard` does.
    pub fn move_slot(&self, slot: u16, from: usize, to: usize) {
        let (source, target) = (self.nodes[from].port, self.nodes[to].port);
        let id = |port: u16| self.cli(port, &["CLUSTER", "MYID"]).trim().to_owned();
        let (source_id, target_id) = (id(source), id(target));
        let slot = slot.to_string();
        let ok = |reply: String, what: &str| assert!(reply.trim() == "OK", "{what}: {reply}");
        ok(
            self.cli(
                target,
                &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id],
            ),
            "IMPORTING",
        );
        ok(
            self.cli(
                source,
                &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id],
            ),
            "MIGRATING",
        );
        loop {
            let keys = self.cli(source, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let target_port = target.to_string();
            let mut args = vec![
                "MIGRATE",
                "127.0.0.1",
                &target_port,
                "",
                "0",
                "5000",
                "KEYS",
            ];
            args.extend(keys.iter().copied());
            let reply = self.cli(source, &args);
            assert!(
                reply.trim() == "OK" || reply.trim() == "NOKEY",
                "MIGRATE: {reply}"
            );
        }
        ok(
            self.cli(target, &["CLUSTER", "SETSLOT", &slot, "NODE", &target_id]),
            "SETSLOT NODE on the target",
        );
        ok(
            self.cli(source, &["CLUSTER", "SETSLOT", &slot, "NODE", &target_id]),
            "SETSLOT NODE on the source",
        );
        for node in &self.nodes {
            if node.port != source && node.port != target && node.child.is_some() {
                let _ = self.cli(
                    node.port,
                    &["CLUSTER", "SETSLOT", &slot, "NODE", &target_id],
                );
            }
        }
        self.wait_ok(Duration::from_secs(30));
    }
}

/// Parses `CLUSTER NODES`.
pub fn parse_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let port = fields[1].split(['@', ':']).nth(1)?.parse().ok()?;
            let flags = fields[2];
            let slots = fields[8..]
                .iter()
                .filter(|f| !f.starts_with('['))
                .filter_map(|range| match range.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => range.parse().ok().map(|s| (s, s)),
                })
                .collect();
            Some(ClusterNode {
                id: fields[0].to_owned(),
                port,
                master: flags.contains("master"),
                failed: flags.contains("fail") || flags.contains("noaddr"),
                slots,
            })
        })
        .collect()
}
