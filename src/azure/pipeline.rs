//! The one HTTP pipeline under every Azure call: bearer token, client-side throttling, retries,
//! long-running operations and paging. Only hosts and paths are logged, never query strings
//! (a blob URL may carry a SAS), headers or bodies.

use super::auth::TokenSource;
use super::config::AzureConfig;
use super::error::{ArmError, ArmErrorDetail, AzureError};
use super::retry::{is_retryable_status, parse_retry_after, ClockTimer, RetryPolicy, Timer};
use super::throttle::{remaining_header, throttle_scope, ArmThrottle, OpClass, ThrottleLimits};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;
use url::Url;

/// Which token a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Arm,
    KeyVault,
    Storage,
}

/// One request, before auth and retries.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: Method,
    pub url: Url,
    pub body: Option<Value>,
    pub audience: Audience,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Counted against ARM's subscription buckets (false for Resource Graph and data planes).
    pub arm_throttled: bool,
}

impl ApiRequest {
    pub fn arm(method: Method, url: Url) -> Self {
        ApiRequest {
            method,
            url,
            body: None,
            audience: Audience::Arm,
            headers: Vec::new(),
            arm_throttled: true,
        }
    }

    pub fn data_plane(method: Method, url: Url, audience: Audience) -> Self {
        ApiRequest {
            arm_throttled: false,
            audience,
            ..ApiRequest::arm(method, url)
        }
    }

    pub fn json(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }

    pub fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        ));
        self
    }
}

/// DNS suffixes of Key Vault and Blob endpoints in Azure's clouds (public, China, US Government).
const KEY_VAULT_DNS_SUFFIXES: [&str; 4] = [
    ".vault.azure.net",
    ".vault.azure.cn",
    ".vault.usgovcloudapi.net",
    ".managedhsm.azure.net",
];
const BLOB_DNS_SUFFIXES: [&str; 3] = [
    ".blob.core.windows.net",
    ".blob.core.chinacloudapi.cn",
    ".blob.core.usgovcloudapi.net",
];

/// Key Vault and blob URLs arrive in events and job results, so a token for them goes only to a
/// real endpoint of that service over https, or to the configured ARM endpoint's own origin (a
/// local run, where the simulator serves every service). Anything else would hand the app's token
/// to whoever wrote the URL.
fn check_destination(request: &ApiRequest, arm_endpoint: &Url) -> Result<(), AzureError> {
    let (service, suffixes): (&str, &[&str]) = match request.audience {
        Audience::Arm => return Ok(()),
        Audience::KeyVault => ("Key Vault", &KEY_VAULT_DNS_SUFFIXES),
        Audience::Storage => ("Blob storage", &BLOB_DNS_SUFFIXES),
    };
    let url = &request.url;
    if url.origin() == arm_endpoint.origin() {
        return Ok(());
    }
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    if url.scheme() == "https" && suffixes.iter().any(|suffix| host.ends_with(suffix)) {
        return Ok(());
    }
    Err(AzureError::InvalidInput {
        field: "url".into(),
        message: format!(
            "{} is not a {service} endpoint (https on {}); no token is sent there",
            display_url(url),
            suffixes.join(", ")
        ),
    })
}

/// A successful (2xx) response.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub url: Url,
}

impl ApiResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json<T: DeserializeOwned>(&self) -> Result<T, AzureError> {
        serde_json::from_slice(&self.body).map_err(|e| AzureError::Decode {
            url: display_url(&self.url),
            message: e.to_string(),
        })
    }

    /// The body as JSON, or `None` when it is empty.
    pub fn json_opt(&self) -> Result<Option<Value>, AzureError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        self.json().map(Some)
    }
}

/// How long operations are followed.
#[derive(Debug, Clone, PartialEq)]
pub struct LroPolicy {
    /// Wait between polls when the service gives no `Retry-After`.
    pub default_poll_interval: Duration,
    /// Give up following an operation after this long (server time).
    pub max_duration: Duration,
}

impl Default for LroPolicy {
    fn default() -> Self {
        LroPolicy {
            default_poll_interval: Duration::from_secs(10),
            max_duration: Duration::from_secs(6 * 3600),
        }
    }
}

