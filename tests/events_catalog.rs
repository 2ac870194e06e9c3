//! The event catalog: checked-in JSON Schemas match the types, every event is a valid CloudEvent
//! (read back by the official CloudEvents SDK), and Event Grid's samples parse.
//!
//! After changing an event type, regenerate the schemas with
//! `VMBACKUP_BLESS=1 cargo test --test events_catalog`.

use chrono::{TimeZone, Utc};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;
use vmbackup::domain::eligibility::KeyVaultAccessNeed;
use vmbackup::domain::encryption::{AdeKeys, EncryptionKind, Kek};
use vmbackup::domain::restore::RestoreRequestFields;
use vmbackup::domain::{ReasonCode, ResourceId};
use vmbackup::events::*;

const VM: &str = "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/vm-web-01";
const VAULT: &str = "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg-backup/providers/Microsoft.RecoveryServices/vaults/rsv-weu";
const KV: &str = "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg-sec/providers/Microsoft.KeyVault/vaults/kv-ade-weu";
const RG: &str = "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg-restore";

fn id(text: &str) -> ResourceId {
    ResourceId::parse(text).unwrap()
}

fn ade_kek() -> EncryptionKind {
    EncryptionKind::Ade(AdeKeys {
        key_vault: id(KV),
        key_vault_url: Some("https://kv-ade-weu.vault.azure.net/".into()),
        secret_url: Some("https://kv-ade-weu.vault.azure.net/secrets/bek-web-01/0123".into()),
        kek: Some(Kek {
            key_vault: id(KV),
            key_url: "https://kv-ade-weu.vault.azure.net/keys/kek-1/4567".into(),
        }),
    })
}

fn restore_context() -> RestoreContext {
    RestoreContext {
        ticket_id: "INC-1001".into(),
        vm_id: id(VM),
        mode: "restore-disks".into(),
        recovery_point_id: "932881".into(),
        target_resource_group_id: id(RG),
        restored_vm_name: "vm-web-01-restored-inc-1001".into(),
        deployment_name: "vmbackup-restore-INC-1001".into(),
        encryption: ade_kek(),
        os_type: "linux".into(),
        callback_url: Some("https://tickets.example/hooks/INC-1001".into()),
    }
}

fn event<T: EventData>(data: T) -> Value {
    let now = Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).unwrap();
    serde_json::to_value(CloudEvent::start(data, Some(VM.into()), now).with_ticket("INC-1001"))
        .unwrap()
}

