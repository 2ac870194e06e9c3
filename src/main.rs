//! The `vmbackup` command line.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "vmbackup",
    version,
    about = "Protect, back up and restore encrypted Azure VMs with Azure Backup"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the custom handler on 127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT (what the Functions host starts).
    Serve,
    /// Lay out the deployable function app: host.json, one folder per function, the binary.
    Package {
        /// The folder to write (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the Azure simulator alone (ARM paths at the root of ADDR, managed identity, data planes).
    Simulator(vmbackup::simulator::cli::SimulatorArgs),
    /// Enqueue a restore request (`vmbackup.restore.requested`) on the restore-requests queue, through
    /// the Service Bus the environment configures (as for the handler).
    Restore(RestoreArgs),
    /// The main job on one machine: a local Functions host, an embedded Service Bus and (by default)
    /// the Azure simulator seeded with a fleet (the built-in demo fleet when none is given).
    Local(LocalArgs),
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// ARM id of the VM to restore.
    #[arg(long)]
    vm: String,
    /// The ticket id (one restore per ticket).
    #[arg(long)]
    ticket: String,
    /// `latest`, a recovery point id, or an RFC 3339 time (the newest point at or before it).
    #[arg(long)]
    recovery_point: Option<String>,
    /// `restore-disks` (default), `replace-existing`, `alternate-location` or `files`.
    #[arg(long)]
    mode: Option<String>,
    /// ARM id of the resource group to restore into (default: the VM's).
    #[arg(long)]
    target_resource_group: Option<String>,
    /// ARM id of the staging storage account (default: the app setting).
    #[arg(long)]
    staging_storage_account: Option<String>,
    /// URL the outcome is POSTed to.
    #[arg(long)]
    callback: Option<String>,
    /// `alternate-location` only: ARM id of the subnet for the new VM (default: the source VM's).
    #[arg(long)]
    target_subnet: Option<String>,
}

