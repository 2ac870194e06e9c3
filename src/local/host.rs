//! The host: starts the custom handler, waits for it, restarts it when it dies, and invokes its
//! functions over HTTP with the payloads of the Functions custom-handler protocol.
//!
//! - Service Bus triggers: peek-lock from the embedded [`Queue`], up to `maxConcurrentCalls` at once
//!   per function; on 2xx the trigger is completed and the outputs enqueued in one transaction, on
//!   anything else the message is abandoned (retried, finally dead-lettered).
//! - Timer triggers: NCRONTAB on the simulated clock, `runOnStartup` honoured; no retries.
//! - HTTP triggers: a front door on a configurable address, JSON mode (`Data.req`, `http` output).

use super::app::{App, AuthLevel, FunctionDef, OutputBinding, Trigger};
use super::queue::{OutgoingMessage, Queue, QueueError, QueueEvent, QueueOptions, ReceivedMessage};
use crate::clock::Clock;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

/// The Functions host release whose custom-handler protocol this host reproduces.
pub const HOST_VERSION: &str = "4.1037.0";
/// The host polls `GET /` this often while the handler starts.
pub const READINESS_POLL: Duration = Duration::from_millis(25);
/// `HttpWorkerOptions.InitializationTimeout` in the host source.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where invocations go.
#[derive(Debug, Clone, PartialEq)]
pub enum HandlerTarget {
    /// Start this process, as the Functions host starts the custom handler.
    Command {
        executable: PathBuf,
        arguments: Vec<String>,
        working_directory: PathBuf,
    },
    /// A handler that is already running at this base URL (tests, or a handler under a debugger).
    Url(String),
}

impl HandlerTarget {
    pub fn from_app(app: &App) -> Self {
        HandlerTarget::Command {
            executable: app.handler.executable.clone(),
            arguments: app.handler.arguments.clone(),
            working_directory: app.handler.working_directory.clone(),
        }
    }
}

pub struct HostConfig {
    pub app: App,
    pub target: HandlerTarget,
    /// Environment of the handler (app settings), on top of this process's environment.
    pub app_settings: HashMap<String, String>,
    pub clock: Clock,
    pub queue: Queue,
    /// Options of the queues the app's functions use, created at start when missing; `None` creates
    /// each as infra does ([`QueueOptions::as_in_infra`]).
    pub queue_options: Option<QueueOptions>,
    /// Where the HTTP front door listens; `None` serves no HTTP triggers.
    pub http_listen: Option<SocketAddr>,
    /// Keys accepted for `authLevel: function` (`code` query or `x-functions-key` header).
    pub function_keys: Vec<String>,
    /// Accepted for `function` and `admin` levels.
    pub master_key: Option<String>,
    pub startup_timeout: Duration,
    /// Chaos: deliver some messages twice (off when `None`; see [`DuplicateDelivery`]).
    pub duplicate_delivery: Option<DuplicateDelivery>,
}

/// A chaos option: this share of the Service Bus messages that an invocation handled successfully
/// is delivered once more, with the same `MessageId` and `DeliveryCount` + 1, after the outputs were
/// sent — what Service Bus does when a message's lock is lost after the handler ran. Each message is
/// drawn once (so at most one extra delivery), from a generator seeded with `seed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DuplicateDelivery {
    /// Between 0 and 1.
    pub rate: f64,
    pub seed: u64,
}

/// Draws which messages get delivered twice.
struct DuplicateDraw {
    rate: f64,
    rng: StdRng,
    /// Sequence numbers of the messages already drawn for.
    drawn: HashSet<i64>,
}

impl DuplicateDraw {
    fn new(option: DuplicateDelivery) -> Self {
        DuplicateDraw {
            rate: option.rate.clamp(0.0, 1.0),
            rng: StdRng::seed_from_u64(option.seed),
            drawn: HashSet::new(),
        }
    }

    /// Whether to deliver this message again; true at most once per message.
    fn deliver_again(&mut self, sequence_number: i64) -> bool {
        self.drawn.insert(sequence_number) && self.rng.gen_bool(self.rate)
    }
}

