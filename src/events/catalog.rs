//! One payload type per event of the choreography, with the queue each travels on.

use super::envelope::EventData;
use crate::domain::eligibility::KeyVaultAccessNeed;
use crate::domain::encryption::EncryptionKind;
use crate::domain::restore::{RestoreMode, RestoreRequestFields};
use crate::domain::{ReasonCode, ResourceId};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The queues of the app. Several event types may share a queue when one function handles them all.
pub mod queues {
    /// Event Grid `ResourceWriteSuccess` events for VMs and VM extensions.
    pub const VM_EVENTS: &str = "vm-events";
    /// `protection.requested` and `encryption.enabled` → assess-vm.
    pub const PROTECTION_REQUESTS: &str = "protection-requests";
    /// `key-vault.access-needed` → grant-key-vault-access.
    pub const KEY_VAULT_ACCESS: &str = "key-vault-access";
    /// `protection.ready` → enable-protection.
    pub const PROTECTION_READY: &str = "protection-ready";
    /// `backup.requested` → trigger-backup.
    pub const BACKUP_REQUESTS: &str = "backup-requests";
    /// `job.started` and its re-scheduled checks → track-job.
    pub const JOB_TRACKING: &str = "job-tracking";
    /// `restore.requested` (the public inbound contract for ticket systems) → start-restore.
    pub const RESTORE_REQUESTS: &str = "restore-requests";
    /// `restore.disks-restored` → recreate-vm.
    pub const RESTORE_DISKS_RESTORED: &str = "restore-disks-restored";
    /// `restore.vm-recreated` → reinstall-ade.
    pub const RESTORE_VM_RECREATED: &str = "restore-vm-recreated";
    /// Every end of a workflow (`*.enabled`, `*.granted`, `*.completed`, `*.rejected`, `*.failed`) → notify.
    pub const OUTCOMES: &str = "outcomes";
    /// What notify publishes for operators and ticket systems to read.
    pub const NOTIFICATIONS: &str = "notifications";

    /// Every queue, for infrastructure and the local host.
    pub const ALL: [&str; 11] = [
        VM_EVENTS,
        PROTECTION_REQUESTS,
        KEY_VAULT_ACCESS,
        PROTECTION_READY,
        BACKUP_REQUESTS,
        JOB_TRACKING,
        RESTORE_REQUESTS,
        RESTORE_DISKS_RESTORED,
        RESTORE_VM_RECREATED,
        OUTCOMES,
        NOTIFICATIONS,
    ];
}

macro_rules! event {
    ($t:ty, $type:literal, $queue:expr) => {
        impl EventData for $t {
            const TYPE: &'static str = $type;
            const QUEUE: &'static str = $queue;
        }
    };
}

/// What made a VM a candidate for protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ProtectionCause {
    /// Event Grid reported a write of a VM carrying the tag (creation or re-tagging).
    VmWritten,
    /// The discovery sweep found a tagged VM that is not protected.
    Sweep,
    /// ADE was enabled on a tagged, unprotected VM.
    EncryptionEnabled,
}

/// A tagged VM should be protected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtectionRequested {
    pub vm_id: ResourceId,
    /// The `backup-policy` tag's value when the request was made (assess-vm reads the VM again).
    pub policy: Option<String>,
    pub cause: ProtectionCause,
    /// How many times the VM agent has been re-checked so far.
    #[serde(default)]
    pub agent_checks: u32,
}
event!(
    ProtectionRequested,
    "vmbackup.protection.requested",
    queues::PROTECTION_REQUESTS
);

/// Azure Disk Encryption was enabled on a VM (an ADE extension write).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionEnabled {
    pub vm_id: ResourceId,
}
event!(
    EncryptionEnabled,
    "vmbackup.encryption.enabled",
    queues::PROTECTION_REQUESTS
);

