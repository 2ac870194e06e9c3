//! Backup decisions: retain-until date, the on-demand-per-day limit, sweep pacing, job tracking and
//! classification of a finished job.

use crate::domain::eligibility::tag_value;
use crate::domain::reason::{ReasonCode, Rejection};
use crate::domain::ResourceId;
use chrono::{DateTime, Duration as ChronoDuration, NaiveDate, Utc};
use std::collections::BTreeMap;
use std::time::Duration;
use uuid::Uuid;

/// Tag with the number of days an on-demand recovery point is kept.
pub const RETAIN_DAYS_TAG: &str = "backup-retain-days";
/// Azure keeps an on-demand recovery point 30 days when no expiry is given (research-anchors A4).
pub const AZURE_DEFAULT_RETAIN_DAYS: u32 = 30;
/// Longest retention accepted: Azure's on-demand retention tops out at 99 years.
pub const MAX_RETAIN_DAYS: u32 = 99 * 365;
/// On-demand backups per VM per UTC day that this tool asks for (research-anchors A4: 1 scheduled + 3 on-demand).
pub const ON_DEMAND_BACKUPS_PER_VM_PER_DAY: u32 = 3;
/// Azure's error code for missing Key Vault permissions (docs spell it `Keyvault` and `KeyVault`).
pub const KEY_VAULT_PERMISSIONS_ERROR: &str = "UserErrorKeyVaultPermissionsNotConfigured";

/// When an on-demand recovery point expires: `now` plus the VM's `backup-retain-days` tag, else
/// `default_days`. A tag that is not a whole number of days in `1..=MAX_RETAIN_DAYS` is an error naming it.
pub fn retain_until(
    now: DateTime<Utc>,
    tags: &BTreeMap<String, String>,
    default_days: u32,
) -> Result<DateTime<Utc>, Rejection> {
    let days = match tag_value(tags, RETAIN_DAYS_TAG) {
        None => default_days,
        Some(raw) => match raw.trim().parse::<u32>() {
            Ok(d) if (1..=MAX_RETAIN_DAYS).contains(&d) => d,
            _ => {
                return Err(Rejection::invalid_field(
                    RETAIN_DAYS_TAG,
                    format!(
                        "{raw:?} is not a whole number of days between 1 and {MAX_RETAIN_DAYS}"
                    ),
                ))
            }
        },
    };
    Ok(now + ChronoDuration::days(i64::from(days)))
}

/// The UTC day a backup counts against.
pub fn utc_day(at: DateTime<Utc>) -> NaiveDate {
    at.date_naive()
}

