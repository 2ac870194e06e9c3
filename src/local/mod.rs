//! The local Functions host: a tool beside the product.
//!
//! It behaves like the Azure Functions host on the real app files, so that `vmbackup serve` runs
//! unchanged on one machine:
//! - [`app`] reads `host.json` and every `function.json` into a typed function list;
//! - [`schedule`] evaluates NCRONTAB timer schedules;
//! - [`queue`] is the embedded durable Service Bus (SQLite) with peek-lock, retries, dead-lettering,
//!   scheduled messages and duplicate detection;
//! - [`servicebus_endpoint`] serves that queue over the Service Bus REST protocol on loopback, so
//!   `azure_messaging_servicebus` works against it;
//! - [`host`] starts the handler, waits for it, restarts it, and invokes its functions over HTTP with
//!   the exact custom-handler payloads.
//!
//! - [`session`] is `vmbackup local`: simulator, queue, endpoint and host wired together, the
//!   fleet's timeline, [`estate`] (the simulated estate saved under `--state`), [`live`] (what a
//!   person watches) and [`report`] (the JSON report and summary table, from durable state).
//!
//! The host talks to the handler over HTTP only; it knows nothing of the workflow.

pub mod app;
pub mod estate;
pub mod host;
pub mod live;
pub mod queue;
pub mod report;
pub mod schedule;
pub mod servicebus_endpoint;
pub mod session;
