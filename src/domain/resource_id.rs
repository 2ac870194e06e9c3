//! ARM resource ids: parse, format, compare as ARM does (case-insensitively).
//!
//! Supported shapes:
//! - `/subscriptions/{sub}`
//! - `/subscriptions/{sub}/resourceGroups/{rg}`
//! - `/subscriptions/{sub}[/resourceGroups/{rg}]/providers/{ns}/{type}/{name}[/{childType}/{childName}…]`
//!
//! Extension resources (a second `/providers/` inside the id, e.g. role assignments on a key vault) are
//! not parsed: the workflow builds those URLs from a scope id and a name.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceIdError {
    #[error("resource id {id:?}: {part} {problem}")]
    Invalid {
        id: String,
        /// The part of the id that is wrong, e.g. `subscription id`, `resource group name`.
        part: &'static str,
        problem: &'static str,
    },
    #[error("resource id {id:?} is a {actual}, expected a {expected}")]
    WrongType {
        id: String,
        expected: String,
        actual: String,
    },
}

/// A parsed ARM resource id. Original spelling is kept for display; equality and hashing ignore case.
#[derive(Debug, Clone)]
pub struct ResourceId {
    subscription_id: String,
    resource_group: Option<String>,
    /// Resource provider namespace, e.g. `Microsoft.Compute`.
    namespace: Option<String>,
    /// `(type, name)` pairs from the top-level resource down to the deepest child.
    segments: Vec<(String, String)>,
}

impl ResourceId {
    pub fn parse(id: &str) -> Result<Self, ResourceIdError> {
        let invalid = |part: &'static str, problem: &'static str| ResourceIdError::Invalid {
            id: id.to_string(),
            part,
            problem,
        };
        let rest = id
            .strip_prefix('/')
            .ok_or_else(|| invalid("start", "must be '/'"))?;
        let tokens: Vec<&str> = rest.split('/').collect();
        if tokens.iter().any(|t| t.trim().is_empty() || t.trim() != *t) {
            return Err(invalid(
                "segment",
                "must not be empty or padded with spaces",
            ));
        }
        let mut tokens = tokens.into_iter().peekable();
        match tokens.next() {
            Some(t) if t.eq_ignore_ascii_case("subscriptions") => {}
            _ => return Err(invalid("subscriptions keyword", "is missing")),
        }
        let subscription_id = tokens
            .next()
            .ok_or_else(|| invalid("subscription id", "is missing"))?
            .to_string();
        let mut resource_group = None;
        if tokens
            .peek()
            .is_some_and(|t| t.eq_ignore_ascii_case("resourceGroups"))
        {
            tokens.next();
            resource_group = Some(
                tokens
                    .next()
                    .ok_or_else(|| invalid("resource group name", "is missing"))?
                    .to_string(),
            );
        }
        let mut namespace = None;
        let mut segments = Vec::new();
        match tokens.next() {
            None => {}
            Some(t) if t.eq_ignore_ascii_case("providers") => {
                namespace = Some(
                    tokens
                        .next()
                        .ok_or_else(|| invalid("provider namespace", "is missing"))?
                        .to_string(),
                );
                while let Some(resource_type) = tokens.next() {
                    if resource_type.eq_ignore_ascii_case("providers") {
                        return Err(invalid(
                            "extension resource",
                            "is not supported (second 'providers')",
                        ));
                    }
                    let name = tokens
                        .next()
                        .ok_or_else(|| invalid("resource name", "is missing after its type"))?;
                    segments.push((resource_type.to_string(), name.to_string()));
                }
                if segments.is_empty() {
                    return Err(invalid("resource type", "is missing"));
                }
            }
            Some(_) => return Err(invalid("providers keyword", "is missing")),
        }
        Ok(ResourceId {
            subscription_id,
            resource_group,
            namespace,
            segments,
        })
    }

    /// `/subscriptions/{sub}`.
    pub fn subscription(subscription_id: &str) -> Self {
        ResourceId {
            subscription_id: subscription_id.to_string(),
            resource_group: None,
            namespace: None,
            segments: Vec::new(),
        }
    }

