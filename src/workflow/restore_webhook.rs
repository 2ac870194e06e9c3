//! `restore-webhook` (HTTP POST, `authLevel: function`): the door for ticket systems that can only
//! call a URL. The body is the restore request JSON (`RestoreRequestFields`); it is validated and
//! enqueued as `vmbackup.restore.requested`, answering 202 with the correlation id, or 400 naming
//! the bad field. Checks against Azure happen later, in start-restore.
//!
//! The request travels under [`request_message_id`] (also its event and correlation id): the same
//! request posted twice, even at the same instant, is one message on the queue (Service Bus
//! duplicate detection) and both callers get the same 202. It is sent through the app's Service Bus
//! sender, which sets the `MessageId`; an output binding cannot, so the `request` binding is used
//! only where no sender is configured (no duplicate detection then).

use super::Deps;
use crate::domain::restore::{request_message_id, validate_request, RestoreRequestFields};
use crate::events::{queues, CloudEvent};
use crate::runtime::{
    AuthLevel, FunctionSpec, HandlerError, HttpRequest, Invocation, OutputBinding, Outputs, Trigger,
};
use serde_json::json;
use std::sync::Arc;

pub const NAME: &str = "restore-webhook";
pub const REQUEST: &str = "request";
pub const RESPONSE: &str = "res";

pub fn spec() -> FunctionSpec {
    FunctionSpec::new(NAME, Trigger::http(AuthLevel::Function, &["post"]))
        .output(OutputBinding::http())
        .output(OutputBinding::service_bus(
            REQUEST,
            queues::RESTORE_REQUESTS,
        ))
}

fn bad_request(outputs: &mut Outputs, field: &str, message: &str) {
    outputs.http_response(
        RESPONSE,
        400,
        json!({ "error": "InvalidRequest", "field": field, "message": message }),
    );
}

pub async fn handle(
    deps: Arc<Deps>,
    invocation: Invocation<HttpRequest>,
) -> Result<Outputs, HandlerError> {
    let mut outputs = Outputs::new();
    let request = invocation.data;
    if !request.method.eq_ignore_ascii_case("POST") {
        bad_request(&mut outputs, "method", "only POST is accepted");
        return Ok(outputs);
    }
    let Some(body) = request.body.as_deref().filter(|b| !b.trim().is_empty()) else {
        bad_request(
            &mut outputs,
            "body",
            "body: a JSON restore request is required",
        );
        return Ok(outputs);
    };
    let fields: RestoreRequestFields = match serde_json::from_str(body) {
        Ok(fields) => fields,
        Err(e) => {
            bad_request(
                &mut outputs,
                "body",
                &format!("body: not a restore request: {e}"),
            );
            return Ok(outputs);
        }
    };
    let validated = match validate_request(&fields) {
        Ok(validated) => validated,
        Err(rejection) => {
            // Rejection messages of invalid fields start with the field's name.
            let field = rejection
                .message
                .split(':')
                .next()
                .unwrap_or("body")
                .to_string();
            bad_request(&mut outputs, &field, &rejection.message);
            return Ok(outputs);
        }
    };
    let event = CloudEvent::start_with_id(
        fields,
        Some(validated.vm_id.to_string()),
        deps.clock.now(),
        request_message_id(&validated),
    )
    .with_ticket(validated.ticket_id.clone());
    match &deps.sender {
        Some(_) => super::track_job::send_event(&deps, &event, None).await?,
        None => outputs.push(REQUEST, &event)?,
    }
    tracing::info!(ticket = %validated.ticket_id, correlation = %event.correlationid, "restore request accepted");
    outputs.http_response(
        RESPONSE,
        202,
        json!({ "correlationId": event.correlationid, "ticketId": validated.ticket_id }),
    );
    Ok(outputs)
}
