//! Microsoft.RecoveryServices: vaults, and Azure Backup for IaaS VMs — policies, protectable items and
//! container refresh, protected items (LRO), on-demand backup, jobs over simulated time, recovery points,
//! restore (served by `restore`), backupStatus — with Azure Backup's rules for encrypted VMs.
//!
//! Error codes marked "simulator's own" could not be confirmed from Azure's documentation or specs.

use super::fleet::{AgentState, OsType, PowerState};
use super::http::{iso_duration, rfc3339, Reply, Request};
use super::keyvault;
use super::state::{
    later, parse_resource_id, same, DiskSnapshot, Job, JobFailure, JobOperation, KeyAndSecret,
    Operation, OperationResult, ProtectedItem, RecoveryPoint, RecoveryVault, SimState,
    BACKUP_MANAGEMENT_SERVICE_APP_ID, BACKUP_MANAGEMENT_SERVICE_OBJECT_ID,
    KEY_VAULT_ADMINISTRATOR_ROLE,
};
use axum::http::{Method, StatusCode};
use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Value};

const V: &str = "subscriptions/{}/resourcegroups/{}/providers/microsoft.recoveryservices/vaults/{}";
/// On-demand backups per VM per UTC day (support matrix: one scheduled plus three on-demand).
pub const ON_DEMAND_BACKUPS_PER_DAY: usize = 3;
/// Seconds after which configure-protection and trigger operations report completion.
const SHORT_OPERATION_SECONDS: u64 = 30;

