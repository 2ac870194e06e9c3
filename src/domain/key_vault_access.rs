//! The plan to grant the Backup Management Service (BMS) read access to a key vault.
//!
//! Access-policy vaults: the BMS entry to write, merged with what it already has (never removing or
//! narrowing anything; write it with `accessPolicies/add`, which merges too). RBAC vaults: the role to
//! assign and a deterministic assignment name, so a redelivered event PUTs the same assignment.

use crate::domain::eligibility::KeyVaultAccessNeed;
use crate::domain::resource_id::ResourceId;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Permissions Azure Backup needs on each object kind it reads (research-anchors A2: the safe superset).
pub const REQUIRED_PERMISSIONS: [&str; 3] = ["get", "list", "backup"];

/// Built-in "Key Vault Administrator" role definition id.
pub const KEY_VAULT_ADMINISTRATOR_ROLE: &str = "00482a5a-887f-4fb3-b363-3b7fe8e74483";
const KEY_VAULT_ADMINISTRATOR_GUID: Uuid = Uuid::from_u128(0x00482a5a_887f_4fb3_b363_3b7fe8e74483);

/// The data actions of the least-privilege custom role (research-anchors A2).
pub const CUSTOM_ROLE_DATA_ACTIONS: [&str; 5] = [
    "Microsoft.KeyVault/vaults/keys/backup/action",
    "Microsoft.KeyVault/vaults/secrets/backup/action",
    "Microsoft.KeyVault/vaults/secrets/getSecret/action",
    "Microsoft.KeyVault/vaults/keys/read",
    "Microsoft.KeyVault/vaults/secrets/readMetadata/action",
];

/// One entry of a vault's `accessPolicies` (the fields this plan touches).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicyEntry {
    pub tenant_id: String,
    pub object_id: String,
    /// Set only for compound identities; such entries are not the BMS's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_id: Option<String>,
    pub keys: Vec<String>,
    pub secrets: Vec<String>,
    pub certificates: Vec<String>,
    pub storage: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessPolicyPlan {
    /// The BMS already holds every needed permission: no write.
    AlreadySufficient,
    /// Write this entry (existing permissions plus the missing ones).
    Write(AccessPolicyEntry),
}

fn has_permission(granted: &[String], wanted: &str) -> bool {
    granted
        .iter()
        .any(|g| g.eq_ignore_ascii_case(wanted) || g.eq_ignore_ascii_case("all"))
}

/// Adds the missing required permissions after the existing ones; returns whether anything was added.
fn merge_required(granted: &mut Vec<String>) -> bool {
    let missing: Vec<String> = REQUIRED_PERMISSIONS
        .iter()
        .filter(|p| !has_permission(granted, p))
        .map(|p| p.to_string())
        .collect();
    granted.extend(missing.iter().cloned());
    !missing.is_empty()
}

/// The access-policy write (if any) that gives the BMS what `need` asks for.
pub fn plan_access_policy(
    existing: &[AccessPolicyEntry],
    tenant_id: &str,
    bms_object_id: &str,
    need: &KeyVaultAccessNeed,
) -> AccessPolicyPlan {
    // Object ids are GUIDs; Azure returns them lowercase but callers may not.
    let current = existing.iter().find(|e| {
        e.object_id.eq_ignore_ascii_case(bms_object_id)
            && e.tenant_id.eq_ignore_ascii_case(tenant_id)
            && e.application_id.is_none()
    });
    let mut entry = current.cloned().unwrap_or_else(|| AccessPolicyEntry {
        tenant_id: tenant_id.to_string(),
        object_id: bms_object_id.to_string(),
        ..Default::default()
    });
    let mut changed = current.is_none();
    if need.secrets {
        changed |= merge_required(&mut entry.secrets);
    }
    if need.keys {
        changed |= merge_required(&mut entry.keys);
    }
    if changed {
        AccessPolicyPlan::Write(entry)
    } else {
        AccessPolicyPlan::AlreadySufficient
    }
}

