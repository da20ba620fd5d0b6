//! examples/deploy/systemd: the unit's keys, `systemd-analyze verify` on it
//! (with ExecStart pointed at the built binary, which verify wants to
//! exist), and `check-config` on the config it runs.

use std::process::Command;

use super::{check_config, read_recipe, scratch, seconds, substitute};

/// `key=value` lines of the unit, in order, with their section.
fn entries(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut found = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line.split_once('=').expect("key=value");
        found.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    found
}

#[test]
fn the_unit_is_sandboxed_reloads_on_hup_and_outwaits_the_drain() {
    let unit = read_recipe("systemd/pushgate.service");
    let entries = entries(&unit);
    let service = |key: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(section, k, _)| section == "Service" && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> &str {
        let values = service(key);
        assert_eq!(values.len(), 1, "[Service] {key}= once: {values:?}");
        values[0]
    };
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    let nofile: u64 = one("LimitNOFILE").parse().expect("LimitNOFILE is a number");
    assert!(nofile >= 65536, "room for connections: {nofile}");
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
    ] {
        assert_eq!(one(key), value, "[Service] {key}");
    }
    assert!(
        service("DynamicUser") == ["yes"] || !service("User").is_empty(),
        "an unprivileged user"
    );
    let command = one("ExecStart");
    let config_path = command
        .strip_prefix("/usr/local/bin/pushgate --config ")
        .expect("ExecStart runs pushgate --config FILE");
    assert_eq!(config_path, "/etc/pushgate/pushgate.yaml");

    // The config beside the unit is valid (its secret comes from the
    // EnvironmentFile), and the unit waits out its drain.
    let config = read_recipe("systemd/pushgate.yaml");
    let dir = scratch("systemd");
    check_config(
        &dir.0,
        "pushgate.yaml",
        &config,
        &[(
            "PUSHGATE_API__KEYS".into(),
            "a-key-from-the-env-file".into(),
        )],
    );
    let yaml: serde_yaml::Value = serde_yaml::from_str(&config).unwrap();
    let grace = seconds(yaml["shutdown"]["grace"].as_str().expect("shutdown.grace"));
    let stop = seconds(one("TimeoutStopSec"));
    assert!(
        stop > grace,
        "TimeoutStopSec {stop}s > shutdown.grace {grace}s"
    );

    // systemd's own reading of the unit, where systemd-analyze exists.
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("no systemd-analyze here: the unit's keys were checked, not verified");
        return;
    };
    assert!(version.status.success());
    let unit = substitute(
        &unit,
        "/usr/local/bin/pushgate",
        env!("CARGO_BIN_EXE_pushgate"),
    );
    let path = dir.0.join("pushgate.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // An unknown key or a bad value is only a warning to verify (exit 0):
    // anything it says about the unit fails the test.
    assert!(
        out.status.success() && !said.contains("pushgate.service"),
        "systemd-analyze verify: {said}"
    );
}