pub fn route(state: &mut SimState, req: &Request) -> Option<Reply> {
    if let Some(c) = req.route(
        Method::POST,
        "subscriptions/{}/providers/microsoft.recoveryservices/locations/{}/backupstatus",
    ) {
        return Some(backup_status(state, req, &c[0], &c[1]));
    }
    if let Some(c) = req.route(
        Method::GET,
        "subscriptions/{}/resourcegroups/{}/providers/microsoft.recoveryservices/vaults",
    ) {
        let list: Vec<Value> = state
            .recovery_vaults
            .iter()
            .filter(|v| same(&v.subscription, &c[0]) && same(&v.resource_group, &c[1]))
            .map(render_vault)
            .collect();
        return Some(Reply::ok(json!({ "value": list })));
    }
    if let Some(c) = req.route(Method::PUT, V) {
        return Some(put_vault(state, req, &c[0], &c[1], &c[2]));
    }
    // Every other route is below an existing vault.
    let prefix = super::http::match_segments(V, req.segments.get(..8)?)?;
    let vault = match state.recovery_vault(&prefix[0], &prefix[1], &prefix[2]) {
        Some(v) => v.clone(),
        None => {
            return Some(Reply::not_found(
                "Microsoft.RecoveryServices/vaults",
                &prefix[2],
            ))
        }
    };
    let rest: Vec<String> = req.segments[8..].to_vec();
    let r = |method: Method, pattern: &str| -> Option<Vec<String>> {
        if req.method != method {
            return None;
        }
        if pattern.is_empty() {
            return rest.is_empty().then(Vec::new);
        }
        super::http::match_segments(pattern, &rest)
    };
    if r(Method::GET, "").is_some() {
        return Some(Reply::ok(render_vault(&vault)));
    }
    if let Some(c) = r(Method::GET, "operationstatus/{}") {
        return Some(Reply::ok(json!({
            "id": format!("{}/operationStatus/{}", vault.id(), c[0]), "name": c[0], "status": "Succeeded",
            "startTime": rfc3339(vault.created), "endTime": rfc3339(vault.created)
        })));
    }
    if r(Method::GET, "backuppolicies").is_some() {
        let list: Vec<Value> = vault
            .policies
            .iter()
            .map(|p| render_policy(state, &vault, p))
            .collect();
        return Some(Reply::ok(json!({ "value": list })));
    }
    if let Some(c) = r(Method::GET, "backuppolicies/{}") {
        return Some(match vault.policies.iter().find(|p| same(p, &c[0])) {
            Some(p) => Reply::ok(render_policy(state, &vault, p)),
            None => Reply::arm_error(
                StatusCode::NOT_FOUND,
                "BMSUserErrorPolicyNotExist",
                &format!("Policy {} does not exist in vault {}.", c[0], vault.name),
            ),
        });
    }
    if let Some(c) = r(Method::PUT, "backuppolicies/{}") {
        let body = match req.json_body() {
            Ok(b) => b,
            Err(e) => return Some(e),
        };
        let Some(properties) = body.get("properties").filter(|p| p.is_object()) else {
            return Some(Reply::bad_request(
                "BMSUserErrorInvalidInput",
                "The policy's 'properties' are required.",
            ));
        };
        if !properties
            .get("backupManagementType")
            .and_then(Value::as_str)
            .is_some_and(|t| same(t, "AzureIaasVM"))
        {
            return Some(Reply::bad_request(
                "BMSUserErrorInvalidInput",
                "The simulator serves AzureIaasVM policies only (properties.backupManagementType).",
            ));
        }
        let mut properties = properties.clone();
        // Azure Backup stores a simple (daily) schedule with a weekly frequency of 0.
        if let Some(schedule) = properties
            .get_mut("schedulePolicy")
            .and_then(Value::as_object_mut)
        {
            let simple = schedule
                .get("schedulePolicyType")
                .and_then(Value::as_str)
                .is_some_and(|t| same(t, "SimpleSchedulePolicy"));
            if simple && !schedule.contains_key("scheduleWeeklyFrequency") {
                schedule.insert("scheduleWeeklyFrequency".into(), json!(0));
            }
        }
        state.policy_definitions.insert(
            format!("{}/backuppolicies/{}", vault.id(), c[0]).to_ascii_lowercase(),
            properties,
        );
        if let Some(v) = state
            .recovery_vaults
            .iter_mut()
            .find(|v| same(&v.id(), &vault.id()))
        {
            if !v.policies.iter().any(|p| same(p, &c[0])) {
                v.policies.push(c[0].clone());
            }
        }
        let vault = state
            .recovery_vaults
            .iter()
            .find(|v| same(&v.id(), &vault.id()))?
            .clone();
        return Some(Reply::ok(render_policy(state, &vault, &c[0])));
    }
    if let Some(c) = r(Method::GET, "backuppolicies/{}/operationresults/{}") {
        return Some(Reply::ok(render_policy(state, &vault, &c[0])));
    }
    if let Some(c) = r(Method::GET, "backuppolicies/{}/operations/{}") {
        return Some(Reply::ok(json!({
            "id": c[1], "name": c[1], "status": "Succeeded", "startTime": rfc3339(req.now), "endTime": rfc3339(req.now),
            "properties": { "objectType": "OperationStatusJobsExtendedInfo", "jobIds": [], "failedJobsError": {} }
        })));
    }
    if let Some(c) = r(Method::POST, "backupfabrics/{}/refreshcontainers") {
        let discovered: Vec<String> = state
            .vms
            .iter()
            .filter(|vm| {
                same(&vm.subscription, &vault.subscription) && same(&vm.location, &vault.location)
            })
            .map(|vm| vm.id())
            .collect();
        if let Some(v) = state
            .recovery_vaults
            .iter_mut()
            .find(|v| same(&v.id(), &vault.id()))
        {
            v.discovered_vms = discovered;
        }
        let op = new_operation(
            state,
            req.now,
            SHORT_OPERATION_SECONDS,
            None,
            None,
            OperationResult::NoContent,
        );
        let location = format!(
            "{}{}/backupFabrics/{}/operationResults/{op}?api-version={}",
            req.base_url,
            vault.id(),
            c[0],
            req.api_version()
        );
        return Some(
            Reply::empty(StatusCode::ACCEPTED)
                .with_header("location", location)
                .with_header("retry-after", "60"),
        );
    }
    if let Some(c) = r(Method::GET, "backupfabrics/{}/operationresults/{}") {
        return Some(match state.operations.get(&c[1]) {
            Some(op) if op.status(req.now) == "InProgress" => Reply::empty(StatusCode::ACCEPTED)
                .with_header(
                    "location",
                    format!(
                        "{}/{}?api-version={}",
                        req.base_url,
                        req.segments.join("/"),
                        req.api_version()
                    ),
                )
                .with_header("retry-after", "60"),
            Some(_) => Reply::empty(StatusCode::NO_CONTENT),
            None => Reply::not_found("operationResults", &c[1]),
        });
    }
    if r(Method::GET, "backupprotectableitems").is_some() {
        let list: Vec<Value> = vault
            .discovered_vms
            .iter()
            .filter(|id| state.protected_item_for_vm(id).is_none())
            .filter_map(|id| state.vm_by_id(id))
            .map(|vm| {
                let name = format!("VM;iaasvmcontainerv2;{};{}", vm.resource_group, vm.name);
                let container = format!("IaasVMContainer;iaasvmcontainerv2;{};{}", vm.resource_group, vm.name);
                json!({
                    "name": name,
                    "type": "Microsoft.RecoveryServices/vaults/backupFabrics/protectionContainers/protectableItems",
                    "id": format!("{}/backupFabrics/Azure/protectionContainers/{container}/protectableItems/{name}", vault.id()),
                    "properties": {
                        "backupManagementType": "AzureIaasVM", "friendlyName": vm.name,
                        "protectableItemType": "Microsoft.Compute/virtualMachines", "protectionState": "NotProtected",
                        "virtualMachineId": vm.id(), "workloadType": "VM"
                    }
                })
            })
            .collect();
        return Some(Reply::ok(json!({ "value": list })));
    }
    if r(Method::GET, "backupprotecteditems").is_some() {
        let list: Vec<Value> = state
            .protected_items
            .iter()
            .filter(|p| same(&p.vault_id, &vault.id()))
            .map(|p| render_item(state, p))
            .collect();
        return Some(Reply::ok(json!({ "value": list })));
    }
    if r(Method::GET, "backupjobs").is_some() {
        return Some(list_jobs(state, req, &vault));
    }
    if let Some(c) = r(Method::GET, "backupjobs/{}") {
        return Some(
            match state
                .jobs
                .iter()
                .find(|j| same(&j.id, &c[0]) && same(&j.vault_id, &vault.id()))
            {
                Some(job) => Reply::ok(render_job(job, req.now)),
                None => Reply::arm_error(
                    StatusCode::NOT_FOUND,
                    "BMSUserErrorJobNotFound",
                    &format!("Job {} was not found.", c[0]),
                ),
            },
        );
    }
    if let Some(c) = r(Method::GET, "backupoperationresults/{}") {
        return Some(operation_result(state, req, &c[0]));
    }
    if let Some(c) = r(Method::GET, "backupoperations/{}") {
        return Some(operation_status(state, req, &c[0]));
    }
    let item = "backupfabrics/{}/protectioncontainers/{}/protecteditems/{}";
    if let Some(c) = r(Method::PUT, item) {
        return Some(put_protected_item(state, req, &vault, &c[2]).unwrap_or_else(|e| e));
    }
    if let Some(c) = r(Method::GET, item) {
        return Some(match find_item(state, &vault, &c[2]) {
            Some(p) => Reply::ok(render_item(state, p)),
            None => item_not_found(&c[2]),
        });
    }
    if let Some(c) = r(Method::DELETE, item) {
        let Some(p) = find_item(state, &vault, &c[2]).cloned() else {
            return Some(item_not_found(&c[2]));
        };
        state.protected_items.retain(|i| !same(&i.vm_id, &p.vm_id));
        state
            .recovery_points
            .retain(|rp| !same(&rp.vm_id, &p.vm_id));
        let op = new_operation(
            state,
            req.now,
            SHORT_OPERATION_SECONDS,
            None,
            None,
            OperationResult::NoContent,
        );
        return Some(lro_202(
            req,
            &format!("{}/backupOperations/{op}", vault.id()),
            &format!("{}/backupOperationResults/{op}", vault.id()),
        ));
    }
    if let Some(c) = r(Method::GET, &format!("{item}/operationresults/{{}}")) {
        return Some(operation_result(state, req, &c[3]));
    }
    if let Some(c) = r(Method::GET, &format!("{item}/operationsstatus/{{}}")) {
        return Some(operation_status(state, req, &c[3]));
    }
    if let Some(c) = r(Method::POST, &format!("{item}/backup")) {
        return Some(trigger_backup(state, req, &vault, &c[2]).unwrap_or_else(|e| e));
    }
    if let Some(c) = r(Method::GET, &format!("{item}/recoverypoints")) {
        let Some(p) = find_item(state, &vault, &c[2]) else {
            return Some(item_not_found(&c[2]));
        };
        let list: Vec<Value> = state
            .recovery_points
            .iter()
            .filter(|rp| same(&rp.vm_id, &p.vm_id))
            .rev()
            .map(|rp| render_recovery_point(p, rp))
            .collect();
        return Some(Reply::ok(json!({ "value": list, "nextLink": null })));
    }
    if let Some(c) = r(Method::GET, &format!("{item}/recoverypoints/{{}}")) {
        let Some(p) = find_item(state, &vault, &c[2]) else {
            return Some(item_not_found(&c[2]));
        };
        return Some(
            match state
                .recovery_points
                .iter()
                .find(|rp| same(&rp.vm_id, &p.vm_id) && rp.id == c[3])
            {
                Some(rp) => Reply::ok(render_recovery_point(p, rp)),
                None => Reply::arm_error(
                    StatusCode::NOT_FOUND,
                    "BMSUserErrorRecoveryPointNotFound",
                    &format!("Recovery point {} was not found.", c[3]),
                ),
            },
        );
    }
    if let Some(c) = r(Method::POST, &format!("{item}/recoverypoints/{{}}/restore")) {
        return Some(
            super::restore::trigger_restore(state, req, &vault, &c[2], &c[3]).unwrap_or_else(|e| e),
        );
    }
    None
}

