//! `vmbackup local`: the whole product on one machine.
//!
//! The Azure simulator runs in this process, seeded by a fleet file (or the built-in demo fleet);
//! the durable queue lives under `--state`; a Service Bus REST endpoint on loopback serves it to the
//! handler; the [`Host`] starts `vmbackup serve` as a child process, exactly as the Functions host
//! starts a custom handler, with app settings pointing at the simulator and the local Service Bus.
//! The simulator's Event Grid events land on `vm-events`; the fleet's timeline plays on the
//! simulated clock (Azure-side actions through the simulator, `backup-now` and `restore-request` as
//! events on their queues); the discovery sweep fires once at start.
//!
//! Restart: the queue is durable and the estate is saved under `--state` (see [`super::estate`]),
//! so killing the run and starting it again with the same `--state` continues it.

use super::app::App;
use super::estate::{self, EstateStore, RunRecord};
use super::host::{HandlerTarget, Host, HostConfig};
use super::live::{LiveView, Printer};
use super::queue::{OutgoingMessage, Queue};
use super::report::{self, ArmCounts, Report};
use super::servicebus_endpoint::{self, EndpointConfig, RunningEndpoint};
use crate::clock::Clock;
use crate::domain::restore::{request_message_id, validate_request, RestoreRequestFields};
use crate::domain::ResourceId;
use crate::events::{queues, BackupRequested, BackupRequester, CloudEvent, EventData};
use crate::simulator::fleet::{Fleet, TimelineAction};
use crate::simulator::state::same;
use crate::simulator::{Simulator, SimulatorConfig, SimulatorHandle};
use crate::workflow::settings;
use chrono::{DateTime, TimeZone, Timelike, Utc};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The built-in demo fleet (see `demo_expected.json` beside it for what each VM and restore ends as).
pub const DEMO_FLEET: &str = include_str!("demo_fleet.json");
/// The outcomes the demo fleet is built to produce.
pub const DEMO_EXPECTED: &str = include_str!("demo_expected.json");

/// The namespace name the handler believes it talks to.
pub const NAMESPACE: &str = "vmbackup-local";
pub const SAS_KEY_NAME: &str = "RootManageSharedAccessKey";
/// The timer function fired once at start.
pub const DISCOVERY_SWEEP: &str = "discovery-sweep";
/// Default `--state`.
pub const DEFAULT_STATE_DIR: &str = ".vmbackup";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AzureMode {
    Simulator,
    Live,
}

#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub fleet: Option<PathBuf>,
    pub until_idle: bool,
    pub report: Option<PathBuf>,
    pub state: PathBuf,
    pub azure: AzureMode,
    /// The function app folder (`host.json` + function folders); found when `None`.
    pub app: Option<PathBuf>,
    /// Deliver to a handler that is already running (e.g. under a debugger) instead of starting one.
    pub handler_url: Option<String>,
}

/// Exit-code classes of the contract.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// Bad usage or bad input (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Anything else (exit 1).
    #[error("{0}")]
    Runtime(String),
}

fn runtime(context: &str) -> impl FnOnce(String) -> LocalError + '_ {
    move |e| LocalError::Runtime(format!("{context}: {e}"))
}

