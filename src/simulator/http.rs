//! Request and reply types shared by the providers, ARM's error body, path matching and api-version rules.

use axum::http::{HeaderMap, Method, StatusCode};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::collections::HashMap;

/// A request as the providers see it: decoded path segments, query, parsed JSON body.
pub struct Request<'a> {
    pub method: Method,
    pub segments: Vec<String>,
    pub query: HashMap<String, String>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    pub now: DateTime<Utc>,
    pub base_url: String,
}

impl Request<'_> {
    /// Match `pattern` (segments separated by `/`, `{}` captures one segment) against the path,
    /// case-insensitively as ARM does; returns the captured segments.
    pub fn route(&self, method: Method, pattern: &str) -> Option<Vec<String>> {
        if self.method != method {
            return None;
        }
        match_segments(pattern, &self.segments)
    }

    pub fn api_version(&self) -> &str {
        self.query
            .get("api-version")
            .map(String::as_str)
            .unwrap_or("")
    }

    pub fn json_body(&self) -> Result<Value, Reply> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(self.body).map_err(|e| {
            Reply::arm_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContent",
                &format!("The request content was invalid and could not be deserialized: {e}"),
            )
        })
    }
}

pub fn match_segments(pattern: &str, segments: &[String]) -> Option<Vec<String>> {
    let parts: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    if parts.len() != segments.len() {
        return None;
    }
    let mut captures = Vec::new();
    for (part, segment) in parts.iter().zip(segments) {
        if *part == "{}" {
            captures.push(segment.clone());
        } else if !part.eq_ignore_ascii_case(segment) {
            return None;
        }
    }
    Some(captures)
}

/// An answer: status, headers and an optional body (JSON, or raw bytes for blobs).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

#[derive(Debug, Clone)]
pub enum Body {
    Empty,
    Json(Value),
    Bytes {
        content: Vec<u8>,
        content_type: String,
    },
}

impl Reply {
    pub fn json(status: StatusCode, body: Value) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Body::Json(body),
        }
    }
    pub fn ok(body: Value) -> Reply {
        Reply::json(StatusCode::OK, body)
    }
    pub fn empty(status: StatusCode) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Body::Empty,
        }
    }
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.to_string(), value.into()));
        self
    }
    /// ARM's error body: `{"error":{"code":…,"message":…}}` (Key Vault's data plane uses the same shape).
    pub fn arm_error(status: StatusCode, code: &str, message: &str) -> Reply {
        Reply::json(status, json!({"error": {"code": code, "message": message}}))
    }
    pub fn not_found(kind: &str, name: &str) -> Reply {
        Reply::arm_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("The Resource '{kind}/{name}' under resource group was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix"),
        )
    }
    pub fn bad_request(code: &str, message: &str) -> Reply {
        Reply::arm_error(StatusCode::BAD_REQUEST, code, message)
    }
}

/// ARM's api-version rules: required, well-formed (`YYYY-MM-DD` with an optional `-preview`-style suffix);
/// any well-formed version is served. Key Vault's data plane also accepts `7.6`-style versions.
pub fn check_api_version(query: &HashMap<String, String>, allow_dotted: bool) -> Result<(), Reply> {
    let Some(version) = query.get("api-version") else {
        return Err(Reply::bad_request(
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        ));
    };
    if is_well_formed_api_version(version) || (allow_dotted && is_dotted_version(version)) {
        Ok(())
    } else {
        Err(Reply::bad_request(
            "InvalidApiVersionParameter",
            &format!("The api-version '{version}' is invalid. The supported versions are in the format 'yyyy-MM-dd' or 'yyyy-MM-dd-preview'."),
        ))
    }
}

fn is_well_formed_api_version(version: &str) -> bool {
    let (date, suffix) = match version.get(..10) {
        Some(date) => (date, &version[10..]),
        None => return false,
    };
    let date_ok = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").is_ok();
    let suffix_ok = suffix.is_empty()
        || (suffix.starts_with('-')
            && suffix.len() > 1
            && suffix[1..].chars().all(|c| c.is_ascii_alphanumeric()));
    date_ok && suffix_ok
}

fn is_dotted_version(version: &str) -> bool {
    let core = version.strip_suffix("-preview").unwrap_or(version);
    let mut parts = core.split('.');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None)
        if !a.is_empty() && !b.is_empty() && a.chars().all(|c| c.is_ascii_digit()) && b.chars().all(|c| c.is_ascii_digit()))
}

/// Decode `%XX` escapes in one path segment (protected-item names carry `;`, often escaped).
pub fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(value) = u8::from_str_radix(&segment[i + 1..i + 3], 16) {
                out.push(value);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// ISO 8601 duration as Azure Backup writes it (`PT9.8782791S`).
pub fn iso_duration(seconds: f64) -> String {
    format!("PT{:.4}S", seconds.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions() {
        let q = |v: &str| HashMap::from([("api-version".to_string(), v.to_string())]);
        assert!(check_api_version(&q("2025-04-01"), false).is_ok());
        assert!(check_api_version(&q("2099-12-31-preview"), false).is_ok());
        assert!(check_api_version(&q("7.6"), true).is_ok());
        assert!(check_api_version(&q("7.6"), false).is_err());
        assert!(check_api_version(&q("2025-13-01"), false).is_err());
        assert!(check_api_version(&q("latest"), false).is_err());
        assert!(check_api_version(&HashMap::new(), false).is_err());
    }

    #[test]
    fn segments_match_case_insensitively() {
        let segs: Vec<String> =
            "subscriptions/S/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"
                .split('/')
                .map(String::from)
                .collect();
        let caps = match_segments(
            "subscriptions/{}/resourcegroups/{}/providers/microsoft.compute/virtualmachines/{}",
            &segs,
        );
        assert_eq!(
            caps,
            Some(vec!["S".to_string(), "rg".to_string(), "vm".to_string()])
        );
        assert_eq!(
            percent_decode("VM%3Biaasvmcontainerv2%3Brg%3Bvm"),
            "VM;iaasvmcontainerv2;rg;vm"
        );
        assert_eq!(percent_decode("50%"), "50%");
    }
}
