//! `track-job`: follows one Azure Backup job (a backup or a restore) from `job.started` to its end.
//! A completed RestoreDisks job goes on to recreate-vm (`restore.disks-restored`); a completed
//! replace-existing or alternate-location job has restored the VM itself → `restore.completed`.
//!
//! Each invocation GETs the job once. While it runs, the function schedules its own next check
//! through Service Bus with a growing delay ([`JobTrackingPolicy`]), bounded in total. Check number
//! `n` of a job always travels under the same message id ([`job_check_message_id`]), so a
//! redelivered or duplicated check sends its successor under an id Service Bus has already seen and
//! duplicate detection keeps one chain.

use super::start_restore::{clear_mark, mark, DONE_PREFIX};
use super::Deps;
use crate::azure::backup::{BackupJob, JobErrorDetail};
use crate::azure::servicebus::OutgoingMessage;
use crate::azure::AzureError;
use crate::domain::backup::{
    classify_job, job_check_message_id, job_outcome_event_id, JobError, JobOutcome, JobStatus,
    JobTrackingPolicy, TrackingDecision,
};
use crate::domain::eligibility::key_vault_access_needs;
use crate::domain::encryption::{
    classify, AdeDiskSettingsFacts, DiskEncryptionFacts, EncryptionFactsError, EncryptionKind,
    VmEncryptionFacts,
};
use crate::domain::{ReasonCode, ResourceId};
use crate::events::{
    queues, AfterAccess, BackupCompleted, BackupFailed, CloudEvent, EventData, JobStarted,
    KeyVaultAccessNeeded, RestoreCompleted, RestoreContext, RestoreDisksRestored, RestoreFailed,
    TrackedJob,
};
use crate::runtime::{
    FunctionApp, FunctionSpec, HandlerError, Invocation, OutputBinding, Outputs, Trigger,
};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

pub const NAME: &str = "track-job";
/// `backup.completed`, `backup.failed`, `restore.completed`, `restore.failed` → notify.
const OUTCOMES: &str = "outcomes";
/// `key-vault.access-needed` → grant-key-vault-access.
const ACCESS_NEEDED: &str = "accessNeeded";
/// `restore.disks-restored` → recreate-vm.
const DISKS_RESTORED: &str = "disksRestored";

pub fn register(app: FunctionApp, deps: Arc<Deps>) -> FunctionApp {
    let spec = FunctionSpec::new(NAME, Trigger::service_bus(queues::JOB_TRACKING))
        .output(OutputBinding::service_bus(OUTCOMES, queues::OUTCOMES))
        .output(OutputBinding::service_bus(
            ACCESS_NEEDED,
            queues::KEY_VAULT_ACCESS,
        ))
        .output(OutputBinding::service_bus(
            DISKS_RESTORED,
            queues::RESTORE_DISKS_RESTORED,
        ));
    app.function(
        spec,
        move |invocation: Invocation<CloudEvent<JobStarted>>| {
            let deps = deps.clone();
            async move { track(&deps, invocation.data).await }
        },
    )
}

fn policy_for(job: &TrackedJob) -> JobTrackingPolicy {
    match job {
        TrackedJob::Backup { .. } => JobTrackingPolicy::backup(),
        TrackedJob::Restore(_) => JobTrackingPolicy::restore(),
    }
}

/// Send `event` through Service Bus under its own id, delivered no earlier than `at`.
pub(crate) async fn send_event<T: EventData>(
    deps: &Deps,
    event: &CloudEvent<T>,
    at: Option<DateTime<Utc>>,
) -> Result<(), HandlerError> {
    let sender = deps.sender.as_ref().ok_or_else(|| {
        HandlerError::transient(
            "no Service Bus is configured: scheduled follow-ups cannot be sent (set ServiceBusConnection__fullyQualifiedNamespace)",
        )
    })?;
    let message = OutgoingMessage {
        body: serde_json::to_value(event).map_err(HandlerError::transient)?,
        message_id: event.id.clone(),
        correlation_id: Some(event.correlationid.clone()),
        label: Some(T::TYPE.to_string()),
        scheduled_enqueue_time: at,
    };
    sender
        .send(T::QUEUE, &message)
        .await
        .map_err(|e| HandlerError::transient(e.to_string()))
}

/// What scheduling the next check came to.
pub(crate) enum Scheduled {
    At(DateTime<Utc>),
    /// The bound on total tracking time is spent.
    TimedOut,
}

