//! Logging: JSON lines on stdout (the host logs stderr as errors), and per-invocation capture of the
//! lines a handler logs, returned to the host in the response's `Logs`.
//!
//! Capture is keyed by a tokio task-local set around each invocation's future, so concurrent
//! invocations never mix their lines. Work a handler spawns onto other tasks is not captured (it still
//! goes to stdout).

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

/// At most this many lines are kept per invocation; the rest still reach stdout.
const MAX_CAPTURED_LINES: usize = 1000;

#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<String>>>);

impl LogBuffer {
    pub fn take(&self) -> Vec<String> {
        match self.0.lock() {
            Ok(mut lines) => std::mem::take(&mut *lines),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }

    fn push(&self, line: String) {
        if let Ok(mut lines) = self.0.lock() {
            if lines.len() < MAX_CAPTURED_LINES {
                lines.push(line);
            }
        }
    }
}

tokio::task_local! {
    static INVOCATION_LOGS: LogBuffer;
}

/// Run `future` with its log lines captured into `buffer`.
pub async fn capture<F: std::future::Future>(buffer: LogBuffer, future: F) -> F::Output {
    INVOCATION_LOGS.scope(buffer, future).await
}

/// The tracing layer that copies events into the current invocation's buffer.
pub struct InvocationLogLayer;

struct LineVisitor {
    message: String,
    fields: String,
}

impl Visit for LineVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for InvocationLogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let _ = INVOCATION_LOGS.try_with(|buffer| {
            let mut visitor = LineVisitor {
                message: String::new(),
                fields: String::new(),
            };
            event.record(&mut visitor);
            buffer.push(format!(
                "{} {}{}",
                event.metadata().level(),
                visitor.message,
                visitor.fields
            ));
        });
    }
}

/// Install the process-wide subscriber: JSON lines on stdout filtered by `RUST_LOG` (default `info`),
/// plus invocation capture. Safe to call more than once (later calls do nothing).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let stdout = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(std::io::stdout);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(stdout)
        .with(InvocationLogLayer)
        .try_init();
}
