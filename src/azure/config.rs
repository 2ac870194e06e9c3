//! Where Azure is and who we are: endpoints, token audiences and the credential choice.
//!
//! Defaults are Azure public cloud. A local run points the endpoints at the simulator; the managed
//! identity credential is pointed at a token endpoint with the standard `IDENTITY_ENDPOINT` /
//! `IDENTITY_HEADER` variables, which `azure_identity` reads itself.

use super::error::AzureError;
use url::Url;

/// ARM endpoint (`https://management.azure.com`).
pub const ENV_ARM_ENDPOINT: &str = "VMBACKUP_ARM_ENDPOINT";
/// Resource Graph endpoint; defaults to the ARM endpoint.
pub const ENV_RESOURCE_GRAPH_ENDPOINT: &str = "VMBACKUP_RESOURCE_GRAPH_ENDPOINT";
/// Entra ID authority host for the client-secret credential (`https://login.microsoftonline.com`).
pub const ENV_AUTHORITY_HOST: &str = "VMBACKUP_AUTHORITY_HOST";
/// Which credential to use: `managed-identity` (default), `developer-tools` or `client-secret`.
pub const ENV_CREDENTIAL: &str = "VMBACKUP_CREDENTIAL";
/// Token audiences (scopes) per service; defaults are the public cloud's.
pub const ENV_ARM_AUDIENCE: &str = "VMBACKUP_ARM_AUDIENCE";
pub const ENV_KEYVAULT_AUDIENCE: &str = "VMBACKUP_KEYVAULT_AUDIENCE";
pub const ENV_STORAGE_AUDIENCE: &str = "VMBACKUP_STORAGE_AUDIENCE";
pub const ENV_SERVICEBUS_AUDIENCE: &str = "VMBACKUP_SERVICEBUS_AUDIENCE";
/// Client id of a user-assigned managed identity, or of the app for `client-secret` (standard name).
pub const ENV_AZURE_CLIENT_ID: &str = "AZURE_CLIENT_ID";
/// Tenant of the app for `client-secret` (standard name).
pub const ENV_AZURE_TENANT_ID: &str = "AZURE_TENANT_ID";
/// Secret of the app for `client-secret` (standard name). Read once, never logged.
pub const ENV_AZURE_CLIENT_SECRET: &str = "AZURE_CLIENT_SECRET";
/// Service Bus namespace with Entra auth, as the Functions host's identity-based connection names it
/// (`<name>.servicebus.windows.net`).
pub const ENV_SERVICEBUS_NAMESPACE: &str = "ServiceBusConnection__fullyQualifiedNamespace";
/// Service Bus connection string (SAS auth); used when set, instead of Entra auth.
pub const ENV_SERVICEBUS_CONNECTION_STRING: &str = "ServiceBusConnection";
/// Where Service Bus requests really go (a local run's Service Bus-compatible endpoint).
pub const ENV_SERVICEBUS_ENDPOINT: &str = "VMBACKUP_SERVICEBUS_ENDPOINT";

pub const DEFAULT_ARM_ENDPOINT: &str = "https://management.azure.com";
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
pub const DEFAULT_ARM_AUDIENCE: &str = "https://management.azure.com/.default";
pub const DEFAULT_KEYVAULT_AUDIENCE: &str = "https://vault.azure.net/.default";
pub const DEFAULT_STORAGE_AUDIENCE: &str = "https://storage.azure.com/.default";
pub const DEFAULT_SERVICEBUS_AUDIENCE: &str = "https://servicebus.azure.net/.default";

/// How the process authenticates to Entra ID.
#[derive(Clone, PartialEq, Eq)]
pub enum CredentialChoice {
    /// Managed identity: system-assigned, or user-assigned when a client id is given.
    ManagedIdentity {
        user_assigned_client_id: Option<String>,
    },
    /// Azure CLI, then Azure Developer CLI (a laptop).
    DeveloperTools,
    /// An app registration's client secret (CI pipelines).
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret: String,
    },
}

