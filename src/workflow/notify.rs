//! `notify` (queue `outcomes`): every end of a workflow — `*.enabled`, `*.granted`, `*.completed`,
//! `*.rejected`, `*.failed` — becomes one message on `notifications` (the event as it came, plus
//! notes of failed deliveries), a POST to `VMBACKUP_NOTIFY_WEBHOOK` when set, and, for restore
//! outcomes that carry a `callbackUrl`, a POST to the ticket's callback.
//!
//! POSTs are retried with backoff a bounded number of times; a dead webhook or callback never fails
//! the invocation (the outcome is still on `notifications`, with a note saying what failed).

use super::Deps;
use crate::azure::RetryPolicy;
use crate::events::{queues, EventData, RestoreCompleted, RestoreFailed, RestoreRejected};
use crate::runtime::{FunctionSpec, HandlerError, Invocation, OutputBinding, Outputs, Trigger};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

pub const NAME: &str = "notify";
const NOTIFICATIONS_OUT: &str = "notifications";

/// CloudEvents extension attributes (lowercase letters only, as the spec requires) for notes.
pub const WEBHOOK_ERROR_ATTRIBUTE: &str = "webhookerror";
pub const CALLBACK_ERROR_ATTRIBUTE: &str = "callbackerror";

/// Attempts per POST, and the time each may take.
const POST_ATTEMPTS: u32 = 4;
const POST_TIMEOUT: Duration = Duration::from_secs(10);

pub fn spec() -> FunctionSpec {
    FunctionSpec::new(NAME, Trigger::service_bus(queues::OUTCOMES)).output(
        OutputBinding::service_bus(NOTIFICATIONS_OUT, queues::NOTIFICATIONS),
    )
}

/// The outcome types whose `data.callbackUrl` is a ticket system's callback.
const RESTORE_OUTCOMES: [&str; 3] = [
    RestoreCompleted::TYPE,
    RestoreRejected::TYPE,
    RestoreFailed::TYPE,
];

/// Where a POST went, for logs: scheme, host and port only (callback URLs may carry signatures).
fn redacted(url: &url::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{}://{host}:{port}/…", url.scheme()),
        (Some(host), None) => format!("{}://{host}/…", url.scheme()),
        _ => format!("{}:…", url.scheme()),
    }
}

/// POST `body` to `url` until a 2xx, a status that will not change (4xx other than 408 and 429), or
/// `POST_ATTEMPTS`; waits between attempts on the app's clock. The error says what happened last.
async fn post_with_retries(deps: &Deps, url: &url::Url, body: &Value) -> Result<(), String> {
    let policy = RetryPolicy {
        max_attempts: POST_ATTEMPTS,
        base_delay: Duration::from_secs(2),
        max_delay: Duration::from_secs(30),
        ..RetryPolicy::default()
    };
    let mut last = String::new();
    for attempt in 1..=policy.max_attempts {
        let sent = deps
            .http
            .post(url.clone())
            .timeout(POST_TIMEOUT)
            .header(
                "content-type",
                "application/cloudevents+json; charset=utf-8",
            )
            .json(body)
            .send()
            .await;
        let retryable = match sent {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => {
                let status = response.status();
                last = format!("HTTP {status}");
                status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429
            }
            // No URL in the message: reqwest's errors include it, and it may carry a signature.
            Err(e) => {
                last = if e.is_timeout() {
                    "timed out".to_string()
                } else {
                    "no connection".to_string()
                };
                true
            }
        };
        tracing::warn!(target_url = %redacted(url), attempt, outcome = %last, "POST failed");
        if !retryable {
            break;
        }
        if attempt < policy.max_attempts {
            let wait = policy.backoff(attempt, &mut rand::thread_rng());
            deps.clock.sleep(wait).await;
        }
    }
    Err(format!("POST to {} failed: {last}", redacted(url)))
}

pub async fn handle(
    deps: Arc<Deps>,
    invocation: Invocation<Value>,
) -> Result<Outputs, HandlerError> {
    let Value::Object(mut notification) = invocation.data else {
        return Err(HandlerError::bad_input(
            "an outcome must be a CloudEvent (a JSON object)",
        ));
    };
    let outcome = Value::Object(notification.clone());
    let event_type = outcome
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let subject = outcome
        .get("subject")
        .and_then(Value::as_str)
        .unwrap_or_default();
    tracing::info!(%event_type, %subject, "outcome");
    if let Some(webhook) = &deps.settings.notify_webhook {
        if let Err(note) = post_with_retries(&deps, webhook, &outcome).await {
            notification.insert(WEBHOOK_ERROR_ATTRIBUTE.into(), Value::String(note));
        }
    }
    if RESTORE_OUTCOMES.contains(&event_type) {
        let callback = outcome
            .pointer("/data/callbackUrl")
            .and_then(Value::as_str)
            .filter(|u| !u.trim().is_empty());
        if let Some(callback) = callback {
            let note = match url::Url::parse(callback.trim()) {
                Ok(url) if matches!(url.scheme(), "https" | "http") => {
                    post_with_retries(&deps, &url, &outcome).await.err()
                }
                _ => Some("data.callbackUrl is not an http(s) URL".to_string()),
            };
            if let Some(note) = note {
                tracing::warn!(%event_type, "ticket callback failed: {note}");
                notification.insert(CALLBACK_ERROR_ATTRIBUTE.into(), Value::String(note));
            }
        }
    }
    let mut outputs = Outputs::new();
    outputs.push(NOTIFICATIONS_OUT, &Value::Object(notification))?;
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_urls_keep_only_the_origin() {
        let url = url::Url::parse("https://tickets.example.com:8443/cb/INC-1?sig=SECRET").unwrap();
        let text = redacted(&url);
        assert_eq!(text, "https://tickets.example.com:8443/…");
        assert!(!text.contains("SECRET"));
    }
}
