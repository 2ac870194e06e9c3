//! The app settings the workflow reads (Functions app settings arrive as environment variables).
//! Every name is a `pub const`, so infrastructure and the local host can set them and tests can
//! check that infra sets every one.

use crate::domain::ResourceId;
use std::time::Duration;

/// Comma-separated subscription ids the sweeps cover.
pub const SUBSCRIPTIONS: &str = "VMBACKUP_SUBSCRIPTIONS";
/// NCRONTAB schedule of the discovery sweep (the function.json names it as `%…%`).
pub const DISCOVERY_SCHEDULE: &str = "VMBACKUP_DISCOVERY_SCHEDULE";
/// NCRONTAB schedule of the backup sweep.
pub const BACKUP_SCHEDULE: &str = "VMBACKUP_BACKUP_SCHEDULE";
/// Object id of the "Backup Management Service" service principal in this tenant
/// (`az ad sp list --display-name "Backup Management Service" --query "[].id" -o tsv`).
pub const BACKUP_MANAGEMENT_SERVICE_OBJECT_ID: &str =
    "VMBACKUP_BACKUP_MANAGEMENT_SERVICE_OBJECT_ID";
/// Role definition id of the least-privilege custom role holding Azure Backup's Key Vault data actions.
pub const KEY_VAULT_BACKUP_ROLE_ID: &str = "VMBACKUP_KEY_VAULT_BACKUP_ROLE_ID";
/// `custom` (default) or `administrator`: which role RBAC key vaults get for Azure Backup.
pub const KEY_VAULT_ROLE: &str = "VMBACKUP_KEY_VAULT_ROLE";
/// Retention of on-demand backups when a VM has no `backup-retain-days` tag.
pub const DEFAULT_RETENTION_DAYS: &str = "VMBACKUP_DEFAULT_RETENTION_DAYS";
/// Comma-separated ARM ids (subscriptions or resource groups) the app may act on; empty = the subscriptions.
pub const ALLOWED_SCOPES: &str = "VMBACKUP_ALLOWED_SCOPES";
/// Optional URL that notify POSTs every rejection and failure to.
pub const NOTIFY_WEBHOOK: &str = "VMBACKUP_NOTIFY_WEBHOOK";
/// Comma-separated ARM ids of the storage accounts restores stage through when a request names none;
/// a restore takes the one in its vault's region (Azure Backup stages there; none may be
/// zone-redundant). A single account is used without looking at its region.
pub const STAGING_STORAGE_ACCOUNT: &str = "VMBACKUP_STAGING_STORAGE_ACCOUNT";

pub const DEFAULT_DISCOVERY_SCHEDULE: &str = "0 0 * * * *";
pub const DEFAULT_BACKUP_SCHEDULE: &str = "0 0 2 * * *";

/// Every setting the workflow reads, with its default (empty = none).
pub const ALL: [(&str, &str); 10] = [
    (SUBSCRIPTIONS, ""),
    (DISCOVERY_SCHEDULE, DEFAULT_DISCOVERY_SCHEDULE),
    (BACKUP_SCHEDULE, DEFAULT_BACKUP_SCHEDULE),
    (BACKUP_MANAGEMENT_SERVICE_OBJECT_ID, ""),
    (KEY_VAULT_BACKUP_ROLE_ID, ""),
    (KEY_VAULT_ROLE, "custom"),
    (DEFAULT_RETENTION_DAYS, "30"),
    (ALLOWED_SCOPES, ""),
    (NOTIFY_WEBHOOK, ""),
    (STAGING_STORAGE_ACCOUNT, ""),
];

/// A setting that cannot be used, named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("app setting {name}: {message}")]
pub struct SettingError {
    pub name: &'static str,
    pub message: String,
}

/// Which role an RBAC key vault gets for Azure Backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyVaultRole {
    /// The custom role with Backup's five data actions (least privilege).
    Custom(Option<String>),
    /// Built-in Key Vault Administrator (only when configured so).
    Administrator,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub subscriptions: Vec<String>,
    pub backup_management_service_object_id: Option<String>,
    pub key_vault_role: KeyVaultRole,
    pub default_retention_days: u32,
    pub allowed_scopes: Vec<ResourceId>,
    pub notify_webhook: Option<url::Url>,
    /// Staging storage accounts of restores that name none (one per vault region).
    pub staging_storage_accounts: Vec<ResourceId>,
    /// How long a running VM's agent is waited for before `VmAgentNotReady`.
    pub agent_recheck_delay: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            subscriptions: Vec::new(),
            backup_management_service_object_id: None,
            key_vault_role: KeyVaultRole::Custom(None),
            default_retention_days: 30,
            allowed_scopes: Vec::new(),
            notify_webhook: None,
            staging_storage_accounts: Vec::new(),
            agent_recheck_delay: Duration::from_secs(300),
        }
    }
}

