//! Azure Backup's restore of an IaaS VM (`POST …/recoveryPoints/{id}/restore`) and what a restore
//! job leaves behind when it completes:
//! - `RestoreDisks`: managed disks in the target resource group, and in the staging account the
//!   generated template, the config blob and (for ADE) the encryption-info blob, named in the job's
//!   property bag. The only kind Azure allows for ADE VMs.
//! - `OriginalLocation` ("replace existing"): the source VM keeps its id, size, tags and extensions;
//!   its disks are swapped for disks restored from the point, the old ones stay, detached.
//! - `AlternateLocation` ("create new VM"): a new VM in the target resource group with the point's
//!   size, OS and disks (their disk encryption set, encryption at host), its NIC in the given subnet.
//!
//! Error codes marked "simulator's own" could not be confirmed from Azure's documentation or specs.

use super::backup::{accept_job, find_item, item_not_found};
use super::blob::blob_key;
use super::fleet::{AgentState, OsType, PowerState};
use super::http::{rfc3339, Reply, Request};
use super::network;
use super::state::{
    later, parse_resource_id, resource_id, same, Blob, Disk, Job, JobFailure, JobOperation,
    RecoveryPoint, RecoveryVault, RestoreKind, RestorePlan, SimState, Vm,
};
use axum::http::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Azure VM names: 1-64 characters of letters, digits, `-`, `_` and `.`, not ending in `-` or `.`.
fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.ends_with(['-', '.'])
}

/// 400 naming a property of the request. The code is the one the simulator uses for every invalid
/// restore parameter (simulator's own: Azure's codes per property are not documented).
fn invalid(property: &str, why: &str) -> Reply {
    Reply::bad_request(
        "BMSUserErrorInvalidInput",
        &format!("properties.{property} {why}"),
    )
}

/// `(subscription, resource group)` of `/subscriptions/{sub}/resourceGroups/{rg}`.
fn parse_resource_group_id(id: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = id.trim_matches('/').split('/').collect();
    (parts.len() == 4 && same(parts[0], "subscriptions") && same(parts[2], "resourceGroups"))
        .then(|| (parts[1].to_string(), parts[3].to_string()))
}

/// A restore job whose outcome is not yet written creates this VM: the name is taken.
fn vm_being_restored(state: &SimState, sub: &str, rg: &str, name: &str) -> bool {
    state.jobs.iter().any(|j| {
        !j.finalized
            && j.restore.as_ref().is_some_and(|plan| {
                matches!(&plan.kind, RestoreKind::NewVm { name: n, .. } if same(n, name))
                    && same(&plan.target_resource_group, rg)
                    && same(&plan.target_subscription, sub)
            })
    })
}