/// The fleet of this run: the one the state directory was started with, the one given, or the demo.
fn resolve_fleet(options: &LocalOptions) -> Result<Fleet, LocalError> {
    let stored_path = options.state.join(estate::FLEET_FILE);
    let stored = match std::fs::read_to_string(&stored_path) {
        Ok(text) => Some(Fleet::from_json_str(&text).map_err(|e| {
            LocalError::Usage(format!(
                "{} is not a valid fleet ({e}); start with a fresh --state",
                stored_path.display()
            ))
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(LocalError::Runtime(format!(
                "cannot read {}: {e}",
                stored_path.display()
            )))
        }
    };
    let given = options
        .fleet
        .as_deref()
        .map(Fleet::from_path)
        .transpose()
        .map_err(|e| LocalError::Usage(format!("bad fleet file: {e}")))?;
    match (stored, given) {
        (Some(stored), Some(given)) if stored != given => Err(LocalError::Usage(format!(
            "--state {} holds a run of another fleet; pass the same --fleet or a fresh --state",
            options.state.display()
        ))),
        (Some(stored), _) => Ok(stored),
        (None, given) => {
            let fleet = match given {
                Some(fleet) => fleet,
                None => Fleet::from_json_str(DEMO_FLEET)
                    .map_err(|e| LocalError::Runtime(format!("the built-in demo fleet: {e}")))?,
            };
            let text = serde_json::to_vec_pretty(&fleet)
                .map_err(|e| LocalError::Runtime(format!("cannot store the fleet: {e}")))?;
            estate::write_atomically(&stored_path, &text)
                .map_err(|e| LocalError::Runtime(e.to_string()))?;
            Ok(fleet)
        }
    }
}

/// The function app folder: given, the working directory (a checkout), or beside the binary
/// (a `vmbackup package` output).
fn app_root(options: &LocalOptions) -> Result<PathBuf, LocalError> {
    if let Some(app) = &options.app {
        return Ok(app.clone());
    }
    let mut candidates = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        candidates.push(dir);
    }
    candidates
        .into_iter()
        .find(|dir| dir.join("host.json").is_file())
        .ok_or_else(|| {
            LocalError::Usage(
                "no function app found (host.json): run from the repository, next to a `vmbackup package` output, or pass --app DIR".into(),
            )
        })
}

/// The first whole hour after `now`: simulated runs start there, so schedules fire at the same
/// simulated offsets in every run (and in a restarted one).
fn next_whole_hour(now: DateTime<Utc>) -> DateTime<Utc> {
    let hour = now.timestamp().div_euclid(3600) + 1;
    Utc.timestamp_opt(hour * 3600, 0).single().unwrap_or(now)
}

fn setting_or(name: &str, default: String) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or(default)
}

/// What runs for the whole session.
struct Running {
    queue: Queue,
    host: Host,
    endpoint: RunningEndpoint,
    sim: Option<Arc<SimulatorHandle>>,
    store: Option<Arc<EstateStore>>,
    run: Option<RunRecord>,
    background: Vec<tokio::task::JoinHandle<()>>,
    timeline_done: Arc<AtomicBool>,
    vm_names: Vec<String>,
    printer: Printer,
    live: LiveView,
    clock: Clock,
    /// The built-in demo ends by itself once it has played out (the README's first command).
    plays_the_demo: bool,
}

pub async fn run(options: LocalOptions) -> Result<Report, LocalError> {
    std::fs::create_dir_all(&options.state).map_err(|e| {
        LocalError::Runtime(format!("cannot create {}: {e}", options.state.display()))
    })?;
    let running = match options.azure {
        AzureMode::Simulator => start_simulated(&options).await?,
        AzureMode::Live => start_live(&options).await?,
    };
    wait(&running, options.until_idle || running.plays_the_demo).await?;
    finish(running, &options).await
}

/// Service Bus settings for the handler: a SAS connection string for the local namespace and the
/// endpoint that serves it.
async fn start_endpoint(
    queue: &Queue,
) -> Result<(RunningEndpoint, HashMap<String, String>), LocalError> {
    let sas_key = uuid::Uuid::new_v4().simple().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| LocalError::Runtime(format!("cannot listen for Service Bus: {e}")))?;
    let endpoint = servicebus_endpoint::spawn(
        queue.clone(),
        EndpointConfig {
            sas_keys: HashMap::from([(SAS_KEY_NAME.to_string(), sas_key.clone())]),
            bearer_check: None,
            public_base_url: format!("https://{NAMESPACE}.servicebus.windows.net"),
        },
        listener,
    )
    .map_err(|e| LocalError::Runtime(format!("cannot serve Service Bus: {e}")))?;
    let settings = HashMap::from([
        (
            crate::azure::config::ENV_SERVICEBUS_CONNECTION_STRING.to_string(),
            format!(
                "Endpoint=sb://{NAMESPACE}.servicebus.windows.net/;SharedAccessKeyName={SAS_KEY_NAME};SharedAccessKey={sas_key}"
            ),
        ),
        (
            crate::azure::config::ENV_SERVICEBUS_ENDPOINT.to_string(),
            format!("http://{}/", endpoint.addr),
        ),
    ]);
    Ok((endpoint, settings))
}

