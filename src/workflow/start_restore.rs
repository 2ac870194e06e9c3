//! `start-restore` (`restore.requested`): validate a ticket's restore request against the VM's
//! protection, its recovery points and the app's scopes, then start the Azure Backup restore and hand
//! the job to track-job (`job.started`), or answer `restore.rejected` with a reason code. Modes:
//! `restore-disks` → `RestoreDisks` (the only one for ADE VMs); for non-ADE VMs `replace-existing` →
//! `OriginalLocation` (the VM must exist) and `alternate-location` → `AlternateLocation`, a new VM
//! named `restored_vm_name` in the target group, in the source VM's subnet (read from its primary
//! NIC) unless the request names `targetSubnetId`.
//!
//! The queue accepts the CloudEvent `vmbackup.restore.requested` and, for ticket systems that cannot
//! build a CloudEvent, the bare request JSON (`RestoreRequestFields`).
//!
//! One restore per ticket: before triggering, the source VM gets the tag
//! `vmbackup-restore-<ticket>` = `pending:<time>:<request hash>`, then `job:<id>` once Azure accepted
//! the restore. A later request with the same ticket finds the tag (in flight, or done when the job
//! completed), `done:<job>` (a replace-existing restore completed: the VM itself is the restored one)
//! or the restored VM (done, tag already removed by reinstall-ade or track-job) and starts nothing.
//! Copies of one request never both get here: every door sends a request under
//! [`request_message_id`](crate::domain::restore::request_message_id) and Service Bus keeps one.
//! Two *different* requests for one ticket racing each other are kept apart by ARM's optimistic
//! concurrency: the pending marker is written with a VM PATCH of all its tags under `If-Match` of the
//! etag read with them, so only one wins; the loser reads the VM again and finds the winner's fresh
//! marker. The request hash in the marker lets a redelivery of the winning request (it may have died
//! between marker and trigger) recognise its own marker and go on.

use super::track_job::{azure_code, send_event};
use super::Deps;
use crate::azure::backup::{
    EncryptionDetails, IaasVmRestoreRequest, KeyAndSecretDetails, ProtectedItemRef,
};
use crate::azure::compute::{is_precondition_failed, TagsOperation, VirtualMachine};
use crate::azure::AzureError;
use crate::domain::encryption::{AdeKeys, EncryptionKind, Kek};
use crate::domain::restore::{
    choose_recovery_point, plan_restore, request_digest, split_object_url, validate_request,
    AllowedScopes, AzureRecoveryType, RecoveryPoint, RecoveryPointSelector,
    RestoreContext as PlanContext, RestoreRequestFields,
};
use crate::domain::{ReasonCode, Rejection, ResourceId};
use crate::events::{
    queues, CloudEvent, EventData, JobStarted, RestoreContext, RestoreFailed, RestoreRejected,
    TrackedJob,
};
use crate::runtime::{FunctionSpec, HandlerError, Invocation, OutputBinding, Outputs, Trigger};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

pub const NAME: &str = "start-restore";
/// Output binding for `restore.rejected` / `restore.failed`.
pub const OUTCOME: &str = "outcome";
/// Output binding for `job.started` when no Service Bus sender is configured (sent at once).
pub const TRACKING: &str = "tracking";

pub fn spec() -> FunctionSpec {
    FunctionSpec::new(NAME, Trigger::service_bus(queues::RESTORE_REQUESTS))
        .output(OutputBinding::service_bus(OUTCOME, queues::OUTCOMES))
        .output(OutputBinding::service_bus(TRACKING, queues::JOB_TRACKING))
}

/// The tag on the source VM that marks a ticket's restore.
pub fn ticket_tag(ticket_id: &str) -> String {
    format!("vmbackup-restore-{}", ticket_id.to_ascii_lowercase())
}

const PENDING_PREFIX: &str = "pending:";
const JOB_PREFIX: &str = "job:";
/// A replace-existing restore completed (the VM is its own restored VM, so the tag stays).
pub(crate) const DONE_PREFIX: &str = "done:";
/// How long another request's pending marker (with no job found for it) holds the ticket: it is
/// between its marker and its trigger, seconds apart; an older one died and is taken over.
const PENDING_HOLDS_FOR: chrono::Duration = chrono::Duration::minutes(10);
/// Conditional marker writes lost to another write of the VM before the message is retried.
const MARKER_ATTEMPTS: u32 = 5;

