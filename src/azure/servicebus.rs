//! Service Bus sender on `azure_messaging_servicebus` 0.21 (its own `azure_core` 0.21).
//!
//! The crate always builds `https://{namespace}.servicebus.windows.net/…` URLs and signs a SAS
//! over them. Its HTTP client is pluggable, so [`RoutingHttpClient`] wraps the real one to
//! (1) send to an override endpoint (a local run's Service Bus-compatible endpoint) and
//! (2) with Entra ID auth, replace the crate's SAS with a bearer token.

use super::auth::TokenSource;
use super::config::ServiceBusConfig;
use super::error::AzureError;
use async_trait::async_trait;
use azure_core_legacy::{headers, HttpClient, Request, Response};
use azure_messaging_servicebus::service_bus::{
    QueueClient, SendMessageOptions, SettableBrokerProperties,
};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use tracing::Instrument;
use url::Url;

/// One message to send: a CloudEvent JSON body and the broker properties the workflow sets.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    /// The JSON body (a structured-mode CloudEvent).
    pub body: serde_json::Value,
    /// Service Bus duplicate detection keys on this.
    pub message_id: String,
    pub correlation_id: Option<String>,
    /// The event type.
    pub label: Option<String>,
    /// Deliver no earlier than this (a delayed follow-up such as job polling).
    pub scheduled_enqueue_time: Option<DateTime<Utc>>,
}

/// Routes the crate's requests to the configured endpoint and, for Entra auth, sets a bearer token.
pub struct RoutingHttpClient {
    inner: Arc<dyn HttpClient>,
    namespace_host: String,
    endpoint_override: Option<Url>,
    bearer: Option<(Arc<dyn TokenSource>, String)>,
}

impl std::fmt::Debug for RoutingHttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingHttpClient")
            .field("namespace_host", &self.namespace_host)
            .field("endpoint_override", &self.endpoint_override)
            .field("entra_auth", &self.bearer.is_some())
            .finish()
    }
}

impl RoutingHttpClient {
    fn rewrite(&self, url: &Url) -> Option<Url> {
        let endpoint = self.endpoint_override.as_ref()?;
        if !url.host_str()?.eq_ignore_ascii_case(&self.namespace_host) {
            return None;
        }
        let mut target = endpoint.clone();
        target.set_path(&format!(
            "{}{}",
            endpoint.path().trim_end_matches('/'),
            url.path()
        ));
        target.set_query(url.query());
        Some(target)
    }
}

#[async_trait]
impl HttpClient for RoutingHttpClient {
    async fn execute_request(&self, request: &Request) -> azure_core_legacy::Result<Response> {
        let mut request = request.clone();
        if let Some(target) = self.rewrite(request.url()) {
            *request.url_mut() = target;
        }
        if let Some((tokens, audience)) = &self.bearer {
            let token = tokens.token(audience).await.map_err(|e| {
                azure_core_legacy::Error::message(
                    azure_core_legacy::error::ErrorKind::Credential,
                    e.to_string(),
                )
            })?;
            request.insert_header(headers::AUTHORIZATION, format!("Bearer {}", token.secret()));
        }
        self.inner.execute_request(&request).await
    }
}

/// Sends messages to the queues of one namespace.
#[derive(Clone)]
pub struct ServiceBusSender {
    namespace: String,
    policy_name: String,
    signing_key: String,
    http: Arc<dyn HttpClient>,
}

impl std::fmt::Debug for ServiceBusSender {
    // The SAS key stays out of `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBusSender")
            .field("namespace", &self.namespace)
            .field("policy_name", &self.policy_name)
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

/// With Entra auth the crate still wants a SAS policy and key to sign with; the signature it makes
/// is replaced by the bearer token before the request leaves, so these are not credentials.
const ENTRA_PLACEHOLDER_POLICY: &str = "entra-id";
const ENTRA_PLACEHOLDER_KEY: &str = "replaced-by-bearer-token";

impl ServiceBusSender {
    /// `tokens` and `audience` are used when `config` has no SAS key (Entra ID auth).
    pub fn new(config: &ServiceBusConfig, tokens: Arc<dyn TokenSource>, audience: &str) -> Self {
        let (policy_name, signing_key, bearer) = match &config.sas {
            Some(sas) => (sas.policy_name.clone(), sas.key.clone(), None),
            None => (
                ENTRA_PLACEHOLDER_POLICY.to_string(),
                ENTRA_PLACEHOLDER_KEY.to_string(),
                Some((tokens, audience.to_string())),
            ),
        };
        let http = Arc::new(RoutingHttpClient {
            inner: azure_core_legacy::new_http_client(),
            namespace_host: format!("{}.servicebus.windows.net", config.namespace),
            endpoint_override: config.endpoint_override.clone(),
            bearer,
        });
        ServiceBusSender {
            namespace: config.namespace.clone(),
            policy_name,
            signing_key,
            http,
        }
    }

    pub async fn send(&self, queue: &str, message: &OutgoingMessage) -> Result<(), AzureError> {
        let fail = |message: String| AzureError::ServiceBus {
            queue: queue.to_string(),
            message,
        };
        let scheduled = match message.scheduled_enqueue_time {
            Some(at) => Some(
                time::OffsetDateTime::from_unix_timestamp(at.timestamp())
                    .map_err(|e| fail(format!("scheduled time out of range: {e}")))?,
            ),
            None => None,
        };
        let client = QueueClient::new(
            self.http.clone(),
            self.namespace.clone(),
            queue.to_string(),
            self.policy_name.clone(),
            self.signing_key.clone(),
        )
        .map_err(|e| fail(e.to_string()))?;
        let options = SendMessageOptions {
            content_type: Some("application/cloudevents+json; charset=utf-8".to_string()),
            broker_properties: Some(SettableBrokerProperties {
                message_id: Some(message.message_id.clone()),
                correlation_id: message.correlation_id.clone(),
                label: message.label.clone(),
                scheduled_enqueue_time_utc: scheduled,
                ..Default::default()
            }),
            custom_properties: None,
        };
        let body = message.body.to_string();
        let span = tracing::info_span!(
            "servicebus_send",
            queue,
            message_id = %message.message_id,
            label = message.label.as_deref().unwrap_or(""),
        );
        client
            .send_message(&body, Some(options))
            .instrument(span.clone())
            .await
            .map_err(|e| fail(e.to_string()))?;
        tracing::info!(parent: &span, "message sent");
        Ok(())
    }
}