/// Schedule status check `next.checks` of a job as a follow-up of `cause` (trigger-backup and
/// start-restore schedule check 0, track-job the ones after).
pub(crate) async fn schedule_check<C>(
    deps: &Deps,
    cause: &CloudEvent<C>,
    next: JobStarted,
    now: DateTime<Utc>,
) -> Result<Scheduled, HandlerError> {
    let decision = policy_for(&next.job).next_check(next.started_at, now, next.checks);
    let TrackingDecision::CheckAfter(delay) = decision else {
        return Ok(Scheduled::TimedOut);
    };
    let at = now + chrono::Duration::from_std(delay).unwrap_or_else(|_| chrono::Duration::zero());
    let id = job_check_message_id(&next.job_id, next.checks);
    let mut event = cause.follow(next, "", now);
    event.id = id;
    send_event(deps, &event, Some(at)).await?;
    Ok(Scheduled::At(at))
}

/// An event that ends a job's tracking: one id per job and type, whichever check sees the end.
fn ending_event<C, T: EventData>(
    cause: &CloudEvent<C>,
    job_id: &str,
    data: T,
    now: DateTime<Utc>,
) -> CloudEvent<T> {
    let mut event = cause.follow(data, "", now);
    event.id = job_outcome_event_id(job_id, T::TYPE);
    event
}

/// Azure's code of a failed call, when it named one.
pub(crate) fn azure_code(error: &AzureError) -> Option<String> {
    let code = match error {
        AzureError::Arm(e) => e.error.code.clone(),
        AzureError::OperationFailed { error, .. } => error.code.clone(),
        _ => return None,
    };
    (!code.is_empty()).then_some(code)
}

fn transient(context: &str, error: AzureError) -> HandlerError {
    HandlerError::transient(format!("{context}: {error}"))
}

fn job_errors(details: &[JobErrorDetail]) -> Vec<JobError> {
    details
        .iter()
        .map(|d| JobError {
            code: d
                .error_code
                .clone()
                .or_else(|| d.error_title.clone().filter(|t| !t.trim().is_empty()))
                .unwrap_or_default(),
            message: d.error_string.clone().unwrap_or_default(),
        })
        .collect()
}

async fn track(deps: &Deps, event: CloudEvent<JobStarted>) -> Result<Outputs, HandlerError> {
    let now = deps.clock.now();
    let tracked = &event.data;
    let mut outputs = Outputs::new();
    let job = match deps
        .backup
        .get_job(&tracked.vault_id.to_string(), &tracked.job_id)
        .await
    {
        Ok(job) => job,
        Err(e) if e.is_transient() => return Err(transient("cannot read the job", e)),
        Err(e) => {
            tracing::warn!(job_id = %tracked.job_id, error = %e, "the job cannot be read");
            let failure = JobOutcome::Failed {
                reason: ReasonCode::JobFailed,
                azure_code: azure_code(&e),
                message: format!("the job {} cannot be read: {e}", tracked.job_id),
            };
            finish(deps, &event, failure, None, now, &mut outputs).await?;
            return Ok(outputs);
        }
    };
    let status_text = job.properties.status.clone().unwrap_or_default();
    let outcome = match JobStatus::parse(&status_text) {
        Some(status) => {
            let remedy_applied = match &tracked.job {
                TrackedJob::Backup { remedy_applied, .. } => *remedy_applied,
                // A restore has no remedy of its own: a Key Vault failure is reported as is.
                TrackedJob::Restore(_) => true,
            };
            classify_job(
                status,
                &job_errors(&job.properties.error_details),
                remedy_applied,
            )
        }
        // A status this code does not know yet: keep watching rather than guess an end.
        None => {
            tracing::warn!(job_id = %tracked.job_id, status = %status_text, "unknown job status");
            JobOutcome::Running
        }
    };
    tracing::info!(job_id = %tracked.job_id, status = %status_text, check = tracked.checks, "job checked");
    finish(deps, &event, outcome, Some(&job), now, &mut outputs).await?;
    Ok(outputs)
}

async fn finish(
    deps: &Deps,
    event: &CloudEvent<JobStarted>,
    outcome: JobOutcome,
    job: Option<&BackupJob>,
    now: DateTime<Utc>,
    outputs: &mut Outputs,
) -> Result<(), HandlerError> {
    let tracked = &event.data;
    let outcome = match outcome {
        JobOutcome::Running => {
            let next = JobStarted {
                checks: tracked.checks.saturating_add(1),
                ..tracked.clone()
            };
            match schedule_check(deps, event, next, now).await? {
                Scheduled::At(at) => {
                    tracing::info!(job_id = %tracked.job_id, next_check = %at, "job still running");
                    return Ok(());
                }
                Scheduled::TimedOut => JobOutcome::Failed {
                    reason: ReasonCode::JobTrackingTimedOut,
                    azure_code: None,
                    message: format!(
                        "the job {} was still running when tracking gave up (started {})",
                        tracked.job_id, tracked.started_at
                    ),
                },
            }
        }
        other => other,
    };
    match &tracked.job {
        TrackedJob::Backup { retain_until, .. } => {
            backup_outcome(deps, event, outcome, *retain_until, now, outputs).await
        }
        TrackedJob::Restore(context) => {
            restore_outcome(deps, event, context, outcome, job, now, outputs).await
        }
    }
}

