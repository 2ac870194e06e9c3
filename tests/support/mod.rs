//! Test harness for the workflow: the Azure simulator, the durable local Service Bus with its REST
//! endpoint, the handler (`workflow::app`) served over real HTTP in this process, and the local host
//! delivering messages to it exactly as the Functions host would (reading the checked-in
//! `host.json` and `functions/*/function.json`).
//!
//! The handler gets its tokens from the simulator's managed-identity endpoint over the same
//! App Service protocol `azure_identity` uses (a process-wide environment variable cannot point
//! every parallel test at its own simulator).

#![allow(dead_code)]

use async_trait::async_trait;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vmbackup::azure::config::{
    SasKey, ServiceBusConfig, ENV_ARM_ENDPOINT, ENV_CREDENTIAL, ENV_SERVICEBUS_CONNECTION_STRING,
    ENV_SERVICEBUS_ENDPOINT,
};
use vmbackup::azure::{AzureConfig, AzureError, BearerToken, TokenSource};
use vmbackup::clock::Clock;
use vmbackup::events::{CloudEvent, EventData};
use vmbackup::local::app::App;
use vmbackup::local::host::{DuplicateDelivery, HandlerTarget, Host, HostConfig};
use vmbackup::local::queue::{JournalEntry, OutgoingMessage, Queue, QueueOptions};
use vmbackup::local::servicebus_endpoint::{self, EndpointConfig, RunningEndpoint};
use vmbackup::simulator::fleet::Fleet;
use vmbackup::simulator::{Simulator, SimulatorConfig, SimulatorHandle};
use vmbackup::workflow::{settings, Deps, Settings};

pub const SAS_KEY_NAME: &str = "RootManageSharedAccessKey";
pub const NAMESPACE: &str = "vmbackup-local";
/// The function key the host's HTTP front door accepts (`?code=` or `x-functions-key`).
pub const FUNCTION_KEY: &str = "test-function-key";
/// Timers are fired by the tests (`fire_timer`), never by the clock.
pub const NEVER: &str = "0 0 0 1 1 *";

/// Tokens from the simulator's managed-identity endpoint (`IDENTITY_ENDPOINT` + `X-IDENTITY-HEADER`),
/// cached per audience until shortly before they expire, as the app's `azure_identity` source caches
/// them (one fetch per call would double the handler's requests). The simulator's `expires_on` is
/// wall-clock Unix seconds, as a client cache compares it.
pub struct SimulatorTokens {
    endpoint: String,
    header: String,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<HashMap<String, (BearerToken, chrono::DateTime<chrono::Utc>)>>,
}

impl SimulatorTokens {
    /// Tokens from `sim`'s managed-identity endpoint.
    pub fn for_simulator(sim: &SimulatorHandle) -> Self {
        SimulatorTokens {
            endpoint: sim.identity_endpoint(),
            header: sim.identity_header(),
            http: reqwest::Client::new(),
            cache: Default::default(),
        }
    }
}

/// A cached token is replaced this long before it expires.
const TOKEN_REFRESH_MARGIN: chrono::Duration = chrono::Duration::minutes(5);

#[async_trait]
impl TokenSource for SimulatorTokens {
    async fn token(&self, audience: &str) -> Result<BearerToken, AzureError> {
        // One lock across the fetch: concurrent callers wait for one token instead of all asking.
        let mut cache = self.cache.lock().await;
        if let Some((token, expires_on)) = cache.get(audience) {
            if *expires_on > chrono::Utc::now() + TOKEN_REFRESH_MARGIN {
                return Ok(token.clone());
            }
        }
        let resource = audience.trim_end_matches("/.default");
        let failed = |message: String| AzureError::Auth {
            audience: audience.to_string(),
            message,
        };
        let response = self
            .http
            .get(&self.endpoint)
            .query(&[("resource", resource), ("api-version", "2019-08-01")])
            .header("X-IDENTITY-HEADER", &self.header)
            .send()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let body: Value = response.json().await.map_err(|e| failed(e.to_string()))?;
        let token = body["access_token"]
            .as_str()
            .map(BearerToken::new)
            .ok_or_else(|| failed("no access_token in the identity response".into()))?;
        // `expires_on` is Unix seconds as a string; without it the token is not cached.
        let expires_on = body["expires_on"]
            .as_str()
            .and_then(|s| s.parse::<i64>().ok())
            .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0));
        if let Some(expires_on) = expires_on {
            cache.insert(audience.to_string(), (token.clone(), expires_on));
        }
        Ok(token)
    }
}

