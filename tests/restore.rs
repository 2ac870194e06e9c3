//! Restore choreography end to end against the simulator, through the real chain: start-restore →
//! job.started → track-job → restore.disks-restored → recreate-vm → restore.vm-recreated →
//! reinstall-ade → restore.completed → notify (POST to the ticket's callback, served by this test).
//! Also: the reason codes of start-restore, the webhook (direct and through the host's front door),
//! `vmbackup restore` against the local Service Bus endpoint, and one restore per ticket.

mod support;

use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use support::{Callbacks, Harness, Options};
use vmbackup::azure::backup::ProtectedItemRef;
use vmbackup::domain::restore::RestoreRequestFields;
use vmbackup::events::{queues, CloudEvent};
use vmbackup::simulator::fleet::TimelineAction;
use vmbackup::workflow::settings;

const SUB: &str = "11111111-1111-1111-1111-111111111111";
const OTHER_SUB: &str = "22222222-2222-2222-2222-222222222222";

fn fleet() -> String {
    let protected = json!({ "vault": "rsv-weu", "policy": "DefaultPolicy" });
    let vm = |name: &str, os: &str, encryption: Value, protected_by: Value| {
        json!({ "name": name, "resourceGroup": "rg-app", "location": "westeurope", "os": os,
                "encryption": encryption, "dataDisks": 2, "agent": "ready", "powerState": "running",
                "protectedBy": protected_by })
    };
    json!({
        "subscriptions": [{
            "id": SUB,
            "recoveryVaults": [{ "name": "rsv-weu", "resourceGroup": "rg-backup", "location": "westeurope",
                                 "policies": ["DefaultPolicy"] }],
            "keyVaults": [
                { "name": "kv-ade-weu", "resourceGroup": "rg-sec", "location": "westeurope",
                  "authorization": "accessPolicies", "backupAccess": true,
                  "keys": [{ "name": "kek-1" }, { "name": "kek-2" }],
                  "secrets": [{ "name": "bek-lin" }, { "name": "bek-win" }, { "name": "bek-gone" }] },
                { "name": "kv-cmk-weu", "resourceGroup": "rg-sec", "location": "westeurope",
                  "authorization": "rbac", "backupAccess": true, "keys": [{ "name": "cmk-1" }] }
            ],
            "diskEncryptionSets": [{ "name": "des-weu", "resourceGroup": "rg-sec", "location": "westeurope",
                                     "keyVault": "kv-cmk-weu", "key": "cmk-1" }],
            "storageAccounts": [{ "name": "stweustaging", "resourceGroup": "rg-backup", "location": "westeurope" },
                                { "name": "stneustaging", "resourceGroup": "rg-backup", "location": "northeurope" },
                                { "name": "stneuspare", "resourceGroup": "rg-backup", "location": "northeurope" }],
            "virtualMachines": [
                vm("vm-lin-kek", "linux", json!({ "kind": "ade", "keyVault": "kv-ade-weu", "secret": "bek-lin", "kek": "kek-1" }), protected.clone()),
                vm("vm-win-bek", "windows", json!({ "kind": "ade", "keyVault": "kv-ade-weu", "secret": "bek-win" }), protected.clone()),
                vm("vm-lin-gone", "linux", json!({ "kind": "ade", "keyVault": "kv-ade-weu", "secret": "bek-gone", "kek": "kek-2" }), protected.clone()),
                vm("vm-cmk", "linux", json!({ "kind": "cmk", "diskEncryptionSet": "des-weu" }), protected.clone()),
                vm("vm-plain", "linux", json!({ "kind": "pmk" }), protected.clone()),
                vm("vm-unprotected", "linux", json!({ "kind": "pmk" }), Value::Null),
                json!({ "name": "vm-host", "resourceGroup": "rg-host", "location": "westeurope", "os": "windows",
                        "encryption": { "kind": "host" }, "dataDisks": 1, "tags": { "owner": "ops" }, "protectedBy": protected })
            ]
        }],
        "simulation": { "timeScale": 0.001, "backupJobSeconds": 120, "restoreJobSeconds": 600 }
    })
    .to_string()
}

fn vm_id(name: &str) -> String {
    format!("/subscriptions/{SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/{name}")
}

fn vault_id() -> String {
    format!("/subscriptions/{SUB}/resourceGroups/rg-backup/providers/Microsoft.RecoveryServices/vaults/rsv-weu")
}

fn staging() -> String {
    format!("/subscriptions/{SUB}/resourceGroups/rg-backup/providers/Microsoft.Storage/storageAccounts/stweustaging")
}

async fn start() -> (Harness, Callbacks) {
    let settings = HashMap::from([(settings::STAGING_STORAGE_ACCOUNT.to_string(), staging())]);
    let harness = Harness::start_with(&fleet(), Options { settings }).await;
    (harness, Callbacks::serve().await)
}

fn request(callbacks: &Callbacks, vm: &str, ticket: &str) -> RestoreRequestFields {
    RestoreRequestFields {
        ticket_id: Some(ticket.into()),
        vm_id: Some(vm_id(vm)),
        callback_url: Some(callbacks.url(ticket)),
        ..Default::default()
    }
}

fn send_request(h: &Harness, fields: RestoreRequestFields) {
    let ticket = fields.ticket_id.clone().unwrap_or_default();
    let subject = fields.vm_id.clone();
    let event = CloudEvent::start(fields, subject, h.clock.now()).with_ticket(ticket);
    h.send(&event);
}

/// Poll (wall time) until `check` yields a value.
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn events_for(h: &Harness, event_type: &str, ticket: &str) -> Vec<Value> {
    h.events_of(event_type)
        .into_iter()
        .filter(|e| e["ticketid"] == ticket || e["data"]["ticketId"] == ticket)
        .collect()
}

async fn one_event(h: &Harness, event_type: &str, ticket: &str) -> Value {
    eventually(&format!("{event_type} of {ticket}"), || {
        events_for(h, event_type, ticket).into_iter().next()
    })
    .await
}

/// Until nothing is running, in flight or scheduled (restore jobs are tracked by scheduled checks).
async fn idle(h: &Harness) {
    assert!(
        h.wait_idle(Duration::from_secs(60)).await,
        "the workflow did not come to rest"
    );
}