/// The end of a long-running operation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LroOutcome {
    /// The last `Azure-AsyncOperation` status body, when the operation had one (Recovery Services
    /// puts the job id in `properties.jobId`).
    pub operation_status: Option<Value>,
    /// The resource (or result) the operation produced, when there is one.
    pub resource: Option<Value>,
}

impl LroOutcome {
    /// `properties.jobId` of a Recovery Services operation status.
    pub fn job_id(&self) -> Option<String> {
        let props = self.operation_status.as_ref()?.get("properties")?;
        props
            .get("jobId")
            .and_then(Value::as_str)
            .or_else(|| props.get("jobIds")?.get(0)?.as_str())
            .map(str::to_string)
    }
}

/// Host and path only: query strings may carry SAS signatures.
pub fn display_url(url: &Url) -> String {
    format!("{}{}", url.host_str().unwrap_or(""), url.path())
}

/// Appends `api-version` to an ARM path (an id starting with `/subscriptions/…` or `/providers/…`).
pub fn with_api_version(base: &Url, path: &str, api_version: &str) -> Result<Url, AzureError> {
    let mut url =
        base.join(path.trim_start_matches('/'))
            .map_err(|e| AzureError::InvalidInput {
                field: "resource path".into(),
                message: format!("{path:?}: {e}"),
            })?;
    if url.scheme() != base.scheme() || url.host() != base.host() {
        return Err(AzureError::InvalidInput {
            field: "resource path".into(),
            message: format!("{path:?} is not a path on {}", base.as_str()),
        });
    }
    url.query_pairs_mut()
        .append_pair("api-version", api_version);
    Ok(url)
}

/// A cheap-to-clone handle on the pipeline.
#[derive(Clone)]
pub struct ArmClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    tokens: Arc<dyn TokenSource>,
    config: AzureConfig,
    timer: Arc<dyn Timer>,
    retry: RetryPolicy,
    lro: LroPolicy,
    throttle: ArmThrottle,
}

impl std::fmt::Debug for ArmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArmClient")
            .field("arm_endpoint", &self.inner.config.arm_endpoint.as_str())
            .finish_non_exhaustive()
    }
}

/// Builds an [`ArmClient`]; defaults are real time and ARM's published limits.
pub struct ArmClientBuilder {
    config: AzureConfig,
    tokens: Arc<dyn TokenSource>,
    timer: Arc<dyn Timer>,
    retry: RetryPolicy,
    lro: LroPolicy,
    limits: ThrottleLimits,
    request_timeout: Duration,
}

impl ArmClientBuilder {
    /// Sleeps and "now" (for `Retry-After`, polling and the buckets); a local run passes
    /// `ClockTimer(clock)` so waits follow simulated time.
    pub fn timer(mut self, timer: Arc<dyn Timer>) -> Self {
        self.timer = timer;
        self
    }

    pub fn retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn lro_policy(mut self, lro: LroPolicy) -> Self {
        self.lro = lro;
        self
    }

    pub fn throttle_limits(mut self, limits: ThrottleLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Wall-clock timeout of one HTTP attempt.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn build(self) -> Result<ArmClient, AzureError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(self.request_timeout)
            .user_agent(concat!("vmbackup/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AzureError::Config {
                name: "http client".into(),
                message: e.to_string(),
            })?;
        Ok(ArmClient {
            inner: Arc::new(Inner {
                http,
                tokens: self.tokens,
                config: self.config,
                timer: self.timer,
                retry: self.retry,
                lro: self.lro,
                throttle: ArmThrottle::new(self.limits),
            }),
        })
    }
}

enum Attempt {
    Done(ApiResponse),
    Failed(AzureError),
    /// Worth another try after (at least) this long.
    Retry(AzureError, Option<Duration>),
}

impl ArmClient {
    pub fn builder(config: AzureConfig, tokens: Arc<dyn TokenSource>) -> ArmClientBuilder {
        ArmClientBuilder {
            config,
            tokens,
            timer: Arc::new(ClockTimer::default()),
            retry: RetryPolicy::default(),
            lro: LroPolicy::default(),
            limits: ThrottleLimits::default(),
            request_timeout: Duration::from_secs(100),
        }
    }

    pub fn config(&self) -> &AzureConfig {
        &self.inner.config
    }