/// What happens once Azure Backup can read the key vaults.
// A wire type built once per invocation: boxing the large variant would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AfterAccess {
    /// Go on to enable protection.
    #[serde(rename_all = "camelCase")]
    Protect {
        vault_id: ResourceId,
        policy: String,
        encryption: EncryptionKind,
    },
    /// The VM is already protected: the grant is the end (encryption enabled on a protected VM).
    AlreadyProtected,
    /// A backup failed on key vault permissions: request it once more.
    #[serde(rename_all = "camelCase")]
    RetryBackup { retain_until: Option<DateTime<Utc>> },
}

/// Azure Backup (the Backup Management Service) needs read access to these key vaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyVaultAccessNeeded {
    pub vm_id: ResourceId,
    pub needs: Vec<KeyVaultAccessNeed>,
    pub then: AfterAccess,
}
event!(
    KeyVaultAccessNeeded,
    "vmbackup.key-vault.access-needed",
    queues::KEY_VAULT_ACCESS
);

/// Access was granted to an already-protected VM's key vaults, so its backups continue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyVaultAccessGranted {
    pub vm_id: ResourceId,
    pub key_vault_ids: Vec<ResourceId>,
}
event!(
    KeyVaultAccessGranted,
    "vmbackup.key-vault.access-granted",
    queues::OUTCOMES
);

/// Everything is in place to enable protection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtectionReady {
    pub vm_id: ResourceId,
    pub vault_id: ResourceId,
    pub policy: String,
    pub encryption: EncryptionKind,
}
event!(
    ProtectionReady,
    "vmbackup.protection.ready",
    queues::PROTECTION_READY
);

/// The VM is protected by the vault with the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtectionEnabled {
    pub vm_id: ResourceId,
    pub vault_id: ResourceId,
    pub policy: String,
    pub protected_item_id: ResourceId,
    pub encryption: EncryptionKind,
}
event!(
    ProtectionEnabled,
    "vmbackup.protection.enabled",
    queues::OUTCOMES
);

/// The VM will not be protected, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtectionRejected {
    pub vm_id: ResourceId,
    pub reason: ReasonCode,
    pub message: String,
    /// The encryption kind, when assessment got that far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionKind>,
}
event!(
    ProtectionRejected,
    "vmbackup.protection.rejected",
    queues::OUTCOMES
);

/// Who asked for a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BackupRequester {
    Sweep,
    Operator,
    /// The remedy after a key vault permission failure.
    Remedy,
}

/// An on-demand backup of a protected VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupRequested {
    pub vm_id: ResourceId,
    /// `recoveryPointExpiryTimeInUTC`; Azure keeps the point 30 days when absent.
    pub retain_until: Option<DateTime<Utc>>,
    pub requested_by: BackupRequester,
    /// The key vault remedy was already applied once for this request.
    #[serde(default)]
    pub remedy_applied: bool,
}
event!(
    BackupRequested,
    "vmbackup.backup.requested",
    queues::BACKUP_REQUESTS
);

/// The restore a job belongs to, carried from step to step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreContext {
    pub ticket_id: String,
    pub vm_id: ResourceId,
    /// `restore-disks` | `replace-existing` | `alternate-location`.
    pub mode: String,
    pub recovery_point_id: String,
    pub target_resource_group_id: ResourceId,
    /// The VM the ticket gets back, in the target resource group: recreated from the restored disks
    /// (restore-disks), created by Azure (alternate-location), or the VM itself (replace-existing).
    pub restored_vm_name: String,
    pub deployment_name: String,
    pub encryption: EncryptionKind,
    /// `linux` | `windows`.
    pub os_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

impl RestoreContext {
    /// `restored_vm_name` in the target resource group.
    pub fn restored_vm_id(
        &self,
    ) -> Result<ResourceId, crate::domain::resource_id::ResourceIdError> {
        self.target_resource_group_id.child(
            "providers/Microsoft.Compute/virtualMachines",
            &self.restored_vm_name,
        )
    }

    /// Whether Azure's restore job itself leaves the VM restored (replace-existing,
    /// alternate-location): then there is nothing to recreate.
    pub fn job_restores_the_vm(&self) -> bool {
        self.mode != RestoreMode::RestoreDisks.as_str()
    }

