//! Every model against the real REST examples in `../shared/azure-rest-examples/` (verbatim copies
//! of Azure/azure-rest-api-specs files), one test per example file, named after it. Request bodies
//! we build are checked against the examples' request parameters, so field names match the API.

use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use vmbackup::azure::backup::*;
use vmbackup::azure::compute::*;
use vmbackup::azure::deployments::Deployment;
use vmbackup::azure::graph::QueryResponse;
use vmbackup::azure::keyvault::*;
use vmbackup::azure::LroOutcome;

fn example(file: &str) -> Option<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/azure-rest-examples")
        .join(file);
    if !path.exists() {
        println!(
            "SKIPPED: {} is missing (../shared/azure-rest-examples is not beside the checkout)",
            path.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(&path).unwrap();
    Some(serde_json::from_str(&text).unwrap())
}

fn response<T: DeserializeOwned>(example: &Value, status: &str) -> T {
    let body = example["responses"][status]["body"].clone();
    assert!(!body.is_null(), "no {status} body");
    serde_json::from_value(body).unwrap_or_else(|e| panic!("{status} body does not parse: {e}"))
}

fn page<T: DeserializeOwned>(example: &Value) -> Vec<T> {
    response::<Value>(example, "200")["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| serde_json::from_value(v.clone()).unwrap())
        .collect()
}

/// Every field of `ours` is in `theirs` with the same value (theirs may carry more).
fn assert_subset(ours: &Value, theirs: &Value, at: &str) {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let other = b
                    .get(key)
                    .unwrap_or_else(|| panic!("{at}.{key} is not in the example"));
                assert_subset(value, other, &format!("{at}.{key}"));
            }
        }
        _ => assert_eq!(ours, theirs, "at {at}"),
    }
}

macro_rules! example_test {
    ($name:ident, $file:literal, |$ex:ident| $body:block) => {
        #[test]
        fn $name() {
            let Some($ex) = example($file) else { return };
            $body
        }
    };
}

example_test!(
    authorization_role_assignments_create_for_resource,
    "authorization/RoleAssignments_CreateForResource.json",
    |ex| {
        let created: RoleAssignment = response(&ex, "201");
        assert_eq!(
            created.properties.principal_id.as_deref(),
            Some("ce2ce14e-85d7-4629-bdbc-454d0519d987")
        );
        assert!(created
            .properties
            .role_definition_id
            .unwrap()
            .ends_with("0b5fe924-9a61-425c-96af-cfe6e287ca2d"));
        let scope = vmbackup::domain::ResourceId::parse(
            "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv",
        )
        .unwrap();
        let name = vmbackup::domain::key_vault_access::role_assignment_name(
            &scope,
            "principal",
            uuid::Uuid::from_u128(1),
        )
        .to_string();
        assert!(
            uuid::Uuid::parse_str(&name).is_ok() && uuid::Uuid::parse_str(&created.name).is_ok(),
            "names are GUIDs like the example's {}",
            created.name
        );
    }
);

example_test!(
    authorization_role_assignments_create_for_resource_group,
    "authorization/RoleAssignments_CreateForResourceGroup.json",
    |ex| {
        let ok: RoleAssignment = response(&ex, "200");
        assert_eq!(ok.properties.principal_type.as_deref(), Some("User"));
        assert!(ok.properties.scope.unwrap().contains("/resourceGroups/"));
    }
);

example_test!(
    compute_disk_encryption_set_get,
    "compute/DiskEncryptionSet_Get.json",
    |ex| {
        let des: DiskEncryptionSet = response(&ex, "200");
        assert_eq!(
            des.properties.encryption_type.as_deref(),
            Some("EncryptionAtRestWithCustomerKey")
        );
        let key = des.properties.active_key.unwrap();
        assert!(key.key_url.contains("/keys/"));
        assert!(key
            .source_vault
            .unwrap()
            .id
            .contains("Microsoft.KeyVault/vaults"));
    }
);

