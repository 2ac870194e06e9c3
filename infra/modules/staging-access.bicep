// The app's roles on one restore staging storage account (deployed into its resource group).

param storageAccountName string
param principalId string

var roles = {
  storageAccountContributor: '17d1049b-9a84-46fb-8f53-869881c3d3ab'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
}

resource staging 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

// Azure Backup's "Restore disks" requires the caller to be able to write the staging account
// (Storage Account Contributor is the built-in role Microsoft names for it); scoped to this one
// account rather than its resource group.
resource accountContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(staging.id, principalId, roles.storageAccountContributor)
  scope: staging
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageAccountContributor)
  }
}

// Read the restore's template and config blobs, and delete the encryption-info JSON afterwards
// (it holds wrapped key material).
resource blobContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(staging.id, principalId, roles.storageBlobDataContributor)
  scope: staging
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
  }
}
