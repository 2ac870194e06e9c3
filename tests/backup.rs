//! Backup choreography end to end: backup-sweep, trigger-backup and track-job driven through the
//! local host against the simulator.

mod support;

use chrono::{DateTime, Duration as ChronoDuration, SubsecRound, Utc};
use serde_json::{json, Value};
use std::time::Duration;
use support::{Harness, Options};
use vmbackup::domain::ResourceId;
use vmbackup::events::{
    queues, AfterAccess, BackupRequested, BackupRequester, CloudEvent, EventData, JobStarted,
    KeyVaultAccessNeeded,
};
use vmbackup::local::queue::{OutgoingMessage, SendOutcome};
use vmbackup::simulator::state::{Job, JobOperation, BACKUP_MANAGEMENT_SERVICE_OBJECT_ID};
use vmbackup::workflow::settings;

const SUB: &str = "11111111-1111-1111-1111-111111111111";
const IDLE: Duration = Duration::from_secs(120);
/// A custom role id for RBAC key vaults (`VMBACKUP_KEY_VAULT_BACKUP_ROLE_ID`).
const CUSTOM_ROLE: &str = "7c1e9d0a-3b2f-4e51-9a6d-2f8b0c4e1d37";

fn vm(name: &str, encryption: Value, agent: &str, protected: bool) -> Value {
    json!({ "name": name, "resourceGroup": "rg-app", "location": "westeurope", "os": "linux",
            "tags": { "backup-policy": "DefaultPolicy" }, "encryption": encryption,
            "agent": agent, "powerState": "running",
            "protectedBy": if protected { json!({ "vault": "rsv-weu", "policy": "DefaultPolicy" }) } else { Value::Null } })
}

fn fleet(vms: Vec<Value>, backup_job_seconds: u64) -> String {
    fleet_at_scale(vms, backup_job_seconds, 0.001)
}

fn fleet_at_scale(vms: Vec<Value>, backup_job_seconds: u64, time_scale: f64) -> String {
    json!({
        "subscriptions": [{
            "id": SUB,
            "recoveryVaults": [{ "name": "rsv-weu", "resourceGroup": "rg-backup", "location": "westeurope", "policies": ["DefaultPolicy"] }],
            "keyVaults": [{ "name": "kv-ade-weu", "resourceGroup": "rg-sec", "location": "westeurope",
                            "authorization": "accessPolicies", "backupAccess": false,
                            "keys": [{ "name": "kek-1", "certificateBacked": false }],
                            "secrets": [{ "name": "bek-ade-01" }] },
                          { "name": "kv-rbac-weu", "resourceGroup": "rg-sec", "location": "westeurope",
                            "authorization": "rbac", "backupAccess": false,
                            "keys": [{ "name": "kek-2", "certificateBacked": false }],
                            "secrets": [{ "name": "bek-rbac-01" }] }],
            "virtualMachines": vms
        }],
        "simulation": { "backupJobSeconds": backup_job_seconds, "timeScale": time_scale }
    })
    .to_string()
}

fn small_fleet() -> String {
    fleet(
        vec![
            vm("vm-pmk-01", json!({ "kind": "pmk" }), "ready", true),
            vm(
                "vm-ade-01",
                json!({ "kind": "ade", "keyVault": "kv-ade-weu", "secret": "bek-ade-01", "kek": "kek-1" }),
                "ready",
                true,
            ),
            vm(
                "vm-ade-rbac-01",
                json!({ "kind": "ade", "keyVault": "kv-rbac-weu", "secret": "bek-rbac-01", "kek": "kek-2" }),
                "ready",
                true,
            ),
            vm("vm-noagent-01", json!({ "kind": "pmk" }), "missing", true),
            vm(
                "vm-unprotected-01",
                json!({ "kind": "pmk" }),
                "ready",
                false,
            ),
        ],
        1800,
    )
}

fn vm_id(name: &str) -> ResourceId {
    ResourceId::parse(&format!(
        "/subscriptions/{SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/{name}"
    ))
    .unwrap()
}

