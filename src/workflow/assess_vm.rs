//! `assess-vm` (queue `protection-requests`): reads a VM — its model and instance view, and for ADE
//! with a KEK the key's metadata — and lets `domain::eligibility` decide what comes next:
//! `key-vault.access-needed` (ADE), `protection.ready` (PMK, CMK, host), a delayed agent re-check, or
//! `protection.rejected` with a reason code.
//!
//! `encryption.enabled` arrives on the same queue: on a protected VM it asks for Key Vault access
//! again so backups continue; on an unprotected tagged VM it becomes `protection.requested`.
//!
//! Also home of the pieces `on-vm-event` shares: the per-process [`VaultDirectory`] and
//! [`find_protection`].

use super::enable_protection::{protected_item, ExistingProtection};
use super::Deps;
use crate::azure::compute::VirtualMachine;
use crate::azure::servicebus::OutgoingMessage;
use crate::azure::AzureError;
use crate::domain::eligibility::{
    assess, key_vault_access_needs, same_region, tag_value, AgentRecheckPolicy, AgentStatus,
    Assessment, CurrentProtection, PowerState, VaultCandidate, VmAssessmentInput,
    BACKUP_POLICY_TAG,
};
use crate::domain::encryption::{
    classify, is_ade_extension, split_object_url, AdeDiskSettingsFacts, AdeExtensionFacts,
    DiskEncryptionFacts, EncryptionKind, VmEncryptionFacts,
};
use crate::domain::{ReasonCode, Rejection, ResourceId};
use crate::events::{
    queues, AfterAccess, CloudEvent, EncryptionEnabled, EventData, KeyVaultAccessNeeded,
    ProtectionCause, ProtectionReady, ProtectionRejected, ProtectionRequested,
};
use crate::runtime::{
    unwrap_json_strings, EnvelopeError, FunctionSpec, HandlerError, Invocation, OutputBinding,
    Outputs, Trigger, TriggerPayload,
};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub const NAME: &str = "assess-vm";
const KEY_VAULT_ACCESS_OUT: &str = "keyVaultAccess";
const READY_OUT: &str = "protectionReady";
const OUTCOMES_OUT: &str = "outcomes";
const REQUESTS_OUT: &str = "protectionRequests";

/// Recovery Services vaults, as Resource Graph lists them.
const VAULTS_QUERY: &str =
    "Resources | where type =~ 'microsoft.recoveryservices/vaults' | project id, location";

/// How long vault and policy lists are reused before they are read again.
pub const VAULT_CACHE_TTL: Duration = Duration::from_secs(300);

pub fn spec() -> FunctionSpec {
    FunctionSpec::new(NAME, Trigger::service_bus(queues::PROTECTION_REQUESTS))
        .output(OutputBinding::service_bus(
            KEY_VAULT_ACCESS_OUT,
            queues::KEY_VAULT_ACCESS,
        ))
        .output(OutputBinding::service_bus(
            READY_OUT,
            queues::PROTECTION_READY,
        ))
        .output(OutputBinding::service_bus(OUTCOMES_OUT, queues::OUTCOMES))
        .output(OutputBinding::service_bus(
            REQUESTS_OUT,
            queues::PROTECTION_REQUESTS,
        ))
}

/// The two events of the `protection-requests` queue.
#[derive(Debug, Clone)]
pub enum AssessRequest {
    Protection(CloudEvent<ProtectionRequested>),
    Encryption(CloudEvent<EncryptionEnabled>),
}

impl TriggerPayload for AssessRequest {
    fn from_trigger(value: Value, field: &str) -> Result<Self, EnvelopeError> {
        let value = unwrap_json_strings(value);
        if value.get("type").and_then(Value::as_str) == Some(EncryptionEnabled::TYPE) {
            CloudEvent::<EncryptionEnabled>::from_trigger(value, field).map(Self::Encryption)
        } else {
            CloudEvent::<ProtectionRequested>::from_trigger(value, field).map(Self::Protection)
        }
    }
}