    pub fn timer(&self) -> &Arc<dyn Timer> {
        &self.inner.timer
    }

    /// `{ARM endpoint}{path}?api-version=…`
    pub fn arm_url(&self, path: &str, api_version: &str) -> Result<Url, AzureError> {
        with_api_version(&self.inner.config.arm_endpoint, path, api_version)
    }

    /// Sends with throttling and retries; `Ok` only for 2xx.
    pub async fn send(&self, request: ApiRequest) -> Result<ApiResponse, AzureError> {
        check_destination(&request, &self.inner.config.arm_endpoint)?;
        let span = tracing::info_span!(
            "azure_request",
            method = %request.method,
            url = %display_url(&request.url),
            status = tracing::field::Empty,
            request_id = tracing::field::Empty,
            attempts = tracing::field::Empty,
        );
        self.send_with_retries(request).instrument(span).await
    }

    async fn send_with_retries(&self, request: ApiRequest) -> Result<ApiResponse, AzureError> {
        let inner = &self.inner;
        let started = inner.timer.now();
        let class = OpClass::of(&request.method);
        let scope = throttle_scope(&request.url);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if request.arm_throttled {
                let wait = inner.throttle.reserve(&scope, class, inner.timer.now());
                if !wait.is_zero() {
                    tracing::debug!(wait_ms = wait.as_millis() as u64, "client-side throttle");
                    inner.timer.sleep(wait).await;
                }
            }
            let outcome = self.attempt(&request, &scope, class).await;
            if request.arm_throttled {
                inner.throttle.release(&scope, class, inner.timer.now());
            }
            tracing::Span::current().record("attempts", attempt);
            let (error, retry_after) = match outcome {
                Attempt::Done(response) => return Ok(response),
                Attempt::Failed(error) => return Err(error),
                Attempt::Retry(error, retry_after) => (error, retry_after),
            };
            let wait = inner
                .retry
                .throttle_wait(retry_after, attempt, &mut rand::thread_rng());
            let elapsed = (inner.timer.now() - started).to_std().unwrap_or_default();
            if attempt >= inner.retry.max_attempts || elapsed + wait > inner.retry.max_elapsed {
                tracing::warn!(attempt, error = %error, "giving up after retries");
                return Err(error);
            }
            tracing::info!(
                attempt,
                wait_ms = wait.as_millis() as u64,
                error = %error,
                "retrying"
            );
            inner.timer.sleep(wait).await;
        }
    }

    async fn attempt(&self, request: &ApiRequest, scope: &str, class: OpClass) -> Attempt {
        let inner = &self.inner;
        let audience = match request.audience {
            Audience::Arm => &inner.config.audiences.arm,
            Audience::KeyVault => &inner.config.audiences.key_vault,
            Audience::Storage => &inner.config.audiences.storage,
        };
        let token = match inner.tokens.token(audience).await {
            Ok(token) => token,
            Err(error) => return Attempt::Retry(error, None),
        };
        let mut builder = inner
            .http
            .request(request.method.clone(), request.url.clone())
            .bearer_auth(token.secret());
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        builder = match &request.body {
            Some(body) => builder.json(body),
            None if request.method == Method::POST || request.method == Method::PUT => {
                builder.header(reqwest::header::CONTENT_LENGTH, "0")
            }
            None => builder,
        };
        let response = match builder.send().await {
            Ok(response) => response,
            Err(e) => {
                let error = AzureError::Transport {
                    url: display_url(&request.url),
                    // reqwest's message names the URL with its query; keep only the cause.
                    message: e.without_url().to_string(),
                };
                return Attempt::Retry(error, None);
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let request_id = headers
            .get("x-ms-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let span = tracing::Span::current();
        span.record("status", status);
        if let Some(id) = &request_id {
            span.record("request_id", id.as_str());
        }
        if request.arm_throttled {
            let remaining = headers
                .get(remaining_header(scope, class).as_str())
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok());
            if let Some(remaining) = remaining {
                inner
                    .throttle
                    .observe_remaining(scope, class, remaining, inner.timer.now());
            }
        }
        let body = match response.bytes().await {
            Ok(body) => body.to_vec(),
            Err(e) => {
                let error = AzureError::Transport {
                    url: display_url(&request.url),
                    message: e.without_url().to_string(),
                };
                return Attempt::Retry(error, None);
            }
        };
        if (200..300).contains(&status) {
            return Attempt::Done(ApiResponse {
                status,
                headers,
                body,
                url: request.url.clone(),
            });
        }
        let error = AzureError::Arm(Box::new(ArmError::from_response(status, &body, request_id)));
        if is_retryable_status(status) {
            let retry_after = headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, inner.timer.now()));
            Attempt::Retry(error, retry_after)
        } else {
            Attempt::Failed(error)
        }
    }

    pub async fn get_json<T: DeserializeOwned>(&self, url: Url) -> Result<T, AzureError> {
        self.send(ApiRequest::arm(Method::GET, url)).await?.json()
    }

    /// Sends a request that may start a long-running operation and follows it to its end.
    pub async fn send_lro(&self, request: ApiRequest) -> Result<LroOutcome, AzureError> {
        let method = request.method.clone();
        let resource_url = request.url.clone();
        let initial = self.send(request).await?;
        self.follow_lro(&method, &resource_url, initial).await
    }

    /// Follows `Azure-AsyncOperation`, then `Location`, then `provisioningState`, with URLs exactly as
    /// returned. A PUT or PATCH ends with a GET of the resource; a POST returns the `Location` result.
    pub async fn follow_lro(
        &self,
        method: &Method,
        resource_url: &Url,
        initial: ApiResponse,
    ) -> Result<LroOutcome, AzureError> {
        let started = self.inner.timer.now();
        let puts_resource = *method == Method::PUT || *method == Method::PATCH;
        let async_operation = header_url(&initial, "azure-asyncoperation")?;
        let location = header_url(&initial, "location")?;
        let initial_body = initial.json_opt()?;

        if let Some(status_url) = async_operation {
            let mut wait = self.poll_wait(&initial);
            let status_body = loop {
                self.sleep_within_budget(wait, started, &status_url).await?;
                let response = self
                    .send(ApiRequest::arm(Method::GET, status_url.clone()))
                    .await?;
                wait = self.poll_wait(&response);
                let body: Value = response.json()?;
                let status = body.get("status").and_then(Value::as_str).unwrap_or("");
                match terminal(status) {
                    Some(true) => break body,
                    Some(false) => return Err(operation_failed(status, &body, &status_url)),
                    None => continue,
                }
            };
            let resource = if puts_resource {
                Some(
                    self.send(ApiRequest::arm(Method::GET, resource_url.clone()))
                        .await?
                        .json()?,
                )
            } else if let Some(location) = location {
                self.poll_location(location, Duration::ZERO, started)
                    .await?
            } else {
                None
            };
            return Ok(LroOutcome {
                operation_status: Some(status_body),
                resource,
            });
        }
        if let Some(location) = location {
            if initial.status == 202 || !puts_resource {
                let resource = self
                    .poll_location(location, self.poll_wait(&initial), started)
                    .await?;
                let resource = match (resource, puts_resource) {
                    (None, true) => Some(
                        self.send(ApiRequest::arm(Method::GET, resource_url.clone()))
                            .await?
                            .json()?,
                    ),
                    (resource, _) => resource,
                };
                return Ok(LroOutcome {
                    operation_status: None,
                    resource,
                });
            }
        }
        if puts_resource {
            if let Some(body) = &initial_body {
                if provisioning_state(body).is_some_and(|s| terminal(s).is_none()) {
                    return self
                        .poll_provisioning_state(resource_url, self.poll_wait(&initial), started)
                        .await;
                }
                if let Some(state) = provisioning_state(body) {
                    if terminal(state) == Some(false) {
                        return Err(operation_failed(state, body, resource_url));
                    }
                }
            }
        }
        Ok(LroOutcome {
            operation_status: None,
            resource: initial_body,
        })
    }

    async fn poll_location(
        &self,
        location: Url,
        first_wait: Duration,
        started: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<Value>, AzureError> {
        let mut wait = first_wait;
        loop {
            self.sleep_within_budget(wait, started, &location).await?;
            let response = self
                .send(ApiRequest::arm(Method::GET, location.clone()))
                .await?;
            if response.status == 202 {
                wait = self.poll_wait(&response);
                continue;
            }
            return response.json_opt();
        }
    }

    async fn poll_provisioning_state(
        &self,
        resource_url: &Url,
        first_wait: Duration,
        started: chrono::DateTime<chrono::Utc>,
    ) -> Result<LroOutcome, AzureError> {
        let mut wait = first_wait;
        loop {
            self.sleep_within_budget(wait, started, resource_url)
                .await?;
            let response = self
                .send(ApiRequest::arm(Method::GET, resource_url.clone()))
                .await?;
            wait = self.poll_wait(&response);
            let body: Value = response.json()?;
            let state = provisioning_state(&body).unwrap_or("Succeeded").to_string();
            match terminal(&state) {
                Some(true) => {
                    return Ok(LroOutcome {
                        operation_status: None,
                        resource: Some(body),
                    })
                }
                Some(false) => return Err(operation_failed(&state, &body, resource_url)),
                None => continue,
            }
        }
    }

    fn poll_wait(&self, response: &ApiResponse) -> Duration {
        response
            .header("retry-after")
            .and_then(|v| parse_retry_after(v, self.inner.timer.now()))
            .unwrap_or(self.inner.lro.default_poll_interval)
    }

    async fn sleep_within_budget(
        &self,
        wait: Duration,
        started: chrono::DateTime<chrono::Utc>,
        url: &Url,
    ) -> Result<(), AzureError> {
        let elapsed = (self.inner.timer.now() - started)
            .to_std()
            .unwrap_or_default();
        if elapsed + wait > self.inner.lro.max_duration {
            return Err(AzureError::GaveUp {
                url: display_url(url),
                attempts: 0,
                reason: format!("operation still running after {}s", elapsed.as_secs()),
            });
        }
        self.inner.timer.sleep(wait).await;
        Ok(())
    }

    /// Every item of an ARM list, following `nextLink` exactly as returned.
    pub async fn list_all<T: DeserializeOwned>(
        &self,
        first: ApiRequest,
    ) -> Result<Vec<T>, AzureError> {
        #[derive(Deserialize)]
        struct Page<T> {
            #[serde(default = "Vec::new")]
            value: Vec<T>,
            #[serde(rename = "nextLink", default)]
            next_link: Option<String>,
        }
        let mut items = Vec::new();
        let mut request = first;
        let mut seen = std::collections::HashSet::new();
        loop {
            let page: Page<T> = self.send(request.clone()).await?.json()?;
            items.extend(page.value);
            let Some(next) = page.next_link.filter(|l| !l.is_empty()) else {
                return Ok(items);
            };
            if !seen.insert(next.clone()) {
                return Err(AzureError::Decode {
                    url: display_url(&request.url),
                    message: "nextLink repeats an earlier page".into(),
                });
            }
            request.url = Url::parse(&next).map_err(|e| AzureError::Decode {
                url: display_url(&request.url),
                message: format!("nextLink is not a URL: {e}"),
            })?;
            request.method = Method::GET;
            request.body = None;
        }
    }
}

