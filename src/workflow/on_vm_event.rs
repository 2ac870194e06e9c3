//! `on-vm-event` (queue `vm-events`, fed by an Event Grid system topic on each watched subscription):
//! `ResourceWriteSuccess` events in either schema.
//!
//! - a VM write, or a tag write on a VM, where the VM carries the `backup-policy` tag and is not
//!   protected with that policy → `protection.requested`;
//! - an ADE extension write (`Microsoft.Compute/virtualMachines/extensions/write` of an
//!   `AzureDiskEncryption*` extension) → `encryption.enabled`;
//! - anything else → logged and completed.

use super::assess_vm::{find_protection, VaultDirectory};
use super::Deps;
use crate::domain::eligibility::{tag_value, BACKUP_POLICY_TAG};
use crate::domain::encryption::{is_ade_extension, ADE_EXTENSION_TYPE_WINDOWS};
use crate::domain::resource_id::types;
use crate::domain::ResourceId;
use crate::events::eventgrid::ResourceEvent;
use crate::events::{queues, CloudEvent, EncryptionEnabled, ProtectionCause, ProtectionRequested};
use crate::runtime::{FunctionSpec, HandlerError, Invocation, OutputBinding, Outputs, Trigger};
use serde_json::Value;
use std::sync::Arc;

pub const NAME: &str = "on-vm-event";
const REQUESTS_OUT: &str = "protectionRequests";

const VM_WRITE: &str = "Microsoft.Compute/virtualMachines/write";
const TAGS_WRITE: &str = "Microsoft.Resources/tags/write";
const EXTENSION_WRITE: &str = "Microsoft.Compute/virtualMachines/extensions/write";
const TAGS_SUFFIX: &str = "/providers/Microsoft.Resources/tags/default";
const EXTENSIONS_SEGMENT: &str = "/extensions/";

pub fn spec() -> FunctionSpec {
    FunctionSpec::new(NAME, Trigger::service_bus(queues::VM_EVENTS)).output(
        OutputBinding::service_bus(REQUESTS_OUT, queues::PROTECTION_REQUESTS),
    )
}

/// What a resource event means to the workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEventKind {
    /// The VM (or its tags) was written.
    VmWritten(ResourceId),
    /// An extension of the VM was written; `name` is the extension's name.
    ExtensionWritten { vm_id: ResourceId, name: String },
    /// Anything else, with why it is ignored.
    Other(String),
}

/// `s` without `suffix`, compared case-insensitively (ARM ids and operation names are).
fn strip_suffix_ignore_case<'a>(s: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = s.len().checked_sub(suffix.len())?;
    (s.is_char_boundary(cut) && s[cut..].eq_ignore_ascii_case(suffix)).then(|| &s[..cut])
}

fn vm_id(text: &str) -> Option<ResourceId> {
    ResourceId::parse(text)
        .ok()
        .filter(|id| id.is_type(types::VIRTUAL_MACHINE))
}

/// Classify an event by its type, operation and resource URI (no Azure call).
pub fn classify_event(event: &ResourceEvent) -> VmEventKind {
    if !event.is_write_success() {
        return VmEventKind::Other(format!("event type {}", event.event_type));
    }
    let operation = event.data.operation_name.as_str();
    let uri = event.resource_uri();
    if operation.eq_ignore_ascii_case(VM_WRITE) {
        return match vm_id(uri) {
            Some(id) => VmEventKind::VmWritten(id),
            None => VmEventKind::Other(format!("{uri} is not a VM")),
        };
    }
    if operation.eq_ignore_ascii_case(TAGS_WRITE) {
        return match strip_suffix_ignore_case(uri, TAGS_SUFFIX).and_then(vm_id) {
            Some(id) => VmEventKind::VmWritten(id),
            None => VmEventKind::Other(format!("tags of {uri}, not of a VM")),
        };
    }
    if operation.eq_ignore_ascii_case(EXTENSION_WRITE) {
        let lower = uri.to_ascii_lowercase();
        if let Some(at) = lower.rfind(EXTENSIONS_SEGMENT) {
            let name = &uri[at + EXTENSIONS_SEGMENT.len()..];
            if let Some(id) = vm_id(&uri[..at]).filter(|_| !name.is_empty() && !name.contains('/'))
            {
                return VmEventKind::ExtensionWritten {
                    vm_id: id,
                    name: name.to_string(),
                };
            }
        }
        return VmEventKind::Other(format!("{uri} is not a VM extension"));
    }
    VmEventKind::Other(format!("operation {operation}"))
}

