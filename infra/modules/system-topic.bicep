// The Event Grid system topic on a subscription's resource events (one per subscription: Azure
// allows a single system topic per source).

param name string
param tags object

resource topic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: name
  location: 'global'
  tags: tags
  identity: {
    // Delivers to Service Bus with its own identity (the namespace has local auth off).
    type: 'SystemAssigned'
  }
  properties: {
    source: subscription().id
    topicType: 'Microsoft.Resources.Subscriptions'
  }
}

output principalId string = topic.identity.principalId
