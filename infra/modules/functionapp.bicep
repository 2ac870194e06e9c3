// The Function App running the vmbackup custom handler on Linux: Flex Consumption by default,
// Elastic Premium when the parameter says so. It runs as the user-assigned identity and reaches its
// storage, Service Bus and Application Insights with that identity only (no keys, no connection strings).

param location string
param tags object
param planName string
param appName string

@allowed([
  'FlexConsumption'
  'ElasticPremium'
])
param hostingPlan string

@description('Flex Consumption instance memory in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Flex Consumption scale-out limit (Flex allows 40 to 1000).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

param identityId string
param identityClientId string
param storageAccountName string
param storageBlobEndpoint string
param deploymentContainerName string
param serviceBusFullyQualifiedNamespace string
param appInsightsConnectionString string

// The workflow's settings (`vmbackup::workflow::settings::ALL`), resolved by main.bicep.
param subscriptions string
param discoverySchedule string
param backupSchedule string
param backupManagementServiceObjectId string
param keyVaultBackupRoleId string
param keyVaultRole string
param defaultRetentionDays string
param allowedScopes string
param notifyWebhook string
@description('Comma-separated ARM ids of staging storage accounts; a restore that names none takes the one in its vault\'s region.')
param stagingStorageAccount string

var isFlex = hostingPlan == 'FlexConsumption'

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225: zone redundancy is not offered for every region and plan; the app is queue-driven and idempotent, so a zone outage delays work (messages wait in Service Bus) but loses none
  name: planName
  location: location
  tags: tags
  kind: isFlex ? 'functionapp' : 'elastic'
  sku: isFlex ? {
    name: 'FC1'
    tier: 'FlexConsumption'
  } : {
    name: 'EP1'
    tier: 'ElasticPremium'
  }
  properties: {
    reserved: true // Linux
    maximumElasticWorkerCount: isFlex ? null : 20
    zoneRedundant: false
  }
}

// Every app setting the code reads. tests/infra.rs fails when a name of
// `vmbackup::workflow::settings::ALL`, a Service Bus connection of functions/*/function.json, a timer
// schedule's `%NAME%` or the Azure configuration the app needs in Azure is missing here. Endpoints
// and token audiences are not set: the code's defaults are Azure public cloud's.
var appSettings = [
  // Host storage through the identity (identity-based AzureWebJobsStorage).
  {
    name: 'AzureWebJobsStorage__accountName'
    value: storageAccountName
  }
  {
    name: 'AzureWebJobsStorage__credential'
    value: 'managedidentity'
  }
  {
    name: 'AzureWebJobsStorage__clientId'
    value: identityClientId
  }
  // The Service Bus connection named by every function.json, identity-based; the code reads the
  // same namespace setting for its scheduled sends.
  {
    name: 'ServiceBusConnection__fullyQualifiedNamespace'
    value: serviceBusFullyQualifiedNamespace
  }
  {
    name: 'ServiceBusConnection__credential'
    value: 'managedidentity'
  }
  {
    name: 'ServiceBusConnection__clientId'
    value: identityClientId
  }
  // Telemetry with Entra auth (Application Insights has local auth off).
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    value: appInsightsConnectionString
  }
  {
    name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
    value: 'ClientId=${identityClientId};Authorization=AAD'
  }
  // The code's own credential: the user-assigned managed identity.
  {
    name: 'VMBACKUP_CREDENTIAL'
    value: 'managed-identity'
  }
  {
    name: 'AZURE_CLIENT_ID'
    value: identityClientId
  }
  // The workflow.
  {
    name: 'VMBACKUP_SUBSCRIPTIONS'
    value: subscriptions
  }
  {
    name: 'VMBACKUP_DISCOVERY_SCHEDULE'
    value: discoverySchedule
  }
  {
    name: 'VMBACKUP_BACKUP_SCHEDULE'
    value: backupSchedule
  }
  {
    name: 'VMBACKUP_BACKUP_MANAGEMENT_SERVICE_OBJECT_ID'
    value: backupManagementServiceObjectId
  }
  {
    name: 'VMBACKUP_KEY_VAULT_BACKUP_ROLE_ID'
    value: keyVaultBackupRoleId
  }
  {
    name: 'VMBACKUP_KEY_VAULT_ROLE'
    value: keyVaultRole
  }
  {
    name: 'VMBACKUP_DEFAULT_RETENTION_DAYS'
    value: defaultRetentionDays
  }
  {
    name: 'VMBACKUP_ALLOWED_SCOPES'
    value: allowedScopes
  }
  {
    name: 'VMBACKUP_NOTIFY_WEBHOOK'
    value: notifyWebhook
  }
  {
    name: 'VMBACKUP_STAGING_STORAGE_ACCOUNT'
    value: stagingStorageAccount
  }
]

// Flex Consumption takes the runtime from functionAppConfig and rejects these as app settings;
// Elastic Premium needs them. It runs the zip that `azd deploy` uploads as a read-only package.
var premiumOnlySettings = [
  {
    name: 'FUNCTIONS_EXTENSION_VERSION'
    value: '~4'
  }
  {
    name: 'FUNCTIONS_WORKER_RUNTIME'
    value: 'custom'
  }
  {
    name: 'WEBSITE_RUN_FROM_PACKAGE'
    value: '1'
  }
]

resource app 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222: `azd deploy` publishes through the app's public deployment endpoint and ticket systems call HTTP restore webhooks; the queue triggers need no inbound network. Add access restrictions or a private endpoint where the network allows
  // checkov:skip=CKV_AZURE_17: HTTP triggers are authenticated by function keys; requiring client certificates would force one on every ticket system
  // checkov:skip=CKV_AZURE_212: Flex Consumption scales from zero by design (Elastic Premium keeps one warm instance); messages wait in Service Bus meanwhile
  // checkov:skip=CKV_AZURE_213: the app serves no HTTP health endpoint (Service Bus and timer triggers only) and Flex Consumption has no health check
  name: appName
  location: location
  // azd finds the app to deploy `api` to by this tag.
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false // the app has no HTTP surface but the host's own
    publicNetworkAccess: 'Enabled'
    keyVaultReferenceIdentity: identityId
    functionAppConfig: isFlex ? {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storageBlobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'custom'
        version: '1.0'
      }
    } : null
    siteConfig: {
      linuxFxVersion: isFlex ? null : ''
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      remoteDebuggingEnabled: false
      use32BitWorkerProcess: false
      alwaysOn: false
      // Elastic Premium keeps one instance warm; Flex scales from zero.
      minimumElasticInstanceCount: isFlex ? null : 1
      appSettings: isFlex ? appSettings : concat(appSettings, premiumOnlySettings)
    }
  }
}

// No basic-auth (publishing credentials) deployments: azd deploys with Entra ID.
resource ftpPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'scm'
  properties: {
    allow: false
  }
}

output id string = app.id
output name string = app.name
output defaultHostName string = app.properties.defaultHostName
