//! Template deployments (recreating a VM from the template a disk restore produced).

use super::error::AzureError;
use super::pipeline::{decode_resource, ApiRequest, ArmClient};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

pub const DEPLOYMENTS_API_VERSION: &str = "2026-09-01";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Deployment {
    pub id: String,
    pub name: String,
    pub properties: DeploymentProperties,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DeploymentProperties {
    pub provisioning_state: Option<String>,
    pub correlation_id: Option<String>,
    pub duration: Option<String>,
    pub output_resources: Vec<super::compute::IdRef>,
    pub outputs: Option<Value>,
    pub error: Option<super::error::ArmErrorDetail>,
}

/// What to deploy: an inline template, or a link (the restore's template blob URI with its SAS).
#[derive(Clone, PartialEq)]
pub enum TemplateSource {
    Inline(Value),
    /// `query_string` is a SAS; it is sent to ARM and never logged.
    Link {
        uri: String,
        query_string: Option<String>,
    },
}

impl std::fmt::Debug for TemplateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateSource::Inline(_) => f.write_str("Inline(..)"),
            TemplateSource::Link { uri, .. } => f
                .debug_struct("Link")
                .field("uri", &uri.split('?').next().unwrap_or(""))
                .finish_non_exhaustive(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DeploymentsClient {
    arm: ArmClient,
}

fn deployment_path(
    subscription_id: &str,
    resource_group: &str,
    name: &str,
) -> Result<String, AzureError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || "-_.()".contains(c));
    if !valid {
        return Err(AzureError::InvalidInput {
            field: "deployment name".into(),
            message: format!("{name:?} must be 1-64 of letters, digits, '-', '_', '.', '(', ')'"),
        });
    }
    Ok(format!(
        "/subscriptions/{subscription_id}/resourcegroups/{resource_group}/providers/Microsoft.Resources/deployments/{name}"
    ))
}

impl DeploymentsClient {
    pub fn new(arm: ArmClient) -> Self {
        DeploymentsClient { arm }
    }

    /// PUTs an incremental deployment and follows it until it succeeds or fails.
    pub async fn deploy(
        &self,
        subscription_id: &str,
        resource_group: &str,
        name: &str,
        template: &TemplateSource,
        parameters: Value,
    ) -> Result<Deployment, AzureError> {
        let path = deployment_path(subscription_id, resource_group, name)?;
        let mut properties = json!({ "mode": "Incremental", "parameters": parameters });
        match template {
            TemplateSource::Inline(template) => properties["template"] = template.clone(),
            TemplateSource::Link { uri, query_string } => {
                properties["templateLink"] = json!({ "uri": uri });
                if let Some(qs) = query_string {
                    properties["templateLink"]["queryString"] = json!(qs);
                }
            }
        }
        let url = self.arm.arm_url(&path, DEPLOYMENTS_API_VERSION)?;
        let outcome = self
            .arm
            .send_lro(ApiRequest::arm(Method::PUT, url).json(json!({ "properties": properties })))
            .await?;
        decode_resource(outcome.resource, &path)
    }

    pub async fn get(
        &self,
        subscription_id: &str,
        resource_group: &str,
        name: &str,
    ) -> Result<Deployment, AzureError> {
        let path = deployment_path(subscription_id, resource_group, name)?;
        self.arm
            .get_json(self.arm.arm_url(&path, DEPLOYMENTS_API_VERSION)?)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_names_are_validated() {
        assert!(deployment_path("s", "rg", "restore-vm1.(2)").is_ok());
        let err = deployment_path("s", "rg", "bad/name").unwrap_err();
        assert!(err.to_string().contains("deployment name"));
        assert!(deployment_path("s", "rg", &"x".repeat(65)).is_err());
        let link = TemplateSource::Link {
            uri: "https://sa/c/t.json?sig=abc".into(),
            query_string: Some("sig=abc".into()),
        };
        assert!(!format!("{link:?}").contains("sig"));
    }
}
