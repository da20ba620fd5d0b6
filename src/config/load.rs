//! Loading: the YAML file, the `PUSHGATE_*` overrides laid over it, and a
//! report of every problem at once.
//!
//! The layering is written here rather than with figment: figment stops at
//! the first value that does not deserialize, while a user of pushgate gets
//! every problem in one report, each with the key, where the value came
//! from (the file, or the environment variable's name) and how to fix it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use super::{Config, Settings, ENV_PREFIX};

/// One thing wrong with the configuration, and how to put it right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the bad value came from: the file, or the environment variable.
    pub origin: String,
    /// Dotted key path, e.g. `limits.header_timeout`.
    pub key: String,
    pub why: String,
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: `{}`: {}; fix: {}",
            self.origin, self.key, self.why, self.fix
        )
    }
}

/// Everything wrong with a configuration, reported together.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        writeln!(
            f,
            "invalid configuration ({count} problem{}):",
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            writeln!(f, "  {problem}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn single(origin: &str, key: &str, why: impl Into<String>, fix: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                origin: origin.to_owned(),
                key: key.to_owned(),
                why: why.into(),
                fix: fix.into(),
            }],
        }
    }
}

/// Reads `path`, lays the `PUSHGATE_*` variables of `env` over it, and
/// validates the result. `env` is injected (the binary passes
/// `std::env::vars()`) so tests never touch the process environment.
pub fn load<I, K, V>(path: &Path, env: I) -> Result<Settings, ConfigError>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigError::single(
            &origin,
            "(file)",
            format!("cannot read the file: {err}"),
            "pass the path of a readable YAML file to --config",
        )
    })?;
    from_yaml(&text, &origin, env)
}

/// Like [`load`], from YAML text; `origin` names it in problems.
pub fn from_yaml<I, K, V>(text: &str, origin: &str, env: I) -> Result<Settings, ConfigError>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    let mut tree: Value = serde_yaml::from_str(text).map_err(|err| {
        ConfigError::single(
            origin,
            "(file)",
            format!("not valid YAML: {err}"),
            "fix the YAML syntax; config.example.yaml shows every key",
        )
    })?;
    if tree.is_null() {
        // An empty file means "all defaults".
        tree = Value::Mapping(Mapping::new());
    }
    if !tree.is_mapping() {
        return Err(ConfigError::single(
            origin,
            "(file)",
            "the top level must be a mapping of keys",
            "start from config.example.yaml",
        ));
    }

    let defaults = serde_yaml::to_value(Config::default()).expect("defaults serialize");
    let mut problems = Vec::new();
    let mut origins = BTreeMap::new();
    // Kept whole: besides the `PUSHGATE_*` overrides, the variables that
    // `pusher.apps[].secret_env` names are read from it.
    let env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
    apply_env(
        &mut tree,
        &defaults,
        env.iter().cloned(),
        &mut origins,
        &mut problems,
    );
    let mut bad_paths = Vec::new();
    check_tree(
        &tree,
        &defaults,
        &defaults,
        &mut Vec::new(),
        origin,
        &origins,
        &mut problems,
        &mut bad_paths,
    );
    // Put defaults where the values were bad, so the checks that need the
    // whole config still run and their problems join this report.
    for path in &bad_paths {
        match lookup(&defaults, path) {
            Some(default) => set(&mut tree, path, default.clone()),
            None => remove(&mut tree, path),
        }
    }
    let mut config = match Config::deserialize(tree) {
        Ok(config) => config,
        // Only a key we could not repair (a non-string key) gets here, and it
        // is already among the problems.
        Err(_) if !problems.is_empty() => return Err(ConfigError { problems }),
        Err(err) => {
            return Err(ConfigError::single(
                origin,
                "(file)",
                clean_serde_message(&err.to_string()),
                "see config.example.yaml",
            ))
        }
    };
    super::pusher::find_secrets(&mut config.pusher, &env, &mut |key, why, fix| {
        problems.push(Problem {
            origin: origin.to_owned(),
            key: key.to_owned(),
            why,
            fix: fix.to_owned(),
        })
    });
    let reported: Vec<String> = problems.iter().map(|p| p.key.clone()).collect();
    match Settings::check(config, origin) {
        Ok(settings) if problems.is_empty() => Ok(settings),
        Ok(_) => Err(ConfigError { problems }),
        Err(more) => {
            problems.extend(
                more.into_iter()
                    .filter(|problem| !reported.contains(&problem.key))
                    .map(|mut problem| {
                        if let Some(env) = origins.get(&problem.key) {
                            problem.origin = env.clone();
                        }
                        problem
                    }),
            );
            Err(ConfigError { problems })
        }
    }
}

fn remove(tree: &mut Value, path: &[String]) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let parent = parents.iter().try_fold(tree, |node, key| {
        node.as_mapping_mut()?.get_mut(key.as_str())
    });
    if let Some(map) = parent.and_then(Value::as_mapping_mut) {
        map.remove(last.as_str());
    }
}