impl std::fmt::Debug for CredentialChoice {
    // The secret never reaches a log line, even through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialChoice::ManagedIdentity {
                user_assigned_client_id,
            } => f
                .debug_struct("ManagedIdentity")
                .field("user_assigned_client_id", user_assigned_client_id)
                .finish(),
            CredentialChoice::DeveloperTools => f.write_str("DeveloperTools"),
            CredentialChoice::ClientSecret {
                tenant_id,
                client_id,
                ..
            } => f
                .debug_struct("ClientSecret")
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .field("secret", &"<redacted>")
                .finish(),
        }
    }
}

/// Token audiences, one per service the clients call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audiences {
    pub arm: String,
    pub key_vault: String,
    pub storage: String,
    pub service_bus: String,
}

impl Default for Audiences {
    fn default() -> Self {
        Audiences {
            arm: DEFAULT_ARM_AUDIENCE.to_string(),
            key_vault: DEFAULT_KEYVAULT_AUDIENCE.to_string(),
            storage: DEFAULT_STORAGE_AUDIENCE.to_string(),
            service_bus: DEFAULT_SERVICEBUS_AUDIENCE.to_string(),
        }
    }
}

/// Service Bus: which namespace, how to authenticate, and where requests really go.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceBusConfig {
    /// Namespace name without the `.servicebus.windows.net` suffix.
    pub namespace: String,
    /// SAS policy and key from a connection string; `None` means Entra ID auth.
    pub sas: Option<SasKey>,
    /// Requests to `https://{namespace}.servicebus.windows.net` are sent here instead.
    pub endpoint_override: Option<Url>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct SasKey {
    pub policy_name: String,
    pub key: String,
}

impl std::fmt::Debug for ServiceBusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBusConfig")
            .field("namespace", &self.namespace)
            .field(
                "sas_policy",
                &self.sas.as_ref().map(|sas| sas.policy_name.as_str()),
            )
            .field("endpoint_override", &self.endpoint_override)
            .finish()
    }
}

impl ServiceBusConfig {
    /// Reads `Endpoint=sb://{ns}.servicebus.windows.net/;SharedAccessKeyName=…;SharedAccessKey=…`.
    pub fn from_connection_string(connection_string: &str) -> Result<Self, AzureError> {
        let mut endpoint = None;
        let mut policy_name = None;
        let mut key = None;
        for part in connection_string
            .split(';')
            .filter(|p| !p.trim().is_empty())
        {
            let Some((name, value)) = part.split_once('=') else {
                continue;
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(value.trim().to_string()),
                "sharedaccesskeyname" => policy_name = Some(value.trim().to_string()),
                "sharedaccesskey" => key = Some(value.trim().to_string()),
                _ => {}
            }
        }
        let missing = |what: &str| AzureError::Config {
            name: ENV_SERVICEBUS_CONNECTION_STRING.to_string(),
            message: format!("the connection string has no {what}"),
        };
        let endpoint = endpoint.ok_or_else(|| missing("Endpoint"))?;
        let host = Url::parse(&endpoint)
            .ok()
            .and_then(|url| url.host_str().map(str::to_string))
            .ok_or_else(|| missing("valid Endpoint URL"))?;
        Ok(ServiceBusConfig {
            namespace: namespace_name(&host),
            sas: Some(SasKey {
                policy_name: policy_name.ok_or_else(|| missing("SharedAccessKeyName"))?,
                key: key.ok_or_else(|| missing("SharedAccessKey"))?,
            }),
            endpoint_override: None,
        })
    }
}

/// `vmbackup-sb.servicebus.windows.net` → `vmbackup-sb`; a bare name stays as it is.
fn namespace_name(host_or_name: &str) -> String {
    host_or_name
        .split('.')
        .next()
        .unwrap_or(host_or_name)
        .to_string()
}

