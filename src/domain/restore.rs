//! Restore decisions: validate a request, check it against the VM and the app's scopes, choose the
//! recovery point, name the restored VM and its deployment, derive the request's Service Bus message
//! id, and describe the ADE extension to reinstall.

pub use crate::domain::encryption::split_object_url;
use crate::domain::encryption::{
    AdeKeys, EncryptionKind, ADE_EXTENSION_PUBLISHER, ADE_EXTENSION_TYPE_LINUX,
    ADE_EXTENSION_TYPE_WINDOWS,
};
use crate::domain::reason::{ReasonCode, Rejection};
use crate::domain::resource_id::{types, ResourceId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// Longest ticket id accepted; ticket ids are also restricted to `[A-Za-z0-9._-]`, starting with a letter
/// or digit, so that the names derived from them are valid Azure names.
pub const MAX_TICKET_ID_LEN: usize = 64;
/// Azure VM and deployment names are at most 64 characters.
pub const MAX_AZURE_NAME_LEN: usize = 64;
/// The type of a subnet id (`…/virtualNetworks/{vnet}/subnets/{subnet}`).
pub const SUBNET_TYPE: &str = "Microsoft.Network/virtualNetworks/subnets";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMode {
    RestoreDisks,
    ReplaceExisting,
    AlternateLocation,
    Files,
}

impl RestoreMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreMode::RestoreDisks => "restore-disks",
            RestoreMode::ReplaceExisting => "replace-existing",
            RestoreMode::AlternateLocation => "alternate-location",
            RestoreMode::Files => "files",
        }
    }
}

impl fmt::Display for RestoreMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RestoreMode {
    type Err = Rejection;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [RestoreMode::RestoreDisks, RestoreMode::ReplaceExisting, RestoreMode::AlternateLocation, RestoreMode::Files]
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                Rejection::invalid_field("mode", format!("{s:?} is not one of restore-disks, replace-existing, alternate-location, files"))
            })
    }
}

/// Which recovery point a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryPointSelector {
    Latest,
    Id(String),
    /// The newest recovery point at or before this instant.
    AtOrBefore(DateTime<Utc>),
}

impl FromStr for RecoveryPointSelector {
    type Err = Rejection;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("latest") {
            return Ok(RecoveryPointSelector::Latest);
        }
        if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            return Ok(RecoveryPointSelector::AtOrBefore(t.with_timezone(&Utc)));
        }
        let id_like = !s.is_empty()
            && s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if id_like {
            Ok(RecoveryPointSelector::Id(s.to_string()))
        } else {
            Err(Rejection::invalid_field(
                "recoveryPoint",
                format!("{s:?} is not latest, a recovery point id or an RFC 3339 time"),
            ))
        }
    }
}

/// A restore request as it arrives (queue message, webhook body, CLI): raw strings, validated by
/// [`validate_request`]. Field names are the contract's JSON names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreRequestFields {
    pub ticket_id: Option<String>,
    pub vm_id: Option<String>,
    /// Default `restore-disks`.
    pub mode: Option<String>,
    /// Default `latest`.
    pub recovery_point: Option<String>,
    pub target_resource_group: Option<String>,
    pub staging_storage_account: Option<String>,
    pub callback_url: Option<String>,
    /// `alternate-location` only: ARM id of the subnet for the new VM's network interface (default:
    /// the subnet of the source VM's primary NIC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_subnet_id: Option<String>,
}

/// A well-formed restore request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequest {
    pub ticket_id: String,
    pub vm_id: ResourceId,
    pub mode: RestoreMode,
    pub recovery_point: RecoveryPointSelector,
    /// Default: the VM's own resource group.
    pub target_resource_group: Option<ResourceId>,
    pub staging_storage_account: Option<ResourceId>,
    pub callback_url: Option<url::Url>,
    /// `alternate-location` only.
    pub target_subnet: Option<ResourceId>,
}

fn present<'a>(field: &str, value: &'a Option<String>) -> Result<Option<&'a str>, Rejection> {
    match value.as_deref().map(str::trim) {
        None => Ok(None),
        Some("") => Err(Rejection::invalid_field(
            field,
            "must not be empty when given",
        )),
        Some(v) => Ok(Some(v)),
    }
}

fn typed_id(field: &str, value: &str, expected: &str) -> Result<ResourceId, Rejection> {
    let id = ResourceId::parse(value).map_err(|e| Rejection::invalid_field(field, e))?;
    id.expect_type(expected)
        .map_err(|e| Rejection::invalid_field(field, e))?;
    Ok(id)
}

fn validate_ticket(ticket: &str) -> Result<(), Rejection> {
    let starts_ok = ticket
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let chars_ok = ticket
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ticket.len() > MAX_TICKET_ID_LEN || !starts_ok || !chars_ok {
        return Err(Rejection::invalid_field(
            "ticketId",
            format!("{ticket:?} must be 1-{MAX_TICKET_ID_LEN} characters of A-Z a-z 0-9 . _ - starting with a letter or digit"),
        ));
    }
    Ok(())
}

