//! examples/deploy/kubernetes: each manifest file parses (all its
//! documents), and each pushgate container in it has probes on the API
//! port at /healthz and /readyz, a termination grace longer than its
//! preStop pause and the config's shutdown.grace, resources, its keys from
//! a Secret of the same file, and a config (from a ConfigMap of the same
//! file) that passes `check-config` with the environment it is given.

use serde::Deserialize;
use serde_yaml::Value;

use super::{check_config, image_env, read_recipe, scratch, seconds};

/// Every document of a manifest file, empty ones skipped.
fn documents(file: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&read_recipe(file))
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|err| panic!("{file}: {err}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name:?} in the file"))
}

fn kinds(docs: &[Value]) -> Vec<&str> {
    docs.iter()
        .map(|d| d["kind"].as_str().expect("kind"))
        .collect()
}

/// The port a probe or Service names, as a number: by name from the
/// container's ports, or as given.
fn port_number(container: &Value, port: &Value) -> u64 {
    match port {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(name) => container["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .unwrap_or_else(|| panic!("no container port named {name:?}"))["containerPort"]
            .as_u64()
            .unwrap(),
        other => panic!("a port: {other:?}"),
    }
}

/// Checks every pushgate container of `file`'s Deployments; how many.
fn check_pushgate_containers(file: &str, docs: &[Value]) -> usize {
    let dir = scratch("kubernetes");
    let mut checked = 0;
    for deployment in docs.iter().filter(|d| d["kind"] == "Deployment") {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let pod = &deployment["spec"]["template"]["spec"];
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        assert_eq!(
            &deployment["spec"]["selector"]["matchLabels"], labels,
            "{file}: {name} selects its own Pods"
        );
        for container in pod["containers"].as_sequence().expect("containers") {
            if container["name"] != "pushgate" {
                continue;
            }
            let what = format!("{file}: {name}/pushgate");

            // The config: a ConfigMap of this file, mounted where args say.
            let mount = container["volumeMounts"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|m| m["mountPath"] == "/etc/pushgate")
                .unwrap_or_else(|| panic!("{what}: a volume at /etc/pushgate"));
            let volume = pod["volumes"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == mount["name"])
                .unwrap_or_else(|| panic!("{what}: the volume {:?}", mount["name"]));
            let config_map = find(
                docs,
                "ConfigMap",
                volume["configMap"]["name"]
                    .as_str()
                    .expect("a ConfigMap volume"),
            );
            let config = config_map["data"]["pushgate.yaml"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: the ConfigMap holds pushgate.yaml"));
            let args: Vec<&str> = container["args"]
                .as_sequence()
                .expect("args")
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            assert_eq!(args, ["--config", "/etc/pushgate/pushgate.yaml"], "{what}");

            // The environment: each value given, or from a Secret of this
            // file; the API keys from a Secret.
            let mut env = image_env();
            let mut from_secrets = Vec::new();
            for var in container["env"].as_sequence().into_iter().flatten() {
                let key = var["name"].as_str().unwrap().to_owned();
                let value = if let Some(value) = var["value"].as_str() {
                    value.to_owned()
                } else {
                    let reference = &var["valueFrom"]["secretKeyRef"];
                    let secret = find(docs, "Secret", reference["name"].as_str().expect("name"));
                    from_secrets.push(key.clone());
                    secret["stringData"][reference["key"].as_str().expect("key")]
                        .as_str()
                        .unwrap_or_else(|| panic!("{what}: the Secret has {reference:?}"))
                        .to_owned()
                };
                env.push((key, value));
            }
            assert!(
                from_secrets.iter().any(|k| k == "PUSHGATE_API__KEYS"),
                "{what}: the API keys come from a Secret"
            );
            check_config(&dir.0, &format!("{name}.yaml"), config, &env);

            // Probes on the API listener's port.
            let parsed: Value = serde_yaml::from_str(config).unwrap();
            let api_port: u64 = parsed["api"]["listen"]
                .as_str()
                .expect("api.listen in the config")
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                let get = &container[probe]["httpGet"];
                assert_eq!(get["path"], path, "{what}: {probe}");
                assert_eq!(
                    port_number(container, &get["port"]),
                    api_port,
                    "{what}: {probe} on the API port"
                );
            }

            // The drain fits in the termination grace, after any preStop.
            let grace = seconds(parsed["shutdown"]["grace"].as_str().unwrap_or("10s"));
            let pause = match &container["lifecycle"]["preStop"] {
                Value::Null => 0,
                pre_stop => {
                    let command = &pre_stop["exec"]["command"];
                    assert_eq!(command[0], "sleep", "{what}: preStop pauses");
                    seconds(command[1].as_str().expect("sleep N"))
                }
            };
            let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
            assert!(
                termination > pause + grace,
                "{what}: terminationGracePeriodSeconds {termination} > preStop {pause} + shutdown.grace {grace}"
            );

            let resources = &container["resources"];
            for path in [
                ["requests", "memory"],
                ["requests", "cpu"],
                ["limits", "memory"],
            ] {
                assert!(
                    resources[path[0]][path[1]].is_string(),
                    "{what}: resources.{}.{}",
                    path[0],
                    path[1]
                );
            }
            checked += 1;
        }
    }

    // Every Service selects a Deployment's Pods, on ports they have.
    for service in docs.iter().filter(|d| d["kind"] == "Service") {
        let name = service["metadata"]["name"].as_str().unwrap();
        let selector = &service["spec"]["selector"];
        let deployment = docs
            .iter()
            .filter(|d| d["kind"] == "Deployment")
            .find(|d| &d["spec"]["template"]["metadata"]["labels"] == selector)
            .unwrap_or_else(|| panic!("{file}: Service {name} selects no Deployment"));
        let containers = deployment["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap();
        for port in service["spec"]["ports"].as_sequence().expect("ports") {
            let target = &port["targetPort"];
            assert!(
                containers.iter().any(|c| c["ports"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .any(|p| p["name"] == *target || p["containerPort"] == *target)),
                "{file}: Service {name} targets {target:?}, which no container has"
            );
        }
        assert!(
            service["spec"]["sessionAffinity"].is_null()
                || service["spec"]["sessionAffinity"] == "None",
            "{file}: {name} needs no sticky sessions"
        );
    }
    checked
}

#[test]
fn the_sidecar_runs_beside_the_app_in_one_pod() {
    let file = "kubernetes/sidecar.yaml";
    let docs = documents(file);
    assert_eq!(
        kinds(&docs),
        ["ConfigMap", "Secret", "Deployment", "Service"]
    );
    assert_eq!(check_pushgate_containers(file, &docs), 1);
    let containers = find(&docs, "Deployment", "app")["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .len();
    assert_eq!(containers, 2, "the app and pushgate in one Pod");
}

#[test]
fn the_standalone_deployment_shares_redis_behind_a_service() {
    let file = "kubernetes/standalone.yaml";
    let docs = documents(file);
    assert_eq!(
        kinds(&docs),
        [
            "ConfigMap",
            "Secret",
            "Deployment",
            "Service",
            "Service",
            "Deployment",
            "Service"
        ]
    );
    assert_eq!(check_pushgate_containers(file, &docs), 1);
    let pushgate = find(&docs, "Deployment", "pushgate");
    assert!(pushgate["spec"]["replicas"].as_u64().unwrap() >= 2);
    let config: Value = serde_yaml::from_str(
        find(&docs, "ConfigMap", "pushgate")["data"]["pushgate.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(config["engine"]["kind"], "redis", "nodes share channels");
    find(&docs, "Service", "redis");
}
