//! The app: named functions behind one axum router, served on `FUNCTIONS_CUSTOMHANDLER_PORT`.

use super::decode::{decode_payload_at_path, decode_value};
use super::invocation::{
    Context, EnvelopeError, HttpRequest, Invocation, InvocationRequest, ServiceBusMetadata,
    TimerInfo, TriggerMetadata,
};
use super::logs::{capture, LogBuffer};
use super::response::{HandlerError, Outputs};
use super::spec::{FunctionSpec, HostSettings, Trigger};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tracing::Instrument;

/// The variable the Functions host sets to the port it will call.
pub const PORT_VARIABLE: &str = "FUNCTIONS_CUSTOMHANDLER_PORT";

/// The header carrying the host's invocation id.
pub const INVOCATION_ID_HEADER: &str = "x-azure-functions-invocationid";

type ErasedHandler = Arc<
    dyn Fn(InvocationRequest, Context) -> BoxFuture<'static, Result<Outputs, Failure>>
        + Send
        + Sync,
>;

struct Registered {
    spec: FunctionSpec,
    handler: ErasedHandler,
}

/// Why an invocation did not succeed, as the host will see it.
enum Failure {
    BadEnvelope(EnvelopeError),
    Handler(HandlerError),
}

/// A set of functions, each declared once with its trigger and outputs.
#[derive(Default)]
pub struct FunctionApp {
    functions: BTreeMap<String, Registered>,
    host: HostSettings,
}

impl FunctionApp {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_host_settings(mut self, host: HostSettings) -> Self {
        self.host = host;
        self
    }

    /// Register `handler` under `spec.name`. The payload type `T` is decoded from the trigger binding:
    /// the message body for Service Bus, [`TimerInfo`] for timers, [`HttpRequest`] for HTTP.
    ///
    /// Panics when two functions share a name: that is a programming error, caught by any test that
    /// builds the app.
    pub fn function<T, F, Fut>(mut self, spec: FunctionSpec, handler: F) -> Self
    where
        T: TriggerPayload + Send + 'static,
        F: Fn(Invocation<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Outputs, HandlerError>> + Send + 'static,
    {
        assert!(
            !self.functions.contains_key(&spec.name),
            "function {} is registered twice",
            spec.name
        );
        let trigger = spec.trigger.clone();
        let handler = Arc::new(handler);
        let erased: ErasedHandler =
            Arc::new(move |request: InvocationRequest, context: Context| {
                let handler = handler.clone();
                let decoded = decode_invocation::<T>(&trigger, request, context);
                async move {
                    let invocation = decoded.map_err(Failure::BadEnvelope)?;
                    handler(invocation).await.map_err(Failure::Handler)
                }
                .boxed()
            });
        self.functions.insert(
            spec.name.clone(),
            Registered {
                spec,
                handler: erased,
            },
        );
        self
    }

    pub fn specs(&self) -> impl Iterator<Item = &FunctionSpec> {
        self.functions.values().map(|r| &r.spec)
    }

    pub fn host_settings(&self) -> &HostSettings {
        &self.host
    }

    /// The axum router: `GET /` for the host's readiness probe, `POST /{function}` per invocation.
    pub fn router(self) -> Router {
        let functions: Arc<BTreeMap<String, ErasedHandler>> = Arc::new(
            self.functions
                .into_iter()
                .map(|(name, registered)| (name, registered.handler))
                .collect(),
        );
        Router::new()
            .route("/", get(|| async { StatusCode::OK }))
            .route("/{function}", post(invoke))
            .with_state(functions)
    }
}

/// How a payload type is read from the trigger binding's value.
pub trait TriggerPayload: Sized {
    fn from_trigger(value: Value, field: &str) -> Result<Self, EnvelopeError>;
}

impl TriggerPayload for TimerInfo {
    fn from_trigger(value: Value, field: &str) -> Result<Self, EnvelopeError> {
        TimerInfo::from_value(value, field)
    }
}

impl TriggerPayload for HttpRequest {
    fn from_trigger(value: Value, field: &str) -> Result<Self, EnvelopeError> {
        HttpRequest::from_value(value, field)
    }
}

impl TriggerPayload for Value {
    fn from_trigger(value: Value, _field: &str) -> Result<Self, EnvelopeError> {
        Ok(super::decode::unwrap_json_strings(value))
    }
}

/// Implement [`TriggerPayload`] for message types decoded with serde (plain or double-encoded JSON).
#[macro_export]
macro_rules! message_payload {
    ($($t:ty),* $(,)?) => {$(
        impl $crate::runtime::TriggerPayload for $t {
            fn from_trigger(
                value: serde_json::Value,
                field: &str,
            ) -> Result<Self, $crate::runtime::EnvelopeError> {
                $crate::runtime::decode_message(value, field)
            }
        }
    )*};
}

/// Decode a message body into `T`; the error's field is the binding and the path inside the body
/// (`Data.message.data.vmId`).
pub fn decode_message<T: DeserializeOwned>(value: Value, field: &str) -> Result<T, EnvelopeError> {
    decode_payload_at_path(value)
        .map_err(|e| EnvelopeError::new(join_path(field, &e.path), e.reason))
}

/// `field` extended by a serde path inside it (`Data.message` + `data.vmId`, or + `[0]`).
pub(crate) fn join_path(field: &str, path: &str) -> String {
    match path {
        "" => field.to_string(),
        _ if path.starts_with('[') => format!("{field}{path}"),
        _ => format!("{field}.{path}"),
    }
}

fn decode_invocation<T: TriggerPayload>(
    trigger: &Trigger,
    mut request: InvocationRequest,
    context: Context,
) -> Result<Invocation<T>, EnvelopeError> {
    let binding = trigger.binding_name();
    let field = format!("Data.{binding}");
    let value = request
        .data
        .remove(binding)
        .ok_or_else(|| EnvelopeError::new(&field, "missing"))?;
    let metadata = match trigger {
        Trigger::ServiceBus { .. } => {
            TriggerMetadata::ServiceBus(ServiceBusMetadata::from_metadata(&request.metadata)?)
        }
        Trigger::Timer { .. } => TriggerMetadata::Timer,
        Trigger::Http { .. } => TriggerMetadata::Http,
    };
    Ok(Invocation {
        data: T::from_trigger(value, &field)?,
        metadata,
        context,
    })
}

/// The invocation body: JSON first (an error names `body`), then its shape (an error names the
/// member, e.g. `Metadata` when it is not an object).
fn parse_envelope(body: &[u8]) -> Result<InvocationRequest, EnvelopeError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| EnvelopeError::new("body", e.to_string()))?;
    decode_value(value).map_err(|e| {
        let field = if e.path.is_empty() { "body" } else { &e.path };
        EnvelopeError::new(field, e.reason)
    })
}