/// Shape checks only (no Azure state): the webhook answers 400 with this rejection's message.
pub fn validate_request(fields: &RestoreRequestFields) -> Result<RestoreRequest, Rejection> {
    let ticket_id = present("ticketId", &fields.ticket_id)?
        .ok_or_else(|| Rejection::invalid_field("ticketId", "is required"))?;
    validate_ticket(ticket_id)?;
    let vm_raw = present("vmId", &fields.vm_id)?
        .ok_or_else(|| Rejection::invalid_field("vmId", "is required"))?;
    let vm_id = typed_id("vmId", vm_raw, types::VIRTUAL_MACHINE)?;
    let mode = present("mode", &fields.mode)?.map_or(Ok(RestoreMode::RestoreDisks), str::parse)?;
    let recovery_point = present("recoveryPoint", &fields.recovery_point)?
        .map_or(Ok(RecoveryPointSelector::Latest), str::parse)?;
    let target_resource_group = present("targetResourceGroup", &fields.target_resource_group)?
        .map(|v| typed_id("targetResourceGroup", v, types::RESOURCE_GROUP))
        .transpose()?;
    let staging_storage_account =
        present("stagingStorageAccount", &fields.staging_storage_account)?
            .map(|v| typed_id("stagingStorageAccount", v, types::STORAGE_ACCOUNT))
            .transpose()?;
    let callback_url = present("callbackUrl", &fields.callback_url)?
        .map(|v| {
            url::Url::parse(v)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
                .ok_or_else(|| {
                    Rejection::invalid_field("callbackUrl", format!("{v:?} is not an http(s) URL"))
                })
        })
        .transpose()?;
    let target_subnet = present("targetSubnetId", &fields.target_subnet_id)?
        .map(|v| typed_id("targetSubnetId", v, SUBNET_TYPE))
        .transpose()?;
    if target_subnet.is_some() && mode != RestoreMode::AlternateLocation {
        return Err(Rejection::invalid_field(
            "targetSubnetId",
            format!("applies to mode alternate-location only, not {mode}"),
        ));
    }
    // Replace-existing restores the VM where it is: another group would be a silent no-op.
    if let (RestoreMode::ReplaceExisting, Some(target)) = (mode, &target_resource_group) {
        if vm_id.resource_group_scope().as_ref() != Some(target) {
            return Err(Rejection::invalid_field(
                "targetResourceGroup",
                "replace-existing restores the VM in its own resource group; omit it or name that group",
            ));
        }
    }
    Ok(RestoreRequest {
        ticket_id: ticket_id.to_string(),
        vm_id,
        mode,
        recovery_point,
        target_resource_group,
        staging_storage_account,
        callback_url,
        target_subnet,
    })
}

impl fmt::Display for RecoveryPointSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoveryPointSelector::Latest => f.write_str("latest"),
            RecoveryPointSelector::Id(id) => f.write_str(id),
            RecoveryPointSelector::AtOrBefore(t) => {
                f.write_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
            }
        }
    }
}

/// The Service Bus `MessageId` every door (webhook, `vmbackup restore`, the local timeline) sends a
/// request under: `restore-<ticket lowercased>-<16 hex digits of SHA-256 of the request>`. The same
/// request sent twice — two clicks, a retried call, two copies racing — carries one id, and Service
/// Bus's duplicate detection (10 minutes on restore-requests) keeps one copy. A request that differs
/// in any field (a corrected recovery point, another mode, another callback) gets another id and is
/// delivered; start-restore then lets it start a restore only if the ticket has none in flight or
/// done. The digest covers the validated request in canonical form (ids compared as ARM does,
/// defaults filled in), so spelling differences do not defeat it.
pub fn request_message_id(request: &RestoreRequest) -> String {
    format!(
        "restore-{}-{}",
        request.ticket_id.to_ascii_lowercase(),
        request_digest(request)
    )
}

/// The request's identity: 16 hex digits of SHA-256 of its canonical form (see
/// [`request_message_id`], which carries it; start-restore's ticket marker names it too).
pub fn request_digest(request: &RestoreRequest) -> String {
    let canonical = |id: Option<&ResourceId>| id.map(ResourceId::canonical).unwrap_or_default();
    let content = [
        request.ticket_id.to_ascii_lowercase(),
        request.vm_id.canonical(),
        request.mode.to_string(),
        request.recovery_point.to_string(),
        canonical(request.target_resource_group.as_ref()),
        canonical(request.staging_storage_account.as_ref()),
        request
            .callback_url
            .as_ref()
            .map(url::Url::to_string)
            .unwrap_or_default(),
        canonical(request.target_subnet.as_ref()),
    ]
    .join("\n");
    let digest = Sha256::digest(content.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The subscriptions and resource groups the app may act on. Empty means nothing is allowed: scopes
/// must be configured, never assumed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedScopes {
    pub subscriptions: Vec<String>,
    pub resource_groups: Vec<ResourceId>,
}

impl AllowedScopes {
    pub fn allows(&self, id: &ResourceId) -> bool {
        self.subscriptions
            .iter()
            .any(|s| s.eq_ignore_ascii_case(id.subscription_id()))
            || self.resource_groups.iter().any(|rg| id.is_within(rg))
    }
}

/// A recovery point of the VM's protected item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPoint {
    /// The recovery point's `name`.
    pub id: String,
    pub time: DateTime<Utc>,
}

