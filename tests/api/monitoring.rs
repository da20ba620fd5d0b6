//! The Grafana dashboard and the Prometheus alert rules in
//! examples/monitoring use only metrics pushgate exposes: each name in
//! their expressions is a family of a real scrape, taken from a node with
//! every part that has metrics of its own (the Redis engine, connection
//! events, Pusher webhooks).

use crate::common;

use std::collections::BTreeSet;

use common::redis::Redis;
use common::{get, Pushgate};
use http::StatusCode;

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/monitoring/grafana-dashboard.json"
);
const ALERTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/monitoring/alerts.yaml"
);

/// Every `pushgate_…` name in `expr`.
fn names(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("pushgate_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        found.push(name);
    }
    found
}

/// The expressions of the dashboard's panels and of the alert rules.
fn expressions() -> Vec<(String, String)> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("a title").to_owned();
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push((title.clone(), target["expr"].as_str().unwrap().to_owned()));
        }
    }
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(ALERTS).unwrap()).unwrap();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let alert = rule["alert"].as_str().expect("an alert name").to_owned();
            assert!(rule["for"].is_string(), "{alert} has no `for`");
            assert!(
                rule["labels"]["severity"].is_string(),
                "{alert} has no severity"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{alert} has no summary"
            );
            exprs.push((alert, rule["expr"].as_str().expect("an expr").to_owned()));
        }
    }
    exprs
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_use_is_exposed() {
    let redis = Redis::start();
    let gate = Pushgate::start(
        "http://127.0.0.1:9",
        &format!(
            "engine: {{kind: redis, redis: {{url: '{}'}}}}
events: {{path: /events, secret: '0123456789abcdef0123456789abcdef'}}
pusher:
  apps:
    - {{id: '1', key: k, secret: s1234567, webhook: {{url: /pusher/webhook}}}}
",
            redis.url()
        ),
    )
    .await;
    let (status, scrape) = get(&format!("http://{}/metrics", gate.api_addr)).await;
    assert_eq!(status, StatusCode::OK);
    let families: BTreeSet<&str> = scrape
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    let exposed = |name: &str| {
        families.contains(name)
            || ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| {
                    name.strip_suffix(suffix)
                        .is_some_and(|f| families.contains(f))
                })
    };
    let exprs = expressions();
    assert!(exprs.len() >= 20, "{exprs:?}");
    let mut used = 0;
    for (owner, expr) in &exprs {
        for name in names(expr) {
            used += 1;
            assert!(
                exposed(&name),
                "{owner}: `{name}` is not in a scrape:\n{scrape}"
            );
        }
    }
    assert!(used >= 20);
}