fn request(harness: &Harness, name: &str) -> CloudEvent<BackupRequested> {
    let now = harness.clock.now();
    let data = BackupRequested {
        vm_id: vm_id(name),
        retain_until: Some((now + ChronoDuration::days(7)).trunc_subsecs(0)),
        requested_by: BackupRequester::Operator,
        remedy_applied: false,
    };
    CloudEvent::start(data, Some(vm_id(name).to_string()), now)
}

fn backup_jobs(harness: &Harness, name: &str) -> Vec<Job> {
    harness.sim.with_state(|s| {
        s.jobs
            .iter()
            .filter(|j| j.operation == JobOperation::Backup && j.vm_name == name)
            .cloned()
            .collect()
    })
}

/// Every event of `event_type` enqueued on its own queue: notify's copies on `notifications` are
/// left out, and nothing else is, so a step that ran twice shows up twice.
fn events_of(harness: &Harness, event_type: &str) -> Vec<Value> {
    harness
        .journal()
        .into_iter()
        .filter(|e| e.queue != queues::NOTIFICATIONS)
        .filter_map(|e| serde_json::from_slice::<Value>(&e.body).ok())
        .filter(|v| v["type"] == event_type)
        .collect()
}

/// Delivery is at least once: under load a step may run again (a lost lock) and re-send its
/// follow-up under the same id, which counts once.
fn once_per_id(events: Vec<Value>) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    events
        .into_iter()
        .filter(|e| seen.insert(e["id"].as_str().unwrap_or_default().to_string()))
        .collect()
}

fn events_for(harness: &Harness, event_type: &str, name: &str) -> Vec<Value> {
    let id = vm_id(name).to_string();
    events_of(harness, event_type)
        .into_iter()
        .filter(|e| e["subject"].as_str() == Some(id.as_str()))
        .collect()
}

/// Wait until every function's queue is drained, nothing is scheduled and nothing runs: the whole
/// choreography (grant-key-vault-access, notify) runs with the backup functions.
async fn idle(harness: &Harness) {
    assert!(
        harness.wait_idle(IDLE).await,
        "the workflow did not settle within {IDLE:?}"
    );
}

#[tokio::test]
async fn a_backup_completes_with_the_requested_retention() {
    let harness = Harness::start(&small_fleet()).await;
    let ask = request(&harness, "vm-pmk-01");
    harness.send(&ask);
    idle(&harness).await;

    let completed = events_for(&harness, "vmbackup.backup.completed", "vm-pmk-01");
    assert_eq!(completed.len(), 1, "{completed:?}");
    assert_eq!(completed[0]["data"]["status"], "Completed");
    assert_eq!(completed[0]["correlationid"], ask.correlationid);
    let jobs = backup_jobs(&harness, "vm-pmk-01");
    assert_eq!(jobs.len(), 1);
    assert_eq!(completed[0]["data"]["jobId"], jobs[0].id);
    assert_eq!(jobs[0].expiry, ask.data.retain_until);
    // Tracking re-checked the running job with growing delays, then stopped.
    let checks: Vec<u64> = events_for(&harness, JobStarted::TYPE, "vm-pmk-01")
        .iter()
        .map(|e| e["data"]["checks"].as_u64().unwrap())
        .collect();
    assert!(checks.len() >= 2, "{checks:?}");
    assert_eq!(checks, (0..checks.len() as u64).collect::<Vec<_>>());
    assert!(events_for(&harness, "vmbackup.backup.failed", "vm-pmk-01").is_empty());
    harness.stop().await;
}

/// The Key Vault remedy of one backup request: exactly one `key-vault.access-needed` for the VM,
/// asking for keys and secrets of `key_vault`, with the request's retention carried over.
fn assert_one_remedy(
    harness: &Harness,
    ask: &CloudEvent<BackupRequested>,
    name: &str,
    key_vault: &str,
) {
    let needed = events_for(harness, KeyVaultAccessNeeded::TYPE, name);
    assert_eq!(
        needed.len(),
        1,
        "the remedy is asked for once per request: {needed:?}"
    );
    let access: CloudEvent<KeyVaultAccessNeeded> =
        serde_json::from_value(needed[0].clone()).unwrap();
    assert_eq!(access.correlationid, ask.correlationid);
    assert_eq!(access.data.needs.len(), 1);
    assert_eq!(access.data.needs[0].key_vault.name(), key_vault);
    assert!(access.data.needs[0].keys && access.data.needs[0].secrets);
    match access.data.then {
        AfterAccess::RetryBackup { retain_until } => {
            assert_eq!(retain_until, ask.data.retain_until)
        }
        other => panic!("{other:?}"),
    }
    // grant-key-vault-access sent the one retry, marked as the remedy.
    let retries: Vec<Value> = events_for(harness, BackupRequested::TYPE, name)
        .into_iter()
        .filter(|e| e["data"]["requestedBy"] == "remedy")
        .collect();
    assert_eq!(retries.len(), 1, "{retries:?}");
    assert_eq!(retries[0]["data"]["remedyApplied"], true);
    assert_eq!(retries[0]["correlationid"], ask.correlationid);
}