/// A transient Azure error becomes a retry; anything else is returned for the caller to report.
pub(crate) fn transient_or(error: AzureError) -> Result<AzureError, HandlerError> {
    if error.is_transient() {
        Err(HandlerError::transient(error))
    } else {
        Ok(error)
    }
}

/// `restore.failed` for a step that Azure refused for good.
pub(crate) fn restore_failed<T: EventData>(
    cause: &CloudEvent<T>,
    restore: &RestoreContext,
    message: String,
    error: Option<&AzureError>,
    now: DateTime<Utc>,
) -> CloudEvent<RestoreFailed> {
    cause.follow(
        RestoreFailed {
            ticket_id: restore.ticket_id.clone(),
            vm_id: restore.vm_id.clone(),
            reason: ReasonCode::JobFailed,
            message,
            azure_code: error.and_then(azure_code),
            callback_url: restore.callback_url.clone(),
        },
        "",
        now,
    )
}

/// The request as a CloudEvent: the envelope as sent, or a bare body wrapped with an id derived from
/// the message id (so a redelivery yields the same follow-up ids).
fn request_event(
    value: Value,
    message_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<CloudEvent<RestoreRequestFields>, Rejection> {
    if value.get("specversion").is_some() {
        let envelope: CloudEvent<Value> =
            serde_json::from_value(value).map_err(|e| Rejection::invalid_field("message", e))?;
        CloudEvent::<RestoreRequestFields>::check_envelope(&envelope)
            .map_err(|e| Rejection::invalid_field("message", e))?;
        let (envelope, data) = envelope.replace_data(());
        let data: RestoreRequestFields =
            serde_json::from_value(data).map_err(|e| Rejection::invalid_field("data", e))?;
        return Ok(envelope.replace_data(data).0);
    }
    let fields: RestoreRequestFields =
        serde_json::from_value(value.clone()).map_err(|e| Rejection::invalid_field("body", e))?;
    let id = match message_id {
        Some(id) => id.to_string(),
        None => {
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, value.to_string().as_bytes()).to_string()
        }
    };
    let subject = fields.vm_id.clone();
    let ticket = fields.ticket_id.clone();
    let mut event = CloudEvent::start_with_id(fields, subject, now, id);
    event.ticketid = ticket;
    Ok(event)
}

fn rejected(
    cause: &CloudEvent<RestoreRequestFields>,
    rejection: Rejection,
    now: DateTime<Utc>,
) -> CloudEvent<RestoreRejected> {
    let fields = &cause.data;
    cause.follow(
        RestoreRejected {
            ticket_id: fields.ticket_id.clone(),
            vm_id: fields.vm_id.clone(),
            reason: rejection.code,
            message: rejection.message,
            callback_url: fields.callback_url.clone(),
        },
        "",
        now,
    )
}

fn allowed_scopes(deps: &Deps) -> AllowedScopes {
    let mut scopes = AllowedScopes::default();
    for scope in deps.settings.effective_scopes() {
        if scope.is_subscription() {
            scopes
                .subscriptions
                .push(scope.subscription_id().to_string());
        } else {
            scopes.resource_groups.push(scope);
        }
    }
    scopes
}

/// Where the VM is protected, found through Resource Graph's `RecoveryServicesResources` (the
/// protected item outlives a deleted VM): the item and the vault's region.
async fn find_protected_item(
    deps: &Deps,
    vm_id: &ResourceId,
) -> Result<Option<(ProtectedItemRef, String)>, AzureError> {
    // ARM ids hold no quotes; a VM id that passed validation cannot break out of the literal.
    let query = format!(
        "RecoveryServicesResources | where type =~ 'microsoft.recoveryservices/vaults/backupfabrics/protectioncontainers/protecteditems' and properties.sourceResourceId =~ '{vm_id}' | project id, location, properties"
    );
    let rows = deps
        .graph
        .query(&query, &[vm_id.subscription_id().to_string()])
        .await?;
    for row in rows {
        let state = row
            .pointer("/properties/protectionState")
            .and_then(Value::as_str);
        // A stopped protection with retained data still restores from its recovery points.
        if state == Some("NotProtected") {
            continue;
        }
        let Some(vault_id) = row.pointer("/properties/vaultId").and_then(Value::as_str) else {
            continue;
        };
        let location = row["location"].as_str().unwrap_or_default().to_string();
        let item = ProtectedItemRef::for_vm(vault_id, &vm_id.to_string())?;
        return Ok(Some((item, location)));
    }
    Ok(None)
}

