//! The echo app: functions that answer what the runtime decoded, so that property tests
//! (`tests/bad_input.rs`) and the fuzz target (`fuzz/fuzz_targets/envelope_decoder.rs`) drive the
//! real envelope and payload decoders without Azure. Shared by both as a `#[path]` module.

use serde_json::json;
use vmbackup::events::*;
use vmbackup::runtime::{
    AuthLevel, FunctionApp, FunctionSpec, HttpRequest, Invocation, Outputs, TimerInfo, Trigger,
};

/// Functions that answer what the runtime decoded: one per event type (named by it), a timer and
/// an HTTP function.
pub fn echo_app() -> FunctionApp {
    fn echo<T: EventData + Send + 'static>(app: FunctionApp) -> FunctionApp {
        app.function(
            FunctionSpec::new(T::TYPE, Trigger::service_bus(T::QUEUE)),
            |invocation: Invocation<CloudEvent<T>>| async move {
                let metadata = invocation
                    .metadata
                    .service_bus()
                    .cloned()
                    .unwrap_or_default();
                let mut outputs = Outputs::new();
                outputs.set_return_value(json!({
                    "event": serde_json::to_value(&invocation.data).unwrap(),
                    "deliveryCount": metadata.delivery_count,
                }));
                Ok(outputs)
            },
        )
    }
    let app = FunctionApp::new()
        .function(
            FunctionSpec::new("timer", Trigger::timer("0 0 * * * *")),
            |invocation: Invocation<TimerInfo>| async move {
                let mut outputs = Outputs::new();
                outputs.set_return_value(json!({"isPastDue": invocation.data.is_past_due}));
                Ok(outputs)
            },
        )
        .function(
            FunctionSpec::new("http", Trigger::http(AuthLevel::Function, &["post"])),
            |invocation: Invocation<HttpRequest>| async move {
                let mut outputs = Outputs::new();
                outputs.set_return_value(json!({"body": invocation.data.body}));
                Ok(outputs)
            },
        );
    let app = echo::<ProtectionRequested>(app);
    let app = echo::<EncryptionEnabled>(app);
    let app = echo::<KeyVaultAccessNeeded>(app);
    let app = echo::<KeyVaultAccessGranted>(app);
    let app = echo::<ProtectionReady>(app);
    let app = echo::<ProtectionEnabled>(app);
    let app = echo::<ProtectionRejected>(app);
    let app = echo::<BackupRequested>(app);
    let app = echo::<JobStarted>(app);
    let app = echo::<BackupCompleted>(app);
    let app = echo::<BackupFailed>(app);
    let app = echo::<BackupRejected>(app);
    let app = echo::<RestoreRequested>(app);
    let app = echo::<RestoreDisksRestored>(app);
    let app = echo::<RestoreVmRecreated>(app);
    let app = echo::<RestoreCompleted>(app);
    let app = echo::<RestoreRejected>(app);
    echo::<RestoreFailed>(app)
}
