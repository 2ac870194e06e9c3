//! vmbackup: an Azure Functions custom handler that protects, backs up and restores encrypted Azure VMs.
//!
//! Rooms (arrows run one way): `workflow` → `domain`, `azure`, `events`, `runtime`;
//! `local` → `runtime` over HTTP only; `simulator` → nothing of the workflow.

pub mod azure;
pub mod clock;
pub mod domain;
pub mod events;
pub mod local;
pub mod runtime;
pub mod simulator;
pub mod workflow;