/// Which role the app assigns on RBAC key vaults (from app settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RbacRoleConfig {
    /// A custom role with [`CUSTOM_ROLE_DATA_ACTIONS`]: its role definition GUID or full id.
    CustomRole(String),
    /// The built-in Key Vault Administrator, only when configured so.
    KeyVaultAdministrator,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role definition {0:?} is neither a GUID nor an id ending in /roleDefinitions/<GUID>")]
pub struct BadRoleDefinition(pub String);

impl RbacRoleConfig {
    /// The role definition GUID.
    pub fn role_guid(&self) -> Result<Uuid, BadRoleDefinition> {
        let raw = match self {
            RbacRoleConfig::CustomRole(id) => id.as_str(),
            RbacRoleConfig::KeyVaultAdministrator => KEY_VAULT_ADMINISTRATOR_ROLE,
        };
        role_guid_of(raw).ok_or_else(|| BadRoleDefinition(raw.to_string()))
    }
}

/// The GUID of a role definition given as a GUID or `…/roleDefinitions/<GUID>`.
pub fn role_guid_of(role_definition: &str) -> Option<Uuid> {
    let last = role_definition.rsplit('/').next()?;
    if role_definition.contains('/') {
        let (prefix, _) = role_definition.rsplit_once('/')?;
        if !prefix
            .to_ascii_lowercase()
            .ends_with("/providers/microsoft.authorization/roledefinitions")
        {
            return None;
        }
    }
    Uuid::parse_str(last).ok()
}

/// An existing role assignment (from a list at or above the vault's scope).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExistingRoleAssignment {
    pub principal_id: String,
    pub role_definition_id: String,
    pub scope: String,
}

/// A role assignment to PUT at `{scope}/providers/Microsoft.Authorization/roleAssignments/{name}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleAssignmentPlan {
    pub scope: ResourceId,
    pub name: Uuid,
    /// Full id: `/subscriptions/{sub}/providers/Microsoft.Authorization/roleDefinitions/{guid}`.
    pub role_definition_id: String,
    pub principal_id: String,
    pub principal_type: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RbacPlan {
    AlreadySufficient,
    Assign(RoleAssignmentPlan),
}

/// Namespace of this tool's deterministic role-assignment names.
const ROLE_ASSIGNMENT_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2d0e_8b4a_4c57_9a3e_5d7b_1e2f_0c41);

/// UUID v5 over scope, principal and role (all lowercased): the same triple always gives the same name.
pub fn role_assignment_name(scope: &ResourceId, principal_id: &str, role: Uuid) -> Uuid {
    let key = format!(
        "{}|{}|{}",
        scope.canonical(),
        principal_id.to_ascii_lowercase(),
        role.hyphenated()
    );
    Uuid::new_v5(&ROLE_ASSIGNMENT_NAMESPACE, key.as_bytes())
}

