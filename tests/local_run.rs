//! `vmbackup local` end to end: the binary, its state directory, its report.
//!
//! The dead-letter test delivers to a small handler served by this test process (`--handler-url`,
//! with a function app folder written here), so a malformed message meets a handler that fails it.
//! The other runs start the real `vmbackup serve` child on the checked-in app: a small fleet, a
//! kill-and-restart through protection, backup and restore, and the demo fleet checked against
//! `src/local/demo_expected.json`.

use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use vmbackup::clock::Clock;
use vmbackup::events::{queues, BackupCompleted, BackupRequested, CloudEvent};
use vmbackup::local::queue::{OutgoingMessage, Queue};
use vmbackup::runtime::{FunctionApp, FunctionSpec, Invocation, OutputBinding, Outputs, Trigger};

const SUB: &str = "11111111-1111-1111-1111-111111111111";

/// Two protected VMs, one untagged; backups asked for, a tag, a VM created, ADE enabled.
fn small_fleet() -> Value {
    json!({
        "subscriptions": [{
            "id": SUB,
            "recoveryVaults": [{ "name": "rsv", "resourceGroup": "rg-backup", "location": "westeurope",
                                 "policies": ["DefaultPolicy"] }],
            "keyVaults": [{ "name": "kv", "resourceGroup": "rg-sec", "location": "westeurope",
                            "keys": [{ "name": "kek" }], "secrets": [{ "name": "bek-b" }] }],
            "virtualMachines": [
                { "name": "vm-a", "resourceGroup": "rg", "location": "westeurope",
                  "tags": { "backup-policy": "DefaultPolicy" },
                  "protectedBy": { "vault": "rsv", "policy": "DefaultPolicy" } },
                { "name": "vm-b", "resourceGroup": "rg", "location": "westeurope",
                  "tags": { "backup-policy": "DefaultPolicy" },
                  "encryption": { "kind": "ade", "keyVault": "kv", "secret": "bek-b", "kek": "kek" },
                  "protectedBy": { "vault": "rsv", "policy": "DefaultPolicy" } },
                { "name": "vm-c", "resourceGroup": "rg", "location": "westeurope" }
            ]
        }],
        "timeline": [
            { "at": "10m", "action": "backup-now", "vm": "vm-a" },
            { "at": "20m", "action": "backup-now", "vm": "vm-b" },
            { "at": "25m", "action": "tag", "vm": "vm-c", "tags": { "owner": "ops" } },
            { "at": "30m", "action": "create-vm", "vm": { "name": "vm-d", "resourceGroup": "rg",
                                                           "location": "westeurope" } },
            { "at": "35m", "action": "enable-ade", "vm": "vm-a", "keyVault": "kv", "secret": "bek-a" },
            { "at": "60m", "action": "backup-now", "vm": "vm-a" },
            { "at": "90m", "action": "backup-now", "vm": "vm-b" }
        ],
        "simulation": { "timeScale": 0.001 }
    })
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "vmbackup-local-run-{name}-{}",
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

/// A handler for the machinery tests: every backup request "completes" (slowly enough that some
/// are in flight at any moment); a request that is not a backup request fails its delivery.
fn test_app() -> FunctionApp {
    FunctionApp::new().function(
        FunctionSpec::new("take-backup", Trigger::service_bus(queues::BACKUP_REQUESTS))
            .output(OutputBinding::service_bus("out", queues::OUTCOMES)),
        |inv: Invocation<CloudEvent<BackupRequested>>| async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let request = &inv.data;
            let completed = BackupCompleted {
                vm_id: request.data.vm_id.clone(),
                vault_id: vmbackup::domain::ResourceId::parse(&format!(
                    "/subscriptions/{SUB}/resourceGroups/rg-backup/providers/Microsoft.RecoveryServices/vaults/rsv"
                ))
                .unwrap(),
                job_id: format!("job-for-{}", request.id),
                status: "Completed".into(),
            };
            let mut outputs = Outputs::new();
            outputs.push("out", &request.follow(completed, "done", chrono::Utc::now()))?;
            Ok(outputs)
        },
    )
}