    /// `/subscriptions/{sub}/resourceGroups/{rg}`.
    pub fn resource_group_id(subscription_id: &str, resource_group: &str) -> Self {
        ResourceId {
            resource_group: Some(resource_group.to_string()),
            ..ResourceId::subscription(subscription_id)
        }
    }

    /// A top-level resource in a resource group; `resource_type` is `Namespace/type`.
    pub fn resource(
        subscription_id: &str,
        resource_group: &str,
        resource_type: &str,
        name: &str,
    ) -> Result<Self, ResourceIdError> {
        ResourceId::parse(&format!(
            "/subscriptions/{subscription_id}/resourceGroups/{resource_group}/providers/{resource_type}/{name}"
        ))
    }

    /// A child of this resource, e.g. `vault.child("backupPolicies", "DefaultPolicy")`.
    pub fn child(&self, child_type: &str, name: &str) -> Result<Self, ResourceIdError> {
        ResourceId::parse(&format!("{self}/{child_type}/{name}"))
    }

    pub fn subscription_id(&self) -> &str {
        &self.subscription_id
    }

    pub fn resource_group(&self) -> Option<&str> {
        self.resource_group.as_deref()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// The resource's own name (deepest segment); for a resource group id its name, for a subscription id
    /// the subscription id.
    pub fn name(&self) -> &str {
        match (self.segments.last(), &self.resource_group) {
            (Some((_, name)), _) => name,
            (None, Some(rg)) => rg,
            (None, None) => &self.subscription_id,
        }
    }

    /// The full type, e.g. `Microsoft.Compute/virtualMachines` or `Microsoft.Compute/virtualMachines/extensions`;
    /// `Microsoft.Resources/resourceGroups` and `Microsoft.Resources/subscriptions` for scopes.
    pub fn resource_type(&self) -> String {
        match &self.namespace {
            Some(ns) => {
                let mut t = ns.clone();
                for (segment_type, _) in &self.segments {
                    t.push('/');
                    t.push_str(segment_type);
                }
                t
            }
            None if self.resource_group.is_some() => {
                "Microsoft.Resources/resourceGroups".to_string()
            }
            None => "Microsoft.Resources/subscriptions".to_string(),
        }
    }

    /// Whether the type equals `expected` (ARM compares types case-insensitively).
    pub fn is_type(&self, expected: &str) -> bool {
        self.resource_type().eq_ignore_ascii_case(expected)
    }

    /// Ok when the type is `expected`, else an error naming both.
    pub fn expect_type(&self, expected: &str) -> Result<&Self, ResourceIdError> {
        if self.is_type(expected) {
            Ok(self)
        } else {
            Err(ResourceIdError::WrongType {
                id: self.to_string(),
                expected: expected.to_string(),
                actual: self.resource_type(),
            })
        }
    }

    pub fn is_resource_group(&self) -> bool {
        self.resource_group.is_some() && self.namespace.is_none()
    }

    pub fn is_subscription(&self) -> bool {
        self.resource_group.is_none() && self.namespace.is_none()
    }

    /// The id of the resource group holding this resource, if any.
    pub fn resource_group_scope(&self) -> Option<ResourceId> {
        self.resource_group
            .as_deref()
            .map(|rg| ResourceId::resource_group_id(&self.subscription_id, rg))
    }

    /// Whether `self` is `scope` or lies below it (ARM's scope inheritance).
    pub fn is_within(&self, scope: &ResourceId) -> bool {
        if !self
            .subscription_id
            .eq_ignore_ascii_case(&scope.subscription_id)
        {
            return false;
        }
        match (&scope.resource_group, &self.resource_group) {
            (None, _) if scope.namespace.is_none() => return true,
            (Some(s), Some(o)) if s.eq_ignore_ascii_case(o) => {}
            (None, None) => {}
            _ => return false,
        }
        match (&scope.namespace, &self.namespace) {
            (None, _) => true,
            (Some(s), Some(o)) if s.eq_ignore_ascii_case(o) => {
                scope.segments.len() <= self.segments.len()
                    && scope
                        .segments
                        .iter()
                        .zip(&self.segments)
                        .all(|((st, sn), (ot, on))| {
                            st.eq_ignore_ascii_case(ot) && sn.eq_ignore_ascii_case(on)
                        })
            }
            _ => false,
        }
    }

    /// A lowercase canonical form: the key for maps and deterministic names.
    pub fn canonical(&self) -> String {
        self.to_string().to_ascii_lowercase()
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/subscriptions/{}", self.subscription_id)?;
        if let Some(rg) = &self.resource_group {
            write!(f, "/resourceGroups/{rg}")?;
        }
        if let Some(ns) = &self.namespace {
            write!(f, "/providers/{ns}")?;
            for (segment_type, name) in &self.segments {
                write!(f, "/{segment_type}/{name}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for ResourceId {
    type Err = ResourceIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ResourceId::parse(s)
    }
}

impl PartialEq for ResourceId {
    fn eq(&self, other: &Self) -> bool {
        self.canonical() == other.canonical()
    }
}

impl Eq for ResourceId {}

impl Hash for ResourceId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.canonical().hash(state);
    }
}

impl schemars::JsonSchema for ResourceId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ResourceId".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "An Azure Resource Manager id, e.g. /subscriptions/{id}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}",
            "pattern": "^/[sS][uU][bB][sS][cC][rR][iI][pP][tT][iI][oO][nN][sS]/[^/]+"
        })
    }
}