#[derive(clap::Args)]
struct LocalArgs {
    /// The fleet file of the simulated estate (default: the built-in demo fleet).
    #[arg(long)]
    fleet: Option<PathBuf>,
    /// Exit 0 once the timeline has played and no message is in flight or scheduled.
    #[arg(long)]
    until_idle: bool,
    /// Write the JSON report here at the end.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Where the durable queue and the simulated estate live; the same DIR continues a run.
    #[arg(long, default_value = vmbackup::local::session::DEFAULT_STATE_DIR)]
    state: PathBuf,
    /// `simulator` (default) or `live` (real Azure with developer credentials, real clock).
    #[arg(long, value_enum, default_value = "simulator")]
    azure: AzureArg,
    /// The function app folder (host.json + function folders); default: the working directory
    /// when it holds host.json, else the folder of this binary.
    #[arg(long)]
    app: Option<PathBuf>,
    /// Deliver to a handler that is already running at this URL (e.g. under a debugger) instead of
    /// starting `vmbackup serve`.
    #[arg(long)]
    handler_url: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AzureArg {
    Simulator,
    Live,
}

async fn enqueue_restore(args: RestoreArgs) -> Result<(), Failure> {
    use vmbackup::domain::restore::{request_message_id, validate_request, RestoreRequestFields};
    use vmbackup::events::{CloudEvent, EventData};
    let fields = RestoreRequestFields {
        ticket_id: Some(args.ticket),
        vm_id: Some(args.vm),
        mode: args.mode,
        recovery_point: args.recovery_point,
        target_resource_group: args.target_resource_group,
        staging_storage_account: args.staging_storage_account,
        callback_url: args.callback,
        target_subnet_id: args.target_subnet,
    };
    let request = validate_request(&fields).map_err(|r| Failure::Usage(r.message))?;
    let config =
        vmbackup::azure::AzureConfig::from_env().map_err(|e| Failure::Usage(e.to_string()))?;
    let service_bus = config.service_bus.as_ref().ok_or_else(|| {
        Failure::Usage(format!(
            "no Service Bus configured: set {} (or {})",
            vmbackup::azure::config::ENV_SERVICEBUS_NAMESPACE,
            vmbackup::azure::config::ENV_SERVICEBUS_CONNECTION_STRING
        ))
    })?;
    let tokens = std::sync::Arc::new(
        vmbackup::azure::IdentityTokenSource::from_config(&config)
            .map_err(|e| Failure::Usage(e.to_string()))?,
    );
    let sender = vmbackup::azure::servicebus::ServiceBusSender::new(
        service_bus,
        tokens,
        &config.audiences.service_bus,
    );
    // One id per request content: the same request sent twice is one message (duplicate detection).
    let event = CloudEvent::start_with_id(
        fields,
        Some(request.vm_id.to_string()),
        chrono::Utc::now(),
        request_message_id(&request),
    )
    .with_ticket(request.ticket_id.clone());
    let body = serde_json::to_value(&event).map_err(|e| Failure::Runtime(e.to_string()))?;
    let message = vmbackup::azure::servicebus::OutgoingMessage {
        body,
        message_id: event.id.clone(),
        correlation_id: Some(event.correlationid.clone()),
        label: Some(RestoreRequestFields::TYPE.to_string()),
        scheduled_enqueue_time: None,
    };
    sender
        .send(RestoreRequestFields::QUEUE, &message)
        .await
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    println!(
        "restore request for ticket {} enqueued (correlation id {})",
        request.ticket_id, event.correlationid
    );
    Ok(())
}

/// Exit codes of the contract: 1 runtime failure, 2 bad usage or bad input.
enum Failure {
    Runtime(String),
    Usage(String),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("vmbackup: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(reason)) => {
            eprintln!("vmbackup: {reason}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(reason)) => {
            eprintln!("vmbackup: {reason}");
            ExitCode::from(1)
        }
    }
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Serve => {
            vmbackup::runtime::init_logging();
            let deps =
                vmbackup::workflow::Deps::from_env().map_err(|e| Failure::Usage(e.to_string()))?;
            vmbackup::runtime::serve(vmbackup::workflow::app(std::sync::Arc::new(deps)))
                .await
                .map_err(|e| match e {
                    vmbackup::runtime::ServeError::PortMissing
                    | vmbackup::runtime::ServeError::PortInvalid(_) => {
                        Failure::Usage(e.to_string())
                    }
                    other => Failure::Runtime(other.to_string()),
                })
        }
        Command::Simulator(args) => vmbackup::simulator::cli::run(args).await.map_err(|e| {
            if e.downcast_ref::<vmbackup::simulator::fleet::FleetError>()
                .is_some()
            {
                Failure::Usage(e.to_string())
            } else {
                Failure::Runtime(format!("{e:#}"))
            }
        }),
        Command::Restore(args) => enqueue_restore(args).await,
        Command::Local(args) => {
            init_local_logging();
            let options = vmbackup::local::session::LocalOptions {
                fleet: args.fleet,
                until_idle: args.until_idle,
                report: args.report,
                state: args.state,
                azure: match args.azure {
                    AzureArg::Simulator => vmbackup::local::session::AzureMode::Simulator,
                    AzureArg::Live => vmbackup::local::session::AzureMode::Live,
                },
                app: args.app,
                handler_url: args.handler_url,
            };
            vmbackup::local::session::run(options)
                .await
                .map(|_| ())
                .map_err(|e| match e {
                    vmbackup::local::session::LocalError::Usage(reason) => Failure::Usage(reason),
                    vmbackup::local::session::LocalError::Runtime(reason) => {
                        Failure::Runtime(reason)
                    }
                })
        }
        Command::Package { out } => {
            let binary = std::env::current_exe()
                .map_err(|e| Failure::Runtime(format!("cannot locate the running binary: {e}")))?;
            let app =
                vmbackup::workflow::declared_app().map_err(|e| Failure::Runtime(e.to_string()))?;
            let target = vmbackup::runtime::package::package(&app, &out, &binary)
                .map_err(|e| Failure::Runtime(e.to_string()))?;
            println!(
                "packaged the function app in {} (handler {})",
                out.display(),
                target.display()
            );
            Ok(())
        }
    }
}

/// Warnings of the host on stderr; the live view owns stdout. The handler's own log lines are
/// shown only when asked for (`RUST_LOG=vmbackup::local::handler=info`).
fn init_local_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
