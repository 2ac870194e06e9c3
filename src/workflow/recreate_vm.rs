//! `recreate-vm` (`restore.disks-restored`): for ADE VMs, put back a KEK or BEK secret that no longer
//! exists in its key vault (Key Vault restore from the encryption-info blob's backup data), then
//! deploy the template the restore generated into the target resource group under the ticket's
//! deployment name → `restore.vm-recreated`.
//!
//! Keys first, VM second: a VM created before its BEK exists cannot unlock its disks (research A5).
//! The template is read with the app's Storage token and deployed inline, so no SAS is minted.

use super::start_restore::restore_failed;
use super::Deps;
use crate::azure::deployments::TemplateSource;
use crate::azure::keyvault::{BackupBlob, NewSecret};
use crate::azure::AzureError;
use crate::domain::encryption::EncryptionKind;
use crate::domain::resource_id::types;
use crate::domain::restore::split_object_url;
use crate::domain::ResourceId;
use crate::events::{queues, CloudEvent, RestoreContext, RestoreDisksRestored, RestoreVmRecreated};
use crate::runtime::{FunctionSpec, HandlerError, Invocation, OutputBinding, Outputs, Trigger};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const NAME: &str = "recreate-vm";
pub const RECREATED: &str = "recreated";
pub const OUTCOME: &str = "outcome";

pub fn spec() -> FunctionSpec {
    FunctionSpec::new(NAME, Trigger::service_bus(queues::RESTORE_DISKS_RESTORED))
        .output(OutputBinding::service_bus(
            RECREATED,
            queues::RESTORE_VM_RECREATED,
        ))
        .output(OutputBinding::service_bus(OUTCOME, queues::OUTCOMES))
}

/// The OS disk part of the encryption-info blob a RestoreDisks job writes for an encrypted VM.
/// Holds wrapped key material: `Debug` shows only the URLs.
#[derive(Clone, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct KeyAndSecretInfo {
    pub secret_url: Option<String>,
    pub secret_vault_id: Option<String>,
    /// Base64 BEK (wrapped by the KEK when there is one): the value of a recreated secret.
    pub secret_data: Option<String>,
    /// Key Vault backup blob of the secret.
    pub key_vault_secret_backup_data: Option<String>,
    pub key_url: Option<String>,
    pub key_vault_id: Option<String>,
    /// Key Vault backup blob of the KEK.
    pub key_backup_data: Option<String>,
}

