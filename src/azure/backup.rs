//! Recovery Services: vaults, backup policies, protectable and protected items, on-demand backups,
//! jobs, recovery points and restores of IaaS VMs.

use super::error::AzureError;
use super::pipeline::{decode_resource, ApiRequest, ArmClient};
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Recovery Services Backup (bms.json).
pub const BACKUP_API_VERSION: &str = "2026-02-01";
/// Recovery Services vaults.
pub const VAULTS_API_VERSION: &str = "2026-08-01";
/// The only fabric IaaS VMs live in.
pub const AZURE_FABRIC: &str = "Azure";
const IAAS_VM_FILTER: &str = "backupManagementType eq 'AzureIaasVM'";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RecoveryServicesVault {
    pub id: String,
    pub name: String,
    pub location: String,
    pub properties: RecoveryServicesVaultProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RecoveryServicesVaultProperties {
    pub provisioning_state: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct BackupPolicy {
    pub id: String,
    pub name: String,
    pub properties: BackupPolicyProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct BackupPolicyProperties {
    pub backup_management_type: Option<String>,
    /// `V1` or `V2` (Enhanced); absent on V1 policies.
    pub policy_type: Option<String>,
    pub protected_items_count: Option<i64>,
    pub time_zone: Option<String>,
    pub schedule_policy: Option<Value>,
    pub retention_policy: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ProtectableItem {
    pub id: String,
    pub name: String,
    pub properties: ProtectableItemProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ProtectableItemProperties {
    pub backup_management_type: Option<String>,
    pub friendly_name: Option<String>,
    pub protectable_item_type: Option<String>,
    pub protection_state: Option<String>,
    pub virtual_machine_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ProtectedItem {
    pub id: String,
    pub name: String,
    pub properties: ProtectedItemProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ProtectedItemProperties {
    pub protected_item_type: Option<String>,
    pub friendly_name: Option<String>,
    pub source_resource_id: Option<String>,
    pub virtual_machine_id: Option<String>,
    pub policy_id: Option<String>,
    pub policy_type: Option<String>,
    pub protection_state: Option<String>,
    pub protection_status: Option<String>,
    pub health_status: Option<String>,
    pub last_backup_status: Option<String>,
    pub last_backup_time: Option<DateTime<Utc>>,
    pub last_recovery_point: Option<DateTime<Utc>>,
    pub container_name: Option<String>,
}

/// Answer of `backupStatus`: is this VM protected, and where.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct BackupStatus {
    pub protection_status: Option<String>,
    pub vault_id: Option<String>,
    pub fabric_name: Option<String>,
    pub container_name: Option<String>,
    pub protected_item_name: Option<String>,
    pub policy_name: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct BackupJob {
    pub id: String,
    pub name: String,
    pub properties: BackupJobProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct BackupJobProperties {
    pub job_type: Option<String>,
    /// `Backup`, `Restore`, `ConfigureBackup`, …
    pub operation: Option<String>,
    /// `InProgress`, `Completed`, `Failed`, `CompletedWithWarnings`, `Cancelled`, `Cancelling`.
    pub status: Option<String>,
    pub entity_friendly_name: Option<String>,
    pub activity_id: Option<String>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    pub duration: Option<String>,
    pub error_details: Vec<JobErrorDetail>,
    pub extended_info: Option<JobExtendedInfo>,
    /// `iaasvmcontainerv2;{resource group};{vm}`: which item the job is about.
    pub container_name: Option<String>,
    /// False for the policy's scheduled backups.
    pub is_user_triggered: Option<bool>,
}

impl BackupJobProperties {
    pub fn is_finished(&self) -> bool {
        !matches!(
            self.status.as_deref(),
            None | Some("InProgress") | Some("Cancelling")
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct JobErrorDetail {
    /// The swagger types this as an integer; Azure Backup's named codes
    /// (`UserErrorKeyVaultPermissionsNotConfigured`) arrive as text: both are kept as text.
    #[serde(deserialize_with = "optional_code")]
    pub error_code: Option<String>,
    pub error_string: Option<String>,
    pub error_title: Option<String>,
    pub recommendations: Vec<String>,
}

fn optional_code<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) if !s.trim().is_empty() => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct JobExtendedInfo {
    pub tasks_list: Vec<JobTask>,
    /// For restores: "Target Storage Account Name", "Config Blob Container Name", "Encryption Info Blob Name", …
    pub property_bag: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct JobTask {
    pub task_id: Option<String>,
    pub status: Option<String>,
    pub duration: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RecoveryPoint {
    pub id: String,
    pub name: String,
    pub properties: RecoveryPointProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RecoveryPointProperties {
    pub object_type: Option<String>,
    pub recovery_point_type: Option<String>,
    pub recovery_point_time: Option<DateTime<Utc>>,
    #[serde(rename = "isSourceVMEncrypted")]
    pub is_source_vm_encrypted: Option<bool>,
    pub is_managed_virtual_machine: Option<bool>,
    pub os_type: Option<String>,
    pub zones: Vec<String>,
    pub key_and_secret: Option<KeyAndSecretDetails>,
    pub recovery_point_tier_details: Vec<RecoveryPointTier>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RecoveryPointTier {
    #[serde(rename = "type")]
    pub tier_type: Option<String>,
    pub status: Option<String>,
}

/// The BEK and KEK an encrypted VM used at backup time.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KeyAndSecretDetails {
    pub kek_details: Option<KekDetails>,
    pub bek_details: Option<BekDetails>,
    pub encryption_mechanism: Option<String>,
}

/// `key_backup_data` is key material: `Debug` leaves it out.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KekDetails {
    pub key_url: Option<String>,
    pub key_vault_id: Option<String>,
    pub key_backup_data: Option<String>,
}

impl std::fmt::Debug for KekDetails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KekDetails")
            .field("key_url", &self.key_url)
            .field("key_vault_id", &self.key_vault_id)
            .finish_non_exhaustive()
    }
}

/// `secret_data` is key material: `Debug` leaves it out.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct BekDetails {
    pub secret_url: Option<String>,
    pub secret_vault_id: Option<String>,
    pub secret_data: Option<String>,
}

impl std::fmt::Debug for BekDetails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BekDetails")
            .field("secret_url", &self.secret_url)
            .field("secret_vault_id", &self.secret_vault_id)
            .finish_non_exhaustive()
    }
}

/// `encryptionDetails` of a restore request.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionDetails {
    pub encryption_enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kek_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_key_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kek_vault_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_key_vault_id: Option<String>,
}

/// `recoveryType` of an IaaS VM restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RecoveryType {
    RestoreDisks,
    AlternateLocation,
    OriginalLocation,
}

/// An `IaasVMRestoreRequest`: [`IaasVmRestoreRequest::restore_disks`] (the only kind Azure allows
/// for ADE VMs), [`IaasVmRestoreRequest::original_location`], [`IaasVmRestoreRequest::alternate_location`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IaasVmRestoreRequest {
    pub recovery_point_id: String,
    pub recovery_type: RecoveryType,
    pub source_resource_id: String,
    pub region: String,
    pub storage_account_id: String,
    pub original_storage_account_option: bool,
    pub create_new_cloud_service: bool,
    pub encryption_details: EncryptionDetails,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_resource_group_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_virtual_machine_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_network_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zones: Option<Vec<String>>,
    /// The identity the restore uses to write to the target (system-assigned or a user-assigned id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_info: Option<IdentityInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityInfo {
    pub is_system_assigned_identity: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_identity_resource_id: Option<String>,
}

impl IaasVmRestoreRequest {
    /// Restore the disks of `source_vm_id` from a recovery point into `target_resource_group_id`,
    /// staging through `storage_account_id` (its config blob holds the VM template).
    pub fn restore_disks(
        recovery_point_id: &str,
        source_vm_id: &str,
        region: &str,
        storage_account_id: &str,
        target_resource_group_id: Option<&str>,
        encryption_details: EncryptionDetails,
    ) -> Self {
        IaasVmRestoreRequest {
            recovery_point_id: recovery_point_id.to_string(),
            recovery_type: RecoveryType::RestoreDisks,
            source_resource_id: source_vm_id.to_string(),
            region: region.to_string(),
            storage_account_id: storage_account_id.to_string(),
            original_storage_account_option: false,
            create_new_cloud_service: false,
            encryption_details,
            target_resource_group_id: target_resource_group_id.map(str::to_string),
            target_virtual_machine_id: None,
            virtual_network_id: None,
            subnet_id: None,
            zones: None,
            identity_info: None,
        }
    }

    /// Replace the disks of `source_vm_id` in place (`OriginalLocation`, non-ADE VMs only), staging
    /// through `storage_account_id`, as Azure Backup's REST guide shows it.
    pub fn original_location(
        recovery_point_id: &str,
        source_vm_id: &str,
        region: &str,
        storage_account_id: &str,
    ) -> Self {
        IaasVmRestoreRequest {
            recovery_type: RecoveryType::OriginalLocation,
            ..Self::restore_disks(
                recovery_point_id,
                source_vm_id,
                region,
                storage_account_id,
                None,
                EncryptionDetails::default(),
            )
        }
    }

    /// Create `target_vm_id` from the point (`AlternateLocation`, non-ADE VMs only), its NIC in
    /// `subnet_id` of `virtual_network_id`.
    pub fn alternate_location(
        recovery_point_id: &str,
        source_vm_id: &str,
        region: &str,
        storage_account_id: &str,
        target_vm_id: &str,
        target_resource_group_id: &str,
        (virtual_network_id, subnet_id): (&str, &str),
    ) -> Self {
        IaasVmRestoreRequest {
            recovery_type: RecoveryType::AlternateLocation,
            target_virtual_machine_id: Some(target_vm_id.to_string()),
            virtual_network_id: Some(virtual_network_id.to_string()),
            subnet_id: Some(subnet_id.to_string()),
            ..Self::restore_disks(
                recovery_point_id,
                source_vm_id,
                region,
                storage_account_id,
                Some(target_resource_group_id),
                EncryptionDetails::default(),
            )
        }
    }

    pub fn to_body(&self) -> Value {
        let mut properties = serde_json::to_value(self).unwrap_or_else(|_| json!({}));
        properties["objectType"] = json!("IaasVMRestoreRequest");
        json!({ "properties": properties })
    }
}

/// Where a VM's protected item lives in a vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedItemRef {
    pub vault_id: String,
    pub container_name: String,
    pub protected_item_name: String,
}

impl ProtectedItemRef {
    /// The names Azure Backup gives an ARM VM: `IaasVMContainer;iaasvmcontainerv2;{rg};{vm}` and
    /// `VM;iaasvmcontainerv2;{rg};{vm}`.
    pub fn for_vm(vault_id: &str, vm_id: &str) -> Result<Self, AzureError> {
        let (resource_group, vm_name) = vm_rg_and_name(vm_id)?;
        Ok(ProtectedItemRef {
            vault_id: vault_id.trim_end_matches('/').to_string(),
            container_name: format!("IaasVMContainer;iaasvmcontainerv2;{resource_group};{vm_name}"),
            protected_item_name: format!("VM;iaasvmcontainerv2;{resource_group};{vm_name}"),
        })
    }

    /// From a `backupStatus` answer.
    pub fn from_backup_status(status: &BackupStatus) -> Option<Self> {
        Some(ProtectedItemRef {
            vault_id: status.vault_id.clone()?,
            container_name: status.container_name.clone()?,
            protected_item_name: status.protected_item_name.clone()?,
        })
    }

    pub fn path(&self) -> String {
        format!(
            "{}/backupFabrics/{AZURE_FABRIC}/protectionContainers/{}/protectedItems/{}",
            self.vault_id, self.container_name, self.protected_item_name
        )
    }
}

/// `(resource group, VM name)` of a VM id.
fn vm_rg_and_name(vm_id: &str) -> Result<(String, String), AzureError> {
    let parts: Vec<&str> = vm_id.trim_matches('/').split('/').collect();
    let find = |key: &str| {
        parts
            .windows(2)
            .find(|w| w[0].eq_ignore_ascii_case(key))
            .map(|w| w[1].to_string())
    };
    match (find("resourceGroups"), find("virtualMachines")) {
        (Some(rg), Some(name)) if !rg.is_empty() && !name.is_empty() => Ok((rg, name)),
        _ => Err(AzureError::InvalidInput {
            field: "vm_id".into(),
            message: format!("{vm_id:?} is not a virtual machine resource id"),
        }),
    }
}

/// Body of the protected-item PUT that enables protection of an ARM VM.
pub fn enable_protection_body(vm_id: &str, policy_id: &str) -> Value {
    json!({
        "properties": {
            "protectedItemType": "Microsoft.Compute/virtualMachines",
            "sourceResourceId": vm_id,
            "policyId": policy_id,
        }
    })
}

/// Body of an on-demand backup; `expiry` sets how long the recovery point is kept.
pub fn backup_request_body(expiry: Option<DateTime<Utc>>) -> Value {
    let mut properties = json!({ "objectType": "IaasVMBackupRequest" });
    if let Some(expiry) = expiry {
        properties["recoveryPointExpiryTimeInUTC"] =
            json!(expiry.to_rfc3339_opts(SecondsFormat::Secs, true));
    }
    json!({ "properties": properties })
}

#[derive(Debug, Clone)]
pub struct BackupClient {
    arm: ArmClient,
}

impl BackupClient {
    pub fn new(arm: ArmClient) -> Self {
        BackupClient { arm }
    }

    fn url(&self, path: &str) -> Result<url::Url, AzureError> {
        self.arm.arm_url(path, BACKUP_API_VERSION)
    }

    fn filtered(&self, path: &str, filter: Option<&str>) -> Result<url::Url, AzureError> {
        let mut url = self.url(path)?;
        if let Some(filter) = filter {
            url.query_pairs_mut().append_pair("$filter", filter);
        }
        Ok(url)
    }

    /// All Recovery Services vaults of a subscription.
    pub async fn list_vaults(
        &self,
        subscription_id: &str,
    ) -> Result<Vec<RecoveryServicesVault>, AzureError> {
        let url = self.arm.arm_url(
            &format!(
                "/subscriptions/{subscription_id}/providers/Microsoft.RecoveryServices/vaults"
            ),
            VAULTS_API_VERSION,
        )?;
        self.arm.list_all(ApiRequest::arm(Method::GET, url)).await
    }

    pub async fn get_vault(&self, vault_id: &str) -> Result<RecoveryServicesVault, AzureError> {
        self.arm
            .get_json(self.arm.arm_url(vault_id, VAULTS_API_VERSION)?)
            .await
    }

    pub async fn get_policy(
        &self,
        vault_id: &str,
        policy_name: &str,
    ) -> Result<BackupPolicy, AzureError> {
        self.arm
            .get_json(self.url(&format!("{vault_id}/backupPolicies/{policy_name}"))?)
            .await
    }

    /// The vault's IaaS VM policies.
    pub async fn list_policies(&self, vault_id: &str) -> Result<Vec<BackupPolicy>, AzureError> {
        let url = self.filtered(&format!("{vault_id}/backupPolicies"), Some(IAAS_VM_FILTER))?;
        self.arm.list_all(ApiRequest::arm(Method::GET, url)).await
    }

    /// Asks the vault to discover new VMs and waits until it has.
    pub async fn refresh_containers(&self, vault_id: &str) -> Result<(), AzureError> {
        let url = self.filtered(
            &format!("{vault_id}/backupFabrics/{AZURE_FABRIC}/refreshContainers"),
            Some(IAAS_VM_FILTER),
        )?;
        self.arm
            .send_lro(ApiRequest::arm(Method::POST, url))
            .await?;
        Ok(())
    }

    /// VMs the vault can protect (discovered, not yet protected).
    pub async fn list_protectable_items(
        &self,
        vault_id: &str,
    ) -> Result<Vec<ProtectableItem>, AzureError> {
        let url = self.filtered(
            &format!("{vault_id}/backupProtectableItems"),
            Some(IAAS_VM_FILTER),
        )?;
        self.arm.list_all(ApiRequest::arm(Method::GET, url)).await
    }

    /// Enables protection of a VM with a policy and waits for the configure operation.
    pub async fn enable_protection(
        &self,
        item: &ProtectedItemRef,
        vm_id: &str,
        policy_id: &str,
    ) -> Result<ProtectedItem, AzureError> {
        let body = enable_protection_body(vm_id, policy_id);
        let outcome = self
            .arm
            .send_lro(ApiRequest::arm(Method::PUT, self.url(&item.path())?).json(body))
            .await?;
        decode_resource(outcome.resource, &item.path())
    }

    pub async fn get_protected_item(
        &self,
        item: &ProtectedItemRef,
    ) -> Result<ProtectedItem, AzureError> {
        self.arm.get_json(self.url(&item.path())?).await
    }

    /// The vault's protected IaaS VMs.
    pub async fn list_protected_items(
        &self,
        vault_id: &str,
    ) -> Result<Vec<ProtectedItem>, AzureError> {
        let url = self.filtered(
            &format!("{vault_id}/backupProtectedItems"),
            Some("backupManagementType eq 'AzureIaasVM' and itemType eq 'VM'"),
        )?;
        self.arm.list_all(ApiRequest::arm(Method::GET, url)).await
    }

    /// Whether a VM is protected and by which vault (asked in the VM's region).
    pub async fn backup_status(
        &self,
        subscription_id: &str,
        region: &str,
        vm_id: &str,
    ) -> Result<BackupStatus, AzureError> {
        let url = self.url(&format!(
            "/subscriptions/{subscription_id}/providers/Microsoft.RecoveryServices/locations/{region}/backupStatus"
        ))?;
        let body = json!({ "resourceId": vm_id, "resourceType": "VM" });
        self.arm
            .send(ApiRequest::arm(Method::POST, url).json(body))
            .await?
            .json()
    }

    /// Starts an on-demand backup; returns the backup job's id once the trigger is accepted.
    pub async fn trigger_backup(
        &self,
        item: &ProtectedItemRef,
        expiry: Option<DateTime<Utc>>,
    ) -> Result<Option<String>, AzureError> {
        let url = self.url(&format!("{}/backup", item.path()))?;
        let outcome = self
            .arm
            .send_lro(ApiRequest::arm(Method::POST, url).json(backup_request_body(expiry)))
            .await?;
        Ok(outcome.job_id())
    }

    pub async fn get_job(&self, vault_id: &str, job_name: &str) -> Result<BackupJob, AzureError> {
        self.arm
            .get_json(self.url(&format!("{vault_id}/backupJobs/{job_name}"))?)
            .await
    }

    /// Jobs matching an OData `$filter`, e.g. `operation eq 'Backup' and status eq 'InProgress'`.
    pub async fn list_jobs(
        &self,
        vault_id: &str,
        filter: Option<&str>,
    ) -> Result<Vec<BackupJob>, AzureError> {
        let url = self.filtered(&format!("{vault_id}/backupJobs"), filter)?;
        self.arm.list_all(ApiRequest::arm(Method::GET, url)).await
    }

    pub async fn list_recovery_points(
        &self,
        item: &ProtectedItemRef,
        filter: Option<&str>,
    ) -> Result<Vec<RecoveryPoint>, AzureError> {
        let url = self.filtered(&format!("{}/recoveryPoints", item.path()), filter)?;
        self.arm.list_all(ApiRequest::arm(Method::GET, url)).await
    }

    /// One recovery point, with `keyAndSecret` for encrypted VMs.
    pub async fn get_recovery_point(
        &self,
        item: &ProtectedItemRef,
        recovery_point_id: &str,
    ) -> Result<RecoveryPoint, AzureError> {
        self.arm
            .get_json(self.url(&format!(
                "{}/recoveryPoints/{recovery_point_id}",
                item.path()
            ))?)
            .await
    }

    /// Starts a restore; returns the restore job's id once the trigger is accepted.
    pub async fn trigger_restore(
        &self,
        item: &ProtectedItemRef,
        request: &IaasVmRestoreRequest,
    ) -> Result<Option<String>, AzureError> {
        let url = self.url(&format!(
            "{}/recoveryPoints/{}/restore",
            item.path(),
            request.recovery_point_id
        ))?;
        let outcome = self
            .arm
            .send_lro(ApiRequest::arm(Method::POST, url).json(request.to_body()))
            .await?;
        Ok(outcome.job_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_item_names_from_vm_id() {
        let item = ProtectedItemRef::for_vm(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.RecoveryServices/vaults/v",
            "/subscriptions/s/resourceGroups/app-rg/providers/Microsoft.Compute/virtualMachines/vm1",
        )
        .unwrap();
        assert_eq!(
            item.container_name,
            "IaasVMContainer;iaasvmcontainerv2;app-rg;vm1"
        );
        assert_eq!(item.protected_item_name, "VM;iaasvmcontainerv2;app-rg;vm1");
        assert!(item.path().ends_with("/backupFabrics/Azure/protectionContainers/IaasVMContainer;iaasvmcontainerv2;app-rg;vm1/protectedItems/VM;iaasvmcontainerv2;app-rg;vm1"));
        let err = ProtectedItemRef::for_vm("/v", "/subscriptions/s/resourceGroups/rg").unwrap_err();
        assert!(err.to_string().contains("vm_id"));
    }

    #[test]
    fn restore_disks_body_has_object_type_and_encryption_details() {
        let request = IaasVmRestoreRequest::restore_disks(
            "123",
            "/vm",
            "westus",
            "/sa",
            None,
            EncryptionDetails {
                encryption_enabled: true,
                kek_url: Some("https://kv/keys/k/1".into()),
                ..Default::default()
            },
        );
        let body = request.to_body();
        assert_eq!(body["properties"]["objectType"], "IaasVMRestoreRequest");
        assert_eq!(body["properties"]["recoveryType"], "RestoreDisks");
        assert_eq!(
            body["properties"]["encryptionDetails"]["encryptionEnabled"],
            true
        );
        assert_eq!(
            body["properties"]["encryptionDetails"]["kekUrl"],
            "https://kv/keys/k/1"
        );
        assert!(body["properties"].get("targetResourceGroupId").is_none());
    }

    #[test]
    fn original_and_alternate_location_bodies_carry_their_targets() {
        let olr = IaasVmRestoreRequest::original_location("1", "/vm", "westus", "/sa").to_body();
        assert_eq!(olr["properties"]["recoveryType"], "OriginalLocation");
        assert_eq!(olr["properties"]["storageAccountId"], "/sa");
        assert_eq!(
            olr["properties"]["encryptionDetails"]["encryptionEnabled"],
            false
        );
        assert!(olr["properties"].get("targetVirtualMachineId").is_none());
        let alr = IaasVmRestoreRequest::alternate_location(
            "1",
            "/vm",
            "westus",
            "/sa",
            "/rg/vm2",
            "/rg",
            ("/vnet", "/vnet/subnets/s"),
        )
        .to_body();
        let p = &alr["properties"];
        assert_eq!(p["recoveryType"], "AlternateLocation");
        assert_eq!(
            (
                p["targetVirtualMachineId"].as_str(),
                p["targetResourceGroupId"].as_str()
            ),
            (Some("/rg/vm2"), Some("/rg"))
        );
        assert_eq!(
            (p["virtualNetworkId"].as_str(), p["subnetId"].as_str()),
            (Some("/vnet"), Some("/vnet/subnets/s"))
        );
        assert_eq!(p["region"], "westus");
        assert_eq!(p["sourceResourceId"], "/vm");
    }

    #[test]
    fn job_error_codes_are_text_whether_named_or_numeric() {
        let job: BackupJob = serde_json::from_value(json!({ "properties": {
            "containerName": "iaasvmcontainerv2;rg;vm1", "isUserTriggered": true,
            "errorDetails": [
                { "errorCode": "UserErrorKeyVaultPermissionsNotConfigured", "errorString": "no access" },
                { "errorCode": 400094, "errorString": "not found" },
                { "errorString": "no code" }
            ] } }))
        .unwrap();
        let codes: Vec<Option<&str>> = job
            .properties
            .error_details
            .iter()
            .map(|e| e.error_code.as_deref())
            .collect();
        assert_eq!(
            codes,
            [
                Some("UserErrorKeyVaultPermissionsNotConfigured"),
                Some("400094"),
                None
            ]
        );
        assert_eq!(
            job.properties.container_name.as_deref(),
            Some("iaasvmcontainerv2;rg;vm1")
        );
    }

    #[test]
    fn key_material_is_not_in_debug_output() {
        let details = KeyAndSecretDetails {
            kek_details: Some(KekDetails {
                key_backup_data: Some("KEYMATERIAL".into()),
                ..Default::default()
            }),
            bek_details: Some(BekDetails {
                secret_data: Some("SECRETMATERIAL".into()),
                ..Default::default()
            }),
            encryption_mechanism: None,
        };
        let text = format!("{details:?}");
        assert!(!text.contains("KEYMATERIAL") && !text.contains("SECRETMATERIAL"));
    }
}