async fn backup_outcome(
    deps: &Deps,
    event: &CloudEvent<JobStarted>,
    outcome: JobOutcome,
    retain_until: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    outputs: &mut Outputs,
) -> Result<(), HandlerError> {
    let tracked = &event.data;
    let job_id = &tracked.job_id;
    let failed = |reason, azure_code, message| BackupFailed {
        vm_id: tracked.vm_id.clone(),
        job_id: Some(job_id.clone()),
        reason,
        message,
        azure_code,
    };
    match outcome {
        JobOutcome::Running => Ok(()),
        JobOutcome::Completed { with_warnings } => {
            let status = if with_warnings {
                "CompletedWithWarnings"
            } else {
                "Completed"
            };
            let data = BackupCompleted {
                vm_id: tracked.vm_id.clone(),
                vault_id: tracked.vault_id.clone(),
                job_id: job_id.clone(),
                status: status.to_string(),
            };
            tracing::info!(%job_id, status, "backup completed");
            outputs.push(OUTCOMES, &ending_event(event, job_id, data, now))?;
            Ok(())
        }
        JobOutcome::RemedyKeyVaultAccess => {
            let needs = match read_encryption(deps, &tracked.vm_id).await? {
                Ok(encryption) => key_vault_access_needs(&encryption),
                Err(e) => {
                    tracing::warn!(%job_id, error = %e, "the VM's encryption settings cannot be read");
                    Vec::new()
                }
            };
            if needs.is_empty() {
                let data = failed(
                    ReasonCode::KeyVaultPermissionsNotConfigured,
                    Some(crate::domain::backup::KEY_VAULT_PERMISSIONS_ERROR.to_string()),
                    "Azure Backup reports missing Key Vault permissions, but the VM's disks name no key vault to grant access to".to_string(),
                );
                outputs.push(OUTCOMES, &ending_event(event, job_id, data, now))?;
                return Ok(());
            }
            tracing::info!(%job_id, vaults = needs.len(), "backup failed on Key Vault permissions: asking for access, then a retry");
            let data = KeyVaultAccessNeeded {
                vm_id: tracked.vm_id.clone(),
                needs,
                then: AfterAccess::RetryBackup { retain_until },
            };
            outputs.push(ACCESS_NEEDED, &ending_event(event, job_id, data, now))?;
            Ok(())
        }
        JobOutcome::Failed {
            reason,
            azure_code,
            message,
        } => {
            tracing::warn!(%job_id, %reason, azure_code = azure_code.as_deref().unwrap_or(""), "backup failed");
            outputs.push(
                OUTCOMES,
                &ending_event(event, job_id, failed(reason, azure_code, message), now),
            )?;
            Ok(())
        }
    }
}

async fn restore_outcome(
    deps: &Deps,
    event: &CloudEvent<JobStarted>,
    context: &RestoreContext,
    outcome: JobOutcome,
    job: Option<&BackupJob>,
    now: DateTime<Utc>,
    outputs: &mut Outputs,
) -> Result<(), HandlerError> {
    let job_id = &event.data.job_id;
    match outcome {
        JobOutcome::Running => Ok(()),
        JobOutcome::Completed { .. } if context.job_restores_the_vm() => {
            let data = match vm_restored(deps, context, job_id).await? {
                Ok(completed) => {
                    tracing::info!(%job_id, ticket = %context.ticket_id, vm = %completed.restored_vm_id, mode = %context.mode, "restore completed");
                    outputs.push(OUTCOMES, &ending_event(event, job_id, completed, now))?;
                    return Ok(());
                }
                Err(message) => restore_failed(context, ReasonCode::JobFailed, None, message),
            };
            tracing::warn!(%job_id, ticket = %context.ticket_id, message = %data.message, "restore failed");
            outputs.push(OUTCOMES, &ending_event(event, job_id, data, now))?;
            Ok(())
        }
        JobOutcome::Completed { .. } => {
            let bag = job
                .and_then(|j| j.properties.extended_info.as_ref())
                .map(|info| info.property_bag.clone())
                .unwrap_or_default();
            let data = disks_restored(deps, context, job_id, &bag).await?;
            tracing::info!(%job_id, ticket = %context.ticket_id, "disks restored");
            outputs.push(DISKS_RESTORED, &ending_event(event, job_id, data, now))?;
            Ok(())
        }
        JobOutcome::RemedyKeyVaultAccess => {
            // Not produced for restores (see `track`); reported rather than dropped if it ever is.
            let data = restore_failed(
                context,
                ReasonCode::KeyVaultPermissionsNotConfigured,
                Some(crate::domain::backup::KEY_VAULT_PERMISSIONS_ERROR.to_string()),
                "the restore job failed on Key Vault permissions".to_string(),
            );
            outputs.push(OUTCOMES, &ending_event(event, job_id, data, now))?;
            Ok(())
        }
        JobOutcome::Failed {
            reason,
            azure_code,
            message,
        } => {
            tracing::warn!(%job_id, %reason, ticket = %context.ticket_id, "restore failed");
            let data = restore_failed(context, reason, azure_code, message);
            outputs.push(OUTCOMES, &ending_event(event, job_id, data, now))?;
            Ok(())
        }
    }
}

