//! `grant-key-vault-access` (queue `key-vault-access`): give Azure Backup (the Backup Management
//! Service, BMS) read access to an ADE VM's key vaults, then let the workflow go on.
//!
//! Access-policy vaults get the BMS entry merged with what it already holds (`accessPolicies/add`,
//! never removing or narrowing anyone's permissions); RBAC vaults get the configured role assigned.
//! Both are read first and written only when something is missing, so a redelivered event writes
//! nothing. A refusal becomes `protection.rejected` (or `backup.failed` on the backup remedy path)
//! with `KeyVaultAccessNotGranted`.

use super::assess_vm::refused_or_retry;
use super::enable_protection::KeyedLocks;
use super::settings::{self, KeyVaultRole};
use super::Deps;
use crate::azure::keyvault::{self, AccessPolicyOperation, Permissions};
use crate::azure::AzureError;
use crate::domain::eligibility::KeyVaultAccessNeed;
use crate::domain::key_vault_access::{
    plan_access_policy, plan_rbac, AccessPolicyEntry, AccessPolicyPlan, ExistingRoleAssignment,
    RbacPlan, RbacRoleConfig,
};
use crate::domain::{ReasonCode, Rejection, ResourceId};
use crate::events::{
    queues, AfterAccess, BackupFailed, BackupRequested, BackupRequester, CloudEvent,
    KeyVaultAccessGranted, KeyVaultAccessNeeded, ProtectionReady, ProtectionRejected,
};
use crate::runtime::{FunctionSpec, HandlerError, Invocation, OutputBinding, Outputs, Trigger};
use std::sync::Arc;

pub const NAME: &str = "grant-key-vault-access";
const READY_OUT: &str = "protectionReady";
const OUTCOMES_OUT: &str = "outcomes";
const BACKUP_OUT: &str = "backupRequests";

pub fn spec() -> FunctionSpec {
    FunctionSpec::new(NAME, Trigger::service_bus(queues::KEY_VAULT_ACCESS))
        .output(OutputBinding::service_bus(
            READY_OUT,
            queues::PROTECTION_READY,
        ))
        .output(OutputBinding::service_bus(OUTCOMES_OUT, queues::OUTCOMES))
        .output(OutputBinding::service_bus(
            BACKUP_OUT,
            queues::BACKUP_REQUESTS,
        ))
}

pub async fn handle(
    deps: Arc<Deps>,
    locks: Arc<KeyedLocks>,
    invocation: Invocation<CloudEvent<KeyVaultAccessNeeded>>,
) -> Result<Outputs, HandlerError> {
    let event = &invocation.data;
    let request = &event.data;
    let now = deps.clock.now();
    let mut outputs = Outputs::new();
    let mut granted = Vec::new();
    for need in &request.needs {
        let _vault_lock = locks.lock(&need.key_vault.canonical()).await;
        match grant(&deps, need).await? {
            Ok(()) => granted.push(need.key_vault.clone()),
            Err(rejection) => {
                tracing::warn!(vm = %request.vm_id, key_vault = %need.key_vault, message = %rejection.message, "Key Vault access not granted");
                push_refusal(&mut outputs, event, rejection, now)?;
                return Ok(outputs);
            }
        }
    }
    let vm_id = request.vm_id.clone();
    match &request.then {
        AfterAccess::Protect {
            vault_id,
            policy,
            encryption,
        } => outputs.push(
            READY_OUT,
            &event.follow(
                ProtectionReady {
                    vm_id,
                    vault_id: vault_id.clone(),
                    policy: policy.clone(),
                    encryption: encryption.clone(),
                },
                "",
                now,
            ),
        )?,
        AfterAccess::AlreadyProtected => outputs.push(
            OUTCOMES_OUT,
            &event.follow(
                KeyVaultAccessGranted {
                    vm_id,
                    key_vault_ids: granted,
                },
                "",
                now,
            ),
        )?,
        AfterAccess::RetryBackup { retain_until } => outputs.push(
            BACKUP_OUT,
            &event.follow(
                BackupRequested {
                    vm_id,
                    retain_until: *retain_until,
                    requested_by: BackupRequester::Remedy,
                    remedy_applied: true,
                },
                "",
                now,
            ),
        )?,
    }
    Ok(outputs)
}

