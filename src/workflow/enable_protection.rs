//! `enable-protection` (queue `protection-ready`): PUT the VM's protected item in the chosen vault
//! with the chosen policy, follow the long-running operation, emit `protection.enabled`.
//!
//! Idempotent by reading first: a VM already protected there with that policy gets no write; one
//! protected with another policy (or whose protection was stopped) gets the PUT that updates it.

use super::assess_vm::refused_or_retry;
use super::Deps;
use crate::azure::backup::ProtectedItemRef;
use crate::azure::AzureError;
use crate::domain::protection_names::protected_item_id;
use crate::domain::{ReasonCode, Rejection, ResourceId};
use crate::events::{queues, CloudEvent, ProtectionEnabled, ProtectionReady, ProtectionRejected};
use crate::runtime::{FunctionSpec, HandlerError, Invocation, OutputBinding, Outputs, Trigger};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

pub const NAME: &str = "enable-protection";
const OUTCOMES_OUT: &str = "outcomes";

/// Azure Backup's state of an item whose protection was stopped (its recovery points kept).
const PROTECTION_STOPPED: &str = "ProtectionStopped";

pub fn spec() -> FunctionSpec {
    FunctionSpec::new(NAME, Trigger::service_bus(queues::PROTECTION_READY))
        .output(OutputBinding::service_bus(OUTCOMES_OUT, queues::OUTCOMES))
}

/// Serialises work on one key within this process (a VM's protected item, a key vault's access), so
/// duplicate deliveries running at the same time read each other's result instead of both writing.
/// Other instances are not covered: there the writes are idempotent PUTs.
#[derive(Debug, Default)]
pub struct KeyedLocks {
    locks: std::sync::Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    pub async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let key = key.to_ascii_lowercase();
        let mutex = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Forget keys nobody holds any more (bounded by the invocations in flight).
            locks.retain(|_, held| held.strong_count() > 0);
            match locks.get(&key).and_then(Weak::upgrade) {
                Some(mutex) => mutex,
                None => {
                    let mutex = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(key, Arc::downgrade(&mutex));
                    mutex
                }
            }
        };
        mutex.lock_owned().await
    }
}

/// A VM's protected item as found in a vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingProtection {
    pub vault_id: ResourceId,
    /// The policy's name (the last segment of `policyId`).
    pub policy: String,
    /// Protection was stopped: the item exists but takes no backups.
    pub stopped: bool,
}

impl ExistingProtection {
    /// Protected (not stopped) with `policy`; policy names compare as ARM names do.
    pub fn is_active_with(&self, policy: &str) -> bool {
        !self.stopped && self.policy.eq_ignore_ascii_case(policy)
    }
}