impl Serialize for ResourceId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ResourceId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        ResourceId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// ARM resource types this crate names often.
pub mod types {
    pub const VIRTUAL_MACHINE: &str = "Microsoft.Compute/virtualMachines";
    pub const DISK_ENCRYPTION_SET: &str = "Microsoft.Compute/diskEncryptionSets";
    pub const KEY_VAULT: &str = "Microsoft.KeyVault/vaults";
    pub const RECOVERY_SERVICES_VAULT: &str = "Microsoft.RecoveryServices/vaults";
    pub const STORAGE_ACCOUNT: &str = "Microsoft.Storage/storageAccounts";
    pub const RESOURCE_GROUP: &str = "Microsoft.Resources/resourceGroups";
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const VM: &str = "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/vm-web-01";

    #[test]
    fn parses_a_vm_id_with_accessors() {
        let id = ResourceId::parse(VM).unwrap();
        assert_eq!(id.subscription_id(), "11111111-1111-1111-1111-111111111111");
        assert_eq!(id.resource_group(), Some("rg-app"));
        assert_eq!(id.namespace(), Some("Microsoft.Compute"));
        assert_eq!(id.name(), "vm-web-01");
        assert_eq!(id.resource_type(), "Microsoft.Compute/virtualMachines");
        assert!(id.is_type("microsoft.compute/VIRTUALMACHINES"));
        assert_eq!(id.to_string(), VM);
    }

    #[test]
    fn parses_child_resources_and_scopes() {
        let ext =
            ResourceId::parse(&format!("{VM}/extensions/AzureDiskEncryptionForLinux")).unwrap();
        assert_eq!(
            ext.resource_type(),
            "Microsoft.Compute/virtualMachines/extensions"
        );
        assert_eq!(ext.name(), "AzureDiskEncryptionForLinux");
        let rg = ResourceId::parse("/subscriptions/s1/resourceGroups/rg-x").unwrap();
        assert!(rg.is_resource_group());
        assert_eq!(rg.name(), "rg-x");
        assert_eq!(rg.resource_type(), types::RESOURCE_GROUP);
        let sub = ResourceId::parse("/subscriptions/s1").unwrap();
        assert!(sub.is_subscription());
        assert_eq!(sub.name(), "s1");
        let sub_level = ResourceId::parse(
            "/subscriptions/s1/providers/Microsoft.RecoveryServices/locations/westeurope",
        )
        .unwrap();
        assert_eq!(sub_level.resource_group(), None);
        assert_eq!(sub_level.name(), "westeurope");
    }

    #[test]
    fn keyword_case_is_accepted_and_display_is_canonical() {
        let id = ResourceId::parse(
            "/SUBSCRIPTIONS/s1/resourcegroups/RG/PROVIDERS/Microsoft.KeyVault/vaults/kv",
        )
        .unwrap();
        assert_eq!(
            id.to_string(),
            "/subscriptions/s1/resourceGroups/RG/providers/Microsoft.KeyVault/vaults/kv"
        );
    }

