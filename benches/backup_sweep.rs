//! Benchmark: one backup sweep over 10,000 protected, tagged VMs against the simulator — wall time
//! of the sweep invocation and the ARM requests it makes (`cargo bench --bench backup_sweep`).

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::json;
use std::time::Instant;

const VMS: usize = 10_000;

#[tokio::main]
async fn main() {
    let vms: Vec<_> = (0..VMS)
        .map(|i| {
            json!({ "name": format!("vm-{i:05}"), "resourceGroup": format!("rg-app-{}", i % 20), "location": "westeurope",
                    "os": "linux", "tags": { "backup-policy": "DefaultPolicy" }, "encryption": { "kind": "pmk" },
                    "agent": "ready", "powerState": "running",
                    "protectedBy": { "vault": format!("rsv-weu-{}", i % 10), "policy": "DefaultPolicy" } })
        })
        .collect();
    let vaults: Vec<_> = (0..10)
        .map(|v| json!({ "name": format!("rsv-weu-{v}"), "resourceGroup": "rg-backup", "location": "westeurope", "policies": ["DefaultPolicy"] }))
        .collect();
    let fleet = json!({ "subscriptions": [{ "id": "11111111-1111-1111-1111-111111111111",
        "recoveryVaults": vaults, "virtualMachines": vms }] });
    let mut harness = support::Harness::start(&fleet.to_string()).await;
    // Only the sweep runs: nothing consumes its requests while it is measured.
    if let Some(host) = harness.host.take() {
        host.stop().await;
    }
    let before = harness.sim.request_log().len();
    let started = Instant::now();
    let mut outputs = vmbackup::runtime::Outputs::new();
    let summary = vmbackup::workflow::backup_sweep::run(&harness.deps, &mut outputs)
        .await
        .expect("the sweep runs");
    let wall = started.elapsed();
    let sweep_requests = harness
        .sim
        .request_log()
        .into_iter()
        .skip(before)
        .filter(|r| !r.path.contains("/msi/"))
        .count();
    let requested = harness.events_of("vmbackup.backup.requested").len();
    let last = harness
        .journal()
        .into_iter()
        .filter(|e| e.queue == "backup-requests")
        .count();
    println!("{summary:?}");
    println!(
        "backup-sweep over {VMS} protected VMs: {wall:?} wall, {sweep_requests} ARM requests (Resource Graph pages + job lists), {requested} backup.requested ({last} on the queue), paced over {:?} simulated",
        vmbackup::workflow::backup_sweep::pacing().delay_for(u32::try_from(requested.saturating_sub(1)).unwrap_or(0))
    );
    harness.stop().await;
}