impl HostConfig {
    pub fn new(app: App, queue: Queue) -> Self {
        HostConfig {
            target: HandlerTarget::from_app(&app),
            clock: queue.clock(),
            app,
            app_settings: HashMap::new(),
            queue,
            queue_options: None,
            http_listen: None,
            function_keys: Vec::new(),
            master_key: None,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            duplicate_delivery: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded,
    Failed {
        reason: String,
    },
    /// The handler succeeded but the message's lock was lost first; it will be delivered again.
    LockLost,
}

/// What the host does, for the live view and the report.
#[derive(Debug, Clone, PartialEq)]
pub enum HostEvent {
    HandlerStarted {
        port: u16,
        pid: Option<u32>,
    },
    HandlerReady {
        base_url: String,
    },
    HandlerExited {
        status: String,
    },
    HandlerFailedToStart {
        reason: String,
    },
    InvocationStarted {
        function: String,
        invocation_id: String,
        message_id: Option<String>,
        delivery_count: Option<u32>,
        at: DateTime<Utc>,
    },
    InvocationFinished {
        function: String,
        invocation_id: String,
        message_id: Option<String>,
        outcome: Outcome,
        /// Wall-clock duration.
        duration: Duration,
        messages_out: usize,
    },
    TimerFired {
        function: String,
        scheduled_for: DateTime<Utc>,
    },
    Log {
        function: String,
        invocation_id: String,
        line: String,
    },
    DeadLettered {
        queue: String,
        message_id: String,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("the custom handler did not answer GET / within {timeout:?}")]
    HandlerNotReady { timeout: Duration },
    #[error("cannot listen for HTTP triggers on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("no timer function named {0}")]
    NoSuchTimer(String),
}

struct Shared {
    app: App,
    clock: Clock,
    queue: Queue,
    http: reqwest::Client,
    invocation_timeout: Option<Duration>,
    handler_url: watch::Receiver<Option<String>>,
    events: broadcast::Sender<HostEvent>,
    in_flight: AtomicUsize,
    stop_intake: watch::Receiver<bool>,
    function_keys: Vec<String>,
    master_key: Option<String>,
    duplicate_draw: Option<Mutex<DuplicateDraw>>,
}

impl Shared {
    fn emit(&self, event: HostEvent) {
        let _ = self.events.send(event);
    }
}

/// A running host.
pub struct Host {
    shared: Arc<Shared>,
    intake_tasks: Vec<JoinHandle<()>>,
    supervisor: Option<JoinHandle<()>>,
    stop_intake: watch::Sender<bool>,
    stop_handler: watch::Sender<bool>,
    http_addr: Option<SocketAddr>,
    kill_requests: mpsc::UnboundedSender<KillRequest>,
}

/// A request to the supervisor to kill the handler child; answered with the killed process id.
type KillRequest = oneshot::Sender<Option<u32>>;

/// Counts an invocation as in flight for as long as it lives.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Host {
    /// Starts the handler and waits until it answers, then starts delivering.
    pub async fn start(config: HostConfig) -> Result<Host, HostError> {
        for name in config.app.queue_names() {
            if !config.queue.queue_exists(&name)? {
                let options = config
                    .queue_options
                    .clone()
                    .unwrap_or_else(|| QueueOptions::as_in_infra(&name));
                config.queue.create_queue(&name, &options)?;
            }
        }
        let (events, _) = broadcast::channel(4096);
        let (url_tx, url_rx) = watch::channel(None);
        let (stop_intake, stop_intake_rx) = watch::channel(false);
        let (stop_handler, stop_handler_rx) = watch::channel(false);
        let invocation_timeout = config
            .app
            .function_timeout
            .map(|t| t + Duration::from_secs(60));
        let shared = Arc::new(Shared {
            clock: config.clock,
            queue: config.queue.clone(),
            http: reqwest::Client::builder().build()?,
            invocation_timeout,
            handler_url: url_rx,
            events,
            in_flight: AtomicUsize::new(0),
            stop_intake: stop_intake_rx,
            function_keys: config.function_keys.clone(),
            master_key: config.master_key.clone(),
            app: config.app.clone(),
            duplicate_draw: config
                .duplicate_delivery
                .map(|option| Mutex::new(DuplicateDraw::new(option))),
        });
        let (kill_requests, kill_rx) = mpsc::unbounded_channel();

        let intake_tasks = vec![tokio::spawn(forward_queue_events(shared.clone()))];
        let supervisor = tokio::spawn(supervise(
            shared.clone(),
            config.target.clone(),
            config.app_settings.clone(),
            config.startup_timeout,
            url_tx,
            stop_handler_rx,
            kill_rx,
        ));
        let mut host = Host {
            shared: shared.clone(),
            intake_tasks,
            supervisor: Some(supervisor),
            stop_intake,
            stop_handler,
            http_addr: None,
            kill_requests,
        };

        if wait_ready(&shared, config.startup_timeout).await.is_none() {
            host.stop().await;
            return Err(HostError::HandlerNotReady {
                timeout: config.startup_timeout,
            });
        }

        for function in &shared.app.functions {
            match &function.trigger {
                Trigger::ServiceBus { .. } => host.intake_tasks.push(tokio::spawn(dispatch_queue(
                    shared.clone(),
                    function.clone(),
                ))),
                Trigger::Timer { .. } => host
                    .intake_tasks
                    .push(tokio::spawn(run_timer(shared.clone(), function.clone()))),
                Trigger::Http { .. } => {}
            }
        }
        if let Some(addr) = config.http_listen {
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => listener,
                Err(source) => {
                    host.stop().await;
                    return Err(HostError::Bind { addr, source });
                }
            };
            host.http_addr = listener.local_addr().ok();
            let router = axum::Router::new()
                .fallback(front_door)
                .with_state(shared.clone());
            let mut stop = shared.stop_intake.clone();
            host.intake_tasks.push(tokio::spawn(async move {
                let served = axum::serve(listener, router)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "HTTP front door stopped");
                }
            }));
        }
        Ok(host)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<HostEvent> {
        self.shared.events.subscribe()
    }

    /// The bound address of the HTTP front door.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The handler's current base URL, `None` while it (re)starts.
    pub fn handler_url(&self) -> Option<String> {
        self.shared.handler_url.borrow().clone()
    }

    /// Kills the handler child process with SIGKILL, as a crash would, once it is running (the
    /// supervisor then restarts it, as after any exit). Returns the killed process id; `None` when
    /// the host started no process (a [`HandlerTarget::Url`]) or is stopping.
    pub async fn kill_handler(&self) -> Option<u32> {
        let (reply, killed) = oneshot::channel();
        self.kill_requests.send(reply).ok()?;
        killed.await.ok().flatten()
    }

    /// Invocations running now (queue, timer and HTTP).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Fire a timer function now, as `POST /admin/functions/<name>` does on the real host (used for
    /// the discovery sweep at the start of a local run, and by tests). Its outputs are enqueued.
    pub async fn fire_timer(&self, function: &str) -> Result<(), HostError> {
        let definition = self
            .shared
            .app
            .functions
            .iter()
            .find(|f| f.name == function && matches!(f.trigger, Trigger::Timer { .. }))
            .cloned()
            .ok_or_else(|| HostError::NoSuchTimer(function.to_string()))?;
        fire_timer(&self.shared, &definition, self.shared.clock.now()).await;
        Ok(())
    }

    /// Nothing running and no message in flight or scheduled on a queue that a function reads
    /// (timers alone don't count; a message no function will ever read is not work in flight).
    pub fn is_idle(&self) -> Result<bool, QueueError> {
        if self.in_flight() > 0 {
            return Ok(false);
        }
        for queue in self.shared.app.trigger_queue_names() {
            if self.shared.queue.active_count_in(&queue)? > 0 {
                return Ok(false);
            }
        }
        Ok(self.in_flight() == 0)
    }

    /// Stops taking work, lets running invocations finish (bounded), then stops the handler.
    pub async fn stop(mut self) {
        let _ = self.stop_intake.send(true);
        for task in self.intake_tasks.drain(..) {
            let _ = task.await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.stop_handler.send(true);
        if let Some(supervisor) = self.supervisor.take() {
            let _ = supervisor.await;
        }
    }
}