/// How many of `triggered_at` fall on the same UTC day as `now`.
pub fn on_demand_count_on_day(triggered_at: &[DateTime<Utc>], now: DateTime<Utc>) -> u32 {
    let day = utc_day(now);
    let count = triggered_at.iter().filter(|t| utc_day(**t) == day).count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// Whether one more on-demand backup may be asked for, given how many this tool already asked for
/// the VM on the current UTC day.
pub fn on_demand_allowed(count_today: u32) -> bool {
    count_today < ON_DEMAND_BACKUPS_PER_VM_PER_DAY
}

/// Namespace of the deterministic message ids below (UUID v5).
const BACKUP_ID_NAMESPACE: Uuid = Uuid::from_u128(0x2b8e_51d4_7c0a_4f3e_9b6d_e1a4_5c72_0f19);

fn derived_id(name: &str) -> String {
    Uuid::new_v5(&BACKUP_ID_NAMESPACE, name.as_bytes()).to_string()
}

/// Message id of status check number `check` of a job. Every copy of one check (a redelivery, a
/// duplicated `job.started`, two requests attaching to one job) sends the next check under the same
/// id, so Service Bus duplicate detection keeps a single tracking chain.
pub fn job_check_message_id(job_id: &str, check: u32) -> String {
    derived_id(&format!(
        "job/{}/check/{check}",
        job_id.to_ascii_lowercase()
    ))
}

/// Id of the event that ends a job's tracking (one per job and event type).
pub fn job_outcome_event_id(job_id: &str, event_type: &str) -> String {
    derived_id(&format!("job/{}/{event_type}", job_id.to_ascii_lowercase()))
}

/// Id of the sweep's request for the VM's next on-demand backup of `day`, given how many it already
/// had that day: a sweep that runs again before those backups started asks under the same ids.
pub fn sweep_request_id(vm_id: &ResourceId, day: NaiveDate, backups_today: u32) -> String {
    derived_id(&format!(
        "sweep/{}/{day}/{backups_today}",
        vm_id.canonical()
    ))
}

/// `(resource group, VM name)`, lower-cased, of an IaaS VM container name
/// (`iaasvmcontainerv2;{rg};{vm}`, also with an `IaasVMContainer;` prefix or as a protected item
/// name `VM;iaasvmcontainerv2;{rg};{vm}`).
pub fn container_vm(container_name: &str) -> Option<(String, String)> {
    let mut parts = container_name.rsplit(';');
    let vm = parts.next()?.trim();
    let resource_group = parts.next()?.trim();
    if vm.is_empty() || resource_group.is_empty() {
        return None;
    }
    Some((resource_group.to_ascii_lowercase(), vm.to_ascii_lowercase()))
}

/// Whether a job's or item's container name is the one of this VM.
pub fn container_is_vm(container_name: &str, vm_id: &ResourceId) -> bool {
    let Some(resource_group) = vm_id.resource_group() else {
        return false;
    };
    container_vm(container_name).is_some_and(|(rg, vm)| {
        rg.eq_ignore_ascii_case(resource_group) && vm.eq_ignore_ascii_case(vm_id.name())
    })
}

/// Spreads a sweep's fan-out within ARM's write budget (research-anchors D: per subscription and
/// principal, a bucket of 200 writes refilled at 10/s). The sweep uses a share of it and leaves the
/// rest for the other functions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweepPacing {
    /// Messages sent without delay (a share of the bucket).
    pub burst: u32,
    /// Sustained ARM writes per second the sweep may cause after the burst.
    pub writes_per_second: f64,
    /// ARM writes each message leads to (one backup POST).
    pub writes_per_message: u32,
}

impl Default for SweepPacing {
    /// Half the bucket and half the refill rate.
    fn default() -> Self {
        SweepPacing {
            burst: 100,
            writes_per_second: 5.0,
            writes_per_message: 1,
        }
    }
}

impl SweepPacing {
    /// The delay before message number `index` (0-based) is delivered.
    pub fn delay_for(&self, index: u32) -> Duration {
        if index < self.burst
            || self.writes_per_second <= 0.0
            || !self.writes_per_second.is_finite()
        {
            return Duration::ZERO;
        }
        let after_burst = f64::from(index - self.burst + 1) * f64::from(self.writes_per_message);
        Duration::from_secs_f64(after_burst / self.writes_per_second)
    }
}

/// How a running job is re-checked: a growing delay, capped, within a bound on total tracking time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobTrackingPolicy {
    pub first_delay: Duration,
    pub growth: f64,
    pub max_delay: Duration,
    pub max_total: Duration,
}

impl JobTrackingPolicy {
    /// Backups: Azure answers `Retry-After: 60`; a daily backup ends within 24 h (research-anchors A4).
    pub fn backup() -> Self {
        JobTrackingPolicy {
            first_delay: Duration::from_secs(60),
            growth: 2.0,
            max_delay: Duration::from_secs(30 * 60),
            max_total: Duration::from_secs(24 * 3600),
        }
    }

    /// Restores: vault-tier restores take hours; the same bound.
    pub fn restore() -> Self {
        JobTrackingPolicy::backup()
    }

