//! Benchmark: the discovery and backup sweeps over 10,000 VMs against the simulator — wall time,
//! Resource Graph pages and the other ARM requests, read from the simulator's request log
//! (`cargo bench --bench sweeps`; `VMBACKUP_BENCH_SWEEP_VMS` sets another size).
//!
//! - discovery, first run: 10,000 tagged VMs, none protected → one `protection.requested` each;
//! - discovery, steady state: 10,000 tagged VMs, all protected → nothing requested;
//! - backup sweep over the same 10,000 protected VMs → one paced `backup.requested` each, sent
//!   through (local) Service Bus.
//!
//! The sweeps run alone: the harness's host is stopped, so nothing consumes what they emit while
//! they are measured. Each is invoked over HTTP as the host invokes it (the backup sweep through
//! its `run`, to read its summary). Results also go out as `BENCH key=value` lines.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use vmbackup::simulator::RequestRecord;

const SUBSCRIPTION: &str = "11111111-1111-1111-1111-111111111111";
const VAULTS: usize = 10;
const PAGE_ROWS: usize = 1_000;

fn fleet(vms: usize, protected: bool) -> String {
    let machines: Vec<Value> = (0..vms)
        .map(|i| {
            let mut vm = json!({ "name": format!("vm-{i:05}"), "resourceGroup": format!("rg-app-{}", i % 20),
                    "location": "westeurope", "os": "linux", "tags": { "backup-policy": "DefaultPolicy" },
                    "encryption": { "kind": "pmk" }, "agent": "ready", "powerState": "running" });
            if protected {
                vm["protectedBy"] = json!({ "vault": format!("rsv-weu-{}", i % VAULTS), "policy": "DefaultPolicy" });
            }
            vm
        })
        .collect();
    let vaults: Vec<Value> = (0..VAULTS)
        .map(|v| json!({ "name": format!("rsv-weu-{v}"), "resourceGroup": "rg-backup", "location": "westeurope", "policies": ["DefaultPolicy"] }))
        .collect();
    json!({ "subscriptions": [{ "id": SUBSCRIPTION, "recoveryVaults": vaults, "virtualMachines": machines }] })
        .to_string()
}

/// Pages a query of `rows` rows takes (an empty result is one page).
fn pages(rows: usize) -> usize {
    rows.div_ceil(PAGE_ROWS).max(1)
}

struct Measured {
    wall: Duration,
    graph_pages: usize,
    other_arm: usize,
    kinds: String,
}

fn measure(log: &[RequestRecord], wall: Duration) -> Measured {
    let arm: Vec<&RequestRecord> = log.iter().filter(|r| !common::is_identity(r)).collect();
    let graph_pages = arm.iter().filter(|r| common::is_resource_graph(r)).count();
    Measured {
        wall,
        graph_pages,
        other_arm: arm.len() - graph_pages,
        kinds: common::describe(&common::by_kind(arm.iter().copied())),
    }
}

/// Fire `discovery-sweep` over HTTP, as the host does; the `protection.requested` it returns.
async fn discovery(harness: &support::Harness) -> (Measured, usize) {
    let now = harness.clock.now();
    let payload = vmbackup::local::host::timer_payload("discovery-sweep", "timer", None, None, now);
    let before = harness.sim.request_log().len();
    let started = Instant::now();
    let response: Value = reqwest::Client::new()
        .post(format!("{}/discovery-sweep", harness.handler_url))
        .json(&payload)
        .send()
        .await
        .expect("discovery-sweep answers")
        .json()
        .await
        .expect("discovery-sweep answers JSON");
    let wall = started.elapsed();
    let requested = match &response["Outputs"]["protectionRequests"] {
        Value::Array(items) => items.len(),
        Value::Null => 0,
        _ => 1,
    };
    let log: Vec<RequestRecord> = harness.sim.request_log().into_iter().skip(before).collect();
    (measure(&log, wall), requested)
}

