//! Event Grid `Microsoft.Resources.ResourceWriteSuccess` events, shaped like the Event Grid schema sample
//! (`eventgrid/event-grid-schema/resource_write_success.json`) for a subscription system topic.

use super::state::{APP_PRINCIPAL_ID, TENANT_ID};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

pub const RESOURCE_WRITE_SUCCESS: &str = "Microsoft.Resources.ResourceWriteSuccess";

/// One write event for `resource_uri`, e.g. operation `Microsoft.Compute/virtualMachines/write`.
pub fn resource_write_success(
    resource_uri: &str,
    operation_name: &str,
    now: DateTime<Utc>,
) -> Value {
    let subscription = resource_uri
        .split('/')
        .nth(2)
        .unwrap_or_default()
        .to_string();
    let provider = operation_name.split('/').next().unwrap_or_default();
    let correlation_id = uuid::Uuid::new_v4().to_string();
    json!({
        "subject": resource_uri,
        "eventType": RESOURCE_WRITE_SUCCESS,
        "eventTime": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "id": uuid::Uuid::new_v4().to_string(),
        "data": {
            "authorization": {
                "scope": resource_uri,
                "action": operation_name,
                "evidence": { "role": "Contributor" }
            },
            "claims": {
                "aud": "https://management.azure.com",
                "iss": format!("https://sts.windows.net/{TENANT_ID}/"),
                "appid": APP_PRINCIPAL_ID,
                "http://schemas.microsoft.com/identity/claims/objectidentifier": APP_PRINCIPAL_ID,
                "http://schemas.microsoft.com/identity/claims/tenantid": TENANT_ID,
                "ver": "1.0"
            },
            "correlationId": correlation_id,
            "resourceProvider": provider,
            "resourceUri": resource_uri,
            "operationName": operation_name,
            "status": "Succeeded",
            "subscriptionId": subscription,
            "tenantId": TENANT_ID
        },
        "dataVersion": "2",
        "metadataVersion": "1",
        "topic": format!("/subscriptions/{subscription}")
    })
}