/// Decodes the resource an operation produced; `what` names it in the error.
pub(crate) fn decode_resource<T: DeserializeOwned>(
    value: Option<Value>,
    what: &str,
) -> Result<T, AzureError> {
    let value = value.ok_or_else(|| AzureError::Decode {
        url: what.to_string(),
        message: "the operation returned no resource".into(),
    })?;
    serde_json::from_value(value).map_err(|e| AzureError::Decode {
        url: what.to_string(),
        message: e.to_string(),
    })
}

fn header_url(response: &ApiResponse, name: &str) -> Result<Option<Url>, AzureError> {
    let Some(value) = response.header(name) else {
        return Ok(None);
    };
    // Relative Location values are resolved against the request; absolute ones are used as given.
    response
        .url
        .join(value.trim())
        .map(Some)
        .map_err(|e| AzureError::Decode {
            url: display_url(&response.url),
            message: format!("{name} header is not a URL: {e}"),
        })
}

fn provisioning_state(body: &Value) -> Option<&str> {
    body.get("properties")?.get("provisioningState")?.as_str()
}

/// `Some(true)` succeeded, `Some(false)` failed or canceled, `None` still running.
fn terminal(status: &str) -> Option<bool> {
    match status.to_ascii_lowercase().as_str() {
        "succeeded" => Some(true),
        "failed" | "canceled" | "cancelled" => Some(false),
        _ => None,
    }
}