/// The encryption a recovery point was taken with (ADE from its `keyAndSecret`), else what the VM
/// shows now (CMK, encryption at host, platform keys).
fn encryption_of(
    key_and_secret: Option<&KeyAndSecretDetails>,
    vm: Option<&VirtualMachine>,
) -> Result<EncryptionKind, Rejection> {
    if let Some(bek) = key_and_secret.and_then(|ks| ks.bek_details.as_ref()) {
        let vault = bek.secret_vault_id.as_deref().ok_or_else(|| {
            Rejection::invalid_field(
                "keyAndSecret.bekDetails.secretVaultId",
                "is missing on the recovery point",
            )
        })?;
        let key_vault = ResourceId::parse(vault)
            .map_err(|e| Rejection::invalid_field("keyAndSecret.bekDetails.secretVaultId", e))?;
        let kek = match key_and_secret.and_then(|ks| ks.kek_details.as_ref()) {
            Some(kek) => match (&kek.key_url, &kek.key_vault_id) {
                (Some(url), vault_id) => Some(Kek {
                    key_vault: match vault_id {
                        Some(id) => ResourceId::parse(id).map_err(|e| {
                            Rejection::invalid_field("keyAndSecret.kekDetails.keyVaultId", e)
                        })?,
                        None => key_vault.clone(),
                    },
                    key_url: url.clone(),
                }),
                (None, _) => None,
            },
            None => None,
        };
        return Ok(EncryptionKind::Ade(AdeKeys {
            key_vault_url: bek
                .secret_url
                .as_deref()
                .and_then(|url| split_object_url(url, "secrets"))
                .map(|(vault_uri, _, _)| vault_uri),
            key_vault,
            secret_url: bek.secret_url.clone(),
            kek,
        }));
    }
    let Some(vm) = vm else {
        return Ok(EncryptionKind::Pmk);
    };
    let des = vm
        .properties
        .storage_profile
        .os_disk
        .as_ref()
        .and_then(|d| d.managed_disk.as_ref())
        .and_then(|m| m.disk_encryption_set.as_ref())
        .map(|des| des.id.clone())
        .filter(|id| !id.is_empty());
    if let Some(des) = des {
        if let Ok(disk_encryption_set) = ResourceId::parse(&des) {
            return Ok(EncryptionKind::Cmk {
                disk_encryption_set,
            });
        }
    }
    let at_host = vm
        .properties
        .security_profile
        .as_ref()
        .and_then(|s| s.encryption_at_host)
        .unwrap_or(false);
    Ok(if at_host {
        EncryptionKind::Host
    } else {
        EncryptionKind::Pmk
    })
}

fn encryption_details(ks: Option<&KeyAndSecretDetails>) -> EncryptionDetails {
    let Some(ks) = ks.filter(|ks| ks.bek_details.is_some()) else {
        return EncryptionDetails::default();
    };
    let bek = ks.bek_details.as_ref();
    let kek = ks.kek_details.as_ref();
    EncryptionDetails {
        encryption_enabled: true,
        kek_url: kek.and_then(|k| k.key_url.clone()),
        secret_key_url: bek.and_then(|b| b.secret_url.clone()),
        kek_vault_id: kek.and_then(|k| k.key_vault_id.clone()),
        secret_key_vault_id: bek.and_then(|b| b.secret_vault_id.clone()),
    }
}

/// What an earlier request with this ticket left behind.
enum Earlier {
    Nothing,
    /// This request's own pending marker with no job yet: it died before the trigger; go on.
    OwnPending,
    /// Another request's fresh pending marker: that one is starting this ticket's restore.
    OtherPending,
    /// A restore job that is running or completed: nothing more to start.
    Job(String),
    /// The restored VM exists: the restore is done.
    Done,
}

fn pending_marker(now: DateTime<Utc>, request_hash: &str) -> String {
    format!(
        "{PENDING_PREFIX}{}:{request_hash}",
        now.to_rfc3339_opts(SecondsFormat::Secs, true)
    )
}

/// A pending marker: when it was written and, unless written before markers named their request
/// (`pending:<time>`), by which request.
#[derive(Debug, PartialEq)]
struct Pending {
    since: DateTime<Utc>,
    request_hash: Option<String>,
}

fn parse_pending(marker: &str) -> Option<Pending> {
    let rest = marker.strip_prefix(PENDING_PREFIX)?;
    // The time's own colons never leave 16 hex digits after the last one.
    if let Some((time, hash)) = rest.rsplit_once(':') {
        if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(Pending {
                since: parse_time(time)?,
                request_hash: Some(hash.to_ascii_lowercase()),
            });
        }
    }
    Some(Pending {
        since: parse_time(rest)?,
        request_hash: None,
    })
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The ticket this request asks to restore, and where.
struct TicketRestore<'a> {
    vault_id: &'a str,
    vm_id: &'a ResourceId,
    restored_vm: Option<&'a ResourceId>,
    ticket_id: &'a str,
    request_hash: &'a str,
}

