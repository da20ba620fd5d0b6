//! The deployment recipes of examples/deploy, each exercised as far as this
//! machine allows: nginx in front of two real nodes on one real Redis, and
//! the docker-compose, Kubernetes and systemd files checked against the
//! real binary's `check-config` and the tools that read them.

mod compose;
mod kubernetes;
mod nginx;
mod systemd;

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common;

/// examples/deploy in this checkout.
fn recipe(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/deploy")
        .join(path)
}

fn read_recipe(path: &str) -> String {
    std::fs::read_to_string(recipe(path))
        .unwrap_or_else(|err| panic!("examples/deploy/{path}: {err}"))
}

/// `text` with `from` replaced by `to`, failing when `from` is not there:
/// a recipe that changes shape must fail its test, not pass it untested.
fn substitute(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the recipe no longer has {from:?}");
    text.replace(from, to)
}

/// Runs `pushgate check-config` on `config` (a YAML file's text) with
/// `env` laid over it, in an environment without any other PUSHGATE_*
/// variable; panics with its output unless it exits 0.
fn check_config(scratch: &Path, name: &str, config: &str, env: &[(String, String)]) {
    let path = scratch.join(name);
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_pushgate"));
    command.arg("check-config").arg(&path);
    for (key, _) in std::env::vars() {
        if key.starts_with("PUSHGATE_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    let out = command.output().expect("pushgate runs");
    assert!(
        out.status.success(),
        "check-config refused {name} with {env:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A scratch directory for one test.
fn scratch(name: &str) -> common::TempDir {
    common::TempDir::new(name)
}

/// A duration as the recipes write it (`10s`, `1m`, `30`), in seconds.
fn seconds(text: &str) -> u64 {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |at| text.split_at(at));
    let number: u64 = number
        .parse()
        .unwrap_or_else(|_| panic!("a duration: {text:?}"));
    match unit.trim() {
        "" | "s" => number,
        "m" | "min" => number * 60,
        other => panic!("a duration unit the recipes do not use: {other:?} in {text:?}"),
    }
}

/// The `ENV` the repository's Dockerfile gives the image: what a container
/// of it starts with, beside what compose or Kubernetes add.
fn image_env() -> Vec<(String, String)> {
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
            .expect("the Dockerfile");
    let mut env = Vec::new();
    let mut lines = dockerfile.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("ENV ") else {
            continue;
        };
        let mut text = rest.to_owned();
        while text.trim_end().ends_with('\\') {
            text = text.trim_end().trim_end_matches('\\').to_owned();
            text.push(' ');
            text.push_str(lines.next().expect("a continued ENV line"));
        }
        for pair in text.split_whitespace() {
            let (key, value) = pair.split_once('=').expect("ENV KEY=value");
            env.push((key.to_owned(), value.to_owned()));
        }
    }
    assert!(!env.is_empty(), "the Dockerfile sets ENV");
    env
}
