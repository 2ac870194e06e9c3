//! Assess a VM for protection: vault, policy, key, agent; then what comes next.
//!
//! Order of checks: vault in the VM's subscription and region → policy named by the tag →
//! certificate-backed KEK → VM agent → Key Vault access for ADE. The first failing check decides.

use crate::domain::encryption::EncryptionKind;
use crate::domain::reason::{ReasonCode, Rejection};
use crate::domain::resource_id::ResourceId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The tag that names the backup policy.
pub const BACKUP_POLICY_TAG: &str = "backup-policy";

/// A tag's value; Azure tag names are case-insensitive.
pub fn tag_value<'a>(tags: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    tags.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Azure region names as ARM reports them (`westeurope`) or as people write them (`West Europe`).
pub fn same_region(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        s.chars()
            .filter(|c| !c.is_whitespace())
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    norm(a) == norm(b)
}

/// A Recovery Services vault the VM could use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultCandidate {
    pub id: ResourceId,
    pub location: String,
    /// Names of the vault's backup policies.
    pub policies: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerState {
    Running,
    Stopped,
    Deallocated,
    /// Starting, stopping, deallocating or not reported: treated like running (the agent may report soon).
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentStatus {
    Ready,
    NotReady,
    Missing,
}

/// Where the VM is already protected, if it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CurrentProtection {
    pub vault: ResourceId,
    pub policy: String,
}

/// What the assessment reads about one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmAssessmentInput {
    pub vm_id: ResourceId,
    pub location: String,
    pub tags: BTreeMap<String, String>,
    pub encryption: EncryptionKind,
    /// Whether the ADE KEK (if any) is part of a certificate (Key Vault reports such keys as `managed`).
    pub kek_certificate_backed: bool,
    pub power_state: PowerState,
    pub agent: AgentStatus,
    /// How many agent re-checks this workflow run has already made (carried in the event).
    pub agent_rechecks_done: u32,
    pub current_protection: Option<CurrentProtection>,
}

/// How often to re-check the agent of a running VM before rejecting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentRecheckPolicy {
    pub max_rechecks: u32,
    pub delay: Duration,
}

impl Default for AgentRecheckPolicy {
    /// Three re-checks five minutes apart: a freshly created VM's agent reports within minutes.
    fn default() -> Self {
        AgentRecheckPolicy {
            max_rechecks: 3,
            delay: Duration::from_secs(300),
        }
    }
}

/// One key vault to which the Backup Management Service needs access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyVaultAccessNeed {
    pub key_vault: ResourceId,
    /// Secrets `get, list, backup` (the BEK lives here).
    pub secrets: bool,
    /// Keys `get, list, backup` (the KEK lives here).
    pub keys: bool,
}

/// The key vaults an ADE VM's backup needs, merged per vault (BEK and KEK may live in different vaults).
pub fn key_vault_access_needs(encryption: &EncryptionKind) -> Vec<KeyVaultAccessNeed> {
    let Some(keys) = encryption.ade_keys() else {
        return Vec::new();
    };
    let mut needs = vec![KeyVaultAccessNeed {
        key_vault: keys.key_vault.clone(),
        secrets: true,
        keys: false,
    }];
    if let Some(kek) = &keys.kek {
        match needs.iter_mut().find(|n| n.key_vault == kek.key_vault) {
            Some(need) => need.keys = true,
            None => needs.push(KeyVaultAccessNeed {
                key_vault: kek.key_vault.clone(),
                secrets: false,
                keys: true,
            }),
        }
    }
    needs
}

/// The outcome of an assessment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assessment {
    /// ADE: grant these accesses, then protect in `vault` with `policy`.
    NeedsKeyVaultAccess {
        vault: ResourceId,
        policy: String,
        needs: Vec<KeyVaultAccessNeed>,
    },
    Ready {
        vault: ResourceId,
        policy: String,
    },
    Rejected(Rejection),
    /// Look at the agent again after this delay (with `agent_rechecks_done + 1`).
    RecheckAgentAfter(Duration),
}

