//! Microsoft.Compute: virtual machines (GET with `$expand=instanceView`, list, PUT, PATCH), instance view,
//! VM extensions (PUT validates ADE settings), managed disks, disk encryption sets, operation status.

use super::fleet::{AgentState, OsType, PowerState};
use super::http::{rfc3339, Reply, Request};
use super::state::{
    parse_resource_id, resource_id, same, AdeDiskSettings, Disk, Extension, Operation,
    OperationResult, SimState, Vm,
};
use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

const RG: &str = "subscriptions/{}/resourcegroups/{}/providers/microsoft.compute";

pub fn route(state: &mut SimState, req: &Request) -> Option<Reply> {
    let vm_path = format!("{RG}/virtualmachines/{{}}");
    if let Some(c) = req.route(Method::GET, &vm_path) {
        let expand = req
            .query
            .get("$expand")
            .map(|e| e.eq_ignore_ascii_case("instanceView"))
            .unwrap_or(false);
        return Some(match state.vm(&c[0], &c[1], &c[2]) {
            Some(vm) => Reply::ok(render_vm(state, vm, expand)),
            None => vm_not_found(&c[1], &c[2]),
        });
    }
    if let Some(c) = req.route(Method::PUT, &vm_path) {
        return Some(put_vm(state, req, &c[0], &c[1], &c[2]).unwrap_or_else(|e| e));
    }
    if let Some(c) = req.route(Method::PATCH, &vm_path) {
        return Some(patch_vm(state, req, &c[0], &c[1], &c[2]).unwrap_or_else(|e| e));
    }
    if let Some(c) = req.route(Method::GET, &format!("{vm_path}/instanceview")) {
        return Some(match state.vm(&c[0], &c[1], &c[2]) {
            Some(vm) => Reply::ok(instance_view(state, vm)),
            None => vm_not_found(&c[1], &c[2]),
        });
    }
    if let Some(c) = req.route(Method::GET, &format!("{RG}/virtualmachines")) {
        let vms: Vec<Value> = state
            .vms
            .iter()
            .filter(|v| same(&v.subscription, &c[0]) && same(&v.resource_group, &c[1]))
            .map(|v| render_vm(state, v, false))
            .collect();
        return Some(Reply::ok(json!({ "value": vms })));
    }
    if let Some(c) = req.route(
        Method::GET,
        "subscriptions/{}/providers/microsoft.compute/virtualmachines",
    ) {
        let vms: Vec<Value> = state
            .vms
            .iter()
            .filter(|v| same(&v.subscription, &c[0]))
            .map(|v| render_vm(state, v, false))
            .collect();
        return Some(Reply::ok(json!({ "value": vms })));
    }
    let ext_path = format!("{vm_path}/extensions/{{}}");
    if let Some(c) = req.route(Method::GET, &ext_path) {
        let Some(vm) = state.vm(&c[0], &c[1], &c[2]) else {
            return Some(vm_not_found(&c[1], &c[2]));
        };
        return Some(match vm.extensions.iter().find(|e| same(&e.name, &c[3])) {
            Some(ext) => Reply::ok(render_extension(vm, ext)),
            None => Reply::not_found(
                "Microsoft.Compute/virtualMachines/extensions",
                &format!("{}/{}", c[2], c[3]),
            ),
        });
    }
    if let Some(c) = req.route(Method::GET, &format!("{vm_path}/extensions")) {
        let Some(vm) = state.vm(&c[0], &c[1], &c[2]) else {
            return Some(vm_not_found(&c[1], &c[2]));
        };
        let list: Vec<Value> = vm
            .extensions
            .iter()
            .map(|e| render_extension(vm, e))
            .collect();
        return Some(Reply::ok(json!({ "value": list })));
    }
    if let Some(c) = req.route(Method::PUT, &ext_path) {
        return Some(put_extension(state, req, &c[0], &c[1], &c[2], &c[3]).unwrap_or_else(|e| e));
    }
    let disk_path = format!("{RG}/disks/{{}}");
    if let Some(c) = req.route(Method::GET, &disk_path) {
        return Some(match state.disk(&c[0], &c[1], &c[2]) {
            Some(disk) => Reply::ok(render_disk(disk)),
            None => Reply::not_found("Microsoft.Compute/disks", &c[2]),
        });
    }
    if let Some(c) = req.route(Method::GET, &format!("{RG}/disks")) {
        let list: Vec<Value> = state
            .disks
            .iter()
            .filter(|d| same(&d.subscription, &c[0]) && same(&d.resource_group, &c[1]))
            .map(render_disk)
            .collect();
        return Some(Reply::ok(json!({ "value": list })));
    }
    if let Some(c) = req
        .route(Method::PUT, &disk_path)
        .or_else(|| req.route(Method::PATCH, &disk_path))
    {
        return Some(put_disk(state, req, &c[0], &c[1], &c[2]).unwrap_or_else(|e| e));
    }
    if let Some(c) = req.route(Method::GET, &format!("{RG}/diskencryptionsets/{{}}")) {
        let found = state.disk_encryption_sets.iter().find(|d| {
            same(&d.subscription, &c[0]) && same(&d.resource_group, &c[1]) && same(&d.name, &c[2])
        });
        return Some(match found {
            Some(des) => Reply::ok(json!({
                "id": des.id(), "name": des.name, "type": "Microsoft.Compute/diskEncryptionSets", "location": des.location, "tags": {},
                "identity": { "type": "SystemAssigned", "principalId": des.principal_id, "tenantId": super::state::TENANT_ID },
                "properties": {
                    "activeKey": { "sourceVault": { "id": des.key_vault_id }, "keyUrl": des.key_url },
                    "encryptionType": "EncryptionAtRestWithCustomerKey",
                    "previousKeys": [],
                    "provisioningState": "Succeeded"
                }
            })),
            None => Reply::not_found("Microsoft.Compute/diskEncryptionSets", &c[2]),
        });
    }
    if let Some(c) = req.route(
        Method::GET,
        "subscriptions/{}/providers/microsoft.compute/locations/{}/operations/{}",
    ) {
        return Some(match state.operations.get(&c[2]) {
            Some(op) => Reply::ok(json!({
                "startTime": rfc3339(op.start), "endTime": rfc3339(op.end),
                "status": op.status(req.now), "name": op.id
            })),
            None => Reply::not_found("Microsoft.Compute/locations/operations", &c[2]),
        });
    }
    None
}