pub struct Harness {
    pub sim: SimulatorHandle,
    pub queue: Queue,
    pub host: Option<Host>,
    pub deps: Arc<Deps>,
    pub clock: Clock,
    pub handler_url: String,
    pub state_dir: PathBuf,
    /// The host's HTTP front door (HTTP triggers under `/api/…`, key [`FUNCTION_KEY`]).
    pub front_door_url: String,
    /// The local Service Bus endpoint (`http://addr/`) and its SAS key for [`SAS_KEY_NAME`].
    pub service_bus_url: String,
    pub sas_key: String,
    endpoint: Option<RunningEndpoint>,
    handler_stop: Option<tokio::sync::oneshot::Sender<()>>,
    forwarder: tokio::task::JoinHandle<()>,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Options that tests may change before starting.
#[derive(Default)]
pub struct Options {
    /// App settings on top of the harness's own (subscriptions, BMS object id, schedules).
    pub settings: HashMap<String, String>,
}

/// The host starts the real binary (`vmbackup serve`) as its handler child, configured through app
/// settings as `vmbackup local` does, instead of delivering to the in-process handler.
#[derive(Default)]
pub struct RealHandler {
    /// The host's chaos option (see [`DuplicateDelivery`]).
    pub duplicate_delivery: Option<DuplicateDelivery>,
}

impl Harness {
    pub async fn start(fleet_json: &str) -> Harness {
        Self::start_with(fleet_json, Options::default()).await
    }

    pub async fn start_with(fleet_json: &str, options: Options) -> Harness {
        Self::start_at(fleet_json, options, None).await
    }

    /// Start with the simulated clock at `sim_start` (default: now). A fixed instant (e.g. 01:00
    /// UTC) keeps a scenario's simulated hours inside one UTC day whatever the time of day.
    pub async fn start_at(
        fleet_json: &str,
        options: Options,
        sim_start: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Harness {
        Self::start_inner(fleet_json, options, sim_start, None).await
    }

    /// Start with the real `vmbackup serve` child as the host's handler.
    pub async fn start_real_handler(
        fleet_json: &str,
        options: Options,
        real: RealHandler,
    ) -> Harness {
        Self::start_inner(fleet_json, options, None, Some(real)).await
    }

    async fn start_inner(
        fleet_json: &str,
        options: Options,
        sim_start: Option<chrono::DateTime<chrono::Utc>>,
        real_handler: Option<RealHandler>,
    ) -> Harness {
        let fleet = Fleet::from_json_str(fleet_json).expect("the test fleet is valid");
        let subscriptions: Vec<String> = fleet.subscriptions.iter().map(|s| s.id.clone()).collect();
        let mut sim_config = SimulatorConfig::new(fleet);
        if let Some(start) = sim_start {
            sim_config.clock = Clock::scaled(start, sim_config.clock.time_scale());
        }
        let sim = Simulator::start(sim_config)
            .await
            .expect("simulator starts");
        let clock = sim.clock();
        let state_dir =
            std::env::temp_dir().join(format!("vmbackup-test-{}", uuid::Uuid::new_v4()));
        let queue = Queue::open(&state_dir, clock).expect("queue opens");

        // The local Service Bus endpoint the handler's sender talks to.
        let sas_key = uuid::Uuid::new_v4().simple().to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = servicebus_endpoint::spawn(
            queue.clone(),
            EndpointConfig {
                sas_keys: HashMap::from([(SAS_KEY_NAME.to_string(), sas_key.clone())]),
                bearer_check: None,
                public_base_url: format!("https://{NAMESPACE}.servicebus.windows.net"),
            },
            listener,
        )
        .expect("endpoint starts");

        // App settings: what infra sets in Azure, pointed at the simulator.
        let mut app_settings: HashMap<String, String> = HashMap::from([
            (settings::SUBSCRIPTIONS.to_string(), subscriptions.join(",")),
            (
                settings::BACKUP_MANAGEMENT_SERVICE_OBJECT_ID.to_string(),
                vmbackup::simulator::state::BACKUP_MANAGEMENT_SERVICE_OBJECT_ID.to_string(),
            ),
            (settings::DISCOVERY_SCHEDULE.to_string(), NEVER.to_string()),
            (settings::BACKUP_SCHEDULE.to_string(), NEVER.to_string()),
        ]);
        app_settings.extend(options.settings);
        let workflow_settings = Settings::from_lookup(|name| app_settings.get(name).cloned())
            .expect("test settings are valid");
        let mut config = AzureConfig::for_endpoint(sim.arm_endpoint().parse().unwrap());
        config.service_bus = Some(ServiceBusConfig {
            namespace: NAMESPACE.to_string(),
            sas: Some(SasKey {
                policy_name: SAS_KEY_NAME.to_string(),
                key: sas_key.clone(),
            }),
            endpoint_override: Some(format!("http://{}/", endpoint.addr).parse().unwrap()),
        });
        let tokens = Arc::new(SimulatorTokens::for_simulator(&sim));
        let deps = Arc::new(
            Deps::with_tokens(workflow_settings, clock, config, tokens).expect("deps build"),
        );

        // The handler, over real HTTP.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handler_url = format!("http://{}", listener.local_addr().unwrap());
        let (handler_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(vmbackup::runtime::serve_with_shutdown(
            listener,
            vmbackup::workflow::app(deps.clone()),
            async move {
                let _ = stopped.await;
            },
        ));

        // Event Grid: the simulator's resource events land on vm-events, one message each.
        let mut events = sim.subscribe_events();
        let forward_queue = queue.clone();
        let forwarder = tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                let items = match event {
                    Value::Array(items) => items,
                    single => vec![single],
                };
                for item in items {
                    let mut message = OutgoingMessage::new(item.to_string());
                    message.properties.message_id = item["id"].as_str().map(str::to_string);
                    message.properties.content_type = Some("application/json".into());
                    let _ = forward_queue.send(vmbackup::events::queues::VM_EVENTS, &message);
                }
            }
        });