/// The recovery point a selector names; ties on time go to the greatest id, so the choice is stable.
pub fn choose_recovery_point<'a>(
    points: &'a [RecoveryPoint],
    selector: &RecoveryPointSelector,
) -> Option<&'a RecoveryPoint> {
    let newest = |it: &mut dyn Iterator<Item = &'a RecoveryPoint>| {
        it.max_by(|a, b| a.time.cmp(&b.time).then_with(|| a.id.cmp(&b.id)))
    };
    match selector {
        RecoveryPointSelector::Latest => newest(&mut points.iter()),
        RecoveryPointSelector::Id(id) => points.iter().find(|p| p.id.eq_ignore_ascii_case(id)),
        RecoveryPointSelector::AtOrBefore(t) => newest(&mut points.iter().filter(|p| p.time <= *t)),
    }
}

/// Azure's `recoveryType` of an `IaasVMRestoreRequest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AzureRecoveryType {
    RestoreDisks,
    OriginalLocation,
    AlternateLocation,
}

impl AzureRecoveryType {
    pub fn as_str(self) -> &'static str {
        match self {
            AzureRecoveryType::RestoreDisks => "RestoreDisks",
            AzureRecoveryType::OriginalLocation => "OriginalLocation",
            AzureRecoveryType::AlternateLocation => "AlternateLocation",
        }
    }
}

/// What the restore is checked against.
#[derive(Debug, Clone, Copy)]
pub struct RestoreContext<'a> {
    pub encryption: &'a EncryptionKind,
    pub protected: bool,
    pub recovery_points: &'a [RecoveryPoint],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlan {
    pub recovery_type: AzureRecoveryType,
    pub recovery_point: RecoveryPoint,
    pub target_resource_group: ResourceId,
    /// Name of the VM recreated from the restored disks, created by an alternate-location restore,
    /// or (replace-existing) the VM itself.
    pub restored_vm_name: String,
    /// `restored_vm_name` in the target resource group: the VM the ticket gets back.
    pub restored_vm_id: ResourceId,
    /// Name of the template deployment that recreates the VM: a retry finds its own deployment.
    pub deployment_name: String,
}

/// Check a well-formed request against scopes, encryption, protection and recovery points.
/// Order: VM scope → target/staging subscription → target scope → mode → protection → recovery point.
pub fn plan_restore(
    request: &RestoreRequest,
    scopes: &AllowedScopes,
    ctx: RestoreContext<'_>,
) -> Result<RestorePlan, Rejection> {
    let vm = &request.vm_id;
    if !scopes.allows(vm) {
        return Err(Rejection::new(
            ReasonCode::ScopeNotAllowed,
            format!("VM {vm} is outside the allowed scopes"),
        ));
    }
    let target = match &request.target_resource_group {
        Some(rg) => rg.clone(),
        None => vm
            .resource_group_scope()
            .ok_or_else(|| Rejection::invalid_field("vmId", "has no resource group"))?,
    };
    for (field, id) in [
        ("targetResourceGroup", Some(&target)),
        (
            "stagingStorageAccount",
            request.staging_storage_account.as_ref(),
        ),
        ("targetSubnetId", request.target_subnet.as_ref()),
    ] {
        if let Some(id) = id {
            if !id
                .subscription_id()
                .eq_ignore_ascii_case(vm.subscription_id())
            {
                return Err(Rejection::new(
                    ReasonCode::CrossSubscriptionRestore,
                    format!("{field} {id} is in another subscription than the VM; restores stay within the VM's subscription"),
                ));
            }
        }
    }
    if !scopes.allows(&target) {
        return Err(Rejection::new(
            ReasonCode::ScopeNotAllowed,
            format!("target resource group {target} is outside the allowed scopes"),
        ));
    }
    if let Some(subnet) = request.target_subnet.as_ref().filter(|s| !scopes.allows(s)) {
        return Err(Rejection::new(
            ReasonCode::ScopeNotAllowed,
            format!("target subnet {subnet} is outside the allowed scopes"),
        ));
    }
    let ade = ctx.encryption.is_ade();
    let recovery_type = match (request.mode, ade) {
        (RestoreMode::Files, _) => {
            return Err(Rejection::new(
                ReasonCode::FileLevelRestoreUnsupported,
                "file-level restore is unsupported: Azure has none for ADE VMs and this workflow restores whole VMs",
            ))
        }
        (RestoreMode::ReplaceExisting, true) => {
            return Err(Rejection::new(ReasonCode::ReplaceExistingUnsupported, "replace-existing is unsupported for ADE VMs; use restore-disks"))
        }
        (RestoreMode::AlternateLocation, true) => {
            return Err(Rejection::new(ReasonCode::AlternateLocationUnsupported, "alternate-location is unsupported for ADE VMs; use restore-disks"))
        }
        (RestoreMode::RestoreDisks, _) => AzureRecoveryType::RestoreDisks,
        (RestoreMode::ReplaceExisting, false) => AzureRecoveryType::OriginalLocation,
        (RestoreMode::AlternateLocation, false) => AzureRecoveryType::AlternateLocation,
    };
    if !ctx.protected {
        return Err(Rejection::new(
            ReasonCode::NotProtected,
            format!("VM {} is not protected", vm.name()),
        ));
    }
    let recovery_point = choose_recovery_point(ctx.recovery_points, &request.recovery_point)
        .cloned()
        .ok_or_else(|| {
            Rejection::new(
                ReasonCode::RecoveryPointNotFound,
                format!("no recovery point matches {:?}", request.recovery_point),
            )
        })?;
    // Replace-existing restores the VM itself (validation keeps the target its own group).
    let restored_name = match recovery_type {
        AzureRecoveryType::OriginalLocation => vm.name().to_string(),
        _ => restored_vm_name(vm.name(), &request.ticket_id),
    };
    let restored_vm_id = target
        .child(
            "providers/Microsoft.Compute/virtualMachines",
            &restored_name,
        )
        .map_err(|e| Rejection::invalid_field("vmId", e))?;
    Ok(RestorePlan {
        recovery_type,
        recovery_point,
        target_resource_group: target,
        restored_vm_name: restored_name,
        restored_vm_id,
        deployment_name: deployment_name(&request.ticket_id),
    })
}