example_test!(
    compute_disk_create_with_disk_encryption_set,
    "compute/Disk_Create_WithDiskEncryptionSet.json",
    |ex| {
        let disk: Disk = response(&ex, "200");
        let set = disk
            .properties
            .encryption
            .unwrap()
            .disk_encryption_set_id
            .unwrap();
        assert!(set.contains("diskEncryptionSets"));
        let updating: Disk = response(&ex, "202");
        assert_eq!(updating.name, disk.name);
    }
);

example_test!(compute_disk_get, "compute/Disk_Get.json", |ex| {
    let disk: Disk = response(&ex, "200");
    assert!(disk.managed_by.unwrap().contains("virtualMachines"));
    let ade = disk.properties.encryption_settings_collection.unwrap();
    assert!(ade.enabled);
    let settings = &ade.encryption_settings[0];
    let bek = settings.disk_encryption_key.as_ref().unwrap();
    assert!(bek.secret_url.contains("/secrets/"));
    assert!(bek.source_vault.id.ends_with("/vaults/myVMVault"));
    assert!(settings
        .key_encryption_key
        .as_ref()
        .unwrap()
        .key_url
        .contains("/keys/"));
    assert_eq!(
        disk.properties
            .encryption
            .unwrap()
            .encryption_type
            .as_deref(),
        Some("EncryptionAtRestWithPlatformKey")
    );
});

example_test!(
    compute_virtual_machine_extension_create_or_update_maximum_set_gen,
    "compute/VirtualMachineExtension_CreateOrUpdate_MaximumSet_Gen.json",
    |ex| {
        let ext: VmExtension = response(&ex, "201");
        assert!(ext.properties.publisher.is_some());
        assert!(ext.properties.extension_type.is_some());
        assert!(ext.properties.provisioning_state.is_some());
    }
);

example_test!(
    compute_virtual_machine_extension_get_maximum_set_gen,
    "compute/VirtualMachineExtension_Get_MaximumSet_Gen.json",
    |ex| {
        let ext: VmExtension = response(&ex, "200");
        let view = ext.properties.instance_view.unwrap();
        assert!(!view.statuses.is_empty());
    }
);

example_test!(
    compute_virtual_machine_create_with_disk_encryption_set_resource,
    "compute/VirtualMachine_Create_WithDiskEncryptionSetResource.json",
    |ex| {
        let vm: VirtualMachine = response(&ex, "200");
        let os = vm.properties.storage_profile.os_disk.unwrap();
        let des = os.managed_disk.unwrap().disk_encryption_set.unwrap();
        assert!(des.id.contains("diskEncryptionSets"));
        let attached = vm
            .properties
            .storage_profile
            .data_disks
            .iter()
            .find(|d| d.create_option.as_deref() == Some("Attach"))
            .unwrap();
        assert!(attached.managed_disk.as_ref().unwrap().id.is_some());
    }
);

example_test!(
    compute_virtual_machine_get,
    "compute/VirtualMachine_Get.json",
    |ex| {
        let vm: VirtualMachine = response(&ex, "200");
        assert_eq!(vm.name, "myVM");
        let guest = vm
            .properties
            .os_profile
            .unwrap()
            .windows_configuration
            .unwrap();
        assert_eq!(guest.provision_vm_agent, Some(true));
        assert!(vm
            .properties
            .storage_profile
            .os_disk
            .unwrap()
            .managed_disk
            .unwrap()
            .id
            .is_some());
        assert!(!vm.properties.storage_profile.data_disks.is_empty());
    }
);

example_test!(
    compute_virtual_machine_get_instance_view,
    "compute/VirtualMachine_Get_InstanceView.json",
    |ex| {
        let view: VmInstanceView = response(&ex, "200");
        assert!(view.agent_ready());
        assert_eq!(view.power_state(), Some("running"));
        assert_eq!(
            view.extensions[0].name.as_deref(),
            Some("IaaSAntiMalware-ext0")
        );
        assert!(view.vm_agent.unwrap().vm_agent_version.is_some());
    }
);

example_test!(
    keyvault_dataplane_get_key_example,
    "keyvault-dataplane/GetKey-example.json",
    |ex| {
        let key: KeyProperties = response(&ex, "200");
        assert_eq!(key.key.kty.as_deref(), Some("RSA"));
        assert!(key.key.key_ops.iter().any(|op| op == "wrapKey"));
        assert_eq!(key.attributes.enabled, Some(true));
        assert_eq!(key.tags["purpose"], "unit test");
    }
);