fn open_queue(state: &Path, clock: Clock) -> Result<Queue, LocalError> {
    let queue = Queue::open(state, clock).map_err(|e| LocalError::Runtime(e.to_string()))?;
    for name in queues::ALL {
        if !queue
            .queue_exists(name)
            .map_err(|e| LocalError::Runtime(e.to_string()))?
        {
            queue
                .create_queue(name, &crate::local::queue::QueueOptions::as_in_infra(name))
                .map_err(|e| LocalError::Runtime(e.to_string()))?;
        }
    }
    Ok(queue)
}

async fn start_host(
    options: &LocalOptions,
    queue: &Queue,
    clock: Clock,
    app_settings: HashMap<String, String>,
) -> Result<Host, LocalError> {
    let root = app_root(options)?;
    let app = App::load(&root, &app_settings)
        .map_err(|e| LocalError::Usage(format!("the function app: {e}")))?;
    let target = match &options.handler_url {
        Some(url) => HandlerTarget::Url(url.clone()),
        None => HandlerTarget::Command {
            executable: std::env::current_exe()
                .map_err(|e| LocalError::Runtime(format!("cannot locate this binary: {e}")))?,
            arguments: vec!["serve".into()],
            working_directory: root,
        },
    };
    let mut config = HostConfig::new(app, queue.clone());
    config.target = target;
    config.app_settings = app_settings;
    config.clock = clock;
    Host::start(config)
        .await
        .map_err(|e| LocalError::Runtime(format!("the host: {e}")))
}

