//! The Azure pipeline and clients against small axum mocks on 127.0.0.1:0.
//!
//! Time is virtual: the pipeline sleeps on a `VirtualTimer` that advances instantly, and the mocks
//! stamp each request with the same virtual clock, so "no request was sent before Retry-After"
//! is checked exactly without waiting.

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, TimeZone, Utc};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use url::Url;
use vmbackup::azure::backup::{BackupClient, ProtectedItemRef};
use vmbackup::azure::blob::BlobClient;
use vmbackup::azure::config::{SasKey, ServiceBusConfig};
use vmbackup::azure::graph::ResourceGraphClient;
use vmbackup::azure::keyvault::KeyVaultClient;
use vmbackup::azure::servicebus::{OutgoingMessage, ServiceBusSender};
use vmbackup::azure::{
    ApiRequest, ArmClient, AzureConfig, AzureError, BearerToken, IdentityTokenSource, RetryPolicy,
    Timer, TokenSource,
};

const TOKEN: &str = "eyJ0eXAi-test-access-token-5f2c";

struct FixedTokens;

#[async_trait::async_trait]
impl TokenSource for FixedTokens {
    async fn token(&self, _audience: &str) -> Result<BearerToken, AzureError> {
        Ok(BearerToken::new(TOKEN))
    }
}

/// Virtual time: `sleep` advances it at once and records how long was asked for.
#[derive(Default)]
struct VirtualTimer {
    elapsed: Mutex<Duration>,
    sleeps: Mutex<Vec<Duration>>,
}

fn origin() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).unwrap()
}

impl Timer for VirtualTimer {
    fn now(&self) -> DateTime<Utc> {
        origin() + chrono::Duration::from_std(*self.elapsed.lock().unwrap()).unwrap()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        *self.elapsed.lock().unwrap() += duration;
        self.sleeps.lock().unwrap().push(duration);
        Box::pin(async {})
    }
}

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    /// Path and query exactly as received.
    uri: String,
    headers: HeaderMap,
    body: Vec<u8>,
    at: DateTime<Utc>,
}

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

fn reply(status: u16, body: Value) -> Reply {
    Reply {
        status,
        headers: vec![],
        body: if body.is_null() {
            String::new()
        } else {
            body.to_string()
        },
    }
}

impl Reply {
    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

type Handler = Arc<dyn Fn(&Recorded, usize) -> Reply + Send + Sync>;

struct Mock {
    base: Url,
    log: Arc<Mutex<Vec<Recorded>>>,
}

impl Mock {
    fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }
}