example_test!(
    keyvault_dataplane_get_secret_example,
    "keyvault-dataplane/GetSecret-example.json",
    |ex| {
        let secret: SecretProperties = response(&ex, "200");
        assert!(secret
            .id
            .as_deref()
            .unwrap()
            .contains("/secrets/mysecretname/"));
        assert_eq!(
            secret.attributes.recovery_level.as_deref(),
            Some("Recoverable+Purgeable")
        );
        assert!(
            !format!("{secret:?}").contains("mysecretvalue"),
            "the value is not kept"
        );
    }
);

example_test!(keyvault_get_vault, "keyvault/getVault.json", |ex| {
    let vault: KeyVault = response(&ex, "200");
    assert!(vault
        .properties
        .vault_uri
        .as_deref()
        .unwrap()
        .starts_with("https://sample-vault"));
    assert_eq!(vault.properties.enabled_for_disk_encryption, Some(true));
    assert!(!vault.uses_rbac());
    assert!(vault.properties.access_policies[0]
        .permissions
        .secrets
        .contains(&"backup".to_string()));
});

example_test!(
    keyvault_update_access_policies_add,
    "keyvault/updateAccessPoliciesAdd.json",
    |ex| {
        let result: AccessPoliciesResult = response(&ex, "201");
        assert_eq!(result.properties.access_policies.len(), 1);
        // Our serialization of an entry is the request's.
        let entry = &result.properties.access_policies[0];
        let ours = serde_json::json!({ "properties": { "accessPolicies": [serde_json::to_value(entry).unwrap()] } });
        assert_eq!(ours, ex["parameters"]["parameters"]);
    }
);

example_test!(
    recoveryservices_get_vault,
    "recoveryservices/GETVault.json",
    |ex| {
        let vault: RecoveryServicesVault = response(&ex, "200");
        assert_eq!(vault.location, "westus");
        assert!(vault.id.ends_with("/vaults/swaggerExample"));
    }
);

example_test!(
    recoveryservices_put_vault,
    "recoveryservices/PUTVault.json",
    |ex| {
        let vault: RecoveryServicesVault = response(&ex, "201");
        assert_eq!(
            vault.properties.provisioning_state.as_deref(),
            Some("Succeeded")
        );
    }
);

example_test!(
    recoveryservicesbackup_backup_policies_list,
    "recoveryservicesbackup/BackupPolicies_List.json",
    |ex| {
        let policies: Vec<BackupPolicy> = page(&ex);
        assert!(!policies.is_empty());
        assert!(policies
            .iter()
            .all(|p| p.properties.backup_management_type.as_deref() == Some("AzureIaasVM")));
    }
);

example_test!(
    recoveryservicesbackup_backup_protectable_items_list,
    "recoveryservicesbackup/BackupProtectableItems_List.json",
    |ex| {
        let items: Vec<ProtectableItem> = page(&ex);
        assert_eq!(
            items[0].properties.protection_state.as_deref(),
            Some("NotProtected")
        );
        assert!(items[0]
            .properties
            .virtual_machine_id
            .as_deref()
            .unwrap()
            .contains("virtualMachines/iaasvm-1"));
    }
);

example_test!(
    recoveryservicesbackup_backup_protected_items_list,
    "recoveryservicesbackup/BackupProtectedItems_List.json",
    |ex| {
        let items: Vec<ProtectedItem> = page(&ex);
        assert!(!items.is_empty());
        assert!(items
            .iter()
            .all(|i| i.properties.protected_item_type.is_some()));
    }
);

example_test!(
    recoveryservicesbackup_compute_protected_item_get,
    "recoveryservicesbackup/Compute_ProtectedItem_Get.json",
    |ex| {
        let item: ProtectedItem = response(&ex, "200");
        assert_eq!(item.properties.health_status.as_deref(), Some("Passed"));
        assert_eq!(item.properties.policy_type.as_deref(), Some("V2"));
        assert!(item.properties.last_backup_time.is_some());
        assert!(item.properties.policy_id.is_some());
    }
);