/// The VM's protected item in `vault`, if there is one.
pub async fn protected_item(
    deps: &Deps,
    vault: &ResourceId,
    vm_id: &ResourceId,
) -> Result<Option<ExistingProtection>, AzureError> {
    let item = ProtectedItemRef::for_vm(&vault.to_string(), &vm_id.to_string())?;
    match deps.backup.get_protected_item(&item).await {
        Ok(found) => Ok(Some(ExistingProtection {
            vault_id: vault.clone(),
            policy: found
                .properties
                .policy_id
                .as_deref()
                .and_then(|id| id.rsplit('/').next())
                .unwrap_or_default()
                .to_string(),
            stopped: found
                .properties
                .protection_state
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case(PROTECTION_STOPPED)),
        })),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

pub async fn handle(
    deps: Arc<Deps>,
    locks: Arc<KeyedLocks>,
    invocation: Invocation<CloudEvent<ProtectionReady>>,
) -> Result<Outputs, HandlerError> {
    let event = &invocation.data;
    let ready = &event.data;
    let _vm_lock = locks.lock(&ready.vm_id.canonical()).await;
    let now = deps.clock.now();
    let mut outputs = Outputs::new();
    let reject = |outputs: &mut Outputs, rejection: Rejection| {
        tracing::warn!(vm = %ready.vm_id, reason = %rejection.code, message = %rejection.message, "protection not enabled");
        outputs.push(
            OUTCOMES_OUT,
            &event.follow(
                ProtectionRejected {
                    vm_id: ready.vm_id.clone(),
                    reason: rejection.code,
                    message: rejection.message,
                    encryption: Some(ready.encryption.clone()),
                },
                "",
                now,
            ),
        )
    };
    let item_id = match protected_item_id(&ready.vault_id, &ready.vm_id) {
        Ok(id) => id,
        Err(e) => {
            reject(
                &mut outputs,
                Rejection::invalid_field("data.vaultId / data.vmId", e),
            )?;
            return Ok(outputs);
        }
    };
    let existing = match protected_item(&deps, &ready.vault_id, &ready.vm_id).await {
        Ok(existing) => existing,
        Err(e) => {
            reject(
                &mut outputs,
                refused_or_retry("read the protected item", e)?,
            )?;
            return Ok(outputs);
        }
    };
    if existing
        .as_ref()
        .is_some_and(|p| p.is_active_with(&ready.policy))
    {
        tracing::info!(vm = %ready.vm_id, vault = %ready.vault_id, policy = %ready.policy, "already protected with this policy; no write");
    } else {
        if let Err(e) = put_protected_item(&deps, ready).await {
            let rejection = if e.has_code("BMSUserErrorPolicyNotExist") {
                Rejection::new(
                    ReasonCode::UnknownPolicy,
                    format!(
                        "vault {} has no policy {}: {e}",
                        ready.vault_id.name(),
                        ready.policy
                    ),
                )
            } else {
                refused_or_retry("enable protection", e)?
            };
            reject(&mut outputs, rejection)?;
            return Ok(outputs);
        }
        tracing::info!(vm = %ready.vm_id, vault = %ready.vault_id, policy = %ready.policy,
            updated = existing.is_some(), "protection enabled");
    }
    outputs.push(
        OUTCOMES_OUT,
        &event.follow(
            ProtectionEnabled {
                vm_id: ready.vm_id.clone(),
                vault_id: ready.vault_id.clone(),
                policy: ready.policy.clone(),
                protected_item_id: item_id,
                encryption: ready.encryption.clone(),
            },
            "",
            now,
        ),
    )?;
    Ok(outputs)
}

/// PUT the protected item and wait for the configure operation. A VM the vault has not discovered
/// yet (a container that does not exist) is discovered with `refreshContainers`, then PUT once more.
async fn put_protected_item(deps: &Deps, ready: &ProtectionReady) -> Result<(), AzureError> {
    let vault = ready.vault_id.to_string();
    let vm = ready.vm_id.to_string();
    let item = ProtectedItemRef::for_vm(&vault, &vm)?;
    let policy_id = format!("{vault}/backupPolicies/{}", ready.policy);
    match deps.backup.enable_protection(&item, &vm, &policy_id).await {
        Err(e) if e.is_not_found() => {
            tracing::info!(vm = %vm, "container not discovered yet; refreshing the vault's containers");
            deps.backup.refresh_containers(&vault).await?;
            deps.backup
                .enable_protection(&item, &vm, &policy_id)
                .await?;
            Ok(())
        }
        other => other.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_key_is_held_by_one_invocation_at_a_time_and_forgotten_after() {
        let locks = Arc::new(KeyedLocks::default());
        let first = locks.lock("VM-1").await;
        let waiting = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _second = locks.lock("vm-1").await;
            })
        };
        // Another key is free meanwhile.
        drop(locks.lock("vm-2").await);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the same key (any case) waits");
        drop(first);
        waiting.await.unwrap();
        drop(locks.lock("vm-3").await);
        assert_eq!(
            locks.locks.lock().unwrap().len(),
            1,
            "released keys are forgotten"
        );
    }
}
