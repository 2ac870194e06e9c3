//! What a handler returns, and how it goes back to the host.

use serde::Serialize;
use serde_json::{json, Map, Value};

/// Values for the function's output bindings, keyed by binding name. Pushing twice to the same
/// binding makes an array, which the host sends as several messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outputs {
    values: Map<String, Value>,
    return_value: Option<Value>,
}

#[derive(Debug, thiserror::Error)]
#[error("output {binding} could not be serialized: {source}")]
pub struct OutputError {
    pub binding: String,
    #[source]
    pub source: serde_json::Error,
}

impl Outputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one message (a JSON object: the host tries to base64-decode string outputs) to `binding`.
    pub fn push<T: Serialize>(&mut self, binding: &str, value: &T) -> Result<(), OutputError> {
        let value = serde_json::to_value(value).map_err(|source| OutputError {
            binding: binding.to_string(),
            source,
        })?;
        match self.values.get_mut(binding) {
            Some(Value::Array(items)) => items.push(value),
            Some(_) => {}
            None => {
                self.values
                    .insert(binding.to_string(), Value::Array(vec![value]));
            }
        }
        Ok(())
    }

    /// Set the HTTP response of an HTTP-triggered function (binding `name`, usually `res`).
    pub fn http_response(&mut self, binding: &str, status: u16, body: Value) {
        self.values.insert(
            binding.to_string(),
            json!({
                "statusCode": status.to_string(),
                "body": body,
                "headers": { "Content-Type": "application/json" },
            }),
        );
    }

    pub fn set_return_value(&mut self, value: Value) {
        self.return_value = Some(value);
    }

    pub fn get(&self, binding: &str) -> Option<&Value> {
        self.values.get(binding)
    }

    /// Messages queued on `binding` (empty when none).
    pub fn messages(&self, binding: &str) -> &[Value] {
        match self.values.get(binding) {
            Some(Value::Array(items)) => items,
            _ => &[],
        }
    }

    pub fn bindings(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    pub(crate) fn into_response_body(self, logs: Vec<String>) -> Value {
        json!({
            "Outputs": Value::Object(self.values),
            "Logs": logs,
            "ReturnValue": self.return_value.unwrap_or(Value::Null),
        })
    }
}

/// Why a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth another try (an Azure 5xx, a timeout): answered 500, so the host retries the message
    /// and finally dead-letters it.
    #[error("{0}")]
    Transient(String),
    /// The input can never be processed. Handlers turn such messages into `*.rejected` events
    /// instead; this is for the rare case where even that is impossible. Answered 400.
    #[error("{0}")]
    BadInput(String),
}

impl HandlerError {
    pub fn transient(message: impl std::fmt::Display) -> Self {
        HandlerError::Transient(message.to_string())
    }

    pub fn bad_input(message: impl std::fmt::Display) -> Self {
        HandlerError::BadInput(message.to_string())
    }
}

impl From<OutputError> for HandlerError {
    fn from(error: OutputError) -> Self {
        HandlerError::Transient(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_to_one_binding_become_an_array() {
        let mut outputs = Outputs::new();
        outputs.push("out", &json!({"n": 1})).unwrap();
        outputs.push("out", &json!({"n": 2})).unwrap();
        assert_eq!(outputs.messages("out").len(), 2);
        let body = outputs.into_response_body(vec!["line".into()]);
        assert_eq!(body["Outputs"]["out"][1]["n"], 2);
        assert_eq!(body["Logs"][0], "line");
        assert_eq!(body["ReturnValue"], Value::Null);
    }

    #[test]
    fn http_response_status_is_a_string_as_the_host_expects() {
        let mut outputs = Outputs::new();
        outputs.http_response("res", 202, json!({"ok": true}));
        assert_eq!(outputs.get("res").unwrap()["statusCode"], "202");
    }
}