example_test!(
    recoveryservicesbackup_configure_protection,
    "recoveryservicesbackup/ConfigureProtection.json",
    |ex| {
        let request = &ex["parameters"]["parameters"];
        let ours = enable_protection_body(
            request["properties"]["sourceResourceId"].as_str().unwrap(),
            request["properties"]["policyId"].as_str().unwrap(),
        );
        assert_eq!(&ours, request);
        let item: ProtectedItem = response(&ex, "200");
        assert_eq!(
            item.properties.protection_state.as_deref(),
            Some("Protected")
        );
        assert_eq!(
            item.properties.protection_status.as_deref(),
            Some("Healthy")
        );
        let headers = &ex["responses"]["202"]["headers"];
        assert!(headers["Azure-AsyncOperation"]
            .as_str()
            .unwrap()
            .contains("/operationsStatus/"));
    }
);

example_test!(
    recoveryservicesbackup_get_backup_status,
    "recoveryservicesbackup/GetBackupStatus.json",
    |ex| {
        let status: BackupStatus = response(&ex, "200");
        assert_eq!(status.protection_status.as_deref(), Some("Protected"));
        let item = ProtectedItemRef::from_backup_status(&status).unwrap();
        assert_eq!(
            item.protected_item_name,
            "vm;iaasvmcontainerv2;testRg;testVm"
        );
        assert!(item.path().contains("/backupFabrics/Azure/protectionContainers/iaasvmcontainer;iaasvmcontainerv2;testRg;testVm/"));
        let request = &ex["parameters"]["parameters"];
        assert_eq!(request["resourceType"], "VM");
    }
);

example_test!(
    recoveryservicesbackup_get_job_details,
    "recoveryservicesbackup/GetJobDetails.json",
    |ex| {
        let job: BackupJob = response(&ex, "200");
        assert_eq!(job.properties.operation.as_deref(), Some("Backup"));
        assert!(!job.properties.is_finished());
        let info = job.properties.extended_info.unwrap();
        assert_eq!(info.tasks_list[0].task_id.as_deref(), Some("Take Snapshot"));
        assert_eq!(info.property_bag["VM Name"], "testvm");
    }
);

example_test!(
    recoveryservicesbackup_list_jobs,
    "recoveryservicesbackup/ListJobs.json",
    |ex| {
        let jobs: Vec<BackupJob> = page(&ex);
        assert_eq!(jobs.len(), 2);
        let configure = jobs
            .iter()
            .find(|j| j.properties.operation.as_deref() == Some("ConfigureBackup"))
            .unwrap();
        assert!(configure.properties.is_finished());
    }
);

example_test!(
    recoveryservicesbackup_protected_item_operation_results,
    "recoveryservicesbackup/ProtectedItemOperationResults.json",
    |ex| {
        let item: ProtectedItem = response(&ex, "200");
        assert!(
            item.properties.source_resource_id.is_some()
                || item.properties.virtual_machine_id.is_some()
        );
    }
);

example_test!(
    recoveryservicesbackup_protected_item_operation_status,
    "recoveryservicesbackup/ProtectedItemOperationStatus.json",
    |ex| {
        let status: Value = response(&ex, "200");
        assert_eq!(status["status"], "Succeeded");
        let outcome = LroOutcome {
            operation_status: Some(status.clone()),
            resource: None,
        };
        assert_eq!(
            outcome.job_id().as_deref(),
            status["properties"]["jobId"].as_str()
        );
        assert!(outcome.job_id().is_some());
    }
);

example_test!(
    recoveryservicesbackup_protection_policies_create_or_update_complex,
    "recoveryservicesbackup/ProtectionPolicies_CreateOrUpdate_Complex.json",
    |ex| {
        let policy: BackupPolicy = response(&ex, "200");
        assert!(
            policy.properties.schedule_policy.is_some()
                && policy.properties.retention_policy.is_some()
        );
    }
);

example_test!(
    recoveryservicesbackup_protection_policies_create_or_update_simple,
    "recoveryservicesbackup/ProtectionPolicies_CreateOrUpdate_Simple.json",
    |ex| {
        let policy: BackupPolicy = response(&ex, "200");
        assert!(policy.properties.time_zone.is_some());
    }
);

