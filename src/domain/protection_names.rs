//! Names Azure Backup gives an IaaS VM's container and protected item (fabric `Azure`).

use crate::domain::resource_id::{types, ResourceId, ResourceIdError};

pub const FABRIC_NAME: &str = "Azure";
const CONTAINER_PREFIX: &str = "IaasVMContainer;iaasvmcontainerv2;";
const ITEM_PREFIX: &str = "VM;iaasvmcontainerv2;";

fn vm_parts(vm: &ResourceId) -> Result<(&str, &str), ResourceIdError> {
    vm.expect_type(types::VIRTUAL_MACHINE)?;
    // A VM id always has a resource group; `expect_type` guarantees a provider path, and ARM puts
    // compute resources in resource groups.
    let rg = vm
        .resource_group()
        .ok_or_else(|| ResourceIdError::Invalid {
            id: vm.to_string(),
            part: "resource group name",
            problem: "is missing",
        })?;
    Ok((rg, vm.name()))
}

/// `IaasVMContainer;iaasvmcontainerv2;<rg>;<vm>`.
pub fn container_name(vm: &ResourceId) -> Result<String, ResourceIdError> {
    let (rg, name) = vm_parts(vm)?;
    Ok(format!("{CONTAINER_PREFIX}{rg};{name}"))
}

/// `VM;iaasvmcontainerv2;<rg>;<vm>`.
pub fn protected_item_name(vm: &ResourceId) -> Result<String, ResourceIdError> {
    let (rg, name) = vm_parts(vm)?;
    Ok(format!("{ITEM_PREFIX}{rg};{name}"))
}

/// `{vault}/backupFabrics/Azure/protectionContainers/{container}/protectedItems/{item}`.
pub fn protected_item_id(
    vault: &ResourceId,
    vm: &ResourceId,
) -> Result<ResourceId, ResourceIdError> {
    vault.expect_type(types::RECOVERY_SERVICES_VAULT)?;
    vault
        .child("backupFabrics", FABRIC_NAME)?
        .child("protectionContainers", &container_name(vm)?)?
        .child("protectedItems", &protected_item_name(vm)?)
}

/// `(resource group, vm name)` from a protected item or container name; Azure's casing varies
/// (`vm;iaasvmcontainerv2;…`, `iaasvmcontainer;…`), so prefixes compare case-insensitively.
pub fn vm_of_backup_name(name: &str) -> Option<(&str, &str)> {
    let mut parts = name.split(';');
    let kind = parts.next()?;
    let container_type = parts.next()?;
    let rg = parts.next()?;
    let vm = parts.next()?;
    let known_kind =
        kind.eq_ignore_ascii_case("VM") || kind.eq_ignore_ascii_case("IaasVMContainer");
    if !known_kind
        || !container_type.eq_ignore_ascii_case("iaasvmcontainerv2")
        || parts.next().is_some()
        || rg.is_empty()
        || vm.is_empty()
    {
        return None;
    }
    Some((rg, vm))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> ResourceId {
        ResourceId::parse("/subscriptions/s1/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/vm-web-01").unwrap()
    }

    #[test]
    fn names_as_azure_forms_them() {
        assert_eq!(
            container_name(&vm()).unwrap(),
            "IaasVMContainer;iaasvmcontainerv2;rg-app;vm-web-01"
        );
        assert_eq!(
            protected_item_name(&vm()).unwrap(),
            "VM;iaasvmcontainerv2;rg-app;vm-web-01"
        );
    }

    #[test]
    fn protected_item_id_under_the_azure_fabric() {
        let vault = ResourceId::parse("/subscriptions/s1/resourceGroups/rg-backup/providers/Microsoft.RecoveryServices/vaults/rsv-weu").unwrap();
        let id = protected_item_id(&vault, &vm()).unwrap();
        assert_eq!(
            id.to_string(),
            "/subscriptions/s1/resourceGroups/rg-backup/providers/Microsoft.RecoveryServices/vaults/rsv-weu/backupFabrics/Azure/protectionContainers/IaasVMContainer;iaasvmcontainerv2;rg-app;vm-web-01/protectedItems/VM;iaasvmcontainerv2;rg-app;vm-web-01"
        );
        assert!(protected_item_id(&vm(), &vm()).is_err());
    }

    #[test]
    fn non_vm_ids_are_refused() {
        let kv = ResourceId::parse(
            "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv",
        )
        .unwrap();
        assert!(container_name(&kv).is_err());
        assert!(protected_item_name(&kv).is_err());
    }

    #[test]
    fn names_parse_back_whatever_the_casing() {
        assert_eq!(
            vm_of_backup_name("VM;iaasvmcontainerv2;rg-app;vm-web-01"),
            Some(("rg-app", "vm-web-01"))
        );
        assert_eq!(
            vm_of_backup_name("vm;IaasVMContainerV2;rg;vm"),
            Some(("rg", "vm"))
        );
        assert_eq!(
            vm_of_backup_name("iaasvmcontainer;iaasvmcontainerv2;rg;vm"),
            Some(("rg", "vm"))
        );
        for bad in [
            "",
            "VM;iaasvmcontainerv2;rg",
            "VM;iaasvmcontainer;rg;vm",
            "SQL;iaasvmcontainerv2;rg;vm",
            "VM;iaasvmcontainerv2;rg;vm;x",
            "VM;iaasvmcontainerv2;;vm",
        ] {
            assert_eq!(vm_of_backup_name(bad), None, "{bad}");
        }
    }
}
