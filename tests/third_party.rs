//! pushgate checked with clients it did not write: the Python `websockets`
//! library and `httpx` with `httpx-sse`, run by
//! `integration/third_party_clients.py` against the real binary.
//!
//! The clients live in a virtualenv under the target directory
//! (`target/pyenv`), built with `python3 -m venv` from the pinned
//! `integration/requirements.txt` and reused while that file is unchanged.
//! Building it needs `python3` with `venv` and `ensurepip` (Debian: the
//! `python3-venv` package) and PyPI; without them the test fails and says so.

mod common;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{Process, TempDir, API_KEY};

/// The pinned packages; the virtualenv keeps a copy and is rebuilt when it
/// differs.
const REQUIREMENTS: &str = include_str!("../integration/requirements.txt");
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/integration/third_party_clients.py"
);
/// Where the virtualenv keeps its copy of the requirements it was built from.
const STAMP: &str = "pushgate-requirements.txt";

const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
const VENV_TIMEOUT: Duration = Duration::from_secs(120);
const PIP_TIMEOUT: Duration = Duration::from_secs(300);
/// The script bounds itself at 90 s; this is the backstop.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// How a child process ended, and everything it printed.
struct Ran {
    /// `None`: killed at the timeout.
    status: Option<ExitStatus>,
    output: String,
}

impl Ran {
    fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    fn describe(&self, timeout: Duration) -> String {
        let ending = match self.status {
            Some(status) => format!("{status}"),
            None => format!("killed after {timeout:?}"),
        };
        format!("{ending}; its output:\n{}", self.output)
    }
}

/// Runs `command` with no input, its stdout and stderr together in a file
/// under `scratch` (so no pipe can fill and stall it), killed at `timeout`.
fn run(command: &mut Command, scratch: &Path, timeout: Duration) -> io::Result<Ran> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = scratch.join(format!("output-{n}.txt"));
    let file = fs::File::create(&log)?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = String::from_utf8_lossy(&fs::read(&log)?).into_owned();
    Ok(Ran { status, output })
}

/// The cargo target directory: `CARGO_TARGET_TMPDIR` is its `tmp/`.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside the target directory")
        .to_path_buf()
}

/// Whether `dir` is a virtualenv built from [`REQUIREMENTS`] that still works.
fn usable(dir: &Path, scratch: &Path) -> bool {
    let built_from = fs::read_to_string(dir.join(STAMP)).ok();
    built_from.as_deref() == Some(REQUIREMENTS)
        && run(
            Command::new(dir.join("bin/python"))
                .args(["-c", "import websockets, httpx, httpx_sse"]),
            scratch,
            PROBE_TIMEOUT,
        )
        .is_ok_and(|ran| ran.ok())
}

/// The virtualenv's python, after building the virtualenv if need be.
fn python(scratch: &Path) -> PathBuf {
    let target = target_dir();
    let dir = target.join("pyenv");
    if usable(&dir, scratch) {
        return dir.join("bin/python");
    }

    // Say plainly what is missing rather than let `venv` fail half-way.
    let fix = "install Python's venv module: on Debian or Ubuntu \
               `apt-get install python3-venv` (a python.org or pyenv CPython has it built in)";
    match run(
        Command::new("python3").args(["-c", "import venv, ensurepip"]),
        scratch,
        PROBE_TIMEOUT,
    ) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => panic!(
            "the third-party client check needs python3 to build its virtualenv, \
             and there is no python3 on PATH: on Debian or Ubuntu \
             `apt-get install python3 python3-venv`"
        ),
        Err(err) => panic!("could not run python3: {err}"),
        Ok(ran) if !ran.ok() => panic!(
            "the third-party client check needs `python3 -m venv`, and this python3 \
             cannot create virtualenvs: {fix}. The probe `python3 -c 'import venv, ensurepip'` \
             ended {}",
            ran.describe(PROBE_TIMEOUT)
        ),
        Ok(_) => {}
    }

    // Built beside the final place and renamed into it, so a run that is
    // interrupted, or one running at the same time, never sees half of it.
    let building = target.join(format!("pyenv.building-{}", std::process::id()));
    let _ = fs::remove_dir_all(&building);
    let ran = run(
        Command::new("python3").arg("-m").arg("venv").arg(&building),
        scratch,
        VENV_TIMEOUT,
    )
    .expect("run python3 -m venv");
    if !ran.ok() {
        let _ = fs::remove_dir_all(&building);
    }
    assert!(
        ran.ok(),
        "`python3 -m venv {}` failed ({fix}): {}",
        building.display(),
        ran.describe(VENV_TIMEOUT)
    );
    let requirements = concat!(env!("CARGO_MANIFEST_DIR"), "/integration/requirements.txt");
    let ran = run(
        Command::new(building.join("bin/python"))
            .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
            .args(["--no-input", "-r", requirements]),
        scratch,
        PIP_TIMEOUT,
    )
    .expect("run pip");
    if !ran.ok() {
        let _ = fs::remove_dir_all(&building);
        panic!(
            "pip could not install {requirements} (is PyPI reachable?): {}",
            ran.describe(PIP_TIMEOUT)
        );
    }
    fs::write(building.join(STAMP), REQUIREMENTS).expect("write the virtualenv's stamp");

    if usable(&dir, scratch) {
        // Another run finished one meanwhile: keep that, drop this.
        let _ = fs::remove_dir_all(&building);
        return dir.join("bin/python");
    }
    let _ = fs::remove_dir_all(&dir);
    if fs::rename(&building, &dir).is_err() {
        // Another run put its own there first; use that one.
        let _ = fs::remove_dir_all(&building);
        assert!(
            usable(&dir, scratch),
            "could not move the virtualenv into {}",
            dir.display()
        );
    }
    dir.join("bin/python")
}

/// The WebSocket and SSE transports, the publish API and the Origin check,
/// through third-party Python clients against the real binary.
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
