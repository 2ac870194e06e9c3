//! Reads a function app folder as the Functions host does: `host.json` and one `function.json` per
//! function folder (`<root>/<fn>/function.json`, the real layout, or `<root>/functions/<fn>/function.json`).
//! The folder name is the function name.

use super::schedule::{Schedule, ScheduleError};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `extensions.serviceBus.maxConcurrentCalls` default: the source uses 16 × processor count; the docs
/// say 16. One machine runs one host, so the documented per-instance value is used.
pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 16;
/// Default `extensions.http.routePrefix`.
pub const DEFAULT_ROUTE_PREFIX: &str = "api";

#[derive(Debug, Clone)]
pub struct App {
    pub root: PathBuf,
    pub handler: HandlerDescription,
    pub service_bus: ServiceBusOptions,
    pub route_prefix: String,
    /// `functionTimeout`; `None` when unset (unbounded on the plans this targets).
    pub function_timeout: Option<Duration>,
    /// Sorted by name; disabled functions are left out.
    pub functions: Vec<FunctionDef>,
}

/// `customHandler.description`, resolved against the app root and the app settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerDescription {
    /// A file under the app root when one exists there, otherwise a command looked up on PATH.
    pub executable: PathBuf,
    pub working_directory: PathBuf,
    pub arguments: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceBusOptions {
    pub max_concurrent_calls: usize,
    pub auto_complete_messages: bool,
    pub max_auto_lock_renewal: Duration,
}

