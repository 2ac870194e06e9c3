// The Service Bus namespace and every queue of the event catalog (`vmbackup::events::queues::ALL`;
// tests/infra.rs fails when the two drift). Entra ID only: no SAS keys exist to leak.

param location string
param tags object
param namespaceName string

// One entry per queue; `lockDuration` fits the slowest step of the function that reads it. A step
// that waits on Azure (an async PUT, an ARM deployment, an extension install) gets the Service Bus
// maximum of 5 minutes, and the Functions host renews the lock up to host.json's
// maxAutoLockRenewalDuration (5 minutes) beyond that; a step of a few quick calls gets 1 minute, so
// a message whose handler died is redelivered sooner. `duplicateDetectionWindow` is Service Bus's
// default 10 minutes, except on the queues whose messages are scheduled ahead (job re-checks up to
// 30 minutes, paced sweep requests): a redelivered or retried step re-sends them under the same id,
// which Service Bus must still remember to drop the copy.
// vmbackup::local::queue::INFRA_QUEUES mirrors this list for local runs (tests/infra.rs).
var queues = [
  {
    name: 'vm-events' // on-vm-event: one VM read per Event Grid event
    lockDuration: 'PT1M'
    duplicateDetectionWindow: 'PT10M'
  }
  {
    name: 'protection-requests' // assess-vm: reads the VM, its disks, key vault and vaults
    lockDuration: 'PT2M'
    duplicateDetectionWindow: 'PT10M'
  }
  {
    name: 'key-vault-access' // grant-key-vault-access: an access-policy update or a role assignment
    lockDuration: 'PT2M'
    duplicateDetectionWindow: 'PT10M'
  }
  {
    name: 'protection-ready' // enable-protection: the protected-item PUT is an async operation
    lockDuration: 'PT5M'
    duplicateDetectionWindow: 'PT10M'
  }
  {
    name: 'backup-requests' // trigger-backup: the backup POST is an async operation
    lockDuration: 'PT5M'
    duplicateDetectionWindow: 'PT1H'
  }
  {
    name: 'job-tracking' // track-job: one job read, then a scheduled re-check
    lockDuration: 'PT1M'
    duplicateDetectionWindow: 'PT1H'
  }
  {
    name: 'restore-requests' // start-restore: recovery points, then the restore POST (async)
    lockDuration: 'PT5M'
    duplicateDetectionWindow: 'PT10M'
  }
  {
    name: 'restore-disks-restored' // recreate-vm: an ARM deployment of the restore template
    lockDuration: 'PT5M'
    duplicateDetectionWindow: 'PT10M'
  }
  {
    name: 'restore-vm-recreated' // reinstall-ade: the ADE extension PUT, the slowest step of all
    lockDuration: 'PT5M'
    duplicateDetectionWindow: 'PT10M'
  }
  {
    name: 'outcomes' // notify: one webhook or ticket callback POST (30 s client timeout)
    lockDuration: 'PT1M'
    duplicateDetectionWindow: 'PT10M'
  }
  {
    name: 'notifications' // read by operators and ticket systems, not by a function
    lockDuration: 'PT1M'
    duplicateDetectionWindow: 'PT10M'
  }
]

resource namespace 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' = {
  name: namespaceName
  location: location
  tags: tags
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    // Standard has no private endpoints; Entra ID auth (local auth off) is the access control.
    publicNetworkAccess: 'Enabled'
  }
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2022-10-01-preview' = [for q in queues: {
  parent: namespace
  name: q.name
  properties: {
    lockDuration: q.lockDuration
    // The host retries a failing handler; the tenth failure dead-letters the message.
    maxDeliveryCount: 10
    // An expired message is kept in the dead-letter queue, never silently dropped.
    deadLetteringOnMessageExpiration: true
    defaultMessageTimeToLive: 'P14D'
    // Service Bus drops a message whose MessageId it saw within the window (a sender that retries a
    // send it could not confirm); handlers stay idempotent for everything else.
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: q.duplicateDetectionWindow
    requiresSession: false
    enablePartitioning: false
  }
}]

output id string = namespace.id
output name string = namespace.name
output fullyQualifiedNamespace string = '${namespace.name}.servicebus.windows.net'
// queues[0] is vm-events; referencing the loop makes the Event Grid subscription wait for the queue.
output vmEventsQueueId string = queue[0].id
