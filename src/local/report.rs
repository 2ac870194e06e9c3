//! The report of a local run (the contract's JSON) and its summary table.
//!
//! Everything comes from durable state, so a restarted run with the same `--state` reports the
//! same: the events ever enqueued (the queue's journal) say what the workflow decided, the
//! simulated estate says what each VM is, and the dead-letter queues say what could not be handled.

use super::queue::JournalEntry;
use crate::simulator::state::SimState;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub vms: Vec<VmReport>,
    pub dead_lettered: u64,
    pub arm: ArmCounts,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArmCounts {
    pub requests: u64,
    pub throttled: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmReport {
    pub id: String,
    pub name: String,
    /// `none` | `pmk` | `cmk` | `host` | `ade-bek` | `ade-kek`.
    pub encryption: String,
    pub protection: Protection,
    pub backups: Backups,
    pub restores: Vec<RestoreReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Protection {
    /// `protected` | `rejected` | `unprotected` | `pending`.
    pub state: String,
    pub vault: Option<String>,
    pub policy: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backups {
    pub completed: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    pub ticket: String,
    /// `completed` | `rejected` | `failed` | `pending`.
    pub state: String,
    pub reason: Option<String>,
    pub restored_vm_id: Option<String>,
    pub ade_reinstalled: bool,
}

/// What the estate says about one VM the report covers.
#[derive(Debug, Clone, PartialEq)]
pub struct VmFacts {
    pub id: String,
    pub name: String,
    pub encryption: String,
    /// (vault name, policy) of an active protected item.
    pub protected_by: Option<(String, String)>,
}

/// The VMs of the fleet (`names`, in fleet order) as the simulated estate has them now.
pub fn vm_facts(state: &SimState, names: &[String]) -> Vec<VmFacts> {
    names
        .iter()
        .filter_map(|name| state.vm_by_name(name))
        .map(|vm| {
            let id = vm.id();
            let disks: Vec<_> = std::iter::once(&vm.os_disk)
                .chain(&vm.data_disks)
                .filter_map(|disk| state.disk(&vm.subscription, &vm.resource_group, disk))
                .collect();
            let ade = disks.iter().find_map(|d| d.ade.as_ref());
            let encryption = match ade {
                Some(settings) if settings.key_url.is_some() => "ade-kek",
                Some(_) => "ade-bek",
                None if disks.iter().any(|d| d.disk_encryption_set_id.is_some()) => "cmk",
                None if vm.encryption_at_host => "host",
                None => "pmk",
            };
            let protected_by = state
                .protected_item_for_vm(&id)
                .filter(|item| item.protection_state != "ProtectionStopped")
                .map(|item| (last_segment(&item.vault_id), item.policy.clone()));
            VmFacts {
                id,
                name: vm.name.clone(),
                encryption: encryption.to_string(),
                protected_by,
            }
        })
        .collect()
}

fn last_segment(id: &str) -> String {
    id.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(id)
        .to_string()
}

fn text(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_string)
}

#[derive(Default)]
struct VmTrail {
    /// The last protection outcome, and whether a request came after it.
    outcome: Option<Protection>,
    requested_after_outcome: bool,
    /// Encryption the workflow reported (used when no estate is known, i.e. against real Azure).
    encryption: Option<String>,
    backup_jobs: BTreeSet<String>,
    failed_backups: BTreeSet<String>,
}

fn trail_of<'a>(
    trails: &'a mut HashMap<String, VmTrail>,
    seen_order: &mut Vec<String>,
    vm: &str,
) -> &'a mut VmTrail {
    if !trails.contains_key(vm) {
        seen_order.push(vm.to_string());
    }
    trails.entry(vm.to_string()).or_default()
}

struct RestoreTrail {
    vm: String,
    report: RestoreReport,
}