pub async fn handle(
    deps: Arc<Deps>,
    vaults: Arc<VaultDirectory>,
    invocation: Invocation<Value>,
) -> Result<Outputs, HandlerError> {
    let event = match ResourceEvent::from_json(invocation.data) {
        Ok(event) => event,
        Err(e) => {
            tracing::warn!(error = %e, "not an Event Grid resource event; completed");
            return Ok(Outputs::new());
        }
    };
    match classify_event(&event) {
        VmEventKind::VmWritten(vm_id) => vm_written(&deps, &vaults, &event, vm_id).await,
        VmEventKind::ExtensionWritten { vm_id, name } => {
            extension_written(&deps, &event, vm_id, &name).await
        }
        VmEventKind::Other(what) => {
            tracing::info!(event = %event.id, "ignored: {what}");
            Ok(Outputs::new())
        }
    }
}

async fn vm_written(
    deps: &Deps,
    directory: &VaultDirectory,
    event: &ResourceEvent,
    vm_id: ResourceId,
) -> Result<Outputs, HandlerError> {
    let vm = match deps.compute.get_vm(&vm_id.to_string(), false).await {
        Ok(vm) => vm,
        Err(e) if e.is_not_found() => {
            tracing::info!(vm = %vm_id, "VM no longer exists; completed");
            return Ok(Outputs::new());
        }
        Err(e) if e.is_transient() => {
            return Err(HandlerError::transient(format!("read the VM: {e}")))
        }
        Err(e) => {
            // Nothing was asked of anyone yet: there is no workflow run to reject.
            tracing::warn!(vm = %vm_id, error = %e, "cannot read the VM; event completed");
            return Ok(Outputs::new());
        }
    };
    let Some(policy) = tag_value(&vm.tags, BACKUP_POLICY_TAG)
        .map(str::trim)
        .filter(|p| !p.is_empty())
    else {
        tracing::info!(vm = %vm_id, "VM has no {BACKUP_POLICY_TAG} tag; completed");
        return Ok(Outputs::new());
    };
    let vaults = directory
        .vaults(deps, vm_id.subscription_id(), None)
        .await
        .map_err(|e| HandlerError::transient(format!("list the vaults: {e}")))?;
    let protection = find_protection(deps, &vm_id, vaults.local_to(&vm_id, &vm.location))
        .await
        .map_err(|e| HandlerError::transient(format!("read the protected item: {e}")))?;
    if protection
        .as_ref()
        .is_some_and(|p| p.is_active_with(policy))
    {
        tracing::info!(vm = %vm_id, %policy, "already protected with the tagged policy; completed");
        return Ok(Outputs::new());
    }
    let now = deps.clock.now();
    let request = CloudEvent::start_with_id(
        ProtectionRequested {
            vm_id: vm_id.clone(),
            policy: Some(policy.to_string()),
            cause: ProtectionCause::VmWritten,
            agent_checks: 0,
        },
        Some(vm_id.to_string()),
        now,
        // Derived from Event Grid's id: a redelivered event requests with the same id.
        format!("eventgrid-{}", event.id),
    );
    tracing::info!(vm = %vm_id, %policy, "protection requested");
    let mut outputs = Outputs::new();
    outputs.push(REQUESTS_OUT, &request)?;
    Ok(outputs)
}

