// The app's role on one resource group in scope: where protected VMs live and restored VMs go.

param principalId string

var virtualMachineContributor = '9980e02c-c2be-4d73-94e8-173b1dc7cf3c'

// Virtual Machine Contributor on this resource group, not Contributor or Owner on the subscription:
// read VMs and their disks, re-tag them (backup status tags), let Azure Backup restore managed disks
// here, deploy the restored VM from the restore template (deployments, NICs, subnet join) and write
// the ADE extension on it. It grants no access to others and no data access.
resource vmContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceGroup().id, principalId, virtualMachineContributor)
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', virtualMachineContributor)
  }
}