/// Builds the report from the VMs (`facts`; empty against real Azure, where the VMs named in the
/// events are reported), the journal of every enqueued event, and the dead-letter count.
pub fn build(
    facts: &[VmFacts],
    journal: &[JournalEntry],
    dead_lettered: u64,
    arm: ArmCounts,
) -> Report {
    let mut trails: HashMap<String, VmTrail> = HashMap::new();
    let mut seen_order: Vec<String> = Vec::new();
    let mut restores: Vec<RestoreTrail> = Vec::new();
    let mut restore_index: HashMap<String, usize> = HashMap::new();
    for entry in journal {
        let Ok(event) = serde_json::from_slice::<Value>(&entry.body) else {
            continue;
        };
        let Some(event_type) = text(&event, "type") else {
            continue;
        };
        let data = event.get("data").cloned().unwrap_or(Value::Null);
        let vm = text(&data, "vmId")
            .or_else(|| text(&event, "subject"))
            .map(|id| id.to_ascii_lowercase());
        let ticket = text(&data, "ticketId").or_else(|| text(&event, "ticketid"));
        let encryption = data
            .get("encryption")
            .and_then(|e| serde_json::from_value(e.clone()).ok())
            .map(|e: crate::domain::encryption::EncryptionKind| e.report_name().to_string());
        match (event_type.as_str(), vm) {
            ("vmbackup.protection.requested", Some(vm)) => {
                trail_of(&mut trails, &mut seen_order, &vm).requested_after_outcome = true;
            }
            ("vmbackup.protection.enabled", Some(vm)) => {
                let trail = trail_of(&mut trails, &mut seen_order, &vm);
                trail.outcome = Some(Protection {
                    state: "protected".into(),
                    vault: text(&data, "vaultId").map(|v| last_segment(&v)),
                    policy: text(&data, "policy"),
                    reason: None,
                });
                trail.requested_after_outcome = false;
                trail.encryption = encryption.or(trail.encryption.take());
            }
            ("vmbackup.protection.rejected", Some(vm)) => {
                let trail = trail_of(&mut trails, &mut seen_order, &vm);
                trail.outcome = Some(Protection {
                    state: "rejected".into(),
                    vault: None,
                    policy: None,
                    reason: text(&data, "reason"),
                });
                trail.requested_after_outcome = false;
                trail.encryption = encryption.or(trail.encryption.take());
            }
            ("vmbackup.backup.completed", Some(vm)) => {
                let job = text(&data, "jobId").unwrap_or_else(|| entry.message_id.clone());
                trail_of(&mut trails, &mut seen_order, &vm)
                    .backup_jobs
                    .insert(job);
            }
            ("vmbackup.backup.failed", Some(vm)) => {
                let job = text(&data, "jobId").unwrap_or_else(|| entry.message_id.clone());
                trail_of(&mut trails, &mut seen_order, &vm)
                    .failed_backups
                    .insert(job);
            }
            ("vmbackup.restore.requested", vm) => {
                let (Some(ticket), Some(vm)) = (ticket, vm) else {
                    continue;
                };
                if !restore_index.contains_key(&ticket) {
                    restore_index.insert(ticket.clone(), restores.len());
                    restores.push(RestoreTrail {
                        vm,
                        report: RestoreReport {
                            ticket,
                            state: "pending".into(),
                            reason: None,
                            restored_vm_id: None,
                            ade_reinstalled: false,
                        },
                    });
                }
            }
            ("vmbackup.restore.completed", _)
            | ("vmbackup.restore.rejected", _)
            | ("vmbackup.restore.failed", _) => {
                let Some(index) = ticket.and_then(|t| restore_index.get(&t).copied()) else {
                    continue;
                };
                let report = &mut restores[index].report;
                report.state = event_type.rsplit('.').next().unwrap_or_default().into();
                report.reason = text(&data, "reason");
                report.restored_vm_id = text(&data, "restoredVmId");
                report.ade_reinstalled = data
                    .get("adeReinstalled")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
            }
            _ => {}
        }
    }

    // Against real Azure no estate is known: report the VMs the events name.
    let facts: Vec<VmFacts> = if facts.is_empty() {
        seen_order
            .iter()
            .map(|id| VmFacts {
                id: id.clone(),
                name: last_segment(id),
                encryption: trails
                    .get(id)
                    .and_then(|t| t.encryption.clone())
                    .unwrap_or_else(|| "none".into()),
                protected_by: None,
            })
            .collect()
    } else {
        facts.to_vec()
    };
    let vms = facts
        .iter()
        .map(|vm| {
            let key = vm.id.to_ascii_lowercase();
            let trail = trails.get(&key);
            let from_estate = vm.protected_by.as_ref().map(|(vault, policy)| Protection {
                state: "protected".into(),
                vault: Some(vault.clone()),
                policy: Some(policy.clone()),
                reason: None,
            });
            let protection = match trail {
                Some(t) if t.requested_after_outcome => from_estate.unwrap_or(Protection {
                    state: "pending".into(),
                    vault: None,
                    policy: None,
                    reason: None,
                }),
                Some(VmTrail {
                    outcome: Some(outcome),
                    ..
                }) => outcome.clone(),
                _ => from_estate.unwrap_or(Protection {
                    state: "unprotected".into(),
                    vault: None,
                    policy: None,
                    reason: None,
                }),
            };
            VmReport {
                id: vm.id.clone(),
                name: vm.name.clone(),
                encryption: vm.encryption.clone(),
                protection,
                backups: Backups {
                    completed: trail.map_or(0, |t| t.backup_jobs.len() as u64),
                    failed: trail.map_or(0, |t| t.failed_backups.len() as u64),
                },
                restores: restores
                    .iter()
                    .filter(|r| r.vm == key)
                    .map(|r| r.report.clone())
                    .collect(),
            }
        })
        .collect();
    Report {
        vms,
        dead_lettered,
        arm,
    }
}