/// Serves [`test_app`] and writes its function app folder; returns (app dir, handler URL).
async fn start_test_handler(dir: &Path) -> (PathBuf, String) {
    let app = test_app();
    let app_dir = dir.join("app");
    vmbackup::runtime::package::AppFiles::render(&app)
        .write(&app_dir, &app_dir)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(vmbackup::runtime::serve_with_shutdown(
        listener,
        app,
        std::future::pending::<()>(),
    ));
    (app_dir, url)
}

fn local_command(args: &[String]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmbackup"));
    command
        .arg("local")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `vmbackup local ARGS` to its end; (exit code, stdout, stderr). On timeout the run is
/// killed and its output shown.
async fn run_local(args: &[String], timeout: Duration) -> (i32, String, String) {
    let child = local_command(args).spawn().unwrap();
    let pid = child.id();
    let output = tokio::time::timeout(timeout, child.wait_with_output()).await;
    match output {
        Ok(output) => {
            let output = output.unwrap();
            (
                output.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
        Err(_) => panic!("vmbackup local (pid {pid:?}) did not finish within {timeout:?}"),
    }
}

fn args(
    fleet: &Path,
    state: &Path,
    report: &Path,
    app: &Path,
    handler: Option<&str>,
) -> Vec<String> {
    let mut args = vec![
        "--fleet".to_string(),
        fleet.display().to_string(),
        "--state".into(),
        state.display().to_string(),
        "--report".into(),
        report.display().to_string(),
        "--until-idle".into(),
        "--app".into(),
        app.display().to_string(),
    ];
    if let Some(url) = handler {
        args.extend(["--handler-url".to_string(), url.to_string()]);
    }
    args
}

fn read_report(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn vm<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} in the report: {report:#}"))
}

/// The contract's report shape, field by field.
fn assert_contract_shape(report: &Value) {
    let vms = report["vms"].as_array().expect("vms is an array");
    assert!(!vms.is_empty());
    for vm in vms {
        assert!(vm["id"].as_str().unwrap().contains("/virtualMachines/"));
        assert!(vm["name"].is_string());
        let encryption = vm["encryption"].as_str().unwrap();
        assert!(["none", "pmk", "cmk", "host", "ade-bek", "ade-kek"].contains(&encryption));
        let protection = &vm["protection"];
        assert!(["protected", "rejected", "unprotected", "pending"]
            .contains(&protection["state"].as_str().unwrap()));
        for field in ["vault", "policy", "reason"] {
            assert!(
                protection.get(field).is_some(),
                "protection.{field} present"
            );
        }
        assert!(vm["backups"]["completed"].is_u64() && vm["backups"]["failed"].is_u64());
        for restore in vm["restores"].as_array().unwrap() {
            assert!(restore["ticket"].is_string());
            assert!(["completed", "rejected", "failed", "pending"]
                .contains(&restore["state"].as_str().unwrap()));
            assert!(restore.get("reason").is_some() && restore.get("restoredVmId").is_some());
            assert!(restore["adeReinstalled"].is_boolean());
        }
    }
    assert!(report["deadLettered"].is_u64());
    assert!(report["arm"]["requests"].is_u64() && report["arm"]["throttled"].is_u64());
}

fn events_of(state: &Path, event_type: &str) -> Vec<Value> {
    let queue = Queue::open(state, Clock::real()).unwrap();
    queue
        .journal_since(0)
        .unwrap()
        .into_iter()
        .filter_map(|e| serde_json::from_slice::<Value>(&e.body).ok())
        .filter(|v| v["type"] == event_type)
        .collect()
}

#[test]
fn demo_fleet_is_valid_and_covers_every_case() {
    use vmbackup::local::session::{DEMO_EXPECTED, DEMO_FLEET};
    use vmbackup::simulator::fleet::{
        EncryptionSpec, Fleet, KeyVaultAuthorization, TimelineAction,
    };
    let fleet = Fleet::from_json_str(DEMO_FLEET).expect("the demo fleet is valid");
    let expected: Value = serde_json::from_str(DEMO_EXPECTED).unwrap();
    let vms: Vec<_> = fleet
        .subscriptions
        .iter()
        .flat_map(|s| s.virtual_machines.iter())
        .collect();
    assert!(vms.len() >= 12);
    assert_eq!(fleet.subscriptions.len(), 2);
    let regions: BTreeSet<_> = vms.iter().map(|v| v.location.as_str()).collect();
    assert!(regions.len() >= 2);

    // Every VM (at start or created later) has an expected outcome, and nothing else does.
    let created: Vec<String> = fleet
        .timeline
        .iter()
        .filter_map(|e| match &e.action {
            TimelineAction::CreateVm { vm } => Some(vm.name.clone()),
            _ => None,
        })
        .collect();
    let names: BTreeSet<String> = vms.iter().map(|v| v.name.clone()).chain(created).collect();
    let expected_vms = expected["vms"].as_array().unwrap();
    let expected_names: BTreeSet<String> = expected_vms
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, expected_names);

    let encryptions: BTreeSet<&str> = expected_vms
        .iter()
        .map(|v| v["encryption"].as_str().unwrap())
        .collect();
    for kind in ["pmk", "cmk", "host", "ade-bek", "ade-kek"] {
        assert!(encryptions.contains(kind), "{kind} is covered");
    }
    let reasons: BTreeSet<&str> = expected_vms
        .iter()
        .filter_map(|v| v["protection"]["reason"].as_str())
        .collect();
    for reason in [
        "NoVaultInRegion",
        "UnknownPolicy",
        "CertificateBackedKey",
        "VmAgentNotReady",
        "KeyVaultAccessNotGranted",
    ] {
        assert!(reasons.contains(reason), "{reason} is covered");
    }
    // ADE VMs use both access-policy and RBAC key vaults; one vault refuses the app.
    let vault_of = |name: &str| {
        fleet
            .subscriptions
            .iter()
            .flat_map(|s| s.key_vaults.iter())
            .find(|k| k.name == name)
            .unwrap()
    };
    let ade_vaults: Vec<_> = vms
        .iter()
        .filter_map(|v| match &v.encryption {
            EncryptionSpec::Ade { key_vault, .. } => Some(vault_of(key_vault)),
            _ => None,
        })
        .collect();
    assert!(ade_vaults
        .iter()
        .any(|k| k.authorization == KeyVaultAuthorization::Rbac));
    assert!(ade_vaults
        .iter()
        .any(|k| k.authorization == KeyVaultAuthorization::AccessPolicies));
    assert!(ade_vaults.iter().any(|k| !k.app_can_manage_access));

    // The timeline's cases.
    let actions: Vec<&TimelineAction> = fleet.timeline.iter().map(|e| &e.action).collect();
    let has = |pred: &dyn Fn(&TimelineAction) -> bool| actions.iter().any(|a| pred(a));
    assert!(has(&|a| matches!(a, TimelineAction::Tag { .. })));
    assert!(has(&|a| matches!(a, TimelineAction::EnableAde { .. })));
    assert!(has(&|a| matches!(a, TimelineAction::BackupNow { .. })));
    let restore_reasons: BTreeSet<&str> = expected_vms
        .iter()
        .flat_map(|v| v["restores"].as_array().unwrap())
        .filter_map(|r| r["reason"].as_str())
        .collect();
    for reason in [
        "ReplaceExistingUnsupported",
        "FileLevelRestoreUnsupported",
        "CrossSubscriptionRestore",
    ] {
        assert!(restore_reasons.contains(reason), "{reason} is covered");
    }
    // Completed restores: Linux ADE with KEK, Windows ADE BEK-only, CMK.
    let completed_kinds: BTreeSet<&str> = expected_vms
        .iter()
        .filter(|v| {
            v["restores"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["state"] == "completed")
        })
        .map(|v| v["encryption"].as_str().unwrap())
        .collect();
    for kind in ["ade-kek", "ade-bek", "cmk"] {
        assert!(completed_kinds.contains(kind));
    }
    // A KEK is deleted before the restore of a VM that uses it.
    let deleted = fleet.timeline.iter().find_map(|e| match &e.action {
        TimelineAction::DeleteKey { key, .. } => Some((e.at, key.clone())),
        _ => None,
    });
    let (deleted_at, kek) = deleted.expect("a KEK is deleted");
    let owner = vms
        .iter()
        .find(|v| matches!(&v.encryption, EncryptionSpec::Ade { kek: Some(k), .. } if *k == kek))
        .expect("a VM uses the deleted KEK");
    assert!(fleet.timeline.iter().any(|e| e.at > deleted_at
        && matches!(&e.action, TimelineAction::RestoreRequest { vm, .. } if *vm == owner.name)));
}

#[tokio::test]
async fn a_bad_fleet_file_exits_2_naming_the_field() {
    let dir = scratch("bad-fleet");
    let fleet = dir.join("fleet.json");
    write_json(
        &fleet,
        &json!({ "subscriptions": [{ "id": "not-a-guid" }] }),
    );
    let (code, _, stderr) = run_local(
        &[
            "--fleet".into(),
            fleet.display().to_string(),
            "--state".into(),
            dir.join("state").display().to_string(),
            "--until-idle".into(),
        ],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("subscriptions[0].id"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_binary_runs_a_small_fleet_to_idle_with_its_own_handler_child_and_reports() {
    let dir = scratch("small");
    let fleet = dir.join("fleet.json");
    write_json(&fleet, &small_fleet());
    let report_path = dir.join("report.json");
    let state = dir.join("state");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, stdout, stderr) = run_local(
        &args(&fleet, &state, &report_path, repo, None),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let report = read_report(&report_path);
    assert_contract_shape(&report);
    assert_eq!(report["vms"].as_array().unwrap().len(), 4, "{report:#}");
    assert_eq!(vm(&report, "vm-a")["protection"]["state"], "protected");
    assert_eq!(vm(&report, "vm-a")["protection"]["vault"], "rsv");
    assert_eq!(
        vm(&report, "vm-a")["encryption"],
        "ade-bek",
        "ADE enabled at 35m"
    );
    assert_eq!(vm(&report, "vm-b")["encryption"], "ade-kek");
    assert_eq!(vm(&report, "vm-d")["encryption"], "pmk");
    // The summary table names every VM.
    for name in ["vm-a", "vm-b", "vm-c", "vm-d"] {
        assert!(stdout.contains(name), "{stdout}");
    }
    // A second start on the same state with another fleet is refused.
    let mut other = small_fleet();
    other["timeline"] = json!([]);
    write_json(&fleet, &other);
    let (code, _, stderr) = run_local(
        &args(&fleet, &state, &report_path, repo, None),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("another fleet"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_malformed_message_is_dead_lettered_after_its_retries_and_the_rest_completes() {
    let dir = scratch("malformed");
    let (app, handler) = start_test_handler(&dir).await;
    let fleet = dir.join("fleet.json");
    write_json(&fleet, &small_fleet());
    let state = dir.join("state");
    {
        // Put on the queue before the run, as a broken client would.
        let queue = Queue::open(&state, Clock::real()).unwrap();
        queue
            .create_queue(queues::BACKUP_REQUESTS, &Default::default())
            .unwrap();
        queue
            .send(queues::BACKUP_REQUESTS, &OutgoingMessage::new("{not json"))
            .unwrap();
    }
    let report_path = dir.join("report.json");
    let (code, stdout, stderr) = run_local(
        &args(&fleet, &state, &report_path, &app, Some(&handler)),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let report = read_report(&report_path);
    assert_eq!(report["deadLettered"], 1, "{report:#}");
    assert_eq!(vm(&report, "vm-a")["backups"]["completed"], 2);
    assert_eq!(vm(&report, "vm-b")["backups"]["completed"], 2);
    let queue = Queue::open(&state, Clock::real()).unwrap();
    let dead = queue.dead_letters(queues::BACKUP_REQUESTS).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "MaxDeliveryCountExceeded");
    assert_eq!(dead[0].delivery_count, 10);
    assert_eq!(dead[0].body, b"{not json");
    assert!(
        stdout.contains("dead-lettered: MaxDeliveryCountExceeded"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// For the restart test through the real workflow: a VM to protect, an ADE VM already protected,
/// on-demand backups of both, then a restore of the ADE VM (jobs short enough to end before the
/// nightly sweep, 2 simulated hours in).
fn restart_fleet() -> Value {
    json!({
        "subscriptions": [{
            "id": SUB,
            "recoveryVaults": [{ "name": "rsv", "resourceGroup": "rg-backup", "location": "westeurope",
                                 "policies": ["DefaultPolicy"] }],
            "keyVaults": [{ "name": "kv", "resourceGroup": "rg-sec", "location": "westeurope",
                            "backupAccess": true,
                            "keys": [{ "name": "kek" }], "secrets": [{ "name": "bek-b" }] }],
            "storageAccounts": [{ "name": "ststaging", "resourceGroup": "rg-backup", "location": "westeurope" }],
            "virtualMachines": [
                { "name": "vm-a", "resourceGroup": "rg", "location": "westeurope",
                  "tags": { "backup-policy": "DefaultPolicy" } },
                { "name": "vm-b", "resourceGroup": "rg", "location": "westeurope", "os": "linux",
                  "tags": { "backup-policy": "DefaultPolicy" },
                  "encryption": { "kind": "ade", "keyVault": "kv", "secret": "bek-b", "kek": "kek" },
                  "protectedBy": { "vault": "rsv", "policy": "DefaultPolicy" } },
                { "name": "vm-c", "resourceGroup": "rg", "location": "westeurope" }
            ]
        }],
        "timeline": [
            { "at": "10m", "action": "backup-now", "vm": "vm-b" },
            { "at": "15m", "action": "backup-now", "vm": "vm-a" },
            { "at": "50m", "action": "restore-request", "vm": "vm-b", "ticket": "INC-7",
              "mode": "restore-disks", "recoveryPoint": "latest" }
        ],
        "simulation": { "timeScale": 0.001, "backupJobSeconds": 1800, "restoreJobSeconds": 1200 }
    })
}

/// `(operation, VM)` of every job the simulator ran, from the estate saved under `--state`.
fn simulated_jobs(state: &Path) -> Vec<(String, String)> {
    let saved: Value =
        serde_json::from_slice(&std::fs::read(state.join("simulator.json")).unwrap()).unwrap();
    let mut jobs: Vec<(String, String)> = saved["state"]["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| {
            (
                job["operation"].as_str().unwrap().to_string(),
                job["vm_name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    jobs.sort();
    jobs
}

fn restore_job_in_flight(state: &Path) -> bool {
    state.join("servicebus.sqlite").exists()
        && events_of(state, "vmbackup.job.started")
            .iter()
            .any(|e| e["data"]["job"]["operation"] == "restore")
}

/// The real workflow (the `vmbackup serve` child on the checked-in app), killed while a restore
/// job is in flight and started again on the same state: the same report, the same jobs.
#[tokio::test]
async fn killed_and_restarted_with_the_same_state_it_ends_in_the_same_report() {
    let dir = scratch("restart");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fleet = dir.join("fleet.json");
    write_json(&fleet, &restart_fleet());

    // The reference: one uninterrupted run.
    let reference_state = dir.join("reference");
    let reference_report = dir.join("reference.json");
    let (code, stdout, stderr) = run_local(
        &args(&fleet, &reference_state, &reference_report, repo, None),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let reference = read_report(&reference_report);
    assert_eq!(vm(&reference, "vm-a")["protection"]["state"], "protected");
    let restore = &vm(&reference, "vm-b")["restores"][0];
    assert_eq!(
        (
            &restore["ticket"],
            &restore["state"],
            &restore["adeReinstalled"]
        ),
        (&json!("INC-7"), &json!("completed"), &json!(true)),
        "{reference:#}"
    );

    // The same fleet, killed while the restore job runs, then started again.
    let state = dir.join("state");
    let report_path = dir.join("report.json");
    let run_args = args(&fleet, &state, &report_path, repo, None);
    let mut child = local_command(&run_args).spawn().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !restore_job_in_flight(&state) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no restore job started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().await.unwrap();
    assert!(!report_path.exists(), "killed before the end");
    let (code, stdout, stderr) = run_local(&run_args, Duration::from_secs(120)).await;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");

    let restarted = read_report(&report_path);
    // ARM request counts differ (a restart re-reads); everything the run decided is the same.
    assert_eq!(reference["vms"], restarted["vms"], "{restarted:#}");
    assert_eq!(reference["deadLettered"], restarted["deadLettered"]);
    // No backup or restore job lost or run twice.
    assert_eq!(simulated_jobs(&reference_state), simulated_jobs(&state));
    // No timeline request was sent twice and none was lost.
    let requested = events_of(&state, "vmbackup.backup.requested");
    let ids: BTreeSet<_> = requested.iter().map(|e| e["id"].to_string()).collect();
    assert_eq!((requested.len(), ids.len()), (2, 2));
    assert_eq!(events_of(&state, "vmbackup.restore.requested").len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The demo fleet through the real workflow, checked against the outcomes it is built to produce.
/// Skips until the workflow's functions are declared in `functions/`.
#[tokio::test]
async fn the_demo_fleet_ends_as_it_is_built_to() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let needed = [
        "discovery-sweep",
        "assess-vm",
        "trigger-backup",
        "start-restore",
    ];
    let missing: Vec<_> = needed
        .iter()
        .filter(|f| {
            !repo
                .join("functions")
                .join(f)
                .join("function.json")
                .is_file()
                && !repo.join(f).join("function.json").is_file()
        })
        .collect();
    if !missing.is_empty() {
        println!("SKIPPED: workflow functions {missing:?} missing from functions/");
        return;
    }
    let dir = scratch("demo");
    let report_path = dir.join("report.json");
    let (code, stdout, stderr) = run_local(
        &[
            "--state".into(),
            dir.join("state").display().to_string(),
            "--report".into(),
            report_path.display().to_string(),
            "--until-idle".into(),
        ],
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let report = read_report(&report_path);
    assert_contract_shape(&report);
    let expected: Value = serde_json::from_str(vmbackup::local::session::DEMO_EXPECTED).unwrap();
    let mut mismatches = Vec::new();
    for want in expected["vms"].as_array().unwrap() {
        let name = want["name"].as_str().unwrap();
        let got = vm(&report, name);
        if got["encryption"] != want["encryption"] {
            mismatches.push(format!(
                "{name}: encryption {} (want {})",
                got["encryption"], want["encryption"]
            ));
        }
        for field in ["state", "vault", "policy", "reason"] {
            if got["protection"][field] != want["protection"][field] {
                mismatches.push(format!(
                    "{name}: protection.{field} {} (want {})",
                    got["protection"][field], want["protection"][field]
                ));
            }
        }
        let completed = got["backups"]["completed"].as_u64().unwrap();
        if completed < want["minBackupsCompleted"].as_u64().unwrap()
            || got["backups"]["failed"] != 0
        {
            mismatches.push(format!(
                "{name}: backups {} (want at least {} and none failed)",
                got["backups"], want["minBackupsCompleted"]
            ));
        }
        let restores: HashMap<&str, &Value> = got["restores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["ticket"].as_str().unwrap(), r))
            .collect();
        let want_restores = want["restores"].as_array().unwrap();
        if restores.len() != want_restores.len() {
            mismatches.push(format!(
                "{name}: {} restores (want {})",
                restores.len(),
                want_restores.len()
            ));
        }
        for want_restore in want_restores {
            let ticket = want_restore["ticket"].as_str().unwrap();
            let Some(got_restore) = restores.get(ticket) else {
                mismatches.push(format!("{name}: no restore {ticket}"));
                continue;
            };
            for field in ["state", "reason", "adeReinstalled"] {
                if got_restore[field] != want_restore[field] {
                    mismatches.push(format!(
                        "{name} {ticket}: {field} {} (want {})",
                        got_restore[field], want_restore[field]
                    ));
                }
            }
            if want_restore["state"] == "completed" && !got_restore["restoredVmId"].is_string() {
                mismatches.push(format!("{name} {ticket}: no restoredVmId"));
            }
        }
    }
    if report["deadLettered"] != expected["deadLettered"] {
        mismatches.push(format!("deadLettered {}", report["deadLettered"]));
    }
    assert!(
        mismatches.is_empty(),
        "{}\n\n{stdout}",
        mismatches.join("\n")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
