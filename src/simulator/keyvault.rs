//! Microsoft.KeyVault: management (vault GET, access policies add/replace/remove) and the data plane at
//! each vault's `vaultUri` (GET key/secret, backup and restore of keys and secrets).

use super::http::{Reply, Request};
use super::state::{same, AccessPolicy, KeyVault, KvKey, KvSecret, SimState, TENANT_ID};
use axum::http::{Method, StatusCode};
use base64::Engine;
use serde_json::{json, Value};

const KV: &str = "subscriptions/{}/resourcegroups/{}/providers/microsoft.keyvault/vaults/{}";

fn render_vault(kv: &KeyVault, base_url: &str) -> Value {
    let policies: Vec<Value> = kv.access_policies.iter().map(|p| {
        let mut policy = json!({ "tenantId": p.tenant_id, "objectId": p.object_id,
            "permissions": { "keys": p.keys, "secrets": p.secrets, "certificates": p.certificates } });
        if let Some(app) = &p.application_id {
            policy["applicationId"] = json!(app);
        }
        policy
    }).collect();
    json!({
        "id": kv.id(), "name": kv.name, "type": "Microsoft.KeyVault/vaults", "location": kv.location, "tags": {},
        "properties": {
            "tenantId": TENANT_ID, "sku": { "family": "A", "name": "standard" }, "accessPolicies": policies,
            "enableRbacAuthorization": kv.rbac, "enabledForDeployment": false, "enabledForDiskEncryption": true,
            "enabledForTemplateDeployment": true, "enableSoftDelete": true, "softDeleteRetentionInDays": 90,
            "vaultUri": kv.vault_uri(base_url), "provisioningState": "Succeeded", "publicNetworkAccess": "Enabled"
        },
        "systemData": { "createdAt": super::http::rfc3339(kv.created), "createdBy": "simulator", "createdByType": "Application",
                        "lastModifiedAt": super::http::rfc3339(kv.created), "lastModifiedBy": "simulator", "lastModifiedByType": "Application" }
    })
}

fn forbidden(action: &str, scope: &str) -> Reply {
    Reply::arm_error(
        StatusCode::FORBIDDEN,
        "AuthorizationFailed",
        &format!("The client '{}' with object id '{}' does not have authorization to perform action '{action}' over scope '{scope}' or the scope is invalid. If access was recently granted, please refresh your credentials.", super::state::APP_PRINCIPAL_ID, super::state::APP_PRINCIPAL_ID),
    )
}

