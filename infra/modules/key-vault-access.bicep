// The app's roles on one ADE key vault (deployed into the vault's resource group). What the app may
// do depends on the vault's permission model; either way it can give Azure Backup read access to
// the vault and nothing broader.

param keyVaultName string

@allowed([
  'accessPolicy'
  'rbac'
])
param permissionModel string

param principalId string

@description('Object id of the Backup Management Service service principal: the only principal the app may grant a role to on an RBAC vault.')
param backupManagementServiceObjectId string

@description('GUID of the one role the app may assign on an RBAC vault (the custom backup role, or Key Vault Administrator when VMBACKUP_KEY_VAULT_ROLE=administrator).')
param assignableRoleGuid string

@description('GUID of the custom role the app needs itself to recreate restored VMs on an RBAC vault.')
param restoreRoleGuid string

var roles = {
  keyVaultContributor: 'f25e0fa2-a7c8-4377-a976-54943a77a395'
  roleBasedAccessControlAdministrator: 'f58310d9-a9f6-439a-9e8d-f62e7b41a168'
}

// ABAC: the app may create role assignments of the one backup role, for Backup Management Service
// only, and may delete none.
var rbacAdministratorCondition = '((!(ActionMatches{\'Microsoft.Authorization/roleAssignments/write\'})) OR (@Request[Microsoft.Authorization/roleAssignments:RoleDefinitionId] ForAnyOfAnyValues:GuidEquals {${assignableRoleGuid}} AND @Request[Microsoft.Authorization/roleAssignments:PrincipalId] ForAnyOfAnyValues:GuidEquals {${backupManagementServiceObjectId}})) AND (!(ActionMatches{\'Microsoft.Authorization/roleAssignments/delete\'}))'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

// Access-policy vault: Key Vault Contributor lets the app add the "Azure Backup" access policy
// (keys and secrets get/list/backup) and deploy VMs whose disks reference the vault
// (vaults/deploy/action). It grants no data access through RBAC.
resource keyVaultContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (permissionModel == 'accessPolicy') {
  name: guid(vault.id, principalId, roles.keyVaultContributor)
  scope: vault
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultContributor)
  }
}

// Access-policy vault: the app's own data access for restores, added beside the vault's existing
// policies ('add' never replaces them): check the key and secret, and put back a deleted KEK/BEK.
resource appAccessPolicy 'Microsoft.KeyVault/vaults/accessPolicies@2023-07-01' = if (permissionModel == 'accessPolicy') {
  parent: vault
  name: 'add'
  properties: {
    accessPolicies: [
      {
        tenantId: subscription().tenantId
        objectId: principalId
        permissions: {
          keys: [
            'get'
            'restore'
          ]
          secrets: [
            'get'
            'set'
            'restore'
          ]
          certificates: []
        }
      }
    ]
  }
}

// RBAC vault: Role Based Access Control Administrator, constrained by the condition above to assign
// the one backup role to Backup Management Service: never Owner, never to itself, never a delete.
resource rbacAdministrator 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (permissionModel == 'rbac') {
  name: guid(vault.id, principalId, roles.roleBasedAccessControlAdministrator)
  scope: vault
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.roleBasedAccessControlAdministrator)
    condition: rbacAdministratorCondition
    conditionVersion: '2.0'
  }
}

// RBAC vault: the custom restore role (deploy/action, key/secret read and restore) for the app.
resource restoreOperator 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (permissionModel == 'rbac') {
  name: guid(vault.id, principalId, restoreRoleGuid)
  scope: vault
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', restoreRoleGuid)
  }
}
