//! Integration tests of the Azure simulator over HTTP on an ephemeral loopback port.

use serde_json::{json, Value};
use std::time::Duration;
use vmbackup::clock::Clock;
use vmbackup::simulator::fleet::Fleet;
use vmbackup::simulator::{
    BucketLimit, Simulator, SimulatorConfig, SimulatorHandle, ThrottleLimits,
};

const SUB: &str = "11111111-1111-1111-1111-111111111111";
const API: &str = "api-version=2026-02-01";

fn fleet(backup_access: bool, agent: &str, faults: Value) -> Fleet {
    let text = json!({
        "subscriptions": [{
            "id": SUB,
            "recoveryVaults": [{ "name": "rsv-weu", "resourceGroup": "rg-backup", "location": "westeurope", "policies": ["DefaultPolicy"] }],
            "keyVaults": [{ "name": "kv-ade-weu", "resourceGroup": "rg-sec", "location": "westeurope",
                            "backupAccess": backup_access, "keys": [{ "name": "kek-1" }] }],
            "storageAccounts": [{ "name": "stweustaging", "resourceGroup": "rg-backup", "location": "westeurope" }],
            "virtualMachines": [{ "name": "vm-web-01", "resourceGroup": "rg-app", "location": "westeurope",
                                  "encryption": { "kind": "ade", "keyVault": "kv-ade-weu", "secret": "bek-web-01", "kek": "kek-1" },
                                  "dataDisks": 1, "agent": agent }]
        }],
        "simulation": { "timeScale": 0.0005, "backupJobSeconds": 1800, "restoreJobSeconds": 3600, "faults": faults }
    });
    Fleet::from_json_str(&text.to_string()).expect("test fleet is valid")
}

async fn start(fleet: Fleet, throttle: Option<ThrottleLimits>) -> SimulatorHandle {
    let mut config = SimulatorConfig::new(fleet);
    if let Some(t) = throttle {
        config.throttle = t;
    }
    Simulator::start(config).await.expect("simulator starts")
}

async fn token(sim: &SimulatorHandle, resource: &str) -> String {
    let body: Value = reqwest::Client::new()
        .get(format!(
            "{}?resource={resource}&api-version=2019-08-01",
            sim.identity_endpoint()
        ))
        .header("X-IDENTITY-HEADER", sim.identity_header())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        body["expires_on"].as_str().unwrap().parse::<i64>().is_ok(),
        "expires_on is a string of Unix seconds"
    );
    body["access_token"].as_str().unwrap().to_string()
}

