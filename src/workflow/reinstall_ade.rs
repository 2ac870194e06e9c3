//! `reinstall-ade` (`restore.vm-recreated`): on a recreated ADE VM install the ADE extension again
//! (Linux `AzureDiskEncryptionForLinux` 1.1, Windows `AzureDiskEncryption` 2.2) so its data disks
//! are opened and reported encrypted, delete the encryption-info blob (it holds wrapped key
//! material), drop the ticket's marker tag from the source VM → `restore.completed`. Non-ADE VMs go
//! straight to `restore.completed`.

use super::start_restore::{clear_mark, restore_failed};
use super::Deps;
use crate::azure::compute::VmExtensionParameters;
use crate::azure::AzureError;
use crate::domain::restore::{ade_extension, OsType};
use crate::events::{queues, CloudEvent, RestoreCompleted, RestoreVmRecreated};
use crate::runtime::{FunctionSpec, HandlerError, Invocation, OutputBinding, Outputs, Trigger};
use std::sync::Arc;

pub const NAME: &str = "reinstall-ade";
pub const OUTCOME: &str = "outcome";

pub fn spec() -> FunctionSpec {
    FunctionSpec::new(NAME, Trigger::service_bus(queues::RESTORE_VM_RECREATED))
        .output(OutputBinding::service_bus(OUTCOME, queues::OUTCOMES))
}

fn retry_or<T>(
    result: Result<T, AzureError>,
    doing: &str,
) -> Result<Result<T, AzureError>, HandlerError> {
    match result {
        Err(e) if e.is_transient() => Err(HandlerError::transient(format!("{doing}: {e}"))),
        other => Ok(other),
    }
}

pub async fn handle(
    deps: Arc<Deps>,
    invocation: Invocation<CloudEvent<RestoreVmRecreated>>,
) -> Result<Outputs, HandlerError> {
    let now = deps.clock.now();
    let event = invocation.data;
    let data = &event.data;
    let restore = &data.restore;
    let mut outputs = Outputs::new();
    let vm_id = data.restored_vm_id.to_string();
    let ade_reinstalled = match restore.encryption.ade_keys() {
        None => false,
        Some(keys) => {
            let os = if restore.os_type.eq_ignore_ascii_case("windows") {
                OsType::Windows
            } else {
                OsType::Linux
            };
            let extension = match ade_extension(os, keys) {
                Ok(extension) => extension,
                Err(rejection) => {
                    outputs.push(
                        OUTCOME,
                        &restore_failed(&event, restore, rejection.message, None, now),
                    )?;
                    return Ok(outputs);
                }
            };
            let vm = match retry_or(
                deps.compute.get_vm(&vm_id, false).await,
                "reading the restored VM",
            )? {
                Ok(vm) => vm,
                Err(e) => {
                    let message = format!("reading the restored VM: {e}");
                    outputs.push(
                        OUTCOME,
                        &restore_failed(&event, restore, message, Some(&e), now),
                    )?;
                    return Ok(outputs);
                }
            };
            let settings = serde_json::to_value(&extension.settings)
                .map_err(|e| HandlerError::transient(format!("ADE settings: {e}")))?;
            let parameters = VmExtensionParameters {
                location: vm.location,
                publisher: extension.publisher.to_string(),
                extension_type: extension.extension_type.to_string(),
                type_handler_version: extension.type_handler_version.to_string(),
                auto_upgrade_minor_version: true,
                settings,
                protected_settings: None,
            };
            // A PUT of the same extension is idempotent: a redelivery changes nothing.
            let put = deps
                .compute
                .put_extension(&vm_id, extension.extension_type, &parameters)
                .await;
            if let Err(e) = retry_or(put, "installing the ADE extension")? {
                let message = format!("installing {}: {e}", extension.extension_type);
                outputs.push(
                    OUTCOME,
                    &restore_failed(&event, restore, message, Some(&e), now),
                )?;
                return Ok(outputs);
            }
            tracing::info!(vm = %vm_id, extension = extension.extension_type, "ADE extension reinstalled");
            true
        }
    };
    if let Some(info_uri) = &data.encryption_info_blob_uri {
        // Wrapped key material must not outlive the restore (a missing blob counts as deleted).
        if let Err(e) = retry_or(
            deps.blob.delete(info_uri).await,
            "deleting the encryption info",
        )? {
            let message = format!("deleting the encryption-info blob: {e}");
            outputs.push(
                OUTCOME,
                &restore_failed(&event, restore, message, Some(&e), now),
            )?;
            return Ok(outputs);
        }
    }
    // The restored VM now marks the ticket as done; the source VM's tag has served its purpose.
    if let Err(e) = retry_or(
        clear_mark(&deps, &restore.vm_id, &restore.ticket_id).await,
        "removing the ticket tag",
    )? {
        tracing::warn!(error = %e, ticket = %restore.ticket_id, "could not remove the ticket tag");
    }
    tracing::info!(ticket = %restore.ticket_id, vm = %vm_id, ade_reinstalled, "restore completed");
    outputs.push(
        OUTCOME,
        &event.follow(
            RestoreCompleted {
                ticket_id: restore.ticket_id.clone(),
                vm_id: restore.vm_id.clone(),
                restored_vm_id: data.restored_vm_id.clone(),
                ade_reinstalled,
                callback_url: restore.callback_url.clone(),
            },
            "",
            now,
        ),
    )?;
    Ok(outputs)
}