/// Starts a mock; `make` receives the mock's base URL and returns the handler of every request
/// (with the request's index in arrival order).
async fn mock(timer: Arc<VirtualTimer>, make: impl FnOnce(Url) -> Handler) -> Mock {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
    let handler = make(base.clone());
    let log: Arc<Mutex<Vec<Recorded>>> = Arc::default();
    let app_log = log.clone();
    let app = axum::Router::new().fallback(move |request: Request| {
        let handler = handler.clone();
        let log = app_log.clone();
        let timer = timer.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body: Bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let recorded = Recorded {
                method: parts.method.to_string(),
                uri: parts.uri.to_string(),
                headers: parts.headers,
                body: body.to_vec(),
                at: timer.now(),
            };
            let index = {
                let mut log = log.lock().unwrap();
                log.push(recorded.clone());
                log.len() - 1
            };
            let r = handler(&recorded, index);
            let mut response: Response =
                (StatusCode::from_u16(r.status).unwrap(), r.body).into_response();
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            for (name, value) in r.headers {
                response.headers_mut().insert(name, value.parse().unwrap());
            }
            response
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Mock { base, log }
}

fn client(base: &Url, timer: Arc<VirtualTimer>) -> ArmClient {
    ArmClient::builder(
        AzureConfig::for_endpoint(base.clone()),
        Arc::new(FixedTokens),
    )
    .timer(timer)
    .build()
    .unwrap()
}

const VM: &str =
    "/subscriptions/sub1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1";

#[tokio::test]
async fn a_429_storm_is_ridden_out_and_no_request_is_sent_before_retry_after() {
    let timer = Arc::new(VirtualTimer::default());
    let server = mock(timer.clone(), |_| {
        Arc::new(|_, i| {
            if i < 4 {
                reply(
                    429,
                    json!({"error":{"code":"TooManyRequests","message":"slow down"}}),
                )
                .header("retry-after", "7")
            } else {
                reply(200, json!({"name":"vm1","properties":{}}))
            }
        })
    })
    .await;
    let arm = client(&server.base, timer.clone());
    let vm: Value = arm
        .get_json(arm.arm_url(VM, "2025-11-01").unwrap())
        .await
        .unwrap();
    assert_eq!(vm["name"], "vm1");
    let requests = server.requests();
    assert_eq!(requests.len(), 5);
    for pair in requests.windows(2) {
        assert!(
            pair[1].at - pair[0].at >= chrono::Duration::seconds(7),
            "a retry came {:?} after a 429 with Retry-After: 7",
            pair[1].at - pair[0].at
        );
    }
    assert!(requests
        .iter()
        .all(|r| r.headers["authorization"] == format!("Bearer {TOKEN}").as_str()));
}

#[tokio::test]
async fn a_5xx_is_retried_and_a_400_is_not() {
    let timer = Arc::new(VirtualTimer::default());
    let server = mock(timer.clone(), |_| {
        Arc::new(|r, i| {
            if r.uri.contains("flaky") {
                if i == 0 {
                    reply(503, json!({"error":{"code":"ServiceUnavailable","message":"busy"}}))
                } else {
                    reply(200, json!({"ok": true}))
                }
            } else {
                reply(
                    400,
                    json!({"error":{"code":"BadRequest","message":"no","target":"properties.policyId",
                      "details":[{"code":"UserErrorKeyvaultPermissionsNotConfigured","message":"kv"}]}}),
                )
                .header("x-ms-request-id", "req-400")
            }
        })
    })
    .await;
    let arm = client(&server.base, timer.clone());
    let ok: Value = arm
        .get_json(arm.arm_url("/subscriptions/s/flaky", "1").unwrap())
        .await
        .unwrap();
    assert_eq!(ok["ok"], true);
    assert_eq!(server.requests().len(), 2);

    let err = arm
        .get_json::<Value>(arm.arm_url("/subscriptions/s/bad", "1").unwrap())
        .await
        .unwrap_err();
    assert_eq!(server.requests().len(), 3, "a 400 must not be retried");
    assert_eq!(err.status(), Some(400));
    assert!(err.has_code("UserErrorKeyVaultPermissionsNotConfigured"));
    assert!(!err.is_transient());
    let AzureError::Arm(arm_error) = &err else {
        panic!("expected an ARM error, got {err:?}")
    };
    assert_eq!(arm_error.request_id.as_deref(), Some("req-400"));
    assert_eq!(
        arm_error.error.target.as_deref(),
        Some("properties.policyId")
    );
}

#[tokio::test]
async fn connection_failures_are_retried_a_bounded_number_of_times() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
    drop(listener);
    let timer = Arc::new(VirtualTimer::default());
    let arm = ArmClient::builder(AzureConfig::for_endpoint(base), Arc::new(FixedTokens))
        .timer(timer.clone())
        .retry_policy(RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    let err = arm
        .get_json::<Value>(arm.arm_url(VM, "1").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, AzureError::Transport { .. }), "{err:?}");
    assert_eq!(
        timer.sleeps.lock().unwrap().len(),
        2,
        "3 attempts, 2 backoffs"
    );
}

#[tokio::test]
async fn put_follows_azure_async_operation_as_given_then_reads_the_resource() {
    let timer = Arc::new(VirtualTimer::default());
    let server = mock(timer.clone(), |base| {
        let status_url = format!(
            "{base}subscriptions/sub1/providers/Microsoft.Compute/locations/westus/operations/op1?api-version=2016-12-01&monitor=true"
        );
        let polls = Arc::new(Mutex::new(0));
        Arc::new(move |r, _| match (r.method.as_str(), r.uri.as_str()) {
            ("PUT", _) => reply(201, json!({"name":"ext","properties":{"provisioningState":"Creating"}}))
                .header("azure-asyncoperation", status_url.clone())
                .header("retry-after", "3"),
            (_, uri) if uri.contains("/operations/op1") => {
                let mut polls = polls.lock().unwrap();
                *polls += 1;
                if *polls < 3 {
                    reply(200, json!({"status":"InProgress"})).header("retry-after", "5")
                } else {
                    reply(200, json!({"status":"Succeeded"}))
                }
            }
            _ => reply(200, json!({"name":"ext","properties":{"provisioningState":"Succeeded","publisher":"Microsoft.Azure.Security"}})),
        })
    })
    .await;
    let compute = vmbackup::azure::compute::ComputeClient::new(client(&server.base, timer.clone()));
    let params = vmbackup::azure::compute::VmExtensionParameters {
        location: "westus".into(),
        publisher: "Microsoft.Azure.Security".into(),
        extension_type: "AzureDiskEncryptionForLinux".into(),
        type_handler_version: "1.1".into(),
        auto_upgrade_minor_version: true,
        settings: json!({"EncryptionOperation":"EnableEncryption"}),
        protected_settings: None,
    };
    let ext = compute
        .put_extension(VM, "AzureDiskEncryptionForLinux", &params)
        .await
        .unwrap();
    assert_eq!(
        ext.properties.provisioning_state.as_deref(),
        Some("Succeeded")
    );
    let requests = server.requests();
    let methods: Vec<_> = requests.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods, ["PUT", "GET", "GET", "GET", "GET"]);
    // The status URL is followed exactly as returned, old api-version and extra query included.
    assert!(requests[1]
        .uri
        .ends_with("/operations/op1?api-version=2016-12-01&monitor=true"));
    assert!(requests[2].at - requests[1].at >= chrono::Duration::seconds(5));
    assert!(requests[1].at - requests[0].at >= chrono::Duration::seconds(3));
    let put: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(put["properties"]["type"], "AzureDiskEncryptionForLinux");
    assert!(requests[4]
        .uri
        .contains("/extensions/AzureDiskEncryptionForLinux?api-version="));
}