fn render_vault(vault: &RecoveryVault) -> Value {
    json!({
        "id": vault.id(), "name": vault.name, "type": "Microsoft.RecoveryServices/vaults", "location": vault.location,
        "tags": {}, "etag": format!("W/\"datetime'{}'\"", vault.created.timestamp()),
        "identity": { "type": "SystemAssigned", "principalId": uuid::Uuid::new_v4().to_string(), "tenantId": super::state::TENANT_ID },
        "sku": { "name": "RS0", "tier": "Standard" },
        "properties": {
            "provisioningState": "Succeeded", "privateEndpointStateForBackup": "None", "privateEndpointStateForSiteRecovery": "None",
            "publicNetworkAccess": "Enabled",
            "redundancySettings": { "crossRegionRestore": "Disabled", "standardTierStorageRedundancy": "GeoRedundant" },
            "securitySettings": { "softDeleteSettings": { "softDeleteState": "Enabled", "softDeleteRetentionPeriodInDays": 14, "enhancedSecurityState": "Enabled" },
                                   "immutabilitySettings": { "state": "Disabled" }, "multiUserAuthorization": "Disabled",
                                   "sourceScanConfiguration": { "state": "Disabled" } },
            "monitoringSettings": { "azureMonitorAlertSettings": { "alertsForAllJobFailures": "Enabled", "alertsForAllFailoverIssues": "Disabled", "alertsForAllReplicationIssues": "Enabled" },
                                    "classicAlertSettings": { "alertsForCriticalOperations": "Disabled", "emailNotificationsForSiteRecovery": "Enabled" } },
            "privateEndpointConnections": [],
            "secureScore": "Minimum", "bcdrSecurityLevel": "Fair"
        }
    })
}

fn put_vault(state: &mut SimState, req: &Request, sub: &str, rg: &str, name: &str) -> Reply {
    let body = match req.json_body() {
        Ok(b) => b,
        Err(e) => return e,
    };
    let existed = state.recovery_vault(sub, rg, name).is_some();
    if !existed {
        let Some(location) = body.get("location").and_then(Value::as_str) else {
            return Reply::bad_request("InvalidParameter", "The 'location' property is required.");
        };
        state.recovery_vaults.push(RecoveryVault {
            subscription: sub.into(),
            resource_group: rg.into(),
            name: name.into(),
            location: location.to_ascii_lowercase(),
            policies: vec!["DefaultPolicy".into()],
            discovered_vms: Vec::new(),
            created: req.now,
        });
    }
    let Some(vault) = state.recovery_vault(sub, rg, name) else {
        return Reply::not_found("Microsoft.RecoveryServices/vaults", name);
    };
    Reply::json(
        if existed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        render_vault(vault),
    )
}

fn render_policy(state: &SimState, vault: &RecoveryVault, name: &str) -> Value {
    let count = state
        .protected_items
        .iter()
        .filter(|p| same(&p.vault_id, &vault.id()) && same(&p.policy, name))
        .count();
    let id = format!("{}/backupPolicies/{name}", vault.id());
    if let Some(properties) = state.policy_definitions.get(&id.to_ascii_lowercase()) {
        let mut properties = properties.clone();
        properties["protectedItemsCount"] = json!(count);
        return json!({ "id": id, "name": name, "type": "Microsoft.RecoveryServices/vaults/backupPolicies", "properties": properties });
    }
    let at = "2026-01-01T02:00:00Z";
    json!({
        "id": format!("{}/backupPolicies/{name}", vault.id()), "name": name, "type": "Microsoft.RecoveryServices/vaults/backupPolicies",
        "properties": {
            "backupManagementType": "AzureIaasVM", "protectedItemsCount": count, "instantRpRetentionRangeInDays": 2,
            "schedulePolicy": { "schedulePolicyType": "SimpleSchedulePolicy", "scheduleRunFrequency": "Daily", "scheduleRunTimes": [at], "scheduleWeeklyFrequency": 0 },
            "retentionPolicy": { "retentionPolicyType": "LongTermRetentionPolicy",
                                 "dailySchedule": { "retentionTimes": [at], "retentionDuration": { "count": 30, "durationType": "Days" } } },
            "timeZone": "UTC", "policyType": "V1"
        }
    })
}

