//! The invocation the host sends: `{"Data": {...}, "Metadata": {...}}`, typed.

use super::decode::{metadata_bool, metadata_string, metadata_u64, parse_timestamp};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The raw request body of an invocation.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct InvocationRequest {
    #[serde(rename = "Data", default)]
    pub data: Map<String, Value>,
    #[serde(rename = "Metadata", default)]
    pub metadata: Map<String, Value>,
}

/// What a handler gets: the decoded trigger payload, typed metadata and its context.
#[derive(Debug, Clone)]
pub struct Invocation<T> {
    pub data: T,
    pub metadata: TriggerMetadata,
    pub context: Context,
}

/// Who is being invoked, and how.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub function_name: String,
    /// `X-Azure-Functions-InvocationId`, or a fresh id when the caller sent none.
    pub invocation_id: String,
    /// `Metadata.sys.UtcNow`, when the host sent it.
    pub host_utc_now: Option<DateTime<Utc>>,
    /// `Metadata.RetryContext`, present while a function-level retry policy runs.
    pub retry: Option<RetryContext>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryContext {
    pub retry_count: u64,
    pub max_retry_count: Option<u64>,
}

/// Trigger-specific metadata.
#[derive(Debug, Clone, PartialEq)]
pub enum TriggerMetadata {
    ServiceBus(ServiceBusMetadata),
    Timer,
    Http,
}

impl TriggerMetadata {
    pub fn service_bus(&self) -> Option<&ServiceBusMetadata> {
        match self {
            TriggerMetadata::ServiceBus(metadata) => Some(metadata),
            _ => None,
        }
    }
}

/// Service Bus trigger metadata (extension 5.x names).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceBusMetadata {
    pub message_id: Option<String>,
    pub delivery_count: u64,
    pub enqueued_time_utc: Option<DateTime<Utc>>,
    pub correlation_id: Option<String>,
    pub subject: Option<String>,
    pub content_type: Option<String>,
    pub sequence_number: Option<u64>,
    pub application_properties: Map<String, Value>,
}

/// The timer trigger payload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TimerInfo {
    pub schedule_status: Option<ScheduleStatus>,
    pub is_past_due: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleStatus {
    pub last: Option<DateTime<Utc>>,
    pub next: Option<DateTime<Utc>>,
    pub last_updated: Option<DateTime<Utc>>,
}

/// The HTTP trigger payload in JSON mode (`Data.req`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpRequest {
    pub url: String,
    pub method: String,
    pub query: BTreeMap<String, String>,
    /// Header names lower-cased; the host sends each as a list of values.
    pub headers: BTreeMap<String, Vec<String>>,
    pub params: BTreeMap<String, String>,
    /// The body as text (the host sends it as a string).
    pub body: Option<String>,
}

impl HttpRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(|values| values.first())
            .map(String::as_str)
    }
}

/// A bad envelope: the field that was wrong and why. Answered with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct EnvelopeError {
    pub field: String,
    pub reason: String,
}

impl EnvelopeError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        EnvelopeError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

// `at` is the JSON path of the map the key is read from (`Metadata`, `Metadata.sys`), so an error
// names the field where it is.
fn optional_string(
    metadata: &Map<String, Value>,
    at: &str,
    key: &str,
) -> Result<Option<String>, EnvelopeError> {
    match metadata.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => metadata_string(value)
            .map(Some)
            .ok_or_else(|| EnvelopeError::new(format!("{at}.{key}"), "expected a string")),
    }
}

fn optional_u64(
    metadata: &Map<String, Value>,
    at: &str,
    key: &str,
) -> Result<Option<u64>, EnvelopeError> {
    match metadata.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => metadata_u64(value).map(Some).ok_or_else(|| {
            EnvelopeError::new(
                format!("{at}.{key}"),
                format!("expected a whole number, got {value}"),
            )
        }),
    }
}

fn optional_time(
    metadata: &Map<String, Value>,
    at: &str,
    key: &str,
) -> Result<Option<DateTime<Utc>>, EnvelopeError> {
    match metadata.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match parse_timestamp(value) {
            Some(time) => Ok(Some(time)),
            // .NET's "never" (year 1) is a valid absence, anything unparseable is an error.
            None if metadata_string(value).is_some_and(|t| t.starts_with("0001")) => Ok(None),
            None => Err(EnvelopeError::new(
                format!("{at}.{key}"),
                format!("expected a timestamp, got {value}"),
            )),
        },
    }
}