#[tokio::test]
async fn backup_trigger_returns_the_job_id_from_the_operation_status() {
    let timer = Arc::new(VirtualTimer::default());
    let server = mock(timer.clone(), |base| {
        let op = format!("{base}Subscriptions/sub1/resourceGroups/rg/providers/Microsoft.RecoveryServices/vaults/v/backupFabrics/Azure/protectionContainers/c/protectedItems/i/operationsStatus/abc?api-version=2016-12-01");
        let polled = Arc::new(Mutex::new(false));
        Arc::new(move |r, _| {
            if r.method == "POST" {
                return reply(202, Value::Null)
                    .header("azure-asyncoperation", op.clone())
                    .header("location", op.replace("operationsStatus", "operationResults"))
                    .header("retry-after", "60");
            }
            if r.uri.contains("operationsStatus") {
                let mut polled = polled.lock().unwrap();
                let first = !*polled;
                *polled = true;
                return if first {
                    reply(200, json!({"status":"InProgress"}))
                } else {
                    reply(200, json!({"status":"Succeeded","properties":{"objectType":"OperationStatusJobExtendedInfo","jobId":"job-42"}}))
                };
            }
            reply(204, Value::Null)
        })
    })
    .await;
    let backup = BackupClient::new(client(&server.base, timer.clone()));
    let item = ProtectedItemRef::for_vm(
        "/subscriptions/sub1/resourceGroups/rg/providers/Microsoft.RecoveryServices/vaults/v",
        VM,
    )
    .unwrap();
    let expiry = Utc.with_ymd_and_hms(2026, 12, 28, 0, 0, 0).unwrap();
    let job = backup.trigger_backup(&item, Some(expiry)).await.unwrap();
    assert_eq!(job.as_deref(), Some("job-42"));
    let requests = server.requests();
    let body: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(body["properties"]["objectType"], "IaasVMBackupRequest");
    assert_eq!(
        body["properties"]["recoveryPointExpiryTimeInUTC"],
        "2026-12-28T00:00:00Z"
    );
    assert!(requests[0]
        .uri
        .contains("protectedItems/VM;iaasvmcontainerv2;rg;vm1/backup?api-version=2026-02-01"));
    assert!(requests[1].at - requests[0].at >= chrono::Duration::seconds(60));
    assert!(requests.last().unwrap().uri.contains("operationResults"));
}

