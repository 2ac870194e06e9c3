//! Classify a VM's encryption from facts the workflow reads off the VM, its disks and its extensions.
//!
//! Precedence when several apply: ADE, then CMK (disk encryption set), then encryption at host, then
//! PMK. ADE wins because it is the only kind that needs an action (Key Vault access) before protection;
//! CMK wins over host because the assessment records the DES. There is no `none`: Azure encrypts every
//! managed disk at rest with platform keys, so a VM without other facts is `pmk`. The report's `none`
//! is for VMs whose encryption was never assessed.

use crate::domain::resource_id::{types, ResourceId, ResourceIdError};
use serde::{Deserialize, Serialize};

/// Publisher of the ADE VM extensions.
pub const ADE_EXTENSION_PUBLISHER: &str = "Microsoft.Azure.Security";
/// ADE extension type on Linux.
pub const ADE_EXTENSION_TYPE_LINUX: &str = "AzureDiskEncryptionForLinux";
/// ADE extension type on Windows.
pub const ADE_EXTENSION_TYPE_WINDOWS: &str = "AzureDiskEncryption";

/// Whether an extension (publisher, type) is Azure Disk Encryption. ARM compares these case-insensitively.
pub fn is_ade_extension(publisher: &str, extension_type: &str) -> bool {
    publisher.eq_ignore_ascii_case(ADE_EXTENSION_PUBLISHER)
        && (extension_type.eq_ignore_ascii_case(ADE_EXTENSION_TYPE_LINUX)
            || extension_type.eq_ignore_ascii_case(ADE_EXTENSION_TYPE_WINDOWS))
}

/// A disk's `encryptionSettingsCollection` (ADE) as read from the VM's `storageProfile` or the disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdeDiskSettingsFacts {
    pub enabled: bool,
    /// `diskEncryptionKey.secretUrl`.
    pub secret_url: Option<String>,
    /// `diskEncryptionKey.sourceVault.id`.
    pub secret_vault_id: Option<String>,
    /// `keyEncryptionKey.keyUrl`.
    pub key_url: Option<String>,
    /// `keyEncryptionKey.sourceVault.id`.
    pub key_vault_id: Option<String>,
}

/// What one disk tells about its encryption.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskEncryptionFacts {
    pub ade: Option<AdeDiskSettingsFacts>,
    /// `managedDisk.diskEncryptionSet.id` (or the disk's `encryption.diskEncryptionSetId`).
    pub disk_encryption_set_id: Option<String>,
}

/// Public settings of an installed ADE extension.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdeExtensionFacts {
    /// `KeyVaultURL`.
    pub key_vault_url: Option<String>,
    /// `KeyVaultResourceId`.
    pub key_vault_resource_id: Option<String>,
    /// `KeyEncryptionKeyURL`.
    pub key_encryption_key_url: Option<String>,
    /// `KekVaultResourceId`.
    pub kek_vault_resource_id: Option<String>,
}

/// Everything the classification reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmEncryptionFacts {
    pub os_disk: DiskEncryptionFacts,
    pub data_disks: Vec<DiskEncryptionFacts>,
    pub ade_extension: Option<AdeExtensionFacts>,
    /// `securityProfile.encryptionAtHost`.
    pub encryption_at_host: bool,
}

/// A key encryption key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Kek {
    pub key_vault: ResourceId,
    /// Versioned key URL, e.g. `https://kv.vault.azure.net/keys/kek-1/<version>`.
    pub key_url: String,
}

/// The keys of an ADE VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdeKeys {
    /// The vault holding the BEK secret.
    pub key_vault: ResourceId,
    /// The vault's URI (`https://kv.vault.azure.net/`), from the extension or the secret URL's origin.
    pub key_vault_url: Option<String>,
    /// The BEK secret URL; unknown when only the extension has reported yet.
    pub secret_url: Option<String>,
    pub kek: Option<Kek>,
}

/// The kind of encryption; serialized with a `kind` tag (`pmk` | `cmk` | `host` | `ade`).
///
/// ADE is one variant with an optional KEK rather than two: everything else is shared, and
/// [`EncryptionKind::report_name`] still tells `ade-bek` from `ade-kek`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EncryptionKind {
    Pmk,
    Cmk {
        #[serde(rename = "diskEncryptionSet")]
        disk_encryption_set: ResourceId,
    },
    Host,
    Ade(AdeKeys),
}

