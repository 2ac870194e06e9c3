//! Pieces the workflow benches share: naming simulator requests by kind and counting them.

#![allow(dead_code)]

use std::collections::BTreeMap;
use vmbackup::simulator::RequestRecord;

/// `METHOD provider/type/subtype…` of a simulator request, names and query left out, e.g.
/// `GET Compute/virtualMachines` or `PUT RecoveryServices/vaults/backupFabrics/protectionContainers/protectedItems`.
/// Data-plane and identity paths (no `providers` segment) keep their first segment.
pub fn request_kind(method: &str, path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let kind = match segments
        .iter()
        .rposition(|s| s.eq_ignore_ascii_case("providers"))
    {
        Some(at) if at + 1 < segments.len() => {
            let namespace = segments[at + 1].trim_start_matches("Microsoft.");
            // After the namespace, types and names alternate: keep the types.
            let types: Vec<&str> = segments[at + 2..].iter().step_by(2).copied().collect();
            std::iter::once(namespace)
                .chain(types)
                .collect::<Vec<_>>()
                .join("/")
        }
        _ => format!("{} (data plane)", segments.first().copied().unwrap_or("/")),
    };
    format!("{method} {kind}")
}

pub fn is_identity(record: &RequestRecord) -> bool {
    record.path.contains("/msi/")
}

pub fn is_resource_graph(record: &RequestRecord) -> bool {
    record.path.contains("Microsoft.ResourceGraph")
}

/// Requests by kind, identity (token) requests left out.
pub fn by_kind<'a>(
    records: impl IntoIterator<Item = &'a RequestRecord>,
) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for record in records.into_iter().filter(|r| !is_identity(r)) {
        *kinds
            .entry(request_kind(&record.method, &record.path))
            .or_default() += 1;
    }
    kinds
}

/// `kind×count; …` with the most frequent first.
pub fn describe(kinds: &BTreeMap<String, usize>) -> String {
    let mut sorted: Vec<(&String, &usize)> = kinds.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    sorted
        .iter()
        .map(|(kind, count)| format!("{kind}×{count}"))
        .collect::<Vec<_>>()
        .join("; ")
}