fn error_response(
    status: StatusCode,
    error: &str,
    field: Option<&str>,
    message: String,
) -> Response {
    let mut body = json!({ "error": error, "message": message });
    if let Some(field) = field {
        body["field"] = Value::String(field.to_string());
    }
    (status, Json(body)).into_response()
}

async fn invoke(
    State(functions): State<Arc<BTreeMap<String, ErasedHandler>>>,
    Path(function): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(handler) = functions.get(&function).cloned() else {
        return error_response(
            StatusCode::NOT_FOUND,
            "UnknownFunction",
            None,
            format!("no function named {function}"),
        );
    };
    let request = match parse_envelope(&body) {
        Ok(request) => request,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "MalformedEnvelope",
                Some(&e.field),
                format!("expected {{\"Data\":{{…}},\"Metadata\":{{…}}}}: {e}"),
            )
        }
    };
    let invocation_id = headers
        .get(INVOCATION_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let context = match Context::from_metadata(&function, invocation_id, &request.metadata) {
        Ok(context) => context,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "MalformedEnvelope",
                Some(&e.field),
                e.to_string(),
            )
        }
    };
    let span = tracing::info_span!(
        "invocation",
        function = %function,
        invocation_id = %context.invocation_id
    );
    let logs = LogBuffer::default();
    let outcome = capture(
        logs.clone(),
        AssertUnwindSafe(handler(request, context).instrument(span)).catch_unwind(),
    )
    .await;
    match outcome {
        Ok(Ok(outputs)) => (
            StatusCode::OK,
            Json(outputs.into_response_body(logs.take())),
        )
            .into_response(),
        Ok(Err(Failure::BadEnvelope(e))) => error_response(
            StatusCode::BAD_REQUEST,
            "MalformedPayload",
            Some(&e.field),
            e.to_string(),
        ),
        Ok(Err(Failure::Handler(HandlerError::BadInput(message)))) => {
            error_response(StatusCode::BAD_REQUEST, "BadInput", None, message)
        }
        Ok(Err(Failure::Handler(HandlerError::Transient(message)))) => {
            tracing::warn!(function = %function, error = %message, "invocation failed");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "HandlerFailed",
                None,
                message,
            )
        }
        Err(_) => {
            tracing::error!(function = %function, "handler panicked");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "HandlerPanicked",
                None,
                format!("function {function} panicked"),
            )
        }
    }
}

/// Why serving could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{PORT_VARIABLE} is not set: the Functions host sets it to the port it will call")]
    PortMissing,
    #[error("{PORT_VARIABLE} must be a port number (1-65535), got {0:?}")]
    PortInvalid(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The address the host will call: `127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT`.
pub fn listen_addr_from(port: Option<String>) -> Result<SocketAddr, ServeError> {
    let port = port.ok_or(ServeError::PortMissing)?;
    let number: u16 = port
        .trim()
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ServeError::PortInvalid(port.clone()))?;
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, number)))
}

/// Serve `app` on `listener` until `shutdown` resolves, then let in-flight invocations finish.
pub async fn serve_with_shutdown(
    listener: tokio::net::TcpListener,
    app: FunctionApp,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    axum::serve(listener, app.router())
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Serve `app` where the Functions host expects it, until SIGTERM or SIGINT.
pub async fn serve(app: FunctionApp) -> Result<(), ServeError> {
    let addr = listen_addr_from(std::env::var(PORT_VARIABLE).ok())?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    tracing::info!(%addr, "custom handler listening");
    serve_with_shutdown(listener, app, shutdown_signal()).await
}

/// Resolves on SIGTERM (what the host and the platform send) or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown requested; finishing in-flight invocations");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_errors_name_the_member() {
        // Regression (bad_input proptest): a non-object `Metadata` was reported against `body`.
        let err = parse_envelope(br#"{"Data":{},"Metadata":"x"}"#).unwrap_err();
        assert_eq!(err.field, "Metadata");
        let err = parse_envelope(b"{\"Data\":").unwrap_err();
        assert_eq!(err.field, "body");
        assert!(parse_envelope(br#"{"Data":{"message":"\"hi\""}}"#).is_ok());
    }

    #[test]
    fn port_variable_is_checked() {
        assert!(matches!(
            listen_addr_from(None),
            Err(ServeError::PortMissing)
        ));
        assert!(matches!(
            listen_addr_from(Some("http".into())),
            Err(ServeError::PortInvalid(_))
        ));
        assert!(matches!(
            listen_addr_from(Some("0".into())),
            Err(ServeError::PortInvalid(_))
        ));
        assert_eq!(
            listen_addr_from(Some("7071".into())).unwrap().to_string(),
            "127.0.0.1:7071"
        );
    }
}
