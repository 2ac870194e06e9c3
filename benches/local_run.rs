//! Wall time and events/s of `vmbackup local` running a 1,000-VM fleet to idle.
//!
//! `cargo bench --bench local_run` (set `VMBACKUP_BENCH_VMS` for another size and
//! `VMBACKUP_BENCH_TIME_SCALE` for another speed). The run plays at 100x real time by default, not
//! the demo's 1000x: at 1000x a 1,000-VM estate's CPU-bound work on 2 cores stretches over simulated
//! days, each night's sweep adds 1,000 more backups, and the run never goes idle. The fleet has
//! 1,000 tagged VMs across two regions with a timeline of on-demand backups for every VM; the run
//! uses the checked-in function app (the real workflow once its functions are declared), so the
//! numbers grow with it. Events/s counts every message the run enqueued (its journal). The result
//! also goes out as a `BENCH key=value` line for `scripts/bench`.

use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;
use vmbackup::clock::Clock;
use vmbackup::local::queue::Queue;

fn fleet(vms: usize, time_scale: f64) -> Value {
    let regions = ["westeurope", "northeurope"];
    let machines: Vec<Value> = (0..vms)
        .map(|i| {
            json!({
                "name": format!("vm-{i:04}"), "resourceGroup": "rg-app",
                "location": regions[i % 2], "tags": { "backup-policy": "DefaultPolicy" },
                "dataDisks": 1
            })
        })
        .collect();
    // On-demand backups from the first simulated hour on, once the discovery sweep at start has had
    // time to protect the estate (earlier requests are rightly rejected NotProtected).
    let timeline: Vec<Value> = (0..vms)
        .map(|i| json!({ "at": format!("{}m", 60 + i % 50), "action": "backup-now", "vm": format!("vm-{i:04}") }))
        .collect();
    json!({
        "subscriptions": [{
            "id": "11111111-1111-1111-1111-111111111111",
            "recoveryVaults": regions.iter().map(|r| json!({
                "name": format!("rsv-{r}"), "resourceGroup": "rg-backup", "location": r,
                "policies": ["DefaultPolicy"] })).collect::<Vec<_>>(),
            "virtualMachines": machines
        }],
        "timeline": timeline,
        "simulation": { "timeScale": time_scale }
    })
}

fn main() {
    let vms: usize = std::env::var("VMBACKUP_BENCH_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let time_scale: f64 = std::env::var("VMBACKUP_BENCH_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s: &f64| s.is_finite() && *s > 0.0)
        .unwrap_or(0.01);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("vmbackup-bench-local-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let fleet_path = dir.join("fleet.json");
    std::fs::write(&fleet_path, fleet(vms, time_scale).to_string()).expect("fleet written");
    let state = dir.join("state");
    let binary = env!("CARGO_BIN_EXE_vmbackup");
    let started = Instant::now();
    let output = std::process::Command::new(binary)
        .args(["local", "--until-idle", "--fleet"])
        .arg(&fleet_path)
        .arg("--state")
        .arg(&state)
        .arg("--report")
        .arg(dir.join("report.json"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .output()
        .expect("vmbackup local runs");
    let wall = started.elapsed();
    assert!(
        output.status.success(),
        "vmbackup local failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let events = Queue::open(&state, Clock::real())
        .and_then(|q| q.journal_since(0))
        .map(|journal| journal.len())
        .expect("journal readable");
    // What the run achieved, so a fast run that did nothing does not look good.
    let report: Value = std::fs::read(dir.join("report.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .expect("report written");
    let machines = report["vms"].as_array().expect("report lists VMs");
    let protected = machines
        .iter()
        .filter(|vm| vm["protection"]["state"] == "protected")
        .count();
    let count = |field: &str| -> u64 {
        machines
            .iter()
            .filter_map(|vm| vm["backups"][field].as_u64())
            .sum()
    };
    let (speed, seconds) = ((1.0 / time_scale).round(), wall.as_secs_f64());
    let per_second = events as f64 / seconds;
    let (completed, failed) = (count("completed"), count("failed"));
    let (dead_lettered, arm_requests) = (&report["deadLettered"], &report["arm"]["requests"]);
    println!(
        "local_run: {vms} VMs at {speed}x to idle in {seconds:.2} s wall, {events} events, {per_second:.0} events/s; \
         {protected} protected, {completed} backups completed, {failed} failed, {dead_lettered} dead-lettered, {arm_requests} ARM requests",
    );
    println!(
        "BENCH local_vms={vms} local_speed={speed} local_seconds={seconds:.2} local_events={events} local_events_per_second={per_second:.0} \
         local_protected={protected} local_backups_completed={completed} local_backups_failed={failed} local_dead_lettered={dead_lettered} local_arm_requests={arm_requests}",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