/// `base` if it fits in `max` characters, else a prefix plus `-` and 8 hex digits of its SHA-256,
/// so that long names stay distinct and deterministic. The result never ends in `-` or `.`.
fn fit_name(base: &str, max: usize) -> String {
    let trimmed = base.trim_end_matches(['-', '.']);
    if trimmed.len() <= max {
        return trimmed.to_string();
    }
    let digest = Sha256::digest(base.as_bytes());
    let suffix: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    // Cut on a character boundary: ids from outside are not guaranteed ASCII.
    let mut end = max - suffix.len() - 1;
    while !trimmed.is_char_boundary(end) {
        end -= 1;
    }
    let prefix = trimmed[..end].trim_end_matches(['-', '.']);
    format!("{prefix}-{suffix}")
}

/// `<vm>-restored-<ticket lowercased>`, at most 64 bytes.
pub fn restored_vm_name(vm_name: &str, ticket_id: &str) -> String {
    fit_name(
        &format!("{vm_name}-restored-{}", ticket_id.to_ascii_lowercase()),
        MAX_AZURE_NAME_LEN,
    )
}

/// `vmbackup-restore-<ticket lowercased>`, at most 64 characters.
pub fn deployment_name(ticket_id: &str) -> String {
    fit_name(
        &format!("vmbackup-restore-{}", ticket_id.to_ascii_lowercase()),
        MAX_AZURE_NAME_LEN,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OsType {
    Linux,
    Windows,
}

/// Public settings of the ADE extension, with the names the extension reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdeExtensionSettings {
    #[serde(rename = "EncryptionOperation")]
    pub encryption_operation: String,
    #[serde(rename = "KeyVaultURL")]
    pub key_vault_url: String,
    #[serde(rename = "KeyVaultResourceId")]
    pub key_vault_resource_id: String,
    #[serde(
        rename = "KeyEncryptionKeyURL",
        skip_serializing_if = "Option::is_none"
    )]
    pub key_encryption_key_url: Option<String>,
    #[serde(rename = "KekVaultResourceId", skip_serializing_if = "Option::is_none")]
    pub kek_vault_resource_id: Option<String>,
    #[serde(
        rename = "KeyEncryptionAlgorithm",
        skip_serializing_if = "Option::is_none"
    )]
    pub key_encryption_algorithm: Option<String>,
    #[serde(rename = "VolumeType")]
    pub volume_type: String,
}

/// The ADE extension to install on a recreated VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdeExtension {
    pub publisher: &'static str,
    pub extension_type: &'static str,
    pub type_handler_version: &'static str,
    pub settings: AdeExtensionSettings,
}