/// Everything the Azure clients need to know about where Azure is.
#[derive(Debug, Clone, PartialEq)]
pub struct AzureConfig {
    pub arm_endpoint: Url,
    pub resource_graph_endpoint: Url,
    pub authority_host: Url,
    pub audiences: Audiences,
    pub credential: CredentialChoice,
    pub service_bus: Option<ServiceBusConfig>,
}

impl Default for AzureConfig {
    fn default() -> Self {
        let arm = Url::parse(DEFAULT_ARM_ENDPOINT).expect("constant URL parses");
        AzureConfig {
            resource_graph_endpoint: arm.clone(),
            arm_endpoint: arm,
            authority_host: Url::parse(DEFAULT_AUTHORITY_HOST).expect("constant URL parses"),
            audiences: Audiences::default(),
            credential: CredentialChoice::ManagedIdentity {
                user_assigned_client_id: None,
            },
            service_bus: None,
        }
    }
}

impl AzureConfig {
    /// A configuration whose ARM and Resource Graph endpoints are `endpoint` (a simulator or a mock).
    pub fn for_endpoint(endpoint: Url) -> Self {
        AzureConfig {
            arm_endpoint: endpoint.clone(),
            resource_graph_endpoint: endpoint,
            ..AzureConfig::default()
        }
    }