fn vm_not_found(rg: &str, name: &str) -> Reply {
    Reply::arm_error(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        &format!("The Resource 'Microsoft.Compute/virtualMachines/{name}' under resource group '{rg}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix"),
    )
}

fn ade_json(ade: &AdeDiskSettings) -> Value {
    let mut settings = json!({
        "diskEncryptionKey": { "sourceVault": { "id": ade.secret_vault_id }, "secretUrl": ade.secret_url }
    });
    if let (Some(url), Some(vault)) = (&ade.key_url, &ade.key_vault_id) {
        settings["keyEncryptionKey"] = json!({ "sourceVault": { "id": vault }, "keyUrl": url });
    }
    settings
}

fn managed_disk_json(disk: Option<&Disk>, id: String) -> Value {
    let mut managed = json!({ "id": id, "storageAccountType": "Premium_LRS" });
    if let Some(des) = disk.and_then(|d| d.disk_encryption_set_id.as_ref()) {
        managed["diskEncryptionSet"] = json!({ "id": des });
    }
    managed
}

pub fn render_vm(state: &SimState, vm: &Vm, expand_instance_view: bool) -> Value {
    let disk_id = |name: &str| {
        resource_id(
            &vm.subscription,
            &vm.resource_group,
            "Microsoft.Compute/disks",
            name,
        )
    };
    let os_disk = state.disk(&vm.subscription, &vm.resource_group, &vm.os_disk);
    let mut os_json = json!({
        "osType": match vm.os { OsType::Linux => "Linux", OsType::Windows => "Windows" },
        "name": vm.os_disk,
        "createOption": os_disk.map(|d| if d.create_option == "FromImage" { "FromImage" } else { "Attach" }).unwrap_or("FromImage"),
        "caching": "ReadWrite",
        "managedDisk": managed_disk_json(os_disk, disk_id(&vm.os_disk)),
        "deleteOption": "Detach",
        "diskSizeGB": os_disk.map(|d| d.size_gb).unwrap_or(30)
    });
    if let Some(ade) = os_disk.and_then(|d| d.ade.as_ref()) {
        let mut settings = ade_json(ade);
        settings["enabled"] = json!(true);
        os_json["encryptionSettings"] = settings;
    }
    let data_disks: Vec<Value> = vm
        .data_disks
        .iter()
        .enumerate()
        .map(|(lun, name)| {
            let disk = state.disk(&vm.subscription, &vm.resource_group, name);
            json!({
                "lun": lun, "name": name,
                "createOption": disk.map(|d| if d.create_option == "Empty" { "Empty" } else { "Attach" }).unwrap_or("Empty"),
                "caching": "ReadOnly",
                "managedDisk": managed_disk_json(disk, disk_id(name)),
                "diskSizeGB": disk.map(|d| d.size_gb).unwrap_or(128),
                "toBeDetached": false,
                "deleteOption": "Detach"
            })
        })
        .collect();
    let provision_agent = vm.agent != AgentState::Missing;
    let os_config = match vm.os {
        OsType::Linux => {
            json!({ "linuxConfiguration": { "disablePasswordAuthentication": true, "provisionVMAgent": provision_agent } })
        }
        OsType::Windows => {
            json!({ "windowsConfiguration": { "provisionVMAgent": provision_agent, "enableAutomaticUpdates": true } })
        }
    };
    let mut os_profile = json!({ "computerName": vm.name, "adminUsername": "azureuser", "secrets": [], "allowExtensionOperations": true });
    if let (Some(profile), Some(config)) = (os_profile.as_object_mut(), os_config.as_object()) {
        profile.extend(config.clone());
    }
    let mut storage_profile = json!({ "osDisk": os_json, "dataDisks": data_disks });
    if os_disk.is_none_or(|d| d.create_option == "FromImage") {
        storage_profile["imageReference"] = vm
            .image_reference
            .clone()
            .unwrap_or_else(|| image_reference(vm.os));
    }
    let mut properties = json!({
        "vmId": vm.vm_id,
        "hardwareProfile": { "vmSize": vm.size },
        "storageProfile": storage_profile,
        "osProfile": os_profile,
        "networkProfile": { "networkInterfaces": [ {
            "id": resource_id(&vm.subscription, &vm.resource_group, "Microsoft.Network/networkInterfaces", &vm.nic_name()),
            "properties": { "primary": true, "deleteOption": "Detach" }
        } ] },
        // Managed boot diagnostics (no storageUri), the default of current VMs.
        "diagnosticsProfile": { "bootDiagnostics": { "enabled": true } },
        "provisioningState": "Succeeded",
        "timeCreated": rfc3339(vm.created)
    });
    if vm.encryption_at_host {
        properties["securityProfile"] = json!({ "encryptionAtHost": true });
    }
    if expand_instance_view {
        properties["instanceView"] = instance_view(state, vm);
    }
    let mut body = json!({
        "name": vm.name, "id": vm.id(), "type": "Microsoft.Compute/virtualMachines",
        "location": vm.location, "tags": vm.tags, "properties": properties,
        "etag": vm_etag(vm)
    });
    if !vm.extensions.is_empty() {
        body["resources"] = Value::Array(
            vm.extensions
                .iter()
                .map(|e| render_extension(vm, e))
                .collect(),
        );
    }
    body
}

