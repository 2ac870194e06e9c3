//! The listener: one axum fallback handler that authenticates, checks api-version, throttles, injects
//! faults, dispatches to the providers and logs every request.

use super::http::{check_api_version, percent_decode, Body, Reply, Request};
use super::state::{Counters, RequestRecord, SimState};
use super::{backup, blob, compute, deployments, graph, keyvault, network, resources};
use crate::clock::Clock;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;

/// Path of the managed-identity token endpoint (App Service protocol).
pub const IDENTITY_PATH: &str = "/msi/token";

/// Token audiences the identity endpoint issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Audience {
    Arm,
    KeyVault,
    Storage,
    ServiceBus,
}

impl Audience {
    /// The audience of a `resource` as `ManagedIdentityCredential` sends it (scope without `/.default`).
    pub fn from_resource(resource: &str) -> Option<Audience> {
        let normalized = resource
            .trim()
            .trim_end_matches("/.default")
            .trim_end_matches('/')
            .to_ascii_lowercase();
        match normalized.as_str() {
            "https://management.azure.com" | "https://management.core.windows.net" => {
                Some(Audience::Arm)
            }
            "https://vault.azure.net" => Some(Audience::KeyVault),
            "https://storage.azure.com" => Some(Audience::Storage),
            "https://servicebus.azure.net" => Some(Audience::ServiceBus),
            _ => None,
        }
    }

    pub fn resource(&self) -> &'static str {
        match self {
            Audience::Arm => "https://management.azure.com",
            Audience::KeyVault => "https://vault.azure.net",
            Audience::Storage => "https://storage.azure.com",
            Audience::ServiceBus => "https://servicebus.azure.net",
        }
    }
}

#[derive(Debug, Clone)]
struct IssuedToken {
    audience: Audience,
    /// Simulated instant after which the token is refused.
    expires: DateTime<Utc>,
}

/// One token bucket: `capacity` requests, refilled at `refill_per_second` per simulated second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketLimit {
    pub capacity: f64,
    pub refill_per_second: f64,
}

/// ARM's per-subscription buckets (request-limits-and-throttling, 2025): reads 250 + 25/s, writes and
/// deletes 200 + 10/s. They refill in **simulated** time: a run at `timeScale` 0.001 compresses a day of
/// workflow into minutes, and what must match Azure is the request rate per simulated second (what the
/// same workflow would send to real ARM), not per wall second. `Retry-After` is in simulated seconds too.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleLimits {
    pub reads: BucketLimit,
    pub writes: BucketLimit,
    pub deletes: BucketLimit,
}

