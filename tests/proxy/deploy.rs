//! The deployment recipes of examples/deploy, each exercised as far as this
//! machine allows: nginx in front of two real nodes on one real Redis.

mod nginx;

use std::path::{Path, PathBuf};

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