async fn extension_written(
    deps: &Deps,
    event: &ResourceEvent,
    vm_id: ResourceId,
    name: &str,
) -> Result<Outputs, HandlerError> {
    // ADE's extensions are named after their type by every Microsoft tool; any other name is
    // looked up, so a renamed ADE extension is still recognised.
    let is_ade = if name
        .to_ascii_lowercase()
        .starts_with(&ADE_EXTENSION_TYPE_WINDOWS.to_ascii_lowercase())
    {
        true
    } else {
        match deps.compute.get_extension(&vm_id.to_string(), name).await {
            Ok(extension) => is_ade_extension(
                extension.properties.publisher.as_deref().unwrap_or(""),
                extension.properties.extension_type.as_deref().unwrap_or(""),
            ),
            Err(e) if e.is_transient() => {
                return Err(HandlerError::transient(format!("read the extension: {e}")))
            }
            Err(e) => {
                tracing::info!(vm = %vm_id, extension = name, error = %e, "cannot read the extension; completed");
                false
            }
        }
    };
    if !is_ade {
        tracing::info!(vm = %vm_id, extension = name, "not an ADE extension; completed");
        return Ok(Outputs::new());
    }
    let enabled = CloudEvent::start_with_id(
        EncryptionEnabled {
            vm_id: vm_id.clone(),
        },
        Some(vm_id.to_string()),
        deps.clock.now(),
        format!("eventgrid-{}", event.id),
    );
    tracing::info!(vm = %vm_id, extension = name, "ADE enabled");
    let mut outputs = Outputs::new();
    outputs.push(REQUESTS_OUT, &enabled)?;
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const VM: &str =
        "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/vm-web-01";

    fn event(uri: &str, operation: &str) -> ResourceEvent {
        ResourceEvent::from_json(json!({
            "id": "e1", "eventType": "Microsoft.Resources.ResourceWriteSuccess", "subject": uri,
            "eventTime": "2026-11-28T10:00:00Z",
            "data": { "resourceUri": uri, "operationName": operation, "status": "Succeeded" }
        }))
        .unwrap()
    }

    #[test]
    fn vm_tag_and_extension_writes_are_told_apart() {
        assert!(matches!(
            classify_event(&event(VM, VM_WRITE)),
            VmEventKind::VmWritten(_)
        ));
        assert!(matches!(
            classify_event(&event(
                &format!("{VM}/providers/Microsoft.Resources/tags/default"),
                TAGS_WRITE
            )),
            VmEventKind::VmWritten(_)
        ));
        assert_eq!(
            classify_event(&event(
                &format!("{VM}/extensions/AzureDiskEncryptionForLinux"),
                EXTENSION_WRITE
            )),
            VmEventKind::ExtensionWritten {
                vm_id: ResourceId::parse(VM).unwrap(),
                name: "AzureDiskEncryptionForLinux".into()
            }
        );
        let disk = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/disks/d";
        assert!(matches!(
            classify_event(&event(disk, "Microsoft.Compute/disks/write")),
            VmEventKind::Other(_)
        ));
        assert!(matches!(
            classify_event(&event(disk, VM_WRITE)),
            VmEventKind::Other(_)
        ));
    }

    #[test]
    fn cloud_events_schema_and_failures() {
        let cloud = ResourceEvent::from_json(json!({
            "id": "e2", "type": "Microsoft.Resources.ResourceWriteSuccess", "subject": VM,
            "time": "2026-11-28T10:00:00Z", "specversion": "1.0",
            "data": { "resourceUri": VM, "operationName": "microsoft.compute/virtualmachines/write" }
        }))
        .unwrap();
        assert!(matches!(classify_event(&cloud), VmEventKind::VmWritten(_)));
        let failed = ResourceEvent::from_json(json!({
            "id": "e3", "eventType": "Microsoft.Resources.ResourceWriteFailure", "subject": VM,
            "data": { "resourceUri": VM, "operationName": VM_WRITE }
        }))
        .unwrap();
        assert!(matches!(classify_event(&failed), VmEventKind::Other(_)));
    }
}
