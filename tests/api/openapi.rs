//! docs/openapi.yaml against a running pushgate: every documented example
//! request is sent over real HTTP, and each answer must carry a documented
//! status and a body that validates against the schema documented for that
//! status. Secured operations must refuse a missing or wrong key with a
//! documented 401, and every route the server answers must be in the spec.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};

/// Longest wait for one exchange with the server.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Every route the API listener answers (src/api/mod.rs). Kept in step with the
/// server by [`the_route_list_follows_src_api_rs`].
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/publish"),
    ("POST", "/api/disconnect"),
    ("POST", "/api/unsubscribe"),
    ("GET", "/api/history"),
    ("GET", "/api/channels"),
    ("GET", "/api/presence"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
];

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

// ------------------------------------------------------------------ the spec

/// docs/openapi.yaml as JSON.
struct Spec {
    doc: Value,
}

/// One operation of the spec.
struct Operation<'a> {
    method: Method,
    path: &'a str,
    op: &'a Value,
}

impl Operation<'_> {
    fn label(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// A request built from the spec's examples.
struct ExampleRequest {
    name: String,
    /// `?…`, or empty.
    query: String,
    body: Option<Value>,
}

impl Spec {
    fn load() -> Spec {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
        let text = std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{path}: {err}"));
        let yaml: serde_yaml::Value =
            serde_yaml::from_str(&text).unwrap_or_else(|err| panic!("{path}: {err}"));
        Spec {
            doc: yaml_to_json(yaml),
        }
    }

    /// Follows `$ref`s (`#/…` pointers into this document) until an object
    /// that is not a reference.
    fn resolve<'a>(&'a self, mut value: &'a Value) -> &'a Value {
        for _ in 0..16 {
            let Some(reference) = value.get("$ref").and_then(Value::as_str) else {
                return value;
            };
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("only local references are supported: {reference}"));
            value = self
                .doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("unresolved reference {reference}"));
        }
        panic!("reference loop at {value}");
    }

    fn operations(&self) -> Vec<Operation<'_>> {
        let paths = self.doc["paths"].as_object().expect("`paths` is a mapping");
        let mut operations = Vec::new();
        for (path, item) in paths {
            let item = item.as_object().expect("a path item is a mapping");
            for (key, op) in item {
                if METHODS.contains(&key.as_str()) {
                    operations.push(Operation {
                        method: key.to_uppercase().parse().expect("an HTTP method"),
                        path,
                        op,
                    });
                }
            }
        }
        assert!(!operations.is_empty(), "the spec has no operations");
        operations
    }

    fn operation(&self, method: &str, path: &str) -> Operation<'_> {
        self.operations()
            .into_iter()
            .find(|o| o.method.as_str() == method && o.path == path)
            .unwrap_or_else(|| panic!("{method} {path} is not in docs/openapi.yaml"))
    }

    /// Whether the operation needs a key: its own `security`, else the
    /// document's; an empty list (or an empty requirement in it) means open.
    fn secured(&self, op: &Value) -> bool {
        let security = op.get("security").unwrap_or(&self.doc["security"]);
        match security.as_array() {
            None => false,
            Some(requirements) => {
                !requirements.is_empty()
                    && requirements
                        .iter()
                        .all(|r| r.as_object().is_some_and(|r| !r.is_empty()))
            }
        }
    }

    /// A validator for `schema` (which may hold `#/components/…` references),
    /// as JSON Schema 2020-12, the dialect of OpenAPI 3.1.
    fn validator(&self, schema: &Value) -> jsonschema::Validator {
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": self.doc["components"],
            "allOf": [schema],
        });
        jsonschema::draft202012::new(&root)
            .unwrap_or_else(|err| panic!("schema {schema} does not compile: {err}"))
    }

    /// Validates `instance`; the errors, one line each, if any.
    fn check(&self, schema: &Value, instance: &Value) -> Result<(), String> {
        let validator = self.validator(schema);
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|err| format!("  at `{}`: {err}", err.instance_path))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }

    /// The requests the operation's examples describe: one per request body
    /// example (or one without a body), each with every query parameter's
    /// example.
    fn example_requests(&self, operation: &Operation) -> Vec<ExampleRequest> {
        let label = operation.label();
        let mut query = form_urlencoded::Serializer::new(String::new());
        let mut any_query = false;
        for parameter in operation.op["parameters"].as_array().into_iter().flatten() {
            let parameter = self.resolve(parameter);
            let name = parameter["name"].as_str().expect("a parameter has a name");
            assert_eq!(
                parameter["in"], "query",
                "{label}: parameter `{name}`: this test sends only query parameters"
            );
            let example = single_example(parameter)
                .unwrap_or_else(|| panic!("{label}: query parameter `{name}` has no example"));
            let text = match example {
                Value::String(text) => text.clone(),
                Value::Number(_) | Value::Bool(_) => example.to_string(),
                other => panic!("{label}: `{name}`: a query example must be a scalar: {other}"),
            };
            query.append_pair(name, &text);
            any_query = true;
        }
        let query = if any_query {
            format!("?{}", query.finish())
        } else {
            String::new()
        };

        let Some(body) = operation.op.get("requestBody") else {
            return vec![ExampleRequest {
                name: "no body".into(),
                query,
                body: None,
            }];
        };
        let media = self.resolve(body)["content"]
            .get("application/json")
            .unwrap_or_else(|| panic!("{label}: the request body is not application/json"));
        let examples = all_examples(self, media);
        assert!(
            !examples.is_empty(),
            "{label}: the request body has no example"
        );
        examples
            .into_iter()
            .map(|(name, value)| ExampleRequest {
                name,
                query: query.clone(),
                body: Some(value.clone()),
            })
            .collect()
    }

    /// Checks an answer against the operation's responses: its status is
    /// documented, documented required headers are there, its media type is
    /// documented and its body validates. Returns the body as JSON (a string
    /// for text bodies).
    fn check_answer(&self, operation: &Operation, what: &str, answer: &Answer) -> Value {
        let label = format!("{} ({what})", operation.label());
        let responses = operation.op["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{label}: no responses"));
        let documented: Vec<&String> = responses.keys().collect();
        let response = responses
            .get(answer.status.as_str())
            .map(|r| self.resolve(r))
            .unwrap_or_else(|| {
                panic!(
                    "{label}: status {} is not documented (documented: {documented:?}); body: {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                )
            });

        for (name, spec_header) in response["headers"].as_object().into_iter().flatten() {
            let spec_header = self.resolve(spec_header);
            match answer.headers.get(name.as_str()) {
                Some(value) => {
                    let value = Value::String(value.to_str().expect("ASCII header").to_owned());
                    if let Err(errors) = self.check(&spec_header["schema"], &value) {
                        panic!("{label}: header {name}: {value} does not fit:\n{errors}");
                    }
                }
                None if spec_header["required"] == true => {
                    panic!("{label}: the documented header {name} is missing")
                }
                None => {}
            }
        }

        let Some(content) = response.get("content").and_then(Value::as_object) else {
            assert!(
                answer.body.is_empty(),
                "{label}: status {} documents no body, got {:?}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
            return Value::Null;
        };
        let content_type = answer
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{label}: no Content-Type"));
        let media = media_type(content_type);
        let (_, media_spec) = content
            .iter()
            .find(|(documented, _)| media_type(documented) == media)
            .unwrap_or_else(|| {
                panic!(
                    "{label}: Content-Type {content_type} is not documented for {} ({:?})",
                    answer.status,
                    content.keys().collect::<Vec<_>>()
                )
            });
        let instance = if media == "application/json" {
            serde_json::from_slice(&answer.body).unwrap_or_else(|err| {
                panic!(
                    "{label}: the body is not JSON ({err}): {}",
                    String::from_utf8_lossy(&answer.body)
                )
            })
        } else {
            Value::String(
                String::from_utf8(answer.body.to_vec())
                    .unwrap_or_else(|_| panic!("{label}: the body is not UTF-8")),
            )
        };
        let schema = media_spec
            .get("schema")
            .unwrap_or_else(|| panic!("{label}: {media} for {} has no schema", answer.status));
        if let Err(errors) = self.check(schema, &instance) {
            panic!(
                "{label}: the {} body does not fit its documented schema:\n{errors}\nbody: {instance}",
                answer.status
            );
        }
        instance
    }
}