#[tokio::test]
async fn location_polling_ends_on_204_and_failed_operations_are_typed() {
    let timer = Arc::new(VirtualTimer::default());
    let server = mock(timer.clone(), |base| {
        let location = format!("{base}subscriptions/sub1/resourceGroups/rg/providers/Microsoft.RecoveryServices/vaults/v/backupFabrics/Azure/operationResults/r1?api-version=2016-12-01");
        let failing = format!("{base}subscriptions/sub1/operations/bad?api-version=1");
        let polls = Arc::new(Mutex::new(0));
        Arc::new(move |r, _| {
            if r.uri.contains("refreshContainers") {
                return reply(202, Value::Null).header("location", location.clone()).header("retry-after", "2");
            }
            if r.uri.contains("operationResults/r1") {
                let mut polls = polls.lock().unwrap();
                *polls += 1;
                return if *polls < 2 {
                    reply(202, Value::Null).header("location", location.clone()).header("retry-after", "2")
                } else {
                    reply(204, Value::Null)
                };
            }
            if r.method == "PUT" {
                return reply(201, Value::Null).header("azure-asyncoperation", failing.clone());
            }
            reply(200, json!({"status":"Failed","error":{"code":"UserErrorKeyVaultPermissionsNotConfigured","message":"grant access"}}))
        })
    })
    .await;
    let arm = client(&server.base, timer.clone());
    let backup = BackupClient::new(arm.clone());
    backup
        .refresh_containers(
            "/subscriptions/sub1/resourceGroups/rg/providers/Microsoft.RecoveryServices/vaults/v",
        )
        .await
        .unwrap();
    assert_eq!(server.requests().len(), 3);
    assert!(
        server.requests()[0]
            .uri
            .contains("%24filter=backupManagementType")
            || server.requests()[0]
                .uri
                .contains("$filter=backupManagementType")
    );

    let item = ProtectedItemRef::for_vm(
        "/subscriptions/sub1/resourceGroups/rg/providers/Microsoft.RecoveryServices/vaults/v",
        VM,
    )
    .unwrap();
    let err = backup
        .enable_protection(&item, VM, "/policy")
        .await
        .unwrap_err();
    assert!(matches!(err, AzureError::OperationFailed { .. }), "{err:?}");
    assert!(err.has_code("UserErrorKeyvaultPermissionsNotConfigured"));
}

#[tokio::test]
async fn provisioning_state_is_polled_on_the_resource_until_terminal() {
    let timer = Arc::new(VirtualTimer::default());
    let server = mock(timer.clone(), |_| {
        Arc::new(|r, i| {
            if r.method == "PUT" {
                reply(201, json!({"name":"d","properties":{"provisioningState":"Accepted"}}))
            } else if i < 3 {
                reply(200, json!({"name":"d","properties":{"provisioningState":"Running"}}))
            } else {
                reply(200, json!({"name":"d","properties":{"provisioningState":"Succeeded","outputResources":[{"id":"/vm"}]}}))
            }
        })
    })
    .await;
    let deployments =
        vmbackup::azure::deployments::DeploymentsClient::new(client(&server.base, timer.clone()));
    let deployment = deployments
        .deploy(
            "sub1",
            "rg",
            "restore-vm1",
            &vmbackup::azure::deployments::TemplateSource::Inline(json!({"resources":[]})),
            json!({}),
        )
        .await
        .unwrap();
    assert_eq!(deployment.properties.output_resources[0].id, "/vm");
    assert_eq!(server.requests().len(), 4);
    assert!(server.requests()[0].uri.starts_with("/subscriptions/sub1/resourcegroups/rg/providers/Microsoft.Resources/deployments/restore-vm1?api-version="));
}