        let app = App::load(&repo_root(), &app_settings).expect("the checked-in app layout loads");
        for name in vmbackup::events::queues::ALL {
            if !queue.queue_exists(name).unwrap() {
                // Lock durations and duplicate detection windows as infra gives Azure's queues.
                queue
                    .create_queue(name, &QueueOptions::as_in_infra(name))
                    .unwrap();
            }
        }
        let mut host_config = HostConfig::new(app, queue.clone());
        host_config.target = HandlerTarget::Url(handler_url.clone());
        if let Some(real) = real_handler {
            host_config.duplicate_delivery = real.duplicate_delivery;
            host_config.target = HandlerTarget::Command {
                executable: env!("CARGO_BIN_EXE_vmbackup").into(),
                arguments: vec!["serve".into()],
                working_directory: repo_root(),
            };
            app_settings.extend([
                (ENV_ARM_ENDPOINT.to_string(), sim.arm_endpoint()),
                ("IDENTITY_ENDPOINT".to_string(), sim.identity_endpoint()),
                ("IDENTITY_HEADER".to_string(), sim.identity_header()),
                (ENV_CREDENTIAL.to_string(), "managed-identity".to_string()),
                (
                    ENV_SERVICEBUS_CONNECTION_STRING.to_string(),
                    format!("Endpoint=sb://{NAMESPACE}.servicebus.windows.net/;SharedAccessKeyName={SAS_KEY_NAME};SharedAccessKey={sas_key}"),
                ),
                (ENV_SERVICEBUS_ENDPOINT.to_string(), format!("http://{}/", endpoint.addr)),
            ]);
        }
        host_config.app_settings = app_settings;
        host_config.clock = clock;
        host_config.http_listen = Some("127.0.0.1:0".parse().unwrap());
        host_config.function_keys = vec![FUNCTION_KEY.to_string()];
        let host = Host::start(host_config).await.expect("host starts");
        let front_door_url = format!("http://{}", host.http_addr().expect("front door listens"));
        let service_bus_url = format!("http://{}/", endpoint.addr);
        Harness {
            sim,
            queue,
            host: Some(host),
            deps,
            clock,
            handler_url,
            state_dir,
            front_door_url,
            service_bus_url,
            sas_key,
            endpoint: Some(endpoint),
            handler_stop: Some(handler_stop),
            forwarder,
        }
    }

    /// Put an event on its queue, as another function or a ticket system would.
    pub fn send<T: EventData>(&self, event: &CloudEvent<T>) {
        let mut message = OutgoingMessage::new(serde_json::to_vec(event).unwrap());
        message.properties.message_id = Some(event.id.clone());
        message.properties.content_type = Some("application/json".into());
        self.queue.send(T::QUEUE, &message).unwrap();
    }

    /// A Service Bus connection string for the local endpoint (send it to [`Self::service_bus_url`]
    /// through `VMBACKUP_SERVICEBUS_ENDPOINT`).
    pub fn service_bus_connection_string(&self) -> String {
        format!(
            "Endpoint=sb://{NAMESPACE}.servicebus.windows.net/;SharedAccessKeyName={SAS_KEY_NAME};SharedAccessKey={}",
            self.sas_key
        )
    }

