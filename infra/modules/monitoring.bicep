// Logs and telemetry: a Log Analytics workspace and a workspace-based Application Insights that
// accepts Entra-authenticated ingestion only (the app sends with its managed identity).

param location string
param tags object
param workspaceName string
param appInsightsName string

@description('Days Log Analytics keeps the app logs.')
@minValue(30)
param retentionInDays int = 30

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    // No instrumentation-key ingestion: only identities holding Monitoring Metrics Publisher may send.
    DisableLocalAuth: true
  }
}

output appInsightsId string = appInsights.id
output appInsightsName string = appInsights.name
output connectionString string = appInsights.properties.ConnectionString
