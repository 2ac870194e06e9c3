//! `backup-sweep` (timer): asks for an on-demand backup of every protected VM carrying the
//! `backup-policy` tag in the configured subscriptions.
//!
//! The whole estate is read in a few paged calls (Resource Graph for tagged VMs and protected items,
//! one job list per vault for today's backups), never one call per VM. Requests go out as Service
//! Bus messages, scheduled per [`SweepPacing`] so that trigger-backup's ARM writes stay within the
//! subscription's write budget instead of bursting past it.

use super::track_job::send_event;
use super::trigger_backup::{backups_started_between, ARM_WRITES_PER_REQUEST};
use super::{settings, Deps};
use crate::domain::backup::{
    container_vm, on_demand_allowed, retain_until, sweep_request_id, utc_day, SweepPacing,
};
use crate::domain::eligibility::{tag_value, BACKUP_POLICY_TAG};
use crate::domain::ResourceId;
use crate::events::{queues, BackupRejected, BackupRequested, BackupRequester, CloudEvent};
use crate::runtime::{
    FunctionApp, FunctionSpec, HandlerError, Invocation, OutputBinding, Outputs, TimerInfo, Trigger,
};
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub const NAME: &str = "backup-sweep";
/// `backup.rejected` (a VM whose retention tag is unusable) → notify.
const OUTCOMES: &str = "outcomes";
/// Service Bus sends in flight at once.
const SEND_CONCURRENCY: usize = 16;

const TAGGED_VMS: &str =
    "Resources | where type =~ 'microsoft.compute/virtualmachines' | project id, tags";
const PROTECTED_ITEMS: &str = "RecoveryServicesResources | where type =~ 'microsoft.recoveryservices/vaults/backupfabrics/protectioncontainers/protecteditems' and properties.backupManagementType =~ 'AzureIaasVM' | project id, properties";

pub fn register(app: FunctionApp, deps: Arc<Deps>) -> FunctionApp {
    let schedule = format!("%{}%", settings::BACKUP_SCHEDULE);
    let spec = FunctionSpec::new(NAME, Trigger::timer(&schedule))
        .output(OutputBinding::service_bus(OUTCOMES, queues::OUTCOMES));
    app.function(spec, move |_: Invocation<TimerInfo>| {
        let deps = deps.clone();
        async move { sweep(&deps).await }
    })
}

/// The sweep's pacing: trigger-backup makes [`ARM_WRITES_PER_REQUEST`] ARM writes per request.
pub fn pacing() -> SweepPacing {
    SweepPacing {
        writes_per_message: ARM_WRITES_PER_REQUEST,
        ..SweepPacing::default()
    }
}

/// What one sweep did, for its log line and the benchmark.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepSummary {
    pub tagged: usize,
    pub requested: usize,
    pub at_daily_limit: usize,
    pub not_protected: usize,
    pub rejected: usize,
}

async fn sweep(deps: &Deps) -> Result<Outputs, HandlerError> {
    let mut outputs = Outputs::new();
    let summary = run(deps, &mut outputs).await?;
    tracing::info!(
        tagged = summary.tagged,
        requested = summary.requested,
        at_daily_limit = summary.at_daily_limit,
        not_protected = summary.not_protected,
        rejected = summary.rejected,
        "backup sweep done"
    );
    Ok(outputs)
}

fn transient(context: &str, error: crate::azure::AzureError) -> HandlerError {
    HandlerError::transient(format!("{context}: {error}"))
}

/// Run one sweep: requests leave through Service Bus, rejections go to `outputs`.
pub async fn run(deps: &Deps, outputs: &mut Outputs) -> Result<SweepSummary, HandlerError> {
    let now = deps.clock.now();
    let subscriptions = &deps.settings.subscriptions;
    let mut summary = SweepSummary::default();
    if subscriptions.is_empty() {
        tracing::warn!(
            setting = settings::SUBSCRIPTIONS,
            "no subscriptions configured: nothing to sweep"
        );
        return Ok(summary);
    }
    let tagged = tagged_vms(deps, subscriptions).await?;
    summary.tagged = tagged.len();
    let protected = protected_vms(deps, subscriptions).await?;
    let vaults: BTreeMap<String, &ResourceId> =
        protected.values().map(|v| (v.canonical(), v)).collect();
    let mut backups_today: HashMap<(String, String, String), u32> = HashMap::new();
    for vault in vaults.into_values() {
        count_backups_today(deps, vault, now, &mut backups_today).await?;
    }

    let day = utc_day(now);
    let pacing = pacing();
    let mut requests = Vec::new();
    for (vm_id, tags) in tagged {
        let Some(vault) = protected.get(&vm_id.canonical()) else {
            // Protecting it is the discovery sweep's work.
            summary.not_protected += 1;
            continue;
        };
        let key = (
            vault.canonical(),
            vm_id
                .resource_group()
                .unwrap_or_default()
                .to_ascii_lowercase(),
            vm_id.name().to_ascii_lowercase(),
        );
        let count = backups_today.get(&key).copied().unwrap_or(0);
        if !on_demand_allowed(count) {
            summary.at_daily_limit += 1;
            continue;
        }
        let id = sweep_request_id(&vm_id, day, count);
        let subject = Some(vm_id.to_string());
        match retain_until(now, &tags, deps.settings.default_retention_days) {
            Ok(until) => {
                let data = BackupRequested {
                    vm_id,
                    retain_until: Some(until),
                    requested_by: BackupRequester::Sweep,
                    remedy_applied: false,
                };
                // The request happens when it is delivered: trigger-backup counts a backup
                // started after that time as serving it.
                let at = deliver_at(&pacing, requests.len(), now);
                let event = CloudEvent::start_with_id(data, subject, at.unwrap_or(now), id);
                requests.push((event, at));
            }
            Err(rejection) => {
                summary.rejected += 1;
                let data = BackupRejected {
                    vm_id,
                    reason: rejection.code,
                    message: rejection.message,
                };
                outputs.push(OUTCOMES, &CloudEvent::start_with_id(data, subject, now, id))?;
            }
        }
    }
    summary.requested = requests.len();
    send_paced(deps, requests).await?;
    Ok(summary)
}

