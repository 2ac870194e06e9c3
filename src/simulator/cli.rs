//! `vmbackup simulator --listen ADDR [--fleet FILE]`.

use super::fleet::Fleet;
use super::{Simulator, SimulatorConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct SimulatorArgs {
    /// Address to listen on, e.g. 127.0.0.1:8400 (port 0 picks a free port).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Fleet file describing the simulated estate; an empty estate when omitted.
    #[arg(long)]
    pub fleet: Option<PathBuf>,
}

/// Serve until SIGINT/SIGTERM. Prints what a client needs once the listener accepts connections.
pub async fn run(args: SimulatorArgs) -> anyhow::Result<()> {
    let fleet = match &args.fleet {
        Some(path) => Fleet::from_path(path)?,
        None => Fleet::default(),
    };
    let mut config = SimulatorConfig::new(fleet);
    config.listen = args.listen;
    let sim = Simulator::start(config).await?;
    let timeline = sim.spawn_timeline();
    println!("ARM_ENDPOINT={}", sim.arm_endpoint());
    println!("IDENTITY_ENDPOINT={}", sim.identity_endpoint());
    println!("IDENTITY_HEADER={}", sim.identity_header());
    println!("listening on {}", sim.base_url());
    wait_for_signal().await?;
    timeline.abort();
    sim.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok(())
    }
}