async fn forward_queue_events(shared: Arc<Shared>) {
    let mut events = shared.queue.subscribe();
    let mut stop = shared.stop_intake.clone();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            event = events.recv() => match event {
                Ok(QueueEvent::DeadLettered { queue, message_id, reason }) => {
                    tracing::warn!(%queue, %message_id, %reason, "message dead-lettered");
                    shared.emit(HostEvent::DeadLettered { queue, message_id, reason });
                }
                Ok(QueueEvent::Enqueued { .. }) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// Waits until the handler is ready; `None` when stopping or after `timeout`.
async fn wait_ready(shared: &Shared, timeout: Duration) -> Option<String> {
    let mut url = shared.handler_url.clone();
    let mut stop = shared.stop_intake.clone();
    tokio::select! {
        ready = tokio::time::timeout(timeout, url.wait_for(Option::is_some)) => {
            ready.ok()?.ok()?.clone()
        }
        _ = stop.wait_for(|s| *s) => None,
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// After the handler at `base` refused a connection: waits until a restarted handler is published,
/// or `base` answers again, or the host stops (bounded by [`DEFAULT_STARTUP_TIMEOUT`]).
async fn await_handler(shared: &Shared, base: &str) {
    let deadline = Instant::now() + DEFAULT_STARTUP_TIMEOUT;
    while Instant::now() < deadline && !*shared.stop_intake.borrow() {
        let current = shared.handler_url.borrow().clone();
        match current {
            Some(url) if url != base => return,
            Some(_) => {
                let probe = shared
                    .http
                    .get(format!("{base}/"))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await;
                if probe.is_ok() {
                    return;
                }
            }
            None => {}
        }
        tokio::time::sleep(READINESS_POLL).await;
    }
}

/// Polls `GET {base}/` every 25 ms; any HTTP response means ready.
async fn poll_ready(http: &reqwest::Client, base: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let probe = http
            .get(format!("{base}/"))
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        if probe.is_ok() {
            return true;
        }
        tokio::time::sleep(READINESS_POLL).await;
    }
    false
}

/// Runs the handler: start, wait for readiness, publish its URL, restart it when it exits.
async fn supervise(
    shared: Arc<Shared>,
    target: HandlerTarget,
    app_settings: HashMap<String, String>,
    startup_timeout: Duration,
    url_tx: watch::Sender<Option<String>>,
    mut stop: watch::Receiver<bool>,
    mut kill_requests: mpsc::UnboundedReceiver<KillRequest>,
) {
    let (executable, arguments, working_directory) = match target {
        HandlerTarget::Url(base) => {
            // No process of ours to kill: kill requests are refused by dropping them.
            drop(kill_requests);
            let base = base.trim_end_matches('/').to_string();
            tokio::select! {
                ready = poll_ready(&shared.http, &base, startup_timeout) => {
                    if ready {
                        shared.emit(HostEvent::HandlerReady { base_url: base.clone() });
                        let _ = url_tx.send(Some(base));
                    }
                }
                _ = stop.wait_for(|s| *s) => {}
            }
            let _ = stop.wait_for(|s| *s).await;
            return;
        }
        HandlerTarget::Command {
            executable,
            arguments,
            working_directory,
        } => (executable, arguments, working_directory),
    };
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        let port = match free_port() {
            Ok(port) => port,
            Err(e) => {
                shared.emit(HostEvent::HandlerFailedToStart {
                    reason: format!("no free port: {e}"),
                });
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let worker_id = uuid::Uuid::new_v4().to_string();
        let mut command = tokio::process::Command::new(&executable);
        command
            .args(&arguments)
            .current_dir(&working_directory)
            .envs(&app_settings)
            .envs(shared.clock.to_env())
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("FUNCTIONS_CUSTOMHANDLER_WORKER_ID", &worker_id)
            .env("FUNCTIONS_HTTPWORKER_PORT", port.to_string())
            .env("FUNCTIONS_HTTPWORKER_ID", &worker_id)
            .env("FUNCTIONS_APP_ROOT_PATH", &shared.app.root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        die_with_parent(&mut command);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let reason = format!("cannot start {}: {e}", executable.display());
                tracing::error!(%reason, "custom handler failed to start");
                shared.emit(HostEvent::HandlerFailedToStart { reason });
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        shared.emit(HostEvent::HandlerStarted {
            port,
            pid: child.id(),
        });
        forward_output(child.stdout.take(), false);
        forward_output(child.stderr.take(), true);
        let base = format!("http://127.0.0.1:{port}");
        let ready = tokio::select! {
            ready = poll_ready(&shared.http, &base, startup_timeout) => ready,
            _ = child.wait() => false,
            _ = stop.wait_for(|s| *s) => false,
        };
        if ready {
            backoff = Duration::from_millis(100);
            shared.emit(HostEvent::HandlerReady {
                base_url: base.clone(),
            });
            let _ = url_tx.send(Some(base));
        } else if !*stop.borrow() {
            shared.emit(HostEvent::HandlerFailedToStart {
                reason: format!("no answer to GET / within {startup_timeout:?}"),
            });
        }
        let status = loop {
            tokio::select! {
                status = child.wait() => break Some(status),
                _ = stop.wait_for(|s| *s) => break None,
                Some(reply) = kill_requests.recv() => {
                    let pid = child.id();
                    let killed = child.start_kill().is_ok();
                    let _ = reply.send(pid.filter(|_| killed));
                }
            }
        };
        let _ = url_tx.send(None);
        match status {
            None => {
                let _ = child.kill().await;
                return;
            }
            Some(status) => {
                let status = match status {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(%status, "custom handler exited; restarting");
                shared.emit(HostEvent::HandlerExited { status });
                if !ready {
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                tokio::select! {
                    _ = tokio::time::sleep(if ready { Duration::ZERO } else { backoff }) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
        }
    }
}

/// The handler must not outlive a host that is killed (a killed process runs no destructors, so
/// `kill_on_drop` does not help): on Linux the kernel sends it SIGKILL when the host dies.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut tokio::process::Command) {}

/// Handler console output: stdout at info, stderr at warn (as the host logs custom handlers).
fn forward_output(
    stream: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>,
    stderr: bool,
) {
    let Some(stream) = stream else { return };
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if stderr {
                tracing::warn!(target: "vmbackup::local::handler", "{line}");
            } else {
                tracing::info!(target: "vmbackup::local::handler", "{line}");
            }
        }
    });
}

async fn dispatch_queue(shared: Arc<Shared>, function: FunctionDef) {
    let Trigger::ServiceBus { queue_name, .. } = &function.trigger else {
        return;
    };
    let semaphore = Arc::new(Semaphore::new(
        shared.app.service_bus.max_concurrent_calls.max(1),
    ));
    let mut stop = shared.stop_intake.clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let permit = tokio::select! {
            permit = semaphore.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        // Deliver only to a live handler: no delivery counts burnt while it restarts.
        let Some(base) = wait_ready(&shared, Duration::MAX).await else {
            return;
        };
        match shared.queue.receive(queue_name) {
            Ok(Some(message)) => {
                let in_flight = InFlight::new(&shared);
                let shared = shared.clone();
                let function = function.clone();
                tokio::spawn(async move {
                    invoke_for_message(&shared, &function, &base, message).await;
                    drop(in_flight);
                    drop(permit);
                });
            }
            Ok(None) => {
                drop(permit);
                tokio::select! {
                    _ = shared.queue.wait_for_change(queue_name, Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            Err(e) => {
                drop(permit);
                tracing::error!(queue = %queue_name, error = %e, "cannot receive");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

/// The `sys` metadata object.
fn sys_metadata(function: &str, now: DateTime<Utc>) -> Value {
    json!({
        "MethodName": function,
        "UtcNow": now.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        "RandGuid": uuid::Uuid::new_v4().to_string(),
    })
}

/// A .NET string value as the host sends it: JSON-serialized, so it arrives as a string that holds
/// a quoted, escaped string.
fn dotnet_string(text: &str) -> Value {
    Value::String(Value::String(text.to_string()).to_string())
}

/// The invocation body for a Service Bus trigger.
pub fn service_bus_payload(
    function: &str,
    binding: &str,
    binary: bool,
    message: &ReceivedMessage,
    now: DateTime<Utc>,
) -> Value {
    let data = if binary {
        Value::String(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            &message.body,
        ))
    } else {
        dotnet_string(&String::from_utf8_lossy(&message.body))
    };
    let enqueued = message
        .enqueued_time
        .to_rfc3339_opts(SecondsFormat::AutoSi, true);
    let mut metadata = Map::new();
    metadata.insert(
        "DeliveryCount".into(),
        Value::String(message.delivery_count.to_string()),
    );
    metadata.insert("LockToken".into(), dotnet_string(&message.lock_token));
    metadata.insert("MessageId".into(), dotnet_string(&message.message_id));
    metadata.insert(
        "SequenceNumber".into(),
        Value::String(message.sequence_number.to_string()),
    );
    metadata.insert("EnqueuedTimeUtc".into(), Value::String(enqueued.clone()));
    metadata.insert("EnqueuedTime".into(), Value::String(enqueued));
    let p = &message.properties;
    for (key, value) in [
        ("ContentType", &p.content_type),
        ("CorrelationId", &p.correlation_id),
        ("Subject", &p.subject),
        ("Label", &p.subject),
        ("ReplyTo", &p.reply_to),
        ("To", &p.to),
    ] {
        if let Some(value) = value {
            metadata.insert(key.into(), dotnet_string(value));
        }
    }
    let application = Value::Object(p.application_properties.clone());
    metadata.insert("ApplicationProperties".into(), application.clone());
    metadata.insert("UserProperties".into(), application);
    metadata.insert("sys".into(), sys_metadata(function, now));
    json!({ "Data": { binding: data }, "Metadata": metadata })
}

/// The invocation body for a timer trigger.
pub fn timer_payload(
    function: &str,
    binding: &str,
    last: Option<DateTime<Utc>>,
    next: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Value {
    // .NET's DateTime.MinValue stands for "never" in ScheduleStatus.
    let stamp = |t: Option<DateTime<Utc>>| {
        t.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
            .unwrap_or_else(|| "0001-01-01T00:00:00".to_string())
    };
    json!({
        "Data": { binding: {
            "Schedule": { "AdjustForDST": true },
            "ScheduleStatus": { "Last": stamp(last), "Next": stamp(next), "LastUpdated": stamp(Some(now)) },
            "IsPastDue": false
        } },
        "Metadata": { "sys": sys_metadata(function, now) }
    })
}

#[derive(Debug, Default)]
struct HandlerResponse {
    outputs: Map<String, Value>,
    logs: Vec<String>,
    return_value: Value,
}

/// Why an invocation failed.
#[derive(Debug)]
struct InvokeError {
    reason: String,
    /// No connection: the handler is down (killed, restarting), not failing.
    refused: bool,
}

impl From<String> for InvokeError {
    fn from(reason: String) -> Self {
        InvokeError {
            reason,
            refused: false,
        }
    }
}

/// POSTs one invocation; any non-2xx, unreadable body or connection failure is an error.
async fn invoke(
    shared: &Shared,
    base: &str,
    function: &str,
    invocation_id: &str,
    payload: &Value,
) -> Result<HandlerResponse, InvokeError> {
    let mut request = shared
        .http
        .post(format!("{base}/{function}"))
        .header("X-Azure-Functions-InvocationId", invocation_id)
        .header("X-Azure-Functions-HostVersion", HOST_VERSION)
        .header("User-Agent", format!("Azure-Functions-Host/{HOST_VERSION}"))
        .json(payload);
    if let Some(timeout) = shared.invocation_timeout {
        request = request.timeout(timeout);
    }
    let response = request.send().await.map_err(|e| InvokeError {
        reason: format!("cannot reach the handler: {e}"),
        refused: e.is_connect(),
    })?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("cannot read the handler's answer: {e}"))?;
    if !status.is_success() {
        let excerpt: String = String::from_utf8_lossy(&body).chars().take(200).collect();
        return Err(InvokeError::from(format!(
            "handler answered {status}: {excerpt}"
        )));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(HandlerResponse::default());
    }
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| format!("handler answered {status} with a body that is not JSON: {e}"))?;
    let Value::Object(mut object) = value else {
        return Err(InvokeError::from(format!(
            "handler answered {status} with JSON that is not an object"
        )));
    };
    let outputs = match object.remove("Outputs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(outputs)) => outputs,
        Some(_) => {
            return Err("handler answer: Outputs is not an object"
                .to_string()
                .into())
        }
    };
    let logs = match object.remove("Logs") {
        Some(Value::Array(lines)) => lines
            .into_iter()
            .map(|l| match l {
                Value::String(s) => s,
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(HandlerResponse {
        outputs,
        logs,
        return_value: object.remove("ReturnValue").unwrap_or(Value::Null),
    })
}

fn binding_value<'a>(response: &'a HandlerResponse, name: &str) -> Option<&'a Value> {
    if name == "$return" {
        return Some(&response.return_value).filter(|v| !v.is_null());
    }
    response.outputs.get(name).filter(|v| !v.is_null())
}

/// The messages a successful invocation sends: an array is several messages, anything else one.
fn queue_outputs(
    function: &FunctionDef,
    response: &HandlerResponse,
) -> Vec<(String, OutgoingMessage)> {
    let mut messages = Vec::new();
    for output in &function.outputs {
        let OutputBinding::ServiceBus {
            name, queue_name, ..
        } = output
        else {
            continue;
        };
        let Some(value) = binding_value(response, name) else {
            continue;
        };
        let items: Vec<&Value> = match value {
            Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        for item in items {
            let message = match item {
                Value::String(text) => OutgoingMessage::new(text.as_bytes()),
                other => {
                    let mut message = OutgoingMessage::new(other.to_string());
                    message.properties.content_type = Some("application/json".into());
                    message
                }
            };
            messages.push((queue_name.clone(), message));
        }
    }
    messages
}

fn log_lines(shared: &Shared, function: &str, invocation_id: &str, lines: &[String]) {
    for line in lines {
        tracing::info!(target: "vmbackup::local::function", function, "{line}");
        shared.emit(HostEvent::Log {
            function: function.to_string(),
            invocation_id: invocation_id.to_string(),
            line: line.clone(),
        });
    }
}

async fn invoke_for_message(
    shared: &Arc<Shared>,
    function: &FunctionDef,
    base: &str,
    message: ReceivedMessage,
) {
    let Trigger::ServiceBus {
        name: binding,
        queue_name,
        binary,
        ..
    } = &function.trigger
    else {
        return;
    };
    let invocation_id = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    shared.emit(HostEvent::InvocationStarted {
        function: function.name.clone(),
        invocation_id: invocation_id.clone(),
        message_id: Some(message.message_id.clone()),
        delivery_count: Some(message.delivery_count),
        at: shared.clock.now(),
    });
    // Keep the lock while the handler works (auto lock renewal): renew halfway through what is
    // left of it on the simulated clock, whatever the queue's lock duration.
    let renewal = {
        let shared = shared.clone();
        let queue_name = queue_name.clone();
        let token = message.lock_token.clone();
        let mut locked_until = message.locked_until;
        tokio::spawn(async move {
            loop {
                let now = shared.clock.now();
                shared
                    .clock
                    .sleep_until(now + (locked_until - now) / 2)
                    .await;
                match shared.queue.renew_lock(&queue_name, &token) {
                    Ok(until) => locked_until = until,
                    Err(_) => return,
                }
            }
        })
    };
    let payload = service_bus_payload(
        &function.name,
        binding,
        *binary,
        &message,
        shared.clock.now(),
    );
    let result = invoke(shared, base, &function.name, &invocation_id, &payload).await;
    if result.as_ref().is_err_and(|e| e.refused) {
        // Hold the message (and its lock) until the handler is back: abandoned at once, it would
        // be received again by another dispatcher, refused again, and burn its deliveries.
        await_handler(shared, base).await;
    }
    renewal.abort();
    let (outcome, messages_out) = match result {
        Ok(response) => {
            log_lines(shared, &function.name, &invocation_id, &response.logs);
            let outputs = queue_outputs(function, &response);
            let deliver_again = shared.duplicate_draw.as_ref().is_some_and(|draw| {
                draw.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .deliver_again(message.sequence_number)
            });
            let settled = if deliver_again {
                shared
                    .queue
                    .redeliver_with_outputs(queue_name, &message.lock_token, &outputs)
                    .map(|(_, redelivered)| redelivered)
            } else {
                shared
                    .queue
                    .complete_with_outputs(queue_name, &message.lock_token, &outputs)
                    .map(|_| false)
            };
            match settled {
                Ok(false) => (Outcome::Succeeded, outputs.len()),
                Ok(true) => (Outcome::LockLost, outputs.len()),
                Err(QueueError::LockLost { .. }) => (Outcome::LockLost, 0),
                Err(e) => (
                    Outcome::Failed {
                        reason: format!("cannot complete: {e}"),
                    },
                    0,
                ),
            }
        }
        Err(InvokeError { reason, .. }) => {
            tracing::warn!(function = %function.name, message_id = %message.message_id, %reason, "invocation failed");
            if let Err(e) = shared.queue.abandon(queue_name, &message.lock_token) {
                tracing::warn!(error = %e, "cannot abandon; the lock will expire");
            }
            (Outcome::Failed { reason }, 0)
        }
    };
    shared.emit(HostEvent::InvocationFinished {
        function: function.name.clone(),
        invocation_id,
        message_id: Some(message.message_id),
        outcome,
        duration: started.elapsed(),
        messages_out,
    });
}

async fn run_timer(shared: Arc<Shared>, function: FunctionDef) {
    let Trigger::Timer {
        schedule,
        run_on_startup,
        ..
    } = &function.trigger
    else {
        return;
    };
    let mut stop = shared.stop_intake.clone();
    if *run_on_startup {
        let now = shared.clock.now();
        fire_timer(&shared, &function, now).await;
    }
    loop {
        let Some(next) = schedule.next_after(shared.clock.now()) else {
            return;
        };
        tokio::select! {
            _ = shared.clock.sleep_until(next) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        fire_timer(&shared, &function, next).await;
    }
}

async fn fire_timer(shared: &Arc<Shared>, function: &FunctionDef, scheduled_for: DateTime<Utc>) {
    let Trigger::Timer {
        name: binding,
        schedule,
        ..
    } = &function.trigger
    else {
        return;
    };
    let Some(base) = wait_ready(shared, Duration::MAX).await else {
        return;
    };
    let _in_flight = InFlight::new(shared);
    shared.emit(HostEvent::TimerFired {
        function: function.name.clone(),
        scheduled_for,
    });
    let invocation_id = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    let now = shared.clock.now();
    shared.emit(HostEvent::InvocationStarted {
        function: function.name.clone(),
        invocation_id: invocation_id.clone(),
        message_id: None,
        delivery_count: None,
        at: now,
    });
    let payload = timer_payload(
        &function.name,
        binding,
        schedule.previous_before(scheduled_for),
        schedule.next_after(scheduled_for),
        now,
    );
    let (outcome, messages_out) =
        match invoke(shared, &base, &function.name, &invocation_id, &payload).await {
            Ok(response) => {
                log_lines(shared, &function.name, &invocation_id, &response.logs);
                let outputs = queue_outputs(function, &response);
                match shared.queue.send_batch(&outputs) {
                    Ok(_) => (Outcome::Succeeded, outputs.len()),
                    Err(e) => (
                        Outcome::Failed {
                            reason: format!("cannot enqueue outputs: {e}"),
                        },
                        0,
                    ),
                }
            }
            Err(InvokeError { reason, .. }) => (Outcome::Failed { reason }, 0),
        };
    shared.emit(HostEvent::InvocationFinished {
        function: function.name.clone(),
        invocation_id,
        message_id: None,
        outcome,
        duration: started.elapsed(),
        messages_out,
    });
}

/// Matches a route template (`restore/{ticket}`, `{id:int}`, `{opt?}`, `{*rest}`) against a path.
pub fn match_route(template: &str, path: &str) -> Option<Map<String, Value>> {
    let mut params = Map::new();
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let segments: Vec<&str> = template.split('/').filter(|s| !s.is_empty()).collect();
    let mut i = 0;
    for segment in &segments {
        if let Some(inner) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let catch_all = inner.starts_with('*');
            let inner = inner.trim_start_matches('*');
            let optional = inner.ends_with('?');
            let name = inner.trim_end_matches('?');
            let name = name.split(':').next().unwrap_or(name);
            if catch_all {
                params.insert(
                    name.into(),
                    Value::String(parts[i.min(parts.len())..].join("/")),
                );
                return Some(params);
            }
            match parts.get(i) {
                Some(value) => {
                    params.insert(name.into(), Value::String((*value).to_string()));
                    i += 1;
                }
                None if optional => {}
                None => return None,
            }
        } else {
            if !parts.get(i)?.eq_ignore_ascii_case(segment) {
                return None;
            }
            i += 1;
        }
    }
    (i == parts.len()).then_some(params)
}

fn authorized(shared: &Shared, level: AuthLevel, uri: &Uri, headers: &HeaderMap) -> bool {
    if level == AuthLevel::Anonymous {
        return true;
    }
    let from_query = uri.query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
    });
    let from_header = headers
        .get("x-functions-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Some(key) = from_header.or(from_query) else {
        return false;
    };
    let is_master = shared.master_key.as_deref() == Some(key.as_str());
    match level {
        AuthLevel::Admin => is_master,
        _ => is_master || shared.function_keys.contains(&key),
    }
}

async fn front_door(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let prefix = shared.app.route_prefix.clone();
    let path = uri.path().trim_start_matches('/');
    let relative = if prefix.is_empty() {
        Some(path)
    } else {
        path.strip_prefix(prefix.as_str())
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    let Some(relative) = relative else {
        return (StatusCode::NOT_FOUND, "no such function").into_response();
    };
    let found = shared.app.functions.iter().find_map(|f| match &f.trigger {
        Trigger::Http {
            name,
            auth_level,
            methods,
            route,
        } if methods.is_empty() || methods.iter().any(|m| m == method.as_str()) => {
            match_route(route, relative).map(|params| (f, name.clone(), *auth_level, params))
        }
        _ => None,
    });
    let Some((function, binding, auth_level, params)) = found else {
        return (StatusCode::NOT_FOUND, "no such function").into_response();
    };
    if !authorized(&shared, auth_level, &uri, &headers) {
        return (StatusCode::UNAUTHORIZED, "a valid function key is required").into_response();
    }
    let Some(base) = wait_ready(&shared, Duration::from_secs(30)).await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the handler is not running",
        )
            .into_response();
    };
    let _in_flight = InFlight::new(&shared);
    let query: Map<String, Value> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                .collect()
        })
        .unwrap_or_default();
    let mut header_lists: Map<String, Value> = Map::new();
    let mut header_values: Map<String, Value> = Map::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        if let Value::Array(list) = header_lists
            .entry(name.as_str())
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            list.push(Value::String(value.clone()));
        }
        header_values.insert(name.as_str().into(), Value::String(value));
    }
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let raw_body = content_type.starts_with("application/octet-stream")
        || content_type.starts_with("multipart/");
    let body_value = if raw_body {
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &body)
    } else {
        String::from_utf8_lossy(&body).into_owned()
    };
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let now = shared.clock.now();
    let mut metadata = params.clone();
    metadata.insert("Query".into(), Value::Object(query.clone()));
    metadata.insert("Headers".into(), Value::Object(header_values));
    metadata.insert("sys".into(), sys_metadata(&function.name, now));
    let payload = json!({
        "Data": { binding: {
            "Url": format!("http://{host}{uri}"),
            "Method": method.as_str(),
            "Query": query,
            "Headers": header_lists,
            "Params": params,
            "Identities": [],
            "Body": body_value,
        } },
        "Metadata": metadata,
    });
    let invocation_id = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    shared.emit(HostEvent::InvocationStarted {
        function: function.name.clone(),
        invocation_id: invocation_id.clone(),
        message_id: None,
        delivery_count: None,
        at: now,
    });
    let result = invoke(&shared, &base, &function.name, &invocation_id, &payload).await;
    let (response, outcome, messages_out) = match result {
        Ok(answer) => {
            log_lines(&shared, &function.name, &invocation_id, &answer.logs);
            let outputs = queue_outputs(function, &answer);
            match shared.queue.send_batch(&outputs) {
                Ok(_) => (
                    http_output(function, &answer),
                    Outcome::Succeeded,
                    outputs.len(),
                ),
                Err(e) => (
                    (StatusCode::INTERNAL_SERVER_ERROR, "cannot enqueue outputs").into_response(),
                    Outcome::Failed {
                        reason: format!("cannot enqueue outputs: {e}"),
                    },
                    0,
                ),
            }
        }
        Err(InvokeError { reason, .. }) => (
            (StatusCode::INTERNAL_SERVER_ERROR, "the function failed").into_response(),
            Outcome::Failed { reason },
            0,
        ),
    };
    shared.emit(HostEvent::InvocationFinished {
        function: function.name.clone(),
        invocation_id,
        message_id: None,
        outcome,
        duration: started.elapsed(),
        messages_out,
    });
    response
}

/// The caller's response from the function's `http` output: `{statusCode, body, headers}`.
fn http_output(function: &FunctionDef, response: &HandlerResponse) -> Response {
    let value = function.outputs.iter().find_map(|o| match o {
        OutputBinding::Http { name } => binding_value(response, name),
        _ => None,
    });
    let Some(Value::Object(value)) = value else {
        return StatusCode::OK.into_response();
    };
    let field = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| value.get(*n))
            .filter(|v| !v.is_null())
    };
    let status = match field(&["statusCode", "StatusCode", "status", "Status"]) {
        Some(Value::String(s)) => s.parse::<u16>().ok(),
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        _ => Some(200),
    }
    .and_then(|code| StatusCode::from_u16(code).ok())
    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut headers = HeaderMap::new();
    let mut has_content_type = false;
    if let Some(Value::Object(map)) = field(&["headers", "Headers"]) {
        for (name, value) in map {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&text),
            ) {
                has_content_type |= name == axum::http::header::CONTENT_TYPE;
                headers.insert(name, value);
            }
        }
    }
    let body = match field(&["body", "Body"]) {
        None => Vec::new(),
        Some(Value::String(s)) => s.clone().into_bytes(),
        Some(other) => {
            if !has_content_type {
                headers.insert(
                    axum::http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            other.to_string().into_bytes()
        }
    };
    (status, headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_templates() {
        let p = match_route("restore/{ticket}", "restore/INC-1").unwrap();
        assert_eq!(p["ticket"], "INC-1");
        assert!(match_route("restore/{ticket}", "restore").is_none());
        assert!(match_route("restore/{ticket}", "restore/a/b").is_none());
        assert!(match_route("Restore", "restore").is_some());
        let p = match_route("items/{id:int}/{opt?}", "items/7").unwrap();
        assert_eq!(p["id"], "7");
        let p = match_route("files/{*rest}", "files/a/b/c").unwrap();
        assert_eq!(p["rest"], "a/b/c");
    }

    /// A function app folder with one function, `Echo`: `in` → `out`.
    fn echo_app(executable: &str) -> (App, PathBuf) {
        let root = std::env::temp_dir().join(format!("vmbackup-host-app-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(root.join("Echo")).unwrap();
        let host_json = json!({ "version": "2.0",
            "customHandler": { "description": { "defaultExecutablePath": executable } } });
        std::fs::write(root.join("host.json"), host_json.to_string()).unwrap();
        let function_json = json!({ "bindings": [
            { "type": "serviceBusTrigger", "direction": "in", "name": "msg", "queueName": "in" },
            { "type": "serviceBus", "direction": "out", "name": "out", "queueName": "out" } ] });
        std::fs::write(root.join("Echo/function.json"), function_json.to_string()).unwrap();
        (App::load(&root, &HashMap::new()).unwrap(), root)
    }

    fn open_queue() -> (Queue, PathBuf) {
        let state =
            std::env::temp_dir().join(format!("vmbackup-host-state-{}", uuid::Uuid::new_v4()));
        (Queue::open(&state, Clock::real()).unwrap(), state)
    }

    async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
        for _ in 0..1500 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[test]
    fn duplicate_draws_are_seeded_and_at_most_once_per_message() {
        let option = DuplicateDelivery { rate: 0.2, seed: 7 };
        let mut draw = DuplicateDraw::new(option);
        let picked: Vec<i64> = (0..10_000).filter(|&seq| draw.deliver_again(seq)).collect();
        assert!(
            (1_700..=2_300).contains(&picked.len()),
            "about 20%: {}",
            picked.len()
        );
        assert!(
            picked.iter().all(|&seq| !draw.deliver_again(seq)),
            "a message is drawn once"
        );
        let mut again = DuplicateDraw::new(option);
        let replayed: Vec<i64> = (0..10_000)
            .filter(|&seq| again.deliver_again(seq))
            .collect();
        assert_eq!(picked, replayed, "the same seed picks the same messages");
        let mut never = DuplicateDraw::new(DuplicateDelivery { rate: 0.0, seed: 7 });
        assert!((0..1_000).all(|seq| !never.deliver_again(seq)));
    }

    #[tokio::test]
    async fn duplicate_delivery_redelivers_a_handled_message_with_its_id() {
        // The handler records (MessageId, DeliveryCount) and echoes one output per invocation.
        let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let recorder = seen.clone();
        let router = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ready" }))
            .route(
                "/Echo",
                axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                    let recorder = recorder.clone();
                    async move {
                        let text = |v: &Value| {
                            v.as_str().unwrap_or_default().trim_matches('"').to_string()
                        };
                        recorder.lock().unwrap().push((
                            text(&body["Metadata"]["MessageId"]),
                            text(&body["Metadata"]["DeliveryCount"]),
                        ));
                        axum::Json(json!({ "Outputs": { "out": { "echo": true } } }))
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });

        let (app, root) = echo_app("unused");
        let (queue, state) = open_queue();
        let mut config = HostConfig::new(app, queue.clone());
        assert_eq!(config.duplicate_delivery, None, "off by default");
        config.target = HandlerTarget::Url(base);
        config.duplicate_delivery = Some(DuplicateDelivery { rate: 1.0, seed: 1 });
        let host = Host::start(config).await.unwrap();
        for id in ["m-1", "m-2", "m-3"] {
            let mut message = OutgoingMessage::new("{}");
            message.properties.message_id = Some(id.into());
            queue.send("in", &message).unwrap();
        }
        eventually("every message is handled twice", || {
            seen.lock().unwrap().len() == 6 && host.is_idle().unwrap_or(false)
        })
        .await;
        let mut deliveries = seen.lock().unwrap().clone();
        deliveries.sort();
        let expected: Vec<(String, String)> = ["m-1", "m-2", "m-3"]
            .iter()
            .flat_map(|id| {
                [
                    (id.to_string(), "1".to_string()),
                    (id.to_string(), "2".to_string()),
                ]
            })
            .collect();
        assert_eq!(deliveries, expected, "the same message, delivered again");
        assert_eq!(
            queue.active_count_in("out").unwrap(),
            6,
            "both runs' outputs were sent"
        );
        assert_eq!(queue.active_count_in("in").unwrap(), 0);
        assert_eq!(queue.dead_letter_count().unwrap(), 0);
        assert_eq!(
            host.kill_handler().await,
            None,
            "no process of ours behind a URL"
        );
        host.stop().await;
        let _ = std::fs::remove_dir_all(root);
        let _ = std::fs::remove_dir_all(state);
    }

    /// Serves `Echo` on `listener` until `stop` fires; records each delivery's `DeliveryCount`.
    fn serve_echo(
        listener: tokio::net::TcpListener,
        seen: Arc<Mutex<Vec<String>>>,
        stop: oneshot::Receiver<()>,
    ) -> JoinHandle<()> {
        let router = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ready" }))
            .route(
                "/Echo",
                axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                    let seen = seen.clone();
                    async move {
                        let count = body["Metadata"]["DeliveryCount"].as_str().unwrap_or("?");
                        seen.lock().unwrap().push(count.to_string());
                        axum::Json(json!({ "Outputs": {} }))
                    }
                }),
            );
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.await;
                })
                .await;
        })
    }

    #[tokio::test]
    async fn a_handler_that_refuses_connections_does_not_burn_deliveries() {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let server = serve_echo(listener, seen.clone(), stopped);
        let (app, root) = echo_app("unused");
        let (queue, state) = open_queue();
        let mut config = HostConfig::new(app, queue.clone());
        config.target = HandlerTarget::Url(format!("http://{addr}"));
        let host = Host::start(config).await.unwrap();

        // The handler goes down (as between a kill and the host noticing it); a message arrives.
        let _ = stop.send(());
        server.await.unwrap();
        queue.send("in", &OutgoingMessage::new("{}")).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            queue.dead_letter_count().unwrap(),
            0,
            "deliveries burnt while it was down"
        );

        // Back on the same address: the message is handled after at most a couple of deliveries.
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (_keep, never) = oneshot::channel();
        serve_echo(listener, seen.clone(), never);
        eventually("the message is handled", || {
            !seen.lock().unwrap().is_empty() && host.is_idle().unwrap_or(false)
        })
        .await;
        let counts = seen.lock().unwrap().clone();
        assert_eq!(counts.len(), 1, "{counts:?}");
        let count: u32 = counts[0].trim_matches('"').parse().unwrap();
        assert!(count <= 2, "delivery count {count}");
        assert_eq!(queue.dead_letter_count().unwrap(), 0);
        host.stop().await;
        let _ = std::fs::remove_dir_all(root);
        let _ = std::fs::remove_dir_all(state);
    }

    #[tokio::test]
    async fn kill_handler_kills_the_child_and_the_host_restarts_it() {
        let python_ok = std::process::Command::new("python3")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !python_ok {
            println!("SKIPPED: python3 is not available to act as a child handler process");
            return;
        }
        let (app, root) = echo_app("sh");
        let (queue, state) = open_queue();
        let mut config = HostConfig::new(app, queue);
        // Any HTTP server answers the readiness probe.
        config.target = HandlerTarget::Command {
            executable: "sh".into(),
            arguments: vec![
                "-c".into(),
                "exec python3 -m http.server \"$FUNCTIONS_CUSTOMHANDLER_PORT\" --bind 127.0.0.1"
                    .into(),
            ],
            working_directory: root.clone(),
        };
        let host = Host::start(config).await.unwrap();
        let mut events = host.subscribe();
        let killed = host
            .kill_handler()
            .await
            .expect("a running child is killed");
        let mut exited = None;
        let mut restarted = None;
        eventually("the killed child is restarted", || {
            while let Ok(event) = events.try_recv() {
                match event {
                    HostEvent::HandlerExited { status } => exited = Some(status),
                    HostEvent::HandlerStarted { pid, .. } => restarted = pid,
                    _ => {}
                }
            }
            restarted.is_some() && host.handler_url().is_some()
        })
        .await;
        assert!(
            exited
                .as_deref()
                .is_some_and(|s| s.contains("9") || s.contains("KILL")),
            "killed by SIGKILL: {exited:?}"
        );
        assert_ne!(restarted, Some(killed));
        host.stop().await;
        let _ = std::fs::remove_dir_all(root);
        let _ = std::fs::remove_dir_all(state);
    }

    #[test]
    fn dotnet_strings_are_double_encoded() {
        assert_eq!(dotnet_string("hi"), Value::String("\"hi\"".into()));
        assert_eq!(
            dotnet_string(r#"{"a":1}"#),
            Value::String(r#""{\"a\":1}""#.into())
        );
    }
}
