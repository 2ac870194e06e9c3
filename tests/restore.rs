//! Restore choreography end to end against the simulator: start-restore → (track-job) →
//! recreate-vm → reinstall-ade, the reason codes of start-restore, the webhook, and one restore per
//! ticket.
//!
//! track-job is another function (not on this branch yet): where it would turn the completed
//! RestoreDisks job into `restore.disks-restored`, these tests wait for the simulator's job to
//! complete and send that event themselves, built from the job's extended info as track-job does.

mod support;

use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use support::{Harness, Options};
use vmbackup::azure::backup::ProtectedItemRef;
use vmbackup::domain::restore::RestoreRequestFields;
use vmbackup::domain::ResourceId;
use vmbackup::events::{queues, CloudEvent, JobStarted, RestoreDisksRestored, TrackedJob};
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
            "storageAccounts": [{ "name": "stweustaging", "resourceGroup": "rg-backup", "location": "westeurope" }],
            "virtualMachines": [
                vm("vm-lin-kek", "linux", json!({ "kind": "ade", "keyVault": "kv-ade-weu", "secret": "bek-lin", "kek": "kek-1" }), protected.clone()),
                vm("vm-win-bek", "windows", json!({ "kind": "ade", "keyVault": "kv-ade-weu", "secret": "bek-win" }), protected.clone()),
                vm("vm-lin-gone", "linux", json!({ "kind": "ade", "keyVault": "kv-ade-weu", "secret": "bek-gone", "kek": "kek-2" }), protected.clone()),
                vm("vm-cmk", "linux", json!({ "kind": "cmk", "diskEncryptionSet": "des-weu" }), protected.clone()),
                vm("vm-plain", "linux", json!({ "kind": "pmk" }), protected),
                vm("vm-unprotected", "linux", json!({ "kind": "pmk" }), Value::Null)
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

async fn start() -> Harness {
    let settings = HashMap::from([(settings::STAGING_STORAGE_ACCOUNT.to_string(), staging())]);
    Harness::start_with(&fleet(), Options { settings }).await
}

fn request(vm: &str, ticket: &str) -> RestoreRequestFields {
    RestoreRequestFields {
        ticket_id: Some(ticket.into()),
        vm_id: Some(vm_id(vm)),
        callback_url: Some(format!("https://tickets.example/hooks/{ticket}")),
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

/// Until every restore request sent so far has been handled.
async fn requests_handled(h: &Harness) {
    eventually("restore-requests to drain", || {
        (h.queue.active_count_in(queues::RESTORE_REQUESTS).ok()? == 0).then_some(())
    })
    .await;
}

/// An on-demand backup, so the VM has a recovery point.
async fn back_up(h: &Harness, vm: &str) {
    let item = ProtectedItemRef::for_vm(&vault_id(), &vm_id(vm)).unwrap();
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

/// What track-job does for a completed restore job: `restore.disks-restored` from its extended info.
async fn disks_restored_like_track_job(h: &Harness, started: &Value) {
    let started: CloudEvent<JobStarted> = serde_json::from_value(started.clone()).unwrap();
    let job_id = started.data.job_id.clone();
    eventually("the restore job", || {
        let done = h
            .sim
            .with_state(|s| s.jobs.iter().any(|j| j.id == job_id && j.finalized));
        done.then_some(())
    })
    .await;
    let job = h.deps.backup.get_job(&vault_id(), &job_id).await.unwrap();
    assert_eq!(job.properties.status.as_deref(), Some("Completed"));
    let bag = job.properties.extended_info.unwrap().property_bag;
    let TrackedJob::Restore(restore) = started.data.job.clone() else {
        panic!("a restore job is tracked as a restore");
    };
    let account = bag.get("Target Storage Account Name").map(|name| {
        ResourceId::parse(&format!(
            "/subscriptions/{SUB}/resourceGroups/rg-backup/providers/Microsoft.Storage/storageAccounts/{name}"
        ))
        .unwrap()
    });
    let event = started.follow(
        RestoreDisksRestored {
            restore,
            job_id,
            template_blob_uri: bag.get("Template Blob Uri").cloned(),
            config_blob_uri: bag.get("Config Blob Uri").cloned(),
            encryption_info_blob_uri: bag.get("Encryption Info Blob Uri").cloned(),
            target_storage_account_id: account,
        },
        "",
        h.clock.now(),
    );
    h.send(&event);
}

struct Restored {
    completed: Value,
    encryption_info_blob: Option<String>,
}

/// One ticket from request to `restore.completed`.
async fn restore(h: &Harness, fields: RestoreRequestFields) -> Restored {
    let ticket = fields.ticket_id.clone().unwrap();
    send_request(h, fields);
    let started = one_event(h, "vmbackup.job.started", &ticket).await;
    disks_restored_like_track_job(h, &started).await;
    let disks = one_event(h, "vmbackup.restore.disks-restored", &ticket).await;
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
    let h = start().await;
    for vm in ["vm-lin-kek", "vm-win-bek", "vm-lin-gone", "vm-cmk"] {
        back_up(&h, vm).await;
    }

    // Linux ADE with a KEK.
    let original = facts(&h, "vm-lin-kek");
    let done = restore(&h, request("vm-lin-kek", "INC-1001")).await;
    let restored_id = done.completed["data"]["restoredVmId"].as_str().unwrap();
    assert!(
        restored_id.ends_with("/virtualMachines/vm-lin-kek-restored-inc-1001"),
        "{restored_id}"
    );
    assert_eq!(done.completed["data"]["adeReinstalled"], true);
    assert_eq!(
        done.completed["data"]["callbackUrl"],
        "https://tickets.example/hooks/INC-1001"
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
    let done = restore(&h, request("vm-win-bek", "INC-1002")).await;
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
    restore(&h, request("vm-lin-gone", "INC-1003")).await;
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
    let done = restore(&h, request("vm-cmk", "INC-1004")).await;
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
    assert!(
        h.events_of("vmbackup.restore.failed").is_empty(),
        "{:?}",
        h.events_of("vmbackup.restore.failed")
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_ticket_twice_makes_one_restore_job_and_one_vm() {
    let h = start().await;
    back_up(&h, "vm-lin-kek").await;
    send_request(&h, request("vm-lin-kek", "INC-2001"));
    let started = one_event(&h, "vmbackup.job.started", "INC-2001").await;
    // Again while the first is in flight (the job runs 600 simulated seconds).
    send_request(&h, request("vm-lin-kek", "INC-2001"));
    requests_handled(&h).await;
    disks_restored_like_track_job(&h, &started).await;
    one_event(&h, "vmbackup.restore.completed", "INC-2001").await;
    // And once more after it is done.
    send_request(&h, request("vm-lin-kek", "INC-2001"));
    requests_handled(&h).await;
    assert_eq!(events_for(&h, "vmbackup.job.started", "INC-2001").len(), 1);
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
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reason_code_is_a_rejection() {
    let h = start().await;
    back_up(&h, "vm-lin-kek").await;
    back_up(&h, "vm-plain").await;
    let other_vm = format!("/subscriptions/{OTHER_SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/vm-x");
    let cases: Vec<(RestoreRequestFields, &str)> = vec![
        (
            RestoreRequestFields {
                vm_id: Some(other_vm),
                ..request("vm-lin-kek", "REJ-1")
            },
            "ScopeNotAllowed",
        ),
        (
            RestoreRequestFields {
                target_resource_group: Some(format!(
                    "/subscriptions/{OTHER_SUB}/resourceGroups/rg"
                )),
                ..request("vm-lin-kek", "REJ-2")
            },
            "CrossSubscriptionRestore",
        ),
        (request("vm-unprotected", "REJ-3"), "NotProtected"),
        (
            RestoreRequestFields {
                recovery_point: Some("2001-01-01T00:00:00Z".into()),
                ..request("vm-lin-kek", "REJ-4")
            },
            "RecoveryPointNotFound",
        ),
        (
            RestoreRequestFields {
                mode: Some("replace-existing".into()),
                ..request("vm-lin-kek", "REJ-5")
            },
            "ReplaceExistingUnsupported",
        ),
        (
            RestoreRequestFields {
                mode: Some("alternate-location".into()),
                ..request("vm-lin-kek", "REJ-6")
            },
            "AlternateLocationUnsupported",
        ),
        (
            RestoreRequestFields {
                mode: Some("files".into()),
                ..request("vm-lin-kek", "REJ-7")
            },
            "FileLevelRestoreUnsupported",
        ),
        (
            RestoreRequestFields {
                vm_id: Some("vm-lin-kek".into()),
                ..request("vm-lin-kek", "REJ-8")
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
        assert_eq!(
            rejected["data"]["callbackUrl"],
            format!("https://tickets.example/hooks/{ticket}")
        );
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

    // Non-ADE replace-existing goes to Azure as OriginalLocation; the simulator refuses it, and the
    // refusal is reported rather than dropped.
    send_request(
        &h,
        RestoreRequestFields {
            mode: Some("replace-existing".into()),
            ..request("vm-plain", "REJ-10")
        },
    );
    let failed = one_event(&h, "vmbackup.restore.failed", "REJ-10").await;
    assert_eq!(failed["data"]["reason"], "JobFailed");
    assert!(
        failed["data"]["message"]
            .as_str()
            .unwrap()
            .contains("OriginalLocation"),
        "{failed}"
    );
    assert_eq!(failed["data"]["azureCode"], "BMSUserErrorInvalidInput");
    assert!(h.events_of("vmbackup.job.started").is_empty());
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
    let h = start().await;
    let body =
        json!({ "ticketId": "WEB-1", "vmId": vm_id("vm-lin-kek"), "recoveryPoint": "latest" })
            .to_string();
    let (status, answer, enqueued) = call_webhook(&h, &body).await;
    assert_eq!(status, 202, "{answer}");
    let correlation = answer["correlationId"].as_str().unwrap();
    assert_eq!(enqueued[0]["type"], "vmbackup.restore.requested");
    assert_eq!(enqueued[0]["correlationid"], correlation);
    assert_eq!(enqueued[0]["ticketid"], "WEB-1");
    assert_eq!(enqueued[0]["data"]["vmId"], vm_id("vm-lin-kek"));

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
        let (status, answer, enqueued) = call_webhook(&h, &body).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["field"], field, "{answer}");
        assert!(enqueued.is_null(), "nothing is enqueued for a bad request");
    }
    h.stop().await;
}