/// Resolve `VM;iaasvmcontainerv2;{rg};{vm}` (any casing, `iaasvmcontainer` too) to the VM's protected item.
pub(super) fn find_item<'a>(
    state: &'a SimState,
    vault: &RecoveryVault,
    item_name: &str,
) -> Option<&'a ProtectedItem> {
    let (rg, vm) = parse_item_name(item_name)?;
    state.protected_items.iter().find(|p| {
        same(&p.vault_id, &vault.id()) && same(&p.vm_resource_group, &rg) && same(&p.vm_name, &vm)
    })
}

fn parse_item_name(item_name: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = item_name.split(';').collect();
    (parts.len() == 4 && same(parts[0], "vm")).then(|| (parts[2].to_string(), parts[3].to_string()))
}

pub(super) fn item_not_found(name: &str) -> Reply {
    Reply::arm_error(
        StatusCode::NOT_FOUND,
        "BMSUserErrorItemNotFound",
        &format!("Item {name} was not found in the vault."),
    )
}

fn render_item(state: &SimState, p: &ProtectedItem) -> Value {
    let last_rp = state
        .recovery_points
        .iter()
        .filter(|rp| same(&rp.vm_id, &p.vm_id))
        .map(|rp| rp.time)
        .max();
    let rp_count = state
        .recovery_points
        .iter()
        .filter(|rp| same(&rp.vm_id, &p.vm_id))
        .count();
    let mut properties = json!({
        "friendlyName": p.vm_name, "virtualMachineId": p.vm_id, "sourceResourceId": p.vm_id,
        "protectionStatus": "Healthy", "protectionState": p.protection_state, "healthStatus": "Passed",
        "protectedItemDataId": p.protected_item_data_id.to_string(), "protectedItemType": "Microsoft.Compute/virtualMachines",
        "backupManagementType": "AzureIaasVM", "workloadType": "VM", "containerName": p.container_name(),
        "policyId": format!("{}/backupPolicies/{}", p.vault_id, p.policy), "policyName": p.policy, "policyType": "V1",
        "vaultId": p.vault_id,
        "extendedInfo": { "recoveryPointCount": rp_count, "policyInconsistent": false }
    });
    if let Some(status) = &p.last_backup_status {
        properties["lastBackupStatus"] = json!(status);
    }
    if let Some(time) = p.last_backup_time {
        properties["lastBackupTime"] = json!(rfc3339(time));
    }
    if let Some(time) = last_rp {
        properties["lastRecoveryPoint"] = json!(rfc3339(time));
    }
    json!({
        "id": p.id(), "name": p.item_name(),
        "type": "Microsoft.RecoveryServices/vaults/backupFabrics/protectionContainers/protectedItems",
        "properties": properties
    })
}

pub(super) fn new_operation(
    state: &mut SimState,
    now: DateTime<Utc>,
    seconds: u64,
    job_id: Option<String>,
    failure: Option<JobFailure>,
    result: OperationResult,
) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    state.operations.insert(
        id.clone(),
        Operation {
            id: id.clone(),
            start: now,
            end: later(now, seconds),
            job_id,
            failure,
            result,
        },
    );
    id
}

/// 202 with `Azure-AsyncOperation`, `Location` and `Retry-After: 60`, as every saved RSB 202 example shows.
pub(super) fn lro_202(req: &Request, status_path: &str, result_path: &str) -> Reply {
    let v = req.api_version();
    Reply::empty(StatusCode::ACCEPTED)
        .with_header(
            "azure-asyncoperation",
            format!("{}{status_path}?api-version={v}", req.base_url),
        )
        .with_header(
            "location",
            format!("{}{result_path}?api-version={v}", req.base_url),
        )
        .with_header("retry-after", "60")
}

fn operation_status(state: &SimState, req: &Request, id: &str) -> Reply {
    let Some(op) = state.operations.get(id) else {
        return Reply::not_found("operationsStatus", id);
    };
    let status = op.status(req.now);
    let mut body = json!({
        "id": op.id, "name": op.id, "status": status, "startTime": rfc3339(op.start),
        "endTime": if status == "InProgress" { "0001-01-01T00:00:00.00000Z".to_string() } else { rfc3339(op.end) }
    });
    if let Some(job) = &op.job_id {
        body["properties"] =
            json!({ "objectType": "OperationStatusJobExtendedInfo", "jobId": job });
    }
    if let (Some(failure), "Failed") = (&op.failure, status) {
        body["error"] = json!({ "code": failure.code, "message": failure.message });
    }
    Reply::ok(body)
}

fn operation_result(state: &SimState, req: &Request, id: &str) -> Reply {
    let Some(op) = state.operations.get(id) else {
        return Reply::not_found("operationResults", id);
    };
    if op.status(req.now) == "InProgress" {
        let here = format!(
            "{}/{}?api-version={}",
            req.base_url,
            req.segments.join("/"),
            req.api_version()
        );
        let status_url = here
            .replace("/operationResults/", "/operationsStatus/")
            .replace("/backupOperationResults/", "/backupOperations/");
        return Reply::empty(StatusCode::ACCEPTED)
            .with_header("location", here)
            .with_header("azure-asyncoperation", status_url)
            .with_header("retry-after", "60");
    }
    if let Some(failure) = &op.failure {
        return Reply::bad_request(&failure.code, &failure.message);
    }
    match &op.result {
        OperationResult::NoContent => Reply::empty(StatusCode::NO_CONTENT),
        OperationResult::ProtectedItem { vm_id, .. } => match state.protected_item_for_vm(vm_id) {
            Some(p) => Reply::ok(render_item(state, p)),
            None => Reply::empty(StatusCode::NO_CONTENT),
        },
        OperationResult::Policy { vault_id, name } => match state
            .recovery_vaults
            .iter()
            .find(|v| same(&v.id(), vault_id))
        {
            Some(vault) => Reply::ok(render_policy(state, vault, name)),
            None => Reply::empty(StatusCode::NO_CONTENT),
        },
    }
}