/// One realistic instance of every event of the catalog, keyed by type.
fn samples() -> Vec<(&'static str, Value)> {
    let vm = id(VM);
    let vault = id(VAULT);
    vec![
        (ProtectionRequested::TYPE, event(ProtectionRequested { vm_id: vm.clone(), policy: Some("DefaultPolicy".into()), cause: ProtectionCause::VmWritten, agent_checks: 0 })),
        (EncryptionEnabled::TYPE, event(EncryptionEnabled { vm_id: vm.clone() })),
        (KeyVaultAccessNeeded::TYPE, event(KeyVaultAccessNeeded {
            vm_id: vm.clone(),
            needs: vec![KeyVaultAccessNeed { key_vault: id(KV), secrets: true, keys: true }],
            then: AfterAccess::Protect { vault_id: vault.clone(), policy: "DefaultPolicy".into(), encryption: ade_kek() },
        })),
        (KeyVaultAccessGranted::TYPE, event(KeyVaultAccessGranted { vm_id: vm.clone(), key_vault_ids: vec![id(KV)] })),
        (ProtectionReady::TYPE, event(ProtectionReady { vm_id: vm.clone(), vault_id: vault.clone(), policy: "DefaultPolicy".into(), encryption: EncryptionKind::Pmk })),
        (ProtectionEnabled::TYPE, event(ProtectionEnabled {
            vm_id: vm.clone(), vault_id: vault.clone(), policy: "DefaultPolicy".into(),
            protected_item_id: id(&format!("{VAULT}/backupFabrics/Azure/protectionContainers/IaasVMContainer;iaasvmcontainerv2;rg-app;vm-web-01/protectedItems/VM;iaasvmcontainerv2;rg-app;vm-web-01")),
            encryption: ade_kek(),
        })),
        (ProtectionRejected::TYPE, event(ProtectionRejected { vm_id: vm.clone(), reason: ReasonCode::NoVaultInRegion, message: "no vault in westeurope".into(), encryption: None })),
        (BackupRequested::TYPE, event(BackupRequested { vm_id: vm.clone(), retain_until: Some(Utc.with_ymd_and_hms(2026, 12, 28, 0, 0, 0).unwrap()), requested_by: BackupRequester::Sweep, remedy_applied: false })),
        (JobStarted::TYPE, event(JobStarted {
            vm_id: vm.clone(), vault_id: vault.clone(), job_id: "7e1a".into(),
            started_at: Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).unwrap(), checks: 0,
            job: TrackedJob::Restore(restore_context()),
        })),
        (BackupCompleted::TYPE, event(BackupCompleted { vm_id: vm.clone(), vault_id: vault.clone(), job_id: "7e1a".into(), status: "Completed".into() })),
        (BackupFailed::TYPE, event(BackupFailed { vm_id: vm.clone(), job_id: Some("7e1a".into()), reason: ReasonCode::KeyVaultPermissionsNotConfigured, message: "re-granting did not help".into(), azure_code: Some("UserErrorKeyVaultPermissionsNotConfigured".into()) })),
        (BackupRejected::TYPE, event(BackupRejected { vm_id: vm.clone(), reason: ReasonCode::NotProtected, message: "not protected".into() })),
        (RestoreRequested::TYPE, event(RestoreRequestFields {
            ticket_id: Some("INC-1001".into()), vm_id: Some(VM.into()), mode: Some("restore-disks".into()),
            recovery_point: Some("latest".into()), target_resource_group: Some(RG.into()),
            staging_storage_account: None, callback_url: Some("https://tickets.example/hooks/INC-1001".into()),
            target_subnet_id: None,
        })),
        (RestoreDisksRestored::TYPE, event(RestoreDisksRestored {
            restore: restore_context(), job_id: "7e1a".into(),
            template_blob_uri: Some("https://stweustaging.blob.core.windows.net/vmbackup/azuredeploy.json".into()),
            config_blob_uri: Some("https://stweustaging.blob.core.windows.net/vmbackup/config.json".into()),
            encryption_info_blob_uri: Some("https://stweustaging.blob.core.windows.net/vmbackup/encryption.json".into()),
            target_storage_account_id: None,
        })),
        (RestoreVmRecreated::TYPE, event(RestoreVmRecreated { restore: restore_context(), restored_vm_id: id(&format!("{RG}/providers/Microsoft.Compute/virtualMachines/vm-web-01-restored-inc-1001")), encryption_info_blob_uri: None })),
        (RestoreCompleted::TYPE, event(RestoreCompleted { ticket_id: "INC-1001".into(), vm_id: vm.clone(), restored_vm_id: id(&format!("{RG}/providers/Microsoft.Compute/virtualMachines/vm-web-01-restored-inc-1001")), ade_reinstalled: true, callback_url: None })),
        (RestoreRejected::TYPE, event(RestoreRejected { ticket_id: Some("INC-1002".into()), vm_id: Some(VM.into()), reason: ReasonCode::FileLevelRestoreUnsupported, message: "files".into(), callback_url: None })),
        (RestoreFailed::TYPE, event(RestoreFailed { ticket_id: "INC-1003".into(), vm_id: vm, reason: ReasonCode::JobFailed, message: "restore job failed".into(), azure_code: Some("UserErrorSkuNotAvailable".into()), callback_url: None })),
    ]
}

fn schema_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/events")
}

fn schema_text(entry: &CatalogEntry) -> String {
    let mut text = serde_json::to_string_pretty(&(entry.schema)()).unwrap();
    text.push('\n');
    text
}

#[test]
fn checked_in_schemas_match_the_types() {
    let dir = schema_dir();
    if std::env::var_os("VMBACKUP_BLESS").is_some() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in catalog() {
            std::fs::write(
                dir.join(format!("{}.schema.json", entry.event_type)),
                schema_text(&entry),
            )
            .unwrap();
        }
    }
    let regenerate = "run `VMBACKUP_BLESS=1 cargo test --test events_catalog` to regenerate";
    let expected: BTreeSet<String> = catalog()
        .iter()
        .map(|e| format!("{}.schema.json", e.event_type))
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(present, expected, "docs/events drifted; {regenerate}");
    for entry in catalog() {
        let path = dir.join(format!("{}.schema.json", entry.event_type));
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            checked_in,
            schema_text(&entry),
            "{} drifted; {regenerate}",
            path.display()
        );
    }
}

#[test]
fn every_event_has_a_sample_that_satisfies_its_schema() {
    let samples = samples();
    let sampled: BTreeSet<&str> = samples.iter().map(|(t, _)| *t).collect();
    let catalogued: BTreeSet<&str> = catalog().iter().map(|e| e.event_type).collect();
    assert_eq!(sampled, catalogued);
    for entry in catalog() {
        let schema = serde_json::to_value((entry.schema)()).unwrap();
        let validator = jsonschema::draft202012::options().build(&schema).unwrap();
        let (_, sample) = samples
            .iter()
            .find(|(t, _)| *t == entry.event_type)
            .unwrap();
        let errors: Vec<String> = validator
            .iter_errors(sample)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", entry.event_type);
        // And the schema does constrain: an event without data is refused.
        let mut without_data = sample.clone();
        without_data.as_object_mut().unwrap().remove("data");
        assert!(!validator.is_valid(&without_data), "{}", entry.event_type);
        // ... and one of another type.
        let mut other_type = sample.clone();
        other_type["type"] = json!("vmbackup.something.else");
        assert!(!validator.is_valid(&other_type), "{}", entry.event_type);
    }
}

