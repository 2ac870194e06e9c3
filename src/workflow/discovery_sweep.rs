//! `discovery-sweep` (timer `%VMBACKUP_DISCOVERY_SCHEDULE%`): finds tagged VMs that missed their
//! event. Resource Graph, one request per page of up to 1,000 rows, across the configured
//! subscriptions: the tagged VMs, minus those whose protected item (`RecoveryServicesResources`)
//! already uses the tagged policy → one `protection.requested` each, all in one batched output.

use super::Deps;
use crate::domain::eligibility::{tag_value, BACKUP_POLICY_TAG};
use crate::domain::ResourceId;
use crate::events::{queues, CloudEvent, ProtectionCause, ProtectionRequested};
use crate::runtime::{
    FunctionSpec, HandlerError, Invocation, OutputBinding, Outputs, TimerInfo, Trigger,
};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use uuid::Uuid;

pub const NAME: &str = "discovery-sweep";
const REQUESTS_OUT: &str = "protectionRequests";

/// Namespace of the sweep's event ids (UUID v5 over tick and VM).
const SWEEP_NAMESPACE: Uuid = Uuid::from_u128(0x2b6e_91d4_7c3a_4f18_a5e0_94c2_d1f7_3a86);

/// VMs carrying the tag (the tag's value is read from `tags` and compared case-insensitively).
pub const TAGGED_VMS_QUERY: &str = "Resources | where type =~ 'microsoft.compute/virtualmachines' and isnotempty(tags['backup-policy']) | project id, tags";
/// Every protected IaaS VM item (`properties.sourceResourceId`, `policyName`, `protectionState`).
pub const PROTECTED_ITEMS_QUERY: &str = "RecoveryServicesResources | where type =~ 'microsoft.recoveryservices/vaults/backupfabrics/protectioncontainers/protecteditems' and properties.backupManagementType =~ 'AzureIaasVM' | project id, properties";

pub fn spec() -> FunctionSpec {
    FunctionSpec::new(
        NAME,
        Trigger::timer(&format!("%{}%", super::settings::DISCOVERY_SCHEDULE)),
    )
    .output(OutputBinding::service_bus(
        REQUESTS_OUT,
        queues::PROTECTION_REQUESTS,
    ))
}

/// A tagged VM and the policy its tag names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedVm {
    pub id: ResourceId,
    pub policy: String,
}

fn tagged_vm(row: &Value) -> Option<TaggedVm> {
    let id = ResourceId::parse(row.get("id")?.as_str()?).ok()?;
    let tags: BTreeMap<String, String> = row
        .get("tags")?
        .as_object()?
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect();
    let policy = tag_value(&tags, BACKUP_POLICY_TAG)?.trim();
    (!policy.is_empty()).then(|| TaggedVm {
        id,
        policy: policy.to_string(),
    })
}

/// VM id (lowercase) → the policy of its active protected item. Stopped items are left out: the
/// VM needs protecting again.
fn active_protection(rows: &[Value]) -> HashMap<String, String> {
    rows.iter()
        .filter_map(|row| {
            let properties = row.get("properties")?;
            let text = |key: &str| properties.get(key).and_then(Value::as_str);
            if text("protectionState").is_some_and(|s| s.eq_ignore_ascii_case("ProtectionStopped"))
            {
                return None;
            }
            let policy = text("policyName")
                .or_else(|| text("policyId").and_then(|id| id.rsplit('/').next()))?;
            Some((
                text("sourceResourceId")?.to_ascii_lowercase(),
                policy.to_string(),
            ))
        })
        .collect()
}

/// Tagged VMs not protected with their tagged policy, in the order Resource Graph gave them.
pub fn unprotected(tagged_rows: &[Value], protected_rows: &[Value]) -> Vec<TaggedVm> {
    let protected = active_protection(protected_rows);
    tagged_rows
        .iter()
        .filter_map(tagged_vm)
        .filter(|vm| {
            protected
                .get(&vm.id.canonical())
                .is_none_or(|policy| !policy.eq_ignore_ascii_case(&vm.policy))
        })
        .collect()
}

pub async fn handle(
    deps: Arc<Deps>,
    _invocation: Invocation<TimerInfo>,
) -> Result<Outputs, HandlerError> {
    let subscriptions = &deps.settings.subscriptions;
    let mut outputs = Outputs::new();
    if subscriptions.is_empty() {
        tracing::warn!(
            "no subscriptions configured ({}); nothing to sweep",
            super::settings::SUBSCRIPTIONS
        );
        return Ok(outputs);
    }
    let graph_failed = |e| HandlerError::transient(format!("Resource Graph query failed: {e}"));
    let tagged = deps
        .graph
        .query(TAGGED_VMS_QUERY, subscriptions)
        .await
        .map_err(graph_failed)?;
    let protected = deps
        .graph
        .query(PROTECTED_ITEMS_QUERY, subscriptions)
        .await
        .map_err(graph_failed)?;
    let now = deps.clock.now();
    let tick = now.to_rfc3339();
    let found = unprotected(&tagged, &protected);
    for vm in &found {
        let id = Uuid::new_v5(
            &SWEEP_NAMESPACE,
            format!("{tick}|{}", vm.id.canonical()).as_bytes(),
        );
        outputs.push(
            REQUESTS_OUT,
            &CloudEvent::start_with_id(
                ProtectionRequested {
                    vm_id: vm.id.clone(),
                    policy: Some(vm.policy.clone()),
                    cause: ProtectionCause::Sweep,
                    agent_checks: 0,
                },
                Some(vm.id.to_string()),
                now,
                id.to_string(),
            ),
        )?;
    }
    tracing::info!(
        tagged = tagged.len(),
        protected = protected.len(),
        requested = found.len(),
        "discovery sweep done"
    );
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const VM: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/";

    #[test]
    fn protected_with_the_tagged_policy_are_left_out() {
        let tagged = vec![
            json!({ "id": format!("{VM}a"), "tags": { "backup-policy": "DefaultPolicy" } }),
            json!({ "id": format!("{VM}b"), "tags": { "Backup-Policy": "Daily14" } }),
            json!({ "id": format!("{VM}c"), "tags": { "backup-policy": "DefaultPolicy" } }),
            json!({ "id": format!("{VM}d"), "tags": { "backup-policy": "DefaultPolicy" } }),
            json!({ "id": format!("{VM}e"), "tags": { "backup-policy": " " } }),
        ];
        let protected = vec![
            json!({ "properties": { "sourceResourceId": format!("{VM}A").to_uppercase(), "policyName": "defaultpolicy", "protectionState": "Protected" } }),
            json!({ "properties": { "sourceResourceId": format!("{VM}b"), "policyName": "DefaultPolicy", "protectionState": "Protected" } }),
            json!({ "properties": { "sourceResourceId": format!("{VM}c"), "policyName": "DefaultPolicy", "protectionState": "ProtectionStopped" } }),
        ];
        let names: Vec<String> = unprotected(&tagged, &protected)
            .iter()
            .map(|vm| format!("{}:{}", vm.id.name(), vm.policy))
            .collect();
        // a: protected as tagged; b: other policy → update; c: stopped; d: never; e: empty tag.
        assert_eq!(names, ["b:Daily14", "c:DefaultPolicy", "d:DefaultPolicy"]);
    }
}
