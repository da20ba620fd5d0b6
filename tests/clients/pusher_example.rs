//! The example app examples/pusher-chat, end to end: the real Flask app,
//! written for Pusher Channels with Pusher's own libraries (the Python server
//! SDK, pusher-js in the page), behind the real pushgate binary run with the
//! example's own `pushgate.yaml`, used by two headless Chromium pages through
//! pushgate only. `integration/pusher/pusher_chat.mjs` drives the pages
//! (presence, a lobby message and a direct message through the app's
//! trigger, a refused private channel, the webhooks the app kept); this test
//! starts everything and reads the app's log for the webhooks it verified.
//!
//! Flask and the SDK come from the virtualenv `common::pyenv` builds from
//! `integration/requirements.txt`; pusher-js, playwright-core from
//! integration/browser; Chromium is Debian's (see `browser.rs`).

use crate::browser::{ensure_chromium, CHROMIUM, ONE_BROWSER};
use crate::common;
use crate::example_app::{assert_pins_installed, start_example, Example};

use std::path::Path;
use std::time::{Duration, Instant};

use common::node::{node, node_modules, ROOT};
use common::pyenv::{python, run};
use common::TempDir;

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/pusher-chat/app.py");
const CONFIG: &str = include_str!("../../examples/pusher-chat/pushgate.yaml");
const REQUIREMENTS: &str = include_str!("../../examples/pusher-chat/requirements.txt");
const README: &str = include_str!("../../examples/pusher-chat/README.md");
const PACKAGE_JSON: &str = include_str!("../../integration/browser/package.json");

/// The app's secret, which pushgate reads from the same variable
/// (`secret_env: PUSHER_SECRET` in the example's config).
const SECRET: &str = "pusher-chat-test-secret";
/// pusher_chat.mjs bounds itself at 120 s; this is the backstop.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a webhook may take to reach the app once its cause happened.
const WEBHOOK_PATIENCE: Duration = Duration::from_secs(10);

/// The example as its README runs it: pushgate with `pushgate.yaml`, the app
/// told where pushgate's two listeners are, two browsers chatting.
#[test]
fn pusher_chat_in_chromium_through_pushgate() {
    let _one = ONE_BROWSER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let scratch = TempDir::new("pusher-chat");
    ensure_chromium(&scratch.0);
    let modules = node_modules(&scratch.0);
    let python = python(&scratch.0);

    let example = Example {
        app: APP,
        title: "pusher chat",
        config: CONFIG,
        pushgate_env: &[
            // The config leaves auth.mode at its default, as the README runs it.
            ("PUSHGATE_AUTH__MODE", "upstream"),
            ("PUSHER_SECRET", SECRET),
        ],
    };
    let pusher_js = modules.join("pusher-js/dist/web/pusher.min.js");
    let (app, pushgate) = start_example(&python, &scratch.0, &example, |pushgate| {
        [
            ("PUSHER_SECRET", SECRET.to_owned()),
            ("PUSHER_HOST", pushgate.api_addr.ip().to_string()),
            ("PUSHER_PORT", pushgate.api_addr.port().to_string()),
            ("PUSHER_WS_HOST", pushgate.addr.ip().to_string()),
            ("PUSHER_WS_PORT", pushgate.addr.port().to_string()),
            ("PUSHER_JS", pusher_js.display().to_string()),
            ("SECRET_KEY", "pusher-chat-test-cookies".to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    });

    let ran = run(
        node(&scratch.0)
            .arg(Path::new(ROOT).join("integration/pusher/pusher_chat.mjs"))
            .args(["--gate", &pushgate.addr.to_string()])
            .args(["--chromium", CHROMIUM]),
        &scratch.0,
        SCRIPT_TIMEOUT,
    )
    .expect("run node");
    // With the browser gone the lobby is empty: the last webhook of the
    // scenario is its channel_vacated.
    let vacated = r#"webhook verified: {"channel": "presence-lobby", "name": "channel_vacated"}"#;
    let deadline = Instant::now() + WEBHOOK_PATIENCE;
    while ran.ok() && !app.log().contains(vacated) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let app_log = app.log();
    let failed = |what: &str| -> ! {
        let logs: Vec<String> = pushgate.logs.try_iter().collect();
        panic!(
            "{what}\nintegration/pusher/pusher_chat.mjs ended {}\nthe app's log:\n{app_log}\npushgate's log:\n{}",
            ran.describe(SCRIPT_TIMEOUT),
            logs.join("\n")
        );
    };
    if !ran.ok() {
        failed("the pages did not see what they should");
    }

    // The app's own account of the webhooks: the SDK verified each of these.
    let mut expected = vec![vacated.to_owned()];
    for user in ["ann", "bob"] {
        for name in ["member_added", "member_removed"] {
            expected.push(format!(
                r#"webhook verified: {{"channel": "presence-lobby", "name": "{name}", "user_id": "{user}"}}"#
            ));
        }
    }
    for line in expected {
        if !app_log.contains(&line) {
            failed(&format!("the app's log has no `{line}`"));
        }
    }
    if !app_log.contains("webhook refused") {
        failed("the app did not log the forged webhook it refused");
    }
    println!("{}", ran.output);
}

/// The example's requirements are the ones the test installs.
#[test]
fn the_pusher_example_pins_what_the_test_installs() {
    assert_pins_installed("examples/pusher-chat/requirements.txt", REQUIREMENTS);
}

/// The README's pusher-js is the one the test serves the page.
#[test]
fn the_pusher_example_readme_names_the_tested_pusher_js() {
    let package: serde_json::Value = serde_json::from_str(PACKAGE_JSON).unwrap();
    let version = package["devDependencies"]["pusher-js"]
        .as_str()
        .expect("integration/browser/package.json pins pusher-js");
    let named = format!("pusher-js@{version}");
    assert!(
        README.contains(&named),
        "examples/pusher-chat/README.md should name {named}, the pusher-js the test runs"
    );
}