    /// Reads the process environment (Functions app settings arrive as environment variables).
    pub fn from_env() -> Result<Self, AzureError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, AzureError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let url = |name: &str, default: &str| -> Result<Url, AzureError> {
            let value = get(name).unwrap_or_else(|| default.to_string());
            Url::parse(value.trim()).map_err(|e| AzureError::Config {
                name: name.to_string(),
                message: format!("must be an absolute URL, got {value:?}: {e}"),
            })
        };
        let arm_endpoint = url(ENV_ARM_ENDPOINT, DEFAULT_ARM_ENDPOINT)?;
        let resource_graph_endpoint = url(ENV_RESOURCE_GRAPH_ENDPOINT, arm_endpoint.as_str())?;
        let authority_host = url(ENV_AUTHORITY_HOST, DEFAULT_AUTHORITY_HOST)?;
        let audience = |name: &str, default: &str| get(name).unwrap_or_else(|| default.into());
        let audiences = Audiences {
            arm: audience(ENV_ARM_AUDIENCE, DEFAULT_ARM_AUDIENCE),
            key_vault: audience(ENV_KEYVAULT_AUDIENCE, DEFAULT_KEYVAULT_AUDIENCE),
            storage: audience(ENV_STORAGE_AUDIENCE, DEFAULT_STORAGE_AUDIENCE),
            service_bus: audience(ENV_SERVICEBUS_AUDIENCE, DEFAULT_SERVICEBUS_AUDIENCE),
        };
        let required = |name: &str| {
            get(name).ok_or_else(|| AzureError::Config {
                name: name.to_string(),
                message: format!("is required when {ENV_CREDENTIAL}=client-secret"),
            })
        };
        let credential = match get(ENV_CREDENTIAL).as_deref().map(str::trim) {
            None | Some("managed-identity") => CredentialChoice::ManagedIdentity {
                user_assigned_client_id: get(ENV_AZURE_CLIENT_ID),
            },
            Some("developer-tools") => CredentialChoice::DeveloperTools,
            Some("client-secret") => CredentialChoice::ClientSecret {
                tenant_id: required(ENV_AZURE_TENANT_ID)?,
                client_id: required(ENV_AZURE_CLIENT_ID)?,
                secret: required(ENV_AZURE_CLIENT_SECRET)?,
            },
            Some(other) => {
                return Err(AzureError::Config {
                    name: ENV_CREDENTIAL.to_string(),
                    message: format!(
                        "must be managed-identity, developer-tools or client-secret, got {other:?}"
                    ),
                })
            }
        };
        let mut service_bus = match (
            get(ENV_SERVICEBUS_CONNECTION_STRING),
            get(ENV_SERVICEBUS_NAMESPACE),
        ) {
            (Some(connection_string), _) => Some(ServiceBusConfig::from_connection_string(
                &connection_string,
            )?),
            (None, Some(namespace)) => Some(ServiceBusConfig {
                namespace: namespace_name(namespace.trim()),
                sas: None,
                endpoint_override: None,
            }),
            (None, None) => None,
        };
        if let (Some(sb), Some(_)) = (service_bus.as_mut(), get(ENV_SERVICEBUS_ENDPOINT)) {
            sb.endpoint_override = Some(url(ENV_SERVICEBUS_ENDPOINT, "")?);
        }
        Ok(AzureConfig {
            arm_endpoint,
            resource_graph_endpoint,
            authority_host,
            audiences,
            credential,
            service_bus,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<AzureConfig, AzureError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        AzureConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_public_cloud_with_managed_identity() {
        let cfg = config(&[]).unwrap();
        assert_eq!(cfg, AzureConfig::default());
        assert_eq!(cfg.arm_endpoint.as_str(), "https://management.azure.com/");
        assert_eq!(cfg.resource_graph_endpoint, cfg.arm_endpoint);
    }

    #[test]
    fn resource_graph_follows_arm_override_and_client_id_selects_user_assigned() {
        let cfg = config(&[
            (ENV_ARM_ENDPOINT, "http://127.0.0.1:8080"),
            (ENV_AZURE_CLIENT_ID, "abc"),
        ])
        .unwrap();
        assert_eq!(
            cfg.resource_graph_endpoint.as_str(),
            "http://127.0.0.1:8080/"
        );
        assert_eq!(
            cfg.credential,
            CredentialChoice::ManagedIdentity {
                user_assigned_client_id: Some("abc".into())
            }
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = config(&[(ENV_ARM_ENDPOINT, "not a url")]).unwrap_err();
        assert!(err.to_string().contains(ENV_ARM_ENDPOINT), "{err}");
        let err = config(&[(ENV_CREDENTIAL, "client-secret")]).unwrap_err();
        assert!(err.to_string().contains(ENV_AZURE_TENANT_ID), "{err}");
        let err = config(&[(ENV_CREDENTIAL, "password")]).unwrap_err();
        assert!(err.to_string().contains(ENV_CREDENTIAL), "{err}");
    }

    #[test]
    fn client_secret_is_not_in_debug_output() {
        let cfg = config(&[
            (ENV_CREDENTIAL, "client-secret"),
            (ENV_AZURE_TENANT_ID, "t"),
            (ENV_AZURE_CLIENT_ID, "c"),
            (ENV_AZURE_CLIENT_SECRET, "hunter2-secret-value"),
        ])
        .unwrap();
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn service_bus_from_connection_string_or_namespace() {
        let cfg = config(&[
            (
                ENV_SERVICEBUS_CONNECTION_STRING,
                "Endpoint=sb://vmb-sb.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=c2VjcmV0",
            ),
            (ENV_SERVICEBUS_ENDPOINT, "http://127.0.0.1:7071"),
        ])
        .unwrap();
        let sb = cfg.service_bus.unwrap();
        assert_eq!(sb.namespace, "vmb-sb");
        assert_eq!(sb.sas.as_ref().unwrap().policy_name, "send");
        assert_eq!(
            sb.endpoint_override.unwrap().as_str(),
            "http://127.0.0.1:7071/"
        );
        assert!(!format!("{:?}", config(&[(ENV_SERVICEBUS_CONNECTION_STRING, "Endpoint=sb://a.servicebus.windows.net/;SharedAccessKeyName=p;SharedAccessKey=zzsecret")]).unwrap()).contains("zzsecret"));

        let cfg = config(&[(ENV_SERVICEBUS_NAMESPACE, "vmb-sb.servicebus.windows.net")]).unwrap();
        assert_eq!(cfg.service_bus.unwrap().namespace, "vmb-sb");
        let err = config(&[(ENV_SERVICEBUS_CONNECTION_STRING, "Endpoint=sb://a/")]).unwrap_err();
        assert!(err.to_string().contains("SharedAccessKeyName"), "{err}");
    }
}
