//! Reason codes of the outside contract: every `*.rejected` / `*.failed` event and every report `reason`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A reason code; serialized as the exact contract string (the variant name, e.g. `NoVaultInRegion`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
pub enum ReasonCode {
    /// No Recovery Services vault in the VM's subscription and region.
    NoVaultInRegion,
    /// The tag names a policy the vault does not have (or the VM carries no policy tag).
    UnknownPolicy,
    /// The ADE KEK is part of a certificate.
    CertificateBackedKey,
    /// The VM agent is missing or not ready.
    VmAgentNotReady,
    /// The workflow could not grant Azure Backup access to the key vault.
    KeyVaultAccessNotGranted,
    /// A backup failed with `UserErrorKeyVaultPermissionsNotConfigured` and re-granting did not fix it.
    KeyVaultPermissionsNotConfigured,
    /// Restore mode `replace-existing` on an ADE VM.
    ReplaceExistingUnsupported,
    /// Restore mode `files`: this workflow restores whole VMs.
    FileLevelRestoreUnsupported,
    /// Restore mode `alternate-location` on an ADE VM.
    AlternateLocationUnsupported,
    /// Target resource group (or staging account) in another subscription.
    CrossSubscriptionRestore,
    /// No recovery point matches the request.
    RecoveryPointNotFound,
    /// Restore or backup requested for a VM that is not protected.
    NotProtected,
    /// The request names a VM or target outside the scopes the app may act on.
    ScopeNotAllowed,
    /// The message is malformed; the message text names the field.
    InvalidRequest,
    /// Added: an Azure Backup job failed for a reason Azure names (its code travels in the message).
    JobFailed,
    /// Added: an Azure Backup job was cancelled.
    JobCancelled,
    /// Added: a job was still running when the bound on total tracking time ran out.
    JobTrackingTimedOut,
    /// Added: the VM was deleted before the workflow could act on it.
    VmNotFound,
    /// Added: the VM's encryption settings name no usable key vault or key (the message says which field).
    UnreadableEncryptionSettings,
    /// Added: Azure refused a step with an error that retrying will not fix (its code is in the message).
    AzureRefused,
}

impl ReasonCode {
    pub const ALL: [ReasonCode; 20] = [
        ReasonCode::NoVaultInRegion,
        ReasonCode::UnknownPolicy,
        ReasonCode::CertificateBackedKey,
        ReasonCode::VmAgentNotReady,
        ReasonCode::KeyVaultAccessNotGranted,
        ReasonCode::KeyVaultPermissionsNotConfigured,
        ReasonCode::ReplaceExistingUnsupported,
        ReasonCode::FileLevelRestoreUnsupported,
        ReasonCode::AlternateLocationUnsupported,
        ReasonCode::CrossSubscriptionRestore,
        ReasonCode::RecoveryPointNotFound,
        ReasonCode::NotProtected,
        ReasonCode::ScopeNotAllowed,
        ReasonCode::InvalidRequest,
        ReasonCode::JobFailed,
        ReasonCode::JobCancelled,
        ReasonCode::JobTrackingTimedOut,
        ReasonCode::VmNotFound,
        ReasonCode::UnreadableEncryptionSettings,
        ReasonCode::AzureRefused,
    ];

    /// The contract string.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::NoVaultInRegion => "NoVaultInRegion",
            ReasonCode::UnknownPolicy => "UnknownPolicy",
            ReasonCode::CertificateBackedKey => "CertificateBackedKey",
            ReasonCode::VmAgentNotReady => "VmAgentNotReady",
            ReasonCode::KeyVaultAccessNotGranted => "KeyVaultAccessNotGranted",
            ReasonCode::KeyVaultPermissionsNotConfigured => "KeyVaultPermissionsNotConfigured",
            ReasonCode::ReplaceExistingUnsupported => "ReplaceExistingUnsupported",
            ReasonCode::FileLevelRestoreUnsupported => "FileLevelRestoreUnsupported",
            ReasonCode::AlternateLocationUnsupported => "AlternateLocationUnsupported",
            ReasonCode::CrossSubscriptionRestore => "CrossSubscriptionRestore",
            ReasonCode::RecoveryPointNotFound => "RecoveryPointNotFound",
            ReasonCode::NotProtected => "NotProtected",
            ReasonCode::ScopeNotAllowed => "ScopeNotAllowed",
            ReasonCode::InvalidRequest => "InvalidRequest",
            ReasonCode::JobFailed => "JobFailed",
            ReasonCode::JobCancelled => "JobCancelled",
            ReasonCode::JobTrackingTimedOut => "JobTrackingTimedOut",
            ReasonCode::VmNotFound => "VmNotFound",
            ReasonCode::UnreadableEncryptionSettings => "UnreadableEncryptionSettings",
            ReasonCode::AzureRefused => "AzureRefused",
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reason code {0:?}")]
pub struct UnknownReasonCode(pub String);

impl FromStr for ReasonCode {
    type Err = UnknownReasonCode;

    /// Exact (case-sensitive) contract strings only: they are fixed names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReasonCode::ALL
            .into_iter()
            .find(|code| code.as_str() == s)
            .ok_or_else(|| UnknownReasonCode(s.to_string()))
    }
}

/// A decision not to go on, with a reason code and a human-readable message.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error, schemars::JsonSchema,
)]
#[error("{code}: {message}")]
pub struct Rejection {
    pub code: ReasonCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: ReasonCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
        }
    }

    /// An `InvalidRequest` whose message names the field.
    pub fn invalid_field(field: &str, problem: impl fmt::Display) -> Self {
        Rejection::new(ReasonCode::InvalidRequest, format!("{field}: {problem}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT_CODES: [&str; 14] = [
        "NoVaultInRegion",
        "UnknownPolicy",
        "CertificateBackedKey",
        "VmAgentNotReady",
        "KeyVaultAccessNotGranted",
        "KeyVaultPermissionsNotConfigured",
        "ReplaceExistingUnsupported",
        "FileLevelRestoreUnsupported",
        "AlternateLocationUnsupported",
        "CrossSubscriptionRestore",
        "RecoveryPointNotFound",
        "NotProtected",
        "ScopeNotAllowed",
        "InvalidRequest",
    ];

    #[test]
    fn every_contract_code_round_trips_through_serde_display_and_from_str() {
        for name in CONTRACT_CODES {
            let code: ReasonCode = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(serde_json::to_value(code).unwrap(), serde_json::json!(name));
            assert_eq!(code.to_string(), name);
            assert_eq!(name.parse::<ReasonCode>().unwrap(), code);
        }
    }

    #[test]
    fn all_lists_each_variant_once_and_serde_matches_as_str() {
        let mut names: Vec<_> = ReasonCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ReasonCode::ALL.len());
        for code in ReasonCode::ALL {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::json!(code.as_str())
            );
        }
    }

    #[test]
    fn unknown_or_miscased_code_is_refused() {
        assert!("novaultinregion".parse::<ReasonCode>().is_err());
        assert!(serde_json::from_value::<ReasonCode>(serde_json::json!("Nope")).is_err());
    }

    #[test]
    fn rejection_serializes_code_and_message_and_names_the_field() {
        let r = Rejection::invalid_field("ticketId", "must not be empty");
        assert_eq!(r.code, ReasonCode::InvalidRequest);
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"code": "InvalidRequest", "message": "ticketId: must not be empty"})
        );
        assert_eq!(r.to_string(), "InvalidRequest: ticketId: must not be empty");
    }
}