/// The media type of a Content-Type value, without parameters, lowercase.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// An object's `example`, or its first `examples` entry (a list of values
/// for schemas, a map of Example objects elsewhere).
fn single_example(object: &Value) -> Option<&Value> {
    if let Some(example) = object.get("example") {
        return Some(example);
    }
    match object.get("examples")? {
        Value::Object(map) => map.values().next().map(|example| &example["value"]),
        Value::Array(list) => list.first(),
        _ => None,
    }
}

/// Every example of a Media Type or Parameter object, named.
fn all_examples<'a>(spec: &'a Spec, object: &'a Value) -> Vec<(String, &'a Value)> {
    let mut found = Vec::new();
    if let Some(example) = object.get("example") {
        found.push(("example".to_owned(), example));
    }
    for (name, example) in object["examples"].as_object().into_iter().flatten() {
        let example = spec.resolve(example);
        let value = example
            .get("value")
            .unwrap_or_else(|| panic!("example `{name}` has no `value`"));
        found.push((name.clone(), value));
    }
    found
}

/// YAML to JSON, with mapping keys (such as status codes) as strings.
fn yaml_to_json(value: serde_yaml::Value) -> Value {
    use serde_yaml::Value as Y;
    match value {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => serde_json::to_value(&n).expect("a YAML number is a JSON number"),
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(items.into_iter().map(yaml_to_json).collect()),
        Y::Mapping(mapping) => Value::Object(
            mapping
                .into_iter()
                .map(|(key, value)| {
                    let key = match key {
                        Y::String(s) => s,
                        Y::Number(n) => n.to_string(),
                        Y::Bool(b) => b.to_string(),
                        other => panic!("unsupported mapping key {other:?}"),
                    };
                    (key, yaml_to_json(value))
                })
                .collect::<Map<String, Value>>(),
        ),
        Y::Tagged(tagged) => panic!("unexpected YAML tag {}", tagged.tag),
    }
}