/// The marketplace image a fleet VM's OS disk was created from.
fn image_reference(os: OsType) -> Value {
    match os {
        OsType::Linux => {
            json!({ "publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest", "exactVersion": "24.04.202409120" })
        }
        OsType::Windows => {
            json!({ "publisher": "MicrosoftWindowsServer", "offer": "WindowsServer", "sku": "2022-datacenter-azure-edition", "version": "latest", "exactVersion": "20348.2700.240911" })
        }
    }
}

/// Status of an extension as its handler reports it; ADE also reports the encryption state per volume.
fn extension_statuses(vm: &Vm, ext: &Extension) -> (Value, Value) {
    let statuses = json!([{ "code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded",
                            "message": if ext.is_ade() { "Encryption succeeded for all volumes" } else { "Enable succeeded" },
                            "time": rfc3339(vm.created) }]);
    let substatuses = if ext.is_ade() {
        json!([{ "code": "ComponentStatus/EncryptionState/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded",
                 "message": "{\"os\": \"Encrypted\", \"data\": \"Encrypted\"}", "time": rfc3339(vm.created) }])
    } else {
        json!([])
    };
    (statuses, substatuses)
}

pub fn instance_view(state: &SimState, vm: &Vm) -> Value {
    let succeeded = |display: &str| json!({ "code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": display, "time": rfc3339(vm.created) });
    let agent_ready = vm.agent == AgentState::Ready && vm.power == PowerState::Running;
    let mut disks = Vec::new();
    for name in std::iter::once(&vm.os_disk).chain(vm.data_disks.iter()) {
        let mut entry = json!({ "name": name, "statuses": [succeeded("Provisioning succeeded")] });
        if let Some(ade) = state
            .disk(&vm.subscription, &vm.resource_group, name)
            .and_then(|d| d.ade.as_ref())
        {
            let mut settings = ade_json(ade);
            settings["enabled"] = json!(true);
            entry["encryptionSettings"] = json!([settings]);
        }
        disks.push(entry);
    }
    let extensions: Vec<Value> = vm
        .extensions
        .iter()
        .map(|e| {
            let (statuses, substatuses) = extension_statuses(vm, e);
            let mut view = json!({
                "name": e.name, "type": format!("{}.{}", e.publisher, e.extension_type), "typeHandlerVersion": e.type_handler_version,
                "statuses": statuses
            });
            if substatuses.as_array().is_some_and(|s| !s.is_empty()) {
                view["substatuses"] = substatuses;
            }
            view
        })
        .collect();
    let power = match vm.power {
        PowerState::Running => {
            json!({ "code": "PowerState/running", "level": "Info", "displayStatus": "VM running" })
        }
        PowerState::Stopped => {
            json!({ "code": "PowerState/stopped", "level": "Info", "displayStatus": "VM stopped" })
        }
        PowerState::Deallocated => {
            json!({ "code": "PowerState/deallocated", "level": "Info", "displayStatus": "VM deallocated" })
        }
    };
    let mut view = json!({
        "computerName": vm.name,
        "osName": match vm.os { OsType::Linux => "ubuntu", OsType::Windows => "Windows Server 2022 Datacenter" },
        "disks": disks,
        "extensions": extensions,
        "hyperVGeneration": "V2",
        "platformUpdateDomain": 0,
        "platformFaultDomain": 0,
        "isVMInStandbyPool": false,
        "bootDiagnostics": {
            "consoleScreenshotBlobUri": format!("{}/blob/bootdiagnostics/{}.screenshot.bmp", state.base_url, vm.vm_id),
            "serialConsoleLogBlobUri": format!("{}/blob/bootdiagnostics/{}.serialconsole.log", state.base_url, vm.vm_id)
        },
        "statuses": [succeeded("Provisioning succeeded"), power]
    });
    if vm.agent != AgentState::Missing {
        let status = if agent_ready {
            json!({ "code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Ready", "message": "GuestAgent is running and processing the extensions.", "time": rfc3339(vm.created) })
        } else {
            json!({ "code": "ProvisioningState/Unavailable", "level": "Warning", "displayStatus": "Not Ready", "message": "VM status blob is found but not yet populated.", "time": rfc3339(vm.created) })
        };
        let handlers: Vec<Value> = vm
            .extensions
            .iter()
            .map(|e| json!({ "type": format!("{}.{}", e.publisher, e.extension_type), "typeHandlerVersion": e.type_handler_version,
                             "status": { "code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Ready" } }))
            .collect();
        if agent_ready {
            // The guest agent reports the OS version.
            view["osVersion"] = json!(match vm.os {
                OsType::Linux => "24.04",
                OsType::Windows => "Microsoft Windows NT 10.0.20348.0",
            });
        }
        view["vmAgent"] = json!({ "vmAgentVersion": if agent_ready { "2.11.1.12" } else { "Unknown" }, "statuses": [status], "extensionHandlers": handlers });
    }
    view
}