pub(super) fn trigger_restore(
    state: &mut SimState,
    req: &Request,
    vault: &RecoveryVault,
    item_name: &str,
    rp_id: &str,
) -> Result<Reply, Reply> {
    let body = req.json_body()?;
    let item = find_item(state, vault, item_name)
        .cloned()
        .ok_or_else(|| item_not_found(item_name))?;
    let rp = state
        .recovery_points
        .iter()
        .find(|rp| same(&rp.vm_id, &item.vm_id) && rp.id == rp_id)
        .cloned()
        .ok_or_else(|| {
            Reply::arm_error(
                StatusCode::NOT_FOUND,
                "BMSUserErrorRecoveryPointNotFound",
                &format!("Recovery point {rp_id} was not found."),
            )
        })?;
    let props = body.get("properties").cloned().unwrap_or(Value::Null);
    let text = |key: &str| {
        props
            .get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(String::from)
    };
    let required = |key: &str, recovery_type: &str| {
        text(key).ok_or_else(|| invalid(key, &format!("is required for {recovery_type}.")))
    };
    if !text("objectType").is_some_and(|t| t.starts_with("IaasVMRestore")) {
        return Err(invalid("objectType", "must be IaasVMRestoreRequest."));
    }
    let recovery_type = text("recoveryType").unwrap_or_default();
    let recovery_type = ["RestoreDisks", "AlternateLocation", "OriginalLocation"]
        .into_iter()
        .find(|t| same(t, &recovery_type))
        .ok_or_else(|| {
            invalid(
                "recoveryType",
                &format!("'{recovery_type}' is not one of RestoreDisks, OriginalLocation, AlternateLocation."),
            )
        })?;
    if rp.is_encrypted() && recovery_type != "RestoreDisks" {
        // Simulator's own code: for ADE VMs Azure Backup offers only "Restore disks".
        return Err(Reply::bad_request("UserErrorRestoreTypeNotSupportedForEncryptedVm", &format!("Restore type '{recovery_type}' is not supported for VMs encrypted with Azure Disk Encryption; use RestoreDisks.")));
    }
    // Restores that produce a VM name their source and region; RestoreDisks may omit them.
    let restores_vm = recovery_type != "RestoreDisks";
    let vm_restore_field = |key: &str| match restores_vm {
        true => required(key, recovery_type).map(Some),
        false => Ok(text(key)),
    };
    let source = vm_restore_field("sourceResourceId")?;
    if let Some(source) = source.filter(|s| !same(s, &item.vm_id)) {
        return Err(invalid(
            "sourceResourceId",
            &format!("'{source}' is not the VM of protected item {item_name}."),
        ));
    }
    let region = vm_restore_field("region")?;
    if let Some(region) = region.filter(|r| !same(r, &vault.location)) {
        // Restores land in the vault's region; cross-region restore is not served.
        return Err(invalid(
            "region",
            &format!("'{region}' is not the vault's region '{}'.", vault.location),
        ));
    }
    let storage_id = required("storageAccountId", recovery_type)?;
    let account = state
        .storage_account_by_id(&storage_id)
        .cloned()
        .ok_or_else(|| {
            Reply::bad_request(
                "UserErrorStorageAccountNotFound",
                &format!("Storage account '{storage_id}' was not found."),
            )
        })?;
    if !same(&account.location, &vault.location) {
        // Simulator's own code: the staging account must be in the vault's region.
        return Err(Reply::bad_request(
            "UserErrorStorageAccountNotInVaultRegion",
            "The staging storage account must be in the vault's region.",
        ));
    }
    let target_group = match recovery_type {
        "AlternateLocation" => Some(required("targetResourceGroupId", recovery_type)?),
        _ => text("targetResourceGroupId"),
    };
    let (target_sub, target_rg) = match &target_group {
        Some(id) => parse_resource_group_id(id).ok_or_else(|| {
            invalid(
                "targetResourceGroupId",
                &format!("'{id}' is not a resource group id."),
            )
        })?,
        None => (account.subscription.clone(), account.resource_group.clone()),
    };
    if !same(&target_sub, &vault.subscription) {
        // Simulator's own code: restores of encrypted VMs (and this simulator's restores) stay in the vault's subscription.
        return Err(Reply::bad_request(
            "UserErrorCrossSubscriptionRestore",
            "The target resource group must be in the vault's subscription.",
        ));
    }
    let (kind, target_rg) = match recovery_type {
        "OriginalLocation" => {
            let Some(vm) = state.vm_by_id(&item.vm_id) else {
                // Simulator's own code: replacing disks needs the VM they belong to.
                return Err(Reply::bad_request(
                    "UserErrorOriginalVmNotFound",
                    &format!("The original VM '{}' no longer exists; restore to an alternate location or restore disks.", item.vm_id),
                ));
            };
            (RestoreKind::OriginalVm, vm.resource_group.clone())
        }
        "AlternateLocation" => {
            let kind = alternate_location(state, vault, &target_sub, &target_rg, &text)?;
            (kind, target_rg)
        }
        _ => (RestoreKind::Disks, target_rg),
    };
    let job = Job {
        id: uuid::Uuid::new_v4().to_string(),
        vault_id: vault.id(),
        operation: JobOperation::Restore,
        vm_id: item.vm_id.clone(),
        vm_name: item.vm_name.clone(),
        start: req.now,
        end: later(req.now, state.simulation.restore_job_seconds),
        failure: None,
        restore: Some(RestorePlan {
            recovery_point_id: rp.id.clone(),
            storage_account_id: account.id(),
            target_resource_group: target_rg,
            target_subscription: target_sub,
            kind,
        }),
        expiry: None,
        user_triggered: true,
        property_bag: Default::default(),
        finalized: false,
    };
    let item_path = format!("/{}", req.segments[..req.segments.len() - 3].join("/"));
    Ok(accept_job(state, req, job, &item_path))
}

