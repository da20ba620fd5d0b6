//! examples/deploy/docker-compose, without docker: compose.yaml parses with
//! the expected services, everything it mounts or builds from exists, the
//! nodes' config passes `check-config` with the environment the image and
//! compose.yaml give it, and nginx.conf is the nginx recipe's.

use std::collections::BTreeSet;
use std::path::Path;

use serde_yaml::Value;

use super::{check_config, image_env, read_recipe, recipe, scratch};

/// `${NAME:?message}` and `${NAME}` as compose fills them in, from `vars`.
fn interpolate(text: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("a closed ${...}") + start;
        let inner = &rest[start + 2..end];
        let name = inner.split([':', '-', '?']).next().unwrap();
        let value = vars
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("compose.yaml uses ${{{name}}}, which the test does not set"))
            .1;
        out.push_str(value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn environment(service: &Value, vars: &[(&str, &str)]) -> Vec<(String, String)> {
    match &service["environment"] {
        Value::Mapping(map) => map
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
                };
                (k.as_str().unwrap().to_owned(), interpolate(&value, vars))
            })
            .collect(),
        Value::Null => Vec::new(),
        other => panic!("environment as a mapping, not {other:?}"),
    }
}

/// An upstream's `server ADDRESS ...;` line (not a `server {` block).
fn is_upstream_server(line: &str) -> bool {
    let line = line.trim();
    line.starts_with("server ") && line.ends_with(';')
}

#[test]
fn the_compose_file_has_the_stack_and_everything_it_mounts() {
    let compose: Value =
        serde_yaml::from_str(&read_recipe("docker-compose/compose.yaml")).expect("valid YAML");
    let dir = recipe("docker-compose");
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["app", "redis", "pushgate-a", "pushgate-b", "nginx"])
    );

    // Every bind mount's source is in the repository.
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let volume = volume.as_str().expect("short volume syntax");
            let source = volume.split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(
                    dir.join(source).exists(),
                    "{name:?} mounts {source}, which does not exist"
                );
            }
        }
    }

    let vars = [
        ("REALTIME_API_KEY", "a-long-random-key"),
        ("SECRET_KEY", "a-long-random-secret"),
    ];
    let scratch = scratch("compose");
    for node in ["pushgate-a", "pushgate-b"] {
        let service = &compose["services"][node];
        // Built from the repository's Dockerfile.
        let build = &service["build"];
        let context = dir.join(build["context"].as_str().expect("build.context"));
        let dockerfile = build["dockerfile"].as_str().unwrap_or("Dockerfile");
        assert_eq!(
            context.join(dockerfile).canonicalize().unwrap(),
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("Dockerfile")
                .canonicalize()
                .unwrap(),
            "{node} builds the repository's Dockerfile"
        );
        // The config it mounts where the image reads it passes check-config
        // with the image's environment and the service's.
        let mount = service["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|v| v.split(':').nth(1) == Some("/etc/pushgate/pushgate.yaml"))
            .unwrap_or_else(|| panic!("{node} mounts a config at /etc/pushgate/pushgate.yaml"));
        let config = std::fs::read_to_string(dir.join(mount.split(':').next().unwrap())).unwrap();
        let mut env = image_env();
        env.extend(environment(service, &vars));
        check_config(&scratch.0, &format!("{node}.yaml"), &config, &env);

        // Compose waits out the drain before it kills.
        let grace: Value = serde_yaml::from_str(&config).unwrap();
        let grace = super::seconds(grace["shutdown"]["grace"].as_str().unwrap_or("10s"));
        let stop = super::seconds(
            service["stop_grace_period"]
                .as_str()
                .expect("stop_grace_period"),
        );
        assert!(
            stop > grace,
            "{node}: stop_grace_period {stop}s > shutdown.grace {grace}s"
        );
    }

    // The app publishes to a node's API, with the key the nodes accept.
    let app = environment(&compose["services"]["app"], &vars);
    let api_url = &app.iter().find(|(k, _)| k == "REALTIME_API_URL").unwrap().1;
    assert!(api_url.starts_with("http://pushgate-"), "{api_url}");

    // nginx: the nginx recipe's config, with the nodes' compose addresses.
    let ours = read_recipe("docker-compose/nginx.conf");
    let theirs = read_recipe("nginx/nginx.conf");
    let body = |text: &str| -> String {
        let start = text.find("worker_processes").expect("a whole nginx.conf");
        text[start..]
            .lines()
            .filter(|line| !is_upstream_server(line))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        body(&ours),
        body(&theirs),
        "docker-compose/nginx.conf is nginx/nginx.conf but for the upstream servers"
    );
    let servers: Vec<&str> = ours
        .lines()
        .filter(|line| is_upstream_server(line))
        .filter_map(|line| line.trim_start().strip_prefix("server "))
        .map(|rest| rest.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(servers, ["pushgate-a:8080", "pushgate-b:8080"]);
    let listen = image_env()
        .into_iter()
        .find(|(k, _)| k == "PUSHGATE_LISTEN")
        .expect("the image sets PUSHGATE_LISTEN")
        .1;
    assert!(
        listen.ends_with(":8080"),
        "the nodes listen where nginx sends: {listen}"
    );
}