#[tokio::test]
async fn a_key_vault_permission_failure_is_remedied_by_the_grant_and_completes() {
    let harness = Harness::start(&small_fleet()).await;
    let ask = request(&harness, "vm-ade-01");
    harness.send(&ask);
    idle(&harness).await;

    assert_one_remedy(&harness, &ask, "vm-ade-01", "kv-ade-weu");
    // The real grant-key-vault-access gave the Backup Management Service what ADE with a KEK needs.
    let granted = harness.sim.with_state(|s| {
        let kv = s
            .key_vaults
            .iter()
            .find(|k| k.name == "kv-ade-weu")
            .unwrap();
        kv.access_policies
            .iter()
            .any(|p| p.object_id == BACKUP_MANAGEMENT_SERVICE_OBJECT_ID)
    });
    assert!(
        granted,
        "no access policy for the Backup Management Service"
    );
    let jobs = backup_jobs(&harness, "vm-ade-01");
    assert_eq!(jobs.len(), 2, "the failed job and the retry's: {jobs:?}");
    let completed = events_for(&harness, "vmbackup.backup.completed", "vm-ade-01");
    assert_eq!(completed.len(), 1, "{completed:?}");
    assert_eq!(completed[0]["correlationid"], ask.correlationid);
    let retry_job = jobs.iter().find(|j| j.failure.is_none()).unwrap();
    assert_eq!(completed[0]["data"]["jobId"], retry_job.id);
    assert_eq!(retry_job.expiry, ask.data.retain_until);
    assert!(events_for(&harness, "vmbackup.backup.failed", "vm-ade-01").is_empty());
    harness.stop().await;
}

#[tokio::test]
async fn a_backup_that_fails_again_after_the_remedy_is_reported() {
    // The RBAC key vault gets the configured custom role, which the simulator (like Azure, for a
    // role without Backup's data actions) does not accept as backup access: the grant is in place,
    // yet the retry fails the same way.
    let custom_role = format!(
        "/subscriptions/{SUB}/providers/Microsoft.Authorization/roleDefinitions/{CUSTOM_ROLE}"
    );
    let mut options = Options::default();
    options
        .settings
        .insert(settings::KEY_VAULT_BACKUP_ROLE_ID.to_string(), custom_role);
    let harness = Harness::start_with(&small_fleet(), options).await;
    let ask = request(&harness, "vm-ade-rbac-01");
    harness.send(&ask);
    idle(&harness).await;

    assert_one_remedy(&harness, &ask, "vm-ade-rbac-01", "kv-rbac-weu");
    let roles: Vec<String> = harness.sim.with_state(|s| {
        s.role_assignments
            .iter()
            .filter(|r| r.scope.ends_with("/vaults/kv-rbac-weu"))
            .filter(|r| r.principal_id == BACKUP_MANAGEMENT_SERVICE_OBJECT_ID)
            .map(|r| r.role_definition_id.clone())
            .collect()
    });
    assert_eq!(roles.len(), 1, "{roles:?}");
    assert!(roles[0].ends_with(CUSTOM_ROLE));
    let jobs = backup_jobs(&harness, "vm-ade-rbac-01");
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let failed = events_for(&harness, "vmbackup.backup.failed", "vm-ade-rbac-01");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["correlationid"], ask.correlationid);
    assert_eq!(
        failed[0]["data"]["reason"],
        "KeyVaultPermissionsNotConfigured"
    );
    assert_eq!(
        failed[0]["data"]["azureCode"],
        "UserErrorKeyVaultPermissionsNotConfigured"
    );
    assert!(jobs.iter().any(|j| failed[0]["data"]["jobId"] == j.id));
    assert!(events_for(&harness, "vmbackup.backup.completed", "vm-ade-rbac-01").is_empty());
    harness.stop().await;
}