#[test]
fn every_event_is_a_cloudevent_the_official_sdk_reads() {
    use cloudevents::event::AttributesReader;
    use cloudevents::event::ExtensionValue;
    for (event_type, sample) in samples() {
        let parsed: cloudevents::Event = serde_json::from_value(sample.clone())
            .unwrap_or_else(|e| panic!("{event_type}: the CloudEvents SDK refused it: {e}"));
        assert_eq!(parsed.ty(), event_type);
        assert_eq!(parsed.specversion().as_str(), "1.0");
        assert_eq!(parsed.subject(), Some(VM));
        assert!(matches!(
            parsed.extension("correlationid"),
            Some(ExtensionValue::String(_))
        ));
        assert!(
            matches!(parsed.extension("ticketid"), Some(ExtensionValue::String(t)) if t == "INC-1001")
        );
        // What the SDK writes, our types read back unchanged.
        let rewritten = serde_json::to_value(&parsed).unwrap();
        assert_eq!(rewritten["data"], sample["data"], "{event_type}");
        assert_eq!(rewritten["id"], sample["id"]);
    }
}

#[test]
fn queues_are_declared_and_events_arrive_double_encoded_or_plain() {
    for entry in catalog() {
        assert!(
            queues::ALL.contains(&entry.queue),
            "{} travels on an undeclared queue",
            entry.event_type
        );
    }
    let (_, sample) = samples()
        .into_iter()
        .find(|(t, _)| *t == BackupRequested::TYPE)
        .unwrap();
    use vmbackup::runtime::TriggerPayload;
    let double = Value::String(serde_json::to_string(&sample.to_string()).unwrap());
    let decoded = CloudEvent::<BackupRequested>::from_trigger(double, "Data.message").unwrap();
    assert_eq!(decoded.data.requested_by, BackupRequester::Sweep);
    // An event of another type on the queue is refused, naming the binding.
    let err = CloudEvent::<BackupRejected>::from_trigger(sample, "Data.message").unwrap_err();
    assert_eq!(err.field, "Data.message");
    assert!(err.reason.contains("vmbackup.backup.rejected"), "{err}");
}

#[test]
fn follow_up_ids_are_deterministic_and_carry_the_run() {
    let now = Utc::now();
    let first = CloudEvent::start(EncryptionEnabled { vm_id: id(VM) }, Some(VM.into()), now)
        .with_ticket("T-1");
    let next = || {
        first.follow(
            BackupRequested {
                vm_id: id(VM),
                retain_until: None,
                requested_by: BackupRequester::Operator,
                remedy_applied: false,
            },
            "",
            now,
        )
    };
    assert_eq!(
        next().id,
        next().id,
        "a redelivered message must produce the same follow-up id"
    );
    assert_ne!(next().id, first.id);
    assert_eq!(next().correlationid, first.correlationid);
    assert_eq!(next().ticketid.as_deref(), Some("T-1"));
    let other = first.follow(
        BackupRequested {
            vm_id: id(VM),
            retain_until: None,
            requested_by: BackupRequester::Operator,
            remedy_applied: false,
        },
        "vm-2",
        now,
    );
    assert_ne!(other.id, next().id);
}

#[test]
fn event_grid_samples_parse_in_both_schemas() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/azure-rest-examples/eventgrid");
    if !dir.exists() {
        println!(
            "SKIPPED: {} is missing (CI has ../shared beside the checkout)",
            dir.display()
        );
        return;
    }
    for schema in ["event-grid-schema", "cloud-events-schema"] {
        let text =
            std::fs::read_to_string(dir.join(schema).join("resource_write_success.json")).unwrap();
        let event =
            eventgrid::ResourceEvent::from_json(serde_json::from_str(&text).unwrap()).unwrap();
        assert!(event.is_write_success(), "{schema}");
        assert_eq!(
            event.data.operation_name,
            "Microsoft.Storage/storageAccounts/write"
        );
        assert!(event.resource_uri().contains("storageAccounts"));
        assert_eq!(event.id, "4db48cba-50a2-455a-93b4-de41a3b5b7f6");
    }
    let missing_data =
        eventgrid::ResourceEvent::from_json(json!({ "eventType": "x", "id": "1", "subject": "s" }));
    assert!(missing_data.is_err());
}