/// Lays `PUSHGATE_A__B=value` over the tree at `a.b`. The shape of the
/// defaults decides how the text is read: a list is split on commas, anything
/// else is read as a YAML scalar (so numbers stay numbers).
fn apply_env<I, K, V>(
    tree: &mut Value,
    defaults: &Value,
    env: I,
    origins: &mut BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
) where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (name, text) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(|part| part.to_ascii_lowercase())
            .collect();
        let key = path.join(".");
        let Some(shape) = lookup(defaults, &path) else {
            problems.push(Problem {
                origin: format!("environment {name}"),
                key,
                why: "no such configuration key".into(),
                fix: "remove the variable, or name a key from config.example.yaml \
                      (upper case, `__` between levels)"
                    .into(),
            });
            continue;
        };
        let value = if shape.is_sequence() {
            Value::Sequence(
                text.split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(scalar)
                    .collect(),
            )
        } else if shape.is_string() || shape.is_null() {
            // Keep strings as written, even when they look like a number.
            if shape.is_null() && text.is_empty() {
                Value::Null
            } else {
                Value::String(text)
            }
        } else {
            scalar(&text)
        };
        set(tree, &path, value);
        origins.insert(key, format!("environment {name}"));
    }
}

fn scalar(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

fn lookup<'a>(tree: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(tree, |node, key| node.as_mapping()?.get(key.as_str()))
}

fn set(tree: &mut Value, path: &[String], value: Value) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut node = tree;
    for key in parents {
        let map = node.as_mapping_mut().expect("tree nodes are mappings");
        let child = map
            .entry(Value::String(key.clone()))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if !child.is_mapping() {
            *child = Value::Mapping(Mapping::new());
        }
        node = child;
    }
    node.as_mapping_mut()
        .expect("tree nodes are mappings")
        .insert(Value::String(last.clone()), value);
}

/// Walks the user's tree beside the defaults: unknown keys are reported, and
/// each value is type-checked alone by placing it into the defaults. The paths
/// of bad values and unknown keys are collected in `bad_paths`.
#[allow(clippy::too_many_arguments)]
fn check_tree(
    node: &Value,
    shape: &Value,
    defaults: &Value,
    path: &mut Vec<String>,
    file: &str,
    origins: &BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
    bad_paths: &mut Vec<Vec<String>>,
) {
    let origin_of = |key: &str| origins.get(key).cloned().unwrap_or_else(|| file.to_owned());
    match (node, shape) {
        (Value::Mapping(map), Value::Mapping(shape_map)) => {
            for (key, value) in map {
                let Some(name) = key.as_str() else {
                    problems.push(Problem {
                        origin: file.to_owned(),
                        key: format!("{}{:?}", prefix(path), key),
                        why: "keys must be strings".into(),
                        fix: "quote the key or remove it".into(),
                    });
                    continue;
                };
                path.push(name.to_owned());
                match shape_map.get(name) {
                    Some(child_shape) => check_tree(
                        value,
                        child_shape,
                        defaults,
                        path,
                        file,
                        origins,
                        problems,
                        bad_paths,
                    ),
                    None => {
                        let key = path.join(".");
                        let known: Vec<&str> = shape_map.keys().filter_map(Value::as_str).collect();
                        problems.push(Problem {
                            origin: origin_of(&key),
                            key,
                            why: "unknown key".into(),
                            fix: format!(
                                "remove it or use one of: {} (see config.example.yaml)",
                                known.join(", ")
                            ),
                        });
                        bad_paths.push(path.clone());
                    }
                }
                path.pop();
            }
        }
        // An empty section (`tls:` with nothing under it) means its defaults.
        (Value::Null, Value::Mapping(_)) => {}
        _ => {
            let mut probe = defaults.clone();
            set(&mut probe, path, node.clone());
            if let Err(err) = Config::deserialize(probe) {
                let key = path.join(".");
                let fix = match shape {
                    Value::Mapping(_) => "write a section of keys here".to_owned(),
                    Value::Null => "see config.example.yaml for the expected form".to_owned(),
                    _ => format!(
                        "write a value of the same form as the default, `{}`",
                        describe(shape)
                    ),
                };
                problems.push(Problem {
                    origin: origin_of(&key),
                    key,
                    why: clean_serde_message(&err.to_string()),
                    fix,
                });
                bad_paths.push(path.clone());
            }
        }
    }
}

fn prefix(path: &[String]) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{}.", path.join("."))
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Sequence(items) if items.is_empty() => "[]".to_owned(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_owned(),
    }
}

/// serde's messages are good, but name Rust types; say it in config terms.
fn clean_serde_message(message: &str) -> String {
    message
        .replace("unit value", "nothing")
        .replace("struct ", "section ")
        .replace("usize", "a whole number")
        .replace("invalid type: ", "wrong type: ")
}