fn put_protected_item(
    state: &mut SimState,
    req: &Request,
    vault: &RecoveryVault,
    item_name: &str,
) -> Result<Reply, Reply> {
    let body = req.json_body()?;
    let props = body.get("properties").cloned().unwrap_or(Value::Null);
    let source = props
        .get("sourceResourceId")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let (rg, vm_name) = parse_item_name(item_name)
        .ok_or_else(|| Reply::bad_request("BMSUserErrorInvalidInput", &format!("Protected item name '{item_name}' is not of the form VM;iaasvmcontainerv2;<resourceGroup>;<vmName>.")))?;
    let vm = state.vm_by_id(&source).cloned().ok_or_else(|| {
        Reply::bad_request(
            "BCMV2VMNotFound",
            &format!("The virtual machine '{source}' doesn't exist or was deleted."),
        )
    })?;
    if !same(&vm.resource_group, &rg) || !same(&vm.name, &vm_name) {
        return Err(Reply::bad_request(
            "BMSUserErrorInvalidInput",
            "sourceResourceId does not match the protected item name.",
        ));
    }
    if !same(&vm.subscription, &vault.subscription) {
        // Simulator's own code: Azure Backup protects only VMs of the vault's subscription.
        return Err(Reply::bad_request(
            "UserErrorVmNotInVaultSubscription",
            "The virtual machine and the Recovery Services vault must be in the same subscription.",
        ));
    }
    if !same(&vm.location, &vault.location) {
        // Simulator's own code: the vault must be in the VM's region.
        return Err(Reply::bad_request("UserErrorVmNotInVaultRegion", &format!("The virtual machine is in {} but the vault is in {}; a VM can be protected only by a vault in its region.", vm.location, vault.location)));
    }
    if let Some(other) = state
        .protected_item_for_vm(&vm.id())
        .filter(|p| !same(&p.vault_id, &vault.id()))
    {
        // Simulator's own code.
        return Err(Reply::bad_request(
            "UserErrorVmAlreadyProtected",
            &format!(
                "The virtual machine is already protected by {}.",
                other.vault_id
            ),
        ));
    }
    let state_requested = props.get("protectionState").and_then(Value::as_str);
    let policy = match props.get("policyId").and_then(Value::as_str) {
        Some(id) => id.rsplit('/').next().unwrap_or_default().to_string(),
        None => String::new(),
    };
    let stopping = state_requested.is_some_and(|s| same(s, "ProtectionStopped"));
    if !stopping && !vault.policies.iter().any(|p| same(p, &policy)) {
        return Err(Reply::bad_request(
            "BMSUserErrorPolicyNotExist",
            &format!("Policy '{policy}' does not exist in vault {}.", vault.name),
        ));
    }
    let job_id = uuid::Uuid::new_v4().to_string();
    match state
        .protected_items
        .iter_mut()
        .find(|p| same(&p.vm_id, &vm.id()))
    {
        Some(existing) => {
            if stopping {
                existing.protection_state = "ProtectionStopped".into();
            } else {
                existing.policy = policy.clone();
                if existing.protection_state == "ProtectionStopped" {
                    existing.protection_state = "Protected".into();
                }
            }
        }
        None if stopping => return Err(item_not_found(item_name)),
        None => state.protected_items.push(ProtectedItem {
            vault_id: vault.id(),
            vm_id: vm.id(),
            vm_name: vm.name.clone(),
            vm_resource_group: vm.resource_group.clone(),
            policy: policy.clone(),
            protection_state: "IRPending".into(),
            last_backup_status: None,
            last_backup_time: None,
            protected_item_data_id: rand::random::<u32>() as u64,
        }),
    }
    state.jobs.push(Job {
        id: job_id.clone(),
        vault_id: vault.id(),
        operation: JobOperation::ConfigureBackup,
        vm_id: vm.id(),
        vm_name: vm.name.clone(),
        start: req.now,
        end: later(req.now, SHORT_OPERATION_SECONDS),
        failure: None,
        restore: None,
        expiry: None,
        user_triggered: true,
        property_bag: Default::default(),
        finalized: false,
    });
    let op = new_operation(
        state,
        req.now,
        SHORT_OPERATION_SECONDS,
        Some(job_id),
        None,
        OperationResult::ProtectedItem {
            vault_id: vault.id(),
            vm_id: vm.id(),
        },
    );
    let item_path = format!("/{}", req.segments.join("/"));
    Ok(lro_202(
        req,
        &format!("{item_path}/operationsStatus/{op}"),
        &format!("{item_path}/operationResults/{op}"),
    ))
}

/// Whether the Backup Management Service holds what Azure Backup needs on this vault at this moment.
pub fn backup_service_has_access(state: &SimState, key_vault_id: &str, with_kek: bool) -> bool {
    let Some(kv) = state.key_vault_by_id(key_vault_id) else {
        return false;
    };
    let is_backup_service = |id: &str| {
        same(id, BACKUP_MANAGEMENT_SERVICE_OBJECT_ID) || same(id, BACKUP_MANAGEMENT_SERVICE_APP_ID)
    };
    if kv.rbac {
        let vault_id = kv.id().to_ascii_lowercase();
        return state.role_assignments.iter().any(|ra| {
            is_backup_service(&ra.principal_id)
                && ra
                    .role_definition_id
                    .to_ascii_lowercase()
                    .ends_with(KEY_VAULT_ADMINISTRATOR_ROLE)
                && vault_id.starts_with(&ra.scope.to_ascii_lowercase())
        });
    }
    let has = |list: &[String], needed: &[&str]| {
        needed
            .iter()
            .all(|n| list.iter().any(|p| same(p, n) || same(p, "all")))
    };
    kv.access_policies.iter().any(|p| {
        let principal = is_backup_service(&p.object_id)
            || p.application_id.as_deref().is_some_and(is_backup_service);
        principal
            && if with_kek {
                has(&p.keys, &["get", "list", "backup"]) && has(&p.secrets, &["get", "list"])
            } else {
                has(&p.secrets, &["get", "list", "backup"])
            }
    })
}