/// A failed Azure call: transient ones go back to the host (500, retried, finally dead-lettered);
/// any other becomes a rejection carrying Azure's error.
pub(crate) fn refused_or_retry(step: &str, error: AzureError) -> Result<Rejection, HandlerError> {
    if error.is_transient() {
        return Err(HandlerError::transient(format!("{step}: {error}")));
    }
    Ok(Rejection::new(
        ReasonCode::AzureRefused,
        format!("{step}: {error}"),
    ))
}

/// The Recovery Services vaults (with their IaaS VM policies) of each subscription, read once per
/// [`VAULT_CACHE_TTL`] and shared by every invocation of this process: a thousand VMs of one
/// subscription cost two reads for vaults, not two thousand.
pub struct VaultDirectory {
    ttl: Duration,
    // Held across the read, so concurrent invocations wait for one read instead of each making it.
    entries: tokio::sync::Mutex<HashMap<String, VaultList>>,
}

/// One subscription's vaults as read at `read_at`.
#[derive(Debug, Clone)]
pub struct VaultList {
    pub read_at: DateTime<Utc>,
    pub vaults: Arc<Vec<VaultCandidate>>,
}

impl VaultList {
    /// The vaults in the VM's subscription and region (the only ones that may protect it).
    pub fn local_to<'a>(
        &'a self,
        vm_id: &'a ResourceId,
        location: &'a str,
    ) -> impl Iterator<Item = &'a VaultCandidate> + 'a {
        self.vaults.iter().filter(move |v| {
            v.id.subscription_id()
                .eq_ignore_ascii_case(vm_id.subscription_id())
                && same_region(&v.location, location)
        })
    }
}