/// When request number `index` is delivered; `None` for at once.
fn deliver_at(pacing: &SweepPacing, index: usize, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let delay = pacing.delay_for(u32::try_from(index).unwrap_or(u32::MAX));
    (!delay.is_zero()).then(|| {
        now + chrono::Duration::from_std(delay).unwrap_or_else(|_| chrono::Duration::zero())
    })
}

/// Send the requests, each delayed per the pacing; a retry of a failed sweep re-sends under the same
/// ids, which Service Bus drops as duplicates.
async fn send_paced(
    deps: &Deps,
    requests: Vec<(CloudEvent<BackupRequested>, Option<DateTime<Utc>>)>,
) -> Result<(), HandlerError> {
    let failures: Vec<HandlerError> = stream::iter(requests)
        .map(|(event, at)| async move { send_event(deps, &event, at).await })
        .buffer_unordered(SEND_CONCURRENCY)
        .filter_map(|result| async move { result.err() })
        .collect()
        .await;
    match failures.into_iter().next() {
        None => Ok(()),
        Some(first) => Err(HandlerError::transient(format!(
            "some backup requests could not be sent: {first}"
        ))),
    }
}

/// Every VM of the subscriptions that carries a `backup-policy` tag, with its tags.
async fn tagged_vms(
    deps: &Deps,
    subscriptions: &[String],
) -> Result<Vec<(ResourceId, BTreeMap<String, String>)>, HandlerError> {
    let rows = deps
        .graph
        .query(TAGGED_VMS, subscriptions)
        .await
        .map_err(|e| transient("cannot list the VMs", e))?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let id = ResourceId::parse(row["id"].as_str()?).ok()?;
            let tags: BTreeMap<String, String> = row["tags"]
                .as_object()?
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect();
            tag_value(&tags, BACKUP_POLICY_TAG)
                .is_some_and(|policy| !policy.trim().is_empty())
                .then_some((id, tags))
        })
        .collect())
}

/// Protected VMs (canonical id) → the vault protecting them. Items whose protection is stopped are left out.
async fn protected_vms(
    deps: &Deps,
    subscriptions: &[String],
) -> Result<HashMap<String, ResourceId>, HandlerError> {
    let rows = deps
        .graph
        .query(PROTECTED_ITEMS, subscriptions)
        .await
        .map_err(|e| transient("cannot list the protected items", e))?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let state = row
                .pointer("/properties/protectionState")
                .and_then(Value::as_str);
            if state.is_some_and(|s| s.eq_ignore_ascii_case("ProtectionStopped")) {
                return None;
            }
            let vm = row.pointer("/properties/sourceResourceId")?.as_str()?;
            let vm = ResourceId::parse(vm).ok()?;
            // The item's id starts with its vault's: `{vault}/backupFabrics/…`.
            let item_id = row["id"].as_str()?;
            let vault_end = item_id.to_ascii_lowercase().find("/backupfabrics/")?;
            let vault = ResourceId::parse(&item_id[..vault_end]).ok()?;
            Some((vm.canonical(), vault))
        })
        .collect())
}

/// Add the vault's on-demand backup jobs of today (UTC), per `(vault, resource group, VM)`.
async fn count_backups_today(
    deps: &Deps,
    vault: &ResourceId,
    now: DateTime<Utc>,
    counts: &mut HashMap<(String, String, String), u32>,
) -> Result<(), HandlerError> {
    let midnight = utc_day(now)
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc();
    let jobs = backups_started_between(deps, vault, midnight, now)
        .await
        .map_err(|e| transient("cannot list today's backup jobs", e))?;
    for job in jobs {
        // The policy's scheduled backup does not count against the on-demand limit.
        if job.properties.is_user_triggered == Some(false) {
            continue;
        }
        let started_today = job
            .properties
            .start_time
            .is_none_or(|start| utc_day(start) == utc_day(now));
        let Some((resource_group, vm)) = job
            .properties
            .container_name
            .as_deref()
            .and_then(container_vm)
        else {
            continue;
        };
        if started_today {
            *counts
                .entry((vault.canonical(), resource_group, vm))
                .or_insert(0) += 1;
        }
    }
    Ok(())
}