/// What would make a backup of this VM fail now (Azure's codes; "simulator's own" where unconfirmed).
fn backup_failure(state: &SimState, vm_id: &str) -> Option<JobFailure> {
    let fail = |code: &str, message: &str| {
        Some(JobFailure {
            code: code.into(),
            message: message.into(),
        })
    };
    let Some(vm) = state.vm_by_id(vm_id) else {
        return fail(
            "BCMV2VMNotFound",
            "The virtual machine doesn't exist or was deleted.",
        );
    };
    if vm.power == PowerState::Running {
        match vm.agent {
            // Codes from Azure Backup's VM troubleshooting guide.
            AgentState::Missing => return fail(
                "UserErrorGuestAgentStatusUnavailable",
                "VM Agent unable to communicate with Azure Backup. The VM agent is not installed.",
            ),
            AgentState::NotReady => {
                return fail(
                    "GuestAgentSnapshotTaskStatusError",
                    "Could not communicate with the VM agent for snapshot status.",
                )
            }
            AgentState::Ready => {}
        }
    }
    let ade = state
        .disk(&vm.subscription, &vm.resource_group, &vm.os_disk)
        .and_then(|d| d.ade.clone())?;
    let with_kek = ade.key_url.is_some();
    if let Some(key_url) = &ade.key_url {
        match keyvault::key_by_url(state, key_url) {
            Some(key) if key.certificate_backed => {
                // Simulator's own code: Azure documents that certificate-backed KEKs are unsupported.
                return fail("UserErrorKekIsPartOfCertificate", "The key encryption key is part of a certificate; Azure Backup supports only standalone keys.");
            }
            Some(_) => {}
            // Simulator's own code.
            None => {
                return fail(
                    "UserErrorKeyVaultKeyNotFound",
                    "The key encryption key of the VM was not found in the key vault.",
                )
            }
        }
    }
    if keyvault::secret_by_url(state, &ade.secret_url).is_none() {
        // Simulator's own code.
        return fail(
            "UserErrorKeyVaultSecretNotFound",
            "The disk encryption secret of the VM was not found in the key vault.",
        );
    }
    if !backup_service_has_access(state, &ade.secret_vault_id, with_kek) {
        return fail("UserErrorKeyVaultPermissionsNotConfigured", "Azure Backup Service does not have sufficient permissions to Key Vault for Backup of Encrypted Virtual Machines.");
    }
    None
}

fn trigger_backup(
    state: &mut SimState,
    req: &Request,
    vault: &RecoveryVault,
    item_name: &str,
) -> Result<Reply, Reply> {
    let body = req.json_body()?;
    let item = find_item(state, vault, item_name)
        .cloned()
        .ok_or_else(|| item_not_found(item_name))?;
    if item.protection_state == "ProtectionStopped" {
        // Simulator's own code.
        return Err(Reply::bad_request(
            "UserErrorProtectionStopped",
            "Protection is stopped for this item; resume protection before backing up.",
        ));
    }
    if state.jobs.iter().any(|j| {
        same(&j.vm_id, &item.vm_id)
            && j.operation == JobOperation::Backup
            && j.status(req.now) == "InProgress"
    }) {
        // Simulator's own code.
        return Err(Reply::bad_request(
            "UserErrorBackupOperationInProgress",
            "Another backup of this item is in progress.",
        ));
    }
    let today = req.now.date_naive();
    let today_count = state
        .jobs
        .iter()
        .filter(|j| {
            same(&j.vm_id, &item.vm_id)
                && j.operation == JobOperation::Backup
                && j.user_triggered
                && j.start.date_naive() == today
        })
        .count();
    if today_count >= ON_DEMAND_BACKUPS_PER_DAY {
        // Simulator's own code; the limit is the support matrix's three on-demand backups per day.
        return Err(Reply::bad_request(
            "UserErrorMaxOnDemandBackupsPerDayReached",
            &format!(
                "At most {ON_DEMAND_BACKUPS_PER_DAY} on-demand backups per VM per day are allowed."
            ),
        ));
    }
    let expiry = match body
        .pointer("/properties/recoveryPointExpiryTimeInUTC")
        .and_then(Value::as_str)
    {
        Some(text) => Some(
            DateTime::parse_from_rfc3339(text)
                .map(|d| d.with_timezone(&Utc))
                .map_err(|_| {
                    Reply::bad_request(
                        "BMSUserErrorInvalidInput",
                        &format!(
                            "recoveryPointExpiryTimeInUTC '{text}' is not an ISO 8601 date-time."
                        ),
                    )
                })?,
        ),
        None => None,
    };
    let failure = backup_failure(state, &item.vm_id);
    let duration = state.simulation.backup_job_seconds;
    let run = if failure.is_some() {
        (duration / 10).max(60)
    } else {
        duration
    };
    let job = Job {
        id: uuid::Uuid::new_v4().to_string(),
        vault_id: vault.id(),
        operation: JobOperation::Backup,
        vm_id: item.vm_id.clone(),
        vm_name: item.vm_name.clone(),
        start: req.now,
        end: later(req.now, run),
        failure,
        restore: None,
        expiry,
        user_triggered: true,
        property_bag: Default::default(),
        finalized: false,
    };
    let item_path = format!("/{}", req.segments[..req.segments.len() - 1].join("/"));
    Ok(accept_job(state, req, job, &item_path))
}

/// Start `job` and answer its trigger as Azure Backup does: 202 with the item's operation-status
/// and operation-result URLs, the operation naming the job once it succeeded.
pub(super) fn accept_job(state: &mut SimState, req: &Request, job: Job, item_path: &str) -> Reply {
    let job_id = job.id.clone();
    state.jobs.push(job);
    let op = new_operation(
        state,
        req.now,
        10,
        Some(job_id),
        None,
        OperationResult::NoContent,
    );
    lro_202(
        req,
        &format!("{item_path}/operationsStatus/{op}"),
        &format!("{item_path}/operationResults/{op}"),
    )
}