impl Default for ThrottleLimits {
    fn default() -> Self {
        ThrottleLimits {
            reads: BucketLimit {
                capacity: 250.0,
                refill_per_second: 25.0,
            },
            writes: BucketLimit {
                capacity: 200.0,
                refill_per_second: 10.0,
            },
            deletes: BucketLimit {
                capacity: 200.0,
                refill_per_second: 10.0,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OperationKind {
    Read,
    Write,
    Delete,
}

impl OperationKind {
    fn of(method: &Method) -> OperationKind {
        match *method {
            Method::GET | Method::HEAD => OperationKind::Read,
            Method::DELETE => OperationKind::Delete,
            _ => OperationKind::Write,
        }
    }
    fn name(&self) -> &'static str {
        match self {
            OperationKind::Read => "reads",
            OperationKind::Write => "writes",
            OperationKind::Delete => "deletes",
        }
    }
}

#[derive(Debug, Default)]
struct Throttle {
    buckets: HashMap<(String, OperationKind), (f64, DateTime<Utc>)>,
}

impl Throttle {
    /// Take a token; `Ok(remaining)` or `Err(retry_after_seconds)`.
    fn take(
        &mut self,
        limits: &ThrottleLimits,
        subscription: &str,
        kind: OperationKind,
        now: DateTime<Utc>,
    ) -> Result<u64, u64> {
        let limit = match kind {
            OperationKind::Read => limits.reads,
            OperationKind::Write => limits.writes,
            OperationKind::Delete => limits.deletes,
        };
        let bucket = self
            .buckets
            .entry((subscription.to_ascii_lowercase(), kind))
            .or_insert((limit.capacity, now));
        let elapsed = (now - bucket.1).num_milliseconds().max(0) as f64 / 1000.0;
        bucket.0 = (bucket.0 + elapsed * limit.refill_per_second).min(limit.capacity);
        bucket.1 = now;
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            Ok(bucket.0.floor() as u64)
        } else if limit.refill_per_second > 0.0 {
            Err(((1.0 - bucket.0) / limit.refill_per_second).ceil().max(1.0) as u64)
        } else {
            Err(3600)
        }
    }
}

pub(crate) struct Shared {
    pub state: Mutex<SimState>,
    pub clock: Clock,
    pub base_url: String,
    pub identity_header: String,
    pub events: broadcast::Sender<Value>,
    pub event_sink: Option<url::Url>,
    pub http: reqwest::Client,
    tokens: Mutex<HashMap<String, IssuedToken>>,
    throttle: Mutex<Throttle>,
    pub throttle_limits: ThrottleLimits,
    faults: Mutex<StdRng>,
}

impl Shared {
    pub fn new(
        state: SimState,
        clock: Clock,
        base_url: String,
        identity_header: String,
        event_sink: Option<url::Url>,
        throttle_limits: ThrottleLimits,
    ) -> Shared {
        let seed = state.simulation.faults.seed;
        let (events, _) = broadcast::channel(1024);
        Shared {
            state: Mutex::new(state),
            clock,
            base_url,
            identity_header,
            events,
            event_sink,
            http: reqwest::Client::new(),
            tokens: Mutex::new(HashMap::new()),
            throttle: Mutex::new(Throttle::default()),
            throttle_limits,
            faults: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }

    /// The state with simulated time applied; a poisoned lock is recovered (state stays usable for tests).
    pub fn lock_state(&self) -> MutexGuard<'_, SimState> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        guard.advance(self.clock.now());
        guard
    }

    /// Publish events the state produced: to subscribers and, when configured, to the HTTP sink.
    pub fn publish_events(&self, state: &mut SimState) {
        if state.outbox.is_empty() {
            return;
        }
        let events: Vec<Value> = std::mem::take(&mut state.outbox);
        for event in &events {
            // No subscriber is not an error: events are also delivered to the sink.
            let _ = self.events.send(event.clone());
        }
        if let Some(sink) = &self.event_sink {
            let client = self.http.clone();
            let sink = sink.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    // Event Grid delivers arrays of events with this header.
                    let result = client
                        .post(sink)
                        .header("aeg-event-type", "Notification")
                        .json(&events)
                        .send()
                        .await;
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "event sink delivery failed");
                    }
                });
            }
        }
    }

    pub fn token_audience(&self, token: &str) -> Option<Audience> {
        let now = self.clock.now();
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .get(token)
            .filter(|t| t.expires > now)
            .map(|t| t.audience)
    }

    fn issue_token(&self, audience: Audience) -> (String, i64) {
        // 24 simulated hours, but never less than an hour of wall time, so that a client cache (which
        // compares expiry with the wall clock) does not refetch on every call at high time scales.
        let wall_lifetime = self
            .clock
            .wall_duration(std::time::Duration::from_secs(24 * 3600))
            .max(std::time::Duration::from_secs(3600));
        let wall_expiry = Utc::now()
            + chrono::Duration::from_std(wall_lifetime).unwrap_or(chrono::Duration::hours(1));
        let token = format!("sim-{}", uuid::Uuid::new_v4().simple());
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                token.clone(),
                IssuedToken {
                    audience,
                    expires: self.clock.sim_at_wall(wall_expiry),
                },
            );
        (token, wall_expiry.timestamp())
    }

    /// Revoke every token (tests of expiry and re-authentication).
    pub fn revoke_tokens(&self) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

fn parse_query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

pub(crate) async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = parse_query(&uri);
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let now = shared.clock.now();
    let request = Request {
        method: method.clone(),
        segments,
        query,
        headers: &headers,
        body: &body,
        now,
        base_url: shared.base_url.clone(),
    };

    if path == IDENTITY_PATH {
        let reply = identity(&shared, &request);
        record(&shared, &request, &path, &reply, false, None, false);
        return into_response(reply);
    }
    let first = request.segments.first().map(|s| s.to_ascii_lowercase());
    let (reply, throttled, subscription, is_arm) = match first.as_deref() {
        Some("keyvault") => (key_vault_plane(&shared, &request), false, None, false),
        Some("blob") => (blob_plane(&shared, &request), false, None, false),
        _ => {
            let subscription = request
                .segments
                .first()
                .filter(|s| s.eq_ignore_ascii_case("subscriptions"))
                .and_then(|_| request.segments.get(1).cloned());
            let (reply, throttled) = arm_plane(&shared, &request, subscription.as_deref());
            (reply, throttled, subscription, true)
        }
    };
    record(
        &shared,
        &request,
        &path,
        &reply,
        throttled,
        subscription,
        is_arm,
    );
    into_response(reply)
}