    /// What to do before check number `checks_done + 1` of a job that started tracking at `started`.
    pub fn next_check(
        &self,
        started: DateTime<Utc>,
        now: DateTime<Utc>,
        checks_done: u32,
    ) -> TrackingDecision {
        let elapsed = (now - started).to_std().unwrap_or(Duration::ZERO);
        if elapsed >= self.max_total {
            return TrackingDecision::GiveUp;
        }
        let exponent = i32::try_from(checks_done).unwrap_or(i32::MAX);
        let grown = self.first_delay.as_secs_f64() * self.growth.max(1.0).powi(exponent);
        let capped = if grown.is_finite() {
            grown.min(self.max_delay.as_secs_f64())
        } else {
            self.max_delay.as_secs_f64()
        };
        let remaining = (self.max_total - elapsed).as_secs_f64();
        // The last check lands on the deadline rather than after it.
        TrackingDecision::CheckAfter(Duration::from_secs_f64(capped.min(remaining)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackingDecision {
    CheckAfter(Duration),
    /// Tracked for the whole bound: report `JobTrackingTimedOut`.
    GiveUp,
}

/// Azure Backup job statuses (JobStatus enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Invalid,
    InProgress,
    Completed,
    Failed,
    CompletedWithWarnings,
    Cancelled,
    Cancelling,
}

impl JobStatus {
    /// Case-insensitive; `None` for a status this code does not know.
    pub fn parse(s: &str) -> Option<JobStatus> {
        [
            ("Invalid", JobStatus::Invalid),
            ("InProgress", JobStatus::InProgress),
            ("Completed", JobStatus::Completed),
            ("Failed", JobStatus::Failed),
            ("CompletedWithWarnings", JobStatus::CompletedWithWarnings),
            ("Cancelled", JobStatus::Cancelled),
            ("Cancelling", JobStatus::Cancelling),
        ]
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
        .map(|(_, status)| status)
    }
}

/// One entry of a job's `errorDetails`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Running,
    Completed {
        with_warnings: bool,
    },
    /// Key Vault permissions missing: grant access and request the backup once more.
    RemedyKeyVaultAccess,
    /// Failed or cancelled; `azure_code` and the message are Azure's.
    Failed {
        reason: ReasonCode,
        azure_code: Option<String>,
        message: String,
    },
}

/// Classify a job from its status and errors. `remedy_already_applied` is true when this backup request
/// is itself the retry after a Key Vault grant: the same failure then ends the request.
pub fn classify_job(
    status: JobStatus,
    errors: &[JobError],
    remedy_already_applied: bool,
) -> JobOutcome {
    match status {
        JobStatus::InProgress | JobStatus::Cancelling => JobOutcome::Running,
        JobStatus::Completed => JobOutcome::Completed {
            with_warnings: false,
        },
        JobStatus::CompletedWithWarnings => JobOutcome::Completed {
            with_warnings: true,
        },
        JobStatus::Cancelled => JobOutcome::Failed {
            reason: ReasonCode::JobCancelled,
            azure_code: errors.first().map(|e| e.code.clone()),
            message: errors
                .first()
                .map(|e| e.message.clone())
                .unwrap_or_else(|| "the job was cancelled".to_string()),
        },
        JobStatus::Failed | JobStatus::Invalid => {
            let key_vault = errors
                .iter()
                .find(|e| e.code.eq_ignore_ascii_case(KEY_VAULT_PERMISSIONS_ERROR));
            match key_vault {
                Some(_) if !remedy_already_applied => JobOutcome::RemedyKeyVaultAccess,
                Some(e) => JobOutcome::Failed {
                    reason: ReasonCode::KeyVaultPermissionsNotConfigured,
                    azure_code: Some(e.code.clone()),
                    message: e.message.clone(),
                },
                None => JobOutcome::Failed {
                    reason: ReasonCode::JobFailed,
                    azure_code: errors.first().map(|e| e.code.clone()),
                    message: errors
                        .first()
                        .map(|e| e.message.clone())
                        .unwrap_or_else(|| {
                            format!("the job ended with status {status:?} and no error details")
                        }),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, h, m, 0)
            .single()
            .unwrap()
    }

    fn tags(v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(RETAIN_DAYS_TAG.to_string(), v.to_string())])
    }

    #[test]
    fn retain_until_uses_the_tag_else_the_default() {
        let now = at(10, 0);
        assert_eq!(
            retain_until(now, &BTreeMap::new(), AZURE_DEFAULT_RETAIN_DAYS).unwrap(),
            now + ChronoDuration::days(30)
        );
        assert_eq!(
            retain_until(now, &BTreeMap::new(), 7).unwrap(),
            now + ChronoDuration::days(7)
        );
        assert_eq!(
            retain_until(now, &tags(" 90 "), 7).unwrap(),
            now + ChronoDuration::days(90)
        );
        let upper = BTreeMap::from([("Backup-Retain-Days".to_string(), "5".to_string())]);
        assert_eq!(
            retain_until(now, &upper, 7).unwrap(),
            now + ChronoDuration::days(5)
        );
    }

    #[test]
    fn invalid_retain_tag_is_an_error_naming_it() {
        for bad in ["", "0", "-3", "1.5", "ten", "36136"] {
            let err = retain_until(at(10, 0), &tags(bad), 30).unwrap_err();
            assert_eq!(err.code, ReasonCode::InvalidRequest);
            assert!(err.message.starts_with(RETAIN_DAYS_TAG), "{err}");
        }
    }

    #[test]
    fn on_demand_limit_is_three_per_utc_day() {
        assert!(on_demand_allowed(0) && on_demand_allowed(2));
        assert!(!on_demand_allowed(3) && !on_demand_allowed(4));
        let yesterday = Utc
            .with_ymd_and_hms(2026, 11, 27, 23, 59, 59)
            .single()
            .unwrap();
        let history = [yesterday, at(0, 0), at(9, 0), at(23, 59)];
        assert_eq!(on_demand_count_on_day(&history, at(12, 0)), 3);
        assert_eq!(on_demand_count_on_day(&history, yesterday), 1);
    }

    #[test]
    fn message_ids_are_deterministic_and_distinct() {
        assert_eq!(
            job_check_message_id("ABC", 1),
            job_check_message_id("abc", 1)
        );
        assert_ne!(
            job_check_message_id("abc", 1),
            job_check_message_id("abc", 2)
        );
        assert_ne!(
            job_outcome_event_id("abc", "vmbackup.backup.completed"),
            job_outcome_event_id("abc", "vmbackup.backup.failed")
        );
        let vm = ResourceId::parse(VM).unwrap();
        let day = utc_day(at(1, 0));
        assert_eq!(sweep_request_id(&vm, day, 0), sweep_request_id(&vm, day, 0));
        assert_ne!(sweep_request_id(&vm, day, 0), sweep_request_id(&vm, day, 1));
        assert_ne!(
            sweep_request_id(&vm, day, 0),
            sweep_request_id(&vm, day.succ_opt().unwrap(), 0)
        );
    }

    const VM: &str =
        "/subscriptions/s1/resourceGroups/RG-App/providers/Microsoft.Compute/virtualMachines/vm-web-01";

    #[test]
    fn container_names_name_their_vm() {
        let vm = ResourceId::parse(VM).unwrap();
        for name in [
            "iaasvmcontainerv2;rg-app;vm-web-01",
            "IaasVMContainer;iaasvmcontainerv2;RG-APP;vm-web-01",
            "VM;iaasvmcontainerv2;rg-app;VM-WEB-01",
        ] {
            assert!(container_is_vm(name, &vm), "{name}");
        }
        assert!(!container_is_vm("iaasvmcontainerv2;rg-app;vm-web-02", &vm));
        assert!(!container_is_vm(
            "iaasvmcontainerv2;rg-other;vm-web-01",
            &vm
        ));
        assert_eq!(container_vm("vm-web-01"), None);
        assert_eq!(container_vm(";;"), None);
    }

    #[test]
    fn sweep_pacing_bursts_then_spreads_within_the_write_rate() {
        let p = SweepPacing::default();
        assert_eq!(p.delay_for(0), Duration::ZERO);
        assert_eq!(p.delay_for(99), Duration::ZERO);
        assert_eq!(p.delay_for(100), Duration::from_millis(200));
        assert_eq!(p.delay_for(104), Duration::from_secs(1));
        // 10,000 messages: the last one after (9,900 / 5) s.
        assert_eq!(p.delay_for(9_999), Duration::from_secs(1_980));
        // Never more than `burst + rate * t` writes by time t.
        for i in (0..10_000).step_by(137) {
            let t = p.delay_for(i).as_secs_f64();
            assert!(
                f64::from(i + 1) <= f64::from(p.burst) + p.writes_per_second * t + 1e-6,
                "{i}"
            );
        }
        let two = SweepPacing {
            writes_per_message: 2,
            ..p
        };
        assert_eq!(two.delay_for(104), Duration::from_secs(2));
    }

    #[test]
    fn tracking_delay_grows_is_capped_and_bounded() {
        let p = JobTrackingPolicy::backup();
        let start = at(0, 0);
        assert_eq!(
            p.next_check(start, start, 0),
            TrackingDecision::CheckAfter(Duration::from_secs(60))
        );
        assert_eq!(
            p.next_check(start, start, 1),
            TrackingDecision::CheckAfter(Duration::from_secs(120))
        );
        assert_eq!(
            p.next_check(start, start, 3),
            TrackingDecision::CheckAfter(Duration::from_secs(480))
        );
        assert_eq!(
            p.next_check(start, start, 10),
            TrackingDecision::CheckAfter(Duration::from_secs(1800))
        );
        assert_eq!(
            p.next_check(start, start, u32::MAX),
            TrackingDecision::CheckAfter(Duration::from_secs(1800))
        );
        // Near the deadline the delay shrinks to land on it; at the deadline tracking gives up.
        let near = start + ChronoDuration::seconds(24 * 3600 - 100);
        assert_eq!(
            p.next_check(start, near, 10),
            TrackingDecision::CheckAfter(Duration::from_secs(100))
        );
        assert_eq!(
            p.next_check(start, start + ChronoDuration::hours(24), 0),
            TrackingDecision::GiveUp
        );
        // A clock behind the start does not panic.
        assert!(matches!(
            p.next_check(at(1, 0), at(0, 0), 0),
            TrackingDecision::CheckAfter(_)
        ));
    }

    #[test]
    fn job_status_parses_case_insensitively() {
        assert_eq!(
            JobStatus::parse("completedwithwarnings"),
            Some(JobStatus::CompletedWithWarnings)
        );
        assert_eq!(JobStatus::parse("InProgress"), Some(JobStatus::InProgress));
        assert_eq!(JobStatus::parse("Exploded"), None);
    }

    #[test]
    fn running_and_completed_jobs() {
        assert_eq!(
            classify_job(JobStatus::InProgress, &[], false),
            JobOutcome::Running
        );
        assert_eq!(
            classify_job(JobStatus::Cancelling, &[], false),
            JobOutcome::Running
        );
        assert_eq!(
            classify_job(JobStatus::Completed, &[], false),
            JobOutcome::Completed {
                with_warnings: false
            }
        );
        assert_eq!(
            classify_job(JobStatus::CompletedWithWarnings, &[], true),
            JobOutcome::Completed {
                with_warnings: true
            }
        );
    }

    #[test]
    fn key_vault_failure_is_remedied_once_then_reported() {
        let errors = [JobError {
            code: "UserErrorKeyvaultPermissionsNotConfigured".into(),
            message: "Azure Backup Service does not have sufficient permissions".into(),
        }];
        assert_eq!(
            classify_job(JobStatus::Failed, &errors, false),
            JobOutcome::RemedyKeyVaultAccess
        );
        match classify_job(JobStatus::Failed, &errors, true) {
            JobOutcome::Failed {
                reason,
                azure_code,
                message,
            } => {
                assert_eq!(reason, ReasonCode::KeyVaultPermissionsNotConfigured);
                assert_eq!(
                    azure_code.as_deref(),
                    Some("UserErrorKeyvaultPermissionsNotConfigured")
                );
                assert!(message.contains("sufficient permissions"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_failures_and_cancellations_carry_azures_code_and_message() {
        let errors = [JobError {
            code: "UserErrorGuestAgentStatusUnavailable".into(),
            message: "VM Agent unable to communicate".into(),
        }];
        assert_eq!(
            classify_job(JobStatus::Failed, &errors, false),
            JobOutcome::Failed {
                reason: ReasonCode::JobFailed,
                azure_code: Some("UserErrorGuestAgentStatusUnavailable".into()),
                message: "VM Agent unable to communicate".into()
            }
        );
        match classify_job(JobStatus::Failed, &[], false) {
            JobOutcome::Failed {
                reason: ReasonCode::JobFailed,
                azure_code: None,
                message,
            } => assert!(message.contains("Failed")),
            other => panic!("{other:?}"),
        }
        match classify_job(JobStatus::Cancelled, &[], false) {
            JobOutcome::Failed {
                reason: ReasonCode::JobCancelled,
                azure_code: None,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
    }
}