fn object(value: Option<&Value>) -> Map<String, Value> {
    match value.cloned().map(super::decode::unwrap_json_strings) {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

impl ServiceBusMetadata {
    pub fn from_metadata(metadata: &Map<String, Value>) -> Result<Self, EnvelopeError> {
        let application_properties = match metadata.get("ApplicationProperties") {
            Some(value) => object(Some(value)),
            None => object(metadata.get("UserProperties")),
        };
        Ok(ServiceBusMetadata {
            message_id: optional_string(metadata, "Metadata", "MessageId")?,
            delivery_count: optional_u64(metadata, "Metadata", "DeliveryCount")?.unwrap_or(1),
            enqueued_time_utc: optional_time(metadata, "Metadata", "EnqueuedTimeUtc")?,
            correlation_id: optional_string(metadata, "Metadata", "CorrelationId")?,
            subject: match optional_string(metadata, "Metadata", "Subject")? {
                Some(subject) => Some(subject),
                None => optional_string(metadata, "Metadata", "Label")?,
            },
            content_type: optional_string(metadata, "Metadata", "ContentType")?,
            sequence_number: optional_u64(metadata, "Metadata", "SequenceNumber")?,
            application_properties,
        })
    }
}

impl TimerInfo {
    pub fn from_value(value: Value, field: &str) -> Result<Self, EnvelopeError> {
        let value = super::decode::unwrap_json_strings(value);
        let Value::Object(map) = value else {
            return Err(EnvelopeError::new(field, "expected the timer object"));
        };
        let schedule_status = match map.get("ScheduleStatus") {
            None | Some(Value::Null) => None,
            Some(Value::Object(status)) => Some(ScheduleStatus {
                last: optional_time(status, &format!("{field}.ScheduleStatus"), "Last")?,
                next: optional_time(status, &format!("{field}.ScheduleStatus"), "Next")?,
                last_updated: optional_time(
                    status,
                    &format!("{field}.ScheduleStatus"),
                    "LastUpdated",
                )?,
            }),
            Some(_) => {
                return Err(EnvelopeError::new(
                    format!("{field}.ScheduleStatus"),
                    "expected an object or null",
                ))
            }
        };
        let is_past_due = match map.get("IsPastDue") {
            None | Some(Value::Null) => false,
            Some(value) => metadata_bool(value).ok_or_else(|| {
                EnvelopeError::new(format!("{field}.IsPastDue"), "expected true or false")
            })?,
        };
        Ok(TimerInfo {
            schedule_status,
            is_past_due,
        })
    }
}

fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
    object(value)
        .iter()
        .filter_map(|(k, v)| metadata_string(v).map(|v| (k.clone(), v)))
        .collect()
}

impl HttpRequest {
    pub fn from_value(value: Value, field: &str) -> Result<Self, EnvelopeError> {
        let value = super::decode::unwrap_json_strings(value);
        let Value::Object(map) = value else {
            return Err(EnvelopeError::new(
                field,
                "expected the HTTP request object",
            ));
        };
        let text = |key: &str| map.get(key).and_then(metadata_string);
        let headers = object(map.get("Headers"))
            .into_iter()
            .map(|(name, values)| {
                let values = match values {
                    Value::Array(items) => items.iter().filter_map(metadata_string).collect(),
                    other => metadata_string(&other).into_iter().collect(),
                };
                (name.to_ascii_lowercase(), values)
            })
            .collect();
        let body = match map.get("Body") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(text.clone()),
            // Some hosts send a JSON body already parsed.
            Some(other) => Some(other.to_string()),
        };
        Ok(HttpRequest {
            url: text("Url").unwrap_or_default(),
            method: text("Method")
                .ok_or_else(|| EnvelopeError::new(format!("{field}.Method"), "missing"))?,
            query: string_map(map.get("Query")),
            headers,
            params: string_map(map.get("Params")),
            body,
        })
    }
}