/// The checks of an `AlternateLocation` request: the new VM's id and name, the network.
fn alternate_location(
    state: &SimState,
    vault: &RecoveryVault,
    target_sub: &str,
    target_rg: &str,
    text: &dyn Fn(&str) -> Option<String>,
) -> Result<RestoreKind, Reply> {
    let required =
        |key: &str| text(key).ok_or_else(|| invalid(key, "is required for AlternateLocation."));
    let target_vm = required("targetVirtualMachineId")?;
    let name = match parse_resource_id(&target_vm) {
        Some((sub, rg, kind, name))
            if same(&kind, "Microsoft.Compute/virtualMachines")
                && same(&sub, target_sub)
                && same(&rg, target_rg) =>
        {
            name
        }
        _ => {
            return Err(invalid(
                "targetVirtualMachineId",
                &format!("'{target_vm}' is not a virtual machine id in the target resource group."),
            ))
        }
    };
    if !valid_vm_name(&name) {
        return Err(invalid(
            "targetVirtualMachineId",
            &format!("'{name}' is not a valid VM name (1-64 letters, digits, '-', '_', '.')."),
        ));
    }
    if state.vm(target_sub, target_rg, &name).is_some()
        || vm_being_restored(state, target_sub, target_rg, &name)
    {
        // Simulator's own code: the portal refuses an existing name; the REST answer is not documented.
        return Err(Reply::bad_request(
            "UserErrorVmNameAlreadyExists",
            &format!(
                "A virtual machine named '{name}' already exists in resource group '{target_rg}'."
            ),
        ));
    }
    let vnet_id = required("virtualNetworkId")?;
    let Some((vnet_id, vnet_location)) = network::virtual_network(state, &vnet_id) else {
        return Err(invalid(
            "virtualNetworkId",
            &format!("'{vnet_id}' is not an existing virtual network."),
        ));
    };
    if !same(&vnet_location, &vault.location) {
        return Err(invalid(
            "virtualNetworkId",
            &format!(
                "the virtual network is in '{vnet_location}', not in the vault's region '{}'.",
                vault.location
            ),
        ));
    }
    let subnet_id = required("subnetId")?;
    match network::split_subnet_id(&subnet_id) {
        Some((vnet, _)) if same(&vnet, &vnet_id) => {}
        _ => {
            return Err(invalid(
                "subnetId",
                &format!("'{subnet_id}' is not a subnet of virtual network '{vnet_id}'."),
            ))
        }
    }
    Ok(RestoreKind::NewVm { name, subnet_id })
}

/// A restored disk: its id and LUN (`None` for the OS disk).
struct RestoredDisk {
    id: String,
    name: String,
    lun: Option<u32>,
}

/// Create the point's disks in `sub`/`rg` under the names Azure Backup gives restored disks, with
/// the encryption they were backed up with, attached to `managed_by` when given.
fn restore_disks(
    state: &mut SimState,
    rp: &RecoveryPoint,
    job: &Job,
    (sub, rg): (&str, &str),
    managed_by: Option<&str>,
) -> Vec<RestoredDisk> {
    let short = restore_suffix(job);
    let mut restored = Vec::new();
    for (i, snapshot) in rp.disks.iter().enumerate() {
        let name = if i == 0 {
            format!("{}-osdisk-{short}", rp.vm_name)
        } else {
            format!("{}-datadisk-{}-{short}", rp.vm_name, i - 1)
        };
        let disk = Disk {
            subscription: sub.to_string(),
            resource_group: rg.to_string(),
            name: name.clone(),
            location: rp.location.clone(),
            size_gb: snapshot.size_gb,
            os_type: (i == 0).then_some(rp.os),
            managed_by: managed_by.map(str::to_string),
            disk_encryption_set_id: snapshot.disk_encryption_set_id.clone(),
            ade: snapshot.ade.clone(),
            create_option: "Restore".into(),
            created: job.end,
        };
        restored.push(RestoredDisk {
            id: disk.id(),
            name,
            lun: snapshot.lun,
        });
        state.disks.push(disk);
    }
    restored
}

/// The job's share of restored resource names (12 hex digits of its id).
fn restore_suffix(job: &Job) -> String {
    job.id.replace('-', "").chars().take(12).collect()
}

fn os_name(os: OsType) -> &'static str {
    match os {
        OsType::Linux => "Linux",
        OsType::Windows => "Windows",
    }
}

