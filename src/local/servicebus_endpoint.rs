//! A Service Bus REST-compatible endpoint over the embedded [`Queue`], served on loopback.
//!
//! It speaks the subset of the Service Bus REST API that `azure_messaging_servicebus` 0.21 uses:
//! - send: `POST /{queue}/messages`, broker properties in the `BrokerProperties` JSON header
//!   (`MessageId`, `CorrelationId`, `Label`, `ReplyTo`, `To`, `ScheduledEnqueueTimeUtc` as an RFC 2822
//!   date), custom properties as plain headers;
//! - peek-lock: `POST /{queue}/messages/head?timeout=N` → 201 with `BrokerProperties` and a `Location`
//!   lock URL, or 204 when nothing arrived within the timeout;
//! - receive-and-delete: `DELETE /{queue}/messages/head`;
//! - complete `DELETE`, unlock `PUT`, renew `POST` on `/{queue}/messages/{seq}/{lockToken}`.
//!
//! Every request is authorised: a SAS token (`SharedAccessSignature sr=…&sig=…&se=…&skn=…`, HMAC-SHA256
//! of the URL-encoded `sr`, a newline and `se`, keyed with the named key) whose `sr` covers the
//! requested path, or a `Bearer` token accepted by a pluggable check. The `sr` is checked by path
//! only, because clients sign the public `https://{ns}.servicebus.windows.net/...` URL and reach
//! this endpoint through a rewriting HTTP client.

use super::queue::{MessageProperties, OutgoingMessage, Queue, QueueError, ReceivedMessage};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Decides whether a bearer token is acceptable (e.g. issued by the simulator's identity endpoint).
pub type BearerCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// How long a peek-lock request waits when it names no timeout (the REST API's default).
pub const DEFAULT_RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// `TimeToLive` reported for messages: .NET's `TimeSpan.MaxValue` in seconds, Service Bus's default.
const MAX_TIME_TO_LIVE_SECONDS: f64 = 922_337_203_685.477_5;

#[derive(Clone)]
pub struct EndpointConfig {
    /// Shared access keys by key name (`skn`), e.g. `RootManageSharedAccessKey`.
    pub sas_keys: HashMap<String, String>,
    pub bearer_check: Option<BearerCheck>,
    /// The namespace URL that clients believe they talk to, used in `Location` lock URLs,
    /// e.g. `https://local.servicebus.windows.net`.
    pub public_base_url: String,
}

impl std::fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key values are secrets: show names only.
        f.debug_struct("EndpointConfig")
            .field("sas_key_names", &self.sas_keys.keys().collect::<Vec<_>>())
            .field("bearer_check", &self.bearer_check.is_some())
            .field("public_base_url", &self.public_base_url)
            .finish()
    }
}

#[derive(Clone)]
struct EndpointState {
    queue: Queue,
    config: Arc<EndpointConfig>,
}

pub fn router(queue: Queue, config: EndpointConfig) -> Router {
    let state = EndpointState {
        queue,
        config: Arc::new(config),
    };
    Router::new()
        .route("/{queue}/messages", post(send))
        .route(
            "/{queue}/messages/head",
            post(peek_lock).delete(receive_and_delete),
        )
        .route(
            "/{queue}/messages/{id}/{lock_token}",
            post(renew_lock).put(unlock).delete(complete),
        )
        .with_state(state)
}

/// A running endpoint; dropping it does not stop it, [`RunningEndpoint::stop`] does.
pub struct RunningEndpoint {
    pub addr: SocketAddr,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningEndpoint {
    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        let _ = self.task.await;
    }
}

/// Serves the endpoint on `listener` until stopped.
pub fn spawn(
    queue: Queue,
    config: EndpointConfig,
    listener: tokio::net::TcpListener,
) -> std::io::Result<RunningEndpoint> {
    let addr = listener.local_addr()?;
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = router(queue, config);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    Ok(RunningEndpoint {
        addr,
        shutdown,
        task,
    })
}

