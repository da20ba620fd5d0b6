//! `pushgate demo` in a real browser: headless Chromium driven by
//! playwright-core from `integration/browser/run.mjs`, one scenario per test
//! (see that file). The script starts the demo binary itself; these tests
//! provide Chromium, the npm packages, Redis where needed, and a bound on
//! everything, and keep each scenario's screenshot under
//! `target/browser-artifacts/`.
//!
//! Chromium is Debian's `chromium` package, installed here with apt-get when
//! `/usr/bin/chromium` is missing (as root); the npm packages are installed
//! with `npm ci` from integration/browser/package-lock.json when missing.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::node::{node, node_modules, BROWSER_DIR};
use common::redis::Redis;
use common::TempDir;

pub(crate) const CHROMIUM: &str = "/usr/bin/chromium";
/// run.mjs bounds itself at 170 s; this is the backstop.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(240);
const APT_TIMEOUT: Duration = Duration::from_secs(900);

/// One Chromium at a time: the scenarios measure delivery, not a machine
/// under three browsers.
pub(crate) static ONE_BROWSER: Mutex<()> = Mutex::new(());

#[test]
fn demo_over_websocket_with_login_publishes_and_offline() {
    scenario("websocket", None);
}

#[test]
fn falls_back_to_sse_then_long_poll_without_losing_a_message() {
    scenario("fallback", None);
}

#[test]
fn resumes_without_loss_across_a_restart_on_redis() {
    let redis = Redis::start();
    scenario("restart-redis", Some(&redis.url()));
}

#[test]
fn shows_the_reset_across_a_restart_on_memory() {
    scenario("restart-memory", None);
}

#[test]
fn pages_call_the_app_and_publish_who_is_typing() {
    scenario("two-way", None);
}

#[test]
fn a_page_negotiates_websocket_compression() {
    scenario("compression", None);
}

fn scenario(name: &str, redis: Option<&str>) {
    let _one = ONE_BROWSER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let scratch = TempDir::new(&format!("browser-{name}"));
    ensure_chromium(&scratch.0);
    node_modules(&scratch.0);
    let artifacts = artifacts_dir();
    let screenshot = artifacts.join(format!("demo-{name}.png"));
    let _ = fs::remove_file(&screenshot);

    let mut command = node(&scratch.0);
    command
        .current_dir(BROWSER_DIR)
        .arg("run.mjs")
        .args(["--scenario", name])
        .args(["--pushgate", env!("CARGO_BIN_EXE_pushgate")])
        .arg("--artifacts")
        .arg(&artifacts)
        .args(["--chromium", CHROMIUM]);
    if let Some(url) = redis {
        command.args(["--redis", url]);
    }
    let log = scratch.0.join("run.log");
    let (ended, output) = Group::spawn(&mut command, &log).wait(SCENARIO_TIMEOUT);
    assert!(
        ended.is_some_and(|status| status.success()),
        "integration/browser/run.mjs --scenario {name} ended {}; its output:\n{output}",
        ended.map_or_else(
            || format!("killed after {SCENARIO_TIMEOUT:?}"),
            |s| s.to_string()
        ),
    );
    let png = fs::read(&screenshot).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
        "a screenshot at {}",
        screenshot.display()
    );
    println!("{output}");
}

/// `target/browser-artifacts`, kept after the run.
fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside the target directory")
        .join("browser-artifacts");
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Installs Debian's `chromium` when it is missing, with the same guard as
/// .ci/run: no service may start during the install.
pub(crate) fn ensure_chromium(scratch: &Path) {
    if Path::new(CHROMIUM).exists() {
        return;
    }
    let fix = "install it: `apt-get install chromium` (as root, on Debian)";
    let guard = Path::new("/usr/sbin/policy-rc.d");
    let placed = !guard.exists() && fs::write(guard, "#!/bin/sh\nexit 101\n").is_ok();
    if placed {
        let _ = Command::new("chmod").arg("+x").arg(guard).status();
    }
    let apt = |args: &[&str]| {
        common::pyenv::run(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            scratch,
            APT_TIMEOUT,
        )
    };
    let updated = apt(&["update", "-qq"]);
    let installed = apt(&["install", "-y", "-qq", "chromium"]);
    if placed {
        let _ = fs::remove_file(guard);
    }
    match (updated, installed) {
        (Ok(_), Ok(ran)) if ran.ok() && Path::new(CHROMIUM).exists() => {}
        (Ok(_), Ok(ran)) => panic!(
            "{CHROMIUM} is missing and apt-get could not install it ({fix}): {}",
            ran.describe(APT_TIMEOUT)
        ),
        (Err(err), _) | (_, Err(err)) => {
            panic!("{CHROMIUM} is missing and apt-get could not run ({fix}): {err}")
        }
    }
}

/// A child in a process group of its own (node, and the pushgate processes
/// it starts), killed as a whole on drop.
struct Group {
    child: Child,
    log: PathBuf,
    killed: bool,
}

impl Group {
    fn spawn(command: &mut Command, log: &Path) -> Group {
        use std::os::unix::process::CommandExt;
        let file = fs::File::create(log).unwrap();
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start node");
        Group {
            child,
            log: log.to_owned(),
            killed: false,
        }
    }

    /// Waits up to `timeout` for the child to end; its status (`None`: it
    /// was killed at the timeout) and its output.
    fn wait(mut self, timeout: Duration) -> (Option<std::process::ExitStatus>, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Whatever it left running goes with it.
        self.kill();
        let output = fs::read_to_string(&self.log).unwrap_or_default();
        (status, output)
    }

    fn kill(&mut self) {
        if std::mem::replace(&mut self.killed, true) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}