/// The discovery sweep's two Resource Graph queries alone, read to the end through the app's
/// client: the share of a sweep's wall time that is paging through the simulator.
async fn graph_alone(harness: &support::Harness) -> Duration {
    use vmbackup::workflow::discovery_sweep::{PROTECTED_ITEMS_QUERY, TAGGED_VMS_QUERY};
    let subscriptions = &harness.deps.settings.subscriptions;
    let started = Instant::now();
    for query in [TAGGED_VMS_QUERY, PROTECTED_ITEMS_QUERY] {
        harness
            .deps
            .graph
            .query(query, subscriptions)
            .await
            .expect("Resource Graph answers");
    }
    started.elapsed()
}

async fn start_alone(fleet_json: &str) -> support::Harness {
    let mut harness = support::Harness::start(fleet_json).await;
    if let Some(host) = harness.host.take() {
        host.stop().await;
    }
    harness
}

fn report(name: &str, vms: usize, m: &Measured, expected_pages: usize, extra: &str) {
    println!(
        "{name} over {vms} VMs: {:.2} s wall, {} Resource Graph pages (⌈rows/1,000⌉ per query: {expected_pages}), {} other ARM requests{extra}; by kind: {}",
        m.wall.as_secs_f64(),
        m.graph_pages,
        m.other_arm,
        m.kinds
    );
    println!(
        "BENCH {name}_vms={vms} {name}_seconds={:.2} {name}_graph_pages={} {name}_expected_pages={expected_pages} {name}_other_arm={}",
        m.wall.as_secs_f64(),
        m.graph_pages,
        m.other_arm
    );
}

/// One discovery sweep over a fresh estate of `vms` tagged VMs (all protected or none), reported
/// under `name` with the time of its Resource Graph queries alone; the harness is kept for more.
async fn measure_discovery(name: &str, vms: usize, protected: bool) -> support::Harness {
    let harness = start_alone(&fleet(vms, protected)).await;
    let (measured, requested) = discovery(&harness).await;
    let protected_rows = if protected { vms } else { 0 };
    report(
        name,
        vms,
        &measured,
        pages(vms) + pages(protected_rows),
        &format!(", {requested} protection.requested"),
    );
    let graph = graph_alone(&harness).await;
    println!(
        "  the same Resource Graph queries alone: {:.2} s",
        graph.as_secs_f64()
    );
    println!(
        "BENCH {name}_requested={requested} {name}_graph_seconds={:.2}",
        graph.as_secs_f64()
    );
    harness
}

#[tokio::main]
async fn main() {
    let vms: usize = std::env::var("VMBACKUP_BENCH_SWEEP_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);

    // Discovery, first run: the tagged VMs' pages, one empty page of protected items.
    measure_discovery("discovery_first", vms, false)
        .await
        .stop()
        .await;
    // Steady state: every VM protected, both queries read in full, nothing requested.
    let harness = measure_discovery("discovery_steady", vms, true).await;

    let before = harness.sim.request_log().len();
    let started = Instant::now();
    let mut outputs = vmbackup::runtime::Outputs::new();
    let summary = vmbackup::workflow::backup_sweep::run(&harness.deps, &mut outputs)
        .await
        .expect("the backup sweep runs");
    let wall = started.elapsed();
    let log: Vec<RequestRecord> = harness.sim.request_log().into_iter().skip(before).collect();
    let backup = measure(&log, wall);
    let queued = harness
        .journal()
        .into_iter()
        .filter(|e| e.queue == vmbackup::events::queues::BACKUP_REQUESTS)
        .count();
    let paced_over = vmbackup::workflow::backup_sweep::pacing()
        .delay_for(u32::try_from(summary.requested.saturating_sub(1)).unwrap_or(u32::MAX));
    println!("{summary:?}");
    report(
        "backup_sweep",
        vms,
        &backup,
        pages(vms) + pages(vms),
        &format!(
            " ({VAULTS} vaults' job lists), {} backup.requested sent through Service Bus ({queued} on the queue), paced over {paced_over:?} simulated",
            summary.requested
        ),
    );
    println!(
        "BENCH backup_sweep_requested={} backup_sweep_queued={queued} backup_sweep_vaults={VAULTS}",
        summary.requested
    );
    harness.stop().await;
}