impl EncryptionKind {
    /// The report's name: `pmk` | `cmk` | `host` | `ade-bek` | `ade-kek`.
    pub fn report_name(&self) -> &'static str {
        match self {
            EncryptionKind::Pmk => "pmk",
            EncryptionKind::Cmk { .. } => "cmk",
            EncryptionKind::Host => "host",
            EncryptionKind::Ade(AdeKeys { kek: None, .. }) => "ade-bek",
            EncryptionKind::Ade(AdeKeys { kek: Some(_), .. }) => "ade-kek",
        }
    }

    pub fn is_ade(&self) -> bool {
        matches!(self, EncryptionKind::Ade(_))
    }

    pub fn ade_keys(&self) -> Option<&AdeKeys> {
        match self {
            EncryptionKind::Ade(keys) => Some(keys),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncryptionFactsError {
    #[error("{field}: {source}")]
    BadId {
        field: String,
        #[source]
        source: ResourceIdError,
    },
    #[error(
        "{field}: is missing (ADE is enabled but the fact that names its key vault is absent)"
    )]
    Missing { field: String },
    #[error("{field}: {value:?} is not an http(s) URL")]
    BadUrl { field: String, value: String },
}

fn parse_id(
    field: &str,
    value: &str,
    expected_type: &str,
) -> Result<ResourceId, EncryptionFactsError> {
    let bad = |source| EncryptionFactsError::BadId {
        field: field.to_string(),
        source,
    };
    let id = ResourceId::parse(value).map_err(bad)?;
    id.expect_type(expected_type).map_err(bad)?;
    Ok(id)
}

/// `(vault URI, name, version)` of a Key Vault object URL `{vault URI}{kind}/{name}[/{version}]`,
/// `kind` being `keys` or `secrets`. The vault URI keeps any path before `kind` (with its trailing
/// slash): Azure's is the origin, a local simulator's may be path-based.
pub fn split_object_url(url: &str, kind: &str) -> Option<(String, String, Option<String>)> {
    let parsed = url::Url::parse(url).ok()?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return None;
    }
    let segments: Vec<&str> = parsed.path_segments()?.collect();
    let at = segments.iter().rposition(|s| *s == kind)?;
    let name = segments.get(at + 1).filter(|n| !n.is_empty())?.to_string();
    let version = segments
        .get(at + 2)
        .filter(|v| !v.is_empty())
        .map(|v| v.to_string());
    if segments.len() > at + 3 {
        return None;
    }
    let mut vault = parsed.clone();
    vault.set_query(None);
    vault.set_fragment(None);
    let prefix: String = segments[..at].iter().map(|s| format!("{s}/")).collect();
    vault.set_path(&format!("/{prefix}"));
    Some((vault.to_string(), name, version))
}

/// The vault URI (with its trailing slash, as ADE's `KeyVaultURL` wants it) of a Key Vault object URL
/// or of a vault URI itself. Azure's is the origin; a local endpoint's may carry a path, which is
/// kept. `http` is accepted because the local simulator serves its key vaults on loopback without TLS.
pub fn key_vault_url_of(url: &str) -> Option<String> {
    if let Some((vault, _, _)) =
        split_object_url(url, "secrets").or_else(|| split_object_url(url, "keys"))
    {
        return Some(vault);
    }
    let mut vault = url::Url::parse(url).ok()?;
    if !matches!(vault.scheme(), "http" | "https") || vault.host_str().is_none() {
        return None;
    }
    vault.set_query(None);
    vault.set_fragment(None);
    if !vault.path().ends_with('/') {
        let path = format!("{}/", vault.path());
        vault.set_path(&path);
    }
    Some(vault.to_string())
}

fn check_url(field: &str, value: &str) -> Result<(), EncryptionFactsError> {
    key_vault_url_of(value)
        .map(|_| ())
        .ok_or_else(|| EncryptionFactsError::BadUrl {
            field: field.to_string(),
            value: value.to_string(),
        })
}

fn ade_from_disk(field: &str, s: &AdeDiskSettingsFacts) -> Result<AdeKeys, EncryptionFactsError> {
    let vault_field = format!("{field}.diskEncryptionKey.sourceVault.id");
    let vault_id = s
        .secret_vault_id
        .as_deref()
        .ok_or_else(|| EncryptionFactsError::Missing {
            field: vault_field.clone(),
        })?;
    let key_vault = parse_id(&vault_field, vault_id, types::KEY_VAULT)?;
    if let Some(secret_url) = &s.secret_url {
        check_url(&format!("{field}.diskEncryptionKey.secretUrl"), secret_url)?;
    }
    let kek = match &s.key_url {
        None => None,
        Some(key_url) => {
            check_url(&format!("{field}.keyEncryptionKey.keyUrl"), key_url)?;
            let kek_field = format!("{field}.keyEncryptionKey.sourceVault.id");
            // A KEK without its own vault id lives in the BEK's vault.
            let kek_vault = match &s.key_vault_id {
                Some(id) => parse_id(&kek_field, id, types::KEY_VAULT)?,
                None => key_vault.clone(),
            };
            Some(Kek {
                key_vault: kek_vault,
                key_url: key_url.clone(),
            })
        }
    };
    Ok(AdeKeys {
        key_vault_url: s.secret_url.as_deref().and_then(key_vault_url_of),
        key_vault,
        secret_url: s.secret_url.clone(),
        kek,
    })
}