#[tokio::test]
async fn next_link_paging_collects_more_than_a_thousand_items() {
    let timer = Arc::new(VirtualTimer::default());
    let server = mock(timer.clone(), |base| {
        Arc::new(move |r, _| {
            let page: usize = r
                .uri
                .split("page=")
                .nth(1)
                .and_then(|p| p.split('&').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let value: Vec<Value> = (0..250)
                .map(|i| json!({"id": format!("/jobs/{}", page * 250 + i), "name": format!("{}", page * 250 + i), "properties":{"status":"Completed"}}))
                .collect();
            let next = (page < 5).then(|| format!("{base}subscriptions/sub1/vault/backupJobs?api-version=2026-02-01&page={}&%24skiptoken=x{}", page + 1, page + 1));
            reply(200, json!({"value": value, "nextLink": next}))
        })
    })
    .await;
    let backup = BackupClient::new(client(&server.base, timer.clone()));
    let jobs = backup
        .list_jobs("/subscriptions/sub1/vault", Some("status eq 'Completed'"))
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1500);
    let names: std::collections::HashSet<_> = jobs.iter().map(|j| j.name.clone()).collect();
    assert_eq!(names.len(), 1500);
    assert!(server.requests()[1].uri.contains("page=1&%24skiptoken=x1"));
}

#[tokio::test]
async fn resource_graph_pages_with_skip_token() {
    let timer = Arc::new(VirtualTimer::default());
    let server = mock(timer.clone(), |_| {
        Arc::new(|r, _| {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            let page = body["options"]["$skipToken"]
                .as_str()
                .map(|t| t.trim_start_matches("tok").parse::<usize>().unwrap())
                .unwrap_or(0);
            let rows = if page < 2 { 1000 } else { 300 };
            let data: Vec<Value> = (0..rows).map(|i| json!({"id": format!("/vm/{}", page * 1000 + i)})).collect();
            let mut answer = json!({"totalRecords": 2300, "count": rows, "data": data, "resultTruncated": "false"});
            if page < 2 {
                answer["$skipToken"] = json!(format!("tok{}", page + 1));
            }
            reply(200, answer)
        })
    })
    .await;
    let graph = ResourceGraphClient::new(client(&server.base, timer.clone()));
    let rows = graph
        .query(
            "Resources | where type =~ 'microsoft.compute/virtualmachines'",
            &["sub1".to_string()],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2300);
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests[0]
        .uri
        .starts_with("/providers/Microsoft.ResourceGraph/resources?api-version=2024-04-01"));
    let first: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(first["options"]["$top"], 1000);
    assert_eq!(first["subscriptions"][0], "sub1");
}

/// ARM's bucket as the mock keeps it: capacity + refill per second, on the shared virtual clock.
struct ServerBucket {
    tokens: f64,
    at: DateTime<Utc>,
}

