//! Compute: VMs with instance view, disks, disk encryption sets, extensions; tags on any resource;
//! a VM's network interface (for its subnet).

use super::error::AzureError;
use super::pipeline::{decode_resource, ApiRequest, ArmClient};
use reqwest::header::{HeaderValue, IF_MATCH};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// VMs and extensions (ComputeRP swagger).
pub const COMPUTE_API_VERSION: &str = "2025-11-01";
/// Disks and disk encryption sets (DiskRP swagger).
pub const DISK_API_VERSION: &str = "2025-01-02";
/// `Microsoft.Resources/tags`.
pub const TAGS_API_VERSION: &str = "2025-04-01";
/// Network interfaces (Microsoft.Network swagger).
pub const NETWORK_API_VERSION: &str = "2024-05-01";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRef {
    #[serde(default)]
    pub id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VirtualMachine {
    pub id: String,
    pub name: String,
    pub location: String,
    pub tags: BTreeMap<String, String>,
    pub zones: Vec<String>,
    /// The model's version (`"3"`), for `If-Match` on a later write.
    pub etag: Option<String>,
    pub properties: VmProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VmProperties {
    pub vm_id: Option<String>,
    pub provisioning_state: Option<String>,
    pub hardware_profile: Option<HardwareProfile>,
    pub storage_profile: StorageProfile,
    pub os_profile: Option<OsProfile>,
    pub security_profile: Option<SecurityProfile>,
    pub network_profile: Option<NetworkProfile>,
    pub instance_view: Option<VmInstanceView>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct NetworkProfile {
    pub network_interfaces: Vec<NetworkInterfaceRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct NetworkInterfaceRef {
    pub id: String,
    pub properties: Option<PrimaryFlag>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PrimaryFlag {
    pub primary: Option<bool>,
}

impl VirtualMachine {
    /// The id of the VM's primary NIC (the only one, or the one marked primary).
    pub fn primary_nic_id(&self) -> Option<&str> {
        let nics = &self.properties.network_profile.as_ref()?.network_interfaces;
        let primary = |nic: &&NetworkInterfaceRef| {
            nic.properties
                .as_ref()
                .and_then(|p| p.primary)
                .unwrap_or(false)
        };
        nics.iter()
            .find(primary)
            .or_else(|| (nics.len() == 1).then(|| &nics[0]))
            .map(|nic| nic.id.as_str())
            .filter(|id| !id.is_empty())
    }
}

/// A network interface, as far as its subnet.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct NetworkInterface {
    pub id: String,
    pub location: String,
    pub properties: NetworkInterfaceProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct NetworkInterfaceProperties {
    pub ip_configurations: Vec<IpConfiguration>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct IpConfiguration {
    pub name: String,
    pub properties: IpConfigurationProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct IpConfigurationProperties {
    pub primary: Option<bool>,
    pub subnet: Option<IdRef>,
}

impl NetworkInterface {
    /// The subnet of the primary IP configuration (the only one, or the one marked primary).
    pub fn primary_subnet_id(&self) -> Option<&str> {
        let configs = &self.properties.ip_configurations;
        configs
            .iter()
            .find(|c| c.properties.primary.unwrap_or(false))
            .or_else(|| configs.first())
            .and_then(|c| c.properties.subnet.as_ref())
            .map(|s| s.id.as_str())
            .filter(|id| !id.is_empty())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HardwareProfile {
    pub vm_size: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SecurityProfile {
    pub encryption_at_host: Option<bool>,
    pub security_type: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OsProfile {
    pub computer_name: Option<String>,
    pub windows_configuration: Option<GuestConfiguration>,
    pub linux_configuration: Option<GuestConfiguration>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct GuestConfiguration {
    #[serde(rename = "provisionVMAgent")]
    pub provision_vm_agent: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct StorageProfile {
    pub os_disk: Option<OsDisk>,
    pub data_disks: Vec<DataDisk>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OsDisk {
    pub name: Option<String>,
    pub os_type: Option<String>,
    pub create_option: Option<String>,
    pub managed_disk: Option<ManagedDiskRef>,
    /// ADE settings as the VM model carries them (unmanaged disks and older VMs).
    pub encryption_settings: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DataDisk {
    pub lun: i32,
    pub name: Option<String>,
    pub create_option: Option<String>,
    pub managed_disk: Option<ManagedDiskRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ManagedDiskRef {
    pub id: Option<String>,
    pub storage_account_type: Option<String>,
    pub disk_encryption_set: Option<IdRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VmInstanceView {
    pub computer_name: Option<String>,
    pub os_name: Option<String>,
    pub vm_agent: Option<VmAgent>,
    pub extensions: Vec<ExtensionInstanceView>,
    pub statuses: Vec<InstanceViewStatus>,
}

impl VmInstanceView {
    /// `PowerState/running` → `running`.
    pub fn power_state(&self) -> Option<&str> {
        self.statuses
            .iter()
            .find_map(|s| s.code.strip_prefix("PowerState/"))
    }

    /// The guest agent reports itself ready (`ProvisioningState/succeeded`, display "Ready").
    pub fn agent_ready(&self) -> bool {
        self.vm_agent.as_ref().is_some_and(|agent| {
            agent.statuses.iter().any(|s| {
                s.display_status
                    .as_deref()
                    .is_some_and(|d| d.eq_ignore_ascii_case("Ready"))
            })
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VmAgent {
    pub vm_agent_version: Option<String>,
    pub statuses: Vec<InstanceViewStatus>,
    pub extension_handlers: Vec<ExtensionHandler>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ExtensionHandler {
    #[serde(rename = "type")]
    pub handler_type: Option<String>,
    pub type_handler_version: Option<String>,
    pub status: Option<InstanceViewStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ExtensionInstanceView {
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub extension_type: Option<String>,
    pub type_handler_version: Option<String>,
    pub statuses: Vec<InstanceViewStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct InstanceViewStatus {
    pub code: String,
    pub level: Option<String>,
    pub display_status: Option<String>,
    pub message: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Disk {
    pub id: String,
    pub name: String,
    pub location: String,
    pub managed_by: Option<String>,
    pub properties: DiskProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DiskProperties {
    pub os_type: Option<String>,
    #[serde(rename = "diskSizeGB")]
    pub disk_size_gb: Option<i64>,
    pub disk_state: Option<String>,
    pub provisioning_state: Option<String>,
    pub encryption_settings_collection: Option<EncryptionSettingsCollection>,
    pub encryption: Option<DiskEncryption>,
}

/// Azure Disk Encryption settings on a managed disk.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EncryptionSettingsCollection {
    pub enabled: bool,
    pub encryption_settings: Vec<EncryptionSettingsElement>,
    pub encryption_settings_version: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EncryptionSettingsElement {
    /// The BEK: a Key Vault secret.
    pub disk_encryption_key: Option<KeyVaultSecretReference>,
    /// The KEK, when the BEK is wrapped.
    pub key_encryption_key: Option<KeyVaultKeyReference>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KeyVaultSecretReference {
    pub secret_url: String,
    pub source_vault: IdRef,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KeyVaultKeyReference {
    pub key_url: String,
    pub source_vault: IdRef,
}

/// Server-side encryption: platform key, customer key through a disk encryption set, or both.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DiskEncryption {
    #[serde(rename = "type")]
    pub encryption_type: Option<String>,
    pub disk_encryption_set_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DiskEncryptionSet {
    pub id: String,
    pub name: String,
    pub location: String,
    pub properties: DiskEncryptionSetProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DiskEncryptionSetProperties {
    pub encryption_type: Option<String>,
    pub active_key: Option<DesKey>,
    pub provisioning_state: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DesKey {
    pub key_url: String,
    pub source_vault: Option<IdRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VmExtension {
    pub id: String,
    pub name: String,
    pub location: Option<String>,
    pub properties: VmExtensionProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VmExtensionProperties {
    pub publisher: Option<String>,
    #[serde(rename = "type")]
    pub extension_type: Option<String>,
    pub type_handler_version: Option<String>,
    pub provisioning_state: Option<String>,
    pub settings: Option<Value>,
    pub instance_view: Option<ExtensionInstanceView>,
}

/// Body of an extension PUT. `protected_settings` travel to Azure only; they are never logged.
#[derive(Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmExtensionParameters {
    pub location: String,
    pub publisher: String,
    pub extension_type: String,
    pub type_handler_version: String,
    pub auto_upgrade_minor_version: bool,
    pub settings: Value,
    pub protected_settings: Option<Value>,
}

impl std::fmt::Debug for VmExtensionParameters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmExtensionParameters")
            .field("publisher", &self.publisher)
            .field("extension_type", &self.extension_type)
            .field("type_handler_version", &self.type_handler_version)
            .finish_non_exhaustive()
    }
}

impl VmExtensionParameters {
    fn to_body(&self) -> Value {
        let mut properties = json!({
            "publisher": self.publisher,
            "type": self.extension_type,
            "typeHandlerVersion": self.type_handler_version,
            "autoUpgradeMinorVersion": self.auto_upgrade_minor_version,
            "settings": self.settings,
        });
        if let Some(protected) = &self.protected_settings {
            properties["protectedSettings"] = protected.clone();
        }
        json!({ "location": self.location, "properties": properties })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TagsResource {
    pub id: Option<String>,
    pub properties: TagsProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct TagsProperties {
    pub tags: BTreeMap<String, String>,
}

/// How a tags PATCH combines with existing tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagsOperation {
    Merge,
    Replace,
    Delete,
}

/// Body of a `Microsoft.Resources/tags/default` PATCH.
pub fn tags_patch_body(operation: TagsOperation, tags: &BTreeMap<String, String>) -> Value {
    json!({
        "operation": format!("{operation:?}"),
        "properties": { "tags": tags },
    })
}

/// A write sent with `If-Match` found the resource changed since it was read (HTTP 412
/// `PreconditionFailed`): read it again and decide again. Never retried by the pipeline.
pub fn is_precondition_failed(error: &AzureError) -> bool {
    error.status() == Some(412) || error.has_code("PreconditionFailed")
}

#[derive(Debug, Clone)]
pub struct ComputeClient {
    arm: ArmClient,
}

impl ComputeClient {
    pub fn new(arm: ArmClient) -> Self {
        ComputeClient { arm }
    }

    /// The VM model; with `instance_view` also agent, extension and power states.
    pub async fn get_vm(
        &self,
        vm_id: &str,
        instance_view: bool,
    ) -> Result<VirtualMachine, AzureError> {
        let mut url = self.arm.arm_url(vm_id, COMPUTE_API_VERSION)?;
        if instance_view {
            url.query_pairs_mut().append_pair("$expand", "instanceView");
        }
        self.arm.get_json(url).await
    }

    /// Replaces a VM's tags with `tags` (VM PATCH replaces the whole tags object: send them all),
    /// only if the VM is still at `etag` (`If-Match`); a VM changed since is
    /// [`is_precondition_failed`].
    pub async fn update_vm_tags_if_match(
        &self,
        vm_id: &str,
        tags: &BTreeMap<String, String>,
        etag: &str,
    ) -> Result<VirtualMachine, AzureError> {
        let url = self.arm.arm_url(vm_id, COMPUTE_API_VERSION)?;
        let if_match = HeaderValue::from_str(etag).map_err(|_| AzureError::InvalidInput {
            field: "etag".into(),
            message: format!("{etag:?} is not a valid If-Match header value"),
        })?;
        let mut request = ApiRequest::arm(Method::PATCH, url).json(json!({ "tags": tags }));
        request.headers.push((IF_MATCH, if_match));
        let outcome = self.arm.send_lro(request).await?;
        decode_resource(outcome.resource, vm_id)
    }

    pub async fn get_network_interface(
        &self,
        nic_id: &str,
    ) -> Result<NetworkInterface, AzureError> {
        self.arm
            .get_json(self.arm.arm_url(nic_id, NETWORK_API_VERSION)?)
            .await
    }

    pub async fn get_instance_view(&self, vm_id: &str) -> Result<VmInstanceView, AzureError> {
        let url = self
            .arm
            .arm_url(&format!("{vm_id}/instanceView"), COMPUTE_API_VERSION)?;
        self.arm.get_json(url).await
    }

    pub async fn get_disk(&self, disk_id: &str) -> Result<Disk, AzureError> {
        self.arm
            .get_json(self.arm.arm_url(disk_id, DISK_API_VERSION)?)
            .await
    }

    /// PATCHes a disk (for example its `encryptionSettingsCollection` after a restore) and waits.
    pub async fn update_disk(&self, disk_id: &str, patch: Value) -> Result<Disk, AzureError> {
        let url = self.arm.arm_url(disk_id, DISK_API_VERSION)?;
        let outcome = self
            .arm
            .send_lro(ApiRequest::arm(Method::PATCH, url).json(patch))
            .await?;
        decode_resource(outcome.resource, disk_id)
    }

    pub async fn get_disk_encryption_set(
        &self,
        des_id: &str,
    ) -> Result<DiskEncryptionSet, AzureError> {
        self.arm
            .get_json(self.arm.arm_url(des_id, DISK_API_VERSION)?)
            .await
    }

    pub async fn get_extension(&self, vm_id: &str, name: &str) -> Result<VmExtension, AzureError> {
        let url = self
            .arm
            .arm_url(&format!("{vm_id}/extensions/{name}"), COMPUTE_API_VERSION)?;
        self.arm.get_json(url).await
    }

    /// Creates or updates an extension and waits until it is provisioned.
    pub async fn put_extension(
        &self,
        vm_id: &str,
        name: &str,
        parameters: &VmExtensionParameters,
    ) -> Result<VmExtension, AzureError> {
        let url = self
            .arm
            .arm_url(&format!("{vm_id}/extensions/{name}"), COMPUTE_API_VERSION)?;
        let outcome = self
            .arm
            .send_lro(ApiRequest::arm(Method::PUT, url).json(parameters.to_body()))
            .await?;
        decode_resource(outcome.resource, vm_id)
    }

    pub async fn get_tags(&self, scope: &str) -> Result<TagsResource, AzureError> {
        let url = self.arm.arm_url(
            &format!("{scope}/providers/Microsoft.Resources/tags/default"),
            TAGS_API_VERSION,
        )?;
        self.arm.get_json(url).await
    }

    /// PATCHes tags at a scope through `Microsoft.Resources/tags/default` (does not touch the resource).
    pub async fn update_tags(
        &self,
        scope: &str,
        operation: TagsOperation,
        tags: &BTreeMap<String, String>,
    ) -> Result<TagsResource, AzureError> {
        let url = self.arm.arm_url(
            &format!("{scope}/providers/Microsoft.Resources/tags/default"),
            TAGS_API_VERSION,
        )?;
        let body = tags_patch_body(operation, tags);
        let outcome = self
            .arm
            .send_lro(ApiRequest::arm(Method::PATCH, url.clone()).json(body))
            .await?;
        match outcome.resource {
            Some(resource) => decode_resource(Some(resource), scope),
            // A 202 whose operation result is empty: read the tags back.
            None => self.arm.get_json(url).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_nic_and_subnet_are_found_as_azure_shows_them() {
        let vm: VirtualMachine =
            serde_json::from_value(json!({ "properties": { "networkProfile": {
            "networkInterfaces": [
                { "id": "/nic-b", "properties": { "primary": false } },
                { "id": "/nic-a", "properties": { "primary": true } }
            ] } } }))
            .unwrap();
        assert_eq!(vm.primary_nic_id(), Some("/nic-a"));
        let single: VirtualMachine = serde_json::from_value(
            json!({ "properties": { "networkProfile": { "networkInterfaces": [{ "id": "/nic" }] } } }),
        )
        .unwrap();
        assert_eq!(single.primary_nic_id(), Some("/nic"));
        assert_eq!(VirtualMachine::default().primary_nic_id(), None);

        let nic: NetworkInterface =
            serde_json::from_value(json!({ "properties": { "ipConfigurations": [
            { "name": "a", "properties": { "subnet": { "id": "/subnets/x" } } },
            { "name": "b", "properties": { "primary": true, "subnet": { "id": "/subnets/y" } } }
        ] } }))
            .unwrap();
        assert_eq!(nic.primary_subnet_id(), Some("/subnets/y"));
    }
}
