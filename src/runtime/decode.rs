//! Lenient decoding of what the Functions host sends.
//!
//! The host turns .NET values into JSON in ways the docs don't show (see the protocol reference):
//! string trigger data arrives JSON-encoded inside a JSON string (sometimes twice), integers arrive
//! as strings, and timestamps are whatever `DateTime.ToString()` produced. These helpers accept
//! every form seen, so handlers see clean typed values.

use chrono::{DateTime, Datelike, NaiveDateTime, TimeZone, Utc};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How many layers of JSON-in-a-string are peeled at most (the host adds one or two).
const MAX_STRING_LAYERS: usize = 3;

/// Peel JSON that arrived encoded inside JSON strings: `"\"{\\\"a\\\":1}\""` → `{"a":1}`.
/// A string whose text is not JSON is kept as it is.
pub fn unwrap_json_strings(mut value: Value) -> Value {
    for _ in 0..MAX_STRING_LAYERS {
        let Value::String(text) = &value else { break };
        match serde_json::from_str::<Value>(text) {
            Ok(inner) => value = inner,
            Err(_) => break,
        }
    }
    value
}

/// A payload that did not decode: where in it, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PayloadError {
    /// The JSON path of the offending field inside the payload (`data.vmId`, `needs[0]`), empty when
    /// the payload as a whole is wrong.
    pub path: String,
    pub reason: String,
}

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// Deserialize `value` as `T`, keeping the path of the field that failed: serde_json's own error
/// names a missing field but not the field holding a value of the wrong type.
pub(crate) fn decode_value<T: DeserializeOwned>(value: Value) -> Result<T, PayloadError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        PayloadError {
            path: if path == "." { String::new() } else { path },
            reason: e.into_inner().to_string(),
        }
    })
}

/// Decode a trigger payload into `T`, accepting the plain and the double-encoded forms.
pub(crate) fn decode_payload_at_path<T: DeserializeOwned>(value: Value) -> Result<T, PayloadError> {
    // A payload that is itself a string type must not be peeled into a number or object.
    if let Ok(direct) = serde_json::from_value::<T>(value.clone()) {
        if !value.is_string() {
            return Ok(direct);
        }
    }
    decode_value(unwrap_json_strings(value))
}

/// Decode a trigger payload into `T`, accepting the plain and the double-encoded forms.
/// The error names the path of the offending field (`data.vmId: invalid type: …`).
pub fn decode_payload<T: DeserializeOwned>(value: Value) -> Result<T, String> {
    decode_payload_at_path(value).map_err(|e| e.to_string())
}

/// A metadata string: the host may send `"abc"` or `"\"abc\""`.
pub fn metadata_string(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::String(inner)) => Some(inner),
            _ => Some(text.clone()),
        },
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A metadata integer: `3`, `"3"` or `"\"3\""`.
pub fn metadata_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        other => metadata_string(other)?.trim().parse().ok(),
    }
}

/// A metadata boolean: `true`, `"true"`, `"True"`.
pub fn metadata_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        other => match metadata_string(other)?.trim().to_ascii_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        },
    }
}

/// .NET `DateTime.ToString()` shapes seen from the host besides RFC 3339.
const NAIVE_FORMATS: &[&str] = &[
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%m/%d/%Y %I:%M:%S %p",
    "%m/%d/%Y %H:%M:%S",
];

/// A timestamp as the host sends it: RFC 3339, RFC 2822, ISO 8601 without offset (taken as UTC),
/// or the invariant-culture `M/d/yyyy h:mm:ss tt`. Year 1 (`0001-01-01T00:00:00`, .NET's "never") → None.
pub fn parse_timestamp(value: &Value) -> Option<DateTime<Utc>> {
    let text = metadata_string(value)?;
    let text = text.trim();
    let parsed = DateTime::parse_from_rfc3339(text)
        .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .or_else(|_| DateTime::parse_from_str(text, "%m/%d/%Y %I:%M:%S %p %:z"))
        .or_else(|_| DateTime::parse_from_str(text, "%m/%d/%Y %H:%M:%S %:z"))
        .or_else(|_| DateTime::parse_from_rfc2822(text))
        .map(|dt| dt.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            let without_z = text.trim_end_matches('Z');
            NAIVE_FORMATS
                .iter()
                .find_map(|format| NaiveDateTime::parse_from_str(without_z, format).ok())
                .map(|naive| Utc.from_utc_datetime(&naive))
        })?;
    (parsed.year() > 1).then_some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Order {
        #[serde(rename = "orderId")]
        order_id: u32,
    }

    #[test]
    fn payload_plain_single_and_double_encoded() {
        let plain = json!({"orderId": 7});
        let once = json!("{\"orderId\":7}");
        let twice = Value::String(serde_json::to_string("{\"orderId\":7}").unwrap());
        for value in [plain, once, twice] {
            assert_eq!(decode_payload::<Order>(value), Ok(Order { order_id: 7 }));
        }
    }

    #[test]
    fn payload_error_names_the_field() {
        let err = decode_payload::<Order>(json!({"order": 7})).unwrap_err();
        assert!(err.contains("orderId"), "{err}");
    }

    #[test]
    fn payload_error_names_a_wrongly_typed_field_and_its_path() {
        // Regression (bad_input proptest): serde_json named no field for a value of the wrong type.
        let err = decode_payload::<Order>(json!({"orderId": [1]})).unwrap_err();
        assert!(err.starts_with("orderId: invalid type"), "{err}");
        let err = decode_payload_at_path::<Vec<Order>>(json!([{"orderId": 1}, {"orderId": "x"}]))
            .unwrap_err();
        assert_eq!(err.path, "[1].orderId");
    }

    #[test]
    fn string_payloads_are_unquoted_once() {
        assert_eq!(
            decode_payload::<String>(json!("\"hi\"")),
            Ok("hi".to_string())
        );
        assert_eq!(decode_payload::<String>(json!("hi")), Ok("hi".to_string()));
    }

    #[test]
    fn metadata_numbers_and_strings_in_every_form() {
        assert_eq!(metadata_u64(&json!("3")), Some(3));
        assert_eq!(metadata_u64(&json!(3)), Some(3));
        assert_eq!(metadata_u64(&json!("\"3\"")), Some(3));
        assert_eq!(metadata_u64(&json!("three")), None);
        assert_eq!(metadata_string(&json!("\"4f1c\"")), Some("4f1c".into()));
        assert_eq!(metadata_string(&json!("4f1c")), Some("4f1c".into()));
        assert_eq!(metadata_bool(&json!("True")), Some(true));
    }

    #[test]
    fn timestamps_in_host_shapes() {
        let expected = Utc.with_ymd_and_hms(2026, 11, 28, 10, 56, 8).unwrap();
        for text in [
            "2026-11-28T10:56:08Z",
            "2026-11-28T10:56:08+00:00",
            "2026-11-28T10:56:08.0000000Z",
            "2026-11-28T10:56:08",
            "11/28/2026 10:56:08 AM",
            "11/28/2026 10:56:08 AM +00:00",
            "Sat, 28 Nov 2026 10:56:08 +0000",
            "\"2026-11-28T10:56:08Z\"",
        ] {
            assert_eq!(parse_timestamp(&json!(text)), Some(expected), "{text}");
        }
        assert_eq!(parse_timestamp(&json!("0001-01-01T00:00:00")), None);
        assert_eq!(parse_timestamp(&json!("yesterday")), None);
    }
}