#[tokio::test]
async fn the_client_throttles_itself_before_arm_buckets_run_dry() {
    let timer = Arc::new(VirtualTimer::default());
    let buckets: Arc<Mutex<BTreeMap<&'static str, ServerBucket>>> = Arc::default();
    let server_buckets = buckets.clone();
    let server = mock(timer.clone(), move |_| {
        Arc::new(move |r, _| {
            let (class, capacity, rate) = if r.method == "GET" {
                ("reads", 250.0, 25.0)
            } else {
                ("writes", 200.0, 10.0)
            };
            let mut buckets = server_buckets.lock().unwrap();
            let bucket = buckets.entry(class).or_insert(ServerBucket {
                tokens: capacity,
                at: r.at,
            });
            let elapsed = (r.at - bucket.at).num_microseconds().unwrap() as f64 / 1e6;
            bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
            bucket.at = r.at;
            if bucket.tokens < 1.0 - 1e-9 {
                return reply(
                    429,
                    json!({"error":{"code":"SubscriptionRequestsThrottled","message":"throttled"}}),
                )
                .header("retry-after", "1");
            }
            bucket.tokens -= 1.0;
            reply(200, json!({"ok": true})).header(
                if class == "reads" {
                    "x-ms-ratelimit-remaining-subscription-reads"
                } else {
                    "x-ms-ratelimit-remaining-subscription-writes"
                },
                format!("{}", bucket.tokens.floor()),
            )
        })
    })
    .await;
    let arm = client(&server.base, timer.clone());
    for i in 0..3000 {
        let method = if i % 3 == 2 {
            reqwest::Method::PUT
        } else {
            reqwest::Method::GET
        };
        let url = arm
            .arm_url(
                &format!("/subscriptions/sub1/resourceGroups/rg/tags/{i}"),
                "1",
            )
            .unwrap();
        arm.send(ApiRequest::arm(method, url)).await.unwrap();
    }
    let requests = server.requests();
    assert_eq!(
        requests.len(),
        3000,
        "every request succeeded the first time: no 429"
    );
    // 1,000 writes at 200 + 10/s need at least 80 s of (virtual) time.
    let elapsed = requests.last().unwrap().at - requests[0].at;
    assert!(elapsed >= chrono::Duration::seconds(80), "{elapsed:?}");
}

#[tokio::test]
async fn key_vault_data_plane_at_the_vaults_own_uri() {
    let timer = Arc::new(VirtualTimer::default());
    let server = mock(timer.clone(), |_| {
        Arc::new(|r, _| {
            if r.uri.starts_with("/secrets/bek/") {
                reply(200, json!({"value":"BEK-SECRET-VALUE","id":"https://kv/secrets/bek/1","contentType":"Wrapped BEK","tags":{"MachineName":"vm1"},"attributes":{"enabled":true}}))
            } else if r.uri.starts_with("/keys/kek/backup") {
                reply(200, json!({"value":"KEY-BACKUP-BLOB"}))
            } else {
                reply(200, json!({"key":{"kid":"https://kv/keys/kek/1","kty":"RSA","key_ops":["wrapKey"]},"attributes":{"enabled":true},"tags":{}}))
            }
        })
    })
    .await;
    // A Key Vault token goes only to a Key Vault endpoint, or to the ARM endpoint's own origin (a
    // local run): with ARM elsewhere, this loopback "vault" gets no request at all.
    let elsewhere = KeyVaultClient::new(client(
        &Url::parse("http://127.0.0.1:9/").unwrap(),
        timer.clone(),
    ));
    let refused = elsewhere
        .get_secret_properties(server.base.as_str(), "bek", Some("1"))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, AzureError::InvalidInput { .. }),
        "{refused:?}"
    );
    assert!(server.requests().is_empty());

    let kv = KeyVaultClient::new(client(&server.base, timer.clone()));
    let vault_uri = server.base.as_str();
    let secret = kv
        .get_secret_properties(vault_uri, "bek", Some("1"))
        .await
        .unwrap();
    assert_eq!(secret.content_type.as_deref(), Some("Wrapped BEK"));
    assert_eq!(secret.tags["MachineName"], "vm1");
    let blob = kv.backup_key(vault_uri, "kek").await.unwrap();
    let key = kv.restore_key(vault_uri, &blob).await.unwrap();
    assert_eq!(key.key.kty.as_deref(), Some("RSA"));
    let requests = server.requests();
    assert!(requests[0]
        .uri
        .starts_with("/secrets/bek/1?api-version=7.6"));
    assert!(requests[1]
        .uri
        .starts_with("/keys/kek/backup?api-version=7.6"));
    let restore: Value = serde_json::from_slice(&requests[2].body).unwrap();
    assert_eq!(restore["value"], "KEY-BACKUP-BLOB");
}