async fn start_simulated(options: &LocalOptions) -> Result<Running, LocalError> {
    let fleet = resolve_fleet(options)?;
    let previous =
        estate::read_run(&options.state).map_err(|e| LocalError::Usage(e.to_string()))?;

    // The clock: resumed where the previous run got to, else from the next whole hour.
    let resume_at = previous
        .as_ref()
        .map(|p| p.sim_now)
        .max(estate::snapshot_time(&options.state).map_err(|e| LocalError::Usage(e.to_string()))?);
    let sim_start = previous
        .as_ref()
        .map(|p| p.sim_start)
        .unwrap_or_else(|| next_whole_hour(Utc::now()));
    let time_scale = fleet.simulation.time_scale;
    let clock = Clock::scaled(resume_at.unwrap_or(sim_start), time_scale);

    // The simulator, on the port of the previous run when it is free.
    let mut config = SimulatorConfig::new(fleet.clone());
    config.clock = clock;
    if let Some(previous) = &previous {
        config.listen = SocketAddr::from(([127, 0, 0, 1], previous.simulator_port));
    }
    let sim = match Simulator::start(config.clone()).await {
        Ok(sim) => sim,
        Err(_) if previous.is_some() => {
            config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
            Simulator::start(config)
                .await
                .map_err(|e| runtime("cannot start the simulator")(e.to_string()))?
        }
        Err(e) => return Err(runtime("cannot start the simulator")(e.to_string())),
    };
    let sim = Arc::new(sim);
    let restored = estate::read_snapshot(&options.state, &sim.base_url())
        .map_err(|e| LocalError::Usage(e.to_string()))?;
    let timeline_applied = match restored {
        Some(restored) => {
            sim.with_state(|s| *s = restored.state);
            restored.timeline_applied
        }
        None => BTreeSet::new(),
    };
    let run = RunRecord {
        sim_start,
        time_scale,
        sim_now: clock.now(),
        simulator_port: sim.address().port(),
    };
    estate::write_run(&options.state, &run).map_err(|e| LocalError::Runtime(e.to_string()))?;

    let queue = open_queue(&options.state, clock)?;
    let store = EstateStore::new(sim.clone(), &options.state, timeline_applied);
    store
        .save(true)
        .map_err(|e| LocalError::Runtime(e.to_string()))?;
    queue.set_commit_barrier(store.barrier());
    let (endpoint, mut app_settings) = start_endpoint(&queue).await?;

    let subscriptions: Vec<String> = fleet.subscriptions.iter().map(|s| s.id.clone()).collect();
    let backup_hour = (sim_start + chrono::Duration::hours(2)).hour();
    app_settings.extend([
        (
            crate::azure::config::ENV_ARM_ENDPOINT.to_string(),
            sim.arm_endpoint(),
        ),
        ("IDENTITY_ENDPOINT".to_string(), sim.identity_endpoint()),
        ("IDENTITY_HEADER".to_string(), sim.identity_header()),
        (
            crate::azure::config::ENV_CREDENTIAL.to_string(),
            "managed-identity".to_string(),
        ),
        (settings::SUBSCRIPTIONS.to_string(), subscriptions.join(",")),
        (
            settings::BACKUP_MANAGEMENT_SERVICE_OBJECT_ID.to_string(),
            crate::simulator::state::BACKUP_MANAGEMENT_SERVICE_OBJECT_ID.to_string(),
        ),
        (
            // The simulator models RBAC key vaults with the built-in Key Vault Administrator role
            // only (no custom role definitions), so the simulated run grants that one.
            settings::KEY_VAULT_ROLE.to_string(),
            setting_or(settings::KEY_VAULT_ROLE, "administrator".to_string()),
        ),
        (
            settings::DISCOVERY_SCHEDULE.to_string(),
            setting_or(
                settings::DISCOVERY_SCHEDULE,
                settings::DEFAULT_DISCOVERY_SCHEDULE.to_string(),
            ),
        ),
        (
            // Two simulated hours in: once per run, at the same point of every run.
            settings::BACKUP_SCHEDULE.to_string(),
            setting_or(
                settings::BACKUP_SCHEDULE,
                format!("0 0 {backup_hour} * * *"),
            ),
        ),
    ]);

    let printer = Printer::for_stdout(clock);
    let mut background = Vec::new();
    background.push(forward_events(&sim, &queue, &store, &printer));
    let host = start_host(options, &queue, clock, app_settings).await?;
    let live = spawn_live(&host, &queue, &printer);
    printer.line(&format!(
        "vmbackup local: {} VMs in {} subscriptions, {} timeline actions, state in {}",
        fleet
            .subscriptions
            .iter()
            .map(|s| s.virtual_machines.len())
            .sum::<usize>(),
        fleet.subscriptions.len(),
        fleet.timeline.len(),
        options.state.display()
    ));
    let plays_the_demo = Fleet::from_json_str(DEMO_FLEET).is_ok_and(|demo| demo == fleet);
    if let Some(previous) = &previous {
        printer.line(&format!(
            "continuing the run in {} from simulated {} (a fresh --state DIR starts a new one)",
            options.state.display(),
            previous.sim_now.format("%H:%M")
        ));
    }
    if plays_the_demo {
        printer.line("the built-in demo: one line per function invocation (simulated time, function, VM, outcome)");
        printer.line("it ends by itself with a summary table once every backup and restore is done (Ctrl-C stops early)");
    }
    fire_discovery(&host, &printer).await;

    let timeline_done = Arc::new(AtomicBool::new(false));
    background.push(tokio::spawn(play_timeline(
        fleet.clone(),
        sim.clone(),
        store.clone(),
        queue.clone(),
        sim_start,
        printer.clone(),
        timeline_done.clone(),
    )));
    background.push(tokio::spawn(keep_saving(
        store.clone(),
        options.state.clone(),
        run.clone(),
        clock,
    )));
    let vm_names = fleet
        .subscriptions
        .iter()
        .flat_map(|s| s.virtual_machines.iter().map(|v| v.name.clone()))
        .chain(fleet.timeline.iter().filter_map(|e| match &e.action {
            TimelineAction::CreateVm { vm } => Some(vm.name.clone()),
            _ => None,
        }))
        .collect();
    Ok(Running {
        queue,
        host,
        endpoint,
        sim: Some(sim),
        store: Some(store),
        run: Some(run),
        background,
        timeline_done,
        vm_names,
        printer,
        live,
        clock,
        plays_the_demo,
    })
}

