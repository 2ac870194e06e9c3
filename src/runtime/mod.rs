//! The custom-handler runtime, in the style of `lambda_runtime`: a handler is one async function over a
//! typed [`Invocation`]; functions are declared once ([`FunctionSpec`]: name, trigger, outputs), and
//! that declaration drives both routing and the generated `function.json`. Knows nothing about backup.
//!
//! Protocol facts it relies on (see the README): the host posts `{"Data","Metadata"}` to
//! `/<FunctionName>`, string bodies may arrive JSON-encoded inside a string, numbers as strings; it
//! answers `{"Outputs","Logs","ReturnValue"}` with 2xx, and non-2xx makes the host retry.

mod decode;
mod invocation;
mod logs;
pub mod package;
mod response;
mod server;
mod spec;

pub(crate) use decode::decode_value;
pub use decode::{decode_payload, parse_timestamp, unwrap_json_strings};
pub use invocation::{
    Context, EnvelopeError, HttpRequest, Invocation, InvocationRequest, RetryContext,
    ScheduleStatus, ServiceBusMetadata, TimerInfo, TriggerMetadata,
};
pub use logs::{capture, init as init_logging, InvocationLogLayer, LogBuffer};
pub use response::{HandlerError, OutputError, Outputs};
pub(crate) use server::join_path;
pub use server::{
    decode_message, listen_addr_from, serve, serve_with_shutdown, shutdown_signal, FunctionApp,
    ServeError, TriggerPayload, INVOCATION_ID_HEADER, PORT_VARIABLE,
};
pub use spec::{
    AuthLevel, FunctionSpec, HostSettings, OutputBinding, Trigger, DEFAULT_SERVICE_BUS_CONNECTION,
};