#[tokio::test]
async fn managed_identity_token_comes_from_an_app_service_endpoint_on_loopback() {
    // Only this test sets the identity variables; the others use FixedTokens.
    let timer = Arc::new(VirtualTimer::default());
    let identity = mock(timer.clone(), |_| {
        Arc::new(|_, _| {
            let expires = (Utc::now() + chrono::Duration::hours(1)).timestamp();
            reply(200, json!({"access_token":"mi-token-7731","expires_on": expires.to_string(),"resource":"https://management.azure.com","token_type":"Bearer"}))
        })
    })
    .await;
    let arm_mock = mock(timer.clone(), |_| {
        Arc::new(|_, _| reply(200, json!({"name":"vm1"})))
    })
    .await;
    std::env::set_var("IDENTITY_ENDPOINT", format!("{}msi/token", identity.base));
    std::env::set_var("IDENTITY_HEADER", "local-identity-header");
    let config = AzureConfig::for_endpoint(arm_mock.base.clone());
    let tokens = IdentityTokenSource::from_config(&config).unwrap();
    let arm = ArmClient::builder(config, Arc::new(tokens))
        .timer(timer)
        .build()
        .unwrap();
    for _ in 0..2 {
        let _: Value = arm.get_json(arm.arm_url(VM, "1").unwrap()).await.unwrap();
    }
    let token_requests = identity.requests();
    assert_eq!(token_requests.len(), 1, "the token is cached");
    assert_eq!(
        token_requests[0].headers["x-identity-header"],
        "local-identity-header"
    );
    assert!(token_requests[0].uri.contains("resource=https"));
    assert!(arm_mock
        .requests()
        .iter()
        .all(|r| r.headers["authorization"] == "Bearer mi-token-7731"));
}

async fn servicebus_mock(timer: Arc<VirtualTimer>) -> Mock {
    mock(timer, |_| Arc::new(|_, _| reply(201, Value::Null))).await
}

fn message() -> OutgoingMessage {
    OutgoingMessage {
        body: json!({"specversion":"1.0","type":"vmbackup.job.started","id":"e1","source":"/vmbackup","data":{}}),
        message_id: "e1".into(),
        correlation_id: Some("run-1".into()),
        label: Some("vmbackup.job.started".into()),
        scheduled_enqueue_time: Some(Utc.with_ymd_and_hms(2026, 11, 28, 10, 56, 8).unwrap()),
    }
}

#[tokio::test]
async fn service_bus_sends_with_broker_properties_by_sas_and_by_entra_token() {
    let timer = Arc::new(VirtualTimer::default());
    let server = servicebus_mock(timer.clone()).await;
    let sas = ServiceBusConfig {
        namespace: "vmb-sb".into(),
        sas: Some(SasKey {
            policy_name: "send".into(),
            key: "SAS-KEY-9d8e".into(),
        }),
        endpoint_override: Some(server.base.clone()),
    };
    let sender = ServiceBusSender::new(
        &sas,
        Arc::new(FixedTokens),
        "https://servicebus.azure.net/.default",
    );
    sender.send("jobs", &message()).await.unwrap();

    let entra = ServiceBusConfig { sas: None, ..sas };
    let sender = ServiceBusSender::new(
        &entra,
        Arc::new(FixedTokens),
        "https://servicebus.azure.net/.default",
    );
    sender.send("jobs", &message()).await.unwrap();

    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(r.method, "POST");
        assert_eq!(r.uri, "/jobs/messages");
        let broker: Value =
            serde_json::from_str(r.headers["brokerproperties"].to_str().unwrap()).unwrap();
        assert_eq!(broker["MessageId"], "e1");
        assert_eq!(broker["CorrelationId"], "run-1");
        assert_eq!(broker["Label"], "vmbackup.job.started");
        assert_eq!(
            broker["ScheduledEnqueueTimeUtc"],
            "Sat, 28 Nov 2026 10:56:08 +0000"
        );
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["type"], "vmbackup.job.started");
    }
    let sas_auth = requests[0].headers["authorization"].to_str().unwrap();
    // Signed over the real namespace URL, not the override.
    assert!(sas_auth.starts_with("SharedAccessSignature sr=https%3A%2F%2Fvmb-sb.servicebus.windows.net%2Fjobs%2Fmessages&sig="), "{sas_auth}");
    assert!(sas_auth.ends_with("&skn=send"));
    assert_eq!(
        requests[1].headers["authorization"],
        format!("Bearer {TOKEN}").as_str()
    );
}