impl Default for ServiceBusOptions {
    fn default() -> Self {
        ServiceBusOptions {
            max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS,
            auto_complete_messages: true,
            max_auto_lock_renewal: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FunctionDef {
    pub name: String,
    pub trigger: Trigger,
    pub outputs: Vec<OutputBinding>,
}

#[derive(Debug, Clone)]
pub enum Trigger {
    ServiceBus {
        /// The binding name: the key of `Data` in the invocation payload.
        name: String,
        queue_name: String,
        connection: String,
        /// `dataType: binary` sends the body as base64 instead of a quoted string.
        binary: bool,
    },
    Timer {
        name: String,
        /// Boxed: the parsed schedule is much larger than the other variants.
        schedule: Box<Schedule>,
        run_on_startup: bool,
    },
    Http {
        name: String,
        auth_level: AuthLevel,
        /// Upper-case method names; empty means every method.
        methods: Vec<String>,
        /// The route template without the prefix; defaults to the function name.
        route: String,
    },
}

impl Trigger {
    pub fn binding_name(&self) -> &str {
        match self {
            Trigger::ServiceBus { name, .. }
            | Trigger::Timer { name, .. }
            | Trigger::Http { name, .. } => name,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthLevel {
    Anonymous,
    Function,
    Admin,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OutputBinding {
    ServiceBus {
        name: String,
        queue_name: String,
        connection: String,
    },
    Http {
        name: String,
    },
}

impl OutputBinding {
    pub fn name(&self) -> &str {
        match self {
            OutputBinding::ServiceBus { name, .. } | OutputBinding::Http { name } => name,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: field `{field}`: {reason}")]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("{path}: field `{field}`: {source}")]
    Schedule {
        path: PathBuf,
        field: String,
        source: ScheduleError,
    },
}

impl App {
    /// Loads the app at `root`. `%NAME%` in handler arguments and timer schedules is resolved from
    /// `settings` first, then from the process environment.
    pub fn load(root: &Path, settings: &HashMap<String, String>) -> Result<App, AppError> {
        let lookup = |name: &str| {
            settings
                .get(name)
                .cloned()
                .or_else(|| std::env::var(name).ok())
        };
        let host_path = root.join("host.json");
        let host = read_json(&host_path)?;
        let handler = read_handler(root, &host_path, &host, &lookup)?;
        let service_bus = read_service_bus_options(&host_path, &host)?;
        let route_prefix = match host.pointer("/extensions/http/routePrefix") {
            None | Some(Value::Null) => DEFAULT_ROUTE_PREFIX.to_string(),
            Some(Value::String(prefix)) => prefix.trim_matches('/').to_string(),
            Some(_) => {
                return Err(field_error(
                    &host_path,
                    "extensions.http.routePrefix",
                    "must be a string",
                ))
            }
        };
        let function_timeout = match host.get("functionTimeout") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "-1" => None,
            Some(Value::String(s)) => Some(parse_timespan(s).ok_or_else(|| {
                field_error(
                    &host_path,
                    "functionTimeout",
                    format!("expected hh:mm:ss, got {s:?}"),
                )
            })?),
            Some(_) => {
                return Err(field_error(
                    &host_path,
                    "functionTimeout",
                    "must be a string hh:mm:ss",
                ))
            }
        };

        let mut functions = Vec::new();
        for (name, path) in function_files(root)? {
            let json = read_json(&path)?;
            if json.get("disabled").and_then(Value::as_bool) == Some(true) {
                continue;
            }
            functions.push(read_function(&name, &path, &json, &lookup)?);
        }
        functions.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(App {
            root: root.to_path_buf(),
            handler,
            service_bus,
            route_prefix,
            function_timeout,
            functions,
        })
    }

    pub fn function(&self, name: &str) -> Option<&FunctionDef> {
        self.functions.iter().find(|f| f.name == name)
    }

    /// Every queue a function reads or writes, sorted and without repeats.
    /// The queues some function is triggered by (the ones whose messages are work to do).
    pub fn trigger_queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .functions
            .iter()
            .filter_map(|f| match &f.trigger {
                Trigger::ServiceBus { queue_name, .. } => Some(queue_name.clone()),
                _ => None,
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    pub fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .functions
            .iter()
            .flat_map(|f| {
                let trigger = match &f.trigger {
                    Trigger::ServiceBus { queue_name, .. } => Some(queue_name.clone()),
                    _ => None,
                };
                let outputs = f.outputs.iter().filter_map(|o| match o {
                    OutputBinding::ServiceBus { queue_name, .. } => Some(queue_name.clone()),
                    OutputBinding::Http { .. } => None,
                });
                trigger.into_iter().chain(outputs).collect::<Vec<_>>()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

fn field_error(path: &Path, field: &str, reason: impl Into<String>) -> AppError {
    AppError::Field {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<Value, AppError> {
    let text = std::fs::read_to_string(path).map_err(|source| AppError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|source| AppError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    if !value.is_object() {
        return Err(field_error(path, "(root)", "must be a JSON object"));
    }
    Ok(value)
}

/// `(function name, function.json path)` for every function folder, in both accepted layouts.
fn function_files(root: &Path) -> Result<Vec<(String, PathBuf)>, AppError> {
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for dir in [root.to_path_buf(), root.join("functions")] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != root => continue,
            Err(source) => return Err(AppError::Read { path: dir, source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| AppError::Read {
                path: dir.clone(),
                source,
            })?;
            let file = entry.path().join("function.json");
            if !file.is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((_, first)) = found.iter().find(|(n, _)| *n == name) {
                return Err(field_error(
                    &file,
                    "(folder name)",
                    format!("function {name:?} is also defined in {}", first.display()),
                ));
            }
            found.push((name, file));
        }
    }
    Ok(found)
}

fn read_handler(
    root: &Path,
    path: &Path,
    host: &Value,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<HandlerDescription, AppError> {
    let description = host.pointer("/customHandler/description").ok_or_else(|| {
        field_error(
            path,
            "customHandler.description",
            "missing: this host runs custom handlers only",
        )
    })?;
    let executable = match description.get("defaultExecutablePath") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        _ => {
            return Err(field_error(
                path,
                "customHandler.description.defaultExecutablePath",
                "must be a non-empty string",
            ))
        }
    };
    // As the host does: a relative path is joined to the app root only if that file exists.
    let under_root = root.join(&executable);
    let executable = if Path::new(&executable).is_relative() && under_root.is_file() {
        under_root
    } else {
        PathBuf::from(executable)
    };
    let working_directory = match description.get("workingDirectory") {
        None | Some(Value::Null) => root.to_path_buf(),
        Some(Value::String(s)) if s.is_empty() => root.to_path_buf(),
        Some(Value::String(s)) => root.join(s),
        Some(_) => {
            return Err(field_error(
                path,
                "customHandler.description.workingDirectory",
                "must be a string",
            ))
        }
    };
    let arguments = match description.get("arguments") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let field = format!("customHandler.description.arguments[{i}]");
                let text = item
                    .as_str()
                    .ok_or_else(|| field_error(path, &field, "must be a string"))?;
                expand_settings(text, lookup).map_err(|reason| field_error(path, &field, reason))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(field_error(
                path,
                "customHandler.description.arguments",
                "must be an array of strings",
            ))
        }
    };
    Ok(HandlerDescription {
        executable,
        working_directory,
        arguments,
    })
}

fn read_service_bus_options(path: &Path, host: &Value) -> Result<ServiceBusOptions, AppError> {
    let mut options = ServiceBusOptions::default();
    let Some(section) = host.pointer("/extensions/serviceBus") else {
        return Ok(options);
    };
    if let Some(value) = section.get("maxConcurrentCalls") {
        options.max_concurrent_calls = value
            .as_u64()
            .filter(|n| *n >= 1)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                field_error(
                    path,
                    "extensions.serviceBus.maxConcurrentCalls",
                    "must be a positive integer",
                )
            })?;
    }
    if let Some(value) = section.get("autoCompleteMessages") {
        options.auto_complete_messages = value.as_bool().ok_or_else(|| {
            field_error(
                path,
                "extensions.serviceBus.autoCompleteMessages",
                "must be true or false",
            )
        })?;
    }
    if let Some(value) = section.get("maxAutoLockRenewalDuration") {
        options.max_auto_lock_renewal =
            value.as_str().and_then(parse_timespan).ok_or_else(|| {
                field_error(
                    path,
                    "extensions.serviceBus.maxAutoLockRenewalDuration",
                    "must be a string hh:mm:ss",
                )
            })?;
    }
    Ok(options)
}

fn read_function(
    name: &str,
    path: &Path,
    json: &Value,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<FunctionDef, AppError> {
    let bindings = json
        .get("bindings")
        .and_then(Value::as_array)
        .ok_or_else(|| field_error(path, "bindings", "must be an array"))?;
    let mut trigger = None;
    let mut outputs = Vec::new();
    for (i, binding) in bindings.iter().enumerate() {
        let at = |key: &str| format!("bindings[{i}].{key}");
        let object = binding
            .as_object()
            .ok_or_else(|| field_error(path, &format!("bindings[{i}]"), "must be an object"))?;
        let text = |key: &str| -> Result<Option<String>, AppError> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(field_error(path, &at(key), "must be a string")),
            }
        };
        let required = |key: &str| -> Result<String, AppError> {
            text(key)?
                .filter(|s| !s.is_empty())
                .ok_or_else(|| field_error(path, &at(key), "is required"))
        };
        let kind = required("type")?;
        let binding_name = required("name")?;
        let direction = text("direction")?.unwrap_or_default().to_ascii_lowercase();
        let is_trigger = kind.ends_with("Trigger") || kind.ends_with("trigger");
        if is_trigger {
            if trigger.is_some() {
                return Err(field_error(
                    path,
                    &at("type"),
                    "a function has exactly one trigger binding",
                ));
            }
            if direction != "in" {
                return Err(field_error(
                    path,
                    &at("direction"),
                    "a trigger must be \"in\"",
                ));
            }
            trigger = Some(read_trigger(
                &kind,
                binding_name,
                name,
                path,
                object,
                i,
                lookup,
            )?);
        } else if direction == "out" {
            let output = match kind.as_str() {
                "serviceBus" => OutputBinding::ServiceBus {
                    name: binding_name,
                    queue_name: required("queueName")?,
                    connection: text("connection")?.unwrap_or_default(),
                },
                "http" => OutputBinding::Http { name: binding_name },
                other => {
                    return Err(field_error(
                        path,
                        &at("type"),
                        format!(
                            "output binding type {other:?} is not supported (serviceBus, http)"
                        ),
                    ))
                }
            };
            if outputs
                .iter()
                .any(|o: &OutputBinding| o.name() == output.name())
            {
                return Err(field_error(path, &at("name"), "duplicate binding name"));
            }
            outputs.push(output);
        } else {
            return Err(field_error(
                path,
                &at("direction"),
                format!("input binding type {kind:?} is not supported"),
            ));
        }
    }
    let trigger =
        trigger.ok_or_else(|| field_error(path, "bindings", "no trigger binding found"))?;
    Ok(FunctionDef {
        name: name.to_string(),
        trigger,
        outputs,
    })
}

fn read_trigger(
    kind: &str,
    name: String,
    function_name: &str,
    path: &Path,
    object: &Map<String, Value>,
    index: usize,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<Trigger, AppError> {
    let at = |key: &str| format!("bindings[{index}].{key}");
    let text = |key: &str| -> Result<Option<String>, AppError> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(field_error(path, &at(key), "must be a string")),
        }
    };
    let flag = |key: &str| -> Result<bool, AppError> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(field_error(path, &at(key), "must be true or false")),
        }
    };
    match kind {
        "serviceBusTrigger" => {
            if text("topicName")?.is_some() {
                return Err(field_error(
                    path,
                    &at("topicName"),
                    "topics are not supported by the local host; use queueName",
                ));
            }
            if flag("isSessionsEnabled")? {
                return Err(field_error(
                    path,
                    &at("isSessionsEnabled"),
                    "sessions are not supported by the local host",
                ));
            }
            if text("cardinality")?.is_some_and(|c| c.eq_ignore_ascii_case("many")) {
                return Err(field_error(
                    path,
                    &at("cardinality"),
                    "\"many\" is not supported by the local host",
                ));
            }
            let queue_name = text("queueName")?
                .filter(|q| !q.is_empty())
                .ok_or_else(|| field_error(path, &at("queueName"), "is required"))?;
            let binary = text("dataType")?.is_some_and(|d| d.eq_ignore_ascii_case("binary"));
            Ok(Trigger::ServiceBus {
                name,
                queue_name,
                connection: text("connection")?.unwrap_or_default(),
                binary,
            })
        }
        "timerTrigger" => {
            let raw = text("schedule")?
                .filter(|s| !s.is_empty())
                .ok_or_else(|| field_error(path, &at("schedule"), "is required"))?;
            let expression = resolve_whole_setting(&raw, lookup)
                .map_err(|reason| field_error(path, &at("schedule"), reason))?;
            let schedule = Schedule::parse(&expression).map_err(|source| AppError::Schedule {
                path: path.to_path_buf(),
                field: at("schedule"),
                source,
            })?;
            Ok(Trigger::Timer {
                name,
                schedule: Box::new(schedule),
                run_on_startup: flag("runOnStartup")?,
            })
        }
        "httpTrigger" => {
            let auth_level = match text("authLevel")?
                .unwrap_or_else(|| "function".to_string())
                .to_ascii_lowercase()
                .as_str()
            {
                "anonymous" => AuthLevel::Anonymous,
                "function" => AuthLevel::Function,
                "admin" => AuthLevel::Admin,
                other => {
                    return Err(field_error(
                        path,
                        &at("authLevel"),
                        format!("expected anonymous, function or admin, got {other:?}"),
                    ))
                }
            };
            let methods = match object.get("methods") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|m| {
                        m.as_str()
                            .map(str::to_ascii_uppercase)
                            .ok_or_else(|| field_error(path, &at("methods"), "must be strings"))
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => {
                    return Err(field_error(
                        path,
                        &at("methods"),
                        "must be an array of strings",
                    ))
                }
            };
            let route = text("route")?
                .map(|r| r.trim_matches('/').to_string())
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| function_name.to_string());
            Ok(Trigger::Http {
                name,
                auth_level,
                methods,
                route,
            })
        }
        other => Err(field_error(
            path,
            &at("type"),
            format!(
                "trigger type {other:?} is not supported (serviceBusTrigger, timerTrigger, httpTrigger)"
            ),
        )),
    }
}

/// Expands every `%NAME%` in `text`; an unknown name is an error (the host would pass it on
/// unexpanded, which only hides the mistake until the handler fails).
pub fn expand_settings(
    text: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('%') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('%') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        if name.is_empty() {
            out.push('%');
        } else {
            let value =
                lookup(name).ok_or_else(|| format!("app setting {name:?} is not defined"))?;
            out.push_str(&value);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A timer schedule may be a whole `%AppSetting%` reference.
fn resolve_whole_setting(
    text: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let trimmed = text.trim();
    if trimmed.len() > 2 && trimmed.starts_with('%') && trimmed.ends_with('%') {
        let name = &trimmed[1..trimmed.len() - 1];
        return lookup(name).ok_or_else(|| format!("app setting {name:?} is not defined"));
    }
    Ok(text.to_string())
}

/// .NET TimeSpan text as host.json uses it: `hh:mm:ss`, optionally `d.hh:mm:ss` and fractional seconds.
pub fn parse_timespan(text: &str) -> Option<Duration> {
    let (days, clock) = match text.split_once('.') {
        Some((d, rest)) if rest.contains(':') && !d.contains(':') => (d.parse::<u64>().ok()?, rest),
        _ => (0, text),
    };
    let parts: Vec<&str> = clock.split(':').collect();
    let [h, m, s] = parts.as_slice() else {
        return None;
    };
    let hours: u64 = h.parse().ok()?;
    let minutes: u64 = m.parse().ok()?;
    let seconds: f64 = s.parse().ok()?;
    if minutes >= 60 || !(0.0..60.0).contains(&seconds) {
        return None;
    }
    Some(
        Duration::from_secs(days * 86_400 + hours * 3_600 + minutes * 60)
            + Duration::from_secs_f64(seconds),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_app(files: &[(&str, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("vmbackup-app-{}", uuid::Uuid::new_v4()));
        for (rel, text) in files {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        root
    }

    const HOST: &str = r#"{ "version": "2.0",
        "functionTimeout": "00:10:00",
        "customHandler": { "description": { "defaultExecutablePath": "vmbackup",
            "workingDirectory": "", "arguments": ["serve", "--region", "%REGION%"] } },
        "extensions": { "serviceBus": { "maxConcurrentCalls": 4, "autoCompleteMessages": true,
            "maxAutoLockRenewalDuration": "00:02:00" } } }"#;

    #[test]
    fn reads_host_and_both_function_layouts() {
        let root = temp_app(&[
            ("host.json", HOST),
            ("vmbackup", "#!/bin/sh\n"),
            (
                "assess-vm/function.json",
                r#"{ "bindings": [
                { "type": "serviceBusTrigger", "direction": "in", "name": "msg",
                  "queueName": "protection-requested", "connection": "SB" },
                { "type": "serviceBus", "direction": "out", "name": "ready",
                  "queueName": "protection-ready", "connection": "SB" } ] }"#,
            ),
            (
                "functions/backup-sweep/function.json",
                r#"{ "bindings": [ { "type": "timerTrigger", "direction": "in", "name": "timer",
                  "schedule": "%SWEEP%", "runOnStartup": true },
                  { "type": "serviceBus", "direction": "out", "name": "out", "queueName": "backup-requested" } ] }"#,
            ),
            (
                "restore-webhook/function.json",
                r#"{ "bindings": [ { "type": "httpTrigger", "direction": "in", "name": "req",
                  "methods": ["post"], "route": "/restore/{ticket}" },
                  { "type": "http", "direction": "out", "name": "res" } ] }"#,
            ),
            (
                "off/function.json",
                r#"{ "disabled": true, "bindings": [] }"#,
            ),
        ]);
        let settings = HashMap::from([
            ("REGION".to_string(), "westeurope".to_string()),
            ("SWEEP".to_string(), "0 30 9 * * 1-5".to_string()),
        ]);
        let app = App::load(&root, &settings).unwrap();
        assert_eq!(app.handler.executable, root.join("vmbackup"));
        assert_eq!(app.handler.working_directory, root);
        assert_eq!(
            app.handler.arguments,
            vec!["serve", "--region", "westeurope"]
        );
        assert_eq!(app.service_bus.max_concurrent_calls, 4);
        assert_eq!(
            app.service_bus.max_auto_lock_renewal,
            Duration::from_secs(120)
        );
        assert_eq!(app.function_timeout, Some(Duration::from_secs(600)));
        let names: Vec<_> = app.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, vec!["assess-vm", "backup-sweep", "restore-webhook"]);
        match &app.function("backup-sweep").unwrap().trigger {
            Trigger::Timer {
                schedule,
                run_on_startup,
                ..
            } => {
                assert_eq!(schedule.expression(), "0 30 9 * * 1-5");
                assert!(run_on_startup);
            }
            other => panic!("unexpected trigger {other:?}"),
        }
        match &app.function("restore-webhook").unwrap().trigger {
            Trigger::Http {
                auth_level,
                methods,
                route,
                ..
            } => {
                assert_eq!(*auth_level, AuthLevel::Function);
                assert_eq!(methods, &vec!["POST".to_string()]);
                assert_eq!(route, "restore/{ticket}");
            }
            other => panic!("unexpected trigger {other:?}"),
        }
        assert_eq!(
            app.queue_names(),
            vec![
                "backup-requested",
                "protection-ready",
                "protection-requested"
            ]
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let root = temp_app(&[
            ("host.json", HOST),
            (
                "broken/function.json",
                r#"{ "bindings": [ { "type": "serviceBusTrigger", "direction": "in", "name": "msg" } ] }"#,
            ),
        ]);
        let settings = HashMap::from([("REGION".to_string(), "x".to_string())]);
        let err = App::load(&root, &settings).unwrap_err().to_string();
        assert!(err.contains("broken/function.json"), "{err}");
        assert!(err.contains("bindings[0].queueName"), "{err}");

        // An unknown %SETTING% in the arguments names the setting and the field.
        let err = App::load(&root, &HashMap::new()).unwrap_err().to_string();
        assert!(
            err.contains("customHandler.description.arguments[2]"),
            "{err}"
        );
        assert!(err.contains("REGION"), "{err}");

        std::fs::write(
            root.join("host.json"),
            r#"{ "version": "2.0", "customHandler": { "description": { "defaultExecutablePath": "" } } }"#,
        )
        .unwrap();
        let err = App::load(&root, &settings).unwrap_err().to_string();
        assert!(err.contains("defaultExecutablePath"), "{err}");

        std::fs::write(root.join("host.json"), "{ not json").unwrap();
        let err = App::load(&root, &settings).unwrap_err().to_string();
        assert!(err.contains("host.json is not valid JSON"), "{err}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn bad_schedule_names_the_binding() {
        let root = temp_app(&[
            (
                "host.json",
                r#"{ "customHandler": { "description": { "defaultExecutablePath": "sh" } } }"#,
            ),
            (
                "t/function.json",
                r#"{ "bindings": [ { "type": "timerTrigger", "direction": "in", "name": "t", "schedule": "0 99 * * * *" } ] }"#,
            ),
        ]);
        let err = App::load(&root, &HashMap::new()).unwrap_err().to_string();
        assert!(err.contains("bindings[0].schedule"), "{err}");
        assert!(err.contains("t/function.json"), "{err}");
        let app_err = App::load(&root, &HashMap::new()).unwrap_err();
        assert!(matches!(app_err, AppError::Schedule { .. }));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn executable_falls_back_to_path_and_timespans_parse() {
        let root = temp_app(&[(
            "host.json",
            r#"{ "customHandler": { "description": { "defaultExecutablePath": "python3", "workingDirectory": "work" } } }"#,
        )]);
        let app = App::load(&root, &HashMap::new()).unwrap();
        assert_eq!(app.handler.executable, PathBuf::from("python3"));
        assert_eq!(app.handler.working_directory, root.join("work"));
        assert_eq!(app.service_bus, ServiceBusOptions::default());
        assert_eq!(app.route_prefix, "api");
        std::fs::remove_dir_all(root).unwrap();

        assert_eq!(parse_timespan("00:00:30"), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_timespan("1.02:00:00"),
            Some(Duration::from_secs(93_600))
        );
        assert_eq!(
            parse_timespan("00:00:00.80"),
            Some(Duration::from_millis(800))
        );
        assert_eq!(parse_timespan("00:61:00"), None);
        assert_eq!(parse_timespan("ten"), None);
    }
}
