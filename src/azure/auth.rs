//! Bearer tokens from `azure_identity`, cached per audience and refreshed well before they expire.

use super::config::{AzureConfig, CredentialChoice};
use super::error::AzureError;
use async_trait::async_trait;
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::time::OffsetDateTime;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// An access token. `Debug` and `Display` never show it; only the HTTP layer reads it.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(Arc<str>);

impl BearerToken {
    pub fn new(token: impl Into<Arc<str>>) -> Self {
        BearerToken(token.into())
    }

    /// The raw token, for an `Authorization` header only.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Anything that hands out bearer tokens for an audience (scope such as `https://vault.azure.net/.default`).
#[async_trait]
pub trait TokenSource: Send + Sync {
    async fn token(&self, audience: &str) -> Result<BearerToken, AzureError>;
}

/// How long before expiry a cached token is replaced.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// Tokens from an `azure_identity` credential, one cache entry per audience.
pub struct IdentityTokenSource {
    credential: Arc<dyn TokenCredential>,
    cache: tokio::sync::Mutex<HashMap<String, (BearerToken, OffsetDateTime)>>,
}

impl IdentityTokenSource {
    pub fn new(credential: Arc<dyn TokenCredential>) -> Self {
        IdentityTokenSource {
            credential,
            cache: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Builds the credential the configuration names.
    ///
    /// Managed identity follows `azure_identity` 1.x: with `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`
    /// set it asks that App Service-style endpoint (plain http on loopback works, which is how local
    /// runs use the simulator's token endpoint); otherwise it asks IMDS.
    pub fn from_config(config: &AzureConfig) -> Result<Self, AzureError> {
        let auth_err = |e: azure_core::Error| AzureError::Auth {
            audience: "(credential setup)".to_string(),
            message: e.to_string(),
        };
        let credential: Arc<dyn TokenCredential> = match &config.credential {
            CredentialChoice::ManagedIdentity {
                user_assigned_client_id,
            } => {
                let options = azure_identity::ManagedIdentityCredentialOptions {
                    user_assigned_id: user_assigned_client_id
                        .clone()
                        .map(azure_identity::UserAssignedId::ClientId),
                    ..Default::default()
                };
                azure_identity::ManagedIdentityCredential::new(Some(options)).map_err(auth_err)?
            }
            CredentialChoice::DeveloperTools => {
                azure_identity::DeveloperToolsCredential::new(None).map_err(auth_err)?
            }
            CredentialChoice::ClientSecret {
                tenant_id,
                client_id,
                secret,
            } => {
                let mut cloud = azure_core::cloud::CustomConfiguration::default();
                cloud.authority_host = config.authority_host.as_str().trim_end_matches('/').into();
                let mut options = azure_identity::ClientSecretCredentialOptions::default();
                options.client_options.cloud = Some(Arc::new(
                    azure_core::cloud::CloudConfiguration::Custom(cloud),
                ));
                azure_identity::ClientSecretCredential::new(
                    tenant_id,
                    client_id.clone(),
                    Secret::new(secret.clone()),
                    Some(options),
                )
                .map_err(auth_err)?
            }
        };
        Ok(IdentityTokenSource::new(credential))
    }
}

#[async_trait]
impl TokenSource for IdentityTokenSource {
    async fn token(&self, audience: &str) -> Result<BearerToken, AzureError> {
        // One lock across the fetch: concurrent callers wait for one token instead of all asking.
        let mut cache = self.cache.lock().await;
        let fresh_until = OffsetDateTime::now_utc() + TOKEN_REFRESH_MARGIN;
        if let Some((token, expires_on)) = cache.get(audience) {
            if *expires_on > fresh_until {
                return Ok(token.clone());
            }
        }
        let access = self
            .credential
            .get_token(&[audience], None)
            .await
            .map_err(|e| AzureError::Auth {
                audience: audience.to_string(),
                message: e.to_string(),
            })?;
        let token = BearerToken::new(access.token.secret());
        cache.insert(audience.to_string(), (token.clone(), access.expires_on));
        tracing::debug!(audience, expires_on = %access.expires_on, "acquired access token");
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::credentials::{AccessToken, TokenRequestOptions};
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug)]
    struct CountingCredential {
        calls: AtomicU32,
        lifetime: time::Duration,
    }

    #[async_trait]
    impl TokenCredential for CountingCredential {
        async fn get_token(
            &self,
            scopes: &[&str],
            _: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(AccessToken::new(
                format!("token-{}-{n}", scopes[0]),
                OffsetDateTime::now_utc() + self.lifetime,
            ))
        }
    }

    #[tokio::test]
    async fn caches_per_audience_and_refreshes_tokens_close_to_expiry() {
        let long = Arc::new(CountingCredential {
            calls: AtomicU32::new(0),
            lifetime: time::Duration::hours(1),
        });
        let source = IdentityTokenSource::new(long.clone());
        let a1 = source.token("arm").await.unwrap();
        let a2 = source.token("arm").await.unwrap();
        let k = source.token("vault").await.unwrap();
        assert_eq!(a1, a2);
        assert_ne!(a1, k);
        assert_eq!(long.calls.load(Ordering::SeqCst), 2);
        assert_eq!(format!("{a1:?}"), "BearerToken(<redacted>)");

        // A token expiring within the refresh margin is replaced on every call.
        let short = Arc::new(CountingCredential {
            calls: AtomicU32::new(0),
            lifetime: time::Duration::minutes(2),
        });
        let source = IdentityTokenSource::new(short.clone());
        let first = source.token("arm").await.unwrap();
        let second = source.token("arm").await.unwrap();
        assert_ne!(first, second);
        assert_eq!(short.calls.load(Ordering::SeqCst), 2);
    }
}