    /// Put raw bytes on a queue (malformed-message tests).
    pub fn send_raw(&self, queue: &str, body: &str) {
        self.queue.send(queue, &OutgoingMessage::new(body)).unwrap();
    }

    pub async fn fire_timer(&self, function: &str) {
        self.host
            .as_ref()
            .unwrap()
            .fire_timer(function)
            .await
            .unwrap();
    }

    /// Wait until nothing is running, in flight or scheduled; false on timeout (wall time).
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let host = self.host.as_ref().unwrap();
        let mut quiet_polls = 0;
        while tokio::time::Instant::now() < deadline {
            // Idle twice in a row, so a message enqueued between the checks is not missed.
            if host.is_idle().unwrap_or(false) {
                quiet_polls += 1;
                if quiet_polls >= 3 {
                    return true;
                }
            } else {
                quiet_polls = 0;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Every message enqueued so far, in order.
    pub fn journal(&self) -> Vec<JournalEntry> {
        self.queue.journal_since(0).unwrap()
    }

    /// The CloudEvents of one type enqueued so far.
    pub fn events_of(&self, event_type: &str) -> Vec<Value> {
        self.journal()
            .into_iter()
            .filter_map(|e| serde_json::from_slice::<Value>(&e.body).ok())
            .filter(|v| v["type"] == event_type)
            .collect()
    }

    /// ARM writes (PUT, PATCH, POST, DELETE) the simulator has served so far.
    pub fn arm_writes(&self) -> usize {
        self.sim
            .request_log()
            .iter()
            .filter(|r| r.method != "GET" && !r.path.contains("/msi/"))
            .count()
    }

    /// Invoke a function directly over HTTP with a Service Bus payload, as a redelivery would.
    pub async fn invoke(&self, function: &str, body: &Value, delivery_count: u32) -> (u16, Value) {
        let payload = serde_json::json!({
            "Data": { "message": serde_json::to_string(&body.to_string()).unwrap() },
            "Metadata": { "DeliveryCount": delivery_count.to_string(), "MessageId": "\"redelivery\"", "sys": {} }
        });
        let response = reqwest::Client::new()
            .post(format!("{}/{function}", self.handler_url))
            .json(&payload)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn stop(mut self) {
        if let Some(host) = self.host.take() {
            host.stop().await;
        }
        if let Some(stop) = self.handler_stop.take() {
            let _ = stop.send(());
        }
        if let Some(endpoint) = self.endpoint.take() {
            endpoint.stop().await;
        }
        self.forwarder.abort();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// One POST a ticket's callback received, and the status it was answered with.
#[derive(Clone, Debug)]
pub struct CallbackCall {
    pub ticket: String,
    pub status: u16,
    pub event: Value,
}

/// The ticket system's side: answers `POST /hooks/{ticket}` with 500 as many times as scripted for
/// the ticket, then 200, and records every call.
#[derive(Clone, Default)]
pub struct Callbacks {
    base: String,
    calls: Arc<std::sync::Mutex<Vec<CallbackCall>>>,
    failures_left: Arc<std::sync::Mutex<HashMap<String, u32>>>,
}

impl Callbacks {
    pub async fn serve() -> Callbacks {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let callbacks = Callbacks {
            base: format!("http://{}", listener.local_addr().unwrap()),
            ..Default::default()
        };
        let router = axum::Router::new()
            .route("/hooks/{ticket}", axum::routing::post(Self::answer))
            .with_state(callbacks.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        callbacks
    }

    async fn answer(
        axum::extract::State(callbacks): axum::extract::State<Callbacks>,
        axum::extract::Path(ticket): axum::extract::Path<String>,
        body: axum::body::Bytes,
    ) -> axum::http::StatusCode {
        let status = {
            let mut failures = callbacks.failures_left.lock().unwrap();
            match failures.get_mut(&ticket) {
                Some(left) if *left > 0 => {
                    *left -= 1;
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                }
                _ => axum::http::StatusCode::OK,
            }
        };
        callbacks.calls.lock().unwrap().push(CallbackCall {
            ticket,
            status: status.as_u16(),
            event: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
        status
    }

    pub fn url(&self, ticket: &str) -> String {
        format!("{}/hooks/{ticket}", self.base)
    }

    pub fn fail_next(&self, ticket: &str, times: u32) {
        self.failures_left
            .lock()
            .unwrap()
            .insert(ticket.to_string(), times);
    }

    pub fn calls_for(&self, ticket: &str) -> Vec<CallbackCall> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|c| c.ticket == ticket)
            .cloned()
            .collect()
    }
}