#[tokio::test]
async fn agent_failures_carry_azures_code_and_unprotected_vms_are_rejected() {
    let harness = Harness::start(&small_fleet()).await;
    harness.send(&request(&harness, "vm-noagent-01"));
    harness.send(&request(&harness, "vm-unprotected-01"));
    idle(&harness).await;

    let failed = events_for(&harness, "vmbackup.backup.failed", "vm-noagent-01");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["data"]["reason"], "JobFailed");
    assert_eq!(
        failed[0]["data"]["azureCode"],
        "UserErrorGuestAgentStatusUnavailable"
    );
    assert!(failed[0]["data"]["message"]
        .as_str()
        .unwrap()
        .contains("VM Agent"));
    assert!(events_for(&harness, KeyVaultAccessNeeded::TYPE, "vm-noagent-01").is_empty());

    let rejected = events_for(&harness, "vmbackup.backup.rejected", "vm-unprotected-01");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0]["data"]["reason"], "NotProtected");
    assert!(backup_jobs(&harness, "vm-unprotected-01").is_empty());
    harness.stop().await;
}

#[tokio::test]
async fn duplicated_requests_and_tracking_messages_lead_to_one_job_and_one_chain() {
    let harness = Harness::start(&small_fleet()).await;
    let ask = request(&harness, "vm-pmk-01");
    // The same message twice (Service Bus drops the copy), the same request under another id (an
    // operator asking twice), and a redelivery straight to the handler.
    harness.send(&ask);
    let copy = OutgoingMessage {
        properties: vmbackup::local::queue::MessageProperties {
            message_id: Some(ask.id.clone()),
            ..Default::default()
        },
        ..OutgoingMessage::new(serde_json::to_vec(&ask).unwrap())
    };
    assert_eq!(
        harness.queue.send(BackupRequested::QUEUE, &copy).unwrap(),
        SendOutcome::Duplicate
    );
    let mut again = ask.clone();
    again.id = uuid::Uuid::new_v4().to_string();
    harness.send(&again);
    let (status, _) = harness
        .invoke("trigger-backup", &serde_json::to_value(&ask).unwrap(), 2)
        .await;
    assert_eq!(status, 200);

    // As soon as the first check is scheduled, deliver copies of it straight to track-job.
    let first_check = loop {
        if let Some(event) = events_for(&harness, JobStarted::TYPE, "vm-pmk-01").first() {
            break event.clone();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    for delivery in 2..4 {
        let (status, _) = harness.invoke("track-job", &first_check, delivery).await;
        assert_eq!(status, 200);
    }
    idle(&harness).await;

    assert_eq!(backup_jobs(&harness, "vm-pmk-01").len(), 1);
    let completed = events_for(&harness, "vmbackup.backup.completed", "vm-pmk-01");
    assert_eq!(completed.len(), 1, "{completed:?}");
    // One chain: each check number was enqueued once.
    let mut checks: Vec<u64> = events_for(&harness, JobStarted::TYPE, "vm-pmk-01")
        .iter()
        .map(|e| e["data"]["checks"].as_u64().unwrap())
        .collect();
    let enqueued = checks.len();
    checks.sort_unstable();
    checks.dedup();
    assert_eq!(checks.len(), enqueued, "a check was enqueued twice");

    // A redelivery long after the job ended finds the job it started rather than starting another.
    let (status, _) = harness
        .invoke("trigger-backup", &serde_json::to_value(&ask).unwrap(), 3)
        .await;
    assert_eq!(status, 200);
    idle(&harness).await;
    let jobs = backup_jobs(&harness, "vm-pmk-01");
    assert_eq!(jobs.len(), 1);
    assert!(
        events_for(&harness, "vmbackup.backup.completed", "vm-pmk-01")
            .iter()
            .all(|e| e["data"]["jobId"] == jobs[0].id)
    );
    harness.stop().await;
}

// Two worker threads: the simulator, the host and the handler of 1,000 VMs share the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_requests_every_tagged_protected_vm_within_the_daily_limit() {
    let mut vms: Vec<Value> = (0..1000)
        .map(|i| {
            vm(
                &format!("vm-{i:04}"),
                json!({ "kind": "pmk" }),
                "ready",
                true,
            )
        })
        .collect();
    // Tagged but not protected (the discovery sweep's), and protected but untagged: not swept.
    vms.push(vm("vm-new-01", json!({ "kind": "pmk" }), "ready", false));
    let mut untagged = vm("vm-untagged-01", json!({ "kind": "pmk" }), "ready", true);
    untagged["tags"] = json!({});
    vms.push(untagged);
    // Both sweeps must fall on one simulated UTC day: the clock starts at 01:00 UTC and runs 100x
    // the wall clock (23 simulated hours are over 13 wall minutes; the scenario takes far less).
    // 30-second jobs end before their first status check, one minute after they start.
    let sim_start = DateTime::parse_from_rfc3339("2026-03-02T01:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let harness = Harness::start_at(
        &fleet_at_scale(vms, 30, 0.01),
        Options::default(),
        Some(sim_start),
    )
    .await;
    let start = harness.clock.now();

    // The first 200 VMs already had two on-demand backups today.
    harness.sim.with_state(|s| {
        let vault_id = s.recovery_vaults[0].id();
        for i in 0..200 {
            let name = format!("vm-{i:04}");
            let vm_id = vm_id(&name).to_string();
            for n in 0..2 {
                s.jobs.push(Job {
                    id: uuid::Uuid::new_v4().to_string(),
                    vault_id: vault_id.clone(),
                    operation: JobOperation::Backup,
                    vm_id: vm_id.clone(),
                    vm_name: name.clone(),
                    start: start - ChronoDuration::seconds(10 + n),
                    end: start - ChronoDuration::seconds(5),
                    failure: None,
                    restore: None,
                    expiry: None,
                    user_triggered: true,
                    property_bag: Default::default(),
                    finalized: true,
                });
            }
        }
    });

    harness.fire_timer("backup-sweep").await;
    let first: Vec<Value> = events_of(&harness, BackupRequested::TYPE);
    assert_eq!(first.len(), 1000);
    assert!(first.iter().all(|e| e["data"]["requestedBy"] == "sweep"));
    idle(&harness).await;
    // One completion per VM, each naming its own job.
    let completed = once_per_id(events_of(&harness, "vmbackup.backup.completed"));
    let completed_jobs: std::collections::HashSet<&str> = completed
        .iter()
        .map(|e| e["data"]["jobId"].as_str().unwrap())
        .collect();
    assert_eq!(completed.len(), 1000);
    assert_eq!(completed_jobs.len(), 1000);

    harness.fire_timer("backup-sweep").await;
    assert_eq!(start.date_naive(), harness.clock.now().date_naive());
    let second = events_of(&harness, BackupRequested::TYPE).len() - first.len();
    assert_eq!(second, 800, "the 200 VMs at the limit are left out");
    idle(&harness).await;
    let end = harness.clock.now();
    assert_eq!(
        start.date_naive(),
        end.date_naive(),
        "the scenario outgrew one simulated day"
    );
    let per_vm = harness.sim.with_state(|s| {
        let mut counts = std::collections::HashMap::<String, usize>::new();
        for job in s
            .jobs
            .iter()
            .filter(|j| j.operation == JobOperation::Backup)
        {
            *counts.entry(job.vm_name.clone()).or_default() += 1;
        }
        counts
    });
    // Exactly one backup per request: the 200 VMs at the limit have their 2 + 1, the others 2.
    assert_eq!(per_vm.len(), 1000);
    for (name, count) in &per_vm {
        let index: usize = name.trim_start_matches("vm-").parse().unwrap();
        let expected = if index < 200 { 3 } else { 2 };
        assert_eq!(*count, expected, "{name}");
    }
    assert_eq!(
        once_per_id(events_of(&harness, "vmbackup.backup.completed")).len(),
        1800
    );
    assert!(events_of(&harness, "vmbackup.backup.failed").is_empty());
    assert!(events_of(&harness, "vmbackup.backup.rejected").is_empty());
    harness.stop().await;
}
