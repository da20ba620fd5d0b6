//! pushgate checked with clients it did not write: the Python `websockets`
//! library and `httpx` with `httpx-sse`, run by
//! `integration/third_party_clients.py` against the real binary.
//!
//! The clients live in the virtualenv `common::pyenv` builds under the
//! target directory from the pinned `integration/requirements.txt`. Building
//! it needs `python3` with `venv` and `ensurepip` (Debian: the `python3-venv`
//! package) and PyPI; without them the test fails and says so.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::pyenv::{python, run};
use common::{Process, TempDir, API_KEY};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/integration/third_party_clients.py"
);
/// The script bounds itself at 90 s; this is the backstop.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// The WebSocket and SSE transports, WebSocket compression
/// (permessage-deflate, which `websockets` negotiates), the publish API and
/// the Origin check, through third-party Python clients against the real
/// binary.
#[test]
fn python_websockets_and_httpx_sse_clients() {
    let scratch = TempDir::new("third-party");
    let python = python(&scratch.0);

    let config = "listen: 127.0.0.1:0\nupstream:\n  url: http://127.0.0.1:9\n";
    let pushgate = Process::start(&scratch.0, config, &[]);

    let ran = run(
        Command::new(&python)
            .arg(SCRIPT)
            .args(["--public", &pushgate.addr.to_string()])
            .args(["--api", &pushgate.api_addr.to_string()])
            .args(["--key", API_KEY])
            .env("PYTHONUNBUFFERED", "1"),
        &scratch.0,
        SCRIPT_TIMEOUT,
    )
    .expect("run the third-party client check");
    if !ran.ok() {
        let logs: Vec<String> = pushgate.logs.try_iter().collect();
        panic!(
            "integration/third_party_clients.py ended {}\npushgate's log:\n{}",
            ran.describe(SCRIPT_TIMEOUT),
            logs.join("\n")
        );
    }
    println!("{}", ran.output);
}