/// The extension for `os` (Linux `AzureDiskEncryptionForLinux` 1.1, Windows `AzureDiskEncryption` 2.2:
/// the versions without an Entra app). KEK settings only when there is a KEK.
pub fn ade_extension(os: OsType, keys: &AdeKeys) -> Result<AdeExtension, Rejection> {
    let key_vault_url = keys.key_vault_url.clone().ok_or_else(|| {
        Rejection::invalid_field("keyVaultUrl", "the key vault URI of the ADE VM is unknown")
    })?;
    let (extension_type, type_handler_version) = match os {
        OsType::Linux => (ADE_EXTENSION_TYPE_LINUX, "1.1"),
        OsType::Windows => (ADE_EXTENSION_TYPE_WINDOWS, "2.2"),
    };
    Ok(AdeExtension {
        publisher: ADE_EXTENSION_PUBLISHER,
        extension_type,
        type_handler_version,
        settings: AdeExtensionSettings {
            encryption_operation: "EnableEncryption".to_string(),
            key_vault_url,
            key_vault_resource_id: keys.key_vault.to_string(),
            key_encryption_key_url: keys.kek.as_ref().map(|k| k.key_url.clone()),
            kek_vault_resource_id: keys.kek.as_ref().map(|k| k.key_vault.to_string()),
            key_encryption_algorithm: keys.kek.as_ref().map(|_| "RSA-OAEP".to_string()),
            volume_type: "All".to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::encryption::{classify, tests as enc, VmEncryptionFacts};
    use chrono::TimeZone;

    const SUB: &str = "11111111-1111-1111-1111-111111111111";
    const VM: &str = "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/vm-web-01";
    const SUBNET: &str = "/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg-net/providers/Microsoft.Network/virtualNetworks/vnet-1/subnets/app";

    fn fields() -> RestoreRequestFields {
        RestoreRequestFields {
            ticket_id: Some("INC-1001".into()),
            vm_id: Some(VM.into()),
            ..Default::default()
        }
    }

    fn t(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, h, 0, 0)
            .single()
            .unwrap()
    }

    fn points() -> Vec<RecoveryPoint> {
        vec![
            RecoveryPoint {
                id: "100".into(),
                time: t(2),
            },
            RecoveryPoint {
                id: "300".into(),
                time: t(6),
            },
            RecoveryPoint {
                id: "200".into(),
                time: t(4),
            },
        ]
    }

    fn scopes() -> AllowedScopes {
        AllowedScopes {
            subscriptions: vec![SUB.into()],
            resource_groups: vec![],
        }
    }

    fn ade() -> EncryptionKind {
        classify(&VmEncryptionFacts {
            os_disk: enc::ade_disk(true),
            ..Default::default()
        })
        .unwrap()
    }

    fn plan(
        f: RestoreRequestFields,
        encryption: &EncryptionKind,
        protected: bool,
        scopes: &AllowedScopes,
    ) -> Result<RestorePlan, Rejection> {
        let request = validate_request(&f)?;
        let rps = points();
        plan_restore(
            &request,
            scopes,
            RestoreContext {
                encryption,
                protected,
                recovery_points: &rps,
            },
        )
    }

    fn code(r: Result<RestorePlan, Rejection>) -> ReasonCode {
        r.expect_err("expected a rejection").code
    }

    #[test]
    fn minimal_request_defaults_to_restore_disks_latest_in_the_vms_group() {
        let p = plan(fields(), &ade(), true, &scopes()).unwrap();
        assert_eq!(p.recovery_type, AzureRecoveryType::RestoreDisks);
        assert_eq!(p.recovery_point.id, "300");
        assert_eq!(
            p.target_resource_group.to_string(),
            format!("/subscriptions/{SUB}/resourceGroups/rg-app")
        );
        assert_eq!(p.restored_vm_name, "vm-web-01-restored-inc-1001");
        assert_eq!(p.deployment_name, "vmbackup-restore-inc-1001");
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let cases: Vec<(RestoreRequestFields, &str)> = vec![
            (
                RestoreRequestFields {
                    ticket_id: None,
                    ..fields()
                },
                "ticketId",
            ),
            (
                RestoreRequestFields {
                    ticket_id: Some(" ".into()),
                    ..fields()
                },
                "ticketId",
            ),
            (
                RestoreRequestFields {
                    ticket_id: Some("INC 1001".into()),
                    ..fields()
                },
                "ticketId",
            ),
            (
                RestoreRequestFields {
                    ticket_id: Some("-x".into()),
                    ..fields()
                },
                "ticketId",
            ),
            (
                RestoreRequestFields {
                    ticket_id: Some("x".repeat(65)),
                    ..fields()
                },
                "ticketId",
            ),
            (
                RestoreRequestFields {
                    vm_id: None,
                    ..fields()
                },
                "vmId",
            ),
            (
                RestoreRequestFields {
                    vm_id: Some("vm-web-01".into()),
                    ..fields()
                },
                "vmId",
            ),
            (
                RestoreRequestFields {
                    vm_id: Some(format!("/subscriptions/{SUB}/resourceGroups/rg-app")),
                    ..fields()
                },
                "vmId",
            ),
            (
                RestoreRequestFields {
                    mode: Some("create-vm".into()),
                    ..fields()
                },
                "mode",
            ),
            (
                RestoreRequestFields {
                    recovery_point: Some("yesterday please".into()),
                    ..fields()
                },
                "recoveryPoint",
            ),
            (
                RestoreRequestFields {
                    target_resource_group: Some(VM.into()),
                    ..fields()
                },
                "targetResourceGroup",
            ),
            (
                RestoreRequestFields {
                    staging_storage_account: Some(format!(
                        "/subscriptions/{SUB}/resourceGroups/rg"
                    )),
                    ..fields()
                },
                "stagingStorageAccount",
            ),
            (
                RestoreRequestFields {
                    callback_url: Some("ftp://x/y".into()),
                    ..fields()
                },
                "callbackUrl",
            ),
            (
                RestoreRequestFields {
                    callback_url: Some("not a url".into()),
                    ..fields()
                },
                "callbackUrl",
            ),
            (
                RestoreRequestFields {
                    mode: Some("alternate-location".into()),
                    target_subnet_id: Some(format!("{SUBNET}/../x")),
                    ..fields()
                },
                "targetSubnetId",
            ),
            (
                RestoreRequestFields {
                    mode: Some("alternate-location".into()),
                    target_subnet_id: Some(VM.into()),
                    ..fields()
                },
                "targetSubnetId",
            ),
            (
                RestoreRequestFields {
                    target_subnet_id: Some(SUBNET.into()),
                    ..fields()
                },
                "targetSubnetId",
            ),
            (
                RestoreRequestFields {
                    mode: Some("replace-existing".into()),
                    target_resource_group: Some(format!(
                        "/subscriptions/{SUB}/resourceGroups/rg-other"
                    )),
                    ..fields()
                },
                "targetResourceGroup",
            ),
        ];
        for (f, field) in cases {
            let err = validate_request(&f).expect_err(field);
            assert_eq!(err.code, ReasonCode::InvalidRequest);
            assert!(
                err.message.starts_with(&format!("{field}:")),
                "{field}: {}",
                err.message
            );
        }
    }

    #[test]
    fn request_deserializes_from_contract_json() {
        let f: RestoreRequestFields = serde_json::from_value(serde_json::json!({
            "ticketId": "INC-1001", "vmId": VM, "mode": "restore-disks", "recoveryPoint": "2026-11-28T05:00:00Z",
            "targetResourceGroup": format!("/subscriptions/{SUB}/resourceGroups/rg-restore"),
            "stagingStorageAccount": format!("/subscriptions/{SUB}/resourceGroups/rg-backup/providers/Microsoft.Storage/storageAccounts/stweustaging"),
            "callbackUrl": "https://tickets.example/hooks/INC-1001"
        }))
        .unwrap();
        let r = validate_request(&f).unwrap();
        assert_eq!(
            r.recovery_point,
            RecoveryPointSelector::AtOrBefore(
                Utc.with_ymd_and_hms(2026, 11, 28, 5, 0, 0)
                    .single()
                    .unwrap()
            )
        );
        assert_eq!(r.callback_url.unwrap().host_str(), Some("tickets.example"));
        assert_eq!(r.staging_storage_account.unwrap().name(), "stweustaging");
    }

    #[test]
    fn recovery_point_selection() {
        let rps = points();
        assert_eq!(
            choose_recovery_point(&rps, &RecoveryPointSelector::Latest)
                .unwrap()
                .id,
            "300"
        );
        assert_eq!(
            choose_recovery_point(&rps, &RecoveryPointSelector::Id("200".into()))
                .unwrap()
                .id,
            "200"
        );
        assert_eq!(
            choose_recovery_point(&rps, &RecoveryPointSelector::AtOrBefore(t(5)))
                .unwrap()
                .id,
            "200"
        );
        assert_eq!(
            choose_recovery_point(&rps, &RecoveryPointSelector::AtOrBefore(t(4)))
                .unwrap()
                .id,
            "200"
        );
        assert!(choose_recovery_point(&rps, &RecoveryPointSelector::AtOrBefore(t(1))).is_none());
        assert!(choose_recovery_point(&rps, &RecoveryPointSelector::Id("999".into())).is_none());
        assert!(choose_recovery_point(&[], &RecoveryPointSelector::Latest).is_none());
        let tied = [
            RecoveryPoint {
                id: "a".into(),
                time: t(1),
            },
            RecoveryPoint {
                id: "b".into(),
                time: t(1),
            },
        ];
        assert_eq!(
            choose_recovery_point(&tied, &RecoveryPointSelector::Latest)
                .unwrap()
                .id,
            "b"
        );
        assert_eq!(
            "LATEST".parse::<RecoveryPointSelector>().unwrap(),
            RecoveryPointSelector::Latest
        );
    }

    #[test]
    fn recovery_point_not_found() {
        let f = RestoreRequestFields {
            recovery_point: Some("2026-11-27T00:00:00Z".into()),
            ..fields()
        };
        assert_eq!(
            code(plan(f, &ade(), true, &scopes())),
            ReasonCode::RecoveryPointNotFound
        );
        let f = RestoreRequestFields {
            recovery_point: Some("12345".into()),
            ..fields()
        };
        assert_eq!(
            code(plan(f, &ade(), true, &scopes())),
            ReasonCode::RecoveryPointNotFound
        );
    }

    #[test]
    fn not_protected() {
        assert_eq!(
            code(plan(fields(), &ade(), false, &scopes())),
            ReasonCode::NotProtected
        );
    }

    #[test]
    fn scope_not_allowed_for_vm_or_target() {
        assert_eq!(
            code(plan(fields(), &ade(), true, &AllowedScopes::default())),
            ReasonCode::ScopeNotAllowed
        );
        let rg_only = AllowedScopes {
            subscriptions: vec![],
            resource_groups: vec![ResourceId::resource_group_id(SUB, "RG-APP")],
        };
        assert!(plan(fields(), &ade(), true, &rg_only).is_ok());
        let f = RestoreRequestFields {
            target_resource_group: Some(format!("/subscriptions/{SUB}/resourceGroups/rg-restore")),
            ..fields()
        };
        assert_eq!(
            code(plan(f, &ade(), true, &rg_only)),
            ReasonCode::ScopeNotAllowed
        );
    }

    #[test]
    fn cross_subscription_target_or_staging_is_rejected() {
        let other = "22222222-2222-2222-2222-222222222222";
        let both = AllowedScopes {
            subscriptions: vec![SUB.into(), other.into()],
            resource_groups: vec![],
        };
        let f = RestoreRequestFields {
            target_resource_group: Some(format!("/subscriptions/{other}/resourceGroups/rg")),
            ..fields()
        };
        assert_eq!(
            code(plan(f, &ade(), true, &both)),
            ReasonCode::CrossSubscriptionRestore
        );
        let f = RestoreRequestFields {
            staging_storage_account: Some(format!("/subscriptions/{other}/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/st")),
            ..fields()
        };
        assert_eq!(
            code(plan(f, &EncryptionKind::Pmk, true, &both)),
            ReasonCode::CrossSubscriptionRestore
        );
    }

    #[test]
    fn target_subnet_stays_in_the_subscription_and_scopes() {
        let other = "22222222-2222-2222-2222-222222222222";
        let alternate = |subnet: String| RestoreRequestFields {
            mode: Some("alternate-location".into()),
            target_subnet_id: Some(subnet),
            ..fields()
        };
        let both = AllowedScopes {
            subscriptions: vec![SUB.into(), other.into()],
            resource_groups: vec![],
        };
        assert_eq!(
            code(plan(
                alternate(SUBNET.replace(SUB, other)),
                &EncryptionKind::Pmk,
                true,
                &both
            )),
            ReasonCode::CrossSubscriptionRestore
        );
        let app_only = AllowedScopes {
            subscriptions: vec![],
            resource_groups: vec![ResourceId::parse(&format!(
                "/subscriptions/{SUB}/resourceGroups/rg-app"
            ))
            .unwrap()],
        };
        assert_eq!(
            code(plan(
                alternate(SUBNET.into()),
                &EncryptionKind::Pmk,
                true,
                &app_only
            )),
            ReasonCode::ScopeNotAllowed
        );
        let p = plan(
            alternate(SUBNET.into()),
            &EncryptionKind::Pmk,
            true,
            &scopes(),
        )
        .unwrap();
        assert_eq!(p.recovery_type, AzureRecoveryType::AlternateLocation);
    }

    #[test]
    fn restored_vm_is_a_new_name_in_the_target_or_the_vm_itself() {
        let target = format!("/subscriptions/{SUB}/resourceGroups/rg-restore");
        let f = RestoreRequestFields {
            mode: Some("alternate-location".into()),
            target_resource_group: Some(target.clone()),
            ..fields()
        };
        let p = plan(
            f,
            &EncryptionKind::Cmk {
                disk_encryption_set: ResourceId::parse(VM).unwrap(),
            },
            true,
            &scopes(),
        )
        .unwrap();
        assert_eq!(
            p.restored_vm_id.to_string(),
            format!(
                "{target}/providers/Microsoft.Compute/virtualMachines/vm-web-01-restored-inc-1001"
            )
        );
        // Replace-existing: the VM itself, also when the request names the VM's own group.
        let f = RestoreRequestFields {
            mode: Some("replace-existing".into()),
            target_resource_group: Some(format!("/subscriptions/{SUB}/resourcegroups/RG-APP")),
            ..fields()
        };
        let p = plan(f, &EncryptionKind::Pmk, true, &scopes()).unwrap();
        assert_eq!(p.restored_vm_id, ResourceId::parse(VM).unwrap());
        assert_eq!(p.restored_vm_name, "vm-web-01");
    }

    #[test]
    fn message_id_is_one_per_ticket_and_content() {
        let id = |f: RestoreRequestFields| request_message_id(&validate_request(&f).unwrap());
        let base = id(fields());
        assert!(base.starts_with("restore-inc-1001-"), "{base}");
        assert_eq!(base.len(), "restore-inc-1001-".len() + 16);
        assert!(base.len() <= 128, "Service Bus MessageId limit");
        // Same request, other spelling: defaults written out, ids in other case, ticket in other case.
        let spelled = RestoreRequestFields {
            ticket_id: Some("inc-1001".into()),
            vm_id: Some(VM.to_ascii_lowercase()),
            mode: Some("restore-disks".into()),
            recovery_point: Some("LATEST".into()),
            ..fields()
        };
        assert_eq!(id(spelled), base);
        // Any real difference is another message.
        let variants = [
            RestoreRequestFields {
                recovery_point: Some("2026-11-28T05:00:00Z".into()),
                ..fields()
            },
            RestoreRequestFields {
                mode: Some("alternate-location".into()),
                ..fields()
            },
            RestoreRequestFields {
                target_resource_group: Some(format!("/subscriptions/{SUB}/resourceGroups/rg-x")),
                ..fields()
            },
            RestoreRequestFields {
                callback_url: Some("https://tickets.example/hook".into()),
                ..fields()
            },
            RestoreRequestFields {
                ticket_id: Some("INC-1002".into()),
                ..fields()
            },
            RestoreRequestFields {
                mode: Some("alternate-location".into()),
                target_subnet_id: Some(SUBNET.into()),
                ..fields()
            },
        ];
        let mut seen = std::collections::HashSet::from([base]);
        for variant in variants {
            assert!(seen.insert(id(variant.clone())), "{variant:?}");
        }
    }

    #[test]
    fn files_is_unsupported_for_every_vm() {
        for encryption in [ade(), EncryptionKind::Pmk] {
            let f = RestoreRequestFields {
                mode: Some("files".into()),
                ..fields()
            };
            assert_eq!(
                code(plan(f, &encryption, true, &scopes())),
                ReasonCode::FileLevelRestoreUnsupported
            );
        }
    }

    #[test]
    fn ade_vms_refuse_replace_existing_and_alternate_location() {
        let f = RestoreRequestFields {
            mode: Some("replace-existing".into()),
            ..fields()
        };
        assert_eq!(
            code(plan(f, &ade(), true, &scopes())),
            ReasonCode::ReplaceExistingUnsupported
        );
        let f = RestoreRequestFields {
            mode: Some("alternate-location".into()),
            ..fields()
        };
        assert_eq!(
            code(plan(f, &ade(), true, &scopes())),
            ReasonCode::AlternateLocationUnsupported
        );
    }

    #[test]
    fn non_ade_replace_and_alternate_map_to_azure_types() {
        let f = RestoreRequestFields {
            mode: Some("replace-existing".into()),
            ..fields()
        };
        assert_eq!(
            plan(f, &EncryptionKind::Host, true, &scopes())
                .unwrap()
                .recovery_type,
            AzureRecoveryType::OriginalLocation
        );
        let f = RestoreRequestFields {
            mode: Some("alternate-location".into()),
            ..fields()
        };
        let p = plan(f, &EncryptionKind::Pmk, true, &scopes()).unwrap();
        assert_eq!(p.recovery_type.as_str(), "AlternateLocation");
        assert_eq!(
            AzureRecoveryType::OriginalLocation.as_str(),
            "OriginalLocation"
        );
        assert_eq!(AzureRecoveryType::RestoreDisks.as_str(), "RestoreDisks");
    }

    #[test]
    fn derived_names_are_valid_deterministic_and_bounded() {
        assert_eq!(
            restored_vm_name("vm-web-01", "INC-1001"),
            "vm-web-01-restored-inc-1001"
        );
        let long_vm = "v".repeat(60);
        let a = restored_vm_name(&long_vm, "INC-1001");
        let b = restored_vm_name(&long_vm, "INC-1002");
        assert!(a.len() <= MAX_AZURE_NAME_LEN && b.len() <= MAX_AZURE_NAME_LEN);
        assert_ne!(a, b);
        assert_eq!(a, restored_vm_name(&long_vm, "inc-1001"));
        let ticket = "T".repeat(64);
        let d = deployment_name(&ticket);
        assert!(d.len() <= MAX_AZURE_NAME_LEN && d.starts_with("vmbackup-restore-t"));
        assert_eq!(d, deployment_name(&ticket));
        assert!(!restored_vm_name("vm", "inc-1.").ends_with('.'));
        let multibyte = restored_vm_name(&"é".repeat(40), "INC-1");
        assert!(multibyte.len() <= MAX_AZURE_NAME_LEN, "{multibyte}");
        for name in [a, b, d] {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
                "{name}"
            );
            assert!(!name.ends_with('-') && !name.ends_with('.'), "{name}");
        }
    }

    #[test]
    fn ade_extension_for_linux_with_kek() {
        let kind = ade();
        let ext = ade_extension(OsType::Linux, kind.ade_keys().unwrap()).unwrap();
        assert_eq!(
            (ext.publisher, ext.extension_type, ext.type_handler_version),
            (
                "Microsoft.Azure.Security",
                "AzureDiskEncryptionForLinux",
                "1.1"
            )
        );
        assert_eq!(
            serde_json::to_value(&ext.settings).unwrap(),
            serde_json::json!({
                "EncryptionOperation": "EnableEncryption",
                "KeyVaultURL": "https://kv-ade-weu.vault.azure.net/",
                "KeyVaultResourceId": enc::KV,
                "KeyEncryptionKeyURL": enc::KEY,
                "KekVaultResourceId": enc::KV,
                "KeyEncryptionAlgorithm": "RSA-OAEP",
                "VolumeType": "All"
            })
        );
    }

    #[test]
    fn ade_extension_for_windows_bek_only_and_missing_vault_url() {
        let kind = classify(&VmEncryptionFacts {
            os_disk: enc::ade_disk(false),
            ..Default::default()
        })
        .unwrap();
        let keys = kind.ade_keys().unwrap();
        let ext = ade_extension(OsType::Windows, keys).unwrap();
        assert_eq!(
            (ext.extension_type, ext.type_handler_version),
            ("AzureDiskEncryption", "2.2")
        );
        let json = serde_json::to_value(&ext.settings).unwrap();
        assert!(
            json.get("KeyEncryptionKeyURL").is_none()
                && json.get("KeyEncryptionAlgorithm").is_none()
        );
        let unknown = AdeKeys {
            key_vault_url: None,
            ..keys.clone()
        };
        assert_eq!(
            ade_extension(OsType::Linux, &unknown).unwrap_err().code,
            ReasonCode::InvalidRequest
        );
    }

    #[test]
    fn key_vault_object_urls_split_into_vault_name_and_version() {
        assert_eq!(
            split_object_url("https://kv-ade.vault.azure.net/keys/kek-1/abc", "keys"),
            Some((
                "https://kv-ade.vault.azure.net/".into(),
                "kek-1".into(),
                Some("abc".into())
            ))
        );
        assert_eq!(
            split_object_url("http://127.0.0.1:9/keyvault/kv-ade/secrets/bek", "secrets"),
            Some((
                "http://127.0.0.1:9/keyvault/kv-ade/".into(),
                "bek".into(),
                None
            ))
        );
        assert!(split_object_url("https://kv.vault.azure.net/secrets/bek/1", "keys").is_none());
        assert!(split_object_url("https://kv.vault.azure.net/keys/", "keys").is_none());
        assert!(split_object_url("https://kv.vault.azure.net/keys/k/1/extra", "keys").is_none());
        assert!(split_object_url("ftp://kv/keys/k/1", "keys").is_none());
    }

    #[test]
    fn mode_round_trips() {
        for m in [
            "restore-disks",
            "replace-existing",
            "alternate-location",
            "files",
        ] {
            let mode: RestoreMode = m.parse().unwrap();
            assert_eq!(mode.to_string(), m);
            assert_eq!(serde_json::to_value(mode).unwrap(), serde_json::json!(m));
        }
    }
}