    #[test]
    fn equality_and_hash_ignore_case() {
        let a = ResourceId::parse(VM).unwrap();
        let b = ResourceId::parse(&VM.to_uppercase()).unwrap();
        assert_eq!(a, b);
        let set: HashSet<_> = [a, b].into_iter().collect();
        assert_eq!(set.len(), 1);
        let other = ResourceId::parse(&VM.replace("vm-web-01", "vm-web-02")).unwrap();
        assert_ne!(ResourceId::parse(VM).unwrap(), other);
    }

    #[test]
    fn errors_name_the_part() {
        let cases = [
            ("subscriptions/s1", "start"),
            ("/tenants/t1", "subscriptions keyword"),
            ("/subscriptions", "subscription id"),
            ("/subscriptions/s1/resourceGroups", "resource group name"),
            ("/subscriptions/s1/resourceGroups/rg/providers", "provider namespace"),
            ("/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Compute", "resource type"),
            (
                "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines",
                "resource name",
            ),
            ("/subscriptions/s1/resourceGroups/rg/things/x", "providers keyword"),
            ("/subscriptions/s1//resourceGroups/rg", "segment"),
            ("/subscriptions/s1/resourceGroups/rg/", "segment"),
            (
                "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv/providers/Microsoft.Authorization/roleAssignments/x",
                "extension resource",
            ),
        ];
        for (input, part) in cases {
            match ResourceId::parse(input) {
                Err(ResourceIdError::Invalid { part: got, .. }) => assert_eq!(got, part, "{input}"),
                other => panic!("{input}: expected error naming {part}, got {other:?}"),
            }
        }
    }

    #[test]
    fn scope_containment() {
        let vm = ResourceId::parse(VM).unwrap();
        let rg = vm.resource_group_scope().unwrap();
        let sub = ResourceId::subscription("11111111-1111-1111-1111-111111111111");
        assert!(vm.is_within(&vm));
        assert!(vm.is_within(&rg));
        assert!(vm.is_within(&sub));
        assert!(rg.is_within(&sub));
        assert!(!rg.is_within(&vm));
        assert!(!sub.is_within(&rg));
        assert!(vm.is_within(&ResourceId::resource_group_id(
            "11111111-1111-1111-1111-111111111111",
            "RG-APP"
        )));
        assert!(!vm.is_within(&ResourceId::resource_group_id(
            "11111111-1111-1111-1111-111111111111",
            "rg-other"
        )));
        assert!(!vm.is_within(&ResourceId::subscription(
            "22222222-2222-2222-2222-222222222222"
        )));
        let ext = vm.child("extensions", "x").unwrap();
        assert!(ext.is_within(&vm));
        let other_vm = ResourceId::parse(&VM.replace("vm-web-01", "vm-web-011")).unwrap();
        assert!(!other_vm.is_within(&vm));
    }

    #[test]
    fn builders_and_type_expectations() {
        let vault =
            ResourceId::resource("s1", "rg-backup", types::RECOVERY_SERVICES_VAULT, "rsv").unwrap();
        assert_eq!(
            vault.child("backupPolicies", "DefaultPolicy").unwrap().to_string(),
            "/subscriptions/s1/resourceGroups/rg-backup/providers/Microsoft.RecoveryServices/vaults/rsv/backupPolicies/DefaultPolicy"
        );
        assert!(vault.expect_type(types::RECOVERY_SERVICES_VAULT).is_ok());
        let err = vault.expect_type(types::KEY_VAULT).unwrap_err();
        assert!(
            err.to_string().contains("Microsoft.KeyVault/vaults"),
            "{err}"
        );
        assert!(ResourceId::resource("s1", "rg", types::KEY_VAULT, "").is_err());
    }

    #[test]
    fn serde_as_string() {
        let id = ResourceId::parse(VM).unwrap();
        let json = serde_json::to_value(&id).unwrap();
        assert_eq!(json, serde_json::json!(VM));
        assert_eq!(serde_json::from_value::<ResourceId>(json).unwrap(), id);
        assert!(serde_json::from_value::<ResourceId>(serde_json::json!("/nope")).is_err());
    }
}
