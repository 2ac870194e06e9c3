//! The product's functions: one module per function, each reading its event, calling `domain` and
//! `azure`, and emitting the next events. [`app`] declares them all, once.

use crate::runtime::FunctionApp;

/// Every function of vmbackup with its trigger and outputs: the single source of truth for
/// routing, `functions/*/function.json` and `vmbackup package`.
pub fn app() -> FunctionApp {
    FunctionApp::new()
}