fn render_recovery_point(item: &ProtectedItem, rp: &RecoveryPoint) -> Value {
    let mut properties = json!({
        "objectType": "IaasVMRecoveryPoint", "recoveryPointType": "CrashConsistent", "recoveryPointTime": rfc3339(rp.time),
        "recoveryPointAdditionalInfo": "", "sourceVMStorageType": "NormalStorage", "isSourceVMEncrypted": rp.is_encrypted(),
        "isInstantIlrSessionActive": false, "isManagedVirtualMachine": true, "virtualMachineSize": rp.size,
        "originalStorageAccountOption": false, "osType": match rp.os { OsType::Linux => "Linux", OsType::Windows => "Windows" },
        "recoveryPointTierDetails": [ { "type": "InstantRP", "status": "Valid" }, { "type": "HardenedRP", "status": "Valid" } ],
        "recoveryPointMoveReadinessInfo": { "ArchivedRP": { "isReadyForMove": false, "additionalInfo": "Recovery point is not eligible for move." } },
        "recoveryPointProperties": { "expiryTime": rfc3339(rp.expiry), "ruleName": "", "isSoftDeleted": false },
        "isPrivateAccessEnabledOnAnyDisk": false, "zones": [],
        "recoveryPointDiskConfiguration": { "numberOfDisksIncludedInBackup": rp.disks.len(), "numberOfDisksAttachedToVm": rp.disks.len() }
    });
    if let Some(ks) = &rp.key_and_secret {
        let mut details = json!({
            "bekDetails": { "secretUrl": ks.secret_url, "secretVaultId": ks.secret_vault_id, "secretData": ks.secret_data },
            "encryptionMechanism": "SinglePass"
        });
        if let (Some(url), Some(vault)) = (&ks.key_url, &ks.key_vault_id) {
            details["kekDetails"] =
                json!({ "keyUrl": url, "keyVaultId": vault, "keyBackupData": ks.key_backup_data });
        }
        properties["keyAndSecret"] = details;
    }
    json!({
        "id": format!("{}/recoveryPoints/{}", item.id(), rp.id), "name": rp.id,
        "type": "Microsoft.RecoveryServices/vaults/backupFabrics/protectionContainers/protectedItems/recoveryPoints",
        "properties": properties
    })
}

fn render_job(job: &Job, now: DateTime<Utc>) -> Value {
    let status = job.status(now);
    let done = status != "InProgress";
    let elapsed =
        ((if done { job.end } else { now }) - job.start).num_milliseconds() as f64 / 1000.0;
    let total = (job.end - job.start).num_milliseconds().max(1) as f64 / 1000.0;
    let progress = if done {
        100.0
    } else {
        (elapsed / total * 100.0).min(99.0)
    };
    let tasks = match job.operation {
        JobOperation::Backup => {
            let snapshot_done = done || progress >= 20.0;
            vec![
                json!({ "taskId": "Take Snapshot", "status": if snapshot_done { if job.failure.is_some() { "Failed" } else { "Completed" } } else { "InProgress" }, "duration": "PT0S" }),
                json!({ "taskId": "Transfer data to vault", "status": if job.failure.is_some() { "NotStarted" } else if done { "Completed" } else if snapshot_done { "InProgress" } else { "NotStarted" }, "duration": "PT0S" }),
            ]
        }
        JobOperation::Restore => vec![
            json!({ "taskId": "Transfer data from vault", "status": if done { "Completed" } else { "InProgress" }, "duration": iso_duration(elapsed) }),
        ],
        JobOperation::ConfigureBackup => Vec::new(),
    };
    let mut bag = serde_json::Map::new();
    bag.insert("VM Name".into(), json!(job.vm_name));
    if done {
        for (k, v) in &job.property_bag {
            bag.insert(k.clone(), json!(v));
        }
    }
    let mut properties = json!({
        "jobType": "AzureIaaSVMJob", "activityId": job.id, "backupManagementType": "AzureIaasVM",
        "duration": iso_duration(elapsed), "entityFriendlyName": job.vm_name, "operation": job.operation.as_str(),
        "status": status, "startTime": rfc3339(job.start), "virtualMachineVersion": "Compute",
        "containerName": parse_resource_id(&job.vm_id).map(|(_, rg, _, name)| format!("iaasvmcontainerv2;{rg};{name}")).unwrap_or_default(),
        "isUserTriggered": job.user_triggered, "actionsInfo": [],
        "extendedInfo": { "tasksList": tasks, "propertyBag": bag, "progressPercentage": progress }
    });
    if done {
        properties["endTime"] = json!(rfc3339(job.end));
    }
    if let (true, Some(failure)) = (done, &job.failure) {
        properties["errorDetails"] = json!([{ "errorCode": failure.code, "errorString": failure.message, "errorTitle": "", "recommendations": [] }]);
        properties["extendedInfo"]["dynamicErrorMessage"] = json!(failure.message);
    }
    json!({
        "id": format!("{}/backupJobs/{}", job.vault_id, job.id), "name": job.id,
        "type": "Microsoft.RecoveryServices/vaults/backupJobs", "properties": properties
    })
}