impl std::fmt::Debug for KeyAndSecretInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndSecretInfo")
            .field("secret_url", &self.secret_url)
            .field("key_url", &self.key_url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct EncryptionInfo {
    pub os_disk_key_and_secret_details: Option<KeyAndSecretInfo>,
}

/// Restore the KEK when it is gone. `Conflict` (someone restored it meanwhile) counts as done.
async fn ensure_key(deps: &Deps, info: &KeyAndSecretInfo) -> Result<bool, StepError> {
    let Some(key_url) = &info.key_url else {
        return Ok(false);
    };
    let (vault_uri, name, version) = split_object_url(key_url, "keys").ok_or_else(|| {
        StepError::Refused(
            format!("KeyUrl {key_url:?} is not a Key Vault key URL"),
            None,
        )
    })?;
    match deps
        .key_vault
        .get_key(&vault_uri, &name, version.as_deref())
        .await
    {
        Ok(_) => return Ok(false),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(StepError::from_azure(e, "reading the KEK")),
    }
    let backup = info.key_backup_data.clone().ok_or_else(|| {
        StepError::Refused(
            format!("KEK {name} is gone and the encryption info holds no KeyBackupData"),
            None,
        )
    })?;
    match deps
        .key_vault
        .restore_key(&vault_uri, &BackupBlob(backup))
        .await
    {
        Ok(_) => {
            tracing::info!(key = %name, "KEK restored from the recovery point's backup");
            Ok(true)
        }
        Err(e) if e.status() == Some(409) => Ok(false),
        Err(e) => Err(StepError::from_azure(e, "restoring the KEK")),
    }
}

/// Restore the BEK secret when it is gone: from its Key Vault backup when the blob has one, else by
/// writing `SecretData` back as a "Wrapped BEK" / "BEK" secret with ADE's tags.
async fn ensure_secret(
    deps: &Deps,
    info: &KeyAndSecretInfo,
    vm_name: &str,
    os_type: &str,
) -> Result<bool, StepError> {
    let Some(secret_url) = &info.secret_url else {
        return Ok(false);
    };
    let (vault_uri, name, version) = split_object_url(secret_url, "secrets").ok_or_else(|| {
        StepError::Refused(
            format!("SecretUrl {secret_url:?} is not a Key Vault secret URL"),
            None,
        )
    })?;
    match deps
        .key_vault
        .get_secret_properties(&vault_uri, &name, version.as_deref())
        .await
    {
        Ok(_) => return Ok(false),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(StepError::from_azure(e, "reading the BEK secret")),
    }
    let restored = if let Some(backup) = &info.key_vault_secret_backup_data {
        deps.key_vault
            .restore_secret(&vault_uri, &BackupBlob(backup.clone()))
            .await
    } else if let Some(data) = &info.secret_data {
        // The KS flow: the wrapped BEK with the tags ADE reads. It gets a new version, so the
        // restored disks' secret URL no longer matches; only the backup path keeps it.
        let mut tags = BTreeMap::from([("MachineName".to_string(), vm_name.to_string())]);
        let file_name = if os_type == "windows" {
            format!("{name}.BEK")
        } else {
            "LinuxPassPhraseFileName".to_string()
        };
        tags.insert("DiskEncryptionKeyFileName".into(), file_name);
        let content_type = match &info.key_url {
            Some(key_url) => {
                tags.insert(
                    "DiskEncryptionKeyEncryptionAlgorithm".into(),
                    "RSA-OAEP".into(),
                );
                tags.insert("DiskEncryptionKeyEncryptionKeyURL".into(), key_url.clone());
                "Wrapped BEK"
            }
            None => "BEK",
        };
        let secret = NewSecret {
            value: data.clone(),
            content_type: Some(content_type.into()),
            tags,
        };
        deps.key_vault.set_secret(&vault_uri, &name, &secret).await
    } else {
        return Err(StepError::Refused(
            format!("BEK secret {name} is gone and the encryption info holds no backup of it"),
            None,
        ));
    };
    match restored {
        Ok(_) => {
            tracing::info!(secret = %name, "BEK secret restored from the recovery point's backup");
            Ok(true)
        }
        Err(e) if e.status() == Some(409) => Ok(false),
        Err(e) => Err(StepError::from_azure(e, "restoring the BEK secret")),
    }
}

/// Why a step stopped: worth a retry by the host, or refused for good (`restore.failed`).
pub(crate) enum StepError {
    Retry(String),
    Refused(String, Option<AzureError>),
}

impl StepError {
    pub(crate) fn from_azure(error: AzureError, doing: &str) -> StepError {
        if error.is_transient() {
            StepError::Retry(format!("{doing}: {error}"))
        } else {
            StepError::Refused(format!("{doing}: {error}"), Some(error))
        }
    }
}

fn restored_vm_id(restore: &RestoreContext) -> Result<ResourceId, StepError> {
    let target = &restore.target_resource_group_id;
    ResourceId::resource(
        target.subscription_id(),
        target.name(),
        types::VIRTUAL_MACHINE,
        &restore.restored_vm_name,
    )
    .map_err(|e| StepError::Refused(format!("restored VM name: {e}"), None))
}

/// Simulated/real time between two reads of a deployment an earlier delivery started.
const DEPLOYMENT_POLL: std::time::Duration = std::time::Duration::from_secs(15);
/// How long this delivery waits for such a deployment before it asks to be retried.
const DEPLOYMENT_WAIT: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// Whether an earlier delivery already deployed the VM under the ticket's deployment name. A
/// deployment still running was started by a delivery that may have died since (killed, lock lost):
/// this one follows it to its end, as the first would have (answering "retry" at once would spend
/// the message's deliveries in the seconds the deployment runs).
async fn deployed_before(deps: &Deps, restore: &RestoreContext) -> Result<bool, StepError> {
    let target = &restore.target_resource_group_id;
    let give_up =
        deps.clock.now() + chrono::Duration::from_std(DEPLOYMENT_WAIT).unwrap_or_default();
    loop {
        let found = match deps
            .deployments
            .get(
                target.subscription_id(),
                target.name(),
                &restore.deployment_name,
            )
            .await
        {
            Ok(found) => found,
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(StepError::from_azure(e, "reading the deployment")),
        };
        match found.properties.provisioning_state.as_deref() {
            Some("Succeeded") => return Ok(true),
            Some("Failed" | "Canceled") => return Ok(false),
            _ if deps.clock.now() >= give_up => {
                return Err(StepError::Retry(format!(
                    "deployment {} is still running",
                    restore.deployment_name
                )))
            }
            _ => deps.clock.sleep(DEPLOYMENT_POLL).await,
        }
    }
}

/// Deploy the generated template into the target resource group under the ticket's deployment name.
async fn deploy(deps: &Deps, event: &RestoreDisksRestored) -> Result<(), StepError> {
    let restore = &event.restore;
    let target = &restore.target_resource_group_id;
    let subscription = target.subscription_id();
    let resource_group = target.name();
    let template_uri = event.template_blob_uri.as_deref().ok_or_else(|| {
        StepError::Refused("the restore job reported no template blob".into(), None)
    })?;
    let template = deps
        .blob
        .read_json(template_uri)
        .await
        .map_err(|e| StepError::from_azure(e, "reading the restore template"))?;
    let mut parameters = json!({});
    if template.pointer("/parameters/VirtualMachineName").is_some() {
        parameters["VirtualMachineName"] = json!({ "value": restore.restored_vm_name });
    }
    deps.deployments
        .deploy(
            subscription,
            resource_group,
            &restore.deployment_name,
            &TemplateSource::Inline(template),
            parameters,
        )
        .await
        .map_err(|e| StepError::from_azure(e, "deploying the restore template"))?;
    Ok(())
}

pub async fn handle(
    deps: Arc<Deps>,
    invocation: Invocation<CloudEvent<RestoreDisksRestored>>,
) -> Result<Outputs, HandlerError> {
    let now = deps.clock.now();
    let event = invocation.data;
    let data = &event.data;
    let restore = &data.restore;
    let mut outputs = Outputs::new();
    let result = async {
        let restored_vm_id = restored_vm_id(restore)?;
        // Done by an earlier delivery. Its keys were put back before it deployed, and reinstall-ade
        // may have deleted the encryption-info blob since: nothing more to read or write.
        if deployed_before(&deps, restore).await? {
            return Ok(restored_vm_id);
        }
        if let (EncryptionKind::Ade(_), Some(info_uri)) = (
            &restore.encryption,
            data.encryption_info_blob_uri.as_deref(),
        ) {
            let raw: Value = deps
                .blob
                .read_json(info_uri)
                .await
                .map_err(|e| StepError::from_azure(e, "reading the encryption info"))?;
            let info: EncryptionInfo = serde_json::from_value(raw).map_err(|e| {
                StepError::Refused(format!("the encryption info is not readable: {e}"), None)
            })?;
            if let Some(details) = &info.os_disk_key_and_secret_details {
                // The KEK first: a wrapped BEK is useless without it.
                ensure_key(&deps, details).await?;
                ensure_secret(&deps, details, restore.vm_id.name(), &restore.os_type).await?;
            }
        }
        deploy(&deps, data).await?;
        Ok(restored_vm_id)
    }
    .await;
    match result {
        Ok(restored_vm_id) => {
            tracing::info!(ticket = %restore.ticket_id, vm = %restored_vm_id, "VM recreated from the restored disks");
            outputs.push(
                RECREATED,
                &event.follow(
                    RestoreVmRecreated {
                        restore: restore.clone(),
                        restored_vm_id,
                        encryption_info_blob_uri: data.encryption_info_blob_uri.clone(),
                    },
                    "",
                    now,
                ),
            )?;
        }
        Err(StepError::Retry(message)) => return Err(HandlerError::transient(message)),
        Err(StepError::Refused(message, error)) => {
            tracing::warn!(ticket = %restore.ticket_id, %message, "VM recreation failed");
            outputs.push(
                OUTCOME,
                &restore_failed(&event, restore, message, error.as_ref(), now),
            )?;
        }
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encryption_info_debug_hides_key_material() {
        let info: EncryptionInfo = serde_json::from_value(json!({
            "OsDiskKeyAndSecretDetails": { "SecretUrl": "https://kv/secrets/s/1", "SecretData": "BEKMATERIAL",
                                           "KeyBackupData": "KEKMATERIAL", "KeyVaultSecretBackupData": "SECRETBLOB" }
        }))
        .unwrap();
        let text = format!("{info:?}");
        assert!(text.contains("https://kv/secrets/s/1"));
        for material in ["BEKMATERIAL", "KEKMATERIAL", "SECRETBLOB"] {
            assert!(!text.contains(material));
        }
    }
}