example_test!(
    recoveryservicesbackup_protection_policies_get,
    "recoveryservicesbackup/ProtectionPolicies_Get.json",
    |ex| {
        let policy: BackupPolicy = response(&ex, "200");
        assert!(policy.id.contains("/backupPolicies/"));
        assert_eq!(
            policy.properties.policy_type, None,
            "a V1 policy has no policyType"
        );
    }
);

example_test!(
    recoveryservicesbackup_protection_policy_operation_results_get,
    "recoveryservicesbackup/ProtectionPolicyOperationResults_Get.json",
    |ex| {
        let policy: BackupPolicy = response(&ex, "200");
        assert!(!policy.name.is_empty());
    }
);

example_test!(
    recoveryservicesbackup_protection_policy_operation_statuses_get,
    "recoveryservicesbackup/ProtectionPolicyOperationStatuses_Get.json",
    |ex| {
        let status: Value = response(&ex, "200");
        let outcome = LroOutcome {
            operation_status: Some(status.clone()),
            resource: None,
        };
        assert_eq!(
            outcome.job_id().as_deref(),
            status["properties"]["jobIds"][0].as_str()
        );
    }
);

example_test!(
    recoveryservicesbackup_recovery_points_get,
    "recoveryservicesbackup/RecoveryPoints_Get.json",
    |ex| {
        let point: RecoveryPoint = response(&ex, "200");
        assert_eq!(
            point.properties.object_type.as_deref(),
            Some("IaasVMRecoveryPoint")
        );
        assert_eq!(point.properties.is_source_vm_encrypted, Some(false));
        assert_eq!(
            point.properties.recovery_point_type.as_deref(),
            Some("CrashConsistent")
        );
        assert_eq!(point.properties.zones, vec!["1".to_string()]);
        assert!(point.properties.key_and_secret.is_none());
    }
);

example_test!(
    recoveryservicesbackup_recovery_points_list,
    "recoveryservicesbackup/RecoveryPoints_List.json",
    |ex| {
        let points: Vec<RecoveryPoint> = page(&ex);
        assert_eq!(points.len(), 3);
        assert_eq!(points[2].properties.is_source_vm_encrypted, Some(true));
        assert!(points
            .iter()
            .all(|p| p.properties.recovery_point_time.is_some()));
        assert!(!points[0].properties.recovery_point_tier_details.is_empty());
    }
);

example_test!(
    recoveryservicesbackup_trigger_backup_post,
    "recoveryservicesbackup/TriggerBackup_Post.json",
    |ex| {
        assert_eq!(backup_request_body(None), ex["parameters"]["parameters"]);
        let headers = &ex["responses"]["202"]["headers"];
        assert!(headers["Azure-AsyncOperation"]
            .as_str()
            .unwrap()
            .contains("/operationsStatus/"));
    }
);

fn restore_from_example(request: &Value) -> IaasVmRestoreRequest {
    let p = &request["properties"];
    let text = |k: &str| p[k].as_str().map(str::to_string);
    let mut ours = IaasVmRestoreRequest::restore_disks(
        p["recoveryPointId"].as_str().unwrap(),
        p["sourceResourceId"].as_str().unwrap(),
        p["region"].as_str().unwrap(),
        p["storageAccountId"].as_str().unwrap(),
        None,
        EncryptionDetails::default(),
    );
    ours.create_new_cloud_service = p["createNewCloudService"].as_bool().unwrap();
    ours.target_resource_group_id = text("targetResourceGroupId");
    ours.target_virtual_machine_id = text("targetVirtualMachineId");
    ours.virtual_network_id = text("virtualNetworkId");
    ours.subnet_id = text("subnetId");
    ours.identity_info = Some(IdentityInfo {
        is_system_assigned_identity: p["identityInfo"]["isSystemAssignedIdentity"]
            .as_bool()
            .unwrap(),
        managed_identity_resource_id: p["identityInfo"]["managedIdentityResourceId"]
            .as_str()
            .map(str::to_string),
    });
    ours
}

