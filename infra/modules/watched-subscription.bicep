// What the app needs in one watched subscription: Reader for Resource Graph, and a resource group
// holding the Event Grid system topic on the subscription's resource writes.
targetScope = 'subscription'

param principalId string
param location string
param tags object
param eventsResourceGroupName string
param systemTopicName string

var reader = 'acdd72a7-3385-48ef-bd42-f606fba81ae7'

// Reader on the subscription: Resource Graph answers only what the caller can read, and the
// discovery and backup sweeps query every VM of the subscription. Read-only, no data access.
resource readerAssignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(subscription().id, principalId, reader)
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', reader)
  }
}

resource eventsGroup 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: eventsResourceGroupName
  location: location
  tags: tags
}

module topic 'system-topic.bicep' = {
  name: 'vmbackup-system-topic'
  scope: eventsGroup
  params: {
    name: systemTopicName
    tags: tags
  }
}

output topicPrincipalId string = topic.outputs.principalId
output eventsResourceGroupName string = eventsGroup.name