fn restore_failed(
    context: &RestoreContext,
    reason: ReasonCode,
    azure_code: Option<String>,
    message: String,
) -> RestoreFailed {
    RestoreFailed {
        ticket_id: context.ticket_id.clone(),
        vm_id: context.vm_id.clone(),
        reason,
        message,
        azure_code,
        callback_url: context.callback_url.clone(),
    }
}

/// A replace-existing or alternate-location job completed: the restored VM must exist. The ticket's
/// marker on the source VM then says done: `done:<job>` for replace-existing (the VM is its own
/// restored VM), removed for alternate-location (the new VM says it).
async fn vm_restored(
    deps: &Deps,
    context: &RestoreContext,
    job_id: &str,
) -> Result<Result<RestoreCompleted, String>, HandlerError> {
    let restored = match context.restored_vm_id() {
        Ok(id) => id,
        Err(e) => return Ok(Err(format!("the restored VM's id: {e}"))),
    };
    match deps.compute.get_vm(&restored.to_string(), false).await {
        Ok(_) => {}
        Err(e) if e.is_transient() => return Err(transient("cannot read the restored VM", e)),
        Err(e) => {
            return Ok(Err(format!(
            "the restore job {job_id} completed but the restored VM {restored} cannot be read: {e}"
        )))
        }
    }
    let marked = if context.replaces_existing() {
        mark(
            deps,
            &context.vm_id,
            &context.ticket_id,
            format!("{DONE_PREFIX}{job_id}"),
        )
        .await
    } else {
        clear_mark(deps, &context.vm_id, &context.ticket_id).await
    };
    match marked {
        Ok(()) => {}
        Err(e) if e.is_transient() => return Err(transient("updating the ticket's marker", e)),
        Err(e) => {
            tracing::warn!(error = %e, ticket = %context.ticket_id, "could not update the ticket's marker")
        }
    }
    Ok(Ok(RestoreCompleted {
        ticket_id: context.ticket_id.clone(),
        vm_id: context.vm_id.clone(),
        restored_vm_id: restored,
        ade_reinstalled: false,
        callback_url: context.callback_url.clone(),
    }))
}

/// Property bag keys of a RestoreDisks job (Get-AzRecoveryServicesBackupJobDetail, research-anchors A5).
mod bag {
    pub const STORAGE_ACCOUNT: &str = "Target Storage Account Name";
    pub const CONTAINER: &str = "Config Blob Container Name";
    pub const CONFIG_BLOB: &str = "Config Blob Name";
    pub const CONFIG_URI: &str = "Config Blob Uri";
    pub const TEMPLATE_URI: &str = "Template Blob Uri";
    pub const ENCRYPTION_INFO_BLOB: &str = "Encryption Info Blob Name";
    pub const ENCRYPTION_INFO_URI: &str = "Encryption Info Blob Uri";
}

/// The staging account named in the bag: its id and blob endpoint, found in the VM's subscription.
async fn staging_account(
    deps: &Deps,
    context: &RestoreContext,
    name: &str,
) -> Result<Option<(ResourceId, Option<String>)>, HandlerError> {
    // Storage account names are 3-24 lower-case letters and digits: nothing to escape in the query.
    if !name.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Ok(None);
    }
    let query = format!(
        "Resources | where type =~ 'microsoft.storage/storageaccounts' and name =~ '{name}' | project id, properties"
    );
    let rows = deps
        .graph
        .query(&query, &[context.vm_id.subscription_id().to_string()])
        .await
        .map_err(|e| transient("cannot look up the staging storage account", e))?;
    Ok(rows.first().and_then(|row| {
        let id = ResourceId::parse(row["id"].as_str()?).ok()?;
        let blob = row
            .pointer("/properties/primaryEndpoints/blob")
            .and_then(Value::as_str)
            .map(str::to_string);
        Some((id, blob))
    }))
}

