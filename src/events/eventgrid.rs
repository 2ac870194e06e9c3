//! The Event Grid events that feed `vm-events`: `Microsoft.Resources.ResourceWrite*` from a system
//! topic on each watched subscription, in the Event Grid schema or the CloudEvents schema (both are
//! accepted; the subscription's delivery schema decides which arrives).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const RESOURCE_WRITE_SUCCESS: &str = "Microsoft.Resources.ResourceWriteSuccess";

/// The fields of `ResourceWriteSuccessData` that the workflow reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceWriteData {
    #[serde(default)]
    pub resource_uri: String,
    #[serde(default)]
    pub operation_name: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub subscription_id: Option<String>,
    #[serde(default)]
    pub correlation_id: Option<String>,
}

/// A resource event in either schema, normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceEvent {
    pub id: String,
    pub event_type: String,
    pub subject: String,
    pub time: Option<DateTime<Utc>>,
    pub data: ResourceWriteData,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventGridSchema {
    id: String,
    event_type: String,
    subject: String,
    event_time: Option<DateTime<Utc>>,
    data: ResourceWriteData,
}

#[derive(Deserialize)]
struct CloudEventsSchema {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    subject: String,
    time: Option<DateTime<Utc>>,
    data: ResourceWriteData,
}

impl ResourceEvent {
    /// Parse an event in the Event Grid schema (`eventType`) or the CloudEvents schema (`type`).
    pub fn from_json(value: serde_json::Value) -> Result<Self, serde_json::Error> {
        if value.get("eventType").is_some() {
            let e: EventGridSchema = serde_json::from_value(value)?;
            Ok(ResourceEvent {
                id: e.id,
                event_type: e.event_type,
                subject: e.subject,
                time: e.event_time,
                data: e.data,
            })
        } else {
            let e: CloudEventsSchema = serde_json::from_value(value)?;
            Ok(ResourceEvent {
                id: e.id,
                event_type: e.event_type,
                subject: e.subject,
                time: e.time,
                data: e.data,
            })
        }
    }

    /// The written resource: `data.resourceUri`, else the subject.
    pub fn resource_uri(&self) -> &str {
        if self.data.resource_uri.is_empty() {
            &self.subject
        } else {
            &self.data.resource_uri
        }
    }

    pub fn is_write_success(&self) -> bool {
        self.event_type.eq_ignore_ascii_case(RESOURCE_WRITE_SUCCESS)
    }
}
