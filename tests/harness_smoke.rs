mod support;

const FLEET: &str = r#"{
  "subscriptions": [{
    "id": "11111111-1111-1111-1111-111111111111",
    "recoveryVaults": [{ "name": "rsv-weu", "resourceGroup": "rg-backup", "location": "westeurope", "policies": ["DefaultPolicy"] }],
    "virtualMachines": [{ "name": "vm-web-01", "resourceGroup": "rg-app", "location": "westeurope", "os": "linux",
                          "tags": {}, "encryption": { "kind": "pmk" }, "agent": "ready", "powerState": "running" }]
  }]
}"#;

#[tokio::test]
async fn simulator_events_reach_vm_events() {
    let harness = support::Harness::start(FLEET).await;
    let action: vmbackup::simulator::fleet::TimelineAction =
        serde_json::from_value(serde_json::json!(
            { "action": "tag", "vm": "vm-web-01", "tags": { "backup-policy": "DefaultPolicy" } }
        ))
        .unwrap();
    harness.sim.apply(&action).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let journal = harness.journal();
    assert!(
        journal.iter().any(|e| e.queue == "vm-events"),
        "{journal:?}"
    );
    harness.stop().await;
}