impl Context {
    pub fn from_metadata(
        function_name: &str,
        invocation_id: Option<String>,
        metadata: &Map<String, Value>,
    ) -> Result<Self, EnvelopeError> {
        let sys = object(metadata.get("sys"));
        let retry = match metadata.get("RetryContext") {
            None | Some(Value::Null) => None,
            Some(value) => {
                let retry = object(Some(value));
                Some(RetryContext {
                    retry_count: optional_u64(&retry, "Metadata.RetryContext", "RetryCount")?
                        .unwrap_or(0),
                    max_retry_count: optional_u64(
                        &retry,
                        "Metadata.RetryContext",
                        "MaxRetryCount",
                    )?,
                })
            }
        };
        Ok(Context {
            function_name: function_name.to_string(),
            invocation_id: invocation_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            host_utc_now: optional_time(&sys, "Metadata.sys", "UtcNow")?,
            retry,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn service_bus_metadata_with_string_numbers_and_quoted_strings() {
        let metadata = json!({
            "DeliveryCount": "3", "MessageId": "\"4f1c\"", "SequenceNumber": "17",
            "EnqueuedTimeUtc": "11/28/2026 10:56:08 AM", "CorrelationId": "run-1",
            "Label": "vmbackup.protection.requested",
            "ApplicationProperties": {"tenant": "a"},
            "sys": {"MethodName": "assess-vm", "UtcNow": "2026-11-28T10:56:09Z", "RandGuid": "x"}
        });
        let parsed = ServiceBusMetadata::from_metadata(metadata.as_object().unwrap()).unwrap();
        assert_eq!(parsed.delivery_count, 3);
        assert_eq!(parsed.message_id.as_deref(), Some("4f1c"));
        assert_eq!(parsed.sequence_number, Some(17));
        assert_eq!(
            parsed.subject.as_deref(),
            Some("vmbackup.protection.requested")
        );
        assert_eq!(parsed.application_properties["tenant"], "a");
        assert!(parsed.enqueued_time_utc.is_some());
    }

    #[test]
    fn bad_delivery_count_names_the_field() {
        let metadata = json!({"DeliveryCount": "many"});
        let err = ServiceBusMetadata::from_metadata(metadata.as_object().unwrap()).unwrap_err();
        assert_eq!(err.field, "Metadata.DeliveryCount");
    }

    #[test]
    fn nested_metadata_errors_name_the_whole_path() {
        // Regression (bad_input proptest): these were named `Metadata.UtcNow`, `Metadata.RetryCount`
        // and `Metadata.Next`, fields that do not exist.
        let metadata = json!({"sys": {"UtcNow": "soon"}});
        let err = Context::from_metadata("f", None, metadata.as_object().unwrap()).unwrap_err();
        assert_eq!(err.field, "Metadata.sys.UtcNow");
        let metadata = json!({"RetryContext": {"RetryCount": "x"}});
        let err = Context::from_metadata("f", None, metadata.as_object().unwrap()).unwrap_err();
        assert_eq!(err.field, "Metadata.RetryContext.RetryCount");
        let err = TimerInfo::from_value(json!({"ScheduleStatus": {"Next": 5}}), "Data.timer")
            .unwrap_err();
        assert_eq!(err.field, "Data.timer.ScheduleStatus.Next");
    }

    #[test]
    fn timer_with_and_without_schedule_status() {
        let with = TimerInfo::from_value(
            json!({"Schedule":{"AdjustForDST":true},
                   "ScheduleStatus":{"Last":"2026-11-28T09:00:00+00:00","Next":"2026-11-28T10:00:00+00:00",
                                      "LastUpdated":"0001-01-01T00:00:00"},
                   "IsPastDue":false}),
            "Data.timer",
        )
        .unwrap();
        let status = with.schedule_status.unwrap();
        assert!(status.next.is_some());
        assert_eq!(status.last_updated, None);
        let without = TimerInfo::from_value(
            json!({"Schedule":{"AdjustForDST":true},"ScheduleStatus":null,"IsPastDue":"True"}),
            "Data.timer",
        )
        .unwrap();
        assert_eq!(without.schedule_status, None);
        assert!(without.is_past_due);
    }

    #[test]
    fn http_request_in_json_mode() {
        let req = HttpRequest::from_value(
            json!({"Url":"http://localhost/api/restore-webhook?code=k","Method":"POST",
                   "Query":{"code":"k"},"Headers":{"Content-Type":["application/json"]},
                   "Params":{},"Body":"{\"ticketId\":\"INC-1\"}"}),
            "Data.req",
        )
        .unwrap();
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(req.query["code"], "k");
        assert_eq!(req.body.as_deref(), Some("{\"ticketId\":\"INC-1\"}"));
    }
}