fn operation_failed(status: &str, body: &Value, url: &Url) -> AzureError {
    let error = body
        .get("error")
        .or_else(|| body.get("properties").and_then(|p| p.get("error")))
        .and_then(|e| serde_json::from_value::<ArmErrorDetail>(e.clone()).ok())
        .unwrap_or_else(|| ArmErrorDetail {
            code: status.to_string(),
            message: format!("operation ended as {status}"),
            ..Default::default()
        });
    AzureError::OperationFailed {
        status: status.to_string(),
        error: Box::new(error),
        url: display_url(url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_version_is_appended_and_foreign_hosts_are_refused() {
        let base = Url::parse("http://127.0.0.1:9000/").unwrap();
        let url =
            with_api_version(&base, "/subscriptions/s/resourceGroups/r g", "2025-04-01").unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9000/subscriptions/s/resourceGroups/r%20g?api-version=2025-04-01"
        );
        assert!(with_api_version(&base, "https://evil.example/x", "1").is_err());
    }

    #[test]
    fn job_id_from_operation_status() {
        let outcome = LroOutcome {
            operation_status: Some(
                serde_json::json!({"status":"Succeeded","properties":{"objectType":"OperationStatusJobExtendedInfo","jobId":"j1"}}),
            ),
            resource: None,
        };
        assert_eq!(outcome.job_id().as_deref(), Some("j1"));
        let outcome = LroOutcome {
            operation_status: Some(serde_json::json!({"properties":{"jobIds":["a","b"]}})),
            resource: None,
        };
        assert_eq!(outcome.job_id().as_deref(), Some("a"));
    }

    #[test]
    fn terminal_states() {
        assert_eq!(terminal("Succeeded"), Some(true));
        assert_eq!(terminal("Canceled"), Some(false));
        assert_eq!(terminal("InProgress"), None);
        assert_eq!(terminal("Updating"), None);
    }

    #[test]
    fn data_plane_tokens_go_only_to_that_service_or_the_configured_arm_origin() {
        let arm = Url::parse("https://management.azure.com").unwrap();
        let simulator = Url::parse("http://127.0.0.1:7000").unwrap();
        let request = |audience, url: &str| {
            ApiRequest::data_plane(Method::GET, Url::parse(url).unwrap(), audience)
        };
        let allowed = [
            (
                Audience::KeyVault,
                "https://kv-app.vault.azure.net/secrets/bek/1",
                &arm,
            ),
            (
                Audience::Storage,
                "https://stgweu.blob.core.windows.net/c/b.json?sig=x",
                &arm,
            ),
            (
                Audience::Storage,
                "https://st.blob.core.chinacloudapi.cn/c/b",
                &arm,
            ),
            (
                Audience::Storage,
                "http://127.0.0.1:7000/blob/st/c/b",
                &simulator,
            ),
            (
                Audience::KeyVault,
                "http://127.0.0.1:7000/keyvault/kv/keys/k",
                &simulator,
            ),
            (Audience::Arm, "https://elsewhere.example/anything", &arm),
        ];
        for (audience, url, endpoint) in allowed {
            assert!(
                check_destination(&request(audience, url), endpoint).is_ok(),
                "{url}"
            );
        }
        let refused = [
            (
                Audience::Storage,
                "https://attacker.example/c/b.json?sig=secret",
                &arm,
            ),
            (
                Audience::Storage,
                "http://stgweu.blob.core.windows.net/c/b",
                &arm,
            ),
            (
                Audience::Storage,
                "https://blob.core.windows.net.attacker.example/c/b",
                &arm,
            ),
            (
                Audience::KeyVault,
                "https://kv.blob.core.windows.net/keys/k",
                &arm,
            ),
            (
                Audience::KeyVault,
                "http://127.0.0.1:7001/keyvault/kv/keys/k",
                &simulator,
            ),
        ];
        for (audience, url, endpoint) in refused {
            let error = check_destination(&request(audience, url), endpoint).unwrap_err();
            let text = error.to_string();
            assert!(text.contains("no token is sent there"), "{url}: {text}");
            assert!(
                !text.contains("secret"),
                "the query (a SAS) is not repeated: {text}"
            );
        }
    }
}