/// The vault for a VM: among vaults in the VM's subscription and region, the one already protecting
/// it; else those holding the policy; ties broken by the lowest id (case-insensitive), so every
/// delivery of the same event picks the same vault.
fn choose_vault<'a>(
    input: &VmAssessmentInput,
    vaults: &'a [VaultCandidate],
    policy: &str,
) -> Result<(&'a VaultCandidate, &'a str), Rejection> {
    let mut local: Vec<&VaultCandidate> = vaults
        .iter()
        .filter(|v| {
            v.id.subscription_id()
                .eq_ignore_ascii_case(input.vm_id.subscription_id())
                && same_region(&v.location, &input.location)
        })
        .collect();
    if local.is_empty() {
        return Err(Rejection::new(
            ReasonCode::NoVaultInRegion,
            format!(
                "no Recovery Services vault in subscription {} and region {}",
                input.vm_id.subscription_id(),
                input.location
            ),
        ));
    }
    local.sort_by_key(|v| v.id.canonical());
    if let Some(current) = &input.current_protection {
        if let Some(vault) = local.iter().find(|v| v.id == current.vault) {
            return find_policy(vault, policy).map(|p| (*vault, p));
        }
    }
    local
        .iter()
        .find_map(|v| find_policy(v, policy).ok().map(|p| (*v, p)))
        .ok_or_else(|| {
            let names: Vec<&str> = local.iter().map(|v| v.id.name()).collect();
            Rejection::new(
                ReasonCode::UnknownPolicy,
                format!(
                    "policy {policy:?} named by tag {BACKUP_POLICY_TAG} is not in vault(s) {}",
                    names.join(", ")
                ),
            )
        })
}

/// Policies are ARM child resources, whose names ARM compares case-insensitively; the vault's
/// spelling is returned so the protected item names the policy exactly.
fn find_policy<'a>(vault: &'a VaultCandidate, policy: &str) -> Result<&'a str, Rejection> {
    vault
        .policies
        .iter()
        .find(|p| p.eq_ignore_ascii_case(policy))
        .map(String::as_str)
        .ok_or_else(|| {
            Rejection::new(
                ReasonCode::UnknownPolicy,
                format!("policy {policy:?} is not in vault {}", vault.id.name()),
            )
        })
}