fn render_extension(vm: &Vm, ext: &Extension) -> Value {
    let (statuses, substatuses) = extension_statuses(vm, ext);
    let mut body = json!({
        "name": ext.name,
        "id": format!("{}/extensions/{}", vm.id(), ext.name),
        "type": "Microsoft.Compute/virtualMachines/extensions",
        "location": vm.location,
        "properties": {
            "publisher": ext.publisher,
            "type": ext.extension_type,
            "typeHandlerVersion": ext.type_handler_version,
            "autoUpgradeMinorVersion": true,
            "settings": ext.settings,
            "provisioningState": "Succeeded",
            "instanceView": {
                "name": ext.name, "type": ext.extension_type, "typeHandlerVersion": ext.type_handler_version,
                "statuses": statuses, "substatuses": substatuses
            }
        }
    });
    // Optional properties the caller set are returned as set (protectedSettings never are).
    for (key, value) in &ext.optional_properties {
        if key == "tags" {
            body["tags"] = value.clone();
        } else {
            body["properties"][key] = value.clone();
        }
    }
    body
}

pub fn render_disk(disk: &Disk) -> Value {
    let mut properties = json!({
        "creationData": { "createOption": disk.create_option },
        "diskSizeGB": disk.size_gb,
        "encryption": match &disk.disk_encryption_set_id {
            Some(des) => json!({ "type": "EncryptionAtRestWithCustomerKey", "diskEncryptionSetId": des }),
            None => json!({ "type": "EncryptionAtRestWithPlatformKey" }),
        },
        "timeCreated": rfc3339(disk.created),
        "provisioningState": "Succeeded",
        "diskState": if disk.managed_by.is_some() { "Attached" } else { "Unattached" }
    });
    if let Some(os) = disk.os_type {
        properties["osType"] = json!(match os {
            OsType::Linux => "Linux",
            OsType::Windows => "Windows",
        });
        properties["hyperVGeneration"] = json!("V2");
        properties["supportedCapabilities"] =
            json!({ "acceleratedNetwork": true, "architecture": "x64" });
        if disk.create_option == "FromImage" {
            let image = image_reference(os);
            properties["creationData"]["imageReference"] = json!({ "id": format!(
                "/Subscriptions/{}/Providers/Microsoft.Compute/Locations/{}/Publishers/{}/ArtifactTypes/VMImage/Offers/{}/Skus/{}/Versions/{}",
                disk.subscription, disk.location, image["publisher"].as_str().unwrap_or_default(), image["offer"].as_str().unwrap_or_default(),
                image["sku"].as_str().unwrap_or_default(), image["exactVersion"].as_str().unwrap_or_default()) });
        }
    }
    if disk.managed_by.is_some() {
        // Compute records when a VM attached the disk; the simulator attaches at creation.
        properties["LastOwnershipUpdateTime"] = json!(rfc3339(disk.created));
    }
    if let Some(ade) = &disk.ade {
        properties["encryptionSettingsCollection"] = json!({ "enabled": true, "encryptionSettings": [ade_json(ade)], "encryptionSettingsVersion": "1.1" });
    }
    let mut body = json!({
        "id": disk.id(), "name": disk.name, "type": "Microsoft.Compute/disks", "location": disk.location,
        "sku": { "name": "Premium_LRS", "tier": "Premium" }, "tags": {}, "properties": properties
    });
    if let Some(managed_by) = &disk.managed_by {
        body["managedBy"] = json!(managed_by);
    }
    body
}

