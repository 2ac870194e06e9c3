//! Pure decisions: no I/O, no async, no clock reads (callers pass `now`).
//!
//! Inputs are plain data types defined here; the workflow maps Azure's models into them.

pub mod backup;
pub mod eligibility;
pub mod encryption;
pub mod key_vault_access;
pub mod protection_names;
pub mod reason;
pub mod resource_id;
pub mod restore;

pub use reason::{ReasonCode, Rejection};
pub use resource_id::{ResourceId, ResourceIdError};