pub fn assess(
    input: &VmAssessmentInput,
    vaults: &[VaultCandidate],
    recheck: &AgentRecheckPolicy,
) -> Assessment {
    let policy = match tag_value(&input.tags, BACKUP_POLICY_TAG).map(str::trim) {
        Some(p) if !p.is_empty() => p,
        _ => {
            // Check the vault first all the same: a missing vault is the more useful reason.
            if let Err(r) = choose_vault(input, vaults, "") {
                if r.code == ReasonCode::NoVaultInRegion {
                    return Assessment::Rejected(r);
                }
            }
            return Assessment::Rejected(Rejection::new(
                ReasonCode::UnknownPolicy,
                format!("VM {} has no {BACKUP_POLICY_TAG} tag", input.vm_id.name()),
            ));
        }
    };
    let (vault, policy) = match choose_vault(input, vaults, policy) {
        Ok(found) => found,
        Err(r) => return Assessment::Rejected(r),
    };
    if input.encryption.is_ade() && input.kek_certificate_backed {
        return Assessment::Rejected(Rejection::new(
            ReasonCode::CertificateBackedKey,
            "the ADE key encryption key is part of a certificate; Azure Backup supports standalone keys only",
        ));
    }
    let agent_can_report = !matches!(
        input.power_state,
        PowerState::Stopped | PowerState::Deallocated
    );
    if agent_can_report && input.agent != AgentStatus::Ready {
        if input.agent_rechecks_done < recheck.max_rechecks {
            return Assessment::RecheckAgentAfter(recheck.delay);
        }
        let state = match input.agent {
            AgentStatus::Missing => "missing",
            _ => "not ready",
        };
        return Assessment::Rejected(Rejection::new(
            ReasonCode::VmAgentNotReady,
            format!(
                "VM agent is {state} after {} re-checks",
                input.agent_rechecks_done
            ),
        ));
    }
    let needs = key_vault_access_needs(&input.encryption);
    if needs.is_empty() {
        Assessment::Ready {
            vault: vault.id.clone(),
            policy: policy.to_string(),
        }
    } else {
        Assessment::NeedsKeyVaultAccess {
            vault: vault.id.clone(),
            policy: policy.to_string(),
            needs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::encryption::{classify, tests as enc, VmEncryptionFacts};

    const SUB: &str = "11111111-1111-1111-1111-111111111111";

    fn vm() -> VmAssessmentInput {
        VmAssessmentInput {
            vm_id: ResourceId::parse(&format!(
                "/subscriptions/{SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/vm-web-01"
            ))
            .unwrap(),
            location: "westeurope".into(),
            tags: BTreeMap::from([("backup-policy".to_string(), "DefaultPolicy".to_string())]),
            encryption: EncryptionKind::Pmk,
            kek_certificate_backed: false,
            power_state: PowerState::Running,
            agent: AgentStatus::Ready,
            agent_rechecks_done: 0,
            current_protection: None,
        }
    }

    fn vault(sub: &str, name: &str, location: &str, policies: &[&str]) -> VaultCandidate {
        VaultCandidate {
            id: ResourceId::parse(&format!(
                "/subscriptions/{sub}/resourceGroups/rg-backup/providers/Microsoft.RecoveryServices/vaults/{name}"
            ))
            .unwrap(),
            location: location.into(),
            policies: policies.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn vaults() -> Vec<VaultCandidate> {
        vec![vault(
            SUB,
            "rsv-weu",
            "westeurope",
            &["DefaultPolicy", "Daily14"],
        )]
    }

    fn ade(kek: bool) -> EncryptionKind {
        classify(&VmEncryptionFacts {
            os_disk: enc::ade_disk(kek),
            ..Default::default()
        })
        .unwrap()
    }

    fn rejected_code(a: Assessment) -> ReasonCode {
        match a {
            Assessment::Rejected(r) => r.code,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn pmk_cmk_and_host_are_ready_directly() {
        for encryption in [
            EncryptionKind::Pmk,
            EncryptionKind::Host,
            EncryptionKind::Cmk {
                disk_encryption_set: ResourceId::parse(
                    "/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/diskEncryptionSets/d",
                )
                .unwrap(),
            },
        ] {
            let input = VmAssessmentInput { encryption, ..vm() };
            match assess(&input, &vaults(), &AgentRecheckPolicy::default()) {
                Assessment::Ready { vault, policy } => {
                    assert_eq!(vault.name(), "rsv-weu");
                    assert_eq!(policy, "DefaultPolicy");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn ade_bek_needs_secrets_only_and_ade_kek_needs_keys_too() {
        let bek = VmAssessmentInput {
            encryption: ade(false),
            ..vm()
        };
        match assess(&bek, &vaults(), &AgentRecheckPolicy::default()) {
            Assessment::NeedsKeyVaultAccess { needs, policy, .. } => {
                assert_eq!(policy, "DefaultPolicy");
                assert_eq!(needs.len(), 1);
                assert!(needs[0].secrets && !needs[0].keys);
                assert_eq!(needs[0].key_vault.name(), "kv-ade-weu");
            }
            other => panic!("{other:?}"),
        }
        let kek = VmAssessmentInput {
            encryption: ade(true),
            ..vm()
        };
        match assess(&kek, &vaults(), &AgentRecheckPolicy::default()) {
            Assessment::NeedsKeyVaultAccess { needs, .. } => {
                assert_eq!(needs.len(), 1);
                assert!(needs[0].secrets && needs[0].keys);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn kek_in_another_vault_needs_keys_there() {
        let mut encryption = ade(true);
        if let EncryptionKind::Ade(keys) = &mut encryption {
            if let Some(kek) = keys.kek.as_mut() {
                kek.key_vault = ResourceId::parse(enc::KV2).unwrap();
            }
        }
        let needs = key_vault_access_needs(&encryption);
        assert_eq!(needs.len(), 2);
        assert!(needs[0].secrets && !needs[0].keys && needs[0].key_vault.name() == "kv-ade-weu");
        assert!(!needs[1].secrets && needs[1].keys && needs[1].key_vault.name() == "kv-kek-weu");
    }

    #[test]
    fn no_vault_in_subscription_and_region() {
        let elsewhere = vec![
            vault(SUB, "rsv-neu", "northeurope", &["DefaultPolicy"]),
            vault(
                "22222222-2222-2222-2222-222222222222",
                "rsv-weu",
                "westeurope",
                &["DefaultPolicy"],
            ),
        ];
        assert_eq!(
            rejected_code(assess(&vm(), &elsewhere, &AgentRecheckPolicy::default())),
            ReasonCode::NoVaultInRegion
        );
        let untagged = VmAssessmentInput {
            tags: BTreeMap::new(),
            ..vm()
        };
        assert_eq!(
            rejected_code(assess(
                &untagged,
                &elsewhere,
                &AgentRecheckPolicy::default()
            )),
            ReasonCode::NoVaultInRegion
        );
    }

    #[test]
    fn region_names_compare_like_azure() {
        let input = VmAssessmentInput {
            location: "West Europe".into(),
            ..vm()
        };
        assert!(matches!(
            assess(&input, &vaults(), &AgentRecheckPolicy::default()),
            Assessment::Ready { .. }
        ));
    }

    #[test]
    fn unknown_or_missing_policy() {
        let input = VmAssessmentInput {
            tags: BTreeMap::from([("backup-policy".to_string(), "Weekly".to_string())]),
            ..vm()
        };
        let a = assess(&input, &vaults(), &AgentRecheckPolicy::default());
        assert_eq!(rejected_code(a), ReasonCode::UnknownPolicy);
        let untagged = VmAssessmentInput {
            tags: BTreeMap::new(),
            ..vm()
        };
        assert_eq!(
            rejected_code(assess(&untagged, &vaults(), &AgentRecheckPolicy::default())),
            ReasonCode::UnknownPolicy
        );
    }

    #[test]
    fn policy_and_tag_name_match_case_insensitively_and_keep_the_vaults_spelling() {
        let input = VmAssessmentInput {
            tags: BTreeMap::from([("Backup-Policy".to_string(), "daily14".to_string())]),
            ..vm()
        };
        match assess(&input, &vaults(), &AgentRecheckPolicy::default()) {
            Assessment::Ready { policy, .. } => assert_eq!(policy, "Daily14"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn several_vaults_choice_is_deterministic() {
        let many = vec![
            vault(SUB, "rsv-b", "westeurope", &["DefaultPolicy"]),
            vault(SUB, "rsv-c", "westeurope", &["Daily14"]),
            vault(SUB, "rsv-a", "westeurope", &["Other"]),
            vault(SUB, "RSV-AA", "westeurope", &["DefaultPolicy"]),
        ];
        let pick = |vs: &[VaultCandidate], input: &VmAssessmentInput| match assess(
            input,
            vs,
            &AgentRecheckPolicy::default(),
        ) {
            Assessment::Ready { vault, .. } => vault.name().to_string(),
            other => panic!("{other:?}"),
        };
        // The lowest id holding the policy, whatever the input order.
        assert_eq!(pick(&many, &vm()), "RSV-AA");
        let mut reversed = many.clone();
        reversed.reverse();
        assert_eq!(pick(&reversed, &vm()), "RSV-AA");
        // The vault already protecting the VM wins.
        let protected = VmAssessmentInput {
            current_protection: Some(CurrentProtection {
                vault: many[0].id.clone(),
                policy: "DefaultPolicy".into(),
            }),
            ..vm()
        };
        assert_eq!(pick(&many, &protected), "rsv-b");
    }

    #[test]
    fn certificate_backed_kek_is_rejected() {
        let input = VmAssessmentInput {
            encryption: ade(true),
            kek_certificate_backed: true,
            ..vm()
        };
        assert_eq!(
            rejected_code(assess(&input, &vaults(), &AgentRecheckPolicy::default())),
            ReasonCode::CertificateBackedKey
        );
    }

    #[test]
    fn running_vm_without_ready_agent_is_rechecked_then_rejected() {
        let policy = AgentRecheckPolicy {
            max_rechecks: 2,
            delay: Duration::from_secs(60),
        };
        for agent in [AgentStatus::NotReady, AgentStatus::Missing] {
            for done in 0..2 {
                let input = VmAssessmentInput {
                    agent,
                    agent_rechecks_done: done,
                    ..vm()
                };
                assert_eq!(
                    assess(&input, &vaults(), &policy),
                    Assessment::RecheckAgentAfter(Duration::from_secs(60))
                );
            }
            let input = VmAssessmentInput {
                agent,
                agent_rechecks_done: 2,
                ..vm()
            };
            assert_eq!(
                rejected_code(assess(&input, &vaults(), &policy)),
                ReasonCode::VmAgentNotReady
            );
        }
        let transitioning = VmAssessmentInput {
            agent: AgentStatus::Missing,
            power_state: PowerState::Other,
            ..vm()
        };
        assert!(matches!(
            assess(&transitioning, &vaults(), &policy),
            Assessment::RecheckAgentAfter(_)
        ));
    }

    #[test]
    fn stopped_or_deallocated_vm_proceeds_without_agent() {
        for power_state in [PowerState::Stopped, PowerState::Deallocated] {
            let input = VmAssessmentInput {
                agent: AgentStatus::Missing,
                power_state,
                ..vm()
            };
            assert!(matches!(
                assess(&input, &vaults(), &AgentRecheckPolicy::default()),
                Assessment::Ready { .. }
            ));
        }
    }
}
