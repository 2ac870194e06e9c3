// The Functions host's storage: identity-based access only (shared keys off), and the blob
// container that Flex Consumption deploys the app package to.

param location string
param tags object
param name string
param deploymentContainerName string

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: the Functions host reaches its storage over the public endpoint unless the app is VNet-integrated; Entra ID is the only access (shared keys off)
  // checkov:skip=CKV_AZURE_59: same reason as CKV_AZURE_35: public network access, Entra ID auth only, no anonymous blob access
  // checkov:skip=CKV_AZURE_206: host state (leases, timer state, the deployed package) is rebuilt by redeploying; zone-redundant storage is enough and geo-replication buys nothing
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    // Host state (leases, timer schedules) is rebuilt on loss; geo-redundancy buys nothing here.
    name: 'Standard_ZRS'
  }
  properties: {
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      // The Functions service reaches its storage over the public endpoint unless the app is
      // VNet-integrated; access is by Entra ID only (shared keys are off).
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    encryption: {
      requireInfrastructureEncryption: true
      keySource: 'Microsoft.Storage'
      services: {
        blob: {
          enabled: true
        }
        file: {
          enabled: true
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
        table: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

output id string = storage.id
output name string = storage.name
output blobEndpoint string = storage.properties.primaryEndpoints.blob
