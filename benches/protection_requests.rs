//! Benchmark: ARM requests per protected VM by encryption kind (`cargo bench --bench
//! protection_requests`; `VMBACKUP_BENCH_PROTECT_VMS` sets the VMs per kind, default 100).
//!
//! For each kind a fresh harness (tests/support) holds N tagged VMs of that kind; the discovery
//! sweep is fired and the whole choreography runs to idle through the local host: assess-vm,
//! grant-key-vault-access (ADE, key vaults with `backupAccess: false` so the grant runs),
//! enable-protection, notify. ARM requests (identity left out) divided by the VMs protected, with
//! what they are by kind. Outcomes on `notifications` and any `backup-requests` are drained, as in
//! tests/protection.rs, so only protection is counted. Results also go out as `BENCH` lines.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use support::{Harness, Options};
use vmbackup::events::queues;
use vmbackup::simulator::RequestRecord;
use vmbackup::workflow::settings;

const SUB: &str = "11111111-1111-1111-1111-111111111111";
/// The least-privilege custom role the RBAC grant assigns (as tests/protection.rs configures it).
const CUSTOM_ROLE: &str = "7c1e9d0a-3b2f-4e51-9a6d-2f8b0c4e1d37";

struct Kind {
    name: &'static str,
    encryption: fn(usize) -> Value,
}

const KINDS: [Kind; 5] = [
    Kind {
        name: "pmk",
        encryption: |_| json!({ "kind": "pmk" }),
    },
    Kind {
        name: "cmk",
        encryption: |_| json!({ "kind": "cmk", "diskEncryptionSet": "des-weu" }),
    },
    Kind {
        name: "host",
        encryption: |_| json!({ "kind": "host" }),
    },
    Kind {
        name: "ade_bek_access_policies",
        encryption: |i| json!({ "kind": "ade", "keyVault": "kv-ade-weu", "secret": format!("bek-{i:04}") }),
    },
    Kind {
        name: "ade_bek_kek_rbac",
        encryption: |i| json!({ "kind": "ade", "keyVault": "kv-rbac-weu", "secret": format!("bek-{i:04}"), "kek": "kek-2" }),
    },
];

fn fleet(kind: &Kind, vms: usize) -> String {
    let machines: Vec<Value> = (0..vms)
        .map(|i| {
            json!({ "name": format!("vm-{i:04}"), "resourceGroup": "rg-app", "location": "westeurope", "os": "linux",
                    "tags": { "backup-policy": "DefaultPolicy" }, "encryption": (kind.encryption)(i),
                    "agent": "ready", "powerState": "running" })
        })
        .collect();
    json!({
        "subscriptions": [{
            "id": SUB,
            "recoveryVaults": [{ "name": "rsv-weu", "resourceGroup": "rg-backup", "location": "westeurope",
                                 "policies": ["DefaultPolicy"] }],
            "keyVaults": [
                { "name": "kv-ade-weu", "resourceGroup": "rg-sec", "location": "westeurope",
                  "authorization": "accessPolicies", "backupAccess": false },
                { "name": "kv-rbac-weu", "resourceGroup": "rg-sec", "location": "westeurope",
                  "authorization": "rbac", "backupAccess": false, "keys": [{ "name": "kek-2" }] },
                { "name": "kv-cmk-weu", "resourceGroup": "rg-sec", "location": "westeurope",
                  "keys": [{ "name": "cmk-1" }] }
            ],
            "diskEncryptionSets": [{ "name": "des-weu", "resourceGroup": "rg-sec", "location": "westeurope",
                                     "keyVault": "kv-cmk-weu", "key": "cmk-1" }],
            "virtualMachines": machines
        }]
    })
    .to_string()
}

/// Queues no function of the protection choreography reads.
const DRAINED: [&str; 2] = [queues::NOTIFICATIONS, queues::BACKUP_REQUESTS];

fn drain(h: &Harness) {
    for queue in DRAINED {
        while let Ok(Some(_)) = h.queue.receive_and_delete(queue) {}
    }
}

/// Run to idle (wall-clock bound); false when it did not settle.
async fn settle(h: &Harness) -> bool {
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        drain(h);
        if h.wait_idle(Duration::from_millis(400)).await {
            drain(h);
            if h.wait_idle(Duration::from_millis(200)).await {
                return true;
            }
        }
    }
    false
}

fn protected_count(h: &Harness) -> usize {
    h.sim.with_state(|s| {
        s.protected_items
            .iter()
            .filter(|p| p.protection_state != "ProtectionStopped")
            .count()
    })
}

/// `+1.00 GET KeyVault/vaults, …`: request kinds whose count per VM differs from PMK's.
fn extra_over(pmk: &BTreeMap<String, f64>, kind: &BTreeMap<String, f64>) -> String {
    let names: BTreeSet<&String> = pmk.keys().chain(kind.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| {
            let difference =
                kind.get(name).copied().unwrap_or(0.0) - pmk.get(name).copied().unwrap_or(0.0);
            (difference.abs() >= 0.005).then(|| format!("{difference:+.2} {name}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main]
async fn main() {
    let vms: usize = std::env::var("VMBACKUP_BENCH_PROTECT_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(100);
    let custom_role = format!(
        "/subscriptions/{SUB}/providers/Microsoft.Authorization/roleDefinitions/{CUSTOM_ROLE}"
    );
    // Requests per VM by request kind of the first kind (PMK), to name what the others add.
    let mut baseline: Option<BTreeMap<String, f64>> = None;
    for kind in &KINDS {
        let mut options = Options::default();
        options.settings.insert(
            settings::KEY_VAULT_BACKUP_ROLE_ID.to_string(),
            custom_role.clone(),
        );
        let h = Harness::start_with(&fleet(kind, vms), options).await;
        let started = Instant::now();
        h.fire_timer("discovery-sweep").await;
        let settled = settle(&h).await;
        let wall = started.elapsed();
        let log: Vec<RequestRecord> = h.sim.request_log();
        let arm: Vec<&RequestRecord> = log.iter().filter(|r| !common::is_identity(r)).collect();
        let throttled = arm.iter().filter(|r| r.throttled).count();
        let protected = protected_count(&h);
        let per_vm = arm.len() as f64 / protected.max(1) as f64;
        let kinds = common::by_kind(arm.iter().copied());
        println!(
            "protection of {vms} {} VMs: {protected} protected{}, {} ARM requests ({per_vm:.2} per VM), {throttled} throttled, {:.1} s wall; by kind: {}",
            kind.name,
            if settled { "" } else { " (did not settle in 600 s)" },
            arm.len(),
            wall.as_secs_f64(),
            common::describe(&kinds)
        );
        let per_vm_kinds: BTreeMap<String, f64> = kinds
            .iter()
            .map(|(k, n)| (k.clone(), *n as f64 / protected.max(1) as f64))
            .collect();
        let extra = match &baseline {
            Some(pmk) => extra_over(pmk, &per_vm_kinds),
            None => {
                baseline = Some(per_vm_kinds);
                String::new()
            }
        };
        if !extra.is_empty() {
            println!("  per VM beyond PMK: {extra}");
        }
        // Spaces as `_`, so the line stays space-separated `key=value` pairs.
        println!(
            "BENCH protect_{0}_vms={vms} protect_{0}_protected={protected} protect_{0}_requests={1} protect_{0}_per_vm={per_vm:.2} protect_{0}_throttled={throttled} protect_{0}_extra={2}",
            kind.name,
            arm.len(),
            if extra.is_empty() { "none".to_string() } else { extra.replace(' ', "_") }
        );
        h.stop().await;
    }
}
