// The app's role on one Recovery Services vault (deployed into the vault's resource group).

param vaultName string
param principalId string

var backupContributor = '5e467623-bb1f-42f4-a55d-6e525e11384b'

resource vault 'Microsoft.RecoveryServices/vaults@2024-04-01' existing = {
  name: vaultName
}

// Backup Contributor on the vault only: enable protection with the tagged policy, change a protected
// VM's policy when its tag changes (a Contributor action, which Backup Operator lacks), trigger
// on-demand backups, restore disks and read jobs. It cannot delete the vault or grant access.
resource backupContributorAssignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, principalId, backupContributor)
  scope: vault
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', backupContributor)
  }
}
