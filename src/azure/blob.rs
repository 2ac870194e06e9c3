//! Blob read and delete: the VM template and encryption info a disk restore writes to its staging
//! storage account, read with a Storage-audience token.

use super::error::AzureError;
use super::pipeline::{ApiRequest, ArmClient, Audience};
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::Method;
use url::Url;

/// Blob service REST version sent as `x-ms-version` (required with bearer tokens).
pub const STORAGE_API_VERSION: &str = "2023-11-03";

#[derive(Debug, Clone)]
pub struct BlobClient {
    arm: ArmClient,
}

fn blob_request(method: Method, blob_url: &str) -> Result<ApiRequest, AzureError> {
    let url = Url::parse(blob_url).map_err(|e| AzureError::InvalidInput {
        field: "blob_url".into(),
        message: format!("not a URL: {e}"),
    })?;
    let mut request = ApiRequest::data_plane(method, url, Audience::Storage);
    request.headers.push((
        HeaderName::from_static("x-ms-version"),
        HeaderValue::from_static(STORAGE_API_VERSION),
    ));
    Ok(request)
}

impl BlobClient {
    pub fn new(arm: ArmClient) -> Self {
        BlobClient { arm }
    }

    /// `https://{account}.blob.core.windows.net/{container}/{blob}` (or the simulator's equivalent).
    pub async fn read(&self, blob_url: &str) -> Result<Vec<u8>, AzureError> {
        Ok(self
            .arm
            .send(blob_request(Method::GET, blob_url)?)
            .await?
            .body)
    }

    /// Reads a JSON blob (restore template, encryption info).
    pub async fn read_json(&self, blob_url: &str) -> Result<serde_json::Value, AzureError> {
        self.arm
            .send(blob_request(Method::GET, blob_url)?)
            .await?
            .json()
    }

    /// Deletes a blob; an already-missing blob counts as deleted.
    pub async fn delete(&self, blob_url: &str) -> Result<(), AzureError> {
        match self.arm.send(blob_request(Method::DELETE, blob_url)?).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}