fn invalid(message: &str) -> Reply {
    Reply::bad_request("InvalidParameter", message)
}

/// Check a versioned Key Vault URL (`{vaultUri}{kind}/{name}/{version}`) against the estate; returns (vault name, object name).
fn resolve_vault_url(state: &SimState, url: &str, kind: &str) -> Result<(String, String), String> {
    for kv in &state.key_vaults {
        let prefix = format!("{}{kind}/", kv.vault_uri(&state.base_url));
        if let Some(rest) = url.strip_prefix(&prefix) {
            let parts: Vec<&str> = rest.split('/').collect();
            if parts.len() == 2 && !parts[1].is_empty() {
                let exists = match kind {
                    "secrets" => kv
                        .secrets
                        .iter()
                        .any(|s| same(&s.name, parts[0]) && same(&s.version, parts[1])),
                    _ => kv
                        .keys
                        .iter()
                        .any(|k| same(&k.name, parts[0]) && same(&k.version, parts[1])),
                };
                return if exists {
                    Ok((kv.name.clone(), parts[0].to_string()))
                } else {
                    Err(format!("{url} does not exist in key vault {}", kv.name))
                };
            }
        }
    }
    let singular = kind.trim_end_matches('s');
    Err(format!(
        "{url} is not a valid versioned Key Vault {} URL",
        if singular == "secret" {
            "Secret"
        } else {
            "Key"
        }
    ))
}

fn parse_ade_disk_settings(
    state: &SimState,
    value: &Value,
) -> Result<Option<AdeDiskSettings>, Reply> {
    if value.is_null() || value.get("enabled").and_then(Value::as_bool) == Some(false) {
        return Ok(None);
    }
    let setting = value
        .get("encryptionSettings")
        .and_then(|s| s.get(0))
        .unwrap_or(value);
    let secret_url = setting
        .pointer("/diskEncryptionKey/secretUrl")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let secret_vault_id = setting
        .pointer("/diskEncryptionKey/sourceVault/id")
        .and_then(Value::as_str)
        .unwrap_or_default();
    resolve_vault_url(state, secret_url, "secrets").map_err(|e| invalid(&e))?;
    if state.key_vault_by_id(secret_vault_id).is_none() {
        return Err(invalid(&format!(
            "diskEncryptionKey.sourceVault.id '{secret_vault_id}' is not a key vault"
        )));
    }
    let key_url = setting
        .pointer("/keyEncryptionKey/keyUrl")
        .and_then(Value::as_str);
    let key_vault_id = setting
        .pointer("/keyEncryptionKey/sourceVault/id")
        .and_then(Value::as_str);
    if let Some(url) = key_url {
        resolve_vault_url(state, url, "keys").map_err(|e| invalid(&e))?;
    }
    Ok(Some(AdeDiskSettings {
        secret_url: secret_url.to_string(),
        secret_vault_id: secret_vault_id.to_string(),
        key_url: key_url.map(String::from),
        key_vault_id: key_vault_id.map(String::from),
    }))
}

fn put_disk(
    state: &mut SimState,
    req: &Request,
    sub: &str,
    rg: &str,
    name: &str,
) -> Result<Reply, Reply> {
    let body = req.json_body()?;
    let existing = state.disk(sub, rg, name).cloned();
    let ade = match body.pointer("/properties/encryptionSettingsCollection") {
        Some(value) => parse_ade_disk_settings(state, value)?,
        None => existing.as_ref().and_then(|d| d.ade.clone()),
    };
    let location = body
        .get("location")
        .and_then(Value::as_str)
        .map(String::from);
    let disk = match existing {
        Some(mut disk) => {
            disk.ade = ade;
            if let Some(des) = body
                .pointer("/properties/encryption/diskEncryptionSetId")
                .and_then(Value::as_str)
            {
                disk.disk_encryption_set_id = Some(des.to_string());
            }
            disk
        }
        None => {
            let Some(location) = location else {
                return Err(invalid(
                    "The 'location' property is required for a new disk.",
                ));
            };
            Disk {
                subscription: sub.to_string(),
                resource_group: rg.to_string(),
                name: name.to_string(),
                location,
                size_gb: body
                    .pointer("/properties/diskSizeGB")
                    .and_then(Value::as_u64)
                    .unwrap_or(128) as u32,
                os_type: match body.pointer("/properties/osType").and_then(Value::as_str) {
                    Some(os) if os.eq_ignore_ascii_case("windows") => Some(OsType::Windows),
                    Some(os) if os.eq_ignore_ascii_case("linux") => Some(OsType::Linux),
                    _ => None,
                },
                managed_by: None,
                disk_encryption_set_id: body
                    .pointer("/properties/encryption/diskEncryptionSetId")
                    .and_then(Value::as_str)
                    .map(String::from),
                ade,
                create_option: body
                    .pointer("/properties/creationData/createOption")
                    .and_then(Value::as_str)
                    .unwrap_or("Empty")
                    .to_string(),
                created: req.now,
            }
        }
    };
    let rendered = render_disk(&disk);
    state.disks.retain(|d| {
        !(same(&d.name, name) && same(&d.resource_group, rg) && same(&d.subscription, sub))
    });
    state.disks.push(disk);
    Ok(Reply::ok(rendered))
}