/// An on-demand backup, so the VM has a recovery point.
async fn back_up(h: &Harness, vm: &str) {
    let id = h.sim.with_state(|s| s.vm_by_name(vm).unwrap().id());
    let item = ProtectedItemRef::for_vm(&vault_id(), &id).unwrap();
    let job = h
        .deps
        .backup
        .trigger_backup(&item, None)
        .await
        .unwrap()
        .unwrap();
    eventually("the backup job", || {
        h.sim.with_state(|s| {
            s.jobs
                .iter()
                .any(|j| j.id == job && j.finalized)
                .then_some(())
        })
    })
    .await;
}

/// Deliver `event` to `function` again (delivery count 2) and answer the messages it outputs.
async fn redelivered(h: &Harness, function: &str, event: &Value) -> Vec<Value> {
    let (status, answer) = h.invoke(function, event, 2).await;
    assert_eq!(status, 200, "{function}: {answer}");
    answer["Outputs"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|v| v.as_array().cloned().unwrap_or_default())
        .collect()
}

/// No restore failed and no message was dead-lettered.
fn assert_nothing_failed(h: &Harness) {
    let failed = h.events_of("vmbackup.restore.failed");
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(h.queue.dead_letter_count().unwrap(), 0);
}

struct Restored {
    completed: Value,
    encryption_info_blob: Option<String>,
}

/// One ticket from request to `restore.completed`, through the whole chain.
async fn restore(h: &Harness, fields: RestoreRequestFields) -> Restored {
    let ticket = fields.ticket_id.clone().unwrap();
    send_request(h, fields);
    idle(h).await;
    let started = events_for(h, "vmbackup.job.started", &ticket);
    assert!(!started.is_empty(), "track-job follows the restore job");
    let disks = one_event(h, "vmbackup.restore.disks-restored", &ticket).await;
    one_event(h, "vmbackup.restore.vm-recreated", &ticket).await;
    let completed = one_event(h, "vmbackup.restore.completed", &ticket).await;
    Restored {
        completed,
        encryption_info_blob: disks["data"]["encryptionInfoBlobUri"]
            .as_str()
            .map(str::to_string),
    }
}

/// A disk: size, BEK secret URL, KEK URL, disk encryption set.
type DiskFacts = (u32, Option<String>, Option<String>, Option<String>);

struct VmFacts {
    size: String,
    os: String,
    disks: Vec<DiskFacts>,
    extensions: Vec<(String, String, Value)>,
}

fn facts(h: &Harness, name: &str) -> VmFacts {
    h.sim.with_state(|s| {
        let vm = s
            .vm_by_name(name)
            .unwrap_or_else(|| panic!("VM {name} exists"));
        let disks = std::iter::once(&vm.os_disk)
            .chain(vm.data_disks.iter())
            .map(|d| {
                let disk = s.disk(&vm.subscription, &vm.resource_group, d).unwrap();
                (
                    disk.size_gb,
                    disk.ade.as_ref().map(|a| a.secret_url.clone()),
                    disk.ade.as_ref().and_then(|a| a.key_url.clone()),
                    disk.disk_encryption_set_id.clone(),
                )
            })
            .collect();
        VmFacts {
            size: vm.size.clone(),
            os: format!("{:?}", vm.os),
            disks,
            extensions: vm
                .extensions
                .iter()
                .map(|e| {
                    (
                        e.extension_type.clone(),
                        e.type_handler_version.clone(),
                        e.settings.clone(),
                    )
                })
                .collect(),
        }
    })
}

fn blob_exists(h: &Harness, uri: &str) -> bool {
    let path = uri.split("/blob/").nth(1).unwrap().to_string();
    h.sim.with_state(|s| {
        s.blobs
            .keys()
            .any(|k| k.eq_ignore_ascii_case(&path) || k.ends_with(&path))
    })
}