/// The end of the path when access cannot be granted: a protection run is rejected; a backup
/// remedy fails its backup.
fn push_refusal(
    outputs: &mut Outputs,
    event: &CloudEvent<KeyVaultAccessNeeded>,
    rejection: Rejection,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), HandlerError> {
    let vm_id = event.data.vm_id.clone();
    match &event.data.then {
        AfterAccess::RetryBackup { .. } => outputs.push(
            OUTCOMES_OUT,
            &event.follow(
                BackupFailed {
                    vm_id,
                    job_id: None,
                    reason: rejection.code,
                    message: rejection.message,
                    azure_code: None,
                },
                "",
                now,
            ),
        )?,
        AfterAccess::Protect { encryption, .. } => outputs.push(
            OUTCOMES_OUT,
            &event.follow(
                ProtectionRejected {
                    vm_id,
                    reason: rejection.code,
                    message: rejection.message,
                    encryption: Some(encryption.clone()),
                },
                "",
                now,
            ),
        )?,
        AfterAccess::AlreadyProtected => outputs.push(
            OUTCOMES_OUT,
            &event.follow(
                ProtectionRejected {
                    vm_id,
                    reason: rejection.code,
                    message: rejection.message,
                    encryption: None,
                },
                "",
                now,
            ),
        )?,
    }
    Ok(())
}

fn not_granted(message: impl Into<String>) -> Rejection {
    Rejection::new(ReasonCode::KeyVaultAccessNotGranted, message)
}

/// Grant one need; `Ok(Err(_))` when it cannot be granted, `Err` when it is worth a retry.
async fn grant(
    deps: &Deps,
    need: &KeyVaultAccessNeed,
) -> Result<Result<(), Rejection>, HandlerError> {
    let Some(bms) = deps.settings.backup_management_service_object_id.as_deref() else {
        return Ok(Err(not_granted(format!(
            "app setting {} is not set (the object id of the Backup Management Service in this tenant)",
            settings::BACKUP_MANAGEMENT_SERVICE_OBJECT_ID
        ))));
    };
    let vault_id = need.key_vault.to_string();
    let vault = match deps.key_vault.get_vault(&vault_id).await {
        Ok(vault) => vault,
        Err(e) => return Ok(Err(refusal("read the key vault", &need.key_vault, e)?)),
    };
    if vault.uses_rbac() {
        grant_role(deps, need, bms).await
    } else {
        let tenant = vault.properties.tenant_id.clone().unwrap_or_default();
        let existing: Vec<AccessPolicyEntry> = vault
            .properties
            .access_policies
            .iter()
            .map(to_domain_entry)
            .collect();
        match plan_access_policy(&existing, &tenant, bms, need) {
            AccessPolicyPlan::AlreadySufficient => {
                tracing::info!(key_vault = %need.key_vault, "Backup Management Service already has access");
                Ok(Ok(()))
            }
            AccessPolicyPlan::Write(entry) => {
                let result = deps
                    .key_vault
                    .update_access_policies(
                        &vault_id,
                        AccessPolicyOperation::Add,
                        &[to_azure_entry(&entry)],
                    )
                    .await;
                match result {
                    Ok(_) => {
                        tracing::info!(key_vault = %need.key_vault, secrets = need.secrets, keys = need.keys, "access policy added for the Backup Management Service");
                        Ok(Ok(()))
                    }
                    Err(e) => Ok(Err(refusal("add the access policy", &need.key_vault, e)?)),
                }
            }
        }
    }
}