async fn start_live(options: &LocalOptions) -> Result<Running, LocalError> {
    if options.fleet.is_some() {
        return Err(LocalError::Usage(
            "--fleet describes a simulated estate; --azure live works on real Azure".into(),
        ));
    }
    if std::env::var(settings::SUBSCRIPTIONS)
        .map(|v| v.trim().is_empty())
        .unwrap_or(true)
    {
        return Err(LocalError::Usage(format!(
            "--azure live needs {} (comma-separated subscription ids) in the environment",
            settings::SUBSCRIPTIONS
        )));
    }
    let clock = Clock::real();
    let queue = open_queue(&options.state, clock)?;
    let (endpoint, mut app_settings) = start_endpoint(&queue).await?;
    app_settings.insert(
        crate::azure::config::ENV_CREDENTIAL.to_string(),
        setting_or(
            crate::azure::config::ENV_CREDENTIAL,
            "developer-tools".to_string(),
        ),
    );
    let printer = Printer::for_stdout(clock);
    let host = start_host(options, &queue, clock, app_settings).await?;
    let live = spawn_live(&host, &queue, &printer);
    printer.line("vmbackup local --azure live: real Azure, real clock, local Service Bus");
    fire_discovery(&host, &printer).await;
    Ok(Running {
        queue,
        host,
        endpoint,
        sim: None,
        store: None,
        run: None,
        background: Vec::new(),
        timeline_done: Arc::new(AtomicBool::new(true)),
        vm_names: Vec::new(),
        printer,
        live,
        clock,
        plays_the_demo: false,
    })
}

fn spawn_live(host: &Host, queue: &Queue, printer: &Printer) -> LiveView {
    let in_flight_queue = queue.clone();
    LiveView::spawn(
        host.subscribe(),
        queue.clone(),
        printer.clone(),
        move || {
            // Messages waiting or locked: a cheap stand-in for "work in flight".
            in_flight_queue.active_count().unwrap_or(0) as usize
        },
    )
}

async fn fire_discovery(host: &Host, printer: &Printer) {
    if let Err(e) = host.fire_timer(DISCOVERY_SWEEP).await {
        printer.line(&format!("no discovery sweep at start: {e}"));
    }
}

/// Event Grid: the simulator's resource events land on `vm-events`, one message each.
fn forward_events(
    sim: &SimulatorHandle,
    queue: &Queue,
    store: &Arc<EstateStore>,
    printer: &Printer,
) -> tokio::task::JoinHandle<()> {
    let mut events = sim.subscribe_events();
    let queue = queue.clone();
    let store = store.clone();
    let printer = printer.clone();
    tokio::spawn(async move {
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    printer.line(&format!("{missed} Event Grid events were dropped"));
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            // Events can come from lazy changes (a deployment finishing) that no write request
            // announced: save the estate that produced them before they are on the queue.
            if let Err(e) = store.save(true) {
                printer.line(&format!("cannot save the estate: {e}"));
            }
            let items = match event {
                Value::Array(items) => items,
                single => vec![single],
            };
            for item in items {
                let mut message = OutgoingMessage::new(item.to_string());
                message.properties.message_id = item["id"].as_str().map(str::to_string);
                message.properties.content_type = Some("application/json".into());
                if let Err(e) = queue.send(queues::VM_EVENTS, &message) {
                    printer.line(&format!("cannot enqueue an Event Grid event: {e}"));
                }
            }
        }
    })
}

fn enqueue_event<T: EventData>(queue: &Queue, event: &CloudEvent<T>) -> Result<bool, String> {
    if queue
        .journal_has(T::QUEUE, &event.id)
        .map_err(|e| e.to_string())?
    {
        return Ok(false);
    }
    let mut message = OutgoingMessage::new(serde_json::to_vec(event).map_err(|e| e.to_string())?);
    message.properties.message_id = Some(event.id.clone());
    message.properties.content_type = Some("application/json".into());
    queue.send(T::QUEUE, &message).map_err(|e| e.to_string())?;
    Ok(true)
}

