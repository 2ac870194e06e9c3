//! The Azure clients against the real simulator over HTTP: long-running operations followed to the
//! end through the headers the simulator returns, Resource Graph paging over more than 1,000 rows,
//! 429 storms and 5xx faults ridden out, 400s not retried, the client's own throttle keeping a
//! burst inside ARM's buckets, and the real `azure_identity` managed-identity credential.
//!
//! Every test starts its own simulator and waits on its simulated clock (`ClockTimer`). Tokens come
//! from the simulator's identity endpoint through the harness's `SimulatorTokens`, except in the managed-identity
//! test: `IDENTITY_ENDPOINT`/`IDENTITY_HEADER` are process-wide, so that test re-runs this binary as
//! a child process with them set, and the tests in this process stay parallel-safe.

mod support;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use vmbackup::azure::backup::{
    BackupClient, EncryptionDetails, IaasVmRestoreRequest, ProtectedItemRef,
};
use vmbackup::azure::blob::BlobClient;
use vmbackup::azure::compute::{ComputeClient, TagsOperation};
use vmbackup::azure::deployments::{DeploymentsClient, TemplateSource};
use vmbackup::azure::graph::ResourceGraphClient;
use vmbackup::azure::{ArmClient, AzureConfig, ClockTimer, IdentityTokenSource, TokenSource};
use vmbackup::clock::Clock;
use vmbackup::simulator::fleet::Fleet;
use vmbackup::simulator::{
    BucketLimit, Simulator, SimulatorConfig, SimulatorHandle, ThrottleLimits,
};

const SUB: &str = "11111111-1111-1111-1111-111111111111";
/// Set in the child process of the managed-identity test.
const CHILD_ENV: &str = "VMBACKUP_TEST_MI_CHILD_ARM";

fn vault_id() -> String {
    format!("/subscriptions/{SUB}/resourceGroups/rg-backup/providers/Microsoft.RecoveryServices/vaults/rsv-weu")
}
fn vm_id(name: &str) -> String {
    format!("/subscriptions/{SUB}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/{name}")
}

/// One vault, an ADE key vault that grants Backup access, and `vm_count` VMs (the first is ADE).
fn fleet(vm_count: usize, time_scale: f64, faults: Value) -> Fleet {
    let mut vms = vec![
        json!({ "name": "vm-web-01", "resourceGroup": "rg-app", "location": "westeurope", "dataDisks": 1,
        "encryption": { "kind": "ade", "keyVault": "kv-ade-weu", "secret": "bek-web-01", "kek": "kek-1" } }),
    ];
    for i in 1..vm_count {
        vms.push(json!({ "name": format!("vm-{i:04}"), "resourceGroup": "rg-app", "location": "westeurope",
                         "encryption": { "kind": "pmk" } }));
    }
    let text = json!({
        "subscriptions": [{
            "id": SUB,
            "recoveryVaults": [{ "name": "rsv-weu", "resourceGroup": "rg-backup", "location": "westeurope", "policies": ["DefaultPolicy"] }],
            "keyVaults": [{ "name": "kv-ade-weu", "resourceGroup": "rg-sec", "location": "westeurope", "backupAccess": true,
                            "keys": [{ "name": "kek-1" }] }],
            "storageAccounts": [{ "name": "stweustaging", "resourceGroup": "rg-backup", "location": "westeurope" }],
            "virtualMachines": vms
        }],
        "simulation": { "timeScale": time_scale, "backupJobSeconds": 1800, "restoreJobSeconds": 3600, "faults": faults }
    });
    Fleet::from_json_str(&text.to_string()).expect("test fleet is valid")
}

async fn start(fleet: Fleet, throttle: Option<ThrottleLimits>) -> SimulatorHandle {
    let mut config = SimulatorConfig::new(fleet);
    if let Some(limits) = throttle {
        config.throttle = limits;
    }
    Simulator::start(config).await.expect("simulator starts")
}

fn arm_with(sim: &SimulatorHandle, tokens: Arc<dyn TokenSource>) -> ArmClient {
    let config = AzureConfig::for_endpoint(sim.arm_endpoint().parse().unwrap());
    ArmClient::builder(config, tokens)
        .timer(Arc::new(ClockTimer(sim.clock())))
        .build()
        .unwrap()
}

