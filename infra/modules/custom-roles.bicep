// Custom roles, defined once in the deployment subscription and assignable in every watched one.
targetScope = 'subscription'

@description('Makes the role names unique in the tenant (role names are tenant-wide).')
param nameSuffix string
param assignableSubscriptionIds array

var assignableScopes = [for id in assignableSubscriptionIds: '/subscriptions/${id}']

// What Azure Backup ("Backup Management Service") needs on an RBAC key vault to back up an ADE VM:
// exactly the five data actions Microsoft documents, instead of Key Vault Administrator. The app
// assigns it on each RBAC key vault (VMBACKUP_KEY_VAULT_BACKUP_ROLE_ID).
resource backupKeyVaultRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, 'vmbackup-backup-key-vault-reader', nameSuffix)
  properties: {
    roleName: 'vmbackup Azure Backup key vault reader (${nameSuffix})'
    description: 'Azure Backup (Backup Management Service) reads and backs up the BEK/KEK of ADE VMs.'
    type: 'CustomRole'
    assignableScopes: assignableScopes
    permissions: [
      {
        actions: []
        notActions: []
        dataActions: [
          'Microsoft.KeyVault/vaults/keys/backup/action'
          'Microsoft.KeyVault/vaults/secrets/backup/action'
          'Microsoft.KeyVault/vaults/secrets/getSecret/action'
          'Microsoft.KeyVault/vaults/keys/read'
          'Microsoft.KeyVault/vaults/secrets/readMetadata/action'
        ]
        notDataActions: []
      }
    ]
  }
}

// What the app itself needs on the key vault of an ADE VM it restores: deploy a VM whose disks
// reference the vault (`vaults/deploy/action`), read the key and secret it checks, and put back a
// deleted KEK or BEK from the backup Azure Backup kept (restore, or set a wrapped BEK). Reading a
// secret's metadata goes through GET secret, hence getSecret (the value is dropped unread).
resource restoreKeyVaultRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, 'vmbackup-restore-key-vault-operator', nameSuffix)
  properties: {
    roleName: 'vmbackup restore key vault operator (${nameSuffix})'
    description: 'vmbackup recreates restored ADE VMs and restores their keys and secrets.'
    type: 'CustomRole'
    assignableScopes: assignableScopes
    permissions: [
      {
        actions: [
          'Microsoft.KeyVault/vaults/read'
          'Microsoft.KeyVault/vaults/deploy/action'
        ]
        notActions: []
        dataActions: [
          'Microsoft.KeyVault/vaults/keys/read'
          'Microsoft.KeyVault/vaults/keys/restore/action'
          'Microsoft.KeyVault/vaults/secrets/readMetadata/action'
          'Microsoft.KeyVault/vaults/secrets/getSecret/action'
          'Microsoft.KeyVault/vaults/secrets/setSecret/action'
          'Microsoft.KeyVault/vaults/secrets/restore/action'
        ]
        notDataActions: []
      }
    ]
  }
}

output backupKeyVaultRoleId string = backupKeyVaultRole.id
output backupKeyVaultRoleGuid string = backupKeyVaultRole.name
output restoreKeyVaultRoleGuid string = restoreKeyVaultRole.name