/// `$filter` of BackupJobs_List: `and`-joined `key eq 'value'` terms over operation, status,
/// backupManagementType, startTime and endTime (a time window), as the Backup SDKs send them.
fn list_jobs(state: &SimState, req: &Request, vault: &RecoveryVault) -> Reply {
    let mut jobs: Vec<&Job> = state
        .jobs
        .iter()
        .filter(|j| same(&j.vault_id, &vault.id()))
        .collect();
    if let Some(filter) = req.query.get("$filter") {
        for term in filter.split(" and ") {
            let parts: Vec<&str> = term.trim().splitn(3, ' ').collect();
            if parts.len() != 3 || !same(parts[1], "eq") {
                return Reply::bad_request(
                    "BMSUserErrorInvalidFilter",
                    &format!("Unsupported $filter term '{term}'."),
                );
            }
            let value = parts[2].trim_matches('\'');
            let key = parts[0];
            let time = || {
                parse_filter_time(value).ok_or_else(|| {
                    Reply::bad_request(
                        "BMSUserErrorInvalidFilter",
                        &format!("'{value}' is not a date-time."),
                    )
                })
            };
            if same(key, "operation") {
                jobs.retain(|j| same(j.operation.as_str(), value));
            } else if same(key, "status") {
                jobs.retain(|j| same(j.status(req.now), value));
            } else if same(key, "backupManagementType") {
                if !same(value, "AzureIaasVM") {
                    jobs.clear();
                }
            } else if same(key, "startTime") {
                let from = match time() {
                    Ok(t) => t,
                    Err(e) => return e,
                };
                jobs.retain(|j| j.start >= from);
            } else if same(key, "endTime") {
                let to = match time() {
                    Ok(t) => t,
                    Err(e) => return e,
                };
                jobs.retain(|j| j.start <= to);
            } else {
                return Reply::bad_request(
                    "BMSUserErrorInvalidFilter",
                    &format!("Unsupported $filter property '{key}'."),
                );
            }
        }
    }
    let list: Vec<Value> = jobs.iter().rev().map(|j| render_job(j, req.now)).collect();
    Reply::ok(json!({ "value": list }))
}

fn parse_filter_time(value: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %I:%M:%S %p", "%Y-%m-%d %H:%M:%S"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(value, format) {
            return Some(t.and_utc());
        }
    }
    None
}

fn backup_status(state: &SimState, req: &Request, sub: &str, location: &str) -> Reply {
    let body = match req.json_body() {
        Ok(b) => b,
        Err(e) => return e,
    };
    let resource_id = body
        .get("resourceId")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let item = state.protected_item_for_vm(resource_id).filter(|p| {
        state.recovery_vaults.iter().any(|v| {
            same(&v.id(), &p.vault_id) && same(&v.subscription, sub) && same(&v.location, location)
        })
    });
    Reply::ok(match item {
        Some(p) => json!({
            "containerName": format!("iaasvmcontainer;{}", p.container_name()), "errorCode": "Success", "errorMessage": "",
            "fabricName": "Azure", "policyName": p.policy, "protectedItemName": p.item_name().to_ascii_lowercase(),
            "protectionStatus": "Protected", "vaultId": p.vault_id
        }),
        None => {
            json!({ "protectionStatus": "NotProtected", "errorCode": "Success", "errorMessage": "",
                        "containerName": "", "fabricName": "", "policyName": "", "protectedItemName": "", "vaultId": "" })
        }
    })
}

/// Finish jobs whose end has passed: backups make recovery points, restores write disks and blobs.
pub fn finalize_jobs(state: &mut SimState, now: DateTime<Utc>) {
    let due: Vec<usize> = state
        .jobs
        .iter()
        .enumerate()
        .filter(|(_, j)| !j.finalized && j.end <= now)
        .map(|(i, _)| i)
        .collect();
    for index in due {
        state.jobs[index].finalized = true;
        let job = state.jobs[index].clone();
        match job.operation {
            JobOperation::ConfigureBackup => {}
            JobOperation::Backup => finish_backup(state, &job),
            JobOperation::Restore => {
                let (bag, failure) = super::restore::finish_restore(state, &job);
                state.jobs[index].property_bag = bag;
                if failure.is_some() {
                    state.jobs[index].failure = failure;
                }
            }
        }
    }
}

fn finish_backup(state: &mut SimState, job: &Job) {
    let succeeded = job.failure.is_none();
    if succeeded {
        if let Some(vm) = state.vm_by_id(&job.vm_id).cloned() {
            let disk_names: Vec<String> = std::iter::once(vm.os_disk.clone())
                .chain(vm.data_disks.iter().cloned())
                .collect();
            let disks: Vec<DiskSnapshot> = disk_names
                .iter()
                .enumerate()
                .filter_map(|(i, name)| {
                    state
                        .disk(&vm.subscription, &vm.resource_group, name)
                        .map(|d| DiskSnapshot {
                            name: d.name.clone(),
                            lun: (i > 0).then(|| i as u32 - 1),
                            size_gb: d.size_gb,
                            ade: d.ade.clone(),
                            disk_encryption_set_id: d.disk_encryption_set_id.clone(),
                        })
                })
                .collect();
            let key_and_secret = disks.first().and_then(|d| d.ade.clone()).and_then(|ade| {
                let secret = keyvault::secret_by_url(state, &ade.secret_url)?;
                let key = ade
                    .key_url
                    .as_deref()
                    .and_then(|u| keyvault::key_by_url(state, u));
                Some(KeyAndSecret {
                    secret_url: ade.secret_url.clone(),
                    secret_vault_id: ade.secret_vault_id.clone(),
                    secret_data: base64::engine::general_purpose::STANDARD
                        .encode(secret.value.as_bytes()),
                    secret_backup_data: keyvault::secret_backup_blob(&ade.secret_vault_id, &secret),
                    key_url: ade.key_url.clone(),
                    key_vault_id: ade.key_vault_id.clone(),
                    key_backup_data: key.map(|k| {
                        keyvault::key_backup_blob(
                            ade.key_vault_id.as_deref().unwrap_or_default(),
                            &k,
                        )
                    }),
                })
            });
            let id = state.next_recovery_point_id();
            state.recovery_points.push(RecoveryPoint {
                id,
                vault_id: job.vault_id.clone(),
                vm_id: job.vm_id.clone(),
                time: job.start,
                expiry: job.expiry.unwrap_or(job.start + Duration::days(30)),
                os: vm.os,
                vm_name: vm.name.clone(),
                size: vm.size.clone(),
                location: vm.location.clone(),
                disks,
                key_and_secret,
                encryption_at_host: vm.encryption_at_host,
            });
        }
    }
    if let Some(item) = state
        .protected_items
        .iter_mut()
        .find(|p| same(&p.vm_id, &job.vm_id))
    {
        item.last_backup_status = Some(if succeeded { "Completed" } else { "Failed" }.into());
        if succeeded {
            item.last_backup_time = Some(job.end);
            item.protection_state = "Protected".into();
        }
    }
}
