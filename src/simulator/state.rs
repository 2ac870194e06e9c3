//! The simulated estate: typed resources, jobs, operations and blobs, built from a [`Fleet`].
//!
//! Resources are kept as typed records and rendered to the JSON shapes of the real APIs by the provider
//! modules. Time-driven changes (jobs finishing, deployments completing) happen lazily in
//! [`SimState::advance`], which every request and every state read calls with the simulated "now".

use super::fleet::{
    AgentState, EncryptionSpec, Fleet, KeyVaultAuthorization, OsType, PowerState, Simulation,
    TimelineAction, VirtualMachineSpec,
};
use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

/// The simulated Entra tenant.
pub const TENANT_ID: &str = "6f1b3c2a-5d4e-4f60-8a9b-0c1d2e3f4a5b";
/// Azure Backup's first-party app ("Backup Management Service"), commercial cloud.
pub const BACKUP_MANAGEMENT_SERVICE_APP_ID: &str = "262044b1-e2ce-469f-a196-69ab7ada62d3";
/// The object id of the Backup Management Service principal in the simulated tenant (tenant-specific in Azure).
pub const BACKUP_MANAGEMENT_SERVICE_OBJECT_ID: &str = "d6f7c1a2-3b4e-4c5d-8e9f-a0b1c2d3e4f5";
/// The object id of the app's own managed identity (the principal every simulator token stands for).
pub const APP_PRINCIPAL_ID: &str = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d";
/// Built-in role "Key Vault Administrator".
pub const KEY_VAULT_ADMINISTRATOR_ROLE: &str = "00482a5a-887f-4fb3-b363-3b7fe8e74483";

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct Vm {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub location: String,
    pub vm_id: String,
    pub os: OsType,
    pub size: String,
    pub tags: BTreeMap<String, String>,
    pub agent: AgentState,
    pub power: PowerState,
    pub os_disk: String,
    pub data_disks: Vec<String>,
    pub encryption_at_host: bool,
    /// `storageProfile.imageReference` as created; `None` renders the fleet's default image for the OS.
    pub image_reference: Option<Value>,
    pub extensions: Vec<Extension>,
    pub created: DateTime<Utc>,
    /// The subnet of the VM's NIC (`{vm}-nic`); `None` is the default subnet of its resource group's
    /// vnet ([`Vm::subnet_id`]). Set for VMs an alternate-location restore creates.
    #[serde(default)]
    pub subnet: Option<String>,
    /// The model's version, rendered as ARM's `etag` (`"3"`): every write of the VM (PUT, PATCH, tags,
    /// extensions, a restore swapping its disks) bumps it, through [`SimState::emit_write`].
    #[serde(default)]
    pub etag: u64,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct Extension {
    pub name: String,
    pub publisher: String,
    pub extension_type: String,
    pub type_handler_version: String,
    pub settings: Value,
    /// Optional properties returned as the caller set them (`forceUpdateTag`, `tags`, …).
    pub optional_properties: serde_json::Map<String, Value>,
}

impl Extension {
    pub fn is_ade(&self) -> bool {
        self.publisher
            .eq_ignore_ascii_case("Microsoft.Azure.Security")
            && self
                .extension_type
                .to_ascii_lowercase()
                .starts_with("azurediskencryption")
    }
}

/// ADE settings as Compute stores them on a disk (`encryptionSettingsCollection.encryptionSettings[0]`).
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
pub struct AdeDiskSettings {
    pub secret_url: String,
    pub secret_vault_id: String,
    pub key_url: Option<String>,
    pub key_vault_id: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct Disk {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub location: String,
    pub size_gb: u32,
    pub os_type: Option<OsType>,
    pub managed_by: Option<String>,
    pub disk_encryption_set_id: Option<String>,
    pub ade: Option<AdeDiskSettings>,
    pub create_option: String,
    pub created: DateTime<Utc>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct DiskEncryptionSet {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub location: String,
    pub key_vault_id: String,
    pub key_url: String,
    pub principal_id: String,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
pub struct AccessPolicy {
    pub tenant_id: String,
    pub object_id: String,
    pub application_id: Option<String>,
    pub keys: Vec<String>,
    pub secrets: Vec<String>,
    pub certificates: Vec<String>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct KvKey {
    pub name: String,
    pub version: String,
    pub certificate_backed: bool,
    /// RSA modulus, base64url; opaque material (the simulator does no cryptography).
    pub modulus: String,
    pub tags: BTreeMap<String, String>,
    pub created: DateTime<Utc>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct KvSecret {
    pub name: String,
    pub version: String,
    pub value: String,
    pub content_type: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub created: DateTime<Utc>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct KeyVault {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub location: String,
    pub rbac: bool,
    pub app_can_manage_access: bool,
    pub access_policies: Vec<AccessPolicy>,
    pub keys: Vec<KvKey>,
    pub secrets: Vec<KvSecret>,
    pub created: DateTime<Utc>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct StorageAccount {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub location: String,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct RecoveryVault {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub location: String,
    pub policies: Vec<String>,
    /// VM ids found by the last `refreshContainers` (what `backupProtectableItems` lists).
    pub discovered_vms: Vec<String>,
    pub created: DateTime<Utc>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct ProtectedItem {
    pub vault_id: String,
    pub vm_id: String,
    pub vm_name: String,
    pub vm_resource_group: String,
    pub policy: String,
    /// `IRPending` until the first backup, then `Protected`; `ProtectionStopped` when stopped.
    pub protection_state: String,
    pub last_backup_status: Option<String>,
    pub last_backup_time: Option<DateTime<Utc>>,
    pub protected_item_data_id: u64,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOperation {
    ConfigureBackup,
    Backup,
    Restore,
}

impl JobOperation {
    pub fn as_str(&self) -> &'static str {
        match self {
            JobOperation::ConfigureBackup => "ConfigureBackup",
            JobOperation::Backup => "Backup",
            JobOperation::Restore => "Restore",
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
pub struct JobFailure {
    pub code: String,
    pub message: String,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct RestorePlan {
    pub recovery_point_id: String,
    pub storage_account_id: String,
    pub target_resource_group: String,
    pub target_subscription: String,
    /// What the restore produces (estates saved before the other kinds existed restored disks).
    #[serde(default)]
    pub kind: RestoreKind,
}

/// The `recoveryType` of a restore, with what its completion needs.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Default, PartialEq)]
pub enum RestoreKind {
    /// `RestoreDisks`: disks in the target group, template and config in the staging account.
    #[default]
    Disks,
    /// `OriginalLocation`: the source VM's disks are swapped for restored ones.
    OriginalVm,
    /// `AlternateLocation`: a new VM with this name in the target group, its NIC in this subnet.
    NewVm { name: String, subnet_id: String },
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct Job {
    pub id: String,
    pub vault_id: String,
    pub operation: JobOperation,
    pub vm_id: String,
    pub vm_name: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub failure: Option<JobFailure>,
    pub restore: Option<RestorePlan>,
    pub expiry: Option<DateTime<Utc>>,
    pub user_triggered: bool,
    /// Filled when a job completes: extra `extendedInfo.propertyBag` entries (restore outputs).
    pub property_bag: BTreeMap<String, String>,
    pub finalized: bool,
}

impl Job {
    pub fn status(&self, now: DateTime<Utc>) -> &'static str {
        if now < self.end {
            "InProgress"
        } else if self.failure.is_some() {
            "Failed"
        } else {
            "Completed"
        }
    }
}

/// A disk as a recovery point remembers it.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct DiskSnapshot {
    pub name: String,
    pub lun: Option<u32>,
    pub size_gb: u32,
    pub ade: Option<AdeDiskSettings>,
    pub disk_encryption_set_id: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct KeyAndSecret {
    pub secret_url: String,
    pub secret_vault_id: String,
    /// Base64 of the BEK secret value (wrapped by the KEK when there is one).
    pub secret_data: String,
    /// Key Vault backup blob of the secret (restorable with `POST /secrets/restore`).
    pub secret_backup_data: String,
    pub key_url: Option<String>,
    pub key_vault_id: Option<String>,
    /// Key Vault backup blob of the KEK (restorable with `POST /keys/restore`).
    pub key_backup_data: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct RecoveryPoint {
    pub id: String,
    pub vault_id: String,
    pub vm_id: String,
    pub time: DateTime<Utc>,
    pub expiry: DateTime<Utc>,
    pub os: OsType,
    pub vm_name: String,
    pub size: String,
    pub location: String,
    pub disks: Vec<DiskSnapshot>,
    pub key_and_secret: Option<KeyAndSecret>,
    pub encryption_at_host: bool,
}

impl RecoveryPoint {
    pub fn is_encrypted(&self) -> bool {
        self.key_and_secret.is_some()
    }
}

/// What an async operation's `Location` answers once it is done.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub enum OperationResult {
    /// 204 No Content.
    NoContent,
    /// 200 with the protected item of this VM id in this vault.
    ProtectedItem { vault_id: String, vm_id: String },
    /// 200 with the policy.
    Policy { vault_id: String, name: String },
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct Operation {
    pub id: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub job_id: Option<String>,
    pub failure: Option<JobFailure>,
    pub result: OperationResult,
}

impl Operation {
    pub fn status(&self, now: DateTime<Utc>) -> &'static str {
        if now < self.end {
            "InProgress"
        } else if self.failure.is_some() {
            "Failed"
        } else {
            "Succeeded"
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct RoleAssignment {
    pub name: String,
    pub scope: String,
    pub role_definition_id: String,
    pub principal_id: String,
    pub principal_type: String,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct Deployment {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub correlation_id: String,
    pub template: Value,
    pub parameters: Value,
    pub mode: String,
    pub failure: Option<JobFailure>,
    pub output_resources: Vec<String>,
    pub finalized: bool,
    /// `properties.templateLink` as given (ARM returns it), when the template came from a link.
    pub template_link: Option<Value>,
    /// `properties.providers`: the namespaces, types and locations of the template's resources.
    pub providers: Value,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct Blob {
    pub content: Vec<u8>,
    pub content_type: String,
}

/// One answered request, for tests and reports.
#[derive(serde::Deserialize, Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub throttled: bool,
    pub subscription: Option<String>,
    pub at: DateTime<Utc>,
}

#[derive(serde::Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// ARM requests answered (data plane and identity are not counted).
    pub requests: u64,
    /// ARM requests answered 429 by the throttling buckets.
    pub throttled: u64,
    /// ARM writes (PUT, PATCH, POST, DELETE) answered.
    pub writes: u64,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Default)]
pub struct SimState {
    pub simulation: Simulation,
    pub base_url: String,
    pub vms: Vec<Vm>,
    pub disks: Vec<Disk>,
    pub disk_encryption_sets: Vec<DiskEncryptionSet>,
    pub key_vaults: Vec<KeyVault>,
    pub storage_accounts: Vec<StorageAccount>,
    pub recovery_vaults: Vec<RecoveryVault>,
    pub protected_items: Vec<ProtectedItem>,
    pub jobs: Vec<Job>,
    pub recovery_points: Vec<RecoveryPoint>,
    pub operations: HashMap<String, Operation>,
    pub role_assignments: Vec<RoleAssignment>,
    pub deployments: Vec<Deployment>,
    /// Keyed by `account/container/blob` (account lower-case).
    pub blobs: BTreeMap<String, Blob>,
    pub subscriptions: Vec<String>,
    /// Not kept in snapshots (`vmbackup local` persists the estate; the counters keep the totals).
    #[serde(skip)]
    pub request_log: Vec<RequestRecord>,
    pub counters: Counters,
    /// Event Grid events produced since the server last drained them.
    #[serde(skip)]
    pub outbox: Vec<Value>,
    /// Properties of backup policies written by PUT, keyed by lower-case policy id (fleet policies
    /// have none and render the simulator's daily default).
    pub policy_definitions: BTreeMap<String, Value>,
    /// Tags at subscription scope, keyed by lower-case subscription id.
    pub subscription_tags: BTreeMap<String, BTreeMap<String, String>>,
    next_recovery_point: u64,
    /// Positions in `disks` by lower-case `subscription/group/name`: rendering a VM looks up its
    /// disks, and a Resource Graph page renders every VM, so scans made 10,000-VM sweeps quadratic.
    /// Every hit is checked against the disk it points at; a stale index is rebuilt (see `disk`).
    #[serde(skip)]
    disk_positions: std::sync::Mutex<HashMap<String, usize>>,
    /// Result sets of Resource Graph queries whose later pages are still to be read.
    #[serde(skip)]
    pub graph_snapshots: super::graph::GraphSnapshots,
}

fn disk_key(sub: &str, rg: &str, name: &str) -> String {
    format!("{sub}/{rg}/{name}").to_ascii_lowercase()
}

/// ARM compares names and ids case-insensitively. Lookups put the name first: names differ
/// between resources while subscription and group mostly don't, so most comparisons end early.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.eq_ignore_ascii_case(b)
}

pub fn new_version() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

pub fn rg_id(sub: &str, rg: &str) -> String {
    format!("/subscriptions/{sub}/resourceGroups/{rg}")
}

pub fn resource_id(sub: &str, rg: &str, provider_type: &str, name: &str) -> String {
    format!("{}/providers/{provider_type}/{name}", rg_id(sub, rg))
}

/// The parts of `/subscriptions/{sub}/resourceGroups/{rg}/providers/{ns}/{type}/{name}`.
pub fn parse_resource_id(id: &str) -> Option<(String, String, String, String)> {
    let parts: Vec<&str> = id.trim_matches('/').split('/').collect();
    if parts.len() < 8
        || !same(parts[0], "subscriptions")
        || !same(parts[2], "resourceGroups")
        || !same(parts[4], "providers")
    {
        return None;
    }
    Some((
        parts[1].to_string(),
        parts[3].to_string(),
        format!("{}/{}", parts[5], parts[6]),
        parts[7].to_string(),
    ))
}

impl Vm {
    pub fn id(&self) -> String {
        resource_id(
            &self.subscription,
            &self.resource_group,
            "Microsoft.Compute/virtualMachines",
            &self.name,
        )
    }
    /// The name of the VM's (only, primary) network interface, in the VM's resource group.
    pub fn nic_name(&self) -> String {
        format!("{}-nic", self.name)
    }
    /// The subnet of the VM's NIC: its own, else `default` of the `{resource group}-vnet` that the
    /// portal creates beside a VM (the fleet file describes no networks).
    pub fn subnet_id(&self) -> String {
        self.subnet.clone().unwrap_or_else(|| {
            format!(
                "{}/subnets/default",
                resource_id(
                    &self.subscription,
                    &self.resource_group,
                    "Microsoft.Network/virtualNetworks",
                    &format!("{}-vnet", self.resource_group),
                )
            )
        })
    }
}
impl Disk {
    pub fn id(&self) -> String {
        resource_id(
            &self.subscription,
            &self.resource_group,
            "Microsoft.Compute/disks",
            &self.name,
        )
    }
}
impl DiskEncryptionSet {
    pub fn id(&self) -> String {
        resource_id(
            &self.subscription,
            &self.resource_group,
            "Microsoft.Compute/diskEncryptionSets",
            &self.name,
        )
    }
}
impl KeyVault {
    pub fn id(&self) -> String {
        resource_id(
            &self.subscription,
            &self.resource_group,
            "Microsoft.KeyVault/vaults",
            &self.name,
        )
    }
    pub fn vault_uri(&self, base_url: &str) -> String {
        format!("{base_url}/keyvault/{}/", self.name.to_ascii_lowercase())
    }
    pub fn key(&self, name: &str) -> Option<&KvKey> {
        self.keys.iter().find(|k| same(&k.name, name))
    }
    pub fn secret(&self, name: &str) -> Option<&KvSecret> {
        self.secrets.iter().find(|s| same(&s.name, name))
    }
}
impl StorageAccount {
    pub fn id(&self) -> String {
        resource_id(
            &self.subscription,
            &self.resource_group,
            "Microsoft.Storage/storageAccounts",
            &self.name,
        )
    }
    pub fn blob_endpoint(&self, base_url: &str) -> String {
        format!("{base_url}/blob/{}/", self.name)
    }
}
impl RecoveryVault {
    pub fn id(&self) -> String {
        resource_id(
            &self.subscription,
            &self.resource_group,
            "Microsoft.RecoveryServices/vaults",
            &self.name,
        )
    }
}
impl ProtectedItem {
    pub fn container_name(&self) -> String {
        format!(
            "iaasvmcontainerv2;{};{}",
            self.vm_resource_group, self.vm_name
        )
    }
    pub fn item_name(&self) -> String {
        format!(
            "VM;iaasvmcontainerv2;{};{}",
            self.vm_resource_group, self.vm_name
        )
    }
    pub fn id(&self) -> String {
        format!(
            "{}/backupFabrics/Azure/protectionContainers/IaasVMContainer;{}/protectedItems/{}",
            self.vault_id,
            self.container_name(),
            self.item_name()
        )
    }
}

impl SimState {
    /// Build the estate a fleet describes; VM/secret/key URLs point at `base_url`.
    pub fn from_fleet(fleet: &Fleet, base_url: &str, now: DateTime<Utc>) -> SimState {
        let mut state = SimState {
            simulation: fleet.simulation.clone(),
            base_url: base_url.trim_end_matches('/').to_string(),
            next_recovery_point: 1_000_000_000_000,
            ..SimState::default()
        };
        for sub in &fleet.subscriptions {
            state.subscriptions.push(sub.id.clone());
            for kv in &sub.key_vaults {
                let mut vault = KeyVault {
                    subscription: sub.id.clone(),
                    resource_group: kv.resource_group.clone(),
                    name: kv.name.clone(),
                    location: kv.location.clone(),
                    rbac: kv.authorization == KeyVaultAuthorization::Rbac,
                    app_can_manage_access: kv.app_can_manage_access,
                    access_policies: Vec::new(),
                    keys: kv
                        .keys
                        .iter()
                        .map(|k| new_key(&k.name, k.certificate_backed, now))
                        .collect(),
                    secrets: kv
                        .secrets
                        .iter()
                        .map(|s| new_secret(&s.name, None, now))
                        .collect(),
                    created: now,
                };
                if !vault.rbac {
                    vault.access_policies.push(AccessPolicy {
                        tenant_id: TENANT_ID.into(),
                        object_id: APP_PRINCIPAL_ID.into(),
                        application_id: None,
                        keys: vec!["get".into(), "list".into()],
                        secrets: vec!["get".into(), "list".into()],
                        certificates: vec!["get".into(), "list".into()],
                    });
                }
                if kv.backup_access {
                    if vault.rbac {
                        state.role_assignments.push(RoleAssignment {
                            name: uuid::Uuid::new_v4().to_string(),
                            scope: vault.id(),
                            role_definition_id: format!(
                                "/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{KEY_VAULT_ADMINISTRATOR_ROLE}",
                                sub.id
                            ),
                            principal_id: BACKUP_MANAGEMENT_SERVICE_OBJECT_ID.into(),
                            principal_type: "ServicePrincipal".into(),
                        });
                    } else {
                        vault.access_policies.push(AccessPolicy {
                            tenant_id: TENANT_ID.into(),
                            object_id: BACKUP_MANAGEMENT_SERVICE_OBJECT_ID.into(),
                            application_id: None,
                            keys: vec!["get".into(), "list".into(), "backup".into()],
                            secrets: vec!["get".into(), "list".into(), "backup".into()],
                            certificates: Vec::new(),
                        });
                    }
                }
                state.key_vaults.push(vault);
            }
            for des in &sub.disk_encryption_sets {
                let key_url = state
                    .key_vaults
                    .iter()
                    .find(|k| same(&k.subscription, &sub.id) && same(&k.name, &des.key_vault))
                    .and_then(|kv| {
                        kv.key(&des.key)
                            .map(|key| key_url(&kv.vault_uri(base_url), key))
                    })
                    .unwrap_or_default();
                let key_vault_id = resource_id(
                    &sub.id,
                    &des.resource_group,
                    "Microsoft.KeyVault/vaults",
                    &des.key_vault,
                );
                let key_vault_id = state
                    .key_vaults
                    .iter()
                    .find(|k| same(&k.subscription, &sub.id) && same(&k.name, &des.key_vault))
                    .map(|k| k.id())
                    .unwrap_or(key_vault_id);
                state.disk_encryption_sets.push(DiskEncryptionSet {
                    subscription: sub.id.clone(),
                    resource_group: des.resource_group.clone(),
                    name: des.name.clone(),
                    location: des.location.clone(),
                    key_vault_id,
                    key_url,
                    principal_id: uuid::Uuid::new_v4().to_string(),
                });
            }
            for account in &sub.storage_accounts {
                state.storage_accounts.push(StorageAccount {
                    subscription: sub.id.clone(),
                    resource_group: account.resource_group.clone(),
                    name: account.name.clone(),
                    location: account.location.clone(),
                });
            }
            for vault in &sub.recovery_vaults {
                state.recovery_vaults.push(RecoveryVault {
                    subscription: sub.id.clone(),
                    resource_group: vault.resource_group.clone(),
                    name: vault.name.clone(),
                    location: vault.location.clone(),
                    policies: vault.policies.clone(),
                    discovered_vms: Vec::new(),
                    created: now,
                });
            }
            for spec in &sub.virtual_machines {
                state.create_vm_from_spec(&sub.id, spec, now);
            }
        }
        state.outbox.clear();
        state
    }

    /// Add a VM (with its disks, and for ADE its BEK secret, disk settings and extension), as Azure shows it.
    pub fn create_vm_from_spec(
        &mut self,
        subscription: &str,
        spec: &VirtualMachineSpec,
        now: DateTime<Utc>,
    ) {
        let vm_id = resource_id(
            subscription,
            &spec.resource_group,
            "Microsoft.Compute/virtualMachines",
            &spec.name,
        );
        let des_id = match &spec.encryption {
            EncryptionSpec::Cmk {
                disk_encryption_set,
            } => self
                .disk_encryption_sets
                .iter()
                .find(|d| same(&d.subscription, subscription) && same(&d.name, disk_encryption_set))
                .map(|d| d.id()),
            _ => None,
        };
        let os_disk = format!("{}_OsDisk_1_{}", spec.name, &new_version()[..8]);
        let mut disk_names = vec![os_disk.clone()];
        let data_disks: Vec<String> = (0..spec.data_disks)
            .map(|lun| format!("{}_DataDisk_{lun}", spec.name))
            .collect();
        disk_names.extend(data_disks.iter().cloned());
        for (index, name) in disk_names.iter().enumerate() {
            self.disks.push(Disk {
                subscription: subscription.to_string(),
                resource_group: spec.resource_group.clone(),
                name: name.clone(),
                location: spec.location.clone(),
                size_gb: if index == 0 { 30 } else { 128 },
                os_type: (index == 0).then_some(spec.os),
                managed_by: Some(vm_id.clone()),
                disk_encryption_set_id: des_id.clone(),
                ade: None,
                create_option: if index == 0 {
                    "FromImage".into()
                } else {
                    "Empty".into()
                },
                created: now,
            });
        }
        self.vms.push(Vm {
            subscription: subscription.to_string(),
            resource_group: spec.resource_group.clone(),
            name: spec.name.clone(),
            location: spec.location.clone(),
            vm_id: uuid::Uuid::new_v4().to_string(),
            os: spec.os,
            size: "Standard_D2s_v5".into(),
            tags: spec.tags.clone(),
            agent: spec.agent,
            power: spec.power_state,
            os_disk,
            data_disks,
            encryption_at_host: matches!(spec.encryption, EncryptionSpec::Host),
            image_reference: None,
            extensions: Vec::new(),
            created: now,
            subnet: None,
            etag: 0,
        });
        self.emit_write(&vm_id, "Microsoft.Compute/virtualMachines/write", now);
        if let EncryptionSpec::Ade {
            key_vault,
            secret,
            kek,
        } = &spec.encryption
        {
            // Validated fleets always resolve; a missing vault leaves the VM unencrypted.
            let _ = self.enable_ade(
                subscription,
                &spec.name,
                key_vault,
                secret,
                kek.as_deref(),
                now,
            );
        }
        if let Some(protected) = &spec.protected_by {
            if let Some(vault) = self
                .recovery_vaults
                .iter()
                .find(|v| same(&v.subscription, subscription) && same(&v.name, &protected.vault))
            {
                self.protected_items.push(ProtectedItem {
                    vault_id: vault.id(),
                    vm_id,
                    vm_name: spec.name.clone(),
                    vm_resource_group: spec.resource_group.clone(),
                    policy: protected.policy.clone(),
                    protection_state: "IRPending".into(),
                    last_backup_status: None,
                    last_backup_time: None,
                    protected_item_data_id: rand::random::<u32>() as u64,
                });
            }
        }
    }

    pub fn vm(&self, sub: &str, rg: &str, name: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| {
            same(&v.name, name) && same(&v.resource_group, rg) && same(&v.subscription, sub)
        })
    }
    pub fn vm_mut(&mut self, sub: &str, rg: &str, name: &str) -> Option<&mut Vm> {
        self.vms.iter_mut().find(|v| {
            same(&v.name, name) && same(&v.resource_group, rg) && same(&v.subscription, sub)
        })
    }
    pub fn vm_by_id(&self, id: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| same(&v.id(), id))
    }
    /// A VM by name alone (names are unique per subscription; the fleet's timeline refers to VMs by name).
    pub fn vm_by_name(&self, name: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| same(&v.name, name))
    }
    pub fn disk(&self, sub: &str, rg: &str, name: &str) -> Option<&Disk> {
        let matches = |d: &&Disk| {
            same(&d.name, name) && same(&d.resource_group, rg) && same(&d.subscription, sub)
        };
        let key = disk_key(sub, rg, name);
        let Ok(mut positions) = self.disk_positions.lock() else {
            return self.disks.iter().find(matches);
        };
        if let Some(disk) = positions
            .get(&key)
            .and_then(|&i| self.disks.get(i))
            .filter(matches)
        {
            return Some(disk);
        }
        // A miss on an index built for another list, or a hit on a moved disk: rebuild, then the
        // index is exact. A miss on an index of the same length may still hide a replaced disk
        // (one removed, another added), so that case scans.
        if positions.len() != self.disks.len() || positions.contains_key(&key) {
            positions.clear();
            for (i, d) in self.disks.iter().enumerate() {
                positions.insert(disk_key(&d.subscription, &d.resource_group, &d.name), i);
            }
            return positions
                .get(&key)
                .and_then(|&i| self.disks.get(i))
                .filter(matches);
        }
        self.disks.iter().find(matches)
    }
    pub fn disk_by_id(&self, id: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| same(&d.id(), id))
    }
    pub fn key_vault(&self, sub: &str, rg: &str, name: &str) -> Option<&KeyVault> {
        self.key_vaults.iter().find(|k| {
            same(&k.name, name) && same(&k.resource_group, rg) && same(&k.subscription, sub)
        })
    }
    pub fn key_vault_by_name(&self, name: &str) -> Option<&KeyVault> {
        self.key_vaults.iter().find(|k| same(&k.name, name))
    }
    pub fn key_vault_by_name_mut(&mut self, name: &str) -> Option<&mut KeyVault> {
        self.key_vaults.iter_mut().find(|k| same(&k.name, name))
    }
    pub fn key_vault_by_id(&self, id: &str) -> Option<&KeyVault> {
        self.key_vaults.iter().find(|k| same(&k.id(), id))
    }
    pub fn recovery_vault(&self, sub: &str, rg: &str, name: &str) -> Option<&RecoveryVault> {
        self.recovery_vaults.iter().find(|k| {
            same(&k.name, name) && same(&k.resource_group, rg) && same(&k.subscription, sub)
        })
    }
    pub fn storage_account_by_id(&self, id: &str) -> Option<&StorageAccount> {
        self.storage_accounts.iter().find(|s| same(&s.id(), id))
    }
    pub fn protected_item_for_vm(&self, vm_id: &str) -> Option<&ProtectedItem> {
        self.protected_items.iter().find(|p| same(&p.vm_id, vm_id))
    }

    /// Enable ADE on a VM the way the ADE extension does: BEK secret written to the vault (tagged as ADE
    /// tags it), encryption settings on every disk, the extension on the VM. Errors name what is missing.
    pub fn enable_ade(
        &mut self,
        sub: &str,
        vm_name: &str,
        key_vault: &str,
        secret: &str,
        kek: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let base_url = self.base_url.clone();
        let (vm_id, os, disks, rg) = {
            let vm = self
                .vms
                .iter()
                .find(|v| same(&v.name, vm_name) && same(&v.subscription, sub))
                .ok_or_else(|| format!("no VM {vm_name:?} in subscription {sub}"))?;
            let mut disks = vec![vm.os_disk.clone()];
            disks.extend(vm.data_disks.iter().cloned());
            (vm.id(), vm.os, disks, vm.resource_group.clone())
        };
        let kv = self
            .key_vaults
            .iter_mut()
            .find(|k| same(&k.name, key_vault) && same(&k.subscription, sub))
            .ok_or_else(|| format!("no key vault {key_vault:?} in subscription {sub}"))?;
        let vault_uri = kv.vault_uri(&base_url);
        let kv_id = kv.id();
        let kek_url = match kek {
            Some(kek) => Some(
                kv.key(kek)
                    .map(|k| key_url(&vault_uri, k))
                    .ok_or_else(|| format!("key vault {key_vault:?} has no key {kek:?}"))?,
            ),
            None => None,
        };
        let mut tags = BTreeMap::new();
        tags.insert(
            "DiskEncryptionKeyFileName".to_string(),
            match os {
                OsType::Windows => format!("{secret}.BEK"),
                OsType::Linux => "LinuxPassPhraseFileName".to_string(),
            },
        );
        tags.insert("MachineName".to_string(), vm_name.to_string());
        if let Some(kek_url) = &kek_url {
            tags.insert(
                "DiskEncryptionKeyEncryptionAlgorithm".into(),
                "RSA-OAEP".into(),
            );
            tags.insert("DiskEncryptionKeyEncryptionKeyURL".into(), kek_url.clone());
        }
        let content_type = kek_url
            .as_ref()
            .map(|_| "Wrapped BEK".to_string())
            .or(Some("BEK".into()));
        let mut bek = new_secret(secret, content_type, now);
        bek.tags = tags;
        let secret_url = format!("{vault_uri}secrets/{}/{}", bek.name, bek.version);
        kv.secrets.retain(|s| !same(&s.name, secret));
        kv.secrets.push(bek);
        let settings = AdeDiskSettings {
            secret_url,
            secret_vault_id: kv_id.clone(),
            key_url: kek_url.clone(),
            key_vault_id: kek_url.as_ref().map(|_| kv_id.clone()),
        };
        for disk in self.disks.iter_mut() {
            if same(&disk.subscription, sub)
                && same(&disk.resource_group, &rg)
                && disks.iter().any(|d| same(d, &disk.name))
            {
                disk.ade = Some(settings.clone());
            }
        }
        let extension = ade_extension(os, &vault_uri, &kv_id, kek_url.as_deref());
        let ext_name = extension.name.clone();
        if let Some(vm) = self.vms.iter_mut().find(|v| same(&v.id(), &vm_id)) {
            vm.extensions.retain(|e| !e.is_ade());
            vm.extensions.push(extension);
        }
        self.emit_write(
            &format!("{vm_id}/extensions/{ext_name}"),
            "Microsoft.Compute/virtualMachines/extensions/write",
            now,
        );
        Ok(())
    }

    /// Apply an Azure-side timeline action. Queue-message actions (`backup-now`, `restore-request`) are refused.
    pub fn apply(&mut self, action: &TimelineAction, now: DateTime<Utc>) -> Result<(), String> {
        match action {
            TimelineAction::Tag { vm, tags } => {
                let vm = self.vms.iter_mut().find(|v| same(&v.name, vm)).ok_or_else(|| format!("no VM {vm:?}"))?;
                vm.tags.extend(tags.clone());
                let id = vm.id();
                self.emit_write(&format!("{id}/providers/Microsoft.Resources/tags/default"), "Microsoft.Resources/tags/write", now);
                Ok(())
            }
            TimelineAction::Untag { vm, tags } => {
                let vm = self.vms.iter_mut().find(|v| same(&v.name, vm)).ok_or_else(|| format!("no VM {vm:?}"))?;
                vm.tags.retain(|k, _| !tags.iter().any(|t| same(t, k)));
                let id = vm.id();
                self.emit_write(&format!("{id}/providers/Microsoft.Resources/tags/default"), "Microsoft.Resources/tags/write", now);
                Ok(())
            }
            TimelineAction::CreateVm { vm } => {
                if self.vm_by_name(&vm.name).is_some() {
                    return Err(format!("VM {:?} already exists", vm.name));
                }
                let sub = self.subscriptions.first().cloned().ok_or("the fleet has no subscription")?;
                self.create_vm_from_spec(&sub, vm, now);
                Ok(())
            }
            TimelineAction::EnableAde { vm, key_vault, secret, kek } => {
                let sub = self.vm_by_name(vm).map(|v| v.subscription.clone()).ok_or_else(|| format!("no VM {vm:?}"))?;
                self.enable_ade(&sub, vm, key_vault, secret, kek.as_deref(), now)
            }
            TimelineAction::DeleteKey { key_vault, key } => {
                let kv = self.key_vault_by_name_mut(key_vault).ok_or_else(|| format!("no key vault {key_vault:?}"))?;
                let before = kv.keys.len();
                kv.keys.retain(|k| !same(&k.name, key));
                if kv.keys.len() == before {
                    return Err(format!("key vault {key_vault:?} has no key {key:?}"));
                }
                Ok(())
            }
            TimelineAction::DeleteSecret { key_vault, secret } => {
                let kv = self.key_vault_by_name_mut(key_vault).ok_or_else(|| format!("no key vault {key_vault:?}"))?;
                let before = kv.secrets.len();
                kv.secrets.retain(|s| !same(&s.name, secret));
                if kv.secrets.len() == before {
                    return Err(format!("key vault {key_vault:?} has no secret {secret:?}"));
                }
                Ok(())
            }
            TimelineAction::BackupNow { .. } | TimelineAction::RestoreRequest { .. } => Err(
                "backup-now and restore-request are queue messages the local host sends, not Azure changes".into(),
            ),
        }
    }

    /// Record a `Microsoft.Resources.ResourceWriteSuccess` event for the server to publish.
    /// Records a successful write (the Event Grid event); a write of a VM or of something under it
    /// (extension, tags) also moves the VM's etag, as ARM's does.
    pub fn emit_write(&mut self, resource_uri: &str, operation_name: &str, now: DateTime<Utc>) {
        let vm_write = operation_name.starts_with("Microsoft.Compute/virtualMachines/")
            || (operation_name == "Microsoft.Resources/tags/write"
                && resource_uri
                    .to_ascii_lowercase()
                    .contains("/providers/microsoft.compute/virtualmachines/"));
        if vm_write {
            // The VM itself or a child of it (`{vm}/extensions/x`, `{vm}/providers/…/tags/default`).
            let is_under = |id: &str| {
                resource_uri
                    .get(..id.len())
                    .is_some_and(|head| same(head, id))
                    && resource_uri
                        .get(id.len()..)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            };
            if let Some(vm) = self.vms.iter_mut().find(|vm| is_under(&vm.id())) {
                vm.etag += 1;
            }
        }
        self.outbox.push(super::events::resource_write_success(
            resource_uri,
            operation_name,
            now,
        ));
    }

    pub fn next_recovery_point_id(&mut self) -> String {
        self.next_recovery_point += 1;
        self.next_recovery_point.to_string()
    }

    /// Let simulated time act: finish jobs and deployments whose end has passed.
    pub fn advance(&mut self, now: DateTime<Utc>) {
        super::backup::finalize_jobs(self, now);
        super::deployments::finalize_deployments(self, now);
    }
}

pub fn key_url(vault_uri: &str, key: &KvKey) -> String {
    format!("{vault_uri}keys/{}/{}", key.name, key.version)
}

pub fn new_key(name: &str, certificate_backed: bool, now: DateTime<Utc>) -> KvKey {
    let material: Vec<u8> = (0..256).map(|_| rand::random::<u8>()).collect();
    KvKey {
        name: name.to_string(),
        version: new_version(),
        certificate_backed,
        modulus: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(material),
        tags: BTreeMap::new(),
        created: now,
    }
}

pub fn new_secret(name: &str, content_type: Option<String>, now: DateTime<Utc>) -> KvSecret {
    let material: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
    KvSecret {
        name: name.to_string(),
        version: new_version(),
        value: base64::engine::general_purpose::STANDARD.encode(material),
        content_type,
        tags: BTreeMap::new(),
        created: now,
    }
}

/// The ADE extension as `Set-AzVMDiskEncryptionExtension` writes it (no Entra app, current versions).
pub fn ade_extension(
    os: OsType,
    vault_uri: &str,
    vault_id: &str,
    kek_url: Option<&str>,
) -> Extension {
    let (name, extension_type, version) = match os {
        OsType::Linux => (
            "AzureDiskEncryptionForLinux",
            "AzureDiskEncryptionForLinux",
            "1.1",
        ),
        OsType::Windows => ("AzureDiskEncryption", "AzureDiskEncryption", "2.2"),
    };
    let mut settings = serde_json::json!({
        "EncryptionOperation": "EnableEncryption",
        "KeyVaultURL": vault_uri.trim_end_matches('/'),
        "KeyVaultResourceId": vault_id,
        "VolumeType": "All",
        "SequenceVersion": uuid::Uuid::new_v4().to_string(),
    });
    if let Some(kek_url) = kek_url {
        settings["KeyEncryptionKeyURL"] = Value::String(kek_url.to_string());
        settings["KekVaultResourceId"] = Value::String(vault_id.to_string());
        settings["KeyEncryptionAlgorithm"] = Value::String("RSA-OAEP".into());
    }
    Extension {
        name: name.into(),
        publisher: "Microsoft.Azure.Security".into(),
        extension_type: extension_type.into(),
        type_handler_version: version.into(),
        settings,
        optional_properties: Default::default(),
    }
}

pub fn later(now: DateTime<Utc>, seconds: u64) -> DateTime<Utc> {
    now + Duration::seconds(seconds.min(i64::MAX as u64) as i64)
}

#[cfg(test)]
mod disk_index_tests {
    use super::*;

    fn disk(rg: &str, name: &str, size_gb: u32) -> Disk {
        Disk {
            subscription: "sub-1".into(),
            resource_group: rg.into(),
            name: name.into(),
            location: "westeurope".into(),
            size_gb,
            os_type: None,
            managed_by: None,
            disk_encryption_set_id: None,
            ade: None,
            create_option: "Empty".into(),
            created: Utc::now(),
        }
    }

    #[test]
    fn disk_lookups_follow_pushes_removals_and_replacements() {
        let mut state = SimState::default();
        state.disks.push(disk("rg-a", "d1", 1));
        state.disks.push(disk("rg-a", "d2", 2));
        assert_eq!(
            state.disk("SUB-1", "RG-A", "D2").map(|d| d.size_gb),
            Some(2)
        );
        assert!(state.disk("sub-1", "rg-b", "d2").is_none());

        state.disks.push(disk("rg-b", "d2", 3));
        assert_eq!(
            state.disk("sub-1", "rg-b", "d2").map(|d| d.size_gb),
            Some(3)
        );

        // Removed: the index still points at a position that now holds another disk.
        state.disks.retain(|d| d.name != "d1");
        assert!(state.disk("sub-1", "rg-a", "d1").is_none());
        assert_eq!(
            state.disk("sub-1", "rg-a", "d2").map(|d| d.size_gb),
            Some(2)
        );

        // One removed and another added: same length, a name the index has never seen.
        state.disks.retain(|d| d.resource_group != "rg-b");
        state.disks.push(disk("rg-c", "d9", 9));
        assert_eq!(
            state.disk("sub-1", "rg-c", "d9").map(|d| d.size_gb),
            Some(9)
        );
        assert!(state.disk("sub-1", "rg-b", "d2").is_none());
    }
}