fn error(status: StatusCode, detail: impl std::fmt::Display) -> Response {
    // The shape of Service Bus REST error bodies.
    let body = format!(
        "<Error><Code>{}</Code><Detail>{}</Detail></Error>",
        status.as_u16(),
        xml_escape(&detail.to_string())
    );
    (
        status,
        [(
            axum::http::header::CONTENT_TYPE,
            "application/xml; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn queue_error(e: QueueError) -> Response {
    match e {
        QueueError::QueueNotFound(_) => error(StatusCode::NOT_FOUND, e),
        QueueError::LockLost { .. } => error(StatusCode::NOT_FOUND, e),
        QueueError::InvalidName(_) => error(StatusCode::BAD_REQUEST, e),
        other => {
            tracing::error!(error = %other, "service bus endpoint storage failure");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal storage error")
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum AuthError {
    Missing,
    Malformed(&'static str),
    UnknownKey,
    BadSignature,
    Expired,
    WrongResource,
    BearerRejected,
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Missing => write!(f, "the Authorization header is missing"),
            AuthError::Malformed(what) => write!(f, "malformed SAS token: {what}"),
            AuthError::UnknownKey => write!(f, "the SAS key name is unknown"),
            AuthError::BadSignature => write!(f, "the SAS signature does not match"),
            AuthError::Expired => write!(f, "the SAS token has expired"),
            AuthError::WrongResource => {
                write!(f, "the SAS token's resource does not cover this path")
            }
            AuthError::BearerRejected => write!(f, "the bearer token was rejected"),
        }
    }
}

/// Checks the `Authorization` header of a request for `path`. SAS expiry is checked against
/// `now_unix` (wall time: tokens are signed with the wall clock).
pub fn authorize(
    config: &EndpointConfig,
    authorization: Option<&str>,
    path: &str,
    now_unix: i64,
) -> Result<(), AuthError> {
    let header = authorization.ok_or(AuthError::Missing)?.trim();
    if let Some(token) = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
    {
        return match &config.bearer_check {
            Some(check) if check(token.trim()) => Ok(()),
            _ => Err(AuthError::BearerRejected),
        };
    }
    let token = header
        .strip_prefix("SharedAccessSignature ")
        .ok_or(AuthError::Malformed(
            "expected SharedAccessSignature or Bearer",
        ))?;
    // The signature covers the `sr` value exactly as sent (still URL-encoded).
    let raw_sr = token
        .split('&')
        .find_map(|pair| pair.strip_prefix("sr="))
        .ok_or(AuthError::Malformed("sr is missing"))?;
    let fields: HashMap<String, String> = url::form_urlencoded::parse(token.as_bytes())
        .into_owned()
        .collect();
    let field = |name: &'static str| fields.get(name).ok_or(AuthError::Malformed(name));
    let signature = field("sig")?;
    let expiry_text = field("se")?;
    let key_name = field("skn")?;
    let resource = field("sr")?;
    let expiry: i64 = expiry_text
        .parse()
        .map_err(|_| AuthError::Malformed("se is not a number"))?;
    let key = config.sas_keys.get(key_name).ok_or(AuthError::UnknownKey)?;
    let signature = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, signature)
        .map_err(|_| AuthError::Malformed("sig is not base64"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes())
        .map_err(|_| AuthError::Malformed("unusable key"))?;
    mac.update(format!("{raw_sr}\n{expiry_text}").as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| AuthError::BadSignature)?;
    if expiry <= now_unix {
        return Err(AuthError::Expired);
    }
    if !resource_covers(resource, path) {
        return Err(AuthError::WrongResource);
    }
    Ok(())
}

/// Whether the signed resource URI covers the request path (same path or a parent of it).
fn resource_covers(resource: &str, path: &str) -> bool {
    let parsed = url::Url::parse(resource)
        .or_else(|_| url::Url::parse(&format!("https://{resource}")))
        .ok();
    let Some(parsed) = parsed else {
        return false;
    };
    let scope = parsed.path().trim_end_matches('/');
    let path = path.trim_end_matches('/');
    scope.is_empty() || path == scope || path.starts_with(&format!("{scope}/"))
}

/// `Some(401 response)` when the request is not authorised.
fn check_auth(state: &EndpointState, headers: &HeaderMap, uri: &Uri) -> Option<Response> {
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    authorize(
        &state.config,
        authorization,
        uri.path(),
        Utc::now().timestamp(),
    )
    .err()
    .map(|e| error(StatusCode::UNAUTHORIZED, e))
}

/// Headers that are transport or protocol, never custom message properties.
fn is_transport_header(name: &str) -> bool {
    matches!(
        name,
        "authorization"
            | "content-type"
            | "content-length"
            | "host"
            | "brokerproperties"
            | "user-agent"
            | "accept"
            | "accept-encoding"
            | "connection"
            | "transfer-encoding"
            | "expect"
            | "traceparent"
            | "tracestate"
    ) || name.starts_with("x-ms-")
        || name.starts_with("x-forwarded-")
}

/// Parses the send request's headers into message properties.
pub fn properties_from_headers(headers: &HeaderMap) -> Result<MessageProperties, String> {
    let mut properties = MessageProperties::default();
    if let Some(value) = headers.get("brokerproperties") {
        let text = value
            .to_str()
            .map_err(|_| "BrokerProperties is not ASCII text".to_string())?;
        let broker: Map<String, Value> = serde_json::from_str(text)
            .map_err(|e| format!("BrokerProperties is not a JSON object: {e}"))?;
        let string = |key: &str| -> Result<Option<String>, String> {
            match broker.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("BrokerProperties.{key} must be a string")),
            }
        };
        properties.message_id = string("MessageId")?;
        properties.correlation_id = string("CorrelationId")?;
        properties.subject = string("Label")?;
        properties.reply_to = string("ReplyTo")?;
        properties.to = string("To")?;
        if let Some(text) = string("ScheduledEnqueueTimeUtc")? {
            let at = DateTime::parse_from_rfc2822(&text).map_err(|e| {
                format!("BrokerProperties.ScheduledEnqueueTimeUtc {text:?} is not an RFC 2822 date: {e}")
            })?;
            properties.scheduled_enqueue_time_utc = Some(at.with_timezone(&Utc));
        }
    }
    properties.content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    for (name, value) in headers {
        let name = name.as_str();
        if is_transport_header(name) {
            continue;
        }
        let Ok(text) = value.to_str() else { continue };
        // Service Bus reads custom property values as JSON-style literals: quoted strings,
        // bare numbers and booleans; anything else is taken as text.
        let value = match serde_json::from_str::<Value>(text) {
            Ok(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => v,
            _ => Value::String(text.to_string()),
        };
        properties
            .application_properties
            .insert(name.to_string(), value);
    }
    Ok(properties)
}

async fn send(
    State(state): State<EndpointState>,
    Path(queue): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = check_auth(&state, &headers, &uri) {
        return denied;
    }
    let properties = match properties_from_headers(&headers) {
        Ok(p) => p,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let message = OutgoingMessage {
        body: body.to_vec(),
        properties,
    };
    match state.queue.send(&queue, &message) {
        // A duplicate is accepted and silently dropped, as Service Bus does.
        Ok(_) => StatusCode::CREATED.into_response(),
        Err(e) => queue_error(e),
    }
}

#[derive(serde::Deserialize)]
struct ReceiveQuery {
    timeout: Option<u64>,
}

async fn peek_lock(
    state: State<EndpointState>,
    path: Path<String>,
    query: Query<ReceiveQuery>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    receive(state, path, query, uri, headers, true).await
}

async fn receive_and_delete(
    state: State<EndpointState>,
    path: Path<String>,
    query: Query<ReceiveQuery>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    receive(state, path, query, uri, headers, false).await
}

async fn receive(
    State(state): State<EndpointState>,
    Path(queue): Path<String>,
    Query(query): Query<ReceiveQuery>,
    uri: Uri,
    headers: HeaderMap,
    lock: bool,
) -> Response {
    if let Some(denied) = check_auth(&state, &headers, &uri) {
        return denied;
    }
    let timeout = query
        .timeout
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_RECEIVE_TIMEOUT);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let taken = if lock {
            state.queue.receive(&queue)
        } else {
            state.queue.receive_and_delete(&queue)
        };
        match taken {
            Ok(Some(message)) => return message_response(&state.config, &message, lock),
            Ok(None) => {}
            Err(e) => return queue_error(e),
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return StatusCode::NO_CONTENT.into_response();
        }
        state.queue.wait_for_change(&queue, left).await;
    }
}

fn broker_properties_json(message: &ReceivedMessage, lock: bool) -> Value {
    let mut broker = Map::new();
    broker.insert("DeliveryCount".into(), message.delivery_count.into());
    broker.insert(
        "EnqueuedSequenceNumber".into(),
        message.sequence_number.into(),
    );
    broker.insert(
        "EnqueuedTimeUtc".into(),
        message.enqueued_time.to_rfc2822().into(),
    );
    if lock {
        broker.insert("LockToken".into(), message.lock_token.clone().into());
    }
    broker.insert(
        "LockedUntilUtc".into(),
        message.locked_until.to_rfc2822().into(),
    );
    broker.insert("MessageId".into(), message.message_id.clone().into());
    broker.insert("SequenceNumber".into(), message.sequence_number.into());
    broker.insert("State".into(), "Active".into());
    broker.insert("TimeToLive".into(), MAX_TIME_TO_LIVE_SECONDS.into());
    let p = &message.properties;
    for (key, value) in [
        ("CorrelationId", &p.correlation_id),
        ("Label", &p.subject),
        ("ReplyTo", &p.reply_to),
        ("To", &p.to),
    ] {
        if let Some(value) = value {
            broker.insert(key.into(), value.clone().into());
        }
    }
    if let Some(at) = p.scheduled_enqueue_time_utc {
        broker.insert("ScheduledEnqueueTimeUtc".into(), at.to_rfc2822().into());
    }
    Value::Object(broker)
}

fn message_response(config: &EndpointConfig, message: &ReceivedMessage, lock: bool) -> Response {
    let mut headers = HeaderMap::new();
    let broker = broker_properties_json(message, lock).to_string();
    if let Ok(value) = HeaderValue::from_str(&broker) {
        headers.insert(HeaderName::from_static("brokerproperties"), value);
    }
    if let Some(content_type) = &message.properties.content_type {
        if let Ok(value) = HeaderValue::from_str(content_type) {
            headers.insert(axum::http::header::CONTENT_TYPE, value);
        }
    }
    if lock {
        let location = format!(
            "{}/{}/messages/{}/{}",
            config.public_base_url.trim_end_matches('/'),
            message.queue,
            message.sequence_number,
            message.lock_token
        );
        if let Ok(value) = HeaderValue::from_str(&location) {
            headers.insert(axum::http::header::LOCATION, value);
        }
    }
    for (name, value) in &message.properties.application_properties {
        // Custom properties come back as JSON literals (strings quoted), as the REST API does.
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value.to_string()),
        ) else {
            continue;
        };
        headers.insert(name, value);
    }
    let status = if lock {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, headers, message.body.clone()).into_response()
}

async fn lock_operation(
    state: EndpointState,
    queue: String,
    lock_token: String,
    uri: Uri,
    headers: HeaderMap,
    method: Method,
) -> Response {
    if let Some(denied) = check_auth(&state, &headers, &uri) {
        return denied;
    }
    let result = match method {
        Method::DELETE => state.queue.complete(&queue, &lock_token),
        Method::PUT => state.queue.abandon(&queue, &lock_token).map(|_| ()),
        _ => state.queue.renew_lock(&queue, &lock_token).map(|_| ()),
    };
    match result {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => queue_error(e),
    }
}

async fn complete(
    State(state): State<EndpointState>,
    Path((queue, _id, lock_token)): Path<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    lock_operation(state, queue, lock_token, uri, headers, Method::DELETE).await
}

async fn unlock(
    State(state): State<EndpointState>,
    Path((queue, _id, lock_token)): Path<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    lock_operation(state, queue, lock_token, uri, headers, Method::PUT).await
}

async fn renew_lock(
    State(state): State<EndpointState>,
    Path((queue, _id, lock_token)): Path<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    lock_operation(state, queue, lock_token, uri, headers, Method::POST).await
}

/// Builds a SAS token as Service Bus clients do (for tests and local tools that send with a key).
pub fn sas_token(resource_uri: &str, key_name: &str, key: &str, expiry_unix: i64) -> String {
    let sr: String = url::form_urlencoded::byte_serialize(resource_uri.as_bytes()).collect();
    let mut mac = match Hmac::<Sha256>::new_from_slice(key.as_bytes()) {
        Ok(mac) => mac,
        // HMAC accepts keys of any length; this branch cannot be reached.
        Err(_) => return String::new(),
    };
    mac.update(format!("{sr}\n{expiry_unix}").as_bytes());
    let sig = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        mac.finalize().into_bytes(),
    );
    let sig: String = url::form_urlencoded::byte_serialize(sig.as_bytes()).collect();
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry_unix}&skn={key_name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EndpointConfig {
        EndpointConfig {
            sas_keys: HashMap::from([("RootManageSharedAccessKey".into(), "s3cret".into())]),
            bearer_check: Some(Arc::new(|t: &str| t == "good-token")),
            public_base_url: "https://local.servicebus.windows.net".into(),
        }
    }

    #[test]
    fn sas_tokens_are_checked_for_key_signature_expiry_and_resource() {
        let c = config();
        let url = "https://local.servicebus.windows.net/vm-events/messages";
        let now = 1_800_000_000;
        let good = sas_token(url, "RootManageSharedAccessKey", "s3cret", now + 60);
        assert_eq!(
            authorize(&c, Some(&good), "/vm-events/messages", now),
            Ok(())
        );
        assert_eq!(
            authorize(&c, Some(&good), "/other/messages", now),
            Err(AuthError::WrongResource)
        );
        assert_eq!(
            authorize(&c, Some(&good), "/vm-events/messages", now + 61),
            Err(AuthError::Expired)
        );
        let wrong_key = sas_token(url, "RootManageSharedAccessKey", "nope", now + 60);
        assert_eq!(
            authorize(&c, Some(&wrong_key), "/vm-events/messages", now),
            Err(AuthError::BadSignature)
        );
        let unknown = sas_token(url, "Other", "s3cret", now + 60);
        assert_eq!(
            authorize(&c, Some(&unknown), "/vm-events/messages", now),
            Err(AuthError::UnknownKey)
        );
        // A namespace-wide token covers every entity.
        let namespace = sas_token(
            "https://local.servicebus.windows.net/",
            "RootManageSharedAccessKey",
            "s3cret",
            now + 60,
        );
        assert_eq!(
            authorize(&c, Some(&namespace), "/q/messages/head", now),
            Ok(())
        );
        // A token for a peek-lock URL with a query covers its path.
        let peek = sas_token(
            "https://local.servicebus.windows.net/q/messages/head?timeout=5",
            "RootManageSharedAccessKey",
            "s3cret",
            now + 60,
        );
        assert_eq!(authorize(&c, Some(&peek), "/q/messages/head", now), Ok(()));
        assert_eq!(authorize(&c, None, "/q", now), Err(AuthError::Missing));
        assert_eq!(authorize(&c, Some("Bearer good-token"), "/q", now), Ok(()));
        assert_eq!(
            authorize(&c, Some("Bearer bad"), "/q", now),
            Err(AuthError::BearerRejected)
        );
        assert!(matches!(
            authorize(&c, Some("Basic abc"), "/q", now),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn send_headers_become_message_properties() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "brokerproperties",
            HeaderValue::from_static(
                r#"{"MessageId":"m-1","CorrelationId":"c","Label":"vmbackup.restore.requested","ScheduledEnqueueTimeUtc":"Sat, 28 Nov 2026 10:56:08 +0000"}"#,
            ),
        );
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("ticketid", HeaderValue::from_static("INC-1001"));
        headers.insert("priority", HeaderValue::from_static("2"));
        headers.insert("quoted", HeaderValue::from_static("\"text\""));
        headers.insert("authorization", HeaderValue::from_static("secret"));
        let p = properties_from_headers(&headers).unwrap();
        assert_eq!(p.message_id.as_deref(), Some("m-1"));
        assert_eq!(p.subject.as_deref(), Some("vmbackup.restore.requested"));
        assert_eq!(
            p.scheduled_enqueue_time_utc.unwrap().to_rfc3339(),
            "2026-11-28T10:56:08+00:00"
        );
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.application_properties["ticketid"], "INC-1001");
        assert_eq!(p.application_properties["priority"], 2);
        assert_eq!(p.application_properties["quoted"], "text");
        assert!(!p.application_properties.contains_key("authorization"));

        headers.insert(
            "brokerproperties",
            HeaderValue::from_static(r#"{"ScheduledEnqueueTimeUtc":"tomorrow"}"#),
        );
        let err = properties_from_headers(&headers).unwrap_err();
        assert!(err.contains("ScheduledEnqueueTimeUtc"), "{err}");
    }
}