/// The operator's side of a timeline entry: an event on its queue, with an id derived from the
/// run and the entry so that a restarted run never sends it twice.
fn timeline_message(
    queue: &Queue,
    sim: &SimulatorHandle,
    action: &TimelineAction,
    id: String,
    now: DateTime<Utc>,
) -> Result<String, String> {
    let vm_name = match action {
        TimelineAction::BackupNow { vm } | TimelineAction::RestoreRequest { vm, .. } => vm,
        _ => return Err("not a queue action".into()),
    };
    // The staging account an operator would pass (`vmbackup restore --staging-storage-account`):
    // one in the VM's subscription and region, as Azure Backup stages in the vault's region.
    let (vm_id, staging_account) = sim
        .with_state(|s| {
            s.vm_by_name(vm_name).map(|v| {
                let staging = s
                    .storage_accounts
                    .iter()
                    .find(|a| {
                        same(&a.subscription, &v.subscription) && same(&a.location, &v.location)
                    })
                    .map(|a| a.id());
                (v.id(), staging)
            })
        })
        .ok_or_else(|| format!("no VM named {vm_name:?} in the estate"))?;
    match action {
        TimelineAction::BackupNow { .. } => {
            let data = BackupRequested {
                vm_id: ResourceId::parse(&vm_id).map_err(|e| e.to_string())?,
                retain_until: None,
                requested_by: BackupRequester::Operator,
                remedy_applied: false,
            };
            let event = CloudEvent::start_with_id(data, Some(vm_id), now, id);
            enqueue_event(queue, &event)?;
            Ok(format!("backup-now {vm_name}"))
        }
        TimelineAction::RestoreRequest {
            ticket,
            mode,
            recovery_point,
            target_resource_group,
            callback,
            ..
        } => {
            let mode = serde_json::to_value(mode)
                .ok()
                .and_then(|m| m.as_str().map(str::to_string));
            let data = RestoreRequestFields {
                ticket_id: Some(ticket.clone()),
                vm_id: Some(vm_id.clone()),
                mode,
                recovery_point: Some(recovery_point.clone()),
                target_resource_group: target_resource_group.clone(),
                staging_storage_account: staging_account,
                callback_url: callback.clone(),
                target_subnet_id: None,
            };
            // The id every door gives this request (a malformed one keeps the entry's id and is
            // rejected by start-restore): the same ticket and content twice is one message.
            let id = validate_request(&data)
                .map(|request| request_message_id(&request))
                .unwrap_or(id);
            let event = CloudEvent::start_with_id(data, Some(vm_id), now, id).with_ticket(ticket);
            enqueue_event(queue, &event)?;
            Ok(format!("restore-request {ticket} for {vm_name}"))
        }
        _ => Err("not a queue action".into()),
    }
}

/// Plays the fleet's timeline at its simulated times, skipping what a previous run already played.
async fn play_timeline(
    fleet: Fleet,
    sim: Arc<SimulatorHandle>,
    store: Arc<EstateStore>,
    queue: Queue,
    sim_start: DateTime<Utc>,
    printer: Printer,
    done: Arc<AtomicBool>,
) {
    let clock = sim.clock();
    let applied = store.timeline_applied();
    let mut order: Vec<usize> = (0..fleet.timeline.len()).collect();
    order.sort_by_key(|&i| (fleet.timeline[i].at, i));
    for index in order {
        if applied.contains(&index) {
            continue;
        }
        let entry = &fleet.timeline[index];
        let at = sim_start + chrono::Duration::from_std(entry.at.0).unwrap_or_default();
        clock.sleep_until(at).await;
        let outcome = if entry.action.is_azure_side() {
            sim.apply(&entry.action)
                .map(|()| format!("timeline: {}", describe_action(&entry.action)))
        } else {
            let id = uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_URL,
                format!("vmbackup-local:{}:timeline:{index}", sim_start.timestamp()).as_bytes(),
            )
            .to_string();
            timeline_message(&queue, &sim, &entry.action, id, clock.now())
                .map(|what| format!("timeline: {what}"))
        };
        match outcome {
            Ok(line) => printer.line(&line),
            Err(e) => printer.line(&format!("timeline[{index}] could not be played: {e}")),
        }
        if let Err(e) = store.mark_applied(index) {
            printer.line(&format!("cannot save the estate: {e}"));
        }
    }
    done.store(true, Ordering::SeqCst);
}

fn describe_action(action: &TimelineAction) -> String {
    match action {
        TimelineAction::Tag { vm, tags } => format!("tag {vm} {tags:?}"),
        TimelineAction::Untag { vm, tags } => format!("untag {vm} {tags:?}"),
        TimelineAction::CreateVm { vm } => format!("create-vm {}", vm.name),
        TimelineAction::EnableAde { vm, .. } => format!("enable-ade {vm}"),
        TimelineAction::DeleteKey { key_vault, key } => format!("delete-key {key_vault}/{key}"),
        TimelineAction::DeleteSecret { key_vault, secret } => {
            format!("delete-secret {key_vault}/{secret}")
        }
        TimelineAction::BackupNow { vm } => format!("backup-now {vm}"),
        TimelineAction::RestoreRequest { vm, ticket, .. } => {
            format!("restore-request {ticket} for {vm}")
        }
    }
}