async fn grant_role(
    deps: &Deps,
    need: &KeyVaultAccessNeed,
    bms: &str,
) -> Result<Result<(), Rejection>, HandlerError> {
    let config = match &deps.settings.key_vault_role {
        KeyVaultRole::Administrator => RbacRoleConfig::KeyVaultAdministrator,
        KeyVaultRole::Custom(Some(role)) => RbacRoleConfig::CustomRole(role.clone()),
        KeyVaultRole::Custom(None) => {
            return Ok(Err(not_granted(format!(
                "key vault {} uses RBAC and app setting {} is not set (the custom role with Azure Backup's Key Vault data actions; or set {}=administrator)",
                need.key_vault.name(),
                settings::KEY_VAULT_BACKUP_ROLE_ID,
                settings::KEY_VAULT_ROLE
            ))))
        }
    };
    let scope = need.key_vault.to_string();
    let assignments = match deps.key_vault.list_role_assignments(&scope, bms).await {
        Ok(list) => list,
        Err(e) => return Ok(Err(refusal("list role assignments", &need.key_vault, e)?)),
    };
    let existing: Vec<ExistingRoleAssignment> = assignments
        .into_iter()
        .filter_map(|a| {
            let p = a.properties;
            Some(ExistingRoleAssignment {
                principal_id: p.principal_id?,
                role_definition_id: p.role_definition_id?,
                scope: p.scope?,
            })
        })
        .collect();
    let plan = match plan_rbac(&need.key_vault, bms, &config, &existing) {
        Ok(plan) => plan,
        Err(e) => {
            return Ok(Err(not_granted(format!(
                "app setting {}: {e}",
                settings::KEY_VAULT_BACKUP_ROLE_ID
            ))))
        }
    };
    let RbacPlan::Assign(assignment) = plan else {
        tracing::info!(key_vault = %need.key_vault, "Backup Management Service already holds a sufficient role");
        return Ok(Ok(()));
    };
    match deps
        .key_vault
        .assign_role(
            &scope,
            &assignment.name.to_string(),
            &assignment.principal_id,
            assignment.principal_type,
            &assignment.role_definition_id,
        )
        .await
    {
        Ok(_) => {
            tracing::info!(key_vault = %need.key_vault, role = %assignment.role_definition_id, "role assigned to the Backup Management Service");
            Ok(Ok(()))
        }
        Err(e) => Ok(Err(refusal("assign the role", &need.key_vault, e)?)),
    }
}

/// A refused key vault call: transient ones are retried by the host; the rest mean no access.
fn refusal(step: &str, key_vault: &ResourceId, e: AzureError) -> Result<Rejection, HandlerError> {
    let rejection = refused_or_retry(&format!("{step} on {}", key_vault.name()), e)?;
    Ok(not_granted(rejection.message))
}

fn to_domain_entry(entry: &keyvault::AccessPolicyEntry) -> AccessPolicyEntry {
    AccessPolicyEntry {
        tenant_id: entry.tenant_id.clone(),
        object_id: entry.object_id.clone(),
        application_id: entry.application_id.clone(),
        keys: entry.permissions.keys.clone(),
        secrets: entry.permissions.secrets.clone(),
        certificates: entry.permissions.certificates.clone(),
        storage: Vec::new(),
    }
}

/// The entry to `add`; `add` merges into the principal's existing entry, so storage permissions
/// (which the client does not model) are left as they are.
fn to_azure_entry(entry: &AccessPolicyEntry) -> keyvault::AccessPolicyEntry {
    keyvault::AccessPolicyEntry {
        tenant_id: entry.tenant_id.clone(),
        object_id: entry.object_id.clone(),
        application_id: entry.application_id.clone(),
        permissions: Permissions {
            keys: entry.keys.clone(),
            secrets: entry.secrets.clone(),
            certificates: entry.certificates.clone(),
        },
    }
}