example_test!(
    recoveryservicesbackup_trigger_restore_alr_iaas_vm_restore_request,
    "recoveryservicesbackup/TriggerRestore_ALR_IaasVMRestoreRequest.json",
    |ex| {
        let request = &ex["parameters"]["parameters"];
        let mut ours = restore_from_example(request);
        ours.recovery_type = RecoveryType::AlternateLocation;
        assert_subset(&ours.to_body(), request, "body");
    }
);

example_test!(
    recoveryservicesbackup_trigger_restore_restore_disks_iaas_vm_restore_request,
    "recoveryservicesbackup/TriggerRestore_RestoreDisks_IaasVMRestoreRequest.json",
    |ex| {
        let request = &ex["parameters"]["parameters"];
        let ours = restore_from_example(request);
        assert_subset(&ours.to_body(), request, "body");
        assert_eq!(ours.to_body()["properties"]["recoveryType"], "RestoreDisks");
    }
);

example_test!(
    recoveryservicesbackup_v2_get_policy,
    "recoveryservicesbackup/v2-Get-Policy.json",
    |ex| {
        let policy: BackupPolicy = response(&ex, "200");
        assert_eq!(policy.properties.policy_type.as_deref(), Some("V2"));
    }
);

example_test!(
    resourcegraph_resources_basic_query,
    "resourcegraph/ResourcesBasicQuery.json",
    |ex| {
        let page: QueryResponse = response(&ex, "200");
        assert_eq!(page.count as usize, page.data.len());
        assert!(page.skip_token.is_none());
    }
);

example_test!(
    resourcegraph_resources_filter_query,
    "resourcegraph/ResourcesFilterQuery.json",
    |ex| {
        let page: QueryResponse = response(&ex, "200");
        assert!(page.data.iter().all(|row| row["type"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case("Microsoft.Compute/virtualMachines")));
    }
);

example_test!(
    resourcegraph_resources_next_page_query,
    "resourcegraph/ResourcesNextPageQuery.json",
    |ex| {
        let page: QueryResponse = response(&ex, "200");
        assert_eq!(page.total_records, 386);
        assert_eq!(
            page.skip_token.as_deref(),
            Some("eyAibm8yIjogImx1Y2syIiwgImJ1dDIiOiAibmljZTIiLCAidHJ5MiI6ICIhIiB9")
        );
        assert_eq!(page.result_truncated.as_deref(), Some("false"));
        assert!(
            ex["parameters"]["query"]["options"]["$skipToken"].is_string(),
            "the request carries the token in options"
        );
    }
);

example_test!(
    resources_get_tags_subscription,
    "resources/GetTagsSubscription.json",
    |ex| {
        let tags: TagsResource = response(&ex, "200");
        assert!(!tags.properties.tags.is_empty());
    }
);

example_test!(
    resources_patch_tags_resource,
    "resources/PatchTagsResource.json",
    |ex| {
        let request = &ex["parameters"]["parameters"];
        let tags: BTreeMap<String, String> =
            serde_json::from_value(request["properties"]["tags"].clone()).unwrap();
        assert_eq!(&tags_patch_body(TagsOperation::Replace, &tags), request);
        let result: TagsResource = response(&ex, "200");
        assert_eq!(result.properties.tags, tags);
    }
);

example_test!(
    resources_put_tags_resource,
    "resources/PutTagsResource.json",
    |ex| {
        let result: TagsResource = response(&ex, "200");
        assert!(!result.properties.tags.is_empty());
        assert!(ex["responses"]["202"]["headers"]["location"]
            .as_str()
            .unwrap()
            .contains("operationresults"));
    }
);

example_test!(
    resources_put_deployment_resource_group,
    "resources/PutDeploymentResourceGroup.json",
    |ex| {
        let deployment: Deployment = response(&ex, "200");
        assert_eq!(
            deployment.properties.provisioning_state.as_deref(),
            Some("Succeeded")
        );
        let accepted: Deployment = response(&ex, "201");
        assert_eq!(
            accepted.properties.provisioning_state.as_deref(),
            Some("Accepted"),
            "a 201 is followed by polling"
        );
        assert!(deployment.properties.output_resources[0]
            .id
            .contains("storageAccounts"));
    }
);