/// Saves the estate when it changed and records how far the simulated clock got.
async fn keep_saving(store: Arc<EstateStore>, dir: PathBuf, mut run: RunRecord, clock: Clock) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Err(e) = store.save(false) {
            tracing::warn!(error = %e, "cannot save the estate");
        }
        run.sim_now = clock.now();
        if let Err(e) = estate::write_run(&dir, &run) {
            tracing::warn!(error = %e, "cannot record the clock");
        }
    }
}

/// Until idle (with `--until-idle`) or until Ctrl-C.
async fn wait(running: &Running, until_idle: bool) -> Result<(), LocalError> {
    let mut quiet_polls = 0;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => {
                running.printer.line("interrupted: stopping (the run continues with the same --state)");
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        if !until_idle {
            continue;
        }
        let idle = running.timeline_done.load(Ordering::SeqCst)
            && running
                .host
                .is_idle()
                .map_err(|e| LocalError::Runtime(e.to_string()))?;
        // Idle several polls in a row, so a message enqueued between checks is not missed.
        quiet_polls = if idle { quiet_polls + 1 } else { 0 };
        if quiet_polls >= 5 {
            return Ok(());
        }
    }
}

async fn finish(running: Running, options: &LocalOptions) -> Result<Report, LocalError> {
    let Running {
        queue,
        host,
        endpoint,
        sim,
        store,
        run,
        background,
        vm_names,
        printer,
        live,
        clock,
        ..
    } = running;
    host.stop().await;
    for task in &background {
        task.abort();
    }
    if let Some(store) = &store {
        store
            .save(true)
            .map_err(|e| LocalError::Runtime(e.to_string()))?;
    }
    if let Some(mut run) = run {
        run.sim_now = clock.now();
        estate::write_run(&options.state, &run).map_err(|e| LocalError::Runtime(e.to_string()))?;
    }
    endpoint.stop().await;
    live.stop().await;
    printer.finish();

    let report = build_report(&queue, sim.as_deref(), &vm_names)?;
    println!("\n{}", report::summary_table(&report));
    if let Some(path) = &options.report {
        let text = serde_json::to_vec_pretty(&report)
            .map_err(|e| LocalError::Runtime(format!("cannot write the report: {e}")))?;
        std::fs::write(path, text).map_err(|e| {
            LocalError::Runtime(format!("cannot write the report {}: {e}", path.display()))
        })?;
    }
    if let Some(sim) = sim.and_then(|sim| Arc::try_unwrap(sim).ok()) {
        sim.shutdown().await;
    }
    Ok(report)
}

/// The contract's report from durable state: the journal, the dead letters and the estate.
pub fn build_report(
    queue: &Queue,
    sim: Option<&SimulatorHandle>,
    vm_names: &[String],
) -> Result<Report, LocalError> {
    let journal = queue
        .journal_since(0)
        .map_err(|e| LocalError::Runtime(e.to_string()))?;
    let dead_lettered = queue
        .dead_letter_count()
        .map_err(|e| LocalError::Runtime(e.to_string()))?;
    let (facts, arm) = match sim {
        Some(sim) => sim.with_state(|s| {
            (
                report::vm_facts(s, vm_names),
                ArmCounts {
                    requests: s.counters.requests,
                    throttled: s.counters.throttled,
                },
            )
        }),
        None => (Vec::new(), ArmCounts::default()),
    };
    Ok(report::build(&facts, &journal, dead_lettered, arm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_start_on_the_next_whole_hour() {
        let now = Utc.with_ymd_and_hms(2026, 3, 1, 13, 42, 7).unwrap();
        assert_eq!(
            next_whole_hour(now),
            Utc.with_ymd_and_hms(2026, 3, 1, 14, 0, 0).unwrap()
        );
        let on_the_hour = Utc.with_ymd_and_hms(2026, 3, 1, 23, 0, 0).unwrap();
        assert_eq!(
            next_whole_hour(on_the_hour),
            Utc.with_ymd_and_hms(2026, 3, 2, 0, 0, 0).unwrap()
        );
    }
}
