//! The CloudEvents 1.0 envelope (structured JSON mode) with vmbackup's extensions.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `source` of every event vmbackup emits.
pub const SOURCE: &str = "/vmbackup";

/// Namespace for deterministic follow-up event ids (UUID v5).
const FOLLOW_UP_NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_3c1e_9a54_4b7e_8d2f_0c5a_7e31_b942);

/// A payload of the catalog: its CloudEvents `type` and the queue it travels on.
pub trait EventData: Serialize + DeserializeOwned + JsonSchema {
    /// e.g. `vmbackup.protection.requested`.
    const TYPE: &'static str;
    /// The Service Bus queue this event travels on.
    const QUEUE: &'static str;
}

/// A CloudEvent carrying `T`. `correlationid` is one per workflow run; `ticketid` is set on restores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CloudEvent<T> {
    /// Always `1.0`.
    pub specversion: String,
    /// Unique per event; follow-ups get ids derived from their cause, so a redelivered message
    /// produces the same ids and Service Bus duplicate detection drops the copies.
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The ARM id of the VM the workflow is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub time: DateTime<Utc>,
    pub datacontenttype: String,
    /// One id per workflow run, carried from event to event.
    pub correlationid: String,
    /// The ticket of a restore request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticketid: Option<String>,
    pub data: T,
}

/// Why an envelope was not the event a function expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeMismatch {
    #[error("specversion must be 1.0, got {0:?}")]
    SpecVersion(String),
    #[error("type must be {expected}, got {actual}")]
    Type {
        expected: &'static str,
        actual: String,
    },
}

impl<T: EventData> CloudEvent<T> {
    /// The first event of a workflow run: a fresh id and correlation id.
    pub fn start(data: T, subject: Option<String>, now: DateTime<Utc>) -> Self {
        let id = Uuid::new_v4().to_string();
        CloudEvent {
            specversion: "1.0".into(),
            correlationid: id.clone(),
            id,
            source: SOURCE.into(),
            event_type: T::TYPE.into(),
            subject,
            time: now,
            datacontenttype: "application/json".into(),
            ticketid: None,
            data,
        }
    }

    /// The same, with a caller-chosen id (for example one derived from an Event Grid event's id or a
    /// timer tick, so that a repeated trigger emits the same id).
    pub fn start_with_id(
        data: T,
        subject: Option<String>,
        now: DateTime<Utc>,
        id: impl Into<String>,
    ) -> Self {
        let id = id.into();
        CloudEvent {
            correlationid: id.clone(),
            id,
            ..Self::start(data, subject, now)
        }
    }

    pub fn with_ticket(mut self, ticket: impl Into<String>) -> Self {
        self.ticketid = Some(ticket.into());
        self
    }

    /// Check that this is a 1.0 event of `T`'s type.
    pub fn check(&self) -> Result<(), EnvelopeMismatch> {
        Self::check_envelope(self)
    }

    /// Check any envelope (whatever its data) against `T`'s type.
    pub fn check_envelope<D>(event: &CloudEvent<D>) -> Result<(), EnvelopeMismatch> {
        if event.specversion != "1.0" {
            return Err(EnvelopeMismatch::SpecVersion(event.specversion.clone()));
        }
        if event.event_type != T::TYPE {
            return Err(EnvelopeMismatch::Type {
                expected: T::TYPE,
                actual: event.event_type.clone(),
            });
        }
        Ok(())
    }
}

impl<T> CloudEvent<T> {
    /// The same envelope around other data, and the data it held.
    pub fn replace_data<U>(self, data: U) -> (CloudEvent<U>, T) {
        let CloudEvent {
            specversion,
            id,
            source,
            event_type,
            subject,
            time,
            datacontenttype,
            correlationid,
            ticketid,
            data: old,
        } = self;
        let event = CloudEvent {
            specversion,
            id,
            source,
            event_type,
            subject,
            time,
            datacontenttype,
            correlationid,
            ticketid,
            data,
        };
        (event, old)
    }

    /// The next event of the same run: same subject, correlation id and ticket, and an id derived
    /// from this event's id, the next type and `discriminator` (which tells apart several follow-ups
    /// of one type, e.g. one per VM of a sweep; pass "" when there is one).
    pub fn follow<U: EventData>(
        &self,
        data: U,
        discriminator: &str,
        now: DateTime<Utc>,
    ) -> CloudEvent<U> {
        let name = format!("{}/{}/{}", self.id, U::TYPE, discriminator);
        CloudEvent {
            specversion: "1.0".into(),
            id: Uuid::new_v5(&FOLLOW_UP_NAMESPACE, name.as_bytes()).to_string(),
            source: SOURCE.into(),
            event_type: U::TYPE.into(),
            subject: self.subject.clone(),
            time: now,
            datacontenttype: "application/json".into(),
            correlationid: self.correlationid.clone(),
            ticketid: self.ticketid.clone(),
            data,
        }
    }
}