/// Collects everything written by the tracing subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Set in the child process that runs the log check alone.
const LOG_CHECK_CHILD: &str = "VMBACKUP_TEST_LOG_CHECK_CHILD";

/// The log check runs in a child process of this binary with no other test beside it: tracing caches
/// each callsite's interest process-wide, and a callsite first hit by a concurrent test on a thread
/// without a subscriber can hide this test's events from its thread-local capture.
#[test]
fn no_token_sas_key_or_secret_value_reaches_the_logs_at_any_level() {
    if std::env::var_os(LOG_CHECK_CHILD).is_some() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(check_no_secret_reaches_the_logs());
        return;
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "no_token_sas_key_or_secret_value_reaches_the_logs_at_any_level",
            "--test-threads=1",
        ])
        .env(LOG_CHECK_CHILD, "1")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the log check failed in its child process"
    );
}

async fn check_no_secret_reaches_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let timer = Arc::new(VirtualTimer::default());
    let server = mock(timer.clone(), |_| {
        Arc::new(|r, i| {
            if r.uri.starts_with("/secrets/") {
                reply(
                    200,
                    json!({"value":"BEK-SECRET-VALUE-31f","contentType":"Wrapped BEK"}),
                )
            } else if r.uri.contains("/backup") {
                reply(200, json!({"value":"KEY-BACKUP-BLOB-77a"}))
            } else if r.uri.starts_with("/staging/") {
                reply(
                    200,
                    json!({"OsDiskKeyAndSecretDetails":{"SecretData":"WRAPPED-BEK-DATA-0c1"}}),
                )
            } else if i % 2 == 0 {
                reply(
                    500,
                    json!({"error":{"code":"InternalError","message":"retry me"}}),
                )
            } else {
                reply(201, Value::Null)
            }
        })
    })
    .await;
    let arm = client(&server.base, timer.clone());
    let _: Result<Value, _> = arm.get_json(arm.arm_url(VM, "1").unwrap()).await;
    let kv = KeyVaultClient::new(arm.clone());
    let props = kv
        .get_secret_properties(server.base.as_str(), "bek", None)
        .await
        .unwrap();
    tracing::info!(?props, "secret metadata");
    let blob = kv.backup_secret(server.base.as_str(), "bek").await.unwrap();
    tracing::info!(?blob, "backup taken");
    let blobs = BlobClient::new(arm.clone());
    let info = blobs
        .read_json(&format!(
            "{}staging/config/encryption.json?sv=2024&sig=SAS-SIGNATURE-e5d",
            server.base
        ))
        .await
        .unwrap();
    assert!(info.to_string().contains("WRAPPED-BEK-DATA-0c1"));
    let sb = ServiceBusConfig {
        namespace: "vmb-sb".into(),
        sas: Some(SasKey {
            policy_name: "send".into(),
            key: "SAS-KEY-4b2a".into(),
        }),
        endpoint_override: Some(server.base.clone()),
    };
    let _ = ServiceBusSender::new(&sb, Arc::new(FixedTokens), "aud")
        .send("q", &message())
        .await;
    tracing::debug!(config = ?sb, "service bus config");
    let _ = ServiceBusSender::new(
        &ServiceBusConfig { sas: None, ..sb },
        Arc::new(FixedTokens),
        "aud",
    )
    .send("q", &message())
    .await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("azure_request"), "the capture works: {logs}");
    for secret in [
        TOKEN,
        "SAS-KEY-4b2a",
        "BEK-SECRET-VALUE-31f",
        "KEY-BACKUP-BLOB-77a",
        "WRAPPED-BEK-DATA-0c1",
        "SAS-SIGNATURE-e5d",
        "SharedAccessSignature",
    ] {
        assert!(!logs.contains(secret), "{secret} leaked into the logs");
    }
}