impl VaultDirectory {
    pub fn new(ttl: Duration) -> Self {
        VaultDirectory {
            ttl,
            entries: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The subscription's vaults, read again when older than the TTL or not newer than `newer_than`.
    pub async fn vaults(
        &self,
        deps: &Deps,
        subscription: &str,
        newer_than: Option<DateTime<Utc>>,
    ) -> Result<VaultList, AzureError> {
        let key = subscription.to_ascii_lowercase();
        let mut entries = self.entries.lock().await;
        let now = deps.clock.now();
        if let Some(cached) = entries.get(&key) {
            let young = (now - cached.read_at).to_std().unwrap_or_default() < self.ttl;
            let new_enough = newer_than.is_none_or(|t| cached.read_at > t);
            if young && new_enough {
                return Ok(cached.clone());
            }
        }
        let list = VaultList {
            read_at: now,
            vaults: Arc::new(read_vaults(deps, subscription).await?),
        };
        entries.insert(key, list.clone());
        Ok(list)
    }
}

/// The subscription's vaults from Resource Graph (one request for all of them), then each vault's
/// IaaS VM policies.
async fn read_vaults(deps: &Deps, subscription: &str) -> Result<Vec<VaultCandidate>, AzureError> {
    let rows = deps
        .graph
        .query(VAULTS_QUERY, &[subscription.to_string()])
        .await?;
    let mut candidates = Vec::new();
    for row in rows {
        let text = |key: &str| row.get(key).and_then(Value::as_str).unwrap_or_default();
        let id = ResourceId::parse(text("id")).map_err(|e| AzureError::Decode {
            url: "Resource Graph: Recovery Services vaults".into(),
            message: e.to_string(),
        })?;
        let policies = deps.backup.list_policies(&id.to_string()).await?;
        candidates.push(VaultCandidate {
            id,
            location: text("location").to_string(),
            policies: policies.into_iter().map(|p| p.name).collect(),
        });
    }
    Ok(candidates)
}

/// Where the VM is protected among `vaults` (GET of the protected item in each; 404 = not there).
pub async fn find_protection<'a>(
    deps: &Deps,
    vm_id: &ResourceId,
    vaults: impl Iterator<Item = &'a VaultCandidate>,
) -> Result<Option<ExistingProtection>, AzureError> {
    for vault in vaults {
        if let Some(found) = protected_item(deps, &vault.id, vm_id).await? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

pub async fn handle(
    deps: Arc<Deps>,
    vaults: Arc<VaultDirectory>,
    invocation: Invocation<AssessRequest>,
) -> Result<Outputs, HandlerError> {
    match invocation.data {
        AssessRequest::Protection(event) => assess_request(&deps, &vaults, &event).await,
        AssessRequest::Encryption(event) => encryption_enabled(&deps, &vaults, &event).await,
    }
}

fn rejected<T>(
    event: &CloudEvent<T>,
    vm_id: &ResourceId,
    rejection: Rejection,
    encryption: Option<EncryptionKind>,
    now: DateTime<Utc>,
) -> Result<Outputs, HandlerError> {
    tracing::warn!(vm = %vm_id, reason = %rejection.code, message = %rejection.message, "protection rejected");
    let mut outputs = Outputs::new();
    outputs.push(
        OUTCOMES_OUT,
        &event.follow(
            ProtectionRejected {
                vm_id: vm_id.clone(),
                reason: rejection.code,
                message: rejection.message,
                encryption,
            },
            "",
            now,
        ),
    )?;
    Ok(outputs)
}

/// What assess-vm reads about a VM besides what it decides.
struct VmReading {
    vm: VirtualMachine,
    encryption: EncryptionKind,
}

/// GET the VM with its instance view and classify its encryption; `Err(Ok(rejection))` when that
/// can never work (deleted VM, unreadable settings).
async fn read_vm(
    deps: &Deps,
    vm_id: &ResourceId,
) -> Result<Result<VmReading, Rejection>, HandlerError> {
    let vm = match deps.compute.get_vm(&vm_id.to_string(), true).await {
        Ok(vm) => vm,
        Err(e) if e.is_not_found() => {
            return Ok(Err(Rejection::new(
                ReasonCode::VmNotFound,
                format!("VM {vm_id} does not exist (deleted?)"),
            )))
        }
        Err(e) => return refused_or_retry("read the VM", e).map(Err),
    };
    let extension = match ade_extension_settings(deps, vm_id, &vm).await {
        Ok(extension) => extension,
        Err(e) => return refused_or_retry("read the ADE extension", e).map(Err),
    };
    match classify(&encryption_facts(&vm, extension)) {
        Ok(encryption) => Ok(Ok(VmReading { vm, encryption })),
        Err(e) => Ok(Err(Rejection::new(
            ReasonCode::UnreadableEncryptionSettings,
            e.to_string(),
        ))),
    }
}

/// ADE settings as written on a disk (`encryptionSettings` of the VM model).
fn ade_disk_facts(settings: &Value) -> AdeDiskSettingsFacts {
    let text = |pointer: &str| {
        settings
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    AdeDiskSettingsFacts {
        enabled: settings
            .get("enabled")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        secret_url: text("/diskEncryptionKey/secretUrl"),
        secret_vault_id: text("/diskEncryptionKey/sourceVault/id"),
        key_url: text("/keyEncryptionKey/keyUrl"),
        key_vault_id: text("/keyEncryptionKey/sourceVault/id"),
    }
}

/// The VM model's facts for `domain::encryption::classify`.
pub fn encryption_facts(
    vm: &VirtualMachine,
    ade_extension: Option<AdeExtensionFacts>,
) -> VmEncryptionFacts {
    let storage = &vm.properties.storage_profile;
    let os_disk = storage
        .os_disk
        .as_ref()
        .map(|disk| DiskEncryptionFacts {
            ade: disk.encryption_settings.as_ref().map(ade_disk_facts),
            disk_encryption_set_id: disk
                .managed_disk
                .as_ref()
                .and_then(|m| m.disk_encryption_set.as_ref())
                .map(|des| des.id.clone()),
        })
        .unwrap_or_default();
    let data_disks = storage
        .data_disks
        .iter()
        .map(|disk| DiskEncryptionFacts {
            ade: None,
            disk_encryption_set_id: disk
                .managed_disk
                .as_ref()
                .and_then(|m| m.disk_encryption_set.as_ref())
                .map(|des| des.id.clone()),
        })
        .collect();
    VmEncryptionFacts {
        os_disk,
        data_disks,
        ade_extension,
        encryption_at_host: vm
            .properties
            .security_profile
            .as_ref()
            .and_then(|s| s.encryption_at_host)
            .unwrap_or(false),
    }
}

/// The ADE extension's public settings, read only when the instance view lists an ADE extension but
/// the OS disk names no key vault (data-volume-only encryption): disk settings are enough otherwise.
async fn ade_extension_settings(
    deps: &Deps,
    vm_id: &ResourceId,
    vm: &VirtualMachine,
) -> Result<Option<AdeExtensionFacts>, AzureError> {
    let os_disk_has_ade = vm
        .properties
        .storage_profile
        .os_disk
        .as_ref()
        .and_then(|d| d.encryption_settings.as_ref())
        .is_some_and(|s| ade_disk_facts(s).enabled);
    if os_disk_has_ade {
        return Ok(None);
    }
    let Some(view) = &vm.properties.instance_view else {
        return Ok(None);
    };
    // The instance view names an extension's type as `{publisher}.{type}`.
    let ade_extension = view.extensions.iter().find(|e| {
        e.extension_type
            .as_deref()
            .and_then(|t| t.rsplit_once('.'))
            .is_some_and(|(publisher, kind)| is_ade_extension(publisher, kind))
    });
    let Some(name) = ade_extension.and_then(|e| e.name.as_deref()) else {
        return Ok(None);
    };
    let extension = deps.compute.get_extension(&vm_id.to_string(), name).await?;
    let settings = extension.properties.settings.unwrap_or_default();
    let text = |key: &str| {
        settings
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Ok(Some(AdeExtensionFacts {
        key_vault_url: text("KeyVaultURL"),
        key_vault_resource_id: text("KeyVaultResourceId"),
        key_encryption_key_url: text("KeyEncryptionKeyURL"),
        kek_vault_resource_id: text("KekVaultResourceId"),
    }))
}

fn power_state(vm: &VirtualMachine) -> PowerState {
    let state = vm
        .properties
        .instance_view
        .as_ref()
        .and_then(|v| v.power_state());
    match state {
        Some("running") => PowerState::Running,
        Some("stopped") => PowerState::Stopped,
        Some("deallocated") => PowerState::Deallocated,
        _ => PowerState::Other,
    }
}

fn agent_status(vm: &VirtualMachine) -> AgentStatus {
    match &vm.properties.instance_view {
        Some(view) if view.agent_ready() => AgentStatus::Ready,
        Some(view) if view.vm_agent.is_some() => AgentStatus::NotReady,
        _ => AgentStatus::Missing,
    }
}

/// Whether the ADE KEK is part of a certificate (Key Vault marks such keys `managed`). When the app
/// may not read the key vault's keys, the check is skipped: the first backup tells.
async fn kek_certificate_backed(
    deps: &Deps,
    encryption: &EncryptionKind,
) -> Result<Result<bool, Rejection>, HandlerError> {
    let Some(kek) = encryption.ade_keys().and_then(|k| k.kek.as_ref()) else {
        return Ok(Ok(false));
    };
    let unreadable = || {
        Rejection::new(
            ReasonCode::UnreadableEncryptionSettings,
            format!(
                "keyEncryptionKey.keyUrl {:?} is not a Key Vault key URL",
                kek.key_url
            ),
        )
    };
    let Some((vault_uri, name, version)) = split_object_url(&kek.key_url, "keys") else {
        return Ok(Err(unreadable()));
    };
    match deps
        .key_vault
        .get_key(&vault_uri, &name, version.as_deref())
        .await
    {
        Ok(key) => Ok(Ok(key.managed == Some(true))),
        Err(e) if matches!(e.status(), Some(401 | 403)) => {
            tracing::warn!(
                key = name,
                "cannot read the KEK's metadata; certificate check skipped"
            );
            Ok(Ok(false))
        }
        Err(e) if e.is_not_found() => Ok(Err(Rejection::new(
            ReasonCode::UnreadableEncryptionSettings,
            format!("the ADE key encryption key {name} does not exist in its key vault"),
        ))),
        Err(e) => refused_or_retry("read the KEK's metadata", e).map(Err),
    }
}

async fn assess_request(
    deps: &Deps,
    directory: &VaultDirectory,
    event: &CloudEvent<ProtectionRequested>,
) -> Result<Outputs, HandlerError> {
    let request = &event.data;
    let vm_id = &request.vm_id;
    let now = deps.clock.now();
    let reading = match read_vm(deps, vm_id).await? {
        Ok(reading) => reading,
        Err(rejection) => return rejected(event, vm_id, rejection, None, now),
    };
    let encryption = reading.encryption.clone();
    if tag_value(&reading.vm.tags, BACKUP_POLICY_TAG).is_none_or(|p| p.trim().is_empty()) {
        // The tag was removed since the request: nobody asks for protection any more.
        tracing::info!(vm = %vm_id, "VM no longer carries the {BACKUP_POLICY_TAG} tag; nothing to do");
        return Ok(Outputs::new());
    }
    let kek_certificate_backed = match kek_certificate_backed(deps, &encryption).await? {
        Ok(backed) => backed,
        Err(rejection) => return rejected(event, vm_id, rejection, Some(encryption), now),
    };
    let mut vaults = directory
        .vaults(deps, vm_id.subscription_id(), None)
        .await
        .map_err(|e| HandlerError::transient(format!("list the vaults: {e}")))?;
    let mut input = VmAssessmentInput {
        vm_id: vm_id.clone(),
        location: reading.vm.location.clone(),
        tags: reading.vm.tags.clone(),
        encryption: encryption.clone(),
        kek_certificate_backed,
        power_state: power_state(&reading.vm),
        agent: agent_status(&reading.vm),
        agent_rechecks_done: request.agent_checks,
        current_protection: None,
    };
    let recheck = AgentRecheckPolicy {
        delay: deps.settings.agent_recheck_delay,
        ..AgentRecheckPolicy::default()
    };
    let mut decision = None;
    // At most twice: a rejection for want of a vault or policy is checked against fresh lists.
    for attempt in 0..2 {
        input.current_protection = current_protection_if_it_matters(deps, &vaults, &input).await?;
        let assessment = assess(&input, &vaults.vaults, &recheck);
        let missing_vault_or_policy = matches!(
            &assessment,
            Assessment::Rejected(r) if matches!(r.code, ReasonCode::NoVaultInRegion | ReasonCode::UnknownPolicy)
        );
        decision = Some(assessment);
        if attempt > 0 || !missing_vault_or_policy {
            break;
        }
        vaults = directory
            .vaults(deps, vm_id.subscription_id(), Some(vaults.read_at))
            .await
            .map_err(|e| HandlerError::transient(format!("list the vaults: {e}")))?;
    }
    let Some(decision) = decision else {
        return Err(HandlerError::transient("no assessment was made"));
    };
    let mut outputs = Outputs::new();
    match decision {
        Assessment::Rejected(rejection) => {
            return rejected(event, vm_id, rejection, Some(encryption), now)
        }
        Assessment::Ready { vault, policy } => {
            tracing::info!(vm = %vm_id, vault = %vault, %policy, encryption = encryption.report_name(), "ready for protection");
            outputs.push(
                READY_OUT,
                &event.follow(
                    ProtectionReady {
                        vm_id: vm_id.clone(),
                        vault_id: vault,
                        policy,
                        encryption,
                    },
                    "",
                    now,
                ),
            )?;
        }
        Assessment::NeedsKeyVaultAccess {
            vault,
            policy,
            needs,
        } => {
            tracing::info!(vm = %vm_id, vault = %vault, %policy, encryption = encryption.report_name(), "Key Vault access needed first");
            outputs.push(
                KEY_VAULT_ACCESS_OUT,
                &event.follow(
                    KeyVaultAccessNeeded {
                        vm_id: vm_id.clone(),
                        needs,
                        then: AfterAccess::Protect {
                            vault_id: vault,
                            policy,
                            encryption,
                        },
                    },
                    "",
                    now,
                ),
            )?;
        }
        Assessment::RecheckAgentAfter(delay) => {
            schedule_agent_recheck(deps, event, delay, now).await?;
        }
    }
    Ok(outputs)
}

/// Vault choice depends on current protection only when the region has several vaults; with one,
/// enable-protection's own read of the protected item is enough (and saves a request per VM).
async fn current_protection_if_it_matters(
    deps: &Deps,
    vaults: &VaultList,
    input: &VmAssessmentInput,
) -> Result<Option<CurrentProtection>, HandlerError> {
    let local: Vec<&VaultCandidate> = vaults.local_to(&input.vm_id, &input.location).collect();
    if local.len() < 2 {
        return Ok(None);
    }
    let found = find_protection(deps, &input.vm_id, local.into_iter())
        .await
        .map_err(|e| HandlerError::transient(format!("read the protected item: {e}")))?;
    Ok(found.map(|p| CurrentProtection {
        vault: p.vault_id,
        policy: p.policy,
    }))
}

/// Send `protection.requested` again with one more agent check, delivered after `delay`.
async fn schedule_agent_recheck(
    deps: &Deps,
    event: &CloudEvent<ProtectionRequested>,
    delay: Duration,
    now: DateTime<Utc>,
) -> Result<(), HandlerError> {
    let Some(sender) = &deps.sender else {
        return Err(HandlerError::transient(
            "the VM agent must be re-checked later, but no Service Bus sender is configured for scheduled messages",
        ));
    };
    let checks = event.data.agent_checks + 1;
    let next = event.follow(
        ProtectionRequested {
            agent_checks: checks,
            ..event.data.clone()
        },
        &format!("agent-check-{checks}"),
        now,
    );
    let at = now + chrono::Duration::from_std(delay).unwrap_or_default();
    let message = OutgoingMessage {
        body: serde_json::to_value(&next).map_err(HandlerError::transient)?,
        message_id: next.id.clone(),
        correlation_id: Some(next.correlationid.clone()),
        label: Some(ProtectionRequested::TYPE.to_string()),
        scheduled_enqueue_time: Some(at),
    };
    sender
        .send(queues::PROTECTION_REQUESTS, &message)
        .await
        .map_err(|e| HandlerError::transient(format!("schedule the agent re-check: {e}")))?;
    tracing::info!(vm = %event.data.vm_id, check = checks, %at, "VM agent not ready; re-check scheduled");
    Ok(())
}

async fn encryption_enabled(
    deps: &Deps,
    directory: &VaultDirectory,
    event: &CloudEvent<EncryptionEnabled>,
) -> Result<Outputs, HandlerError> {
    let vm_id = &event.data.vm_id;
    let now = deps.clock.now();
    let reading = match read_vm(deps, vm_id).await? {
        Ok(reading) => reading,
        Err(rejection) => return rejected(event, vm_id, rejection, None, now),
    };
    let needs = key_vault_access_needs(&reading.encryption);
    if needs.is_empty() {
        tracing::info!(vm = %vm_id, encryption = reading.encryption.report_name(), "no ADE settings on the VM; nothing to grant");
        return Ok(Outputs::new());
    }
    let vaults = directory
        .vaults(deps, vm_id.subscription_id(), None)
        .await
        .map_err(|e| HandlerError::transient(format!("list the vaults: {e}")))?;
    let protection = find_protection(deps, vm_id, vaults.local_to(vm_id, &reading.vm.location))
        .await
        .map_err(|e| HandlerError::transient(format!("read the protected item: {e}")))?;
    let mut outputs = Outputs::new();
    if protection.is_some() {
        tracing::info!(vm = %vm_id, "ADE enabled on a protected VM: granting Key Vault access again");
        outputs.push(
            KEY_VAULT_ACCESS_OUT,
            &event.follow(
                KeyVaultAccessNeeded {
                    vm_id: vm_id.clone(),
                    needs,
                    then: AfterAccess::AlreadyProtected,
                },
                "",
                now,
            ),
        )?;
        return Ok(outputs);
    }
    let Some(policy) = tag_value(&reading.vm.tags, BACKUP_POLICY_TAG)
        .map(str::trim)
        .filter(|p| !p.is_empty())
    else {
        tracing::info!(vm = %vm_id, "ADE enabled on an untagged, unprotected VM; nothing to do");
        return Ok(outputs);
    };
    outputs.push(
        REQUESTS_OUT,
        &event.follow(
            ProtectionRequested {
                vm_id: vm_id.clone(),
                policy: Some(policy.to_string()),
                cause: ProtectionCause::EncryptionEnabled,
                agent_checks: 0,
            },
            "",
            now,
        ),
    )?;
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vm(body: Value) -> VirtualMachine {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn facts_from_the_vm_model() {
        let ade = vm(json!({
            "id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/v",
            "name": "v", "location": "westeurope",
            "properties": { "storageProfile": { "osDisk": { "encryptionSettings": {
                "enabled": true,
                "diskEncryptionKey": { "secretUrl": "https://kv.vault.azure.net/secrets/bek/1", "sourceVault": { "id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv" } },
                "keyEncryptionKey": { "keyUrl": "https://kv.vault.azure.net/keys/kek/2", "sourceVault": { "id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv" } }
            } } } }
        }));
        let kind = classify(&encryption_facts(&ade, None)).unwrap();
        assert_eq!(kind.report_name(), "ade-kek");

        let cmk = vm(json!({
            "id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/v",
            "name": "v", "location": "westeurope",
            "properties": { "storageProfile": { "osDisk": { "managedDisk": { "diskEncryptionSet": { "id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/diskEncryptionSets/des" } } } } }
        }));
        assert_eq!(
            classify(&encryption_facts(&cmk, None))
                .unwrap()
                .report_name(),
            "cmk"
        );

        let host = vm(json!({
            "id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/v",
            "name": "v", "location": "westeurope",
            "properties": { "securityProfile": { "encryptionAtHost": true } }
        }));
        assert_eq!(
            classify(&encryption_facts(&host, None))
                .unwrap()
                .report_name(),
            "host"
        );
    }

    #[test]
    fn agent_and_power_from_the_instance_view() {
        let running_not_ready = vm(json!({
            "id": "/x", "name": "v", "location": "l",
            "properties": { "instanceView": {
                "statuses": [{ "code": "PowerState/running" }],
                "vmAgent": { "statuses": [{ "code": "ProvisioningState/Unavailable", "displayStatus": "Not Ready" }] }
            } }
        }));
        assert_eq!(power_state(&running_not_ready), PowerState::Running);
        assert_eq!(agent_status(&running_not_ready), AgentStatus::NotReady);
        let deallocated_without_agent = vm(json!({
            "id": "/x", "name": "v", "location": "l",
            "properties": { "instanceView": { "statuses": [{ "code": "PowerState/deallocated" }] } }
        }));
        assert_eq!(
            power_state(&deallocated_without_agent),
            PowerState::Deallocated
        );
        assert_eq!(
            agent_status(&deallocated_without_agent),
            AgentStatus::Missing
        );
    }

    #[test]
    fn both_event_types_of_the_queue_decode() {
        let vm_id =
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/v";
        let enabled = CloudEvent::start(
            EncryptionEnabled {
                vm_id: ResourceId::parse(vm_id).unwrap(),
            },
            None,
            Utc::now(),
        );
        let text = serde_json::to_string(&enabled).unwrap();
        assert!(matches!(
            AssessRequest::from_trigger(Value::String(text), "Data.message"),
            Ok(AssessRequest::Encryption(_))
        ));
        let wrong = json!({ "specversion": "1.0", "id": "1", "source": "/x", "type": "vmbackup.backup.requested",
                            "time": "2026-01-01T00:00:00Z", "datacontenttype": "application/json", "correlationid": "1", "data": {} });
        let err = AssessRequest::from_trigger(wrong, "Data.message").unwrap_err();
        assert!(
            err.to_string().contains("vmbackup.protection.requested"),
            "{err}"
        );
    }
}
