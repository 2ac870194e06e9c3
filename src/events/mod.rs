//! The event catalog: the CloudEvents envelope, one type per event, the queue each travels on, and
//! their JSON Schemas (checked in under `docs/events/`).

mod catalog;
mod envelope;
pub mod eventgrid;

pub use catalog::*;
pub use envelope::{CloudEvent, EnvelopeMismatch, EventData, SOURCE};

use crate::runtime::{EnvelopeError, TriggerPayload};
use serde_json::Value;

impl<T: EventData> TriggerPayload for CloudEvent<T> {
    fn from_trigger(value: Value, field: &str) -> Result<Self, EnvelopeError> {
        // The envelope first, so a message of another type is named as such rather than as a
        // missing field of the expected one.
        let envelope: CloudEvent<Value> = crate::runtime::decode_message(value, field)?;
        CloudEvent::<T>::check_envelope(&envelope)
            .map_err(|e| EnvelopeError::new(field, e.to_string()))?;
        let (envelope, data) = envelope.replace_data(());
        let data: T = crate::runtime::decode_value(data).map_err(|e| {
            EnvelopeError::new(
                crate::runtime::join_path(&format!("{field}.data"), &e.path),
                e.reason,
            )
        })?;
        Ok(envelope.replace_data(data).0)
    }
}

/// One entry of the catalog: an event type, its queue and its JSON Schema.
pub struct CatalogEntry {
    pub event_type: &'static str,
    pub queue: &'static str,
    pub schema: fn() -> schemars::Schema,
}

fn entry<T: EventData>() -> CatalogEntry {
    CatalogEntry {
        event_type: T::TYPE,
        queue: T::QUEUE,
        schema: schema_of::<T>,
    }
}

/// The envelope's schema with this event's `type` and `specversion` pinned, titled by the type.
fn schema_of<T: EventData>() -> schemars::Schema {
    let mut schema = schemars::schema_for!(CloudEvent<T>);
    schema.insert("title".into(), Value::String(T::TYPE.into()));
    if let Some(Value::Object(properties)) = schema.get_mut("properties") {
        properties.insert(
            "type".into(),
            serde_json::json!({ "const": T::TYPE, "description": "The CloudEvents type of this event." }),
        );
        properties.insert(
            "specversion".into(),
            serde_json::json!({ "const": "1.0", "description": "CloudEvents 1.0." }),
        );
    }
    schema
}

/// Every event of the choreography.
pub fn catalog() -> Vec<CatalogEntry> {
    vec![
        entry::<ProtectionRequested>(),
        entry::<EncryptionEnabled>(),
        entry::<KeyVaultAccessNeeded>(),
        entry::<KeyVaultAccessGranted>(),
        entry::<ProtectionReady>(),
        entry::<ProtectionEnabled>(),
        entry::<ProtectionRejected>(),
        entry::<BackupRequested>(),
        entry::<JobStarted>(),
        entry::<BackupCompleted>(),
        entry::<BackupFailed>(),
        entry::<BackupRejected>(),
        entry::<RestoreRequested>(),
        entry::<RestoreDisksRestored>(),
        entry::<RestoreVmRecreated>(),
        entry::<RestoreCompleted>(),
        entry::<RestoreRejected>(),
        entry::<RestoreFailed>(),
    ]
}
