//! Typed errors: ARM error bodies become `ArmError`s the workflow can branch on by code.

use serde::Deserialize;
use serde_json::Value;

/// One ARM error (or one of its `details`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct ArmErrorDetail {
    #[serde(default, deserialize_with = "string_or_number")]
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub details: Vec<ArmErrorDetail>,
}

impl ArmErrorDetail {
    /// This error or any nested detail carries `code` (ASCII case-insensitive).
    pub fn has_code(&self, code: &str) -> bool {
        self.code.eq_ignore_ascii_case(code) || self.details.iter().any(|d| d.has_code(code))
    }
}

/// Some services send numeric codes (`"code": 400094`); keep them as text.
fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

/// A failed ARM (or data-plane) call: the HTTP status, the error body and the request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmError {
    pub status: u16,
    pub error: ArmErrorDetail,
    /// `x-ms-request-id` of the failing response, for support cases.
    pub request_id: Option<String>,
}

impl ArmError {
    /// Reads `{"error": {code, message, target, details}}` or a bare `{code, message}` body;
    /// anything else keeps the status and a short excerpt of the body as the message.
    pub fn from_response(status: u16, body: &[u8], request_id: Option<String>) -> Self {
        #[derive(Deserialize)]
        struct Envelope {
            error: ArmErrorDetail,
        }
        let error = serde_json::from_slice::<Envelope>(body)
            .map(|e| e.error)
            .or_else(|_| serde_json::from_slice::<ArmErrorDetail>(body))
            .ok()
            .filter(|e| !e.code.is_empty() || !e.message.is_empty())
            .unwrap_or_else(|| ArmErrorDetail {
                code: format!("Http{status}"),
                message: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
                ..Default::default()
            });
        ArmError {
            status,
            error,
            request_id,
        }
    }

    /// True when the error or any nested detail carries `code` (ASCII case-insensitive: the docs
    /// spell `UserErrorKeyvault…` and `UserErrorKeyVault…`).
    pub fn has_code(&self, code: &str) -> bool {
        self.error.has_code(code)
    }
}

impl std::fmt::Display for ArmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HTTP {} {}: {}",
            self.status, self.error.code, self.error.message
        )?;
        if let Some(target) = &self.error.target {
            write!(f, " (target {target})")?;
        }
        if let Some(id) = &self.request_id {
            write!(f, " [x-ms-request-id {id}]")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AzureError {
    /// Azure answered with an error status (after retries, for retryable ones).
    #[error("{0}")]
    Arm(Box<ArmError>),
    /// A long-running operation ended as Failed or Canceled.
    #[error("operation {status}: {}: {} (polled {url})", error.code, error.message)]
    OperationFailed {
        status: String,
        error: Box<ArmErrorDetail>,
        url: String,
    },
    /// No answer from Azure (connect error, timeout) after the retries.
    #[error("request to {url} failed: {message}")]
    Transport { url: String, message: String },
    /// The retry or polling budget ran out.
    #[error("gave up on {url} after {attempts} attempts: {reason}")]
    GaveUp {
        url: String,
        attempts: u32,
        reason: String,
    },
    /// The credential could not produce a token.
    #[error("authentication failed for {audience}: {message}")]
    Auth { audience: String, message: String },
    /// A response body did not have the expected shape.
    #[error("unexpected response from {url}: {message}")]
    Decode { url: String, message: String },
    /// A setting is missing or malformed.
    #[error("setting {name} {message}")]
    Config { name: String, message: String },
    /// A caller passed a value that cannot be sent.
    #[error("invalid {field}: {message}")]
    InvalidInput { field: String, message: String },
    /// Sending to Service Bus failed.
    #[error("Service Bus send to {queue} failed: {message}")]
    ServiceBus { queue: String, message: String },
}

impl AzureError {
    /// True when this is an ARM error (or a failed operation) carrying `code`, case-insensitively.
    pub fn has_code(&self, code: &str) -> bool {
        match self {
            AzureError::Arm(e) => e.has_code(code),
            AzureError::OperationFailed { error, .. } => error.has_code(code),
            _ => false,
        }
    }

    /// The HTTP status of an ARM error.
    pub fn status(&self) -> Option<u16> {
        match self {
            AzureError::Arm(e) => Some(e.status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Worth retrying later (the host's retry, or a re-scheduled event): throttling, server errors,
    /// transport failures, an exhausted budget, and ARM's transient lock `RetryableErrorDueToAnotherOperation`.
    pub fn is_transient(&self) -> bool {
        match self {
            AzureError::Arm(e) => {
                e.status == 429
                    || e.status >= 500
                    || e.has_code("RetryableErrorDueToAnotherOperation")
            }
            AzureError::Transport { .. } | AzureError::GaveUp { .. } => true,
            AzureError::Auth { .. } | AzureError::ServiceBus { .. } => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_arm_envelope_with_nested_details_and_matches_codes_case_insensitively() {
        let body = br#"{"error":{"code":"BadRequest","message":"outer","target":"vm",
            "details":[{"code":"UserErrorKeyvaultPermissionsNotConfigured","message":"inner"}]}}"#;
        let err = ArmError::from_response(400, body, Some("req-1".into()));
        assert_eq!(err.error.code, "BadRequest");
        assert_eq!(err.error.target.as_deref(), Some("vm"));
        assert!(err.has_code("UserErrorKeyVaultPermissionsNotConfigured"));
        assert!(err.has_code("badrequest"));
        assert!(!err.has_code("NotFound"));
        assert!(err.to_string().contains("req-1"));
    }

    #[test]
    fn bare_and_numeric_codes_and_non_json_bodies() {
        let err =
            ArmError::from_response(400, br#"{"code":400094,"message":"BCMV2VMNotFound"}"#, None);
        assert_eq!(err.error.code, "400094");
        let err = ArmError::from_response(502, b"<html>bad gateway</html>", None);
        assert_eq!(err.error.code, "Http502");
        assert!(err.error.message.contains("bad gateway"));
        assert!(AzureError::Arm(Box::new(err)).is_transient());
    }
}
