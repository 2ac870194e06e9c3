//! Clients for Azure: the only code that speaks HTTP to Azure.
//!
//! Everything goes through one pipeline ([`pipeline::ArmClient`]): a bearer token from
//! `azure_identity` ([`auth`]), a client-side copy of ARM's throttling buckets ([`throttle`]),
//! retries honouring `Retry-After` ([`retry`]), long-running operations and paging. The typed
//! clients on top carry only the fields the workflow uses.

pub mod auth;
pub mod backup;
pub mod blob;
pub mod compute;
pub mod config;
pub mod deployments;
pub mod error;
pub mod graph;
pub mod keyvault;
pub mod pipeline;
pub mod retry;
pub mod servicebus;
pub mod throttle;

pub use auth::{BearerToken, IdentityTokenSource, TokenSource};
pub use config::{AzureConfig, CredentialChoice};
pub use error::{ArmError, ArmErrorDetail, AzureError};
pub use pipeline::{ApiRequest, ApiResponse, ArmClient, Audience, LroOutcome, LroPolicy};
pub use retry::{ClockTimer, RetryPolicy, Timer};