fn ade_from_extension(e: &AdeExtensionFacts) -> Result<AdeKeys, EncryptionFactsError> {
    let vault_id =
        e.key_vault_resource_id
            .as_deref()
            .ok_or_else(|| EncryptionFactsError::Missing {
                field: "adeExtension.KeyVaultResourceId".to_string(),
            })?;
    let key_vault = parse_id(
        "adeExtension.KeyVaultResourceId",
        vault_id,
        types::KEY_VAULT,
    )?;
    if let Some(url) = &e.key_vault_url {
        check_url("adeExtension.KeyVaultURL", url)?;
    }
    let kek = match &e.key_encryption_key_url {
        None => None,
        Some(key_url) => {
            check_url("adeExtension.KeyEncryptionKeyURL", key_url)?;
            let kek_vault = match &e.kek_vault_resource_id {
                Some(id) => parse_id("adeExtension.KekVaultResourceId", id, types::KEY_VAULT)?,
                None => key_vault.clone(),
            };
            Some(Kek {
                key_vault: kek_vault,
                key_url: key_url.clone(),
            })
        }
    };
    Ok(AdeKeys {
        key_vault,
        key_vault_url: e.key_vault_url.as_deref().and_then(key_vault_url_of),
        secret_url: None,
        kek,
    })
}