// ------------------------------------------------------------------- HTTP

/// One answer, read whole.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// Which `Authorization` to send.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Bearer(&'a str),
}

/// Sends one request to the API listener and reads the whole answer, within
/// [`TIMEOUT`].
async fn send(
    api: SocketAddr,
    method: &Method,
    path_and_query: &str,
    auth: Auth<'_>,
    content_type: Option<&str>,
    body: Option<Bytes>,
) -> Answer {
    let mut request = Request::builder()
        .method(method.clone())
        .uri(format!("http://{api}{path_and_query}"));
    if let Auth::Bearer(key) = auth {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let request = request
        .body(match body {
            Some(body) => common::body(body),
            None => common::empty_body(),
        })
        .unwrap();
    let exchange = async {
        let response = common::client()
            .request(request)
            .await
            .expect("the request");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("the body")
            .to_bytes();
        Answer {
            status,
            headers,
            body,
        }
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path_and_query}: no answer within {TIMEOUT:?}"))
}

/// Sends an example request, with `auth`.
async fn send_example(
    api: SocketAddr,
    operation: &Operation<'_>,
    example: &ExampleRequest,
    auth: Auth<'_>,
) -> Answer {
    let body = example
        .body
        .as_ref()
        .map(|body| Bytes::from(serde_json::to_vec(body).unwrap()));
    let content_type = body.as_ref().map(|_| "application/json");
    send(
        api,
        &operation.method,
        &format!("{}{}", operation.path, example.query),
        auth,
        content_type,
        body,
    )
    .await
}

async fn start() -> (common::Upstream, common::Pushgate) {
    let app = common::Upstream::start().await;
    let gate = common::Pushgate::start(
        &app.url(),
        "channels:\n  - prefix: \"room:\"\n    presence: true\n",
    )
    .await;
    (app, gate)
}

// ------------------------------------------------------------------ tests

#[test]
fn the_spec_is_openapi_3_1_and_its_examples_fit_their_schemas() {
    let spec = Spec::load();
    let version = spec.doc["openapi"].as_str().expect("`openapi` is a string");
    assert!(version.starts_with("3.1."), "openapi: {version}");

    // Every component schema is valid JSON Schema 2020-12 and compiles (so
    // its references resolve).
    let schemas = spec.doc["components"]["schemas"]
        .as_object()
        .expect("components.schemas");
    for (name, schema) in schemas {
        if let Err(err) = jsonschema::draft202012::meta::validate(schema) {
            panic!("components.schemas.{name} is not valid JSON Schema 2020-12: {err}");
        }
        spec.validator(&json!({ "$ref": format!("#/components/schemas/{name}") }));
    }

    // The bearer scheme, and only defined schemes in requirements.
    let schemes = spec.doc["components"]["securitySchemes"]
        .as_object()
        .expect("components.securitySchemes");
    assert_eq!(schemes["bearerAuth"]["type"], "http");
    assert_eq!(schemes["bearerAuth"]["scheme"], "bearer");
    let mut requirements: Vec<&Value> = spec.doc["security"].as_array().unwrap().iter().collect();
    for operation in spec.operations() {
        requirements.extend(operation.op["security"].as_array().into_iter().flatten());
    }
    for requirement in requirements {
        for scheme in requirement.as_object().unwrap().keys() {
            assert!(schemes.contains_key(scheme), "undefined scheme {scheme}");
        }
    }

    // Every example fits the schema it illustrates.
    let mut checked = 0;
    for operation in spec.operations() {
        let label = operation.label();
        assert!(
            operation.op["operationId"].is_string(),
            "{label}: no operationId"
        );
        for parameter in operation.op["parameters"].as_array().into_iter().flatten() {
            let parameter = spec.resolve(parameter);
            let name = parameter["name"].as_str().unwrap();
            let example = single_example(parameter)
                .unwrap_or_else(|| panic!("{label}: parameter `{name}` has no example"));
            if let Err(errors) = spec.check(&parameter["schema"], example) {
                panic!("{label}: parameter `{name}`: example {example} does not fit:\n{errors}");
            }
            checked += 1;
        }
        if let Some(body) = operation.op.get("requestBody") {
            for (media, media_spec) in spec.resolve(body)["content"].as_object().unwrap() {
                let examples = all_examples(&spec, media_spec);
                assert!(!examples.is_empty(), "{label}: {media} has no example");
                for (name, example) in examples {
                    if let Err(errors) = spec.check(&media_spec["schema"], example) {
                        panic!("{label}: request example `{name}` does not fit:\n{errors}");
                    }
                    checked += 1;
                }
            }
        }
        let responses = operation.op["responses"].as_object().unwrap();
        for (status, response) in responses {
            assert!(
                status.len() == 3 && status.parse::<u16>().is_ok(),
                "{label}: response key {status} is not a status code"
            );
            let response = spec.resolve(response);
            assert!(
                response["description"].is_string(),
                "{label}: {status} has no description"
            );
            for (media, media_spec) in response["content"].as_object().into_iter().flatten() {
                let examples = all_examples(&spec, media_spec);
                assert!(
                    !examples.is_empty(),
                    "{label}: {status} {media} has no example"
                );
                for (name, example) in examples {
                    let example = if media == "application/json" {
                        example.clone()
                    } else {
                        Value::String(example.as_str().expect("a text example").to_owned())
                    };
                    if let Err(errors) = spec.check(&media_spec["schema"], &example) {
                        panic!("{label}: {status} example `{name}` does not fit:\n{errors}");
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 10, "only {checked} examples were checked");

    // The schemas are strict enough to refuse what the server must not send.
    let envelope = json!({ "$ref": "#/components/schemas/Envelope" });
    let good = json!({"channel": "c", "epoch": "e", "offset": 1, "data": null});
    assert!(spec.check(&envelope, &good).is_ok());
    for bad in [
        json!({"channel": "c", "epoch": "e", "offset": 1, "data": 1, "op": "x"}),
        json!({"channel": "c", "epoch": "e", "offset": 1, "data": 1, "id": 1}),
        json!({"channel": "c", "epoch": "e", "offset": 1}),
        json!({"channel": "a b", "epoch": "e", "offset": 1, "data": 1}),
        json!({"channel": "c", "epoch": "e:1", "offset": 1, "data": 1}),
    ] {
        assert!(spec.check(&envelope, &bad).is_err(), "accepted {bad}");
    }
    let unauthorized = json!({ "$ref": "#/components/schemas/Unauthorized" });
    let wrong_code = json!({"error": {"code": "not_found", "message": "m"}});
    assert!(spec.check(&unauthorized, &wrong_code).is_err());
}

#[tokio::test]
async fn every_operation_answers_its_examples_as_documented() {
    let (_app, gate) = start().await;
    let spec = Spec::load();
    let mut operations = spec.operations();
    // Publishes first, so that history has something to show.
    operations.sort_by_key(|o| o.method != Method::POST);

    let mut answered: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for operation in &operations {
        let auth = if spec.secured(operation.op) {
            Auth::Bearer(common::API_KEY)
        } else {
            Auth::None
        };
        for example in spec.example_requests(operation) {
            let answer = send_example(gate.api_addr, operation, &example, auth).await;
            let body = spec.check_answer(operation, &example.name, &answer);
            assert!(
                answer.status.is_success(),
                "{} example `{}` was refused: {} {body}",
                operation.label(),
                example.name,
                answer.status
            );
            // No realtime session has a user here (`auth.mode: none`), so
            // there is nobody to disconnect or unsubscribe.
            match operation.path {
                "/api/disconnect" => assert_eq!(body, json!({"disconnected": 0})),
                "/api/unsubscribe" => assert_eq!(body, json!({"unsubscribed": 0})),
                _ => {}
            }
            // A batch is answered item by item, all stored here.
            if let Some(Value::Array(items)) = &example.body {
                let results = body.as_array().expect("a batch is answered with an array");
                assert_eq!(results.len(), items.len(), "one answer per batch item");
                assert!(results.iter().all(|r| r.get("results").is_some()), "{body}");
            }
            answered.entry(operation.label()).or_default().push(body);
        }
    }

    // Every operation was exercised, and history returned real envelopes
    // (one with an event), so the Envelope schema was checked on them.
    for operation in &operations {
        assert!(answered.contains_key(&operation.label()));
    }
    assert_eq!(
        answered["POST /api/disconnect"].len(),
        2,
        "both disconnect examples (default and chosen code) were sent"
    );
    let history = &answered["GET /api/history"][0];
    let messages = history["messages"].as_array().unwrap();
    assert!(
        messages.iter().any(|m| m.get("event").is_some()),
        "history showed no envelope with an event: {history}"
    );
    assert_eq!(history["recovered"], true);
}

#[tokio::test]
async fn operations_with_security_refuse_a_missing_or_wrong_key_with_a_documented_401() {
    let (_app, gate) = start().await;
    let spec = Spec::load();
    let (mut secured, mut open) = (0, 0);
    for operation in spec.operations() {
        let label = operation.label();
        // The server's rule: everything under /api/ needs a key, the rest is open.
        assert_eq!(
            spec.secured(operation.op),
            operation.path.starts_with("/api/"),
            "{label}: documented security differs from the server's"
        );
        if !spec.secured(operation.op) {
            open += 1;
            continue;
        }
        secured += 1;
        assert!(
            operation.op["responses"].get("401").is_some(),
            "{label} needs a key but does not document 401"
        );
        for example in spec.example_requests(&operation) {
            for (what, auth) in [
                ("no key", Auth::None),
                ("a wrong key", Auth::Bearer("not-the-key")),
            ] {
                let answer = send_example(gate.api_addr, &operation, &example, auth).await;
                assert_eq!(
                    answer.status,
                    StatusCode::UNAUTHORIZED,
                    "{label} `{}` with {what}",
                    example.name
                );
                let body = spec.check_answer(&operation, what, &answer);
                assert_eq!(body["error"]["code"], "unauthorized");
            }
        }
    }
    assert_eq!(secured, 6, "the /api/ operations need a key");
    assert_eq!(open, 3, "/healthz, /readyz and /metrics are open");
}

/// A request the examples do not cover, and what it must get.
struct Case {
    method: Method,
    /// Path and query.
    target: &'static str,
    content_type: Option<&'static str>,
    body: Option<String>,
    status: u16,
    /// The error code, when the answer is an error.
    code: Option<&'static str>,
}

impl Case {
    /// A JSON publish body.
    fn publish(body: impl Into<String>, status: u16, code: Option<&'static str>) -> Case {
        Case::post("/api/publish", body, status, code)
    }

    /// A JSON body posted to `target`.
    fn post(
        target: &'static str,
        body: impl Into<String>,
        status: u16,
        code: Option<&'static str>,
    ) -> Case {
        Case {
            method: Method::POST,
            target,
            content_type: Some("application/json"),
            body: Some(body.into()),
            status,
            code,
        }
    }

    fn get(target: &'static str, status: u16, code: Option<&'static str>) -> Case {
        Case {
            method: Method::GET,
            target,
            content_type: None,
            body: None,
            status,
            code,
        }
    }
}

/// Requests the examples do not cover, each answered with a documented error
/// (or, for a batch, documented per-item errors).
#[tokio::test]
async fn documented_errors_come_back_as_documented() {
    let (_app, gate) = start().await;
    let spec = Spec::load();
    let key = Auth::Bearer(common::API_KEY);
    let over_max_body = format!(r#"{{"channel":"c","data":"{}"}}"#, "x".repeat(1 << 20));
    let too_many = serde_json::to_string(&vec![json!({"channel": "c", "data": 1}); 1001]).unwrap();
    let long_user = json!({"user": "u".repeat(257), "channel": "c"}).to_string();
    // 123 bytes is the limit, counted in bytes: 62 two-byte characters are 124.
    let long_reason = json!({"user": "u", "reason": "é".repeat(62)}).to_string();
    let longest_reason = json!({"user": "u", "reason": "x".repeat(123)}).to_string();
    let over_max_body_disconnect = format!(r#"{{"user":"{}"}}"#, "x".repeat(1 << 20));

    let cases = [
        Case::publish(r#"{"channel":"a b","data":1}"#, 400, Some("bad_channel")),
        Case::publish(r#"{"channel":"c"}"#, 400, Some("missing_data")),
        Case::publish(r#"{"data":1}"#, 400, Some("missing_channel")),
        Case::publish(
            r#"{"channel":"c","data":1,"event":"a b"}"#,
            400,
            Some("bad_event"),
        ),
        Case::publish(
            r#"{"channel":"c","data":1,"idempotency_key":""}"#,
            400,
            Some("bad_idempotency_key"),
        ),
        Case::publish(r#"{"channel":"c","data":1"#, 400, Some("bad_json")),
        Case::publish(too_many, 400, Some("batch_too_large")),
        Case::publish(over_max_body, 413, Some("body_too_large")),
        Case {
            content_type: Some("text/plain"),
            ..Case::publish(
                r#"{"channel":"c","data":1}"#,
                415,
                Some("unsupported_media_type"),
            )
        },
        // Stores `c` offset 1; the other two items are refused in place.
        Case::publish(
            r#"[{"channel":"c","data":1},{"channel":"a b","data":2},"x"]"#,
            200,
            None,
        ),
        Case::get("/api/history", 400, Some("missing_channel")),
        Case::get("/api/history?channel=a%20b", 400, Some("bad_channel")),
        Case::get(
            "/api/history?channel=c&since=nope",
            400,
            Some("bad_position"),
        ),
        Case::get("/api/history?channel=c&limit=0", 400, Some("bad_limit")),
        Case::get("/api/history?channel=c&chanel=d", 400, Some("bad_query")),
        // `c` has history, in another epoch than this position's.
        Case::get("/api/history?channel=c&since=OtherEpoch:1", 200, None),
        Case::get("/api/channels?limit=100001", 400, Some("bad_limit")),
        Case::get("/api/channels?prefix=a&prefix=b", 400, Some("bad_query")),
        Case::post("/api/disconnect", r#"{"user":""}"#, 400, Some("bad_user")),
        Case::post(
            "/api/disconnect",
            r#"{"user":"u","code":1000}"#,
            400,
            Some("bad_code"),
        ),
        Case::post(
            "/api/disconnect",
            r#"{"user":"u","code":5000}"#,
            400,
            Some("bad_code"),
        ),
        Case::post(
            "/api/disconnect",
            r#"{"user":"u","code":70000}"#,
            400,
            Some("bad_code"),
        ),
        Case::post("/api/disconnect", long_reason, 400, Some("bad_reason")),
        Case::post("/api/disconnect", longest_reason, 200, None),
        Case::post(
            "/api/disconnect",
            r#"{"user":"u","channel":"c"}"#,
            400,
            Some("bad_json"),
        ),
        Case::post("/api/disconnect", r#"{"code":4000}"#, 400, Some("bad_json")),
        Case::post(
            "/api/disconnect",
            over_max_body_disconnect,
            413,
            Some("body_too_large"),
        ),
        Case {
            content_type: Some("text/plain"),
            ..Case::post(
                "/api/disconnect",
                r#"{"user":"u"}"#,
                415,
                Some("unsupported_media_type"),
            )
        },
        Case::post(
            "/api/unsubscribe",
            r#"{"user":"u","channel":"a b"}"#,
            400,
            Some("bad_channel"),
        ),
        Case::post("/api/unsubscribe", long_user, 400, Some("bad_user")),
        Case::post("/api/unsubscribe", r#"{"user":"u"}"#, 400, Some("bad_json")),
        Case::post(
            "/api/unsubscribe",
            r#"{"user":"u","channel":"c","code":4000}"#,
            400,
            Some("bad_json"),
        ),
        Case {
            content_type: Some("text/plain"),
            ..Case::post(
                "/api/unsubscribe",
                r#"{"user":"u","channel":"c"}"#,
                415,
                Some("unsupported_media_type"),
            )
        },
    ];
    for case in cases {
        let path = case.target.split('?').next().unwrap();
        let operation = spec.operation(case.method.as_str(), path);
        let answer = send(
            gate.api_addr,
            &case.method,
            case.target,
            key,
            case.content_type,
            case.body.map(Bytes::from),
        )
        .await;
        let what = format!(
            "{} {}, expecting {} {:?}",
            case.method, case.target, case.status, case.code
        );
        let body = spec.check_answer(&operation, &what, &answer);
        assert_eq!(answer.status.as_u16(), case.status, "{what}: {body}");
        if let Some(code) = case.code {
            assert_eq!(body["error"]["code"], code, "{what}: {body}");
        }
        if case.target == "/api/disconnect" && case.status == 200 {
            assert_eq!(body, json!({"disconnected": 0}), "{what}");
        } else if case.method == Method::POST && case.status == 200 {
            let items = body.as_array().unwrap();
            assert_eq!(items.len(), 3, "{body}");
            assert!(items[0].get("results").is_some(), "{body}");
            assert_eq!(items[1]["error"]["code"], "bad_channel", "{body}");
            assert_eq!(items[2]["error"]["code"], "bad_json", "{body}");
        }
        if case.method == Method::GET && case.status == 200 {
            assert_eq!(body["recovered"], false, "{body}");
            assert_eq!(body["messages"], json!([]), "{body}");
            assert_eq!(body["offset"], 1, "{body}");
        }
    }
}

#[tokio::test]
async fn every_route_the_server_answers_is_in_the_spec() {
    let (_app, gate) = start().await;
    let spec = Spec::load();
    let documented: BTreeSet<(String, String)> = spec
        .operations()
        .iter()
        .map(|o| (o.method.to_string(), o.path.to_owned()))
        .collect();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    assert_eq!(
        documented, served,
        "docs/openapi.yaml and the server's routes differ"
    );

    // The server answers each route (anything but 404/405), and refuses what
    // is not a route, so the list above is the server's.
    let key = Auth::Bearer(common::API_KEY);
    for (method, path) in ROUTES {
        let method: Method = method.parse().unwrap();
        let body = (method == Method::POST).then(|| Bytes::from_static(b"{}"));
        let content_type = body.as_ref().map(|_| "application/json");
        let answer = send(gate.api_addr, &method, path, key, content_type, body).await;
        assert!(
            answer.status != StatusCode::NOT_FOUND
                && answer.status != StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {}",
            answer.status
        );
    }
    for (method, path, status) in [
        ("GET", "/api/nothing", StatusCode::NOT_FOUND),
        ("POST", "/api/presence", StatusCode::METHOD_NOT_ALLOWED),
        ("GET", "/api/publish", StatusCode::METHOD_NOT_ALLOWED),
        ("GET", "/api/disconnect", StatusCode::METHOD_NOT_ALLOWED),
        ("PUT", "/api/unsubscribe", StatusCode::METHOD_NOT_ALLOWED),
        ("DELETE", "/api/history", StatusCode::METHOD_NOT_ALLOWED),
        ("POST", "/healthz", StatusCode::METHOD_NOT_ALLOWED),
        ("GET", "/nope", StatusCode::NOT_FOUND),
    ] {
        let method: Method = method.parse().unwrap();
        let answer = send(gate.api_addr, &method, path, key, None, None).await;
        assert_eq!(answer.status, status, "{method} {path}");
        let body: Value = serde_json::from_slice(&answer.body).unwrap();
        let error = json!({ "$ref": "#/components/schemas/Error" });
        if let Err(errors) = spec.check(&error, &body) {
            panic!("{method} {path}: {body} is not an Error:\n{errors}");
        }
    }
}

/// The route list above names every path src/api/mod.rs routes, so a new route
/// cannot go undocumented.
#[test]
fn the_route_list_follows_src_api() {
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/api/mod.rs"))
        .expect("src/api/mod.rs");
    let mut literals = BTreeSet::new();
    // Every string literal that starts with `/` and is a whole path.
    for (start, _) in source.match_indices("\"/") {
        let rest = &source[start + 1..];
        let Some(end) = rest.find('"') else { break };
        let piece = &rest[..end];
        let is_path = piece.len() > 1
            && !piece.ends_with('/')
            && piece
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'/' || b == b'_');
        if is_path {
            literals.insert(piece.to_owned());
        }
    }
    assert!(
        literals.contains("/api/publish") && literals.contains("/healthz"),
        "found no routes in src/api/mod.rs: {literals:?}"
    );
    let listed: BTreeSet<String> = ROUTES.iter().map(|(_, path)| path.to_string()).collect();
    assert_eq!(
        literals, listed,
        "src/api/mod.rs routes paths that ROUTES (and so docs/openapi.yaml) do not list, or the reverse"
    );
}

#[tokio::test]
async fn every_metric_the_server_exposes_is_documented() {
    let (_app, gate) = start().await;
    let answer = send(
        gate.api_addr,
        &Method::GET,
        "/metrics",
        Auth::None,
        None,
        None,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    let families: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert!(families.len() >= 5, "{text}");
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md"))
        .expect("docs/api.md");
    for family in families {
        assert!(
            docs.contains(&format!("`{family}")),
            "{family} is not documented in docs/api.md"
        );
    }
}