/// Create or update a VM from an ARM body (also used by deployments). Returns (vm id, created?).
pub fn upsert_vm_from_body(
    state: &mut SimState,
    sub: &str,
    rg: &str,
    name: &str,
    body: &Value,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(String, bool), Reply> {
    let vm_id = resource_id(sub, rg, "Microsoft.Compute/virtualMachines", name);
    let tags: std::collections::BTreeMap<String, String> = match body.get("tags") {
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect(),
        _ => Default::default(),
    };
    if let Some(vm) = state.vm_mut(sub, rg, name) {
        if body.get("tags").is_some() {
            vm.tags = tags;
        }
        if let Some(at_host) = body
            .pointer("/properties/securityProfile/encryptionAtHost")
            .and_then(Value::as_bool)
        {
            vm.encryption_at_host = at_host;
        }
        state.emit_write(&vm_id, "Microsoft.Compute/virtualMachines/write", now);
        return Ok((vm_id, false));
    }
    let location = body
        .get("location")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("The 'location' property is required for a new virtual machine."))?
        .to_string();
    let os_disk = body
        .pointer("/properties/storageProfile/osDisk")
        .cloned()
        .unwrap_or(Value::Null);
    let os_create = os_disk
        .get("createOption")
        .and_then(Value::as_str)
        .unwrap_or("FromImage")
        .to_string();
    let mut os = match os_disk.get("osType").and_then(Value::as_str) {
        Some(t) if t.eq_ignore_ascii_case("windows") => OsType::Windows,
        _ => OsType::Linux,
    };
    if body
        .pointer("/properties/osProfile/windowsConfiguration")
        .is_some()
    {
        os = OsType::Windows;
    }
    let des_of = |disk: &Value| {
        disk.pointer("/managedDisk/diskEncryptionSet/id")
            .and_then(Value::as_str)
            .map(String::from)
    };
    let mut attach = Vec::new();
    let mut new_disks = Vec::new();
    let os_disk_name = if os_create.eq_ignore_ascii_case("Attach") {
        let id = os_disk
            .pointer("/managedDisk/id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let disk = state
            .disk_by_id(id)
            .ok_or_else(|| invalid(&format!("The OS disk '{id}' to attach was not found.")))?;
        if let Some(owner) = disk.managed_by.as_ref().filter(|o| !same(o, &vm_id)) {
            return Err(Reply::arm_error(
                StatusCode::CONFLICT,
                "OperationNotAllowed",
                &format!("Disk {} is already attached to {owner}.", disk.name),
            ));
        }
        if let Some(t) = disk.os_type {
            os = t;
        }
        attach.push(disk.id());
        disk.name.clone()
    } else {
        let name = os_disk
            .get("name")
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| format!("{name}_OsDisk_1_{}", &super::state::new_version()[..8]));
        new_disks.push((name.clone(), 30, Some(os), "FromImage", des_of(&os_disk)));
        name
    };
    let mut data_disk_names = Vec::new();
    if let Some(Value::Array(data)) = body.pointer("/properties/storageProfile/dataDisks") {
        for (i, disk) in data.iter().enumerate() {
            let create = disk
                .get("createOption")
                .and_then(Value::as_str)
                .unwrap_or("Empty");
            if create.eq_ignore_ascii_case("Attach") {
                let id = disk
                    .pointer("/managedDisk/id")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let found = state.disk_by_id(id).ok_or_else(|| {
                    invalid(&format!("The data disk '{id}' to attach was not found."))
                })?;
                attach.push(found.id());
                data_disk_names.push(found.name.clone());
            } else {
                let disk_name = disk
                    .get("name")
                    .and_then(Value::as_str)
                    .map(String::from)
                    .unwrap_or_else(|| format!("{name}_DataDisk_{i}"));
                let size = disk
                    .get("diskSizeGB")
                    .and_then(Value::as_u64)
                    .unwrap_or(128) as u32;
                new_disks.push((disk_name.clone(), size, None, "Empty", des_of(disk)));
                data_disk_names.push(disk_name);
            }
        }
    }
    for id in &attach {
        if let Some((dsub, drg, _, dname)) = parse_resource_id(id) {
            if let Some(disk) = state.disks.iter_mut().find(|d| {
                same(&d.subscription, &dsub)
                    && same(&d.resource_group, &drg)
                    && same(&d.name, &dname)
            }) {
                disk.managed_by = Some(vm_id.clone());
            }
        }
    }
    for (disk_name, size, os_type, create, des) in new_disks {
        state.disks.push(Disk {
            subscription: sub.to_string(),
            resource_group: rg.to_string(),
            name: disk_name,
            location: location.clone(),
            size_gb: size,
            os_type,
            managed_by: Some(vm_id.clone()),
            disk_encryption_set_id: des,
            ade: None,
            create_option: create.to_string(),
            created: now,
        });
    }
    let provision_agent = body
        .pointer("/properties/osProfile/linuxConfiguration/provisionVMAgent")
        .or_else(|| body.pointer("/properties/osProfile/windowsConfiguration/provisionVMAgent"))
        .and_then(Value::as_bool)
        .unwrap_or(true);
    state.vms.push(Vm {
        subscription: sub.to_string(),
        resource_group: rg.to_string(),
        name: name.to_string(),
        location,
        vm_id: uuid::Uuid::new_v4().to_string(),
        os,
        size: body
            .pointer("/properties/hardwareProfile/vmSize")
            .and_then(Value::as_str)
            .unwrap_or("Standard_D2s_v5")
            .to_string(),
        tags,
        agent: if provision_agent {
            AgentState::Ready
        } else {
            AgentState::Missing
        },
        power: PowerState::Running,
        os_disk: os_disk_name,
        data_disks: data_disk_names,
        encryption_at_host: body
            .pointer("/properties/securityProfile/encryptionAtHost")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        image_reference: body
            .pointer("/properties/storageProfile/imageReference")
            .cloned(),
        extensions: Vec::new(),
        created: now,
        subnet: None,
        etag: 0,
    });
    state.emit_write(&vm_id, "Microsoft.Compute/virtualMachines/write", now);
    Ok((vm_id, true))
}