pub fn route_management(state: &mut SimState, req: &Request) -> Option<Reply> {
    if let Some(c) = req.route(Method::GET, KV) {
        return Some(match state.key_vault(&c[0], &c[1], &c[2]) {
            Some(kv) => Reply::ok(render_vault(kv, &state.base_url)),
            None => Reply::not_found("Microsoft.KeyVault/vaults", &c[2]),
        });
    }
    let c = req.route(Method::PUT, &format!("{KV}/accesspolicies/{{}}"))?;
    let base_url = state.base_url.clone();
    let Some(kv) = state.key_vaults.iter_mut().find(|k| {
        same(&k.subscription, &c[0]) && same(&k.resource_group, &c[1]) && same(&k.name, &c[2])
    }) else {
        return Some(Reply::not_found("Microsoft.KeyVault/vaults", &c[2]));
    };
    if !kv.app_can_manage_access {
        return Some(forbidden(
            "Microsoft.KeyVault/vaults/accessPolicies/write",
            &kv.id(),
        ));
    }
    let body = match req.json_body() {
        Ok(b) => b,
        Err(e) => return Some(e),
    };
    let Some(Value::Array(entries)) = body.pointer("/properties/accessPolicies") else {
        return Some(Reply::bad_request(
            "BadRequest",
            "properties.accessPolicies is required.",
        ));
    };
    let mut incoming = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let list = |kind: &str| -> Vec<String> {
            entry
                .pointer(&format!("/permissions/{kind}"))
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(|s| s.to_ascii_lowercase())
                        .collect()
                })
                .unwrap_or_default()
        };
        let Some(object_id) = entry.get("objectId").and_then(Value::as_str) else {
            return Some(Reply::bad_request(
                "BadRequest",
                &format!("properties.accessPolicies[{i}].objectId is required."),
            ));
        };
        incoming.push(AccessPolicy {
            tenant_id: entry
                .get("tenantId")
                .and_then(Value::as_str)
                .unwrap_or(TENANT_ID)
                .to_string(),
            object_id: object_id.to_string(),
            application_id: entry
                .get("applicationId")
                .and_then(Value::as_str)
                .map(String::from),
            keys: list("keys"),
            secrets: list("secrets"),
            certificates: list("certificates"),
        });
    }
    let operation = c[3].to_ascii_lowercase();
    for policy in incoming {
        let existing = kv.access_policies.iter_mut().find(|p| {
            same(&p.object_id, &policy.object_id) && p.application_id == policy.application_id
        });
        match (operation.as_str(), existing) {
            ("add", Some(p)) => {
                for (have, add) in [
                    (&mut p.keys, &policy.keys),
                    (&mut p.secrets, &policy.secrets),
                    (&mut p.certificates, &policy.certificates),
                ] {
                    for perm in add {
                        if !have.iter().any(|h| same(h, perm)) {
                            have.push(perm.clone());
                        }
                    }
                }
            }
            ("add", None) | ("replace", None) => kv.access_policies.push(policy),
            ("replace", Some(p)) => *p = policy,
            ("remove", Some(p)) => {
                for (have, remove) in [
                    (&mut p.keys, &policy.keys),
                    (&mut p.secrets, &policy.secrets),
                    (&mut p.certificates, &policy.certificates),
                ] {
                    have.retain(|h| !remove.iter().any(|r| same(r, h)));
                }
            }
            ("remove", None) => {}
            _ => {
                return Some(Reply::bad_request(
                    "BadRequest",
                    &format!("operationKind '{}' must be add, replace or remove.", c[3]),
                ))
            }
        }
    }
    kv.access_policies
        .retain(|p| !(p.keys.is_empty() && p.secrets.is_empty() && p.certificates.is_empty()));
    let vault = render_vault(kv, &base_url);
    Some(Reply::ok(json!({
        "id": format!("{}/accessPolicies/{}", kv.id(), operation), "name": operation,
        "type": "Microsoft.KeyVault/vaults/accessPolicies", "location": kv.location,
        "properties": { "accessPolicies": vault["properties"]["accessPolicies"] }
    })))
}

pub fn key_by_url(state: &SimState, url: &str) -> Option<KvKey> {
    object_by_url(state, url, "keys").and_then(|(kv, name, version)| {
        kv.keys
            .iter()
            .find(|k| same(&k.name, &name) && version.as_ref().is_none_or(|v| same(v, &k.version)))
            .cloned()
    })
}

pub fn secret_by_url(state: &SimState, url: &str) -> Option<KvSecret> {
    object_by_url(state, url, "secrets").and_then(|(kv, name, version)| {
        kv.secrets
            .iter()
            .find(|s| same(&s.name, &name) && version.as_ref().is_none_or(|v| same(v, &s.version)))
            .cloned()
    })
}

fn object_by_url<'a>(
    state: &'a SimState,
    url: &str,
    kind: &str,
) -> Option<(&'a KeyVault, String, Option<String>)> {
    state.key_vaults.iter().find_map(|kv| {
        let rest = url.strip_prefix(&format!("{}{kind}/", kv.vault_uri(&state.base_url)))?;
        let mut parts = rest.split('/');
        let name = parts.next()?.to_string();
        Some((
            kv,
            name,
            parts.next().filter(|v| !v.is_empty()).map(String::from),
        ))
    })
}

/// A Key Vault backup blob: opaque to clients, bound to the subscription of the vault it came from.
#[derive(serde::Serialize, serde::Deserialize)]
struct BackupBlob {
    kind: String,
    subscription: String,
    name: String,
    version: String,
    material: String,
    certificate_backed: bool,
    content_type: Option<String>,
    tags: std::collections::BTreeMap<String, String>,
}