fn arm(sim: &SimulatorHandle) -> ArmClient {
    arm_with(sim, Arc::new(support::SimulatorTokens::for_simulator(sim)))
}

async fn wait_for_job(
    backup: &BackupClient,
    clock: Clock,
    job: &str,
) -> vmbackup::azure::backup::BackupJob {
    for _ in 0..500 {
        let found = backup.get_job(&vault_id(), job).await.unwrap();
        if found.properties.is_finished() {
            return found;
        }
        clock.sleep(Duration::from_secs(60)).await;
    }
    panic!("job {job} did not finish");
}

#[tokio::test]
async fn every_long_running_call_is_followed_to_its_end() {
    let sim = start(fleet(2, 0.0005, json!({})), None).await;
    let arm = arm(&sim);
    let backup = BackupClient::new(arm.clone());
    let clock = sim.clock();

    // Container refresh: 202 with Location only, polled until 204.
    backup.refresh_containers(&vault_id()).await.unwrap();
    let protectable = backup.list_protectable_items(&vault_id()).await.unwrap();
    assert_eq!(protectable.len(), 2);

    // Protected item PUT: Azure-AsyncOperation until Succeeded, then the item.
    let item = ProtectedItemRef::for_vm(&vault_id(), &vm_id("vm-web-01")).unwrap();
    let protected = backup
        .enable_protection(
            &item,
            &vm_id("vm-web-01"),
            &format!("{}/backupPolicies/DefaultPolicy", vault_id()),
        )
        .await
        .unwrap();
    assert_eq!(
        protected.properties.protection_state.as_deref(),
        Some("IRPending")
    );

    // Backup trigger: the job id from the operation status, the job completes.
    let expiry: DateTime<Utc> = clock.now() + chrono::Duration::days(30);
    let job = backup
        .trigger_backup(&item, Some(expiry))
        .await
        .unwrap()
        .expect("a backup job id");
    let done = wait_for_job(&backup, clock, &job).await;
    assert_eq!(done.properties.status.as_deref(), Some("Completed"));

    // Restore trigger (RestoreDisks, as for every ADE VM): job id, job completes with its template.
    let points = backup.list_recovery_points(&item, None).await.unwrap();
    let point = points.first().expect("a recovery point");
    let target_rg = format!("/subscriptions/{SUB}/resourceGroups/rg-restore");
    let storage = format!("/subscriptions/{SUB}/resourceGroups/rg-backup/providers/Microsoft.Storage/storageAccounts/stweustaging");
    let request = IaasVmRestoreRequest::restore_disks(
        &point.name,
        &vm_id("vm-web-01"),
        "westeurope",
        &storage,
        Some(&target_rg),
        EncryptionDetails {
            encryption_enabled: true,
            kek_url: None,
            secret_key_url: None,
            kek_vault_id: None,
            secret_key_vault_id: None,
        },
    );
    let restore_job = backup
        .trigger_restore(&item, &request)
        .await
        .unwrap()
        .expect("a restore job id");
    let restored = wait_for_job(&backup, clock, &restore_job).await;
    assert_eq!(restored.properties.status.as_deref(), Some("Completed"));
    let bag = restored.properties.extended_info.unwrap().property_bag;
    let template_uri = bag["Template Blob Uri"].clone();

    // The template is readable at the storage account's own blob endpoint.
    let blobs = BlobClient::new(arm.clone());
    let template = blobs.read_json(&template_uri).await.unwrap();
    assert_eq!(
        template["resources"][0]["type"],
        "Microsoft.Compute/virtualMachines"
    );

    // Deployment: PUT then followed until it succeeds; the VM it describes exists afterwards.
    let deployments = DeploymentsClient::new(arm.clone());
    let deployment = deployments
        .deploy(
            SUB,
            "rg-restore",
            "restore-vm-web-01",
            &TemplateSource::Link {
                uri: template_uri,
                query_string: None,
            },
            json!({ "VirtualMachineName": { "value": "vm-web-01-restored" } }),
        )
        .await
        .unwrap();
    assert_eq!(
        deployment.properties.provisioning_state.as_deref(),
        Some("Succeeded")
    );
    let compute = ComputeClient::new(arm);
    let vm = compute
        .get_vm(
            &format!("{target_rg}/providers/Microsoft.Compute/virtualMachines/vm-web-01-restored"),
            false,
        )
        .await
        .unwrap();
    assert_eq!(vm.name, "vm-web-01-restored");

    // Each operation was polled through the URLs the simulator gave.
    let log = sim.request_log();
    for marker in [
        "/operationsStatus/",
        "/backupFabrics/Azure/operationResults/",
        "/operationStatuses/",
    ] {
        assert!(
            log.iter()
                .any(|r| r.path.contains(marker) && matches!(r.status, 200 | 204)),
            "no poll of {marker}"
        );
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn resource_graph_pages_over_more_than_a_thousand_virtual_machines() {
    let sim = start(fleet(1_205, 0.001, json!({})), None).await;
    let graph = ResourceGraphClient::new(arm(&sim));
    let rows = graph
        .query(
            "Resources | where type =~ 'microsoft.compute/virtualmachines' | project id, name",
            &[SUB.to_string()],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1_205);
    let mut ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1_205, "no row twice");
    let pages = sim
        .request_log()
        .iter()
        .filter(|r| r.path.ends_with("/Microsoft.ResourceGraph/resources"))
        .count();
    assert_eq!(pages, 2, "1,000 rows, then 205");
    sim.shutdown().await;
}

/// `Retry-After` of the simulator's injected 429s and 503s (simulated seconds).
const INJECTED_RETRY_AFTER: i64 = 5;

#[tokio::test]
async fn a_429_storm_is_ridden_out_and_no_request_is_sent_before_retry_after() {
    // Half of all ARM requests answered 429 (seeded); 100x time so the clock's grain is 0.1 s.
    let sim = start(
        fleet(
            2,
            0.01,
            json!({ "rate": 0.5, "statuses": [429], "seed": 7 }),
        ),
        None,
    )
    .await;
    let compute = ComputeClient::new(arm(&sim));
    for _ in 0..10 {
        let vm = compute.get_vm(&vm_id("vm-web-01"), true).await.unwrap();
        assert_eq!(vm.name, "vm-web-01");
    }
    let log: Vec<_> = sim
        .request_log()
        .into_iter()
        .filter(|r| r.path.contains("/virtualMachines/"))
        .collect();
    let throttled = log.iter().filter(|r| r.status == 429).count();
    assert!(throttled >= 3, "the seed gives a storm ({throttled} 429s)");
    assert_eq!(log.iter().filter(|r| r.status == 200).count(), 10);
    let grain = chrono::Duration::milliseconds(100);
    for pair in log.windows(2) {
        if pair[0].status == 429 {
            let gap = pair[1].at - pair[0].at;
            assert!(
                gap + grain >= chrono::Duration::seconds(INJECTED_RETRY_AFTER),
                "a request {gap} after a 429 with Retry-After {INJECTED_RETRY_AFTER}s"
            );
        }
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn the_simulators_own_buckets_throttle_a_client_that_ignores_them_and_it_recovers() {
    // Buckets far smaller than ARM's; the client believes ARM's, so the simulator's 429s decide.
    let tiny = BucketLimit {
        capacity: 5.0,
        refill_per_second: 0.2,
    };
    let sim = start(
        fleet(2, 0.01, json!({})),
        Some(ThrottleLimits {
            reads: tiny,
            writes: tiny,
            deletes: tiny,
        }),
    )
    .await;
    let compute = ComputeClient::new(arm(&sim));
    for _ in 0..15 {
        compute.get_vm(&vm_id("vm-web-01"), false).await.unwrap();
    }
    let counters = sim.counters();
    assert!(counters.throttled > 0, "the tiny buckets ran dry");
    let log = sim.request_log();
    assert_eq!(
        log.iter()
            .filter(|r| r.status == 200 && r.path.contains("/virtualMachines/"))
            .count(),
        15
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_5xx_is_retried_and_a_400_is_not() {
    let sim = start(
        fleet(
            2,
            0.01,
            json!({ "rate": 0.4, "statuses": [500, 503], "seed": 3 }),
        ),
        None,
    )
    .await;
    let arm = arm(&sim);
    let compute = ComputeClient::new(arm.clone());
    for _ in 0..8 {
        compute.get_vm(&vm_id("vm-web-01"), false).await.unwrap();
    }
    let vm_requests: Vec<u16> = sim
        .request_log()
        .iter()
        .filter(|r| r.path.contains("/virtualMachines/"))
        .map(|r| r.status)
        .collect();
    assert!(
        vm_requests.iter().any(|s| *s >= 500),
        "the seed injects server errors: {vm_requests:?}"
    );
    assert_eq!(vm_requests.iter().filter(|s| **s == 200).count(), 8);

    // An unsupported query is a 400 from Resource Graph: one request, a typed error.
    let graph = ResourceGraphClient::new(arm);
    let error = graph
        .query(
            "Resources | summarize count() by location",
            &[SUB.to_string()],
        )
        .await
        .unwrap_err();
    assert!(error.has_code("BadRequest"), "{error}");
    let graph_requests = sim
        .request_log()
        .iter()
        .filter(|r| r.path.ends_with("/Microsoft.ResourceGraph/resources"))
        .count();
    assert_eq!(graph_requests, 1, "a 400 is not retried");
    sim.shutdown().await;
}

#[tokio::test]
async fn two_thousand_reads_and_a_thousand_writes_never_meet_a_429() {
    // 20x time: ARM's buckets refill 20x faster in wall time, yet far slower than a concurrent
    // client can send, so only the client's own throttle keeps the simulator's buckets from running dry.
    let sim = start(fleet(2, 0.05, json!({})), None).await;
    let compute = ComputeClient::new(arm(&sim));
    let started = sim.clock().now();
    let reads = futures::stream::iter(0..2_000).map(|_| {
        let compute = compute.clone();
        async move { compute.get_vm(&vm_id("vm-web-01"), false).await.map(|_| ()) }
    });
    let writes = futures::stream::iter(0..1_000).map(|i| {
        let compute = compute.clone();
        async move {
            let tags = BTreeMap::from([("burst".to_string(), i.to_string())]);
            compute
                .update_tags(&vm_id("vm-0001"), TagsOperation::Merge, &tags)
                .await
                .map(|_| ())
        }
    });
    use futures::StreamExt;
    let (read_results, write_results): (Vec<_>, Vec<_>) = futures::join!(
        reads.buffer_unordered(32).collect::<Vec<_>>(),
        writes.buffer_unordered(32).collect::<Vec<_>>()
    );
    assert!(read_results.iter().all(Result::is_ok));
    assert!(write_results.iter().all(Result::is_ok));
    let counters = sim.counters();
    assert_eq!(counters.throttled, 0, "no 429 from the simulator's buckets");
    assert!(sim.request_log().iter().all(|r| r.status != 429));
    // The run was paced: 1,000 writes at 200 + 10/s take at least 80 simulated seconds.
    let elapsed = sim.clock().now() - started;
    assert!(
        elapsed >= chrono::Duration::seconds(80),
        "paced over {elapsed}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn managed_identity_credential_gets_tokens_from_the_simulator() {
    if std::env::var(CHILD_ENV).is_ok() {
        return; // this copy runs in the child, as `child_calls_arm_with_managed_identity`
    }
    let sim = start(fleet(2, 0.001, json!({})), None).await;
    let output = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_calls_arm_with_managed_identity",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("IDENTITY_ENDPOINT", sim.identity_endpoint())
        .env("IDENTITY_HEADER", sim.identity_header())
        .env(CHILD_ENV, sim.arm_endpoint())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "the child ran its test: {stdout}"
    );
    let log = sim.request_log();
    assert!(
        log.iter()
            .any(|r| r.path == "/msi/token" && r.status == 200),
        "a token came from the identity endpoint"
    );
    assert!(log
        .iter()
        .any(|r| r.path.ends_with("/virtualMachines/vm-web-01") && r.status == 200));
    sim.shutdown().await;
}

/// Runs only in the child of `managed_identity_credential_gets_tokens_from_the_simulator`.
#[tokio::test]
async fn child_calls_arm_with_managed_identity() {
    let Ok(endpoint) = std::env::var(CHILD_ENV) else {
        return; // not the child
    };
    let config = AzureConfig::for_endpoint(endpoint.parse().unwrap());
    let tokens = IdentityTokenSource::from_config(&config)
        .expect("managed identity is the default credential");
    let arm = ArmClient::builder(config, Arc::new(tokens))
        .build()
        .unwrap();
    let vm = ComputeClient::new(arm)
        .get_vm(&vm_id("vm-web-01"), false)
        .await
        .unwrap();
    assert_eq!(vm.name, "vm-web-01");
}
