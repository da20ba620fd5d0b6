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
    /// held is lost.
    pub fn restart_empty(&mut self) {
        self.kill();
        for entry in std::fs::read_dir(&self.dir.0).unwrap().flatten() {
            if entry.file_name() == "redis.log" {
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

/// A Redis Cluster of `n` masters (no replicas), each a real redis-server
/// on ephemeral ports; stopped on drop.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        let nodes: Vec<Redis> = (0..n)
            .map(|_| {
                let bus = free_port().to_string();
                Redis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Every node must see the whole cluster before it serves.
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &node.port.to_string(), "CLUSTER", "INFO"])
                    .output()
                    .expect("redis-cli runs");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster never became ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    /// A seed URL: the first node.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }
}