/// Same size, OS and disks with the same encryption settings. The BEK secret itself may be a new
/// one: reinstalling ADE stamps the disks with the secret it writes, in the same vault.
fn assert_like_original(original: &VmFacts, restored: &VmFacts) {
    assert_eq!(restored.size, original.size);
    assert_eq!(restored.os, original.os);
    let vault_of = |secret: &Option<String>| {
        secret
            .as_ref()
            .map(|s| s.split("/secrets/").next().unwrap().to_string())
    };
    let shape = |facts: &VmFacts| -> Vec<_> {
        facts
            .disks
            .iter()
            .map(|(size, secret, kek, des)| (*size, vault_of(secret), kek.clone(), des.clone()))
            .collect()
    };
    assert_eq!(
        shape(restored),
        shape(original),
        "same disks, same encryption settings"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ade_and_cmk_vms_are_restored_end_to_end() {
    let (h, cb) = start().await;
    for vm in ["vm-lin-kek", "vm-win-bek", "vm-lin-gone", "vm-cmk"] {
        back_up(&h, vm).await;
    }

    // Linux ADE with a KEK.
    let original = facts(&h, "vm-lin-kek");
    // The ticket system answers 500 twice before it takes the outcome.
    cb.fail_next("INC-1001", 2);
    let done = restore(&h, request(&cb, "vm-lin-kek", "INC-1001")).await;
    let restored_id = done.completed["data"]["restoredVmId"].as_str().unwrap();
    assert!(
        restored_id.ends_with("/virtualMachines/vm-lin-kek-restored-inc-1001"),
        "{restored_id}"
    );
    assert_eq!(done.completed["data"]["adeReinstalled"], true);
    assert_eq!(done.completed["data"]["callbackUrl"], cb.url("INC-1001"));
    let calls = cb.calls_for("INC-1001");
    assert_eq!(
        calls.iter().map(|c| c.status).collect::<Vec<_>>(),
        [500, 500, 200],
        "notify retries the callback until it takes the outcome"
    );
    assert!(calls
        .iter()
        .all(|c| c.event["type"] == "vmbackup.restore.completed"
            && c.event["id"] == done.completed["id"]));
    let notified: Vec<Value> = h
        .events_of("vmbackup.restore.completed")
        .into_iter()
        .filter(|e| e["ticketid"] == "INC-1001" && e["data"]["restoredVmId"] == restored_id)
        .collect();
    assert_eq!(
        notified.len(),
        2,
        "the outcome, and its copy on notifications"
    );
    assert!(
        notified.iter().all(|e| e.get("callbackerror").is_none()),
        "{notified:?}"
    );
    let restored = facts(&h, "vm-lin-kek-restored-inc-1001");
    assert_like_original(&original, &restored);
    assert!(
        restored
            .disks
            .iter()
            .all(|d| d.1.is_some() && d.2.is_some()),
        "BEK and KEK on every disk"
    );
    let (ext_type, version, settings) = restored
        .extensions
        .iter()
        .find(|e| e.0.starts_with("AzureDiskEncryption"))
        .expect("ADE extension installed")
        .clone();
    assert_eq!(
        (ext_type.as_str(), version.as_str()),
        ("AzureDiskEncryptionForLinux", "1.1")
    );
    assert!(settings["KeyEncryptionKeyURL"]
        .as_str()
        .unwrap()
        .contains("/keys/kek-1/"));
    assert_eq!(settings["VolumeType"], "All");
    assert_eq!(settings["EncryptionOperation"], "EnableEncryption");
    assert!(
        settings["KeyVaultURL"]
            .as_str()
            .unwrap()
            .ends_with("/keyvault/kv-ade-weu/"),
        "{settings}"
    );
    let info = done
        .encryption_info_blob
        .expect("an ADE restore writes encryption info");
    assert!(
        !blob_exists(&h, &info),
        "the encryption-info blob is deleted"
    );

    // Windows ADE, BEK only.
    let original = facts(&h, "vm-win-bek");
    let done = restore(&h, request(&cb, "vm-win-bek", "INC-1002")).await;
    let restored = facts(&h, "vm-win-bek-restored-inc-1002");
    assert_like_original(&original, &restored);
    assert!(restored
        .disks
        .iter()
        .all(|d| d.1.is_some() && d.2.is_none()));
    let ext = restored
        .extensions
        .iter()
        .find(|e| e.0.starts_with("AzureDiskEncryption"))
        .expect("ADE extension installed");
    assert_eq!(
        (ext.0.as_str(), ext.1.as_str()),
        ("AzureDiskEncryption", "2.2")
    );
    assert!(ext.2.get("KeyEncryptionKeyURL").is_none());
    assert!(!blob_exists(&h, &done.encryption_info_blob.unwrap()));

    // The KEK and the BEK secret were deleted after the backup: put back before the VM.
    h.sim
        .apply(&TimelineAction::DeleteKey {
            key_vault: "kv-ade-weu".into(),
            key: "kek-2".into(),
        })
        .unwrap();
    h.sim
        .apply(&TimelineAction::DeleteSecret {
            key_vault: "kv-ade-weu".into(),
            secret: "bek-gone".into(),
        })
        .unwrap();
    let original = facts(&h, "vm-lin-gone");
    restore(&h, request(&cb, "vm-lin-gone", "INC-1003")).await;
    let (key_back, secret_back) = h.sim.with_state(|s| {
        let kv = s.key_vault_by_name("kv-ade-weu").unwrap();
        (kv.key("kek-2").is_some(), kv.secret("bek-gone").is_some())
    });
    assert!(
        key_back && secret_back,
        "KEK and BEK restored from the recovery point"
    );
    let restored = facts(&h, "vm-lin-gone-restored-inc-1003");
    assert_like_original(&original, &restored);
    let restore_writes: Vec<String> = h
        .sim
        .request_log()
        .iter()
        .filter(|r| {
            r.method == "POST"
                && (r.path.ends_with("/keys/restore") || r.path.ends_with("/secrets/restore"))
        })
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(restore_writes.len(), 2, "{restore_writes:?}");

    // CMK: no ADE step, the disks keep their disk encryption set.
    let original = facts(&h, "vm-cmk");
    let done = restore(&h, request(&cb, "vm-cmk", "INC-1004")).await;
    assert_eq!(done.completed["data"]["adeReinstalled"], false);
    assert!(done.encryption_info_blob.is_none());
    let restored = facts(&h, "vm-cmk-restored-inc-1004");
    assert_like_original(&original, &restored);
    assert!(restored
        .disks
        .iter()
        .all(|d| d.3.as_deref().is_some_and(|des| des.ends_with("/des-weu"))));
    assert!(restored
        .extensions
        .iter()
        .all(|e| !e.0.starts_with("AzureDiskEncryption")));
    assert_nothing_failed(&h);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_ticket_twice_makes_one_restore_job_and_one_vm() {
    let (h, cb) = start().await;
    back_up(&h, "vm-lin-kek").await;
    send_request(&h, request(&cb, "vm-lin-kek", "INC-2001"));
    one_event(&h, "vmbackup.job.started", "INC-2001").await;
    // Again while the first is in flight (the job runs 600 simulated seconds).
    send_request(&h, request(&cb, "vm-lin-kek", "INC-2001"));
    idle(&h).await;
    one_event(&h, "vmbackup.restore.completed", "INC-2001").await;
    // And once more after it is done.
    send_request(&h, request(&cb, "vm-lin-kek", "INC-2001"));
    idle(&h).await;
    // track-job's status checks travel as `job.started` too: one job id among them.
    let tracked: std::collections::BTreeSet<String> =
        events_for(&h, "vmbackup.job.started", "INC-2001")
            .iter()
            .map(|e| e["data"]["jobId"].as_str().unwrap().to_string())
            .collect();
    assert_eq!(tracked.len(), 1, "{tracked:?}");
    assert!(events_for(&h, "vmbackup.restore.rejected", "INC-2001").is_empty());
    let (restore_jobs, restored_vms, tagged) = h.sim.with_state(|s| {
        (
            s.jobs
                .iter()
                .filter(|j| j.operation == vmbackup::simulator::state::JobOperation::Restore)
                .count(),
            s.vms
                .iter()
                .filter(|v| v.name.starts_with("vm-lin-kek-restored"))
                .count(),
            s.vm_by_name("vm-lin-kek")
                .unwrap()
                .tags
                .keys()
                .any(|k| k.starts_with("vmbackup-restore")),
        )
    });
    assert_eq!((restore_jobs, restored_vms), (1, 1));
    assert!(
        !tagged,
        "the ticket tag is removed once the restore completed"
    );
    assert_eq!(h.queue.dead_letter_count().unwrap(), 0);

    // The later steps delivered again (at least once): same outcome, same ids, nothing new.
    for (function, input, output_type) in [
        (
            "recreate-vm",
            "vmbackup.restore.disks-restored",
            "vmbackup.restore.vm-recreated",
        ),
        (
            "reinstall-ade",
            "vmbackup.restore.vm-recreated",
            "vmbackup.restore.completed",
        ),
    ] {
        let first = one_event(&h, input, "INC-2001").await;
        let outputs = redelivered(&h, function, &first).await;
        let original = one_event(&h, output_type, "INC-2001").await;
        assert_eq!(outputs.len(), 1, "{function}: {outputs:?}");
        assert_eq!(outputs[0]["type"], output_type);
        assert_eq!(outputs[0]["id"], original["id"], "{function}");
    }
    let vms_after = h.sim.with_state(|s| {
        s.vms
            .iter()
            .filter(|v| v.name.starts_with("vm-lin-kek-restored"))
            .count()
    });
    assert_eq!(vms_after, 1);

    let calls = cb.calls_for("INC-2001");
    assert_eq!(calls.len(), 1, "one outcome for the ticket: {calls:?}");
    assert_eq!(calls[0].event["type"], "vmbackup.restore.completed");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reason_code_is_a_rejection() {
    let (h, cb) = start().await;
    back_up(&h, "vm-lin-kek").await;
    back_up(&h, "vm-plain").await;
    let other_vm = format!("/subscriptions/{OTHER_SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/vm-x");
    let cases: Vec<(RestoreRequestFields, &str)> = vec![
        (
            RestoreRequestFields {
                vm_id: Some(other_vm),
                ..request(&cb, "vm-lin-kek", "REJ-1")
            },
            "ScopeNotAllowed",
        ),
        (
            RestoreRequestFields {
                target_resource_group: Some(format!(
                    "/subscriptions/{OTHER_SUB}/resourceGroups/rg"
                )),
                ..request(&cb, "vm-lin-kek", "REJ-2")
            },
            "CrossSubscriptionRestore",
        ),
        (request(&cb, "vm-unprotected", "REJ-3"), "NotProtected"),
        (
            RestoreRequestFields {
                recovery_point: Some("2001-01-01T00:00:00Z".into()),
                ..request(&cb, "vm-lin-kek", "REJ-4")
            },
            "RecoveryPointNotFound",
        ),
        (
            RestoreRequestFields {
                mode: Some("replace-existing".into()),
                ..request(&cb, "vm-lin-kek", "REJ-5")
            },
            "ReplaceExistingUnsupported",
        ),
        (
            RestoreRequestFields {
                mode: Some("alternate-location".into()),
                ..request(&cb, "vm-lin-kek", "REJ-6")
            },
            "AlternateLocationUnsupported",
        ),
        (
            RestoreRequestFields {
                mode: Some("files".into()),
                ..request(&cb, "vm-lin-kek", "REJ-7")
            },
            "FileLevelRestoreUnsupported",
        ),
        (
            RestoreRequestFields {
                vm_id: Some("vm-lin-kek".into()),
                ..request(&cb, "vm-lin-kek", "REJ-8")
            },
            "InvalidRequest",
        ),
    ];
    for (fields, _) in &cases {
        send_request(&h, fields.clone());
    }
    for (fields, code) in &cases {
        let ticket = fields.ticket_id.clone().unwrap();
        let rejected = one_event(&h, "vmbackup.restore.rejected", &ticket).await;
        assert_eq!(rejected["data"]["reason"], *code, "{rejected}");
        assert_eq!(rejected["data"]["callbackUrl"], cb.url(&ticket));
    }
    let invalid = one_event(&h, "vmbackup.restore.rejected", "REJ-8").await;
    assert!(invalid["data"]["message"]
        .as_str()
        .unwrap()
        .starts_with("vmId:"));

    // A bare request body (no CloudEvent envelope) is accepted too.
    h.send_raw(
        queues::RESTORE_REQUESTS,
        &json!({ "ticketId": "REJ-9", "vmId": vm_id("vm-lin-kek"), "mode": "files" }).to_string(),
    );
    let bare = one_event(&h, "vmbackup.restore.rejected", "REJ-9").await;
    assert_eq!(bare["data"]["reason"], "FileLevelRestoreUnsupported");

    // A restore Azure refuses (a staging account outside the vault's region) is reported, not dropped.
    send_request(
        &h,
        RestoreRequestFields {
            mode: Some("alternate-location".into()),
            staging_storage_account: Some(staging().replace("stweu", "stneu")),
            ..request(&cb, "vm-plain", "REJ-10")
        },
    );
    let failed = one_event(&h, "vmbackup.restore.failed", "REJ-10").await;
    assert_eq!(failed["data"]["reason"], "JobFailed");
    assert!(
        failed["data"]["message"]
            .as_str()
            .unwrap()
            .contains("AlternateLocation"),
        "{failed}"
    );
    assert_eq!(
        failed["data"]["azureCode"],
        "UserErrorStorageAccountNotInVaultRegion"
    );
    assert!(h.events_of("vmbackup.job.started").is_empty());

    // Every outcome reached its ticket's callback.
    idle(&h).await;
    for (fields, code) in &cases {
        let ticket = fields.ticket_id.clone().unwrap();
        let calls = cb.calls_for(&ticket);
        assert_eq!(calls.len(), 1, "{ticket}: {calls:?}");
        assert_eq!(calls[0].event["type"], "vmbackup.restore.rejected");
        assert_eq!(calls[0].event["data"]["reason"], *code);
    }
    let calls = cb.calls_for("REJ-10");
    assert_eq!(calls.len(), 1, "{calls:?}");

    // A callback that never answers 2xx: notify gives up after its attempts, and the outcome stays
    // on notifications with a note of what failed.
    cb.fail_next("REJ-11", u32::MAX);
    send_request(
        &h,
        RestoreRequestFields {
            mode: Some("files".into()),
            ..request(&cb, "vm-lin-kek", "REJ-11")
        },
    );
    idle(&h).await;
    assert_eq!(cb.calls_for("REJ-11").len(), 4, "every attempt is made");
    let kept: Vec<Value> = events_for(&h, "vmbackup.restore.rejected", "REJ-11")
        .into_iter()
        .filter(|e| e.get("callbackerror").is_some())
        .collect();
    assert_eq!(kept.len(), 1, "the outcome is kept on notifications");
    assert!(kept[0]["callbackerror"]
        .as_str()
        .unwrap()
        .contains("HTTP 500"));
    assert_eq!(calls[0].event["type"], "vmbackup.restore.failed");
    h.stop().await;
}

async fn call_webhook(h: &Harness, body: &str) -> (u16, Value, Value) {
    let payload = json!({
        "Data": { "req": { "Url": format!("{}/api/restore-webhook?code=k", h.handler_url), "Method": "POST",
                           "Query": { "code": "k" }, "Headers": { "Content-Type": ["application/json"] },
                           "Params": {}, "Body": body } },
        "Metadata": { "sys": {} }
    });
    let response = reqwest::Client::new()
        .post(format!("{}/restore-webhook", h.handler_url))
        .json(&payload)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the invocation itself succeeds");
    let answer: Value = response.json().await.unwrap();
    let res = answer["Outputs"]["res"].clone();
    let status: u16 = res["statusCode"].as_str().unwrap().parse().unwrap();
    (
        status,
        res["body"].clone(),
        answer["Outputs"]["request"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_answers_202_with_the_correlation_id_or_400_naming_the_field() {
    let (h, _callbacks) = start().await;
    let body =
        json!({ "ticketId": "WEB-1", "vmId": vm_id("vm-lin-kek"), "recoveryPoint": "latest" })
            .to_string();
    let (status, answer, outputs) = call_webhook(&h, &body).await;
    assert_eq!(status, 202, "{answer}");
    assert!(
        outputs.is_null(),
        "sent through Service Bus (with its MessageId), not the binding"
    );
    let correlation = answer["correlationId"].as_str().unwrap();
    let enqueued = events_for(&h, "vmbackup.restore.requested", "WEB-1");
    assert_eq!(enqueued.len(), 1, "{enqueued:?}");
    assert_eq!(enqueued[0]["correlationid"], correlation);
    assert_eq!(enqueued[0]["data"]["vmId"], vm_id("vm-lin-kek"));
    let message_id = h
        .journal()
        .into_iter()
        .find(|e| serde_json::from_slice::<Value>(&e.body).ok().as_ref() == Some(&enqueued[0]))
        .map(|e| e.message_id)
        .unwrap();
    assert!(message_id.starts_with("restore-web-1-"), "{message_id}");
    assert_eq!(enqueued[0]["id"], message_id.as_str());

    for (body, field) in [
        (
            json!({ "vmId": vm_id("vm-lin-kek") }).to_string(),
            "ticketId",
        ),
        (
            json!({ "ticketId": "WEB-2", "vmId": vm_id("vm-lin-kek"), "mode": "create-vm" })
                .to_string(),
            "mode",
        ),
        (
            json!({ "ticketId": "WEB-3", "vmId": vm_id("vm-lin-kek"), "callbackUrl": "ftp://x/y" })
                .to_string(),
            "callbackUrl",
        ),
        ("not json".to_string(), "body"),
    ] {
        let (status, answer, outputs) = call_webhook(&h, &body).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["field"], field, "{answer}");
        assert!(outputs.is_null(), "nothing is enqueued for a bad request");
    }
    assert_eq!(
        h.events_of("vmbackup.restore.requested").len(),
        1,
        "nothing is enqueued for a bad request"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_the_front_door_and_the_cli_are_restored() {
    let (h, cb) = start().await;
    back_up(&h, "vm-win-bek").await;
    back_up(&h, "vm-cmk").await;
    let webhook = format!("{}/api/restore-webhook", h.front_door_url);
    let http = reqwest::Client::new();

    // The webhook as a ticket system calls it: through the host's HTTP front door, with a key.
    let body = json!({ "ticketId": "DOOR-1", "vmId": vm_id("vm-win-bek"), "callbackUrl": cb.url("DOOR-1") });
    let unauthorized = http.post(&webhook).json(&body).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401, "the function key is required");
    let answer = http
        .post(&webhook)
        .query(&[("code", support::FUNCTION_KEY)])
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let answer: Value = answer.json().await.unwrap();
    let correlation = answer["correlationId"].as_str().unwrap().to_string();
    let bad = http
        .post(&webhook)
        .header("x-functions-key", support::FUNCTION_KEY)
        .json(&json!({ "ticketId": "DOOR-2", "vmId": "vm-win-bek" }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.json::<Value>().await.unwrap()["field"], "vmId");

    // `vmbackup restore` against the local Service Bus endpoint, as against Azure.
    let cli = |ticket: &str, vm: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vmbackup"))
            .args(["restore", "--vm", &vm, "--ticket", ticket])
            .args(["--callback", &cb.url(ticket)])
            .env("ServiceBusConnection", h.service_bus_connection_string())
            .env("VMBACKUP_SERVICEBUS_ENDPOINT", &h.service_bus_url)
            .env_remove("ServiceBusConnection__fullyQualifiedNamespace")
            .output()
            .unwrap()
    };
    let sent = cli("CLI-1", vm_id("vm-cmk"));
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(String::from_utf8_lossy(&sent.stdout).contains("CLI-1"));
    let refused = cli("CLI-2", "vm-cmk".to_string());
    assert_eq!(refused.status.code(), Some(2), "bad input is a usage error");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("vmId"));

    idle(&h).await;
    let door = one_event(&h, "vmbackup.restore.completed", "DOOR-1").await;
    assert_eq!(door["correlationid"], correlation.as_str());
    assert!(door["data"]["restoredVmId"]
        .as_str()
        .unwrap()
        .ends_with("/vm-win-bek-restored-door-1"));
    let by_cli = one_event(&h, "vmbackup.restore.completed", "CLI-1").await;
    assert!(by_cli["data"]["restoredVmId"]
        .as_str()
        .unwrap()
        .ends_with("/vm-cmk-restored-cli-1"));
    for ticket in ["DOOR-1", "CLI-1"] {
        let calls = cb.calls_for(ticket);
        assert_eq!(calls.len(), 1, "{ticket}: {calls:?}");
        assert_eq!(calls[0].event["type"], "vmbackup.restore.completed");
    }
    assert!(events_for(&h, "vmbackup.restore.requested", "DOOR-2").is_empty());
    assert!(events_for(&h, "vmbackup.restore.requested", "CLI-2").is_empty());
    h.stop().await;
}

/// One ticket of a mode Azure restores by itself (replace-existing, alternate-location): from the
/// request to `restore.completed`, with nothing recreated in between.
async fn restore_in_azure(h: &Harness, fields: RestoreRequestFields) -> Value {
    let ticket = fields.ticket_id.clone().unwrap();
    send_request(h, fields);
    idle(h).await;
    assert!(!events_for(h, "vmbackup.job.started", &ticket).is_empty());
    let completed = one_event(h, "vmbackup.restore.completed", &ticket).await;
    assert!(events_for(h, "vmbackup.restore.disks-restored", &ticket).is_empty());
    assert!(events_for(h, "vmbackup.restore.vm-recreated", &ticket).is_empty());
    assert_eq!(completed["data"]["adeReinstalled"], false);
    completed
}

/// The restore jobs the simulator ran for a VM.
fn restore_jobs(h: &Harness, vm: &str) -> usize {
    h.sim.with_state(|s| {
        s.jobs
            .iter()
            .filter(|j| {
                j.operation == vmbackup::simulator::state::JobOperation::Restore && j.vm_name == vm
            })
            .count()
    })
}

/// Send the same ticket again (as a new message: the marker, not the queue, must catch it) while
/// its job runs and after it completed: still one job, one outcome.
async fn same_ticket_again(h: &Harness, cb: &Callbacks, fields: RestoreRequestFields, vm: &str) {
    let ticket = fields.ticket_id.clone().unwrap();
    send_request(h, fields.clone());
    one_event(h, "vmbackup.job.started", &ticket).await;
    send_request(h, fields.clone());
    idle(h).await;
    one_event(h, "vmbackup.restore.completed", &ticket).await;
    send_request(h, fields);
    idle(h).await;
    assert_eq!(restore_jobs(h, vm), 1, "{ticket}: one restore job");
    let calls = cb.calls_for(&ticket);
    assert_eq!(calls.len(), 1, "{ticket}: one outcome: {calls:?}");
    assert_eq!(calls[0].event["type"], "vmbackup.restore.completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ade_vms_are_restored_in_place_or_as_new_vms() {
    let (h, cb) = start().await;
    for vm in ["vm-plain", "vm-cmk", "vm-host"] {
        back_up(&h, vm).await;
    }

    // PMK, replace-existing: the VM keeps its id, size, tags; its disks are new ones from the point.
    let before = h
        .sim
        .with_state(|s| s.vm_by_name("vm-plain").unwrap().clone());
    let fields = RestoreRequestFields {
        mode: Some("replace-existing".into()),
        ..request(&cb, "vm-plain", "MODE-1")
    };
    let done = restore_in_azure(&h, fields.clone()).await;
    assert_eq!(done["data"]["restoredVmId"], vm_id("vm-plain"));
    let after = h
        .sim
        .with_state(|s| s.vm_by_name("vm-plain").unwrap().clone());
    assert_eq!(
        (&after.vm_id, &after.size, after.os, after.data_disks.len()),
        (
            &before.vm_id,
            &before.size,
            before.os,
            before.data_disks.len()
        )
    );
    assert_ne!(after.os_disk, before.os_disk, "a new OS disk");
    assert!(after
        .data_disks
        .iter()
        .all(|d| !before.data_disks.contains(d)));
    assert_eq!(
        after
            .tags
            .get("vmbackup-restore-mode-1")
            .map(String::as_str),
        Some(format!("done:{}", done_job(&h, "MODE-1")).as_str()),
        "the VM is its own restored VM: its marker says done"
    );
    same_ticket_again(&h, &cb, fields, "vm-plain").await;

    // CMK, alternate-location: a new VM with the disk encryption set, in the source VM's subnet.
    let original = facts(&h, "vm-cmk");
    let fields = RestoreRequestFields {
        mode: Some("alternate-location".into()),
        target_resource_group: Some(format!("/subscriptions/{SUB}/resourceGroups/rg-restore")),
        ..request(&cb, "vm-cmk", "MODE-2")
    };
    let done = restore_in_azure(&h, fields.clone()).await;
    let new_id = format!("/subscriptions/{SUB}/resourceGroups/rg-restore/providers/Microsoft.Compute/virtualMachines/vm-cmk-restored-mode-2");
    assert_eq!(done["data"]["restoredVmId"], new_id.as_str());
    let restored = facts(&h, "vm-cmk-restored-mode-2");
    assert_like_original(&original, &restored);
    assert!(restored
        .disks
        .iter()
        .all(|d| d.3.as_deref().is_some_and(|des| des.ends_with("/des-weu"))));
    let (source_subnet, new_subnet, source_tagged) = h.sim.with_state(|s| {
        let source = s.vm_by_name("vm-cmk").unwrap();
        (
            source.subnet_id(),
            s.vm_by_name("vm-cmk-restored-mode-2").unwrap().subnet_id(),
            source
                .tags
                .keys()
                .any(|k| k.starts_with("vmbackup-restore")),
        )
    });
    assert_eq!(
        new_subnet, source_subnet,
        "the source VM's subnet, read from its NIC"
    );
    assert!(
        !source_tagged,
        "the new VM marks the ticket; the source's tag is removed"
    );
    let nic_reads = h
        .sim
        .request_log()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/networkInterfaces/vm-cmk-nic"))
        .count();
    assert!(nic_reads >= 1);
    same_ticket_again(&h, &cb, fields, "vm-cmk").await;

    // Encryption at host, alternate-location into a subnet the request names.
    let subnet = h
        .sim
        .with_state(|s| s.vm_by_name("vm-cmk").unwrap().subnet_id());
    let host_id = format!("/subscriptions/{SUB}/resourceGroups/rg-host/providers/Microsoft.Compute/virtualMachines/vm-host");
    let fields = RestoreRequestFields {
        mode: Some("alternate-location".into()),
        target_subnet_id: Some(subnet.clone()),
        vm_id: Some(host_id),
        ..request(&cb, "vm-host", "MODE-3")
    };
    let done = restore_in_azure(&h, fields.clone()).await;
    assert!(done["data"]["restoredVmId"]
        .as_str()
        .unwrap()
        .ends_with("/resourceGroups/rg-host/providers/Microsoft.Compute/virtualMachines/vm-host-restored-mode-3"));
    let (at_host, os, placed) = h.sim.with_state(|s| {
        let vm = s.vm_by_name("vm-host-restored-mode-3").unwrap();
        (vm.encryption_at_host, vm.os, vm.subnet_id())
    });
    assert!(at_host, "encryption at host carries over");
    assert_eq!(format!("{os:?}"), "Windows");
    assert_eq!(placed, subnet);
    same_ticket_again(&h, &cb, fields, "vm-host").await;

    // A redelivered last check of a job: the same outcome under the same id, nothing new.
    let checks = events_for(&h, "vmbackup.job.started", "MODE-3");
    let last = checks
        .iter()
        .max_by_key(|e| e["data"]["checks"].as_u64().unwrap_or(0))
        .unwrap();
    let outputs = redelivered(&h, "track-job", last).await;
    let original = one_event(&h, "vmbackup.restore.completed", "MODE-3").await;
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    assert_eq!(outputs[0]["id"], original["id"]);
    assert_eq!(restore_jobs(&h, "vm-host"), 1);

    // The VM deleted: nothing to replace; a new VM needs a subnet named (no NIC to read it from).
    h.sim.with_state(|s| s.vms.retain(|v| v.name != "vm-plain"));
    for (mode, ticket, field) in [
        ("replace-existing", "MODE-4", "vmId:"),
        ("alternate-location", "MODE-5", "targetSubnetId:"),
    ] {
        send_request(
            &h,
            RestoreRequestFields {
                mode: Some(mode.into()),
                ..request(&cb, "vm-plain", ticket)
            },
        );
        let rejected = one_event(&h, "vmbackup.restore.rejected", ticket).await;
        assert_eq!(rejected["data"]["reason"], "InvalidRequest");
        let message = rejected["data"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{ticket}: {message}");
    }
    idle(&h).await;
    assert_eq!(restore_jobs(&h, "vm-plain"), 1, "only MODE-1's");

    assert_nothing_failed(&h);
    h.stop().await;
}

/// The job id a ticket's restore ran as.
fn done_job(h: &Harness, ticket: &str) -> String {
    events_for(h, "vmbackup.job.started", ticket)[0]["data"]["jobId"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_sent_twice_at_once_starts_one_restore() {
    let (h, cb) = start().await;
    back_up(&h, "vm-cmk").await;
    back_up(&h, "vm-plain").await;

    // `vmbackup restore` run twice at the same instant (a double-submitted ticket).
    let cli = |ticket: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vmbackup"))
            .args(["restore", "--vm", &vm_id("vm-cmk"), "--ticket", ticket])
            .args([
                "--mode",
                "alternate-location",
                "--callback",
                &cb.url(ticket),
            ])
            .env("ServiceBusConnection", h.service_bus_connection_string())
            .env("VMBACKUP_SERVICEBUS_ENDPOINT", &h.service_bus_url)
            .env_remove("ServiceBusConnection__fullyQualifiedNamespace")
            .spawn()
            .unwrap()
    };
    let (mut first, mut second) = (cli("RACE-1"), cli("RACE-1"));
    assert!(first.wait().unwrap().success());
    assert!(second.wait().unwrap().success());

    // The webhook called twice concurrently through the host's front door.
    let webhook = format!("{}/api/restore-webhook", h.front_door_url);
    let body = json!({ "ticketId": "RACE-2", "vmId": vm_id("vm-plain"), "mode": "replace-existing",
                       "callbackUrl": cb.url("RACE-2") });
    let post = || {
        reqwest::Client::new()
            .post(&webhook)
            .query(&[("code", support::FUNCTION_KEY)])
            .json(&body)
            .send()
    };
    let (a, b) = tokio::join!(post(), post());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (202, 202));
    let (a, b): (Value, Value) = (a.json().await.unwrap(), b.json().await.unwrap());
    assert_eq!(
        a["correlationId"], b["correlationId"],
        "one request, one correlation id"
    );

    // A corrected request for a ticket is another message (delivered, then judged by start-restore).
    let corrected = RestoreRequestFields {
        mode: Some("alternate-location".into()),
        recovery_point: Some("latest".into()),
        callback_url: Some(cb.url("RACE-1")),
        ..request(&cb, "vm-cmk", "RACE-1")
    };
    let validated = vmbackup::domain::restore::validate_request(&corrected).unwrap();
    let same_id = vmbackup::domain::restore::request_message_id(&validated);
    let mut other = validated.clone();
    other.recovery_point = vmbackup::domain::restore::RecoveryPointSelector::Id("1".into());
    assert_ne!(
        vmbackup::domain::restore::request_message_id(&other),
        same_id
    );

    idle(&h).await;
    for (ticket, vm) in [("RACE-1", "vm-cmk"), ("RACE-2", "vm-plain")] {
        let requested = events_for(&h, "vmbackup.restore.requested", ticket);
        assert_eq!(requested.len(), 1, "{ticket}: one message on the queue");
        assert_eq!(restore_jobs(&h, vm), 1, "{ticket}: one restore job");
        let calls = cb.calls_for(ticket);
        assert_eq!(calls.len(), 1, "{ticket}: {calls:?}");
        assert_eq!(calls[0].event["type"], "vmbackup.restore.completed");
    }
    assert_eq!(
        events_for(&h, "vmbackup.restore.requested", "RACE-1")[0]["id"],
        same_id.as_str(),
        "the CLI and a caller computing the id agree"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_staging_account_is_the_configured_one_in_the_vaults_region() {
    let neu = staging().replace("stweu", "stneu");
    let spare = staging().replace("stweustaging", "stneuspare");
    async fn start_with(accounts: Vec<String>) -> Harness {
        let settings = HashMap::from([(
            settings::STAGING_STORAGE_ACCOUNT.to_string(),
            accounts.join(","),
        )]);
        Harness::start_with(&fleet(), Options { settings }).await
    }
    let cb = Callbacks::serve().await;

    // Two accounts, the vault's region second: that one stages the restore.
    let h = start_with(vec![neu.clone(), staging()]).await;
    back_up(&h, "vm-plain").await;
    restore_in_azure(
        &h,
        RestoreRequestFields {
            mode: Some("replace-existing".into()),
            ..request(&cb, "vm-plain", "STAGE-1")
        },
    )
    .await;
    let used: Vec<String> = h.sim.with_state(|s| {
        s.jobs
            .iter()
            .filter_map(|j| j.restore.as_ref().map(|p| p.storage_account_id.clone()))
            .collect()
    });
    assert_eq!(used.len(), 1);
    assert!(used[0].eq_ignore_ascii_case(&staging()), "{used:?}");
    h.stop().await;

    // None in the vault's region: rejected before Azure is asked, naming the field.
    let h = start_with(vec![neu, spare]).await;
    back_up(&h, "vm-plain").await;
    send_request(&h, request(&cb, "vm-plain", "STAGE-2"));
    let rejected = one_event(&h, "vmbackup.restore.rejected", "STAGE-2").await;
    assert_eq!(rejected["data"]["reason"], "InvalidRequest");
    let message = rejected["data"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("stagingStorageAccount:") && message.contains("westeurope"),
        "{message}"
    );
    assert_eq!(restore_jobs(&h, "vm-plain"), 0);
    h.stop().await;
}

fn request_event(h: &Harness, fields: RestoreRequestFields) -> Value {
    let ticket = fields.ticket_id.clone().unwrap_or_default();
    let subject = fields.vm_id.clone();
    let event = CloudEvent::start(fields, subject, h.clock.now()).with_ticket(ticket);
    serde_json::to_value(&event).unwrap()
}

/// What start-restore writes on the source VM before it triggers the restore: the ticket's marker
/// naming the request (the hash of its message id).
fn pending_marker(h: &Harness, fields: &RestoreRequestFields) -> String {
    let request = vmbackup::domain::restore::validate_request(fields).unwrap();
    let message_id = vmbackup::domain::restore::request_message_id(&request);
    let hash = message_id.rsplit_once('-').unwrap().1;
    let now = h
        .clock
        .now()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    format!("pending:{now}:{hash}")
}

fn set_marker(h: &Harness, vm: &str, ticket: &str, marker: &str) {
    let tag = vmbackup::workflow::start_restore::ticket_tag(ticket);
    h.sim.with_state(|s| {
        let vm = s.vms.iter_mut().find(|v| v.name == vm).unwrap();
        vm.tags.insert(tag, marker.to_string());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_different_requests_for_one_ticket_at_once_start_one_restore() {
    let (h, cb) = start().await;
    back_up(&h, "vm-lin-kek").await;
    for (round, ticket) in ["RACE-1", "RACE-2", "RACE-3"].into_iter().enumerate() {
        let jobs_before = restore_jobs(&h, "vm-lin-kek");
        // Two requests for one ticket that differ (their callbacks), so duplicate detection keeps
        // both; delivered at the same instant, around the queue.
        let first = request(&cb, "vm-lin-kek", ticket);
        let mut second = first.clone();
        second.callback_url = Some(cb.url(&format!("{ticket}-other")));
        let (first, second) = (request_event(&h, first), request_event(&h, second));
        let ((status_a, answer_a), (status_b, answer_b)) = tokio::join!(
            h.invoke("start-restore", &first, 1),
            h.invoke("start-restore", &second, 1)
        );
        // The loser either found the winner's job (200, it follows that job) or the winner's
        // pending marker (500: retried, as the host would); its redelivery follows the job.
        for (status, answer, event) in [(status_a, answer_a, &first), (status_b, answer_b, &second)]
        {
            match status {
                200 => {}
                500 => {
                    assert!(answer.to_string().contains("retrying"), "{answer}");
                    let (status, answer) = h.invoke("start-restore", event, 2).await;
                    assert_eq!(status, 200, "{answer}");
                }
                other => panic!("round {round}: {other} {answer}"),
            }
        }
        assert_eq!(
            restore_jobs(&h, "vm-lin-kek"),
            jobs_before + 1,
            "round {round}"
        );
        idle(&h).await;
        // Both requests hear the one restore's outcome at their own callbacks.
        eventually(&format!("two restore.completed of {ticket}"), || {
            (events_for(&h, "vmbackup.restore.completed", ticket).len() >= 2).then_some(())
        })
        .await;
    }
    let conflicts = h
        .sim
        .request_log()
        .iter()
        .filter(|r| r.method == "PATCH" && r.status == 412)
        .count();
    println!("VM tag writes refused with 412 over 3 racing pairs: {conflicts}");
    assert_nothing_failed(&h);
    assert!(events_for(&h, "vmbackup.restore.rejected", "RACE-1").is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_marker_holds_the_ticket_for_its_own_request_only() {
    let (h, cb) = start().await;
    back_up(&h, "vm-lin-kek").await;
    let fields = request(&cb, "vm-lin-kek", "MARK-1");

    // Another request for the ticket wrote its marker and is about to trigger: nothing starts, and
    // the message is retried (a 500: the host delivers it again) rather than dropped.
    let mut other = fields.clone();
    other.callback_url = Some(cb.url("MARK-1-other"));
    set_marker(&h, "vm-lin-kek", "MARK-1", &pending_marker(&h, &other));
    let (status, answer) = h
        .invoke("start-restore", &request_event(&h, fields.clone()), 1)
        .await;
    assert_eq!(status, 500, "{answer}");
    assert!(answer.to_string().contains("retrying"), "{answer}");
    assert_eq!(restore_jobs(&h, "vm-lin-kek"), 0);
    assert!(events_for(&h, "vmbackup.restore.rejected", "MARK-1").is_empty());

    // This request wrote its marker and died before the trigger: its redelivery goes on.
    set_marker(&h, "vm-lin-kek", "MARK-1", &pending_marker(&h, &fields));
    let (status, answer) = h
        .invoke("start-restore", &request_event(&h, fields), 2)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(restore_jobs(&h, "vm-lin-kek"), 1);
    idle(&h).await;
    one_event(&h, "vmbackup.restore.completed", "MARK-1").await;
    assert_nothing_failed(&h);
    h.stop().await;
}