/// Look for this ticket's earlier restore: the restored VM, the tag's job, or (after a crash between
/// the trigger and the tag update) a restore job of this VM started since the tag was written, or a
/// request whose fresh pending marker says it is starting one.
async fn earlier_restore(
    deps: &Deps,
    vm: Option<&VirtualMachine>,
    ticket: &TicketRestore<'_>,
    now: DateTime<Utc>,
) -> Result<Earlier, AzureError> {
    let TicketRestore {
        vault_id,
        vm_id,
        restored_vm,
        ticket_id,
        request_hash,
    } = *ticket;
    if let Some(restored) = restored_vm {
        match deps.compute.get_vm(&restored.to_string(), false).await {
            Ok(_) => return Ok(Earlier::Done),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    let Some(marker) = vm.and_then(|vm| vm.tags.get(&ticket_tag(ticket_id))) else {
        return Ok(Earlier::Nothing);
    };
    if marker.starts_with(DONE_PREFIX) {
        return Ok(Earlier::Done);
    }
    let live = |status: Option<&str>| !matches!(status, Some("Failed" | "Cancelled"));
    if let Some(job_id) = marker.strip_prefix(JOB_PREFIX) {
        return match deps.backup.get_job(vault_id, job_id).await {
            Ok(job) if live(job.properties.status.as_deref()) => Ok(Earlier::Job(job_id.into())),
            Ok(_) => Ok(Earlier::Nothing),
            Err(e) if e.is_not_found() => Ok(Earlier::Nothing),
            Err(e) => Err(e),
        };
    }
    if let Some(pending) = parse_pending(marker) {
        let filter = format!(
            "operation eq 'Restore' and startTime eq '{}'",
            pending.since.to_rfc3339_opts(SecondsFormat::Secs, true)
        );
        let jobs = deps.backup.list_jobs(vault_id, Some(&filter)).await?;
        let vm_name = vm_id.name();
        if let Some(job) = jobs.iter().find(|j| {
            j.properties
                .entity_friendly_name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(vm_name))
                && live(j.properties.status.as_deref())
        }) {
            return Ok(Earlier::Job(job.name.clone()));
        }
        match pending.request_hash {
            Some(hash) if hash == request_hash => return Ok(Earlier::OwnPending),
            Some(_) if now - pending.since < PENDING_HOLDS_FOR => return Ok(Earlier::OtherPending),
            // A marker of before markers named their request, or one its request left long ago.
            _ => {}
        }
    }
    Ok(Earlier::Nothing)
}

/// Write the ticket's pending marker with the VM's tags as read plus the marker, only if the VM is
/// still as read (`If-Match` its etag): false when another write came first.
async fn claim_ticket(
    deps: &Deps,
    vm: &VirtualMachine,
    vm_id: &ResourceId,
    ticket_id: &str,
    marker: String,
) -> Result<bool, AzureError> {
    let Some(etag) = vm.etag.as_deref() else {
        // ARM shows every VM's etag; without one there is nothing to be conditional on.
        tracing::warn!("the VM shows no etag; writing the ticket marker unconditionally");
        return mark(deps, vm_id, ticket_id, marker).await.map(|()| true);
    };
    let mut tags = vm.tags.clone();
    tags.insert(ticket_tag(ticket_id), marker);
    match deps
        .compute
        .update_vm_tags_if_match(&vm_id.to_string(), &tags, etag)
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if is_precondition_failed(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

pub(crate) async fn mark(
    deps: &Deps,
    vm_id: &ResourceId,
    ticket_id: &str,
    value: String,
) -> Result<(), AzureError> {
    let tags = BTreeMap::from([(ticket_tag(ticket_id), value)]);
    deps.compute
        .update_tags(&vm_id.to_string(), TagsOperation::Merge, &tags)
        .await
        .map(|_| ())
}

/// Remove the ticket's marker from the source VM once a restored VM (another one) marks the ticket
/// as done. A missing VM or tag is nothing to remove; other failures are reported to the caller.
pub(crate) async fn clear_mark(
    deps: &Deps,
    vm_id: &ResourceId,
    ticket_id: &str,
) -> Result<(), AzureError> {
    let tag = ticket_tag(ticket_id);
    let source = vm_id.to_string();
    let tags = match deps.compute.get_tags(&source).await {
        Ok(tags) => tags,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e),
    };
    let Some(value) = tags.properties.tags.get(&tag).cloned() else {
        return Ok(());
    };
    let exact = BTreeMap::from([(tag, value)]);
    deps.compute
        .update_tags(&source, TagsOperation::Delete, &exact)
        .await
        .map(|_| ())
}

/// The configured staging account for a vault in `vault_location`: the only one, or the one in that
/// region (their regions read through Resource Graph).
async fn configured_staging(
    deps: &Deps,
    vault_location: &str,
) -> Result<Result<ResourceId, Rejection>, HandlerError> {
    let setting = super::settings::STAGING_STORAGE_ACCOUNT;
    let accounts = &deps.settings.staging_storage_accounts;
    match accounts.as_slice() {
        [] => {
            return Ok(Err(Rejection::invalid_field(
                "stagingStorageAccount",
                format!("is required when the app setting {setting} is not set"),
            )))
        }
        [only] => return Ok(Ok(only.clone())),
        _ => {}
    }
    // Parsed ARM ids hold no quotes: nothing to escape in the literals.
    let ids: Vec<String> = accounts.iter().map(|a| format!("'{a}'")).collect();
    let query = format!(
        "Resources | where type =~ 'microsoft.storage/storageaccounts' and id in~ ({}) | project id, location",
        ids.join(", ")
    );
    let mut subscriptions: Vec<String> = accounts
        .iter()
        .map(|a| a.subscription_id().to_ascii_lowercase())
        .collect();
    subscriptions.sort();
    subscriptions.dedup();
    let rows = deps
        .graph
        .query(&query, &subscriptions)
        .await
        .map_err(|e| {
            HandlerError::transient(format!("reading the staging accounts' regions: {e}"))
        })?;
    let in_region = rows.iter().find_map(|row| {
        let location = row["location"].as_str()?;
        if !location.eq_ignore_ascii_case(vault_location) {
            return None;
        }
        let id = ResourceId::parse(row["id"].as_str()?).ok()?;
        accounts.iter().find(|a| **a == id).cloned()
    });
    Ok(in_region.ok_or_else(|| {
        Rejection::invalid_field(
            "stagingStorageAccount",
            format!("none of the staging accounts of {setting} is in the vault's region {vault_location}; name one in the request"),
        )
    }))
}

/// The subnet of a VM's primary NIC, `None` when the VM shows none.
async fn source_subnet(deps: &Deps, vm: &VirtualMachine) -> Result<Option<String>, AzureError> {
    let Some(nic_id) = vm.primary_nic_id() else {
        return Ok(None);
    };
    match deps.compute.get_network_interface(nic_id).await {
        Ok(nic) => Ok(nic.primary_subnet_id().map(str::to_string)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Where an alternate-location restore puts the new VM's NIC: `(vnet id, subnet id)`.
async fn alternate_network(
    deps: &Deps,
    request_subnet: Option<&ResourceId>,
    vm: Option<&VirtualMachine>,
) -> Result<Result<(String, String), Rejection>, HandlerError> {
    let subnet = match (request_subnet, vm) {
        (Some(subnet), _) => Some(subnet.to_string()),
        (None, Some(vm)) => source_subnet(deps, vm).await.map_err(|e| {
            HandlerError::transient(format!("reading the source VM's network interface: {e}"))
        })?,
        (None, None) => None,
    };
    let Some(subnet) = subnet else {
        return Ok(Err(Rejection::invalid_field(
            "targetSubnetId",
            "is required: the source VM shows no network interface with a subnet to restore into",
        )));
    };
    let vnet = match ResourceId::parse(&subnet) {
        Ok(id) if id.is_type(crate::domain::restore::SUBNET_TYPE) => subnet
            .rsplit_once("/subnets/")
            .map(|(vnet, _)| vnet.to_string()),
        _ => None,
    };
    Ok(match vnet {
        Some(vnet) => Ok((vnet, subnet)),
        None => Err(Rejection::invalid_field(
            "targetSubnetId",
            format!("the source VM's NIC names {subnet:?}, not a subnet id"),
        )),
    })
}

pub async fn handle(
    deps: Arc<Deps>,
    invocation: Invocation<Value>,
) -> Result<Outputs, HandlerError> {
    let now = deps.clock.now();
    let mut outputs = Outputs::new();
    let message_id = invocation
        .metadata
        .service_bus()
        .and_then(|m| m.message_id.clone());
    let event = match request_event(invocation.data, message_id.as_deref(), now) {
        Ok(event) => event,
        Err(rejection) => {
            // Not even an envelope: reject with what can be said.
            tracing::warn!(reason = %rejection, "restore request is malformed");
            let empty = CloudEvent::start_with_id(
                RestoreRequestFields::default(),
                None,
                now,
                message_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            );
            outputs.push(OUTCOME, &rejected(&empty, rejection, now))?;
            return Ok(outputs);
        }
    };
    match start(&deps, &event, now).await? {
        Started::Rejected(rejection) => {
            tracing::info!(reason = %rejection.code, message = %rejection.message, "restore rejected");
            outputs.push(OUTCOME, &rejected(&event, rejection, now))?;
        }
        Started::Failed(failed) => outputs.push(OUTCOME, &*failed)?,
        Started::Earlier(what) => {
            tracing::info!(ticket = ?event.data.ticket_id, %what, "restore already started for this ticket; nothing new started");
        }
        Started::Job(job_started) => {
            let delay = crate::domain::backup::JobTrackingPolicy::restore().first_delay;
            match &deps.sender {
                Some(_) => {
                    let at = now + chrono::Duration::from_std(delay).unwrap_or_default();
                    send_event(&deps, &*job_started, Some(at)).await?;
                }
                None => outputs.push(TRACKING, &job_started)?,
            }
        }
    }
    Ok(outputs)
}

/// What a request came to.
enum Started {
    Rejected(Rejection),
    Failed(Box<CloudEvent<RestoreFailed>>),
    /// This ticket's restore exists already (what was found).
    Earlier(String),
    Job(Box<CloudEvent<JobStarted>>),
}

async fn start(
    deps: &Deps,
    event: &CloudEvent<RestoreRequestFields>,
    now: DateTime<Utc>,
) -> Result<Started, HandlerError> {
    let request = match validate_request(&event.data) {
        Ok(request) => request,
        Err(rejection) => return Ok(Started::Rejected(rejection)),
    };
    let scopes = allowed_scopes(deps);
    if !scopes.allows(&request.vm_id) {
        // Checked before any Azure read: the app must not even look at VMs outside its scopes.
        return Ok(Started::Rejected(Rejection::new(
            ReasonCode::ScopeNotAllowed,
            format!("VM {} is outside the allowed scopes", request.vm_id),
        )));
    }
    let vm_text = request.vm_id.to_string();
    let vm = match deps.compute.get_vm(&vm_text, false).await {
        Ok(vm) => Some(vm),
        // A deleted VM can still be restored from its recovery points.
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(HandlerError::transient(format!("reading the VM: {e}"))),
    };
    let protected = find_protected_item(deps, &request.vm_id)
        .await
        .map_err(|e| HandlerError::transient(format!("finding the VM's protected item: {e}")))?;
    let mut points = Vec::new();
    let mut key_and_secret = None;
    let mut point_os_type = None;
    if let Some((item, _)) = &protected {
        let listed = deps
            .backup
            .list_recovery_points(item, None)
            .await
            .map_err(|e| HandlerError::transient(format!("listing recovery points: {e}")))?;
        points = listed
            .iter()
            .filter_map(|rp| {
                Some(RecoveryPoint {
                    id: rp.name.clone(),
                    time: rp.properties.recovery_point_time?,
                })
            })
            .collect();
        // The encryption of the point to restore (or of the newest one, for the mode checks).
        let pick = choose_recovery_point(&points, &request.recovery_point)
            .or_else(|| choose_recovery_point(&points, &RecoveryPointSelector::Latest));
        if let Some(pick) = pick {
            let rp = deps
                .backup
                .get_recovery_point(item, &pick.id)
                .await
                .map_err(|e| HandlerError::transient(format!("reading recovery point: {e}")))?;
            key_and_secret = rp.properties.key_and_secret;
            point_os_type = rp.properties.os_type;
        }
    }
    let encryption = match encryption_of(key_and_secret.as_ref(), vm.as_ref()) {
        Ok(kind) => kind,
        Err(rejection) => return Ok(Started::Rejected(rejection)),
    };
    let plan = match plan_restore(
        &request,
        &scopes,
        PlanContext {
            encryption: &encryption,
            protected: protected.is_some(),
            recovery_points: &points,
        },
    ) {
        Ok(plan) => plan,
        Err(rejection) => return Ok(Started::Rejected(rejection)),
    };
    let Some((item, vault_location)) = protected else {
        return Ok(Started::Rejected(Rejection::new(
            ReasonCode::NotProtected,
            format!("VM {} is not protected", request.vm_id.name()),
        )));
    };
    if plan.recovery_type == AzureRecoveryType::OriginalLocation && vm.is_none() {
        return Ok(Started::Rejected(Rejection::invalid_field(
            "vmId",
            "the VM no longer exists; replace-existing needs it (use alternate-location or restore-disks)",
        )));
    }
    let network = match plan.recovery_type {
        AzureRecoveryType::AlternateLocation => {
            match alternate_network(deps, request.target_subnet.as_ref(), vm.as_ref()).await? {
                Ok(network) => Some(network),
                Err(rejection) => return Ok(Started::Rejected(rejection)),
            }
        }
        _ => None,
    };
    let staging = match request.staging_storage_account.clone() {
        Some(account) => account,
        None => match configured_staging(deps, &vault_location).await? {
            Ok(account) => account,
            Err(rejection) => return Ok(Started::Rejected(rejection)),
        },
    };
    let restore = RestoreContext {
        ticket_id: request.ticket_id.clone(),
        vm_id: request.vm_id.clone(),
        mode: request.mode.as_str().to_string(),
        recovery_point_id: plan.recovery_point.id.clone(),
        target_resource_group_id: plan.target_resource_group.clone(),
        restored_vm_name: plan.restored_vm_name.clone(),
        deployment_name: plan.deployment_name.clone(),
        encryption,
        os_type: os_type_of(point_os_type.as_deref(), vm.as_ref()),
        callback_url: request.callback_url.as_ref().map(|u| u.to_string()),
    };
    // Replace-existing restores the VM itself: its existence says nothing about the ticket.
    let restored_vm =
        (plan.recovery_type != AzureRecoveryType::OriginalLocation).then_some(&plan.restored_vm_id);
    let ticket = TicketRestore {
        vault_id: &item.vault_id,
        vm_id: &request.vm_id,
        restored_vm,
        ticket_id: &request.ticket_id,
        request_hash: &request_digest(&request),
    };
    let mut vm = vm;
    let mut attempt = 1;
    loop {
        let earlier = earlier_restore(deps, vm.as_ref(), &ticket, now)
            .await
            .map_err(|e| HandlerError::transient(format!("looking for an earlier restore: {e}")))?;
        match earlier {
            Earlier::Done => {
                return Ok(Started::Earlier(format!(
                    "restored VM {} exists",
                    plan.restored_vm_name
                )))
            }
            Earlier::Job(job_id) => {
                // The attempt that started this job may have died before handing it to track-job:
                // hand it over again. The follow-up id is the same, so when the first hand-over was
                // sent, Service Bus duplicate detection drops this one.
                tracing::info!(ticket = %request.ticket_id, %job_id, "restore job already started for this ticket; tracking it");
                return job_started(event, &request.vm_id, &item.vault_id, job_id, restore, now);
            }
            Earlier::OtherPending => {
                // Retried, not dropped: by the next delivery the other request has recorded its
                // job (this one then follows it, for its own callback) or its marker has aged out.
                return Err(HandlerError::transient(
                    "another request for this ticket is starting its restore; retrying",
                ));
            }
            Earlier::OwnPending => break,
            Earlier::Nothing => {}
        }
        // A deleted VM carries no marker (nothing to restore over, nothing to race on).
        let Some(current) = &vm else { break };
        let marker = pending_marker(now, ticket.request_hash);
        let claimed = claim_ticket(deps, current, &request.vm_id, &request.ticket_id, marker)
            .await
            .map_err(|e| {
                // The marker guards against a second restore; without it, do not start one.
                HandlerError::transient(format!("tagging the VM for the ticket: {e}"))
            })?;
        if claimed {
            break;
        }
        if attempt == MARKER_ATTEMPTS {
            return Err(HandlerError::transient(format!(
                "the VM kept changing while its ticket marker was written ({MARKER_ATTEMPTS} attempts)"
            )));
        }
        attempt += 1;
        // Someone wrote the VM since it was read (perhaps another request for this ticket): read
        // it again and decide again.
        vm = match deps.compute.get_vm(&vm_text, false).await {
            Ok(vm) => Some(vm),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(HandlerError::transient(format!("reading the VM: {e}"))),
        };
    }
    let (rp_id, staging) = (&plan.recovery_point.id, staging.to_string());
    let target = plan.target_resource_group.to_string();
    let azure_request = match (plan.recovery_type, &network) {
        (AzureRecoveryType::OriginalLocation, _) => {
            IaasVmRestoreRequest::original_location(rp_id, &vm_text, &vault_location, &staging)
        }
        (AzureRecoveryType::AlternateLocation, Some((vnet, subnet))) => {
            IaasVmRestoreRequest::alternate_location(
                rp_id,
                &vm_text,
                &vault_location,
                &staging,
                &plan.restored_vm_id.to_string(),
                &target,
                (vnet, subnet),
            )
        }
        _ => IaasVmRestoreRequest::restore_disks(
            rp_id,
            &vm_text,
            &vault_location,
            &staging,
            Some(&target),
            encryption_details(key_and_secret.as_ref()),
        ),
    };
    let job_id = match deps.backup.trigger_restore(&item, &azure_request).await {
        Ok(Some(job_id)) => job_id,
        Ok(None) => {
            return Err(HandlerError::transient(
                "Azure accepted the restore but named no job",
            ))
        }
        Err(e) => {
            let e = transient_or(e)?;
            return Ok(Started::Failed(Box::new(restore_failed(
                event,
                &restore,
                format!(
                    "Azure refused the {} restore: {e}",
                    plan.recovery_type.as_str()
                ),
                Some(&e),
                now,
            ))));
        }
    };
    if vm.is_some() {
        if let Err(e) = mark(
            deps,
            &request.vm_id,
            &request.ticket_id,
            format!("{JOB_PREFIX}{job_id}"),
        )
        .await
        {
            // The pending marker still finds this job by its start time.
            tracing::warn!(error = %e, "could not record the restore job on the VM's tag");
        }
    }
    tracing::info!(ticket = %request.ticket_id, %job_id, recovery_point = %plan.recovery_point.id, "restore started");
    job_started(event, &request.vm_id, &item.vault_id, job_id, restore, now)
}

/// The hand-over of a ticket's restore job to track-job.
fn job_started(
    event: &CloudEvent<RestoreRequestFields>,
    vm_id: &ResourceId,
    vault_id: &str,
    job_id: String,
    restore: RestoreContext,
    now: DateTime<Utc>,
) -> Result<Started, HandlerError> {
    let vault_id = ResourceId::parse(vault_id)
        .map_err(|e| HandlerError::transient(format!("vault id: {e}")))?;
    Ok(Started::Job(Box::new(event.follow(
        JobStarted {
            vm_id: vm_id.clone(),
            vault_id,
            job_id,
            started_at: now,
            checks: 0,
            job: TrackedJob::Restore(restore),
        },
        "",
        now,
    ))))
}

/// `linux` | `windows`: the recovery point's OS (what is restored), else the VM's.
fn os_type_of(point_os_type: Option<&str>, vm: Option<&VirtualMachine>) -> String {
    point_os_type
        .or_else(|| {
            vm.and_then(|vm| vm.properties.storage_profile.os_disk.as_ref())
                .and_then(|d| d.os_type.as_deref())
        })
        .unwrap_or("linux")
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::restore::request_message_id;

    #[test]
    fn pending_markers_are_read_in_both_formats() {
        let at = parse_time("2026-11-28T15:12:32Z").unwrap();
        let marker = pending_marker(at, "0123456789abcdef");
        assert_eq!(marker, "pending:2026-11-28T15:12:32Z:0123456789abcdef");
        assert_eq!(
            parse_pending(&marker),
            Some(Pending {
                since: at,
                request_hash: Some("0123456789abcdef".into())
            })
        );
        // Written before markers named their request.
        assert_eq!(
            parse_pending("pending:2026-11-28T15:12:32Z"),
            Some(Pending {
                since: at,
                request_hash: None
            })
        );
        assert_eq!(parse_pending("pending:soon"), None);
        assert_eq!(parse_pending("job:42"), None);
    }

    #[test]
    fn the_request_hash_is_the_one_in_the_message_id() {
        let fields = RestoreRequestFields {
            ticket_id: Some("INC-7-a".into()),
            vm_id: Some("/subscriptions/11111111-1111-1111-1111-111111111111/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm".into()),
            ..Default::default()
        };
        let request = validate_request(&fields).unwrap();
        let hash = request_digest(&request);
        assert_eq!(hash.len(), 16);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(request_message_id(&request).ends_with(&format!("-{hash}")));
        let marker = pending_marker(Utc::now(), &hash);
        assert_eq!(parse_pending(&marker).unwrap().request_hash, Some(hash));
    }
}