fn record(
    shared: &Shared,
    request: &Request,
    path: &str,
    reply: &Reply,
    throttled: bool,
    subscription: Option<String>,
    is_arm: bool,
) {
    let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    if is_arm {
        state.counters.requests += 1;
        if throttled {
            state.counters.throttled += 1;
        }
        if request.method != Method::GET && request.method != Method::HEAD {
            state.counters.writes += 1;
        }
    }
    state.request_log.push(RequestRecord {
        method: request.method.to_string(),
        path: path.to_string(),
        status: reply.status.as_u16(),
        throttled,
        subscription,
        at: request.now,
    });
    shared.publish_events(&mut state);
}

fn into_response(reply: Reply) -> Response {
    let mut response = match reply.body {
        Body::Empty => reply.status.into_response(),
        Body::Json(value) => (reply.status, axum::Json(value)).into_response(),
        Body::Bytes {
            content,
            content_type,
        } => (reply.status, [("content-type", content_type)], content).into_response(),
    };
    for (name, value) in reply.headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response.headers_mut().insert(
        "x-ms-request-id",
        HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
            .unwrap_or(HeaderValue::from_static("0")),
    );
    response
}

/// App Service managed identity: `GET IDENTITY_ENDPOINT?resource=…&api-version=2019-08-01` with `X-IDENTITY-HEADER`.
fn identity(shared: &Shared, request: &Request) -> Reply {
    let header_ok = request
        .headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == shared.identity_header);
    if !header_ok {
        return Reply::json(
            StatusCode::UNAUTHORIZED,
            json!({"error": "unauthorized", "error_description": "The X-IDENTITY-HEADER header is missing or wrong."}),
        );
    }
    let resource = request.query.get("resource").cloned().unwrap_or_default();
    let Some(audience) = Audience::from_resource(&resource) else {
        return Reply::json(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_resource", "error_description": format!("AADSTS500011: The resource principal named {resource} was not found in the tenant.")}),
        );
    };
    let (token, expires_on) = shared.issue_token(audience);
    // azure_identity parses expires_on as a string of Unix seconds.
    Reply::ok(json!({
        "access_token": token,
        "expires_on": expires_on.to_string(),
        "resource": resource,
        "token_type": "Bearer",
        "client_id": super::state::APP_PRINCIPAL_ID,
    }))
}

fn arm_plane(shared: &Shared, request: &Request, subscription: Option<&str>) -> (Reply, bool) {
    match bearer(request.headers) {
        None => {
            return (
                Reply::arm_error(StatusCode::UNAUTHORIZED, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.")
                    .with_header("www-authenticate", arm_challenge("invalid_token")),
                false,
            )
        }
        Some(token) => match shared.token_audience(token) {
            Some(Audience::Arm) => {}
            Some(other) => {
                return (
                    Reply::arm_error(
                        StatusCode::UNAUTHORIZED,
                        "InvalidAuthenticationTokenAudience",
                        &format!("The access token has been obtained for wrong audience or resource '{}'. It should exactly match with one of the allowed audiences 'https://management.core.windows.net/','https://management.azure.com/'.", other.resource()),
                    )
                    .with_header("www-authenticate", arm_challenge("invalid_token")),
                    false,
                )
            }
            None => {
                return (
                    Reply::arm_error(StatusCode::UNAUTHORIZED, "AuthenticationFailed", "Authentication failed. The access token is invalid or has expired.")
                        .with_header("www-authenticate", arm_challenge("invalid_token")),
                    false,
                )
            }
        },
    }
    if let Err(reply) = check_api_version(&request.query, false) {
        return (reply, false);
    }
    let kind = OperationKind::of(&request.method);
    let mut remaining_header = None;
    if let Some(subscription) = subscription {
        let taken = shared
            .throttle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&shared.throttle_limits, subscription, kind, request.now);
        match taken {
            Ok(remaining) => {
                remaining_header = Some((
                    format!("x-ms-ratelimit-remaining-subscription-{}", kind.name()),
                    remaining.to_string(),
                ))
            }
            Err(retry_after) => {
                let message = format!(
                    "Number of '{}' requests for subscription '{subscription}' actor '{}' exceeded. Please try again after '{retry_after}' seconds after additional tokens are available.",
                    kind.name().trim_end_matches('s'),
                    super::state::APP_PRINCIPAL_ID
                );
                let reply = Reply::arm_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "SubscriptionRequestsThrottled",
                    &message,
                )
                .with_header("retry-after", retry_after.to_string())
                .with_header(
                    &format!("x-ms-ratelimit-remaining-subscription-{}", kind.name()),
                    "0",
                );
                return (reply, true);
            }
        }
    }
    if let Some(reply) = injected_fault(shared) {
        return (reply, false);
    }
    let mut state = shared.lock_state();
    let mut reply = dispatch_arm(&mut state, request);
    if let Some((name, value)) = remaining_header {
        reply = reply.with_header(&name, value);
    }
    (reply, false)
}