/// Write what a completed restore job produced; the property bag of the job's extended info, and a
/// failure when what the job needed vanished while it ran.
pub(super) fn finish_restore(
    state: &mut SimState,
    job: &Job,
) -> (BTreeMap<String, String>, Option<JobFailure>) {
    let mut bag = BTreeMap::new();
    let Some(plan) = &job.restore else {
        return (bag, None);
    };
    let Some(rp) = state
        .recovery_points
        .iter()
        .find(|rp| rp.id == plan.recovery_point_id)
        .cloned()
    else {
        return (bag, None);
    };
    let Some(account) = state
        .storage_account_by_id(&plan.storage_account_id)
        .cloned()
    else {
        return (bag, None);
    };
    bag.insert("Target Storage Account Name".into(), account.name.clone());
    bag.insert("Recovery point time".into(), rfc3339(rp.time));
    bag.insert(
        "Target resource group".into(),
        plan.target_resource_group.clone(),
    );
    let failure = match &plan.kind {
        RestoreKind::Disks => {
            bag.insert("Job Type".into(), "Recover disks".into());
            restore_disks_outputs(state, job, plan, &rp, &account, &mut bag);
            None
        }
        RestoreKind::OriginalVm => {
            bag.insert("Job Type".into(), "Replace existing disks".into());
            replace_disks(state, job, &rp).err()
        }
        RestoreKind::NewVm { name, subnet_id } => {
            bag.insert("Job Type".into(), "Recover to a new virtual machine".into());
            bag.insert("Target VM Name".into(), name.clone());
            create_vm(state, job, plan, &rp, name, subnet_id).err()
        }
    };
    (bag, failure)
}

/// `RestoreDisks`: the disks, the template, the config and (for ADE) the encryption-info blob.
fn restore_disks_outputs(
    state: &mut SimState,
    job: &Job,
    plan: &RestorePlan,
    rp: &RecoveryPoint,
    account: &super::state::StorageAccount,
    bag: &mut BTreeMap<String, String>,
) {
    let short = restore_suffix(job);
    let disks = restore_disks(
        state,
        rp,
        job,
        (&plan.target_subscription, &plan.target_resource_group),
        None,
    );
    let container = format!("{}-{short}", rp.vm_name.to_ascii_lowercase());
    let config_blob = format!("config-{}-{}.json", rp.vm_name.to_ascii_lowercase(), job.id);
    let template_blob = format!("azuredeploy{}.json", job.id);
    let endpoint = account.blob_endpoint(&state.base_url);
    let os_disk_id = disks.first().map(|d| d.id.clone()).unwrap_or_default();
    let data_disks: Vec<Value> = disks.iter().skip(1)
        .map(|d| json!({ "lun": d.lun, "createOption": "Attach", "caching": "None", "managedDisk": { "id": d.id } }))
        .collect();
    let template = json!({
        "$schema": "https://schema.management.azure.com/schemas/2015-01-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "parameters": { "VirtualMachineName": { "type": "String", "defaultValue": rp.vm_name } },
        "resources": [{
            "type": "Microsoft.Compute/virtualMachines", "apiVersion": "2023-09-01",
            "name": "[parameters('VirtualMachineName')]", "location": rp.location,
            "properties": {
                "hardwareProfile": { "vmSize": rp.size },
                "storageProfile": {
                    "osDisk": { "osType": os_name(rp.os), "createOption": "Attach", "managedDisk": { "id": os_disk_id } },
                    "dataDisks": data_disks
                },
                "securityProfile": { "encryptionAtHost": rp.encryption_at_host }
            }
        }]
    });
    let config = json!({ "vmName": rp.vm_name, "location": rp.location, "vmSize": rp.size,
                         "disks": disks.iter().map(|d| json!({ "id": d.id, "lun": d.lun })).collect::<Vec<_>>() });
    let mut put_blob = |name: &str, value: &Value| {
        state.blobs.insert(
            blob_key(&account.name, &container, name),
            Blob {
                content: value.to_string().into_bytes(),
                content_type: "application/json".into(),
            },
        );
    };
    put_blob(&template_blob, &template);
    put_blob(&config_blob, &config);
    if let Some(ks) = &rp.key_and_secret {
        let info_blob = format!(
            "{}{short}encryptioninfo.json",
            rp.vm_name.to_ascii_lowercase()
        );
        let info = json!({
            "EncryptionMechanism": "SinglePass",
            "OsDiskKeyAndSecretDetails": {
                "SecretUrl": ks.secret_url, "SecretVaultId": ks.secret_vault_id, "SecretData": ks.secret_data,
                "KeyVaultSecretBackupData": ks.secret_backup_data,
                "KeyUrl": ks.key_url, "KeyVaultId": ks.key_vault_id, "KeyBackupData": ks.key_backup_data
            }
        });
        put_blob(&info_blob, &info);
        bag.insert("Encryption Info Blob Name".into(), info_blob.clone());
        bag.insert(
            "Encryption Info Blob Uri".into(),
            format!("{endpoint}{container}/{info_blob}"),
        );
    }
    bag.insert("Config Blob Container Name".into(), container.clone());
    bag.insert("Config Blob Name".into(), config_blob.clone());
    bag.insert(
        "Config Blob Uri".into(),
        format!("{endpoint}{container}/{config_blob}"),
    );
    bag.insert(
        "Template Blob Uri".into(),
        format!("{endpoint}{container}/{template_blob}"),
    );
}