fn encode_blob(blob: &BackupBlob) -> String {
    let text = serde_json::to_vec(blob).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

fn subscription_of(vault_id: &str) -> String {
    vault_id.split('/').nth(2).unwrap_or_default().to_string()
}

pub fn key_backup_blob(vault_id: &str, key: &KvKey) -> String {
    encode_blob(&BackupBlob {
        kind: "key".into(),
        subscription: subscription_of(vault_id),
        name: key.name.clone(),
        version: key.version.clone(),
        material: key.modulus.clone(),
        certificate_backed: key.certificate_backed,
        content_type: None,
        tags: key.tags.clone(),
    })
}

pub fn secret_backup_blob(vault_id: &str, secret: &KvSecret) -> String {
    encode_blob(&BackupBlob {
        kind: "secret".into(),
        subscription: subscription_of(vault_id),
        name: secret.name.clone(),
        version: secret.version.clone(),
        material: secret.value.clone(),
        certificate_backed: false,
        content_type: secret.content_type.clone(),
        tags: secret.tags.clone(),
    })
}

fn kv_error(status: StatusCode, code: &str, message: &str) -> Reply {
    Reply::arm_error(status, code, message)
}

fn render_key(uri: &str, key: &KvKey) -> Value {
    let mut body = json!({
        "key": { "kid": format!("{uri}keys/{}/{}", key.name, key.version), "kty": "RSA",
                 "key_ops": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"], "n": key.modulus, "e": "AQAB" },
        "attributes": { "enabled": true, "created": key.created.timestamp(), "updated": key.created.timestamp(),
                        "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90, "exportable": false },
        "tags": key.tags
    });
    if key.certificate_backed {
        // Keys behind certificates are managed by the certificate.
        body["managed"] = json!(true);
    }
    body
}

fn render_secret(uri: &str, secret: &KvSecret) -> Value {
    let mut body = json!({
        "value": secret.value, "id": format!("{uri}secrets/{}/{}", secret.name, secret.version),
        "attributes": { "enabled": true, "created": secret.created.timestamp(), "updated": secret.created.timestamp(),
                        "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90 },
        "tags": secret.tags
    });
    if let Some(ct) = &secret.content_type {
        body["contentType"] = json!(ct);
    }
    body
}

/// `{base}/keyvault/{vault}/keys|secrets/...` — the path below the vault is Key Vault's own.
pub fn route_data_plane(state: &mut SimState, req: &Request) -> Reply {
    let Some(vault_name) = req.segments.get(1).cloned() else {
        return kv_error(StatusCode::NOT_FOUND, "NotFound", "No vault in the URL.");
    };
    let base_url = state.base_url.clone();
    let Some(kv) = state
        .key_vaults
        .iter_mut()
        .find(|k| same(&k.name, &vault_name))
    else {
        return kv_error(
            StatusCode::NOT_FOUND,
            "VaultNotFound",
            &format!("Vault {vault_name} not found."),
        );
    };
    let uri = kv.vault_uri(&base_url);
    let vault_id = kv.id();
    let rest: Vec<String> = req.segments[2..].to_vec();
    let m = |method: Method, pattern: &str| {
        (req.method == method)
            .then(|| super::http::match_segments(pattern, &rest))
            .flatten()
    };
    let version_matches = |version: Option<&String>, actual: &str| {
        version.is_none_or(|v| v.is_empty() || same(v, actual))
    };
    if let Some(c) = m(Method::GET, "keys/{}").or_else(|| m(Method::GET, "keys/{}/{}")) {
        return match kv
            .keys
            .iter()
            .find(|k| same(&k.name, &c[0]) && version_matches(c.get(1), &k.version))
        {
            Some(key) => Reply::ok(render_key(&uri, key)),
            None => kv_error(
                StatusCode::NOT_FOUND,
                "KeyNotFound",
                &format!(
                    "A key with (name/id) {} was not found in this key vault.",
                    c[0]
                ),
            ),
        };
    }
    if let Some(c) = m(Method::GET, "secrets/{}").or_else(|| m(Method::GET, "secrets/{}/{}")) {
        return match kv
            .secrets
            .iter()
            .find(|s| same(&s.name, &c[0]) && version_matches(c.get(1), &s.version))
        {
            Some(secret) => Reply::ok(render_secret(&uri, secret)),
            None => kv_error(
                StatusCode::NOT_FOUND,
                "SecretNotFound",
                &format!(
                    "A secret with (name/id) {} was not found in this key vault.",
                    c[0]
                ),
            ),
        };
    }
    if let Some(c) = m(Method::POST, "keys/{}/backup") {
        return match kv.key(&c[0]) {
            Some(key) => Reply::ok(json!({ "value": key_backup_blob(&vault_id, key) })),
            None => kv_error(
                StatusCode::NOT_FOUND,
                "KeyNotFound",
                &format!(
                    "A key with (name/id) {} was not found in this key vault.",
                    c[0]
                ),
            ),
        };
    }
    if let Some(c) = m(Method::POST, "secrets/{}/backup") {
        return match kv.secret(&c[0]) {
            Some(secret) => Reply::ok(json!({ "value": secret_backup_blob(&vault_id, secret) })),
            None => kv_error(
                StatusCode::NOT_FOUND,
                "SecretNotFound",
                &format!(
                    "A secret with (name/id) {} was not found in this key vault.",
                    c[0]
                ),
            ),
        };
    }
    let restoring_key = m(Method::POST, "keys/restore").is_some();
    if restoring_key || m(Method::POST, "secrets/restore").is_some() {
        let body = match req.json_body() {
            Ok(b) => b,
            Err(e) => return e,
        };
        let decoded = body
            .get("value")
            .and_then(Value::as_str)
            .and_then(|v| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(v.trim_end_matches('='))
                    .ok()
            })
            .and_then(|bytes| serde_json::from_slice::<BackupBlob>(&bytes).ok());
        let Some(blob) = decoded.filter(|b| b.kind == if restoring_key { "key" } else { "secret" })
        else {
            return kv_error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                "Backup blob contains invalid or corrupt version.",
            );
        };
        if !same(&blob.subscription, &kv.subscription) {
            return kv_error(StatusCode::BAD_REQUEST, "BadParameter", "Cannot decrypt backup blob: a backup can be restored only into a vault in the same subscription and geography.");
        }
        let exists = if restoring_key {
            kv.key(&blob.name).is_some()
        } else {
            kv.secret(&blob.name).is_some()
        };
        if exists {
            return kv_error(
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "{} {} already exists.",
                    if restoring_key { "Key" } else { "Secret" },
                    blob.name
                ),
            );
        }
        let now = req.now;
        return if restoring_key {
            let key = KvKey {
                name: blob.name,
                version: blob.version,
                certificate_backed: blob.certificate_backed,
                modulus: blob.material,
                tags: blob.tags,
                created: now,
            };
            let rendered = render_key(&uri, &key);
            kv.keys.push(key);
            Reply::ok(rendered)
        } else {
            let secret = KvSecret {
                name: blob.name,
                version: blob.version,
                value: blob.material,
                content_type: blob.content_type,
                tags: blob.tags,
                created: now,
            };
            let rendered = render_secret(&uri, &secret);
            kv.secrets.push(secret);
            Reply::ok(rendered)
        };
    }
    if let Some(c) = m(Method::PUT, "secrets/{}") {
        let body = match req.json_body() {
            Ok(b) => b,
            Err(e) => return e,
        };
        let Some(value) = body.get("value").and_then(Value::as_str) else {
            return kv_error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                "The parameter 'value' is required.",
            );
        };
        let mut secret = super::state::new_secret(
            &c[0],
            body.get("contentType")
                .and_then(Value::as_str)
                .map(String::from),
            req.now,
        );
        secret.value = value.to_string();
        if let Some(Value::Object(tags)) = body.get("tags") {
            secret.tags = tags
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
        }
        let rendered = render_secret(&uri, &secret);
        kv.secrets.retain(|s| !same(&s.name, &c[0]));
        kv.secrets.push(secret);
        return Reply::ok(rendered);
    }
    kv_error(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!(
            "The simulator serves no Key Vault operation {} {}.",
            req.method,
            rest.join("/")
        ),
    )
}
