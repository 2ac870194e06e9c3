//! Clients for Azure: the only code that speaks HTTP to Azure.