fn list(value: Option<String>) -> Vec<String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl Settings {
    pub fn from_env() -> Result<Self, SettingError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SettingError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let default_retention_days = match get(DEFAULT_RETENTION_DAYS) {
            None => 30,
            Some(text) => text
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|d| (1..=36_135).contains(d))
                .ok_or_else(|| SettingError {
                    name: DEFAULT_RETENTION_DAYS,
                    message: format!(
                        "must be a whole number of days from 1 to 36135, got {text:?}"
                    ),
                })?,
        };
        let key_vault_role = match get(KEY_VAULT_ROLE).as_deref().map(str::trim) {
            None | Some("custom") => KeyVaultRole::Custom(get(KEY_VAULT_BACKUP_ROLE_ID)),
            Some("administrator") => KeyVaultRole::Administrator,
            Some(other) => {
                return Err(SettingError {
                    name: KEY_VAULT_ROLE,
                    message: format!("must be custom or administrator, got {other:?}"),
                })
            }
        };
        let allowed_scopes = list(get(ALLOWED_SCOPES))
            .into_iter()
            .map(|scope| {
                ResourceId::parse(&scope).map_err(|e| SettingError {
                    name: ALLOWED_SCOPES,
                    message: format!("{scope:?} is not an ARM id: {e}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let notify_webhook = get(NOTIFY_WEBHOOK)
            .map(|text| {
                url::Url::parse(text.trim()).map_err(|e| SettingError {
                    name: NOTIFY_WEBHOOK,
                    message: format!("must be an absolute URL: {e}"),
                })
            })
            .transpose()?;
        let staging_storage_accounts = list(get(STAGING_STORAGE_ACCOUNT))
            .iter()
            .map(|text| {
                ResourceId::parse(text)
                    .map_err(|e| e.to_string())
                    .and_then(|id| {
                        id.expect_type(crate::domain::resource_id::types::STORAGE_ACCOUNT)
                            .map_err(|e| e.to_string())?;
                        Ok(id)
                    })
                    .map_err(|message| SettingError {
                        name: STAGING_STORAGE_ACCOUNT,
                        message,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Settings {
            subscriptions: list(get(SUBSCRIPTIONS)),
            staging_storage_accounts,
            backup_management_service_object_id: get(BACKUP_MANAGEMENT_SERVICE_OBJECT_ID),
            key_vault_role,
            default_retention_days,
            allowed_scopes,
            notify_webhook,
            ..Settings::default()
        })
    }

    /// The scopes restores and protection may act on: the configured ones, else the subscriptions.
    pub fn effective_scopes(&self) -> Vec<ResourceId> {
        if !self.allowed_scopes.is_empty() {
            return self.allowed_scopes.clone();
        }
        self.subscriptions
            .iter()
            .filter_map(|s| ResourceId::parse(&format!("/subscriptions/{s}")).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        assert_eq!(Settings::from_lookup(|_| None), Ok(Settings::default()));
    }

    #[test]
    fn lists_scopes_and_roles_parse() {
        let settings = Settings::from_lookup(lookup(&[
            (
                SUBSCRIPTIONS,
                "11111111-1111-1111-1111-111111111111, 22222222-2222-2222-2222-222222222222",
            ),
            (KEY_VAULT_ROLE, "administrator"),
            (DEFAULT_RETENTION_DAYS, "14"),
        ]))
        .unwrap();
        assert_eq!(settings.subscriptions.len(), 2);
        assert_eq!(settings.key_vault_role, KeyVaultRole::Administrator);
        assert_eq!(settings.default_retention_days, 14);
        assert_eq!(settings.effective_scopes().len(), 2);
        let staging = Settings::from_lookup(lookup(&[(
            STAGING_STORAGE_ACCOUNT,
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/stweu, /subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/stneu",
        )]))
        .unwrap();
        let names: Vec<&str> = staging
            .staging_storage_accounts
            .iter()
            .map(|id| id.name())
            .collect();
        assert_eq!(names, ["stweu", "stneu"]);
    }

    #[test]
    fn errors_name_the_setting() {
        for (name, value) in [
            (DEFAULT_RETENTION_DAYS, "forever"),
            (KEY_VAULT_ROLE, "owner"),
            (ALLOWED_SCOPES, "rg-app"),
            (NOTIFY_WEBHOOK, "not a url"),
            (
                STAGING_STORAGE_ACCOUNT,
                "/subscriptions/s/resourceGroups/rg",
            ),
        ] {
            let err = Settings::from_lookup(lookup(&[(name, value)])).unwrap_err();
            assert_eq!(err.name, name);
        }
    }
}
