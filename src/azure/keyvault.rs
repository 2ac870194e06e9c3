//! Key Vault: the management plane (vault, access policies), role assignments, and the data plane
//! (key and secret metadata, backup and restore) at each vault's own `vaultUri`.
//!
//! The data plane is called over REST through the same pipeline rather than with the
//! `azure_security_keyvault_*` crates: one retry/429/redaction path for every call, no second HTTP
//! stack to build, and the vault URL taken exactly from `vaultUri` (the simulator serves it on loopback).

use super::error::AzureError;
use super::pipeline::{ApiRequest, ArmClient, Audience};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use url::Url;

/// Key Vault management plane.
pub const KEYVAULT_API_VERSION: &str = "2026-02-01";
/// Key Vault data plane (GA 7.x; the version of the shared GetKey example).
pub const KEYVAULT_DATA_API_VERSION: &str = "7.6";
/// Role assignments.
pub const AUTHORIZATION_API_VERSION: &str = "2026-08-01";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KeyVault {
    pub id: String,
    pub name: String,
    pub location: String,
    pub properties: KeyVaultProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KeyVaultProperties {
    pub tenant_id: Option<String>,
    pub vault_uri: Option<String>,
    pub enabled_for_disk_encryption: Option<bool>,
    /// Absent means access policies (the examples omit it).
    pub enable_rbac_authorization: Option<bool>,
    pub enable_soft_delete: Option<bool>,
    pub access_policies: Vec<AccessPolicyEntry>,
}

impl KeyVault {
    pub fn uses_rbac(&self) -> bool {
        self.properties.enable_rbac_authorization == Some(true)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicyEntry {
    pub tenant_id: String,
    pub object_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_id: Option<String>,
    #[serde(default)]
    pub permissions: Permissions,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Permissions {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessPolicyOperation {
    Add,
    Replace,
    Remove,
}

impl AccessPolicyOperation {
    fn path_segment(self) -> &'static str {
        match self {
            AccessPolicyOperation::Add => "add",
            AccessPolicyOperation::Replace => "replace",
            AccessPolicyOperation::Remove => "remove",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct AccessPoliciesResult {
    pub id: Option<String>,
    pub properties: AccessPoliciesProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct AccessPoliciesProperties {
    pub access_policies: Vec<AccessPolicyEntry>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RoleAssignment {
    pub id: String,
    pub name: String,
    pub properties: RoleAssignmentProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RoleAssignmentProperties {
    pub principal_id: Option<String>,
    pub principal_type: Option<String>,
    pub role_definition_id: Option<String>,
    pub scope: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ObjectAttributes {
    pub enabled: Option<bool>,
    pub created: Option<i64>,
    pub updated: Option<i64>,
    pub exp: Option<i64>,
    #[serde(rename = "recoveryLevel")]
    pub recovery_level: Option<String>,
}

/// A key's metadata (the public JWK parts we use; no private material is ever returned).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct KeyProperties {
    pub key: JsonWebKeyInfo,
    pub attributes: ObjectAttributes,
    pub tags: BTreeMap<String, String>,
    /// True when the key belongs to a certificate (unsupported as an ADE KEK for backup).
    pub managed: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct JsonWebKeyInfo {
    pub kid: Option<String>,
    pub kty: Option<String>,
    pub key_ops: Vec<String>,
}

/// A secret's metadata. The value is deliberately not deserialized: it never enters our memory
/// beyond the response buffer.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SecretProperties {
    pub id: Option<String>,
    #[serde(rename = "contentType")]
    pub content_type: Option<String>,
    pub attributes: ObjectAttributes,
    pub tags: BTreeMap<String, String>,
    /// Set when the secret backs a certificate.
    pub kid: Option<String>,
    pub managed: Option<bool>,
}

/// An opaque Key Vault backup blob (base64url). Protected key material: `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct BackupBlob(pub String);

impl std::fmt::Debug for BackupBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackupBlob(<{} bytes redacted>)", self.0.len())
    }
}

/// A secret to write (a BEK restored from a recovery point's encryption info). `Debug` hides the value.
#[derive(Clone, PartialEq)]
pub struct NewSecret {
    pub value: String,
    pub content_type: Option<String>,
    pub tags: BTreeMap<String, String>,
}

impl std::fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecret")
            .field("content_type", &self.content_type)
            .field("tags", &self.tags)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct KeyVaultClient {
    arm: ArmClient,
}

impl KeyVaultClient {
    pub fn new(arm: ArmClient) -> Self {
        KeyVaultClient { arm }
    }

    pub async fn get_vault(&self, vault_id: &str) -> Result<KeyVault, AzureError> {
        self.arm
            .get_json(self.arm.arm_url(vault_id, KEYVAULT_API_VERSION)?)
            .await
    }

    /// Adds, replaces or removes access-policy entries (`add` merges permissions into an existing entry).
    pub async fn update_access_policies(
        &self,
        vault_id: &str,
        operation: AccessPolicyOperation,
        entries: &[AccessPolicyEntry],
    ) -> Result<AccessPoliciesResult, AzureError> {
        let url = self.arm.arm_url(
            &format!("{vault_id}/accessPolicies/{}", operation.path_segment()),
            KEYVAULT_API_VERSION,
        )?;
        let body = json!({ "properties": { "accessPolicies": entries } });
        self.arm
            .send(ApiRequest::arm(Method::PUT, url).json(body))
            .await?
            .json()
    }

    /// Assigns a role at a scope under a name derived from (scope, principal, role). An assignment of
    /// the same role to the same principal under another name (`RoleAssignmentExists`) counts as done.
    /// PUT the role assignment `name` (the caller derives it from scope, principal and role, so a
    /// redelivered grant PUTs the same resource again instead of creating a second one).
    pub async fn assign_role(
        &self,
        scope: &str,
        name: &str,
        principal_id: &str,
        principal_type: &str,
        role_definition_id: &str,
    ) -> Result<Option<RoleAssignment>, AzureError> {
        let url = self.arm.arm_url(
            &format!("{scope}/providers/Microsoft.Authorization/roleAssignments/{name}"),
            AUTHORIZATION_API_VERSION,
        )?;
        let body = json!({
            "properties": {
                "roleDefinitionId": role_definition_id,
                "principalId": principal_id,
                "principalType": principal_type,
            }
        });
        match self
            .arm
            .send(ApiRequest::arm(Method::PUT, url).json(body))
            .await
        {
            Ok(response) => response.json().map(Some),
            Err(e) if e.has_code("RoleAssignmentExists") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Role assignments of `principal_id` that apply at `scope` (assigned at it or above it).
    pub async fn list_role_assignments(
        &self,
        scope: &str,
        principal_id: &str,
    ) -> Result<Vec<RoleAssignment>, AzureError> {
        let mut url = self.arm.arm_url(
            &format!("{scope}/providers/Microsoft.Authorization/roleAssignments"),
            AUTHORIZATION_API_VERSION,
        )?;
        url.query_pairs_mut()
            .append_pair("$filter", &format!("principalId eq '{principal_id}'"));
        self.arm.list_all(ApiRequest::arm(Method::GET, url)).await
    }

    fn data_url(&self, vault_uri: &str, path: &str) -> Result<Url, AzureError> {
        let base = Url::parse(vault_uri).map_err(|e| AzureError::InvalidInput {
            field: "vault_uri".into(),
            message: format!("{vault_uri:?}: {e}"),
        })?;
        super::pipeline::with_api_version(&base, path, KEYVAULT_DATA_API_VERSION)
    }

    async fn data_call(
        &self,
        method: Method,
        vault_uri: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<super::pipeline::ApiResponse, AzureError> {
        let mut request =
            ApiRequest::data_plane(method, self.data_url(vault_uri, path)?, Audience::KeyVault);
        request.body = body;
        self.arm.send(request).await
    }

    /// Metadata of a key (latest version when `version` is `None`).
    pub async fn get_key(
        &self,
        vault_uri: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<KeyProperties, AzureError> {
        let path = format!("keys/{name}/{}", version.unwrap_or(""));
        self.data_call(Method::GET, vault_uri, &path, None)
            .await?
            .json()
    }

    /// Metadata of a secret (content type, tags, attributes); the value is dropped unread.
    pub async fn get_secret_properties(
        &self,
        vault_uri: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<SecretProperties, AzureError> {
        let path = format!("secrets/{name}/{}", version.unwrap_or(""));
        self.data_call(Method::GET, vault_uri, &path, None)
            .await?
            .json()
    }

    pub async fn backup_key(&self, vault_uri: &str, name: &str) -> Result<BackupBlob, AzureError> {
        let response = self
            .data_call(
                Method::POST,
                vault_uri,
                &format!("keys/{name}/backup"),
                None,
            )
            .await?;
        blob(&response)
    }

    pub async fn restore_key(
        &self,
        vault_uri: &str,
        backup: &BackupBlob,
    ) -> Result<KeyProperties, AzureError> {
        self.data_call(
            Method::POST,
            vault_uri,
            "keys/restore",
            Some(json!({ "value": backup.0 })),
        )
        .await?
        .json()
    }

    pub async fn backup_secret(
        &self,
        vault_uri: &str,
        name: &str,
    ) -> Result<BackupBlob, AzureError> {
        let response = self
            .data_call(
                Method::POST,
                vault_uri,
                &format!("secrets/{name}/backup"),
                None,
            )
            .await?;
        blob(&response)
    }

    pub async fn restore_secret(
        &self,
        vault_uri: &str,
        backup: &BackupBlob,
    ) -> Result<SecretProperties, AzureError> {
        self.data_call(
            Method::POST,
            vault_uri,
            "secrets/restore",
            Some(json!({ "value": backup.0 })),
        )
        .await?
        .json()
    }

    /// Writes a new secret version (a wrapped BEK with its ADE tags).
    pub async fn set_secret(
        &self,
        vault_uri: &str,
        name: &str,
        secret: &NewSecret,
    ) -> Result<SecretProperties, AzureError> {
        let mut body = json!({ "value": secret.value, "tags": secret.tags });
        if let Some(content_type) = &secret.content_type {
            body["contentType"] = json!(content_type);
        }
        self.data_call(
            Method::PUT,
            vault_uri,
            &format!("secrets/{name}"),
            Some(body),
        )
        .await?
        .json()
    }
}

fn blob(response: &super::pipeline::ApiResponse) -> Result<BackupBlob, AzureError> {
    #[derive(Deserialize)]
    struct Blob {
        value: String,
    }
    response.json::<Blob>().map(|b| BackupBlob(b.value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_value_and_backup_blobs_stay_out_of_debug() {
        let props: SecretProperties = serde_json::from_str(
            r#"{"value":"supersecretvalue","id":"https://kv/secrets/s/1","contentType":"Wrapped BEK"}"#,
        )
        .unwrap();
        assert!(!format!("{props:?}").contains("supersecretvalue"));
        assert!(!format!("{:?}", BackupBlob("blobdata".into())).contains("blobdata"));
        let secret = NewSecret {
            value: "bekvalue".into(),
            content_type: None,
            tags: BTreeMap::new(),
        };
        assert!(!format!("{secret:?}").contains("bekvalue"));
    }
}
