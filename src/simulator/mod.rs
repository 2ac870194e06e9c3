//! An Azure simulator for local runs and tests: ARM paths, api-versions, error bodies and LRO headers of
//! the real services, Azure Backup's rules for encrypted VMs, a managed-identity token endpoint,
//! throttling, seeded faults, and Event Grid events — all on one loopback listener.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use vmbackup::simulator::{fleet::Fleet, Simulator, SimulatorConfig};
//! let fleet = Fleet::from_path(std::path::Path::new("fleet.json"))?;
//! let sim = Simulator::start(SimulatorConfig::new(fleet)).await?;
//! std::env::set_var("IDENTITY_ENDPOINT", sim.identity_endpoint());
//! std::env::set_var("IDENTITY_HEADER", sim.identity_header());
//! // point ARM clients at sim.arm_endpoint(); data-plane URLs come from the resources themselves
//! let mut events = sim.subscribe_events();
//! let vms = sim.with_state(|s| s.vms.len());
//! sim.shutdown().await;
//! # let _ = (events.try_recv(), vms); Ok(()) }
//! ```
//!
//! Layout: `fleet` (the fleet file), `state` (the typed estate; `with_state` hands it out), `server`
//! (auth, api-version, throttling, faults, logging), one module per provider (`compute`, `network`,
//! `backup` with its `restore`, `keyvault`, `resources`, `deployments`, `graph`, `blob`), `events`, and
//! `cli` (`vmbackup simulator`).

pub mod backup;
pub mod blob;
pub mod cli;
pub mod compute;
pub mod deployments;
pub mod events;
pub mod fleet;
pub mod graph;
pub mod http;
pub mod keyvault;
pub mod network;
pub mod resources;
pub mod restore;
pub mod server;
pub mod state;

pub use server::{Audience, BucketLimit, ThrottleLimits};
pub use state::{Counters, RequestRecord, SimState};

use crate::clock::Clock;
use fleet::{Fleet, TimelineAction};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{broadcast, oneshot};

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    pub fleet: Fleet,
    /// Simulated time for jobs, tokens, throttling refill and Retry-After.
    pub clock: Clock,
    /// Where to listen; port 0 picks an ephemeral port.
    pub listen: SocketAddr,
    /// Where to POST Event Grid events (arrays, as Event Grid delivers them), if anywhere.
    pub event_sink: Option<url::Url>,
    pub throttle: ThrottleLimits,
    /// The `X-IDENTITY-HEADER` secret; a random one when `None`.
    pub identity_header: Option<String>,
}

impl SimulatorConfig {
    /// Loopback, ephemeral port, the fleet's own time scale starting now, ARM's throttling limits.
    pub fn new(fleet: Fleet) -> SimulatorConfig {
        let clock = Clock::scaled(chrono::Utc::now(), fleet.simulation.time_scale);
        SimulatorConfig {
            fleet,
            clock,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            event_sink: None,
            throttle: ThrottleLimits::default(),
            identity_header: None,
        }
    }
}

pub struct Simulator;

impl Simulator {
    /// Bind, seed the estate from the fleet and serve until `shutdown`.
    pub async fn start(config: SimulatorConfig) -> anyhow::Result<SimulatorHandle> {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let address = listener.local_addr()?;
        let base_url = format!("http://{address}");
        let state = SimState::from_fleet(&config.fleet, &base_url, config.clock.now());
        let identity_header = config
            .identity_header
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let shared = Arc::new(server::Shared::new(
            state,
            config.clock,
            base_url.clone(),
            identity_header,
            config.event_sink.clone(),
            config.throttle,
        ));
        let router = axum::Router::new()
            .fallback(server::handle)
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "simulator server stopped");
            }
        });
        Ok(SimulatorHandle {
            shared,
            address,
            stop: Some(stop),
            task: Some(task),
            timeline: config.fleet.timeline,
        })
    }
}

/// A running simulator.
pub struct SimulatorHandle {
    shared: Arc<server::Shared>,
    address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    timeline: Vec<fleet::TimelineEntry>,
}

impl SimulatorHandle {
    pub fn address(&self) -> SocketAddr {
        self.address
    }
    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }
    /// ARM is served at the root, as under `https://management.azure.com`.
    pub fn arm_endpoint(&self) -> String {
        self.base_url()
    }
    /// The value for `IDENTITY_ENDPOINT`.
    pub fn identity_endpoint(&self) -> String {
        format!("{}{}", self.base_url(), server::IDENTITY_PATH)
    }
    /// The value for `IDENTITY_HEADER`.
    pub fn identity_header(&self) -> String {
        self.shared.identity_header.clone()
    }
    pub fn clock(&self) -> Clock {
        self.shared.clock
    }
    /// The audience of a live token the simulator issued (e.g. for a local Service Bus endpoint to check).
    pub fn token_audience(&self, token: &str) -> Option<Audience> {
        self.shared.token_audience(token)
    }
    /// Read or change the estate (simulated time is applied first; events it produces are published).
    pub fn with_state<T>(&self, f: impl FnOnce(&mut SimState) -> T) -> T {
        let mut state = self.shared.lock_state();
        let result = f(&mut state);
        self.shared.publish_events(&mut state);
        result
    }
    /// Apply an Azure-side timeline action (`tag`, `untag`, `create-vm`, `enable-ade`, `delete-key`, `delete-secret`).
    pub fn apply(&self, action: &TimelineAction) -> Result<(), String> {
        let now = self.shared.clock.now();
        self.with_state(|s| s.apply(action, now))
    }
    /// Play the fleet's Azure-side timeline entries at their simulated times (queue messages are skipped).
    pub fn spawn_timeline(&self) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        let start = shared.clock.now();
        let entries: Vec<_> = self
            .timeline
            .iter()
            .filter(|e| e.action.is_azure_side())
            .cloned()
            .collect();
        tokio::spawn(async move {
            let mut entries = entries;
            entries.sort_by_key(|e| e.at);
            for entry in entries {
                let at = start + chrono::Duration::from_std(entry.at.0).unwrap_or_default();
                shared.clock.sleep_until(at).await;
                let mut state = shared.lock_state();
                if let Err(e) = state.apply(&entry.action, shared.clock.now()) {
                    tracing::warn!(error = %e, "timeline action could not be applied");
                }
                shared.publish_events(&mut state);
            }
        })
    }
    pub fn request_log(&self) -> Vec<RequestRecord> {
        server::log_snapshot(&self.shared).0
    }
    pub fn counters(&self) -> Counters {
        server::log_snapshot(&self.shared).1
    }
    /// Event Grid `ResourceWriteSuccess` events as JSON, from now on.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Value> {
        self.shared.events.subscribe()
    }
    /// Invalidate every issued token (clients must fetch new ones).
    pub fn revoke_tokens(&self) {
        self.shared.revoke_tokens()
    }
    /// Stop serving and wait for the server task.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}
