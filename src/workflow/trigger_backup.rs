//! `trigger-backup`: starts an on-demand backup of a protected VM, or attaches to the one already
//! running, and schedules the first status check of the job for `track-job`.

use super::track_job::{azure_code, schedule_check, Scheduled};
use super::Deps;
use crate::azure::backup::{BackupJob, ProtectedItemRef};
use crate::azure::AzureError;
use crate::domain::backup::container_is_vm;
use crate::domain::{ReasonCode, ResourceId};
use crate::events::{
    queues, BackupFailed, BackupRejected, BackupRequested, CloudEvent, JobStarted, TrackedJob,
};
use crate::runtime::{
    FunctionApp, FunctionSpec, HandlerError, Invocation, OutputBinding, Outputs, Trigger,
};
use chrono::{DateTime, SubsecRound, Utc};
use std::sync::Arc;

pub const NAME: &str = "trigger-backup";
/// ARM writes one request costs: the `backupStatus` POST and the backup POST (the sweep paces by it).
pub const ARM_WRITES_PER_REQUEST: u32 = 2;
/// `backup.rejected` and `backup.failed` → notify.
const OUTCOMES: &str = "outcomes";
/// Azure Backup's answer to a second backup of an item while one runs.
const BACKUP_IN_PROGRESS: &str = "UserErrorBackupOperationInProgress";
/// Time format of a job list `$filter` (as the Backup SDKs send it).
const JOB_FILTER_TIME: &str = "%Y-%m-%d %I:%M:%S %p";

/// The vault's backup jobs that started between `from` and `to` (whole seconds).
pub(crate) async fn backups_started_between(
    deps: &Deps,
    vault_id: &ResourceId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<BackupJob>, AzureError> {
    let filter = format!(
        "operation eq 'Backup' and startTime eq '{}' and endTime eq '{}'",
        from.format(JOB_FILTER_TIME),
        to.format(JOB_FILTER_TIME)
    );
    deps.backup
        .list_jobs(&vault_id.to_string(), Some(&filter))
        .await
}
/// The running backup jobs of a vault.
const IN_PROGRESS_BACKUPS: &str = "operation eq 'Backup' and status eq 'InProgress'";

pub fn register(app: FunctionApp, deps: Arc<Deps>) -> FunctionApp {
    let spec = FunctionSpec::new(NAME, Trigger::service_bus(queues::BACKUP_REQUESTS))
        .output(OutputBinding::service_bus(OUTCOMES, queues::OUTCOMES));
    app.function(
        spec,
        move |invocation: Invocation<CloudEvent<BackupRequested>>| {
            let deps = deps.clone();
            async move { trigger(&deps, invocation.data).await }
        },
    )
}

/// How a request ends in this function when no job is tracked.
enum Refusal {
    Rejected(ReasonCode, String),
    Failed(AzureError),
}

async fn trigger(deps: &Deps, event: CloudEvent<BackupRequested>) -> Result<Outputs, HandlerError> {
    let now = deps.clock.now();
    let mut outputs = Outputs::new();
    let vm_id = event.data.vm_id.clone();
    // A backup of the VM started after the request was made serves it: that is how a redelivery
    // (or a copy processed while the first attempt's job already ended) finds the job it started.
    let served_since = event.time.min(now);
    let job = match start_or_attach(deps, &event.data, served_since).await? {
        Ok(job) => job,
        Err(Refusal::Rejected(reason, message)) => {
            tracing::info!(vm = %vm_id, %reason, "backup rejected");
            let data = BackupRejected {
                vm_id,
                reason,
                message,
            };
            outputs.push(OUTCOMES, &event.follow(data, "", now))?;
            return Ok(outputs);
        }
        Err(Refusal::Failed(error)) => {
            tracing::warn!(vm = %vm_id, %error, "Azure refused the backup");
            let data = BackupFailed {
                vm_id,
                job_id: None,
                reason: ReasonCode::JobFailed,
                azure_code: azure_code(&error),
                message: error.to_string(),
            };
            outputs.push(OUTCOMES, &event.follow(data, "", now))?;
            return Ok(outputs);
        }
    };
    let request = &event.data;
    let started = JobStarted {
        vm_id: vm_id.clone(),
        vault_id: job.vault_id,
        job_id: job.job_id.clone(),
        started_at: job.started_at.unwrap_or(now),
        checks: 0,
        job: TrackedJob::Backup {
            retain_until: request.retain_until,
            requested_by: request.requested_by,
            remedy_applied: request.remedy_applied,
        },
    };
    match schedule_check(deps, &event, started, now).await? {
        Scheduled::At(at) => {
            tracing::info!(vm = %vm_id, job_id = %job.job_id, attached = job.attached, first_check = %at, "backup job tracked");
        }
        Scheduled::TimedOut => {
            let data = BackupFailed {
                vm_id,
                job_id: Some(job.job_id.clone()),
                reason: ReasonCode::JobTrackingTimedOut,
                azure_code: None,
                message: format!(
                    "the backup job {} has run longer than tracking allows",
                    job.job_id
                ),
            };
            outputs.push(OUTCOMES, &event.follow(data, "", now))?;
        }
    }
    Ok(outputs)
}

/// The job this request is tracked by.
struct FoundJob {
    vault_id: ResourceId,
    job_id: String,
    started_at: Option<DateTime<Utc>>,
    /// True when the job was already running (another request started it).
    attached: bool,
}

fn transient(context: &str, error: AzureError) -> HandlerError {
    HandlerError::transient(format!("{context}: {error}"))
}

/// Transient errors are the host's to retry; any other error is Azure's final answer.
fn settle<T>(
    context: &str,
    result: Result<T, AzureError>,
) -> Result<Result<T, Refusal>, HandlerError> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(e) if e.is_transient() => Err(transient(context, e)),
        Err(e) => Ok(Err(Refusal::Failed(e))),
    }
}

