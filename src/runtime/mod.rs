//! The custom-handler runtime: typed invocations, outputs, logs, a router of named functions. Knows nothing about backup.
