// vmbackup on Azure: the Functions custom handler, its Service Bus queues, Event Grid on the
// watched subscriptions, monitoring, and the least-privilege roles of the app's identity.
// `azd up` deploys it (azure.yaml); README.md "Deploy" explains every parameter.
targetScope = 'subscription'

@minLength(1)
@maxLength(40)
@description('azd environment name; names and tags the resources.')
param environmentName string

@minLength(1)
@description('Region of the app and its resources.')
param location string

@description('FlexConsumption (default) or ElasticPremium where Flex Consumption is not available or a feature it lacks is needed (README.md, Deploy).')
@allowed([
  'FlexConsumption'
  'ElasticPremium'
])
param hostingPlan string = 'FlexConsumption'

@description('Comma-separated ids of the subscriptions whose VMs are protected (default: this one). Each gets an Event Grid system topic and Reader for Resource Graph.')
param watchedSubscriptions string = ''

@description('Resource group created in each watched subscription for its Event Grid system topic.')
param eventsResourceGroupName string = 'rg-${environmentName}-events'

@description('Comma-separated ARM ids of the resource groups the app may act on: protected VMs and restore targets (Virtual Machine Contributor each). Also VMBACKUP_ALLOWED_SCOPES.')
param resourceGroups string = ''

@description('Comma-separated ARM ids of the Recovery Services vaults the app protects VMs in (Backup Contributor each).')
param recoveryServicesVaults string = ''

@description('Comma-separated ARM ids of ADE key vaults using access policies.')
param accessPolicyKeyVaults string = ''

@description('Comma-separated ARM ids of ADE key vaults using Azure RBAC.')
param rbacKeyVaults string = ''

@description('Comma-separated ARM ids of the storage accounts restores stage disks in.')
param stagingStorageAccounts string = ''

@minLength(36)
@maxLength(36)
@description('Object id of the "Backup Management Service" service principal in this tenant.')
param backupManagementServiceObjectId string

@description('Role RBAC key vaults get for Azure Backup: the five-action custom role (custom) or Key Vault Administrator (administrator).')
@allowed([
  'custom'
  'administrator'
])
param keyVaultRole string = 'custom'

@description('NCRONTAB (UTC) of the discovery sweep.')
param discoverySchedule string = '0 0 * * * *'

@description('NCRONTAB (UTC) of the backup sweep.')
param backupSchedule string = '0 0 2 * * *'

@minValue(1)
@maxValue(36135)
@description('Retention in days of on-demand backups of VMs without a backup-retain-days tag.')
param defaultRetentionDays int = 30

@description('Optional URL every rejection and failure is POSTed to.')
param notifyWebhook string = ''

// The lists arrive as comma-separated strings (azd environment values are strings).
var watchedSubscriptionIds = empty(watchedSubscriptions) ? [
  subscription().subscriptionId
] : split(replace(watchedSubscriptions, ' ', ''), ',')
var resourceGroupIds = empty(resourceGroups) ? [] : split(replace(resourceGroups, ' ', ''), ',')
var recoveryServicesVaultIds = empty(recoveryServicesVaults) ? [] : split(replace(recoveryServicesVaults, ' ', ''), ',')
var accessPolicyKeyVaultIds = empty(accessPolicyKeyVaults) ? [] : split(replace(accessPolicyKeyVaults, ' ', ''), ',')
var rbacKeyVaultIds = empty(rbacKeyVaults) ? [] : split(replace(rbacKeyVaults, ' ', ''), ',')
var stagingStorageAccountIds = empty(stagingStorageAccounts) ? [] : split(replace(stagingStorageAccounts, ' ', ''), ',')

var tags = {
  'azd-env-name': environmentName
}
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var keyVaultAdministratorGuid = '00482a5a-887f-4fb3-b363-3b7fe8e74483'
var deploymentContainerName = 'app-package-${resourceToken}'

resource appGroup 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: appGroup
  params: {
    location: location
    tags: tags
    name: 'id-vmbackup-${resourceToken}'
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: appGroup
  params: {
    location: location
    tags: tags
    workspaceName: 'log-vmbackup-${resourceToken}'
    appInsightsName: 'appi-vmbackup-${resourceToken}'
  }
}