fn compute_operation(state: &mut SimState, req: &Request, sub: &str, location: &str) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    state.operations.insert(
        id.clone(),
        Operation {
            id: id.clone(),
            start: req.now,
            end: req.now,
            job_id: None,
            failure: None,
            result: OperationResult::NoContent,
        },
    );
    format!("{}/subscriptions/{sub}/providers/Microsoft.Compute/locations/{location}/operations/{id}?api-version={}", req.base_url, req.api_version())
}

fn put_vm(
    state: &mut SimState,
    req: &Request,
    sub: &str,
    rg: &str,
    name: &str,
) -> Result<Reply, Reply> {
    let body = req.json_body()?;
    check_preconditions(req, state.vm(sub, rg, name))?;
    let (_, created) = upsert_vm_from_body(state, sub, rg, name, &body, req.now)?;
    let vm = state
        .vm(sub, rg, name)
        .ok_or_else(|| vm_not_found(rg, name))?;
    let rendered = render_vm(state, vm, false);
    let location = vm.location.clone();
    let async_url = compute_operation(state, req, sub, &location);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(Reply::json(status, rendered).with_header("azure-asyncoperation", async_url))
}

fn patch_vm(
    state: &mut SimState,
    req: &Request,
    sub: &str,
    rg: &str,
    name: &str,
) -> Result<Reply, Reply> {
    let body = req.json_body()?;
    let Some(vm) = state.vm(sub, rg, name) else {
        return Err(vm_not_found(rg, name));
    };
    check_preconditions(req, Some(vm))?;
    upsert_vm_from_body(state, sub, rg, name, &body, req.now)?;
    let vm = state
        .vm(sub, rg, name)
        .ok_or_else(|| vm_not_found(rg, name))?;
    Ok(Reply::ok(render_vm(state, vm, false)))
}

/// ARM's `etag` of a VM: its model version, quoted (`"3"`).
fn vm_etag(vm: &Vm) -> String {
    format!("\"{}\"", vm.etag)
}

/// `If-Match` (the current etag, one of a list, or `*` for any existing VM) and `If-None-Match: *`
/// (only if the VM does not exist) on a VM write; a failed condition is ARM's 412. The message is
/// the simulator's own wording.
fn check_preconditions(req: &Request, vm: Option<&Vm>) -> Result<(), Reply> {
    let header = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let current = vm.map(vm_etag);
    let matches = |condition: &str| {
        condition.split(',').map(str::trim).any(|tag| {
            tag == "*"
                || current
                    .as_deref()
                    .is_some_and(|etag| etag == tag.trim_start_matches("W/"))
        })
    };
    let failed = |detail: String| {
        Err(Reply::arm_error(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            &format!("The precondition on the virtual machine was not met: {detail}."),
        ))
    };
    if let Some(condition) = header("if-match") {
        if current.is_none() || !matches(condition) {
            let now = current.as_deref().unwrap_or("none (the VM does not exist)");
            return failed(format!(
                "If-Match {condition} but the current etag is {now}"
            ));
        }
    }
    if let Some(condition) = header("if-none-match") {
        if current.is_some() && matches(condition) {
            return failed(format!("If-None-Match {condition} but the VM exists"));
        }
    }
    Ok(())
}

