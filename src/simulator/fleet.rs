//! The fleet file of the contract: the simulated Azure estate and a timeline of things that happen to it.
//!
//! Parse with [`Fleet::from_path`] or [`Fleet::from_json_str`]; both validate references, duplicate names
//! and durations, and every error names the file, the JSON path of the field and why it is wrong.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// A fleet file that could not be used.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{source_name}: {field}: {reason}")]
pub struct FleetError {
    /// The file path, or `<inline>` for a string.
    pub source_name: String,
    /// The JSON path of the offending field, e.g. `subscriptions[0].virtualMachines[1].encryption.keyVault`.
    pub field: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fleet {
    #[serde(default)]
    pub subscriptions: Vec<Subscription>,
    #[serde(default)]
    pub timeline: Vec<TimelineEntry>,
    #[serde(default)]
    pub simulation: Simulation,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subscription {
    pub id: String,
    #[serde(default)]
    pub recovery_vaults: Vec<RecoveryVaultSpec>,
    #[serde(default)]
    pub key_vaults: Vec<KeyVaultSpec>,
    #[serde(default)]
    pub disk_encryption_sets: Vec<DiskEncryptionSetSpec>,
    #[serde(default)]
    pub storage_accounts: Vec<StorageAccountSpec>,
    #[serde(default)]
    pub virtual_machines: Vec<VirtualMachineSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecoveryVaultSpec {
    pub name: String,
    pub resource_group: String,
    pub location: String,
    #[serde(default = "default_policies")]
    pub policies: Vec<String>,
}

fn default_policies() -> Vec<String> {
    vec!["DefaultPolicy".to_string()]
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum KeyVaultAuthorization {
    #[default]
    AccessPolicies,
    Rbac,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyVaultSpec {
    pub name: String,
    pub resource_group: String,
    pub location: String,
    #[serde(default)]
    pub authorization: KeyVaultAuthorization,
    /// Whether the Backup Management Service already holds the access Azure Backup needs.
    #[serde(default)]
    pub backup_access: bool,
    /// Whether the app's own identity may change this vault's access (403 `AuthorizationFailed` otherwise).
    #[serde(default = "default_true")]
    pub app_can_manage_access: bool,
    #[serde(default)]
    pub keys: Vec<KeySpec>,
    #[serde(default)]
    pub secrets: Vec<SecretSpec>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeySpec {
    pub name: String,
    #[serde(default)]
    pub certificate_backed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretSpec {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskEncryptionSetSpec {
    pub name: String,
    pub resource_group: String,
    pub location: String,
    pub key_vault: String,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageAccountSpec {
    pub name: String,
    pub resource_group: String,
    pub location: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OsType {
    #[default]
    Linux,
    Windows,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    #[default]
    Ready,
    NotReady,
    Missing,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    #[default]
    Running,
    Stopped,
    Deallocated,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EncryptionSpec {
    /// Platform-managed keys (server-side encryption, the default).
    #[default]
    Pmk,
    /// Customer-managed keys through a disk encryption set.
    #[serde(rename_all = "camelCase")]
    Cmk { disk_encryption_set: String },
    /// Encryption at host.
    Host,
    /// Azure Disk Encryption: BEK secret, optional KEK (none means BEK only).
    #[serde(rename_all = "camelCase")]
    Ade {
        key_vault: String,
        secret: String,
        #[serde(default)]
        kek: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProtectedBySpec {
    pub vault: String,
    pub policy: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineSpec {
    pub name: String,
    pub resource_group: String,
    pub location: String,
    #[serde(default)]
    pub os: OsType,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub encryption: EncryptionSpec,
    #[serde(default)]
    pub data_disks: u32,
    #[serde(default)]
    pub agent: AgentState,
    #[serde(default)]
    pub power_state: PowerState,
    #[serde(default)]
    pub protected_by: Option<ProtectedBySpec>,
}

/// A duration of simulated time written as `<number><unit>` with unit `s`, `m`, `h` or `d` (e.g. `"90s"`, `"1h"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SimDuration(pub Duration);

impl SimDuration {
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let split = trimmed.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
            format!("{text:?} has no unit; write e.g. \"10m\" (units s, m, h, d)")
        })?;
        let (number, unit) = trimmed.split_at(split);
        let amount: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} must start with a whole number, e.g. \"10m\""))?;
        let seconds_per_unit = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            other => {
                return Err(format!(
                    "{text:?} has unknown unit {other:?}; use s, m, h or d"
                ))
            }
        };
        amount
            .checked_mul(seconds_per_unit)
            .map(|s| SimDuration(Duration::from_secs(s)))
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

impl fmt::Display for SimDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0.as_secs())
    }
}

impl Serialize for SimDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SimDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        SimDuration::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimelineEntry {
    /// Simulated time from the start of the run.
    pub at: SimDuration,
    #[serde(flatten)]
    pub action: TimelineAction,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum TimelineAction {
    /// Set (merge) tags on a VM.
    Tag {
        vm: String,
        tags: BTreeMap<String, String>,
    },
    /// Remove the named tags from a VM.
    Untag { vm: String, tags: Vec<String> },
    /// A new VM appears.
    CreateVm { vm: VirtualMachineSpec },
    /// ADE is enabled on an existing VM (writes the ADE extension and the disks' encryption settings).
    #[serde(rename_all = "camelCase")]
    EnableAde {
        vm: String,
        key_vault: String,
        secret: String,
        #[serde(default)]
        kek: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    DeleteKey { key_vault: String, key: String },
    #[serde(rename_all = "camelCase")]
    DeleteSecret { key_vault: String, secret: String },
    /// An operator asks for an on-demand backup (a queue message the local host sends; not the simulator's).
    BackupNow { vm: String },
    /// A restore ticket (a queue message the local host sends; not the simulator's).
    #[serde(rename_all = "camelCase")]
    RestoreRequest {
        vm: String,
        ticket: String,
        mode: RestoreMode,
        #[serde(default = "default_recovery_point")]
        recovery_point: String,
        #[serde(default)]
        target_resource_group: Option<String>,
        #[serde(default)]
        callback: Option<String>,
    },
}

impl TimelineAction {
    /// Whether the action changes the Azure estate (the simulator applies it) rather than being a queue message.
    pub fn is_azure_side(&self) -> bool {
        !matches!(
            self,
            TimelineAction::BackupNow { .. } | TimelineAction::RestoreRequest { .. }
        )
    }
}

fn default_recovery_point() -> String {
    "latest".to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMode {
    RestoreDisks,
    ReplaceExisting,
    AlternateLocation,
    Files,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Simulation {
    /// Wall seconds per simulated second (0.001 plays a run 1000x faster than real time).
    #[serde(default = "default_time_scale")]
    pub time_scale: f64,
    #[serde(default = "default_backup_job_seconds")]
    pub backup_job_seconds: u64,
    #[serde(default = "default_restore_job_seconds")]
    pub restore_job_seconds: u64,
    #[serde(default)]
    pub faults: Faults,
}

fn default_time_scale() -> f64 {
    0.001
}
fn default_backup_job_seconds() -> u64 {
    1800
}
fn default_restore_job_seconds() -> u64 {
    3600
}

impl Default for Simulation {
    fn default() -> Self {
        Simulation {
            time_scale: default_time_scale(),
            backup_job_seconds: default_backup_job_seconds(),
            restore_job_seconds: default_restore_job_seconds(),
            faults: Faults::default(),
        }
    }
}

/// Seeded fault injection: each ARM request fails with probability `rate`, with a status drawn from `statuses`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Faults {
    #[serde(default)]
    pub rate: f64,
    #[serde(default = "default_fault_statuses")]
    pub statuses: Vec<u16>,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_fault_statuses() -> Vec<u16> {
    vec![429, 500, 503]
}
fn default_seed() -> u64 {
    1
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            rate: 0.0,
            statuses: default_fault_statuses(),
            seed: default_seed(),
        }
    }
}

impl Fleet {
    /// Read, parse and validate a fleet file.
    pub fn from_path(path: &Path) -> Result<Fleet, FleetError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| FleetError {
            source_name: source_name.clone(),
            field: "(file)".to_string(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &source_name)
    }

    /// Parse and validate a fleet given as JSON text.
    pub fn from_json_str(text: &str) -> Result<Fleet, FleetError> {
        Self::parse(text, "<inline>")
    }

    fn parse(text: &str, source_name: &str) -> Result<Fleet, FleetError> {
        let deserializer = &mut serde_json::Deserializer::from_str(text);
        let fleet: Fleet = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            FleetError {
                source_name: source_name.to_string(),
                field: if path == "." {
                    "(document)".to_string()
                } else {
                    path
                },
                reason: e.into_inner().to_string(),
            }
        })?;
        fleet.validate().map_err(|(field, reason)| FleetError {
            source_name: source_name.to_string(),
            field,
            reason,
        })?;
        Ok(fleet)
    }

    /// Check references and names; the error is (JSON path, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let sim = &self.simulation;
        if !(sim.time_scale.is_finite() && sim.time_scale > 0.0) {
            return Err((
                "simulation.timeScale".into(),
                format!("must be a positive number, got {}", sim.time_scale),
            ));
        }
        if !(0.0..=1.0).contains(&sim.faults.rate) {
            return Err((
                "simulation.faults.rate".into(),
                format!("must be between 0 and 1, got {}", sim.faults.rate),
            ));
        }
        for (i, status) in sim.faults.statuses.iter().enumerate() {
            if !(400..=599).contains(status) {
                return Err((
                    format!("simulation.faults.statuses[{i}]"),
                    format!("must be an HTTP error status (400-599), got {status}"),
                ));
            }
        }
        if sim.faults.rate > 0.0 && sim.faults.statuses.is_empty() {
            return Err((
                "simulation.faults.statuses".into(),
                "must name at least one status when rate > 0".into(),
            ));
        }
        let mut subscription_ids = HashSet::new();
        for (s, sub) in self.subscriptions.iter().enumerate() {
            let at = format!("subscriptions[{s}]");
            if uuid::Uuid::parse_str(&sub.id).is_err() {
                return Err((format!("{at}.id"), format!("{:?} is not a GUID", sub.id)));
            }
            if !subscription_ids.insert(sub.id.to_ascii_lowercase()) {
                return Err((
                    format!("{at}.id"),
                    format!("duplicate subscription {}", sub.id),
                ));
            }
            sub.validate(&at)?;
        }
        // Key vault and storage account names are DNS names in Azure (`{name}.vault.azure.net`,
        // `{name}.blob.core.windows.net`): unique across subscriptions, and the data plane is
        // found by name alone.
        let mut dns_names: HashMap<String, String> = HashMap::new();
        for (s, sub) in self.subscriptions.iter().enumerate() {
            let vaults = sub.key_vaults.iter().enumerate().map(|(i, k)| {
                (
                    format!("subscriptions[{s}].keyVaults[{i}]"),
                    "key vault",
                    &k.name,
                )
            });
            let accounts = sub.storage_accounts.iter().enumerate().map(|(i, a)| {
                (
                    format!("subscriptions[{s}].storageAccounts[{i}]"),
                    "storage account",
                    &a.name,
                )
            });
            for (here, kind, name) in vaults.chain(accounts) {
                let key = format!("{kind}/{}", name.to_ascii_lowercase());
                if let Some(first) = dns_names.get(&key) {
                    return Err((
                        here,
                        format!("{kind} name {name:?} is already used at {first}: Azure {kind} names are globally unique"),
                    ));
                }
                dns_names.insert(key, here);
            }
        }
        for (t, entry) in self.timeline.iter().enumerate() {
            self.validate_timeline_action(&entry.action, &format!("timeline[{t}]"))?;
        }
        Ok(())
    }

    /// The subscription that holds a VM of this name (VM names are unique per subscription; the first wins).
    fn subscription_of_vm(&self, vm: &str) -> Option<&Subscription> {
        self.subscriptions.iter().find(|s| {
            s.virtual_machines
                .iter()
                .any(|v| v.name.eq_ignore_ascii_case(vm))
        })
    }

    fn validate_timeline_action(
        &self,
        action: &TimelineAction,
        at: &str,
    ) -> Result<(), (String, String)> {
        let created_later = |name: &str| {
            self.timeline.iter().any(|e| {
                matches!(&e.action, TimelineAction::CreateVm { vm } if vm.name.eq_ignore_ascii_case(name))
            })
        };
        let known_vm = |name: &str, field: &str| -> Result<(), (String, String)> {
            if self.subscription_of_vm(name).is_some() || created_later(name) {
                Ok(())
            } else {
                Err((format!("{at}.{field}"), format!("unknown VM {name:?}")))
            }
        };
        let known_key_vault = |name: &str| -> Result<&KeyVaultSpec, (String, String)> {
            self.subscriptions
                .iter()
                .flat_map(|s| s.key_vaults.iter())
                .find(|k| k.name.eq_ignore_ascii_case(name))
                .ok_or_else(|| {
                    (
                        format!("{at}.keyVault"),
                        format!("unknown key vault {name:?}"),
                    )
                })
        };
        match action {
            TimelineAction::Tag { vm, .. }
            | TimelineAction::Untag { vm, .. }
            | TimelineAction::BackupNow { vm } => known_vm(vm, "vm"),
            TimelineAction::RestoreRequest { vm, ticket, .. } => {
                known_vm(vm, "vm")?;
                if ticket.trim().is_empty() {
                    return Err((format!("{at}.ticket"), "must not be empty".into()));
                }
                Ok(())
            }
            TimelineAction::CreateVm { vm } => {
                let Some(sub) = self.subscriptions.first() else {
                    return Err((
                        format!("{at}.vm"),
                        "create-vm needs a subscription in the fleet".into(),
                    ));
                };
                if sub
                    .virtual_machines
                    .iter()
                    .any(|v| v.name.eq_ignore_ascii_case(&vm.name))
                {
                    return Err((
                        format!("{at}.vm.name"),
                        format!("VM {:?} already exists at the start", vm.name),
                    ));
                }
                sub.validate_vm(vm, &format!("{at}.vm"))
            }
            TimelineAction::EnableAde {
                vm,
                key_vault,
                secret,
                kek,
            } => {
                known_vm(vm, "vm")?;
                let kv = known_key_vault(key_vault)?;
                if let Some(kek) = kek {
                    if !kv.keys.iter().any(|k| k.name.eq_ignore_ascii_case(kek)) {
                        return Err((
                            format!("{at}.kek"),
                            format!("key vault {key_vault:?} has no key {kek:?}"),
                        ));
                    }
                }
                // A BEK secret named here is created by ADE if the vault lacks it, as ADE writes it.
                let _ = secret;
                Ok(())
            }
            TimelineAction::DeleteKey { key_vault, key } => {
                let kv = known_key_vault(key_vault)?;
                if !kv.keys.iter().any(|k| k.name.eq_ignore_ascii_case(key)) {
                    return Err((
                        format!("{at}.key"),
                        format!("key vault {key_vault:?} has no key {key:?}"),
                    ));
                }
                Ok(())
            }
            TimelineAction::DeleteSecret { key_vault, secret } => {
                let kv = known_key_vault(key_vault)?;
                let ade_secret = self.subscriptions.iter().flat_map(|s| &s.virtual_machines).any(
                    |v| matches!(&v.encryption, EncryptionSpec::Ade { secret: s, .. } if s.eq_ignore_ascii_case(secret)),
                );
                if !ade_secret
                    && !kv
                        .secrets
                        .iter()
                        .any(|s| s.name.eq_ignore_ascii_case(secret))
                {
                    return Err((
                        format!("{at}.secret"),
                        format!("key vault {key_vault:?} has no secret {secret:?}"),
                    ));
                }
                Ok(())
            }
        }
    }
}

impl Subscription {
    fn validate(&self, at: &str) -> Result<(), (String, String)> {
        unique_names(
            at,
            "recoveryVaults",
            self.recovery_vaults.iter().map(|v| &v.name),
        )?;
        unique_names(at, "keyVaults", self.key_vaults.iter().map(|v| &v.name))?;
        unique_names(
            at,
            "diskEncryptionSets",
            self.disk_encryption_sets.iter().map(|v| &v.name),
        )?;
        unique_names(
            at,
            "storageAccounts",
            self.storage_accounts.iter().map(|v| &v.name),
        )?;
        unique_names(
            at,
            "virtualMachines",
            self.virtual_machines.iter().map(|v| &v.name),
        )?;
        for (i, vault) in self.recovery_vaults.iter().enumerate() {
            let here = format!("{at}.recoveryVaults[{i}]");
            check_location(&here, &vault.location)?;
            unique_names(&here, "policies", vault.policies.iter())?;
        }
        for (i, kv) in self.key_vaults.iter().enumerate() {
            let here = format!("{at}.keyVaults[{i}]");
            check_location(&here, &kv.location)?;
            unique_names(&here, "keys", kv.keys.iter().map(|k| &k.name))?;
            unique_names(&here, "secrets", kv.secrets.iter().map(|k| &k.name))?;
        }
        for (i, des) in self.disk_encryption_sets.iter().enumerate() {
            let here = format!("{at}.diskEncryptionSets[{i}]");
            check_location(&here, &des.location)?;
            let kv = self.key_vault(&des.key_vault).ok_or_else(|| {
                (
                    format!("{here}.keyVault"),
                    format!("unknown key vault {:?}", des.key_vault),
                )
            })?;
            if !kv
                .keys
                .iter()
                .any(|k| k.name.eq_ignore_ascii_case(&des.key))
            {
                return Err((
                    format!("{here}.key"),
                    format!("key vault {:?} has no key {:?}", des.key_vault, des.key),
                ));
            }
        }
        for (i, account) in self.storage_accounts.iter().enumerate() {
            let here = format!("{at}.storageAccounts[{i}]");
            check_location(&here, &account.location)?;
            let valid = (3..=24).contains(&account.name.len())
                && account
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            if !valid {
                return Err((
                    format!("{here}.name"),
                    format!(
                        "{:?} must be 3-24 lower-case letters and digits",
                        account.name
                    ),
                ));
            }
        }
        for (i, vm) in self.virtual_machines.iter().enumerate() {
            self.validate_vm(vm, &format!("{at}.virtualMachines[{i}]"))?;
        }
        Ok(())
    }

    fn key_vault(&self, name: &str) -> Option<&KeyVaultSpec> {
        self.key_vaults
            .iter()
            .find(|k| k.name.eq_ignore_ascii_case(name))
    }

    fn validate_vm(&self, vm: &VirtualMachineSpec, here: &str) -> Result<(), (String, String)> {
        check_location(here, &vm.location)?;
        if vm.name.is_empty() || vm.name.len() > 64 {
            return Err((format!("{here}.name"), "must be 1-64 characters".into()));
        }
        if vm.data_disks > 64 {
            return Err((format!("{here}.dataDisks"), "at most 64 data disks".into()));
        }
        match &vm.encryption {
            EncryptionSpec::Pmk | EncryptionSpec::Host => {}
            EncryptionSpec::Cmk {
                disk_encryption_set,
            } => {
                if !self
                    .disk_encryption_sets
                    .iter()
                    .any(|d| d.name.eq_ignore_ascii_case(disk_encryption_set))
                {
                    return Err((
                        format!("{here}.encryption.diskEncryptionSet"),
                        format!("unknown disk encryption set {disk_encryption_set:?}"),
                    ));
                }
            }
            EncryptionSpec::Ade { key_vault, kek, .. } => {
                let kv = self.key_vault(key_vault).ok_or_else(|| {
                    (
                        format!("{here}.encryption.keyVault"),
                        format!("unknown key vault {key_vault:?} in this subscription"),
                    )
                })?;
                if let Some(kek) = kek {
                    if !kv.keys.iter().any(|k| k.name.eq_ignore_ascii_case(kek)) {
                        return Err((
                            format!("{here}.encryption.kek"),
                            format!("key vault {key_vault:?} has no key {kek:?}"),
                        ));
                    }
                }
            }
        }
        if let Some(protected) = &vm.protected_by {
            let vault = self
                .recovery_vaults
                .iter()
                .find(|v| v.name.eq_ignore_ascii_case(&protected.vault))
                .ok_or_else(|| {
                    (
                        format!("{here}.protectedBy.vault"),
                        format!("unknown recovery vault {:?}", protected.vault),
                    )
                })?;
            if !vault
                .policies
                .iter()
                .any(|p| p.eq_ignore_ascii_case(&protected.policy))
            {
                return Err((
                    format!("{here}.protectedBy.policy"),
                    format!(
                        "vault {:?} has no policy {:?}",
                        vault.name, protected.policy
                    ),
                ));
            }
            if !vault.location.eq_ignore_ascii_case(&vm.location) {
                return Err((
                    format!("{here}.protectedBy.vault"),
                    format!(
                        "vault {:?} is in {} but the VM is in {}; Azure Backup protects VMs only from a vault in their region",
                        vault.name, vault.location, vm.location
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn unique_names<'a>(
    at: &str,
    list: &str,
    names: impl Iterator<Item = &'a String>,
) -> Result<(), (String, String)> {
    let mut seen = HashSet::new();
    for (i, name) in names.enumerate() {
        if name.trim().is_empty() {
            return Err((format!("{at}.{list}[{i}]"), "name must not be empty".into()));
        }
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err((
                format!("{at}.{list}[{i}]"),
                format!("duplicate name {name:?}"),
            ));
        }
    }
    Ok(())
}

fn check_location(at: &str, location: &str) -> Result<(), (String, String)> {
    let valid = !location.is_empty()
        && location
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err((
            format!("{at}.location"),
            format!("{location:?} is not an Azure region name such as \"westeurope\""),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "11111111-1111-1111-1111-111111111111";

    fn fleet_with_vm(vm: &str) -> String {
        format!(
            r#"{{"subscriptions":[{{"id":"{SUB}",
              "recoveryVaults":[{{"name":"rsv","resourceGroup":"rg","location":"westeurope"}}],
              "keyVaults":[{{"name":"kv","resourceGroup":"rg","location":"westeurope","keys":[{{"name":"kek-1"}}]}}],
              "virtualMachines":[{vm}]}}]}}"#
        )
    }

    #[test]
    fn durations_accept_units_and_reject_junk() {
        assert_eq!(SimDuration::parse("90s").unwrap().0.as_secs(), 90);
        assert_eq!(SimDuration::parse("10m").unwrap().0.as_secs(), 600);
        assert_eq!(SimDuration::parse("2h").unwrap().0.as_secs(), 7200);
        assert_eq!(SimDuration::parse("1d").unwrap().0.as_secs(), 86400);
        assert!(SimDuration::parse("10x")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(SimDuration::parse("10").unwrap_err().contains("no unit"));
        assert!(SimDuration::parse("m").is_err());
    }

    #[test]
    fn contract_example_parses() {
        let text = fleet_with_vm(
            r#"{"name":"vm-web-01","resourceGroup":"rg-app","location":"westeurope","tags":{"backup-policy":"DefaultPolicy"},
                "encryption":{"kind":"ade","keyVault":"kv","secret":"bek","kek":"kek-1"},"dataDisks":2,"agent":"ready",
                "powerState":"running","protectedBy":null}"#,
        );
        let fleet = Fleet::from_json_str(&text).unwrap();
        let vm = &fleet.subscriptions[0].virtual_machines[0];
        assert!(matches!(&vm.encryption, EncryptionSpec::Ade { kek: Some(k), .. } if k == "kek-1"));
        assert_eq!(fleet.simulation.backup_job_seconds, 1800);
    }

    #[test]
    fn bad_duration_names_the_timeline_field() {
        let mut fleet: serde_json::Value = serde_json::from_str(&fleet_with_vm(
            r#"{"name":"vm1","resourceGroup":"rg","location":"westeurope"}"#,
        ))
        .unwrap();
        fleet["timeline"] =
            serde_json::json!([{"at":"10x","action":"tag","vm":"vm1","tags":{"a":"b"}}]);
        let err = Fleet::from_json_str(&fleet.to_string()).unwrap_err();
        assert!(err.field.starts_with("timeline[0]"), "{err}");
        assert!(err.reason.contains("10x"), "{err}");
    }

    #[test]
    fn unknown_reference_and_duplicates_name_the_field() {
        let err = Fleet::from_json_str(&fleet_with_vm(
            r#"{"name":"vm1","resourceGroup":"rg","location":"westeurope","encryption":{"kind":"ade","keyVault":"nope","secret":"s"}}"#,
        ))
        .unwrap_err();
        assert_eq!(
            err.field,
            "subscriptions[0].virtualMachines[0].encryption.keyVault"
        );
        assert!(err.reason.contains("nope"));

        let err = Fleet::from_json_str(&fleet_with_vm(
            r#"{"name":"vm1","resourceGroup":"rg","location":"westeurope"},{"name":"VM1","resourceGroup":"rg","location":"westeurope"}"#,
        ))
        .unwrap_err();
        assert_eq!(err.field, "subscriptions[0].virtualMachines[1]");
        assert!(err.reason.contains("duplicate"));

        let err = Fleet::from_json_str(&fleet_with_vm(
            r#"{"name":"vm1","resourceGroup":"rg","location":"westeurope","agent":"sleepy"}"#,
        ))
        .unwrap_err();
        assert_eq!(err.field, "subscriptions[0].virtualMachines[0].agent");
        assert_eq!(err.source_name, "<inline>");
    }

    #[test]
    fn key_vault_and_storage_account_names_are_unique_across_subscriptions() {
        let fleet = |second_vault: &str| {
            format!(
                r#"{{"subscriptions":[
                {{"id":"11111111-1111-1111-1111-111111111111","keyVaults":[{{"name":"kv-app","resourceGroup":"rg","location":"westeurope"}}]}},
                {{"id":"22222222-2222-2222-2222-222222222222","keyVaults":[{{"name":"{second_vault}","resourceGroup":"rg","location":"westeurope"}}]}}]}}"#
            )
        };
        assert!(Fleet::from_json_str(&fleet("kv-other")).is_ok());
        let err = Fleet::from_json_str(&fleet("KV-App")).unwrap_err();
        assert_eq!(err.field, "subscriptions[1].keyVaults[0]");
        assert!(
            err.reason.contains("subscriptions[0].keyVaults[0]"),
            "{err}"
        );
    }

    #[test]
    fn protected_by_must_name_a_policy_of_a_vault_in_the_region() {
        let err = Fleet::from_json_str(&fleet_with_vm(
            r#"{"name":"vm1","resourceGroup":"rg","location":"westeurope","protectedBy":{"vault":"rsv","policy":"Nope"}}"#,
        ))
        .unwrap_err();
        assert_eq!(
            err.field,
            "subscriptions[0].virtualMachines[0].protectedBy.policy"
        );
        let err = Fleet::from_json_str(&fleet_with_vm(
            r#"{"name":"vm1","resourceGroup":"rg","location":"northeurope","protectedBy":{"vault":"rsv","policy":"DefaultPolicy"}}"#,
        ))
        .unwrap_err();
        assert!(err.reason.contains("region"), "{err}");
    }
}
