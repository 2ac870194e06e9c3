//! Resource Graph: KQL queries over many subscriptions, paged with `$skipToken`.

use super::error::AzureError;
use super::pipeline::{with_api_version, ApiRequest, ArmClient, Audience};
use super::retry::parse_retry_after;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

pub const RESOURCE_GRAPH_API_VERSION: &str = "2024-04-01";
/// Resource Graph's largest page.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// One page of a Resource Graph answer (`objectArray` format).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct QueryResponse {
    pub total_records: i64,
    pub count: i64,
    pub data: Vec<Value>,
    #[serde(rename = "$skipToken")]
    pub skip_token: Option<String>,
    /// `"true"`/`"false"` in the API (a string enum).
    pub result_truncated: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ResourceGraphClient {
    arm: ArmClient,
}

impl ResourceGraphClient {
    pub fn new(arm: ArmClient) -> Self {
        ResourceGraphClient { arm }
    }

    /// Every row of `query` over `subscriptions`, following `$skipToken` page by page.
    ///
    /// Resource Graph has its own per-user quota (not ARM's subscription buckets): when
    /// `x-ms-user-quota-remaining` reaches 0 the next page waits `x-ms-user-quota-resets-after`.
    pub async fn query(
        &self,
        query: &str,
        subscriptions: &[String],
    ) -> Result<Vec<Value>, AzureError> {
        let endpoint = &self.arm.config().resource_graph_endpoint;
        let url = with_api_version(
            endpoint,
            "/providers/Microsoft.ResourceGraph/resources",
            RESOURCE_GRAPH_API_VERSION,
        )?;
        let mut rows = Vec::new();
        let mut skip_token: Option<String> = None;
        loop {
            let mut options = json!({ "$top": MAX_PAGE_SIZE, "resultFormat": "objectArray" });
            if let Some(token) = &skip_token {
                options["$skipToken"] = json!(token);
            }
            let body =
                json!({ "query": query, "subscriptions": subscriptions, "options": options });
            let response = self
                .arm
                .send(ApiRequest::data_plane(Method::POST, url.clone(), Audience::Arm).json(body))
                .await?;
            let page: QueryResponse = response.json()?;
            rows.extend(page.data);
            match page.skip_token.filter(|t| !t.is_empty()) {
                Some(next) if Some(&next) != skip_token.as_ref() => skip_token = Some(next),
                _ => return Ok(rows),
            }
            if response.header("x-ms-user-quota-remaining").map(str::trim) == Some("0") {
                let wait = response
                    .header("x-ms-user-quota-resets-after")
                    .and_then(parse_hms)
                    .or_else(|| {
                        response
                            .header("retry-after")
                            .and_then(|v| parse_retry_after(v, self.arm.timer().now()))
                    })
                    .unwrap_or(Duration::from_secs(5));
                self.arm.timer().sleep(wait).await;
            }
        }
    }
}

/// `hh:mm:ss` → duration.
fn parse_hms(value: &str) -> Option<Duration> {
    let mut parts = value.trim().split(':').map(|p| p.parse::<f64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    let total = h * 3600.0 + m * 60.0 + s;
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_reset_format() {
        assert_eq!(parse_hms("00:00:05"), Some(Duration::from_secs(5)));
        assert_eq!(parse_hms("01:02:03"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_hms("soon"), None);
    }
}