/// The summary table a person reads at the end of a run.
pub fn summary_table(report: &Report) -> String {
    let header = [
        "VM",
        "ENCRYPTION",
        "PROTECTION",
        "BACKUPS",
        "RESTORES",
        "REASON",
    ];
    let rows: Vec<[String; 6]> = report
        .vms
        .iter()
        .map(|vm| {
            let protection = match (&vm.protection.vault, &vm.protection.policy) {
                (Some(vault), Some(policy)) => {
                    format!("{} ({vault}/{policy})", vm.protection.state)
                }
                _ => vm.protection.state.clone(),
            };
            let backups = if vm.backups.failed > 0 {
                format!("{} ok, {} failed", vm.backups.completed, vm.backups.failed)
            } else {
                vm.backups.completed.to_string()
            };
            let restores = vm
                .restores
                .iter()
                .map(|r| format!("{}:{}", r.ticket, r.state))
                .collect::<Vec<_>>()
                .join(" ");
            let reasons: Vec<String> =
                vm.protection
                    .reason
                    .iter()
                    .cloned()
                    .chain(vm.restores.iter().filter_map(|r| {
                        r.reason.as_ref().map(|why| format!("{}: {why}", r.ticket))
                    }))
                    .collect();
            [
                vm.name.clone(),
                vm.encryption.clone(),
                protection,
                backups,
                if restores.is_empty() {
                    "-".into()
                } else {
                    restores
                },
                if reasons.is_empty() {
                    "-".into()
                } else {
                    reasons.join("; ")
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(&header.map(str::to_string));
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    out.push_str(&format!(
        "{} VMs · {} dead-lettered messages · {} ARM requests ({} throttled)\n",
        report.vms.len(),
        report.dead_lettered,
        report.arm.requests,
        report.arm.throttled
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use serde_json::json;

    const VM: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm-1";

    fn entry(position: i64, body: Value) -> JournalEntry {
        JournalEntry {
            position,
            queue: "q".into(),
            message_id: format!("m{position}"),
            body: body.to_string().into_bytes(),
            enqueued_at: Utc::now(),
        }
    }

    fn facts() -> Vec<VmFacts> {
        vec![VmFacts {
            id: VM.into(),
            name: "vm-1".into(),
            encryption: "ade-kek".into(),
            protected_by: None,
        }]
    }

    #[test]
    fn events_decide_protection_backups_and_restores() {
        let journal = vec![
            entry(
                1,
                json!({"type": "vmbackup.protection.requested", "data": {"vmId": VM}}),
            ),
            entry(
                2,
                json!({"type": "vmbackup.protection.enabled", "data": {"vmId": VM,
                "vaultId": "/subscriptions/s/resourceGroups/b/providers/Microsoft.RecoveryServices/vaults/rsv-weu",
                "policy": "DefaultPolicy"}}),
            ),
            entry(
                3,
                json!({"type": "vmbackup.backup.completed", "data": {"vmId": VM, "jobId": "j1"}}),
            ),
            // a redelivered completion names the same job: one backup
            entry(
                4,
                json!({"type": "vmbackup.backup.completed", "data": {"vmId": VM, "jobId": "j1"}}),
            ),
            entry(
                5,
                json!({"type": "vmbackup.backup.failed", "data": {"vmId": VM, "jobId": "j2", "reason": "X"}}),
            ),
            entry(
                6,
                json!({"type": "vmbackup.restore.requested", "ticketid": "INC-1", "data": {"ticketId": "INC-1", "vmId": VM}}),
            ),
            entry(
                7,
                json!({"type": "vmbackup.restore.requested", "ticketid": "INC-2", "data": {"ticketId": "INC-2", "vmId": VM}}),
            ),
            entry(
                8,
                json!({"type": "vmbackup.restore.completed", "ticketid": "INC-1", "data": {"ticketId": "INC-1", "vmId": VM,
                "restoredVmId": format!("{VM}-restored-inc-1"), "adeReinstalled": true}}),
            ),
            entry(
                9,
                json!({"type": "vmbackup.restore.rejected", "ticketid": "INC-2", "data": {"ticketId": "INC-2",
                "reason": "FileLevelRestoreUnsupported", "message": "files"}}),
            ),
            entry(10, json!("not an event")),
        ];
        let report = build(&facts(), &journal, 1, ArmCounts::default());
        let vm = &report.vms[0];
        assert_eq!(vm.protection.state, "protected");
        assert_eq!(vm.protection.vault.as_deref(), Some("rsv-weu"));
        assert_eq!(
            vm.backups,
            Backups {
                completed: 1,
                failed: 1
            }
        );
        assert_eq!(vm.restores.len(), 2);
        assert_eq!(vm.restores[0].state, "completed");
        assert!(vm.restores[0].ade_reinstalled);
        assert_eq!(vm.restores[1].state, "rejected");
        assert_eq!(
            vm.restores[1].reason.as_deref(),
            Some("FileLevelRestoreUnsupported")
        );
        assert_eq!(report.dead_lettered, 1);
        let table = summary_table(&report);
        assert!(table.contains("INC-2:rejected"), "{table}");
    }

    #[test]
    fn protection_without_events_comes_from_the_estate_and_requests_without_outcome_are_pending() {
        let mut protected = facts();
        protected[0].protected_by = Some(("rsv".into(), "Daily14".into()));
        let report = build(&protected, &[], 0, ArmCounts::default());
        assert_eq!(report.vms[0].protection.state, "protected");
        assert_eq!(report.vms[0].protection.policy.as_deref(), Some("Daily14"));

        let report = build(&facts(), &[], 0, ArmCounts::default());
        assert_eq!(report.vms[0].protection.state, "unprotected");

        let journal = vec![
            entry(
                1,
                json!({"type": "vmbackup.protection.rejected", "data": {"vmId": VM, "reason": "VmAgentNotReady"}}),
            ),
            entry(
                2,
                json!({"type": "vmbackup.protection.requested", "data": {"vmId": VM}}),
            ),
        ];
        let report = build(&facts(), &journal, 0, ArmCounts::default());
        assert_eq!(report.vms[0].protection.state, "pending");
    }

    #[test]
    fn without_an_estate_the_vms_named_in_events_are_reported() {
        let journal = vec![entry(
            1,
            json!({"type": "vmbackup.protection.rejected", "data": {"vmId": VM, "reason": "NoVaultInRegion",
                "encryption": {"kind": "host"}}}),
        )];
        let report = build(&[], &journal, 0, ArmCounts::default());
        assert_eq!(report.vms.len(), 1);
        assert_eq!(report.vms[0].name, "vm-1");
        assert_eq!(report.vms[0].encryption, "host");
        assert_eq!(
            report.vms[0].protection.reason.as_deref(),
            Some("NoVaultInRegion")
        );
    }
}
