// The app's user-assigned managed identity. User-assigned, so every role assignment exists before
// the app first starts (a system-assigned identity is only known once the app is created).

param location string
param tags object
param name string

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output principalId string = identity.properties.principalId
output clientId string = identity.properties.clientId