/// The settings a PUT of the ADE extension must carry, checked as the extension checks them.
fn validate_ade_settings(
    state: &SimState,
    vm: &Vm,
    settings: &Value,
) -> Result<(String, Option<String>), Reply> {
    let text = |key: &str| {
        settings
            .get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let operation = text("EncryptionOperation").unwrap_or("EnableEncryption");
    if !["EnableEncryption", "EnableEncryptionFormatAll"]
        .iter()
        .any(|o| o.eq_ignore_ascii_case(operation))
    {
        return Err(invalid(&format!("EncryptionOperation '{operation}' is not supported; use EnableEncryption or EnableEncryptionFormatAll.")));
    }
    let url =
        text("KeyVaultURL").ok_or_else(|| invalid("The ADE setting KeyVaultURL is required."))?;
    let vault_id = text("KeyVaultResourceId")
        .ok_or_else(|| invalid("The ADE setting KeyVaultResourceId is required."))?;
    let kv = state.key_vault_by_id(vault_id).ok_or_else(|| {
        invalid(&format!(
            "KeyVaultResourceId '{vault_id}' is not an existing key vault."
        ))
    })?;
    if kv.vault_uri(&state.base_url).trim_end_matches('/') != url.trim_end_matches('/') {
        return Err(invalid(&format!(
            "KeyVaultURL '{url}' does not belong to the key vault '{vault_id}'."
        )));
    }
    if !same(&kv.location, &vm.location) || !same(&kv.subscription, &vm.subscription) {
        return Err(invalid(
            "The key vault must be in the same subscription and region as the virtual machine.",
        ));
    }
    let volume = text("VolumeType").unwrap_or("");
    if !["OS", "Data", "All"]
        .iter()
        .any(|v| v.eq_ignore_ascii_case(volume))
    {
        return Err(invalid(&format!(
            "VolumeType '{volume}' is invalid; use OS, Data or All."
        )));
    }
    let kek = match text("KeyEncryptionKeyURL") {
        Some(kek_url) => {
            let (kek_vault, kek_name) =
                resolve_vault_url(state, kek_url, "keys").map_err(|e| invalid(&e))?;
            if let Some(kek_vault_id) = text("KekVaultResourceId") {
                if !state
                    .key_vault_by_id(kek_vault_id)
                    .is_some_and(|k| same(&k.name, &kek_vault))
                {
                    return Err(invalid(&format!(
                        "KekVaultResourceId '{kek_vault_id}' does not hold the key encryption key."
                    )));
                }
            }
            if !same(&kek_vault, &kv.name) {
                return Err(invalid(
                    "The simulator supports the KEK only in the same key vault as the BEK.",
                ));
            }
            Some(kek_name)
        }
        None => None,
    };
    Ok((kv.name.clone(), kek))
}

fn put_extension(
    state: &mut SimState,
    req: &Request,
    sub: &str,
    rg: &str,
    vm_name: &str,
    ext_name: &str,
) -> Result<Reply, Reply> {
    let body = req.json_body()?;
    let vm = state
        .vm(sub, rg, vm_name)
        .cloned()
        .ok_or_else(|| vm_not_found(rg, vm_name))?;
    let props = body.get("properties").cloned().unwrap_or(Value::Null);
    let text = |key: &str| {
        props
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let extension = Extension {
        name: ext_name.to_string(),
        publisher: text("publisher"),
        extension_type: text("type"),
        type_handler_version: text("typeHandlerVersion"),
        settings: props.get("settings").cloned().unwrap_or(json!({})),
        optional_properties: [
            "forceUpdateTag",
            "enableAutomaticUpgrade",
            "suppressFailures",
        ]
        .iter()
        .filter_map(|key| props.get(*key).map(|v| (key.to_string(), v.clone())))
        .chain(body.get("tags").map(|t| ("tags".to_string(), t.clone())))
        .collect(),
    };
    if extension.publisher.is_empty() || extension.extension_type.is_empty() {
        return Err(invalid(
            "The extension properties 'publisher' and 'type' are required.",
        ));
    }
    let existed = vm.extensions.iter().any(|e| same(&e.name, ext_name));
    if extension.is_ade() {
        let (kv_name, kek) = validate_ade_settings(state, &vm, &extension.settings)?;
        // ADE generates a fresh BEK secret per encryption pass.
        let secret_name = uuid::Uuid::new_v4().to_string();
        state
            .enable_ade(
                sub,
                vm_name,
                &kv_name,
                &secret_name,
                kek.as_deref(),
                req.now,
            )
            .map_err(|e| invalid(&e))?;
    }
    let vm_mut = state
        .vm_mut(sub, rg, vm_name)
        .ok_or_else(|| vm_not_found(rg, vm_name))?;
    vm_mut
        .extensions
        .retain(|e| !(same(&e.name, ext_name) || (extension.is_ade() && e.is_ade())));
    vm_mut.extensions.push(extension.clone());
    let vm_now = vm_mut.clone();
    if !extension.is_ade() {
        state.emit_write(
            &format!("{}/extensions/{ext_name}", vm_now.id()),
            "Microsoft.Compute/virtualMachines/extensions/write",
            req.now,
        );
    }
    let async_url = compute_operation(state, req, sub, &vm_now.location);
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(Reply::json(status, render_extension(&vm_now, &extension))
        .with_header("azure-asyncoperation", async_url))
}