async fn start_or_attach(
    deps: &Deps,
    request: &BackupRequested,
    served_since: DateTime<Utc>,
) -> Result<Result<FoundJob, Refusal>, HandlerError> {
    let vm_id = &request.vm_id;
    let vm = match deps.compute.get_vm(&vm_id.to_string(), false).await {
        Err(e) if e.is_not_found() => {
            return Ok(Err(Refusal::Rejected(
                ReasonCode::NotProtected,
                format!("the VM {vm_id} does not exist"),
            )))
        }
        other => match settle("cannot read the VM", other)? {
            Ok(vm) => vm,
            Err(refusal) => return Ok(Err(refusal)),
        },
    };
    let status = match settle(
        "cannot ask Azure Backup whether the VM is protected",
        deps.backup
            .backup_status(vm_id.subscription_id(), &vm.location, &vm_id.to_string())
            .await,
    )? {
        Ok(status) => status,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let protected = status
        .protection_status
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("Protected"));
    let item = ProtectedItemRef::from_backup_status(&status).filter(|item| {
        protected && !item.vault_id.is_empty() && !item.protected_item_name.is_empty()
    });
    let Some(item) = item else {
        return Ok(Err(Refusal::Rejected(
            ReasonCode::NotProtected,
            format!(
                "the VM {vm_id} is not protected by Azure Backup in {}",
                vm.location
            ),
        )));
    };
    let vault_id = ResourceId::parse(&item.vault_id).map_err(|e| {
        HandlerError::transient(format!(
            "Azure Backup named an invalid vault id {:?}: {e}",
            item.vault_id
        ))
    })?;
    if let Some(job) = running_backup(deps, &vault_id, vm_id).await? {
        return Ok(Ok(job));
    }
    if let Some(job) = backup_started_since(deps, &vault_id, vm_id, served_since).await? {
        return Ok(Ok(job));
    }
    match deps
        .backup
        .trigger_backup(&item, request.retain_until)
        .await
    {
        Ok(Some(job_id)) => Ok(Ok(FoundJob {
            vault_id,
            job_id,
            started_at: None,
            attached: false,
        })),
        // Accepted without naming the job, or refused because one started meanwhile: find it.
        Ok(None) => running_backup(deps, &vault_id, vm_id)
            .await?
            .map(Ok)
            .ok_or_else(|| {
                HandlerError::transient(
                    "Azure accepted the backup but named no job, and none is running",
                )
            }),
        Err(e) if e.has_code(BACKUP_IN_PROGRESS) => {
            match running_backup(deps, &vault_id, vm_id).await? {
                Some(job) => Ok(Ok(job)),
                None => Err(transient(
                    "a backup was reported running but is not listed",
                    e,
                )),
            }
        }
        Err(e) => settle("cannot start the backup", Err(e)),
    }
}

fn is_backup_of(job: &BackupJob, vm_id: &ResourceId) -> bool {
    match job.properties.container_name.as_deref() {
        Some(container) => container_is_vm(container, vm_id),
        // Without a container name only the VM's name is known.
        None => job
            .properties
            .entity_friendly_name
            .as_deref()
            .is_some_and(|name| name.eq_ignore_ascii_case(vm_id.name())),
    }
}

/// The VM's backup job that is running now, if any.
async fn running_backup(
    deps: &Deps,
    vault_id: &ResourceId,
    vm_id: &ResourceId,
) -> Result<Option<FoundJob>, HandlerError> {
    let jobs = deps
        .backup
        .list_jobs(&vault_id.to_string(), Some(IN_PROGRESS_BACKUPS))
        .await
        .map_err(|e| transient("cannot list the vault's running backups", e))?;
    Ok(first_backup_of(jobs, vault_id, vm_id, |job| {
        !job.properties.is_finished()
    }))
}

/// The VM's backup job started at or after `since` (whatever its status), if any.
async fn backup_started_since(
    deps: &Deps,
    vault_id: &ResourceId,
    vm_id: &ResourceId,
    since: DateTime<Utc>,
) -> Result<Option<FoundJob>, HandlerError> {
    let jobs = backups_started_between(deps, vault_id, since, deps.clock.now())
        .await
        .map_err(|e| transient("cannot list the vault's recent backups", e))?;
    // The filter's time has whole seconds: check the start precisely.
    Ok(first_backup_of(jobs, vault_id, vm_id, |job| {
        job.properties
            .start_time
            .is_some_and(|start| start >= since.trunc_subsecs(0))
    }))
}

fn first_backup_of(
    jobs: Vec<BackupJob>,
    vault_id: &ResourceId,
    vm_id: &ResourceId,
    wanted: impl Fn(&BackupJob) -> bool,
) -> Option<FoundJob> {
    jobs.into_iter()
        .filter(|job| wanted(job))
        .find(|job| is_backup_of(job, vm_id))
        .map(|job| FoundJob {
            vault_id: vault_id.clone(),
            job_id: job.name,
            started_at: job.properties.start_time,
            attached: true,
        })
}