/// What to assign on an RBAC key vault. An existing assignment to the BMS of the configured role or of
/// Key Vault Administrator, at the vault or above it, is enough (either holds all five data actions);
/// other roles are not inspected.
pub fn plan_rbac(
    key_vault: &ResourceId,
    bms_object_id: &str,
    config: &RbacRoleConfig,
    existing: &[ExistingRoleAssignment],
) -> Result<RbacPlan, BadRoleDefinition> {
    let role = config.role_guid()?;
    let admin = KEY_VAULT_ADMINISTRATOR_GUID;
    let sufficient = existing.iter().any(|a| {
        a.principal_id.eq_ignore_ascii_case(bms_object_id)
            && role_guid_of(&a.role_definition_id).is_some_and(|g| g == role || g == admin)
            && ResourceId::parse(&a.scope).is_ok_and(|scope| key_vault.is_within(&scope))
    });
    if sufficient {
        return Ok(RbacPlan::AlreadySufficient);
    }
    Ok(RbacPlan::Assign(RoleAssignmentPlan {
        scope: key_vault.clone(),
        name: role_assignment_name(key_vault, bms_object_id, role),
        role_definition_id: format!(
            "/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{}",
            key_vault.subscription_id(),
            role.hyphenated()
        ),
        principal_id: bms_object_id.to_string(),
        principal_type: "ServicePrincipal",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const BMS: &str = "9c1a2b3c-4d5e-4f60-8a7b-0c1d2e3f4a5b";
    const CUSTOM: &str = "3d7e1a2b-5c4f-4e6d-9b8a-7f6e5d4c3b2a";
    const KV: &str =
        "/subscriptions/s1/resourceGroups/rg-sec/providers/Microsoft.KeyVault/vaults/kv-ade-weu";

    fn need(secrets: bool, keys: bool) -> KeyVaultAccessNeed {
        KeyVaultAccessNeed {
            key_vault: ResourceId::parse(KV).unwrap(),
            secrets,
            keys,
        }
    }

    fn other_user() -> AccessPolicyEntry {
        AccessPolicyEntry {
            tenant_id: TENANT.into(),
            object_id: "00000000-0000-0000-0000-000000000001".into(),
            keys: vec!["all".into()],
            secrets: vec!["get".into()],
            ..Default::default()
        }
    }

    #[test]
    fn bek_only_adds_a_new_bms_entry_with_secrets_only() {
        match plan_access_policy(&[other_user()], TENANT, BMS, &need(true, false)) {
            AccessPolicyPlan::Write(e) => {
                assert_eq!(e.object_id, BMS);
                assert_eq!(e.secrets, ["get", "list", "backup"]);
                assert!(e.keys.is_empty() && e.certificates.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn kek_merges_into_the_existing_entry_without_narrowing() {
        let existing = AccessPolicyEntry {
            tenant_id: TENANT.into(),
            object_id: BMS.to_uppercase(),
            keys: vec!["Get".into(), "wrapKey".into()],
            secrets: vec!["Get".into(), "List".into(), "Backup".into()],
            certificates: vec!["get".into()],
            ..Default::default()
        };
        match plan_access_policy(
            &[other_user(), existing.clone()],
            TENANT,
            BMS,
            &need(true, true),
        ) {
            AccessPolicyPlan::Write(e) => {
                assert_eq!(e.keys, ["Get", "wrapKey", "list", "backup"]);
                assert_eq!(e.secrets, existing.secrets);
                assert_eq!(e.certificates, existing.certificates);
                assert_eq!(e.object_id, existing.object_id);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sufficient_entry_means_no_write_and_all_counts() {
        let existing = AccessPolicyEntry {
            tenant_id: TENANT.into(),
            object_id: BMS.into(),
            keys: vec!["all".into()],
            secrets: vec!["get".into(), "list".into(), "backup".into()],
            ..Default::default()
        };
        assert_eq!(
            plan_access_policy(&[existing], TENANT, BMS, &need(true, true)),
            AccessPolicyPlan::AlreadySufficient
        );
    }

    #[test]
    fn compound_identity_or_other_tenant_entries_are_not_the_bms() {
        let compound = AccessPolicyEntry {
            tenant_id: TENANT.into(),
            object_id: BMS.into(),
            application_id: Some("app".into()),
            secrets: vec!["all".into()],
            ..Default::default()
        };
        let other_tenant = AccessPolicyEntry {
            tenant_id: "other".into(),
            application_id: None,
            ..compound.clone()
        };
        assert!(matches!(
            plan_access_policy(&[compound, other_tenant], TENANT, BMS, &need(true, false)),
            AccessPolicyPlan::Write(_)
        ));
    }

    #[test]
    fn rbac_assigns_the_custom_role_with_a_deterministic_name() {
        let kv = ResourceId::parse(KV).unwrap();
        let config = RbacRoleConfig::CustomRole(CUSTOM.into());
        let RbacPlan::Assign(plan) = plan_rbac(&kv, BMS, &config, &[]).unwrap() else {
            panic!("expected assign")
        };
        assert_eq!(
            plan.role_definition_id,
            format!("/subscriptions/s1/providers/Microsoft.Authorization/roleDefinitions/{CUSTOM}")
        );
        assert_eq!(plan.principal_type, "ServicePrincipal");
        assert_eq!(plan.name.get_version_num(), 5);
        // Same inputs, any casing → same name; another principal → another name.
        let kv_upper = ResourceId::parse(&KV.to_uppercase()).unwrap();
        let again = plan_rbac(
            &kv_upper,
            &BMS.to_uppercase(),
            &RbacRoleConfig::CustomRole(format!(
                "/subscriptions/s1/providers/Microsoft.Authorization/roleDefinitions/{CUSTOM}"
            )),
            &[],
        )
        .unwrap();
        let RbacPlan::Assign(again) = again else {
            panic!("expected assign")
        };
        assert_eq!(again.name, plan.name);
        assert_ne!(
            role_assignment_name(&kv, "someone-else", config.role_guid().unwrap()),
            plan.name
        );
    }

    #[test]
    fn role_assignment_names_are_deterministic_and_ignore_case() {
        let kv = ResourceId::parse(KV).unwrap();
        let same_kv = ResourceId::parse(&KV.to_ascii_uppercase()).unwrap();
        let role = Uuid::from_u128(7);
        let a = role_assignment_name(&kv, "p1", role);
        assert_eq!(a, role_assignment_name(&same_kv, "P1", role));
        assert_ne!(a, role_assignment_name(&kv, "p2", role));
        assert_ne!(a, role_assignment_name(&kv, "p1", Uuid::from_u128(8)));
    }

    #[test]
    fn rbac_key_vault_administrator_only_when_configured() {
        let kv = ResourceId::parse(KV).unwrap();
        let RbacPlan::Assign(plan) =
            plan_rbac(&kv, BMS, &RbacRoleConfig::KeyVaultAdministrator, &[]).unwrap()
        else {
            panic!()
        };
        assert!(plan
            .role_definition_id
            .ends_with(KEY_VAULT_ADMINISTRATOR_ROLE));
    }

    #[test]
    fn rbac_existing_assignment_at_or_above_the_vault_suffices() {
        let kv = ResourceId::parse(KV).unwrap();
        let config = RbacRoleConfig::CustomRole(CUSTOM.into());
        let at = |scope: &str, role: &str, principal: &str| ExistingRoleAssignment {
            principal_id: principal.into(),
            role_definition_id: format!(
                "/subscriptions/s1/providers/Microsoft.Authorization/roleDefinitions/{role}"
            ),
            scope: scope.into(),
        };
        for ok in [
            at(KV, CUSTOM, BMS),
            at(
                "/subscriptions/s1/resourceGroups/RG-SEC",
                KEY_VAULT_ADMINISTRATOR_ROLE,
                BMS,
            ),
            at("/subscriptions/s1", CUSTOM, &BMS.to_uppercase()),
        ] {
            assert_eq!(
                plan_rbac(&kv, BMS, &config, std::slice::from_ref(&ok)).unwrap(),
                RbacPlan::AlreadySufficient,
                "{ok:?}"
            );
        }
        let reader = "21090545-7ca7-4776-b22c-e363652d74d2";
        for not_enough in [
            at(KV, reader, BMS),
            at(KV, CUSTOM, "someone-else"),
            at("/subscriptions/s1/resourceGroups/rg-other", CUSTOM, BMS),
            at("/subscriptions/s2", CUSTOM, BMS),
        ] {
            assert!(
                matches!(
                    plan_rbac(&kv, BMS, &config, std::slice::from_ref(&not_enough)).unwrap(),
                    RbacPlan::Assign(_)
                ),
                "{not_enough:?}"
            );
        }
    }

    #[test]
    fn administrator_constants_agree() {
        assert_eq!(
            KEY_VAULT_ADMINISTRATOR_GUID.to_string(),
            KEY_VAULT_ADMINISTRATOR_ROLE
        );
    }

    #[test]
    fn bad_role_definition_is_an_error() {
        let kv = ResourceId::parse(KV).unwrap();
        for bad in [
            "",
            "not-a-guid",
            "/subscriptions/s1/providers/Other/things/3d7e1a2b-5c4f-4e6d-9b8a-7f6e5d4c3b2a",
        ] {
            assert!(
                plan_rbac(&kv, BMS, &RbacRoleConfig::CustomRole(bad.into()), &[]).is_err(),
                "{bad:?}"
            );
        }
    }
}