    pub fn replaces_existing(&self) -> bool {
        self.mode == RestoreMode::ReplaceExisting.as_str()
    }
}

/// What kind of job is tracked, with what its completion needs.
// A wire type built once per invocation: boxing the large variant would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "operation", rename_all = "kebab-case")]
pub enum TrackedJob {
    #[serde(rename_all = "camelCase")]
    Backup {
        retain_until: Option<DateTime<Utc>>,
        requested_by: BackupRequester,
        remedy_applied: bool,
    },
    Restore(RestoreContext),
}

/// An Azure Backup job was started (or found in flight); track-job follows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStarted {
    pub vm_id: ResourceId,
    pub vault_id: ResourceId,
    pub job_id: String,
    pub started_at: DateTime<Utc>,
    /// Status checks done so far (the delay grows with it).
    #[serde(default)]
    pub checks: u32,
    pub job: TrackedJob,
}
event!(JobStarted, "vmbackup.job.started", queues::JOB_TRACKING);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupCompleted {
    pub vm_id: ResourceId,
    pub vault_id: ResourceId,
    pub job_id: String,
    /// `Completed` or `CompletedWithWarnings`.
    pub status: String,
}
event!(
    BackupCompleted,
    "vmbackup.backup.completed",
    queues::OUTCOMES
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupFailed {
    pub vm_id: ResourceId,
    pub job_id: Option<String>,
    pub reason: ReasonCode,
    pub message: String,
    /// Azure's own error code, e.g. `UserErrorVmNotInDesirableState`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_code: Option<String>,
}
event!(BackupFailed, "vmbackup.backup.failed", queues::OUTCOMES);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupRejected {
    pub vm_id: ResourceId,
    pub reason: ReasonCode,
    pub message: String,
}
event!(BackupRejected, "vmbackup.backup.rejected", queues::OUTCOMES);

/// A ticket asks for a restore. This is the public inbound contract (README): fields arrive as text
/// and start-restore validates them, answering `restore.rejected` with a reason when they are wrong.
pub type RestoreRequested = RestoreRequestFields;
event!(
    RestoreRequestFields,
    "vmbackup.restore.requested",
    queues::RESTORE_REQUESTS
);

/// The RestoreDisks job completed: the disks, the generated template and the encryption info exist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreDisksRestored {
    pub restore: RestoreContext,
    pub job_id: String,
    pub template_blob_uri: Option<String>,
    pub config_blob_uri: Option<String>,
    pub encryption_info_blob_uri: Option<String>,
    pub target_storage_account_id: Option<ResourceId>,
}
event!(
    RestoreDisksRestored,
    "vmbackup.restore.disks-restored",
    queues::RESTORE_DISKS_RESTORED
);

/// The VM was recreated from the restored disks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreVmRecreated {
    pub restore: RestoreContext,
    pub restored_vm_id: ResourceId,
    pub encryption_info_blob_uri: Option<String>,
}
event!(
    RestoreVmRecreated,
    "vmbackup.restore.vm-recreated",
    queues::RESTORE_VM_RECREATED
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreCompleted {
    pub ticket_id: String,
    pub vm_id: ResourceId,
    pub restored_vm_id: ResourceId,
    pub ade_reinstalled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}
event!(
    RestoreCompleted,
    "vmbackup.restore.completed",
    queues::OUTCOMES
);

/// A restore request that will not be carried out. Ids are text: the request may be malformed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreRejected {
    pub ticket_id: Option<String>,
    pub vm_id: Option<String>,
    pub reason: ReasonCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}
event!(
    RestoreRejected,
    "vmbackup.restore.rejected",
    queues::OUTCOMES
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreFailed {
    pub ticket_id: String,
    pub vm_id: ResourceId,
    pub reason: ReasonCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}
event!(RestoreFailed, "vmbackup.restore.failed", queues::OUTCOMES);
