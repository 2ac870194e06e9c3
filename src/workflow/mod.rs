//! The product's functions: one module per function, each reading its event, calling `domain` and
//! `azure`, and emitting the next events. [`app`] declares them all, once.
//!
//! The workflow never knows whether Azure is real or simulated: [`Deps::from_env`] reads endpoints
//! and the credential from app settings, as the Functions host (or `vmbackup local`) passes them.

pub mod assess_vm;
pub mod backup_sweep;
pub mod discovery_sweep;
pub mod enable_protection;
pub mod grant_key_vault_access;
pub mod notify;
pub mod on_vm_event;
pub mod recreate_vm;
pub mod reinstall_ade;
pub mod restore_webhook;
pub mod settings;
pub mod start_restore;
pub mod track_job;
pub mod trigger_backup;

use crate::azure::backup::BackupClient;
use crate::azure::blob::BlobClient;
use crate::azure::compute::ComputeClient;
use crate::azure::deployments::DeploymentsClient;
use crate::azure::graph::ResourceGraphClient;
use crate::azure::keyvault::KeyVaultClient;
use crate::azure::servicebus::ServiceBusSender;
use crate::azure::{
    ArmClient, AzureConfig, AzureError, ClockTimer, IdentityTokenSource, TokenSource,
};
use crate::clock::Clock;
use crate::runtime::FunctionApp;
pub use settings::Settings;
use std::sync::Arc;

/// Everything a handler needs, built once per process.
pub struct Deps {
    pub settings: Settings,
    pub clock: Clock,
    pub compute: ComputeClient,
    pub backup: BackupClient,
    pub key_vault: KeyVaultClient,
    pub graph: ResourceGraphClient,
    pub deployments: DeploymentsClient,
    pub blob: BlobClient,
    /// For delayed follow-ups (scheduled messages); `None` when no Service Bus is configured.
    pub sender: Option<ServiceBusSender>,
    /// For webhooks and ticket callbacks (not Azure).
    pub http: reqwest::Client,
}

/// Why the app cannot start: a setting, named.
#[derive(Debug, thiserror::Error)]
pub enum DepsError {
    #[error(transparent)]
    Setting(#[from] settings::SettingError),
    #[error(transparent)]
    Clock(#[from] crate::clock::ClockError),
    #[error("{0}")]
    Azure(#[from] AzureError),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

impl Deps {
    /// Read app settings, the clock and the Azure configuration from the environment.
    pub fn from_env() -> Result<Self, DepsError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, DepsError> {
        let settings = Settings::from_lookup(&lookup)?;
        let clock = Clock::from_lookup(&lookup)?;
        let config = AzureConfig::from_lookup(&lookup)?;
        let tokens: Arc<dyn TokenSource> = Arc::new(IdentityTokenSource::from_config(&config)?);
        Self::with_tokens(settings, clock, config, tokens)
    }

    /// Build with an explicit token source (tests, tools).
    pub fn with_tokens(
        settings: Settings,
        clock: Clock,
        config: AzureConfig,
        tokens: Arc<dyn TokenSource>,
    ) -> Result<Self, DepsError> {
        let arm = ArmClient::builder(config.clone(), tokens.clone())
            .timer(Arc::new(ClockTimer(clock)))
            .build()?;
        let sender = config
            .service_bus
            .as_ref()
            .map(|sb| ServiceBusSender::new(sb, tokens.clone(), &config.audiences.service_bus));
        Ok(Deps {
            settings,
            clock,
            compute: ComputeClient::new(arm.clone()),
            backup: BackupClient::new(arm.clone()),
            key_vault: KeyVaultClient::new(arm.clone()),
            graph: ResourceGraphClient::new(arm.clone()),
            deployments: DeploymentsClient::new(arm.clone()),
            blob: BlobClient::new(arm),
            sender,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()?,
        })
    }
}

/// Every function of vmbackup with its trigger and outputs: the single source of truth for
/// routing, `functions/*/function.json` and `vmbackup package`.
pub fn app(deps: Arc<Deps>) -> FunctionApp {
    // Protection: vault lists are shared by on-vm-event and assess-vm within this process.
    let vaults = Arc::new(assess_vm::VaultDirectory::new(assess_vm::VAULT_CACHE_TTL));
    let key_vault_locks = Arc::new(enable_protection::KeyedLocks::default());
    let vm_locks = Arc::new(enable_protection::KeyedLocks::default());
    let app = FunctionApp::new()
        .function(on_vm_event::spec(), {
            let (deps, vaults) = (deps.clone(), vaults.clone());
            move |invocation| on_vm_event::handle(deps.clone(), vaults.clone(), invocation)
        })
        .function(discovery_sweep::spec(), {
            let deps = deps.clone();
            move |invocation| discovery_sweep::handle(deps.clone(), invocation)
        })
        .function(assess_vm::spec(), {
            let (deps, vaults) = (deps.clone(), vaults.clone());
            move |invocation| assess_vm::handle(deps.clone(), vaults.clone(), invocation)
        })
        .function(grant_key_vault_access::spec(), {
            let deps = deps.clone();
            move |invocation| {
                grant_key_vault_access::handle(deps.clone(), key_vault_locks.clone(), invocation)
            }
        })
        .function(enable_protection::spec(), {
            let deps = deps.clone();
            move |invocation| enable_protection::handle(deps.clone(), vm_locks.clone(), invocation)
        })
        .function(notify::spec(), {
            let deps = deps.clone();
            move |invocation| notify::handle(deps.clone(), invocation)
        })
        .function(start_restore::spec(), {
            let deps = deps.clone();
            move |inv| start_restore::handle(deps.clone(), inv)
        })
        .function(recreate_vm::spec(), {
            let deps = deps.clone();
            move |inv| recreate_vm::handle(deps.clone(), inv)
        })
        .function(reinstall_ade::spec(), {
            let deps = deps.clone();
            move |inv| reinstall_ade::handle(deps.clone(), inv)
        })
        .function(restore_webhook::spec(), {
            let deps = deps.clone();
            move |inv| restore_webhook::handle(deps.clone(), inv)
        });
    let app = backup_sweep::register(app, deps.clone());
    let app = trigger_backup::register(app, deps.clone());
    track_job::register(app, deps)
}

/// The app as declared, for generating its layout (handlers are never called).
pub fn declared_app() -> Result<FunctionApp, DepsError> {
    Ok(app(Arc::new(Deps::from_lookup(|_| None)?)))
}