fn arm_challenge(error: &str) -> String {
    format!(
        "Bearer authorization_uri=\"https://login.microsoftonline.com/{}\", error=\"{error}\", error_description=\"The access token is missing or invalid.\"",
        super::state::TENANT_ID
    )
}

/// Seeded fault injection; the n-th ARM request draws the n-th number of the seed's sequence.
fn injected_fault(shared: &Shared) -> Option<Reply> {
    let faults = {
        let state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        state.simulation.faults.clone()
    };
    if faults.rate <= 0.0 || faults.statuses.is_empty() {
        return None;
    }
    let mut rng = shared.faults.lock().unwrap_or_else(|p| p.into_inner());
    let roll: f64 = rng.gen();
    let pick = rng.gen_range(0..faults.statuses.len());
    if roll >= faults.rate {
        return None;
    }
    let status =
        StatusCode::from_u16(faults.statuses[pick]).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // The codes of injected faults are the simulator's own (ARM uses several for each status).
    let code = match status.as_u16() {
        429 => "TooManyRequests",
        500 => "InternalServerError",
        502 => "BadGateway",
        503 => "ServiceUnavailable",
        504 => "GatewayTimeout",
        _ => "InjectedFault",
    };
    let mut reply = Reply::arm_error(
        status,
        code,
        "The simulator injected this fault (fleet simulation.faults).",
    );
    if matches!(status.as_u16(), 429 | 503) {
        reply = reply.with_header("retry-after", "5");
    }
    Some(reply)
}

fn dispatch_arm(state: &mut SimState, request: &Request) -> Reply {
    let providers: [fn(&mut SimState, &Request) -> Option<Reply>; 6] = [
        compute::route,
        network::route,
        backup::route,
        keyvault::route_management,
        resources::route,
        deployments::route,
    ];
    for provider in providers {
        if let Some(reply) = provider(state, request) {
            return reply;
        }
    }
    if let Some(reply) = graph::route(state, request) {
        return reply;
    }
    Reply::arm_error(
        StatusCode::NOT_FOUND,
        "InvalidResourceType",
        &format!(
            "The simulator serves no operation {} /{}.",
            request.method,
            request.segments.join("/")
        ),
    )
}

fn key_vault_plane(shared: &Shared, request: &Request) -> Reply {
    let challenge = format!(
        "Bearer authorization=\"https://login.microsoftonline.com/{}\", resource=\"https://vault.azure.net\"",
        super::state::TENANT_ID
    );
    let audience = bearer(request.headers).and_then(|t| shared.token_audience(t));
    if audience != Some(Audience::KeyVault) {
        let message = if bearer(request.headers).is_none() {
            "AKV10000: Request is missing a Bearer or PoP token."
        } else {
            "AKV10022: Invalid audience or expired token."
        };
        return Reply::arm_error(StatusCode::UNAUTHORIZED, "Unauthorized", message)
            .with_header("www-authenticate", challenge);
    }
    if let Err(reply) = check_api_version(&request.query, true) {
        return reply;
    }
    let mut state = shared.lock_state();
    keyvault::route_data_plane(&mut state, request)
}

fn blob_plane(shared: &Shared, request: &Request) -> Reply {
    // A SAS (sv + sig) is accepted without checking its signature: the simulator holds no account keys.
    let has_sas = request.query.contains_key("sig") && request.query.contains_key("sv");
    let audience = bearer(request.headers).and_then(|t| shared.token_audience(t));
    if !has_sas && audience != Some(Audience::Storage) {
        return blob::error(StatusCode::UNAUTHORIZED, "NoAuthenticationInformation", "Server failed to authenticate the request. Please refer to the information in the www-authenticate header.")
            .with_header("www-authenticate", format!("Bearer authorization_uri=https://login.microsoftonline.com/{}/oauth2/authorize resource_id=https://storage.azure.com", super::state::TENANT_ID));
    }
    let mut state = shared.lock_state();
    blob::route(&mut state, request)
}

/// Snapshot of the request log and counters.
pub(crate) fn log_snapshot(shared: &Shared) -> (Vec<RequestRecord>, Counters) {
    let state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    (state.request_log.clone(), state.counters)
}