module serviceBus 'modules/servicebus.bicep' = {
  name: 'servicebus'
  scope: appGroup
  params: {
    location: location
    tags: tags
    namespaceName: 'sb-vmbackup-${resourceToken}'
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: appGroup
  params: {
    location: location
    tags: tags
    name: 'stvmb${resourceToken}'
    deploymentContainerName: deploymentContainerName
  }
}

module customRoles 'modules/custom-roles.bicep' = {
  name: 'vmbackup-custom-roles-${resourceToken}'
  params: {
    nameSuffix: '${environmentName}-${resourceToken}'
    assignableSubscriptionIds: union(watchedSubscriptionIds, [
      subscription().subscriptionId
    ])
  }
}

module appRoles 'modules/app-roles.bicep' = {
  name: 'app-roles'
  scope: appGroup
  params: {
    principalId: identity.outputs.principalId
    serviceBusNamespaceName: serviceBus.outputs.name
    storageAccountName: storage.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: appGroup
  dependsOn: [
    appRoles // the host starts with its storage and queues already reachable
  ]
  params: {
    location: location
    tags: tags
    hostingPlan: hostingPlan
    planName: 'plan-vmbackup-${resourceToken}'
    appName: 'func-vmbackup-${resourceToken}'
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    storageBlobEndpoint: storage.outputs.blobEndpoint
    deploymentContainerName: deploymentContainerName
    serviceBusFullyQualifiedNamespace: serviceBus.outputs.fullyQualifiedNamespace
    appInsightsConnectionString: monitoring.outputs.connectionString
    subscriptions: join(watchedSubscriptionIds, ',')
    discoverySchedule: discoverySchedule
    backupSchedule: backupSchedule
    backupManagementServiceObjectId: backupManagementServiceObjectId
    keyVaultBackupRoleId: customRoles.outputs.backupKeyVaultRoleId
    keyVaultRole: keyVaultRole
    defaultRetentionDays: string(defaultRetentionDays)
    // The app acts only where it holds Virtual Machine Contributor; empty means the subscriptions.
    allowedScopes: join(resourceGroupIds, ',')
    notifyWebhook: notifyWebhook
    // Restore requests that name no staging account take the one in their vault's region.
    stagingStorageAccount: join(stagingStorageAccountIds, ',')
  }
}

// Event Grid: a system topic per watched subscription, allowed to send to vm-events, then the
// subscription filtered to VM and VM-extension writes.
module watched 'modules/watched-subscription.bicep' = [for subscriptionId in watchedSubscriptionIds: {
  name: 'vmbackup-watch-${uniqueString(subscriptionId, resourceToken)}'
  scope: subscription(subscriptionId)
  params: {
    principalId: identity.outputs.principalId
    location: location
    tags: tags
    eventsResourceGroupName: eventsResourceGroupName
    systemTopicName: 'evgt-vmbackup-${uniqueString(subscriptionId)}'
  }
}]

module topicSenders 'modules/system-topic-sender.bicep' = [for (subscriptionId, i) in watchedSubscriptionIds: {
  name: 'topic-sender-${uniqueString(subscriptionId)}'
  scope: appGroup
  params: {
    serviceBusNamespaceName: serviceBus.outputs.name
    queueName: 'vm-events'
    topicPrincipalId: watched[i].outputs.topicPrincipalId
  }
}]

module vmWrites 'modules/vm-write-subscription.bicep' = [for subscriptionId in watchedSubscriptionIds: {
  name: 'vmbackup-vm-writes-${uniqueString(subscriptionId, resourceToken)}'
  scope: resourceGroup(subscriptionId, eventsResourceGroupName)
  dependsOn: [
    watched
    topicSenders // delivery with managed identity needs the sender role first
  ]
  params: {
    systemTopicName: 'evgt-vmbackup-${uniqueString(subscriptionId)}'
    vmEventsQueueId: serviceBus.outputs.vmEventsQueueId
  }
}]

// Roles in the resource groups, vaults, key vaults and staging accounts in scope. Each module
// comments why its role is needed.
module groupAccess 'modules/resource-group-access.bicep' = [for id in resourceGroupIds: {
  name: 'vmbackup-rg-access-${uniqueString(id, resourceToken)}'
  scope: resourceGroup(split(id, '/')[2], split(id, '/')[4])
  params: {
    principalId: identity.outputs.principalId
  }
}]

module vaultAccess 'modules/vault-access.bicep' = [for id in recoveryServicesVaultIds: {
  name: 'vmbackup-vault-${uniqueString(id, resourceToken)}'
  scope: resourceGroup(split(id, '/')[2], split(id, '/')[4])
  params: {
    vaultName: last(split(id, '/'))
    principalId: identity.outputs.principalId
  }
}]

module accessPolicyVaults 'modules/key-vault-access.bicep' = [for id in accessPolicyKeyVaultIds: {
  name: 'vmbackup-kv-${uniqueString(id, resourceToken)}'
  scope: resourceGroup(split(id, '/')[2], split(id, '/')[4])
  params: {
    keyVaultName: last(split(id, '/'))
    permissionModel: 'accessPolicy'
    principalId: identity.outputs.principalId
    backupManagementServiceObjectId: backupManagementServiceObjectId
    assignableRoleGuid: keyVaultRole == 'administrator' ? keyVaultAdministratorGuid : customRoles.outputs.backupKeyVaultRoleGuid
    restoreRoleGuid: customRoles.outputs.restoreKeyVaultRoleGuid
  }
}]

module rbacVaults 'modules/key-vault-access.bicep' = [for id in rbacKeyVaultIds: {
  name: 'vmbackup-kv-${uniqueString(id, resourceToken)}'
  scope: resourceGroup(split(id, '/')[2], split(id, '/')[4])
  params: {
    keyVaultName: last(split(id, '/'))
    permissionModel: 'rbac'
    principalId: identity.outputs.principalId
    backupManagementServiceObjectId: backupManagementServiceObjectId
    assignableRoleGuid: keyVaultRole == 'administrator' ? keyVaultAdministratorGuid : customRoles.outputs.backupKeyVaultRoleGuid
    restoreRoleGuid: customRoles.outputs.restoreKeyVaultRoleGuid
  }
}]

module stagingAccess 'modules/staging-access.bicep' = [for id in stagingStorageAccountIds: {
  name: 'vmbackup-staging-${uniqueString(id, resourceToken)}'
  scope: resourceGroup(split(id, '/')[2], split(id, '/')[4])
  params: {
    storageAccountName: last(split(id, '/'))
    principalId: identity.outputs.principalId
  }
}]

output AZURE_LOCATION string = location
output AZURE_RESOURCE_GROUP string = appGroup.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output SERVICE_BUS_NAMESPACE string = serviceBus.outputs.fullyQualifiedNamespace
output VMBACKUP_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output VMBACKUP_KEY_VAULT_BACKUP_ROLE_ID string = customRoles.outputs.backupKeyVaultRoleId