struct Arm {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Arm {
    async fn new(sim: &SimulatorHandle) -> Arm {
        Arm {
            http: reqwest::Client::new(),
            base: sim.base_url(),
            token: token(sim, "https://management.azure.com").await,
        }
    }
    async fn call(
        &self,
        method: reqwest::Method,
        path_or_url: &str,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let url = if path_or_url.starts_with("http") {
            path_or_url.to_string()
        } else {
            format!("{}{path_or_url}", self.base)
        };
        let mut req = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        (
            status,
            headers,
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }
}

fn vault_path() -> String {
    format!("/subscriptions/{SUB}/resourceGroups/rg-backup/providers/Microsoft.RecoveryServices/vaults/rsv-weu")
}
fn vm_id() -> String {
    format!("/subscriptions/{SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/vm-web-01")
}
fn item_path() -> String {
    format!("{}/backupFabrics/Azure/protectionContainers/IaasVMContainer;iaasvmcontainerv2;rg-app;vm-web-01/protectedItems/VM;iaasvmcontainerv2;rg-app;vm-web-01", vault_path())
}

/// Poll an `Azure-AsyncOperation` URL until it leaves InProgress, waiting Retry-After in simulated time.
async fn poll(arm: &Arm, clock: Clock, url: &str) -> Value {
    for _ in 0..200 {
        let (status, _, body) = arm.call(reqwest::Method::GET, url, None).await;
        assert_eq!(status, 200, "{body}");
        if body["status"] != "InProgress" {
            return body;
        }
        clock.sleep(Duration::from_secs(60)).await;
    }
    panic!("operation did not finish");
}

async fn wait_job(arm: &Arm, clock: Clock, job_id: &str) -> Value {
    for _ in 0..400 {
        let (_, _, job) = arm
            .call(
                reqwest::Method::GET,
                &format!("{}/backupJobs/{job_id}?{API}", vault_path()),
                None,
            )
            .await;
        if job["properties"]["status"] != "InProgress" {
            return job;
        }
        clock.sleep(Duration::from_secs(60)).await;
    }
    panic!("job did not finish");
}

async fn protect_and_backup(arm: &Arm, clock: Clock) -> Value {
    let body = json!({ "properties": { "protectedItemType": "Microsoft.Compute/virtualMachines", "sourceResourceId": vm_id(),
                                        "policyId": format!("{}/backupPolicies/DefaultPolicy", vault_path()) } });
    let (status, headers, _) = arm
        .call(
            reqwest::Method::PUT,
            &format!("{}?{API}", item_path()),
            Some(body),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(headers["retry-after"], "60");
    let op = poll(
        arm,
        clock,
        headers["azure-asyncoperation"].to_str().unwrap(),
    )
    .await;
    assert_eq!(op["status"], "Succeeded");
    let (status, _, item) = arm
        .call(
            reqwest::Method::GET,
            headers["location"].to_str().unwrap(),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(item["properties"]["protectionState"], "IRPending");

    backup_job(arm, clock, &item_path()).await
}

/// An on-demand backup of a protected item, followed through its LRO to the job's end.
async fn backup_job(arm: &Arm, clock: Clock, item: &str) -> Value {
    let (status, headers, _) = arm
        .call(
            reqwest::Method::POST,
            &format!("{item}/backup?{API}"),
            Some(json!({ "properties": { "objectType": "IaasVMBackupRequest" } })),
        )
        .await;
    assert_eq!(status, 202);
    let op = poll(
        arm,
        clock,
        headers["azure-asyncoperation"].to_str().unwrap(),
    )
    .await;
    let job_id = op["properties"]["jobId"].as_str().unwrap().to_string();
    wait_job(arm, clock, &job_id).await
}

#[tokio::test]
async fn auth_and_api_version_rules() {
    let sim = start(fleet(true, "ready", json!({})), None).await;
    let http = reqwest::Client::new();
    let vm_url = format!("{}{}", sim.base_url(), vm_id());
    let resp = http.get(format!("{vm_url}?{API}")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "AuthenticationFailed"
    );
    let vault_token = token(&sim, "https://vault.azure.net").await;
    let resp = http
        .get(format!("{vm_url}?{API}"))
        .bearer_auth(&vault_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "a Key Vault token is refused by ARM");

    let arm = Arm::new(&sim).await;
    let (status, _, body) = arm.call(reqwest::Method::GET, &vm_id(), None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("MissingApiVersionParameter"))
    );
    let (status, _, body) = arm
        .call(
            reqwest::Method::GET,
            &format!("{}?api-version=latest", vm_id()),
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("InvalidApiVersionParameter"))
    );
    let (status, _, vm) = arm
        .call(
            reqwest::Method::GET,
            &format!("{}?api-version=2099-01-01&$expand=instanceView", vm_id()),
            None,
        )
        .await;
    assert_eq!(status, 200, "any well-formed api-version is served");
    assert_eq!(
        vm["properties"]["instanceView"]["vmAgent"]["statuses"][0]["displayStatus"],
        "Ready"
    );
    assert_eq!(
        vm["resources"][0]["properties"]["type"],
        "AzureDiskEncryptionForLinux"
    );
    assert!(
        vm["properties"]["storageProfile"]["osDisk"]["encryptionSettings"]["diskEncryptionKey"]
            ["secretUrl"]
            .is_string()
    );

    // Key Vault data plane at the vault's own vaultUri, with the challenge header when unauthenticated.
    let (_, _, kv) = arm.call(reqwest::Method::GET, &format!("/subscriptions/{SUB}/resourceGroups/rg-sec/providers/Microsoft.KeyVault/vaults/kv-ade-weu?{API}"), None).await;
    let vault_uri = kv["properties"]["vaultUri"].as_str().unwrap().to_string();
    let resp = http
        .get(format!("{vault_uri}keys/kek-1?api-version=7.6"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("vault.azure.net"));
    let key: Value = http
        .get(format!("{vault_uri}keys/kek-1?api-version=7.6"))
        .bearer_auth(&vault_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(key["key"]["kty"], "RSA");
    sim.shutdown().await;
}

#[tokio::test]
async fn ade_backup_fails_without_key_vault_access_and_succeeds_after_grant() {
    let sim = start(fleet(false, "ready", json!({})), None).await;
    let arm = Arm::new(&sim).await;
    let job = protect_and_backup(&arm, sim.clock()).await;
    assert_eq!(job["properties"]["status"], "Failed");
    assert_eq!(
        job["properties"]["errorDetails"][0]["errorCode"],
        "UserErrorKeyVaultPermissionsNotConfigured"
    );

    let grant = json!({ "properties": { "accessPolicies": [{ "tenantId": vmbackup::simulator::state::TENANT_ID,
        "objectId": vmbackup::simulator::state::BACKUP_MANAGEMENT_SERVICE_OBJECT_ID,
        "permissions": { "keys": ["get", "list", "backup"], "secrets": ["get", "list", "backup"] } }] } });
    let (status, _, _) = arm.call(reqwest::Method::PUT,
        &format!("/subscriptions/{SUB}/resourceGroups/rg-sec/providers/Microsoft.KeyVault/vaults/kv-ade-weu/accessPolicies/add?{API}"), Some(grant)).await;
    assert_eq!(status, 200);
    let (status, headers, _) = arm
        .call(
            reqwest::Method::POST,
            &format!("{}/backup?{API}", item_path()),
            Some(json!({ "properties": { "objectType": "IaasVMBackupRequest" } })),
        )
        .await;
    assert_eq!(status, 202);
    let op = poll(
        &arm,
        sim.clock(),
        headers["azure-asyncoperation"].to_str().unwrap(),
    )
    .await;
    let job = wait_job(
        &arm,
        sim.clock(),
        op["properties"]["jobId"].as_str().unwrap(),
    )
    .await;
    assert_eq!(job["properties"]["status"], "Completed", "{job}");

    let (_, _, points) = arm
        .call(
            reqwest::Method::GET,
            &format!("{}/recoveryPoints?{API}", item_path()),
            None,
        )
        .await;
    let rp = &points["value"][0];
    assert_eq!(rp["properties"]["isSourceVMEncrypted"], true);
    assert!(rp["properties"]["keyAndSecret"]["kekDetails"]["keyBackupData"].is_string());

    // ADE: only RestoreDisks.
    let restore_url = format!(
        "{}/recoveryPoints/{}/restore?{API}",
        item_path(),
        rp["name"].as_str().unwrap()
    );
    let storage = format!("/subscriptions/{SUB}/resourceGroups/rg-backup/providers/Microsoft.Storage/storageAccounts/stweustaging");
    for recovery_type in ["AlternateLocation", "OriginalLocation"] {
        let other = json!({ "properties": { "objectType": "IaasVMRestoreRequest", "recoveryType": recovery_type, "storageAccountId": storage } });
        let (status, _, body) = arm
            .call(reqwest::Method::POST, &restore_url, Some(other))
            .await;
        assert_eq!(status, 400);
        assert_eq!(
            body["error"]["code"], "UserErrorRestoreTypeNotSupportedForEncryptedVm",
            "{body}"
        );
    }
    let disks = json!({ "properties": { "objectType": "IaasVMRestoreRequest", "recoveryType": "RestoreDisks", "storageAccountId": storage,
        "targetResourceGroupId": format!("/subscriptions/{SUB}/resourceGroups/rg-restore"), "region": "westeurope", "sourceResourceId": vm_id() } });
    let (status, headers, _) = arm
        .call(reqwest::Method::POST, &restore_url, Some(disks))
        .await;
    assert_eq!(status, 202);
    let op = poll(
        &arm,
        sim.clock(),
        headers["azure-asyncoperation"].to_str().unwrap(),
    )
    .await;
    let job = wait_job(
        &arm,
        sim.clock(),
        op["properties"]["jobId"].as_str().unwrap(),
    )
    .await;
    assert_eq!(job["properties"]["status"], "Completed");
    let bag = &job["properties"]["extendedInfo"]["propertyBag"];
    let template_uri = bag["Template Blob Uri"].as_str().unwrap();
    assert!(bag["Encryption Info Blob Name"].is_string());
    let storage_token = token(&sim, "https://storage.azure.com").await;
    let template: Value = reqwest::Client::new()
        .get(template_uri)
        .bearer_auth(storage_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        template["resources"][0]["type"],
        "Microsoft.Compute/virtualMachines"
    );

    // Recreate the VM from the template through a deployment (LRO).
    let deploy = json!({ "properties": { "mode": "Incremental", "templateLink": { "uri": template_uri },
                                         "parameters": { "VirtualMachineName": { "value": "vm-web-01-restored" } } } });
    let (status, headers, _) = arm.call(reqwest::Method::PUT,
        &format!("/subscriptions/{SUB}/resourcegroups/rg-restore/providers/Microsoft.Resources/deployments/recreate?{API}"), Some(deploy)).await;
    assert_eq!(status, 201);
    let status_url = headers["azure-asyncoperation"]
        .to_str()
        .unwrap()
        .to_string();
    let mut done = Value::Null;
    for _ in 0..100 {
        let (_, _, body) = arm.call(reqwest::Method::GET, &status_url, None).await;
        if body["status"] != "Running" {
            done = body;
            break;
        }
        sim.clock().sleep(Duration::from_secs(10)).await;
    }
    assert_eq!(done["status"], "Succeeded", "{done}");
    let (status, _, vm) = arm.call(reqwest::Method::GET,
        &format!("/subscriptions/{SUB}/resourceGroups/rg-restore/providers/Microsoft.Compute/virtualMachines/vm-web-01-restored?{API}"), None).await;
    assert_eq!(status, 200);
    assert!(
        vm["properties"]["storageProfile"]["osDisk"]["encryptionSettings"].is_object(),
        "restored disks keep ADE settings"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn agent_not_ready_fails_the_backup() {
    let sim = start(fleet(true, "not-ready", json!({})), None).await;
    let arm = Arm::new(&sim).await;
    let job = protect_and_backup(&arm, sim.clock()).await;
    assert_eq!(job["properties"]["status"], "Failed");
    assert_eq!(
        job["properties"]["errorDetails"][0]["errorCode"],
        "GuestAgentSnapshotTaskStatusError"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn throttling_answers_429_with_retry_after() {
    let limits = ThrottleLimits {
        reads: BucketLimit {
            capacity: 3.0,
            refill_per_second: 0.0,
        },
        ..ThrottleLimits::default()
    };
    let sim = start(fleet(true, "ready", json!({})), Some(limits)).await;
    let arm = Arm::new(&sim).await;
    let url = format!("{}?{API}", vm_id());
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (status, headers, _) = arm.call(reqwest::Method::GET, &url, None).await;
        statuses.push(status);
        if status == 429 {
            assert!(headers.contains_key("retry-after"));
            assert_eq!(headers["x-ms-ratelimit-remaining-subscription-reads"], "0");
        }
    }
    assert_eq!(statuses, vec![200, 200, 200, 429]);
    assert_eq!(sim.counters().throttled, 1);
    assert!(sim
        .request_log()
        .iter()
        .any(|r| r.throttled && r.status == 429));
    sim.shutdown().await;
}

#[tokio::test]
async fn faults_are_reproducible_from_the_seed() {
    async fn statuses(seed: u64) -> Vec<u16> {
        let sim = start(
            fleet(
                true,
                "ready",
                json!({ "rate": 0.5, "statuses": [500, 503], "seed": seed }),
            ),
            None,
        )
        .await;
        let arm = Arm::new(&sim).await;
        let mut out = Vec::new();
        for _ in 0..20 {
            out.push(
                arm.call(reqwest::Method::GET, &format!("{}?{API}", vm_id()), None)
                    .await
                    .0,
            );
        }
        sim.shutdown().await;
        out
    }
    let first = statuses(7).await;
    assert_eq!(first, statuses(7).await);
    assert!(first.contains(&200) && first.iter().any(|s| *s >= 500));
}

#[tokio::test]
async fn tag_change_emits_event_and_resource_graph_pages() {
    let sim = start(fleet(true, "ready", json!({})), None).await;
    let arm = Arm::new(&sim).await;
    let mut events = sim.subscribe_events();
    let (status, _, _) = arm.call(reqwest::Method::PATCH, &format!("{}/providers/Microsoft.Resources/tags/default?api-version=2025-04-01", vm_id()),
        Some(json!({ "operation": "Merge", "properties": { "tags": { "backup-policy": "DefaultPolicy" } } }))).await;
    assert_eq!(status, 200);
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        event["eventType"],
        "Microsoft.Resources.ResourceWriteSuccess"
    );
    assert_eq!(
        event["data"]["operationName"],
        "Microsoft.Resources/tags/write"
    );

    let query =
        "Resources | where type =~ 'microsoft.compute/disks' | project id, name | order by id asc";
    let (status, _, page1) = arm
        .call(
            reqwest::Method::POST,
            "/providers/Microsoft.ResourceGraph/resources?api-version=2024-04-01",
            Some(json!({ "subscriptions": [SUB], "query": query, "options": { "$top": 1 } })),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (page1["count"].as_u64(), page1["totalRecords"].as_u64()),
        (Some(1), Some(2))
    );
    let token = page1["$skipToken"].as_str().unwrap();
    let (_, _, page2) = arm.call(reqwest::Method::POST, "/providers/Microsoft.ResourceGraph/resources?api-version=2024-04-01",
        Some(json!({ "subscriptions": [SUB], "query": query, "options": { "$top": 1, "$skipToken": token } }))).await;
    assert_ne!(page1["data"][0]["id"], page2["data"][0]["id"]);
    assert!(page2.get("$skipToken").is_none());
    let (status, _, body) = arm
        .call(
            reqwest::Method::POST,
            "/providers/Microsoft.ResourceGraph/resources?api-version=2024-04-01",
            Some(json!({ "query": "Resources | summarize count() by type" })),
        )
        .await;
    assert_eq!(status, 400);
    assert!(body.to_string().contains("summarize"));
    sim.shutdown().await;
}

#[test]
fn fleet_file_errors_name_file_and_field() {
    let dir = std::env::temp_dir().join(format!("vmbackup-sim-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fleet.json");
    std::fs::write(
        &path,
        r#"{"subscriptions":[],"timeline":[{"at":"10x","action":"tag","vm":"a","tags":{}}]}"#,
    )
    .unwrap();
    let err = Fleet::from_path(&path).unwrap_err().to_string();
    assert!(
        err.contains("fleet.json") && err.contains("timeline[0]") && err.contains("10x"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CMK VM (with tags and an extension-free agent) and an encryption-at-host VM, both protected.
fn non_ade_fleet() -> Fleet {
    let protected = json!({ "vault": "rsv-weu", "policy": "DefaultPolicy" });
    let text = json!({
        "subscriptions": [{
            "id": SUB,
            "recoveryVaults": [{ "name": "rsv-weu", "resourceGroup": "rg-backup", "location": "westeurope", "policies": ["DefaultPolicy"] }],
            "keyVaults": [{ "name": "kv-cmk-weu", "resourceGroup": "rg-sec", "location": "westeurope", "authorization": "rbac",
                            "backupAccess": true, "keys": [{ "name": "cmk-1" }] }],
            "diskEncryptionSets": [{ "name": "des-weu", "resourceGroup": "rg-sec", "location": "westeurope", "keyVault": "kv-cmk-weu", "key": "cmk-1" }],
            "storageAccounts": [{ "name": "stweustaging", "resourceGroup": "rg-backup", "location": "westeurope" },
                                { "name": "stneustaging", "resourceGroup": "rg-backup", "location": "northeurope" }],
            "virtualMachines": [
                { "name": "vm-cmk", "resourceGroup": "rg-app", "location": "westeurope", "os": "windows", "dataDisks": 2,
                  "tags": { "env": "prod" }, "encryption": { "kind": "cmk", "diskEncryptionSet": "des-weu" }, "protectedBy": protected },
                { "name": "vm-host", "resourceGroup": "rg-host", "location": "westeurope", "dataDisks": 1,
                  "encryption": { "kind": "host" }, "protectedBy": protected }
            ]
        }],
        "simulation": { "timeScale": 0.0005, "backupJobSeconds": 1800, "restoreJobSeconds": 3600 }
    });
    Fleet::from_json_str(&text.to_string()).expect("test fleet is valid")
}

fn item_of(rg: &str, vm: &str) -> String {
    format!("{}/backupFabrics/Azure/protectionContainers/IaasVMContainer;iaasvmcontainerv2;{rg};{vm}/protectedItems/VM;iaasvmcontainerv2;{rg};{vm}", vault_path())
}

/// Back up an already protected VM and answer the restore URL of its recovery point.
async fn backup_for_restore(arm: &Arm, clock: Clock, item: &str) -> String {
    let job = backup_job(arm, clock, item).await;
    assert_eq!(job["properties"]["status"], "Completed", "{job}");
    let (_, _, points) = arm
        .call(
            reqwest::Method::GET,
            &format!("{item}/recoveryPoints?{API}"),
            None,
        )
        .await;
    let rp = points["value"][0]["name"].as_str().unwrap().to_string();
    format!("{item}/recoveryPoints/{rp}/restore?{API}")
}

/// Trigger a restore, follow its LRO headers to the job, and wait for the job's end.
async fn restore_job(arm: &Arm, clock: Clock, url: &str, body: Value) -> Value {
    let (status, headers, answer) = arm.call(reqwest::Method::POST, url, Some(body)).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(headers["retry-after"], "60");
    assert!(headers.contains_key("location"));
    let op = poll(
        arm,
        clock,
        headers["azure-asyncoperation"].to_str().unwrap(),
    )
    .await;
    assert_eq!(op["status"], "Succeeded", "{op}");
    let (status, _, _) = arm
        .call(
            reqwest::Method::GET,
            headers["location"].to_str().unwrap(),
            None,
        )
        .await;
    assert!(status < 300, "the operation result is served ({status})");
    wait_job(arm, clock, op["properties"]["jobId"].as_str().unwrap()).await
}

async fn get(arm: &Arm, id: &str) -> Value {
    let (status, _, body) = arm
        .call(reqwest::Method::GET, &format!("{id}?{API}"), None)
        .await;
    assert_eq!(status, 200, "{id}: {body}");
    body
}

fn disk_ids(vm: &Value) -> Vec<String> {
    let storage = &vm["properties"]["storageProfile"];
    std::iter::once(&storage["osDisk"])
        .chain(storage["dataDisks"].as_array().unwrap().iter())
        .map(|d| d["managedDisk"]["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn non_ade_vms_restore_to_a_new_vm_or_over_the_original() {
    let sim = start(non_ade_fleet(), None).await;
    let arm = Arm::new(&sim).await;
    let clock = sim.clock();
    let cmk_vm = format!("/subscriptions/{SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/vm-cmk");
    let restore_url = backup_for_restore(&arm, clock, &item_of("rg-app", "vm-cmk")).await;
    let storage = format!("/subscriptions/{SUB}/resourceGroups/rg-backup/providers/Microsoft.Storage/storageAccounts/stweustaging");

    // The source VM's subnet, read as a client reads it: the VM's NIC, then its IP configuration.
    let source = get(&arm, &cmk_vm).await;
    let nic_id = source["properties"]["networkProfile"]["networkInterfaces"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let nic = get(&arm, &nic_id).await;
    assert_eq!(nic["properties"]["virtualMachine"]["id"], cmk_vm.as_str());
    let subnet = nic["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let vnet = subnet.split("/subnets/").next().unwrap().to_string();
    assert!(
        vnet.contains("/providers/Microsoft.Network/virtualNetworks/"),
        "{vnet}"
    );
    let (status, _, missing) = arm
        .call(reqwest::Method::GET, &format!("{nic_id}x?{API}"), None)
        .await;
    assert_eq!(
        (status, missing["error"]["code"].as_str()),
        (404, Some("ResourceNotFound"))
    );

    // AlternateLocation: every required property missing in turn → 400 naming it.
    let target_rg = format!("/subscriptions/{SUB}/resourceGroups/rg-restore");
    let new_vm = format!("{target_rg}/providers/Microsoft.Compute/virtualMachines/vm-cmk-new");
    let alr = json!({ "properties": {
        "objectType": "IaasVMRestoreRequest", "recoveryType": "AlternateLocation", "sourceResourceId": cmk_vm,
        "region": "westeurope", "storageAccountId": storage, "targetResourceGroupId": target_rg,
        "targetVirtualMachineId": new_vm, "virtualNetworkId": vnet, "subnetId": subnet,
        "originalStorageAccountOption": false, "createNewCloudService": false,
        "encryptionDetails": { "encryptionEnabled": false }, "identityInfo": { "isSystemAssignedIdentity": true } } });
    for property in [
        "targetVirtualMachineId",
        "targetResourceGroupId",
        "virtualNetworkId",
        "subnetId",
        "storageAccountId",
        "region",
        "sourceResourceId",
    ] {
        let mut body = alr.clone();
        body["properties"].as_object_mut().unwrap().remove(property);
        let (status, _, answer) = arm
            .call(reqwest::Method::POST, &restore_url, Some(body))
            .await;
        assert_eq!(status, 400, "{property}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("properties.{property}")),
            "{property}: {answer}"
        );
    }
    for (property, value) in [
        ("subnetId", json!(format!("{vnet}-other/subnets/default"))),
        ("virtualNetworkId", json!(format!("{vnet}-missing"))),
        ("targetVirtualMachineId", json!(format!("/subscriptions/{SUB}/resourceGroups/rg-elsewhere/providers/Microsoft.Compute/virtualMachines/x"))),
        ("region", json!("northeurope")),
    ] {
        let mut body = alr.clone();
        body["properties"][property] = value;
        let (status, _, answer) = arm.call(reqwest::Method::POST, &restore_url, Some(body)).await;
        assert_eq!(status, 400, "{property}: {answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(property), "{answer}");
    }
    let mut far_staging = alr.clone();
    far_staging["properties"]["storageAccountId"] = json!(storage.replace("stweu", "stneu"));
    let (status, _, answer) = arm
        .call(reqwest::Method::POST, &restore_url, Some(far_staging))
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("UserErrorStorageAccountNotInVaultRegion"))
    );

    // A valid one: the new VM exists once the job completed.
    let job = restore_job(&arm, clock, &restore_url, alr.clone()).await;
    assert_eq!(job["properties"]["status"], "Completed", "{job}");
    assert_eq!(job["properties"]["operation"], "Restore");
    let bag = &job["properties"]["extendedInfo"]["propertyBag"];
    assert_eq!(bag["Target VM Name"], "vm-cmk-new");
    assert_eq!(bag["Target Storage Account Name"], "stweustaging");
    assert!(
        bag.get("Template Blob Uri").is_none(),
        "no template for a new VM: {bag}"
    );
    let created = get(&arm, &new_vm).await;
    assert_eq!(
        created["properties"]["hardwareProfile"],
        source["properties"]["hardwareProfile"]
    );
    assert_eq!(
        created["properties"]["storageProfile"]["osDisk"]["osType"],
        "Windows"
    );
    let new_disks = disk_ids(&created);
    assert_eq!(new_disks.len(), 3);
    for id in &new_disks {
        assert!(
            id.starts_with(&format!(
                "{target_rg}/providers/Microsoft.Compute/disks/vm-cmk-"
            )),
            "{id}"
        );
        let disk = get(&arm, id).await;
        assert_eq!(
            disk["properties"]["encryption"]["type"],
            "EncryptionAtRestWithCustomerKey"
        );
        assert!(disk["properties"]["encryption"]["diskEncryptionSetId"]
            .as_str()
            .unwrap()
            .ends_with("/des-weu"));
        assert_eq!(disk["managedBy"], new_vm.as_str());
    }
    let new_nic = get(
        &arm,
        created["properties"]["networkProfile"]["networkInterfaces"][0]["id"]
            .as_str()
            .unwrap(),
    )
    .await;
    assert_eq!(
        new_nic["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"],
        subnet.as_str()
    );
    // The same name again: refused at the trigger.
    let (status, _, answer) = arm
        .call(reqwest::Method::POST, &restore_url, Some(alr.clone()))
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("UserErrorVmNameAlreadyExists")),
        "{answer}"
    );

    // OriginalLocation: the staging account is required; then the disks are swapped, the rest stays.
    let olr = json!({ "properties": {
        "objectType": "IaasVMRestoreRequest", "recoveryType": "OriginalLocation", "sourceResourceId": cmk_vm,
        "region": "westeurope", "storageAccountId": storage, "originalStorageAccountOption": false,
        "encryptionDetails": { "encryptionEnabled": false } } });
    let mut no_staging = olr.clone();
    no_staging["properties"]
        .as_object_mut()
        .unwrap()
        .remove("storageAccountId");
    let (status, _, answer) = arm
        .call(reqwest::Method::POST, &restore_url, Some(no_staging))
        .await;
    assert_eq!(status, 400);
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .contains("properties.storageAccountId"));
    let old_disks = disk_ids(&source);
    let job = restore_job(&arm, clock, &restore_url, olr).await;
    assert_eq!(job["properties"]["status"], "Completed", "{job}");
    let replaced = get(&arm, &cmk_vm).await;
    for same_part in [
        "/properties/vmId",
        "/properties/hardwareProfile",
        "/tags",
        "/id",
        "/properties/networkProfile",
    ] {
        assert_eq!(
            replaced.pointer(same_part),
            source.pointer(same_part),
            "{same_part}"
        );
    }
    let swapped = disk_ids(&replaced);
    assert_eq!(swapped.len(), old_disks.len());
    assert!(
        swapped.iter().all(|d| !old_disks.contains(d)),
        "new disks: {swapped:?}"
    );
    for id in &swapped {
        let disk = get(&arm, id).await;
        assert_eq!(disk["managedBy"], cmk_vm.as_str());
        assert!(disk["properties"]["encryption"]["diskEncryptionSetId"]
            .as_str()
            .unwrap()
            .ends_with("/des-weu"));
    }
    for id in &old_disks {
        let disk = get(&arm, id).await;
        assert_eq!(
            disk["properties"]["diskState"], "Unattached",
            "the old disks are kept: {disk}"
        );
    }

    // Encryption at host carries over to a new VM.
    let host_vm = format!("/subscriptions/{SUB}/resourceGroups/rg-host/providers/Microsoft.Compute/virtualMachines/vm-host");
    let host_url = backup_for_restore(&arm, clock, &item_of("rg-host", "vm-host")).await;
    let mut host_alr = alr.clone();
    host_alr["properties"]["sourceResourceId"] = json!(host_vm);
    host_alr["properties"]["targetVirtualMachineId"] = json!(format!(
        "{target_rg}/providers/Microsoft.Compute/virtualMachines/vm-host-new"
    ));
    let (status, _, answer) = arm
        .call(reqwest::Method::POST, &host_url, Some(alr.clone()))
        .await;
    assert_eq!(status, 400, "another VM's sourceResourceId: {answer}");
    let job = restore_job(&arm, clock, &host_url, host_alr).await;
    assert_eq!(job["properties"]["status"], "Completed", "{job}");
    let host_new = get(
        &arm,
        &format!("{target_rg}/providers/Microsoft.Compute/virtualMachines/vm-host-new"),
    )
    .await;
    assert_eq!(
        host_new["properties"]["securityProfile"]["encryptionAtHost"],
        true
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_etag_moves_on_every_write_and_if_match_guards_put_and_patch() {
    let sim = start(fleet(true, "ready", json!({})), None).await;
    let arm = Arm::new(&sim).await;
    let vm_url = format!("{}?api-version=2025-11-01", vm_id());
    let etag = |vm: &Value| vm["etag"].as_str().unwrap().to_string();
    let conditional =
        |method: reqwest::Method, header: &'static str, value: String, body: Value| {
            let request = arm
                .http
                .request(method, format!("{}{vm_url}", arm.base))
                .bearer_auth(&arm.token)
                .header(header, value)
                .json(&body);
            async move {
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                (status, response.json::<Value>().await.unwrap())
            }
        };
    let (_, _, vm) = arm.call(reqwest::Method::GET, &vm_url, None).await;
    let read = etag(&vm);

    // A tags write through the Tags API moves the VM's etag.
    let (status, _, _) = arm
        .call(
            reqwest::Method::PATCH,
            &format!(
                "{}/providers/Microsoft.Resources/tags/default?api-version=2025-04-01",
                vm_id()
            ),
            Some(json!({ "operation": "Merge", "properties": { "tags": { "owner": "ops" } } })),
        )
        .await;
    assert_eq!(status, 200);
    let (_, _, vm) = arm.call(reqwest::Method::GET, &vm_url, None).await;
    let after_tags = etag(&vm);
    assert_ne!(after_tags, read);

    // A PATCH under the stale etag is refused and changes nothing.
    let (status, body) = conditional(
        reqwest::Method::PATCH,
        "if-match",
        read.clone(),
        json!({ "tags": { "stale": "write" } }),
    )
    .await;
    assert_eq!(status, 412, "{body}");
    assert_eq!(body["error"]["code"], "PreconditionFailed");
    let (_, _, vm) = arm.call(reqwest::Method::GET, &vm_url, None).await;
    assert_eq!(
        (etag(&vm), &vm["tags"]),
        (after_tags.clone(), &json!({ "owner": "ops" }))
    );

    // Under the current etag it replaces the tags and moves the etag again.
    let (status, body) = conditional(
        reqwest::Method::PATCH,
        "if-match",
        after_tags.clone(),
        json!({ "tags": { "fresh": "write" } }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tags"], json!({ "fresh": "write" }));
    let after_patch = etag(&body);
    assert_ne!(after_patch, after_tags);

    // `If-None-Match: *` creates only: the VM exists.
    let (status, body) = conditional(
        reqwest::Method::PUT,
        "if-none-match",
        "*".into(),
        json!({ "location": "westeurope", "tags": {} }),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (412, &json!("PreconditionFailed"))
    );

    // An extension write moves it too.
    let (status, _, _) = arm
        .call(
            reqwest::Method::PUT,
            &format!("{}/extensions/custom?api-version=2025-11-01", vm_id()),
            Some(json!({ "location": "westeurope", "properties": {
                "publisher": "Microsoft.Azure.Extensions", "type": "CustomScript", "typeHandlerVersion": "2.1" } })),
        )
        .await;
    assert!(matches!(status, 200 | 201));
    let (_, _, vm) = arm.call(reqwest::Method::GET, &vm_url, None).await;
    assert_ne!(etag(&vm), after_patch);
    sim.shutdown().await;
}