async fn disks_restored(
    deps: &Deps,
    context: &RestoreContext,
    job_id: &str,
    bag: &BTreeMap<String, String>,
) -> Result<RestoreDisksRestored, HandlerError> {
    let get = |key: &str| bag.get(key).filter(|v| !v.trim().is_empty()).cloned();
    let account = match get(bag::STORAGE_ACCOUNT) {
        Some(name) => staging_account(deps, context, &name).await?,
        None => None,
    };
    let endpoint = account.as_ref().and_then(|(_, blob)| blob.clone());
    let container = get(bag::CONTAINER);
    // A URI from the bag when Azure gives one, else built from the account's endpoint and the names.
    let blob_uri = |uri_key: &str, name_key: &str| {
        get(uri_key).or_else(|| {
            let (endpoint, container, name) =
                (endpoint.as_ref()?, container.as_ref()?, get(name_key)?);
            Some(format!(
                "{}/{container}/{name}",
                endpoint.trim_end_matches('/')
            ))
        })
    };
    Ok(RestoreDisksRestored {
        restore: context.clone(),
        job_id: job_id.to_string(),
        template_blob_uri: get(bag::TEMPLATE_URI),
        config_blob_uri: blob_uri(bag::CONFIG_URI, bag::CONFIG_BLOB),
        encryption_info_blob_uri: blob_uri(bag::ENCRYPTION_INFO_URI, bag::ENCRYPTION_INFO_BLOB),
        target_storage_account_id: account.map(|(id, _)| id),
    })
}

fn ade_facts(
    collection: &crate::azure::compute::EncryptionSettingsCollection,
) -> Option<AdeDiskSettingsFacts> {
    let element = collection.encryption_settings.first()?;
    let secret = element.disk_encryption_key.as_ref();
    let key = element.key_encryption_key.as_ref();
    let non_empty = |s: &str| (!s.trim().is_empty()).then(|| s.to_string());
    Some(AdeDiskSettingsFacts {
        enabled: collection.enabled,
        secret_url: secret.and_then(|s| non_empty(&s.secret_url)),
        secret_vault_id: secret.and_then(|s| non_empty(&s.source_vault.id)),
        key_url: key.and_then(|k| non_empty(&k.key_url)),
        key_vault_id: key.and_then(|k| non_empty(&k.source_vault.id)),
    })
}

/// The VM's encryption as its managed disks report it now (the key vaults may have changed since
/// protection was enabled).
async fn read_encryption(
    deps: &Deps,
    vm_id: &ResourceId,
) -> Result<Result<EncryptionKind, EncryptionFactsError>, HandlerError> {
    let vm = deps
        .compute
        .get_vm(&vm_id.to_string(), false)
        .await
        .map_err(|e| transient("cannot read the VM", e))?;
    let storage = &vm.properties.storage_profile;
    let disk_ids = storage
        .os_disk
        .iter()
        .map(|d| d.managed_disk.as_ref())
        .chain(storage.data_disks.iter().map(|d| d.managed_disk.as_ref()));
    let mut disks = Vec::new();
    for managed in disk_ids {
        let mut facts = DiskEncryptionFacts {
            disk_encryption_set_id: managed
                .and_then(|m| m.disk_encryption_set.as_ref())
                .map(|des| des.id.clone())
                .filter(|id| !id.is_empty()),
            ade: None,
        };
        if let Some(id) = managed.and_then(|m| m.id.as_deref()) {
            let disk = deps
                .compute
                .get_disk(id)
                .await
                .map_err(|e| transient("cannot read a disk of the VM", e))?;
            facts.ade = disk
                .properties
                .encryption_settings_collection
                .as_ref()
                .and_then(ade_facts);
        }
        disks.push(facts);
    }
    let mut disks = disks.into_iter();
    let facts = VmEncryptionFacts {
        os_disk: disks.next().unwrap_or_default(),
        data_disks: disks.collect(),
        ade_extension: None,
        encryption_at_host: vm
            .properties
            .security_profile
            .as_ref()
            .and_then(|p| p.encryption_at_host)
            .unwrap_or(false),
    };
    Ok(classify(&facts))
}
