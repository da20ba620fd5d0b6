//! Node.js for the tests of the browser client: `node` itself, and the npm
//! packages of `integration/browser` (playwright-core to drive Chromium,
//! terser to measure the minified client, Pusher's libraries for the Pusher
//! compatibility checks), installed with `npm ci` from the
//! committed lock file when missing or out of date.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use super::pyenv::run;

/// The npm project the browser tests and the size check run from.
pub const BROWSER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/integration/browser");
/// The repository's root.
pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Written into `node_modules` after a successful `npm ci`: the lock file it
/// installed, so a changed lock file installs again.
const STAMP: &str = ".pushgate-lock.json";
const NPM_TIMEOUT: Duration = Duration::from_secs(600);
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// `node`, after checking that it runs (Node 20 or newer: the live client
/// tests need `--experimental-websocket`).
pub fn node(scratch: &Path) -> Command {
    let ran = run(
        Command::new("node").arg("--version"),
        scratch,
        PROBE_TIMEOUT,
    )
    .unwrap_or_else(|err| panic!("these tests need Node.js 20 or newer on PATH (`node`): {err}"));
    let version = ran.output.trim().trim_start_matches('v').to_owned();
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        ran.ok() && major >= 20,
        "these tests need Node.js 20 or newer; `node --version` said {version:?}"
    );
    Command::new("node")
}

/// `integration/browser/node_modules`, installed with `npm ci` when it is
/// missing or was installed from another lock file.
pub fn node_modules(scratch: &Path) -> PathBuf {
    // Tests of one binary run in parallel; one of them installs.
    static INSTALL: Mutex<()> = Mutex::new(());
    let _guard = INSTALL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = Path::new(BROWSER_DIR);
    let modules = dir.join("node_modules");
    let lock = fs::read_to_string(dir.join("package-lock.json"))
        .expect("integration/browser/package-lock.json");
    let installed = fs::read_to_string(modules.join(STAMP)).ok();
    let complete = [
        "playwright-core/package.json",
        "terser/package.json",
        "pusher-js/package.json",
        "pusher/package.json",
        "laravel-echo/package.json",
    ]
    .iter()
    .all(|file| modules.join(file).is_file());
    if installed.as_deref() == Some(lock.as_str()) && complete {
        return modules;
    }
    let ran = run(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(dir),
        scratch,
        NPM_TIMEOUT,
    )
    .unwrap_or_else(|err| panic!("these tests need npm on PATH: {err}"));
    assert!(
        ran.ok(),
        "`npm ci` in integration/browser failed (is the npm registry reachable?): {}",
        ran.describe(NPM_TIMEOUT)
    );
    fs::write(modules.join(STAMP), lock).expect("write the node_modules stamp");
    modules
}