/// `OriginalLocation`: new disks from the point replace the VM's; the old disks stay, detached.
fn replace_disks(state: &mut SimState, job: &Job, rp: &RecoveryPoint) -> Result<(), JobFailure> {
    let Some(vm) = state.vm_by_id(&job.vm_id).cloned() else {
        // Simulator's own code: the VM was deleted while its disks were being restored.
        return Err(JobFailure {
            code: "UserErrorOriginalVmNotFound".into(),
            message: format!("The original VM '{}' no longer exists.", job.vm_id),
        });
    };
    let vm_id = vm.id();
    let disks = restore_disks(
        state,
        rp,
        job,
        (&vm.subscription, &vm.resource_group),
        Some(&vm_id),
    );
    let old: Vec<String> = std::iter::once(vm.os_disk.clone())
        .chain(vm.data_disks.iter().cloned())
        .collect();
    for disk in state.disks.iter_mut().filter(|d| {
        same(&d.subscription, &vm.subscription)
            && same(&d.resource_group, &vm.resource_group)
            && old.iter().any(|name| same(name, &d.name))
    }) {
        disk.managed_by = None;
    }
    if let Some(target) = state.vms.iter_mut().find(|v| same(&v.id(), &vm_id)) {
        let mut names = disks.into_iter().map(|d| d.name);
        if let Some(os_disk) = names.next() {
            target.os_disk = os_disk;
        }
        target.data_disks = names.collect();
    }
    state.emit_write(&vm_id, "Microsoft.Compute/virtualMachines/write", job.end);
    Ok(())
}

/// `AlternateLocation`: a VM with the point's size, OS and disks, its NIC in the chosen subnet.
fn create_vm(
    state: &mut SimState,
    job: &Job,
    plan: &RestorePlan,
    rp: &RecoveryPoint,
    name: &str,
    subnet_id: &str,
) -> Result<(), JobFailure> {
    let (sub, rg) = (&plan.target_subscription, &plan.target_resource_group);
    if state.vm(sub, rg, name).is_some() {
        // Simulator's own code (as at the trigger): the name was taken while the job ran.
        return Err(JobFailure {
            code: "UserErrorVmNameAlreadyExists".into(),
            message: format!(
                "A virtual machine named '{name}' already exists in resource group '{rg}'."
            ),
        });
    }
    let vm_id = resource_id(sub, rg, "Microsoft.Compute/virtualMachines", name);
    let mut names = restore_disks(state, rp, job, (sub, rg), Some(&vm_id))
        .into_iter()
        .map(|d| d.name);
    let os_disk = names.next().unwrap_or_default();
    state.vms.push(Vm {
        subscription: sub.clone(),
        resource_group: rg.clone(),
        name: name.to_string(),
        location: rp.location.clone(),
        vm_id: uuid::Uuid::new_v4().to_string(),
        os: rp.os,
        size: rp.size.clone(),
        tags: BTreeMap::new(),
        agent: AgentState::Ready,
        power: PowerState::Running,
        os_disk,
        data_disks: names.collect(),
        encryption_at_host: rp.encryption_at_host,
        image_reference: None,
        extensions: Vec::new(),
        created: job.end,
        subnet: Some(subnet_id.to_string()),
        etag: 0,
    });
    state.emit_write(&vm_id, "Microsoft.Compute/virtualMachines/write", job.end);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_follow_azure_rules() {
        assert!(valid_vm_name("vm-web-01-restored-inc-1"));
        assert!(!valid_vm_name(""));
        assert!(!valid_vm_name("ends-with-"));
        assert!(!valid_vm_name("has space"));
        assert!(!valid_vm_name(&"x".repeat(65)));
    }

    #[test]
    fn resource_group_ids_parse() {
        assert_eq!(
            parse_resource_group_id("/subscriptions/s/resourceGroups/rg"),
            Some(("s".into(), "rg".into()))
        );
        assert_eq!(parse_resource_group_id("/subscriptions/s"), None);
    }
}
