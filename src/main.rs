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