/// Classify a VM's encryption. Disk settings are preferred over the extension's (they name the secret);
/// the OS disk over data disks. Facts that claim ADE but cannot name a key vault are an error, not `pmk`.
pub fn classify(facts: &VmEncryptionFacts) -> Result<EncryptionKind, EncryptionFactsError> {
    let disks = std::iter::once(("osDisk".to_string(), &facts.os_disk)).chain(
        facts
            .data_disks
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("dataDisks[{i}]"), d)),
    );
    let mut first_des: Option<(String, &str)> = None;
    for (field, disk) in disks {
        if let Some(ade) = disk.ade.as_ref().filter(|a| a.enabled) {
            let mut keys = ade_from_disk(&format!("{field}.encryptionSettings"), ade)?;
            if let Some(ext) = &facts.ade_extension {
                if keys.key_vault_url.is_none() {
                    keys.key_vault_url = ext.key_vault_url.as_deref().and_then(key_vault_url_of);
                }
            }
            return Ok(EncryptionKind::Ade(keys));
        }
        if first_des.is_none() {
            if let Some(des) = &disk.disk_encryption_set_id {
                first_des = Some((format!("{field}.managedDisk.diskEncryptionSet.id"), des));
            }
        }
    }
    if let Some(ext) = &facts.ade_extension {
        return Ok(EncryptionKind::Ade(ade_from_extension(ext)?));
    }
    if let Some((field, des)) = first_des {
        return Ok(EncryptionKind::Cmk {
            disk_encryption_set: parse_id(&field, des, types::DISK_ENCRYPTION_SET)?,
        });
    }
    if facts.encryption_at_host {
        return Ok(EncryptionKind::Host);
    }
    Ok(EncryptionKind::Pmk)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const KV: &str =
        "/subscriptions/s1/resourceGroups/rg-sec/providers/Microsoft.KeyVault/vaults/kv-ade-weu";
    pub const KV2: &str =
        "/subscriptions/s1/resourceGroups/rg-sec/providers/Microsoft.KeyVault/vaults/kv-kek-weu";
    pub const SECRET: &str =
        "https://kv-ade-weu.vault.azure.net/secrets/bek-web-01/0123456789abcdef";
    pub const KEY: &str = "https://kv-ade-weu.vault.azure.net/keys/kek-1/fedcba9876543210";
    const DES: &str = "/subscriptions/s1/resourceGroups/rg-sec/providers/Microsoft.Compute/diskEncryptionSets/des-weu";

    pub fn ade_disk(kek: bool) -> DiskEncryptionFacts {
        DiskEncryptionFacts {
            ade: Some(AdeDiskSettingsFacts {
                enabled: true,
                secret_url: Some(SECRET.into()),
                secret_vault_id: Some(KV.into()),
                key_url: kek.then(|| KEY.into()),
                key_vault_id: kek.then(|| KV.into()),
            }),
            disk_encryption_set_id: None,
        }
    }

    fn des_disk() -> DiskEncryptionFacts {
        DiskEncryptionFacts {
            ade: None,
            disk_encryption_set_id: Some(DES.into()),
        }
    }

    #[test]
    fn no_facts_is_pmk() {
        let kind = classify(&VmEncryptionFacts::default()).unwrap();
        assert_eq!(kind, EncryptionKind::Pmk);
        assert_eq!(kind.report_name(), "pmk");
    }

    #[test]
    fn disk_encryption_set_is_cmk_with_the_des() {
        let facts = VmEncryptionFacts {
            data_disks: vec![DiskEncryptionFacts::default(), des_disk()],
            ..Default::default()
        };
        let kind = classify(&facts).unwrap();
        assert_eq!(kind.report_name(), "cmk");
        match kind {
            EncryptionKind::Cmk {
                disk_encryption_set,
            } => assert_eq!(disk_encryption_set.name(), "des-weu"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encryption_at_host_is_host_and_cmk_wins_over_host() {
        let host = VmEncryptionFacts {
            encryption_at_host: true,
            ..Default::default()
        };
        assert_eq!(classify(&host).unwrap(), EncryptionKind::Host);
        let both = VmEncryptionFacts {
            os_disk: des_disk(),
            encryption_at_host: true,
            ..Default::default()
        };
        assert_eq!(classify(&both).unwrap().report_name(), "cmk");
    }

    #[test]
    fn ade_bek_only_from_the_os_disk() {
        let facts = VmEncryptionFacts {
            os_disk: ade_disk(false),
            ..Default::default()
        };
        let kind = classify(&facts).unwrap();
        assert_eq!(kind.report_name(), "ade-bek");
        let keys = kind.ade_keys().unwrap();
        assert_eq!(keys.key_vault.name(), "kv-ade-weu");
        assert_eq!(keys.secret_url.as_deref(), Some(SECRET));
        assert_eq!(
            keys.key_vault_url.as_deref(),
            Some("https://kv-ade-weu.vault.azure.net/")
        );
        assert!(keys.kek.is_none());
    }

    #[test]
    fn ade_kek_from_a_data_disk_wins_over_cmk_and_host() {
        let facts = VmEncryptionFacts {
            os_disk: des_disk(),
            data_disks: vec![ade_disk(true)],
            encryption_at_host: true,
            ade_extension: None,
        };
        let kind = classify(&facts).unwrap();
        assert_eq!(kind.report_name(), "ade-kek");
        let kek = kind.ade_keys().unwrap().kek.clone().unwrap();
        assert_eq!(kek.key_url, KEY);
        assert_eq!(kek.key_vault.name(), "kv-ade-weu");
    }

    #[test]
    fn disabled_ade_settings_do_not_count() {
        let mut disk = ade_disk(true);
        if let Some(a) = disk.ade.as_mut() {
            a.enabled = false;
        }
        let facts = VmEncryptionFacts {
            os_disk: disk,
            ..Default::default()
        };
        assert_eq!(classify(&facts).unwrap(), EncryptionKind::Pmk);
    }

    #[test]
    fn ade_from_the_extension_alone_with_a_kek_in_another_vault() {
        let facts = VmEncryptionFacts {
            ade_extension: Some(AdeExtensionFacts {
                key_vault_url: Some("https://kv-ade-weu.vault.azure.net".into()),
                key_vault_resource_id: Some(KV.into()),
                key_encryption_key_url: Some(
                    "https://kv-kek-weu.vault.azure.net/keys/kek-1/abc".into(),
                ),
                kek_vault_resource_id: Some(KV2.into()),
            }),
            ..Default::default()
        };
        let kind = classify(&facts).unwrap();
        assert_eq!(kind.report_name(), "ade-kek");
        let keys = kind.ade_keys().unwrap();
        assert_eq!(keys.secret_url, None);
        assert_eq!(
            keys.key_vault_url.as_deref(),
            Some("https://kv-ade-weu.vault.azure.net/")
        );
        assert_eq!(keys.kek.as_ref().unwrap().key_vault.name(), "kv-kek-weu");
    }

    #[test]
    fn ade_without_a_vault_is_an_error_naming_the_field() {
        let mut disk = ade_disk(false);
        if let Some(a) = disk.ade.as_mut() {
            a.secret_vault_id = None;
        }
        let err = classify(&VmEncryptionFacts {
            os_disk: disk,
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("osDisk.encryptionSettings.diskEncryptionKey.sourceVault.id"),
            "{err}"
        );
        let err = classify(&VmEncryptionFacts {
            ade_extension: Some(AdeExtensionFacts::default()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("KeyVaultResourceId"), "{err}");
    }

    #[test]
    fn wrong_id_types_and_urls_are_errors_naming_the_field() {
        let mut disk = ade_disk(false);
        if let Some(a) = disk.ade.as_mut() {
            a.secret_vault_id = Some(DES.into());
        }
        let err = classify(&VmEncryptionFacts {
            os_disk: disk,
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, EncryptionFactsError::BadId { .. }), "{err}");
        let mut disk = ade_disk(true);
        if let Some(a) = disk.ade.as_mut() {
            a.key_url = Some("ftp://kv/keys/k".into());
        }
        let err = classify(&VmEncryptionFacts {
            data_disks: vec![disk],
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("dataDisks[0].encryptionSettings.keyEncryptionKey.keyUrl"),
            "{err}"
        );
        let err = classify(&VmEncryptionFacts {
            os_disk: DiskEncryptionFacts {
                ade: None,
                disk_encryption_set_id: Some(KV.into()),
            },
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("osDisk.managedDisk.diskEncryptionSet.id"),
            "{err}"
        );
    }

    #[test]
    fn key_vault_url_keeps_scheme_and_port() {
        assert_eq!(
            key_vault_url_of(SECRET).as_deref(),
            Some("https://kv-ade-weu.vault.azure.net/")
        );
        assert_eq!(
            key_vault_url_of("http://127.0.0.1:4100/secrets/s/1").as_deref(),
            Some("http://127.0.0.1:4100/")
        );
        assert_eq!(key_vault_url_of("not a url"), None);
    }

    #[test]
    fn key_vault_url_keeps_a_vault_path_and_accepts_a_vault_uri() {
        assert_eq!(
            key_vault_url_of("http://127.0.0.1:9/keyvault/kv/secrets/bek/1").as_deref(),
            Some("http://127.0.0.1:9/keyvault/kv/")
        );
        assert_eq!(
            key_vault_url_of("http://127.0.0.1:9/keyvault/kv/keys/kek-1").as_deref(),
            Some("http://127.0.0.1:9/keyvault/kv/")
        );
        assert_eq!(
            key_vault_url_of("https://kv.vault.azure.net").as_deref(),
            Some("https://kv.vault.azure.net/")
        );
        assert_eq!(
            key_vault_url_of("http://127.0.0.1:9/keyvault/kv").as_deref(),
            Some("http://127.0.0.1:9/keyvault/kv/")
        );
    }

    #[test]
    fn key_urls_split_with_and_without_a_vault_path() {
        assert_eq!(
            split_object_url("https://kv.vault.azure.net/keys/kek-1/abc", "keys"),
            Some((
                "https://kv.vault.azure.net/".into(),
                "kek-1".into(),
                Some("abc".into())
            ))
        );
        assert_eq!(
            split_object_url("http://127.0.0.1:9/keyvault/kv/keys/kek-1", "keys"),
            Some((
                "http://127.0.0.1:9/keyvault/kv/".into(),
                "kek-1".into(),
                None
            ))
        );
        assert_eq!(
            split_object_url("https://kv.vault.azure.net/secrets/s/1", "keys"),
            None
        );
        assert_eq!(split_object_url("not a url/keys/k/1", "keys"), None);
    }

    #[test]
    fn ade_extension_is_recognised_case_insensitively() {
        assert!(is_ade_extension(
            "microsoft.azure.security",
            "AzureDiskEncryptionForLinux"
        ));
        assert!(is_ade_extension(
            "Microsoft.Azure.Security",
            "azurediskencryption"
        ));
        assert!(!is_ade_extension(
            "Microsoft.Azure.RecoveryServices",
            "VMSnapshotLinux"
        ));
        assert!(!is_ade_extension("Other.Publisher", "AzureDiskEncryption"));
    }

    #[test]
    fn kind_serializes_with_its_report_name_tag() {
        let kind = classify(&VmEncryptionFacts {
            os_disk: ade_disk(true),
            ..Default::default()
        })
        .unwrap();
        let json = serde_json::to_value(&kind).unwrap();
        assert_eq!(json["kind"], "ade");
        assert_eq!(json["keyVault"], KV);
        assert_eq!(
            serde_json::from_value::<EncryptionKind>(json).unwrap(),
            kind
        );
        assert_eq!(
            serde_json::to_value(EncryptionKind::Pmk).unwrap(),
            serde_json::json!({"kind": "pmk"})
        );
    }
}
