//! Microsoft.Resources tags at a VM's or a subscription's scope (`{scope}/providers/Microsoft.Resources/tags/default`) and
//! Microsoft.Authorization role assignments (RBAC key vaults).

use super::http::{Reply, Request};
use super::state::{parse_resource_id, same, RoleAssignment, SimState};
use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Split `/{scope}/providers/{ns}/{type}/{name?}` at the last `providers` segment.
fn scope_and_tail<'a>(
    segments: &'a [String],
    namespace: &str,
    kind: &str,
) -> Option<(String, &'a [String])> {
    let at = segments.iter().rposition(|s| same(s, "providers"))?;
    let tail = &segments[at + 1..];
    (tail.len() >= 2 && same(&tail[0], namespace) && same(&tail[1], kind))
        .then(|| (format!("/{}", segments[..at].join("/")), &tail[2..]))
}

pub fn route(state: &mut SimState, req: &Request) -> Option<Reply> {
    if let Some((scope, tail)) = scope_and_tail(&req.segments, "Microsoft.Resources", "tags") {
        if tail.len() == 1 && same(&tail[0], "default") {
            return Some(tags(state, req, &scope));
        }
    }
    if let Some((scope, tail)) =
        scope_and_tail(&req.segments, "Microsoft.Authorization", "roleAssignments")
    {
        return Some(role_assignments(state, req, &scope, tail));
    }
    None
}

fn tags(state: &mut SimState, req: &Request, scope: &str) -> Reply {
    let only = || {
        Reply::bad_request(
            "InvalidScope",
            "The simulator serves tags on subscriptions and virtual machines only.",
        )
    };
    let body = match req.json_body() {
        Ok(b) => b,
        Err(e) => return e,
    };
    let scope_parts: Vec<&str> = scope.trim_matches('/').split('/').collect();
    let target = if let [first, sub] = scope_parts.as_slice() {
        if !same(first, "subscriptions") || !state.subscriptions.iter().any(|s| same(s, sub)) {
            return Reply::arm_error(
                StatusCode::NOT_FOUND,
                "SubscriptionNotFound",
                &format!("The subscription '{sub}' could not be found."),
            );
        }
        state
            .subscription_tags
            .entry(sub.to_ascii_lowercase())
            .or_default()
    } else {
        let Some((sub, rg, kind, name)) = parse_resource_id(scope) else {
            return only();
        };
        if !same(&kind, "Microsoft.Compute/virtualMachines") {
            return only();
        }
        match state.vm_mut(&sub, &rg, &name) {
            Some(vm) => &mut vm.tags,
            None => return Reply::not_found(&kind, &name),
        }
    };
    let before = target.clone();
    if let Err(reply) = apply_tag_operation(target, &req.method, &body) {
        return reply;
    }
    let tags = target.clone();
    if tags != before {
        state.emit_write(
            &format!("{scope}/providers/Microsoft.Resources/tags/default"),
            "Microsoft.Resources/tags/write",
            req.now,
        );
    }
    Reply::ok(json!({
        "id": format!("{scope}/providers/Microsoft.Resources/tags/default"), "name": "default",
        "type": "Microsoft.Resources/tags", "properties": { "tags": tags }
    }))
}

/// GET reads, PUT replaces, PATCH replaces, merges or deletes (`operation`), DELETE clears.
fn apply_tag_operation(
    tags: &mut BTreeMap<String, String>,
    method: &Method,
    body: &Value,
) -> Result<(), Reply> {
    let given: BTreeMap<String, String> = body
        .pointer("/properties/tags")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(String::from)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    match *method {
        Method::GET => {}
        Method::PUT => *tags = given,
        Method::PATCH => match body.get("operation").and_then(Value::as_str).unwrap_or("") {
            op if same(op, "Replace") => *tags = given,
            op if same(op, "Merge") => tags.extend(given),
            op if same(op, "Delete") => tags.retain(|k, v| given.get(k) != Some(v)),
            op => {
                return Err(Reply::bad_request(
                    "InvalidRequestContent",
                    &format!("operation '{op}' must be Replace, Merge or Delete."),
                ))
            }
        },
        Method::DELETE => tags.clear(),
        _ => {
            return Err(Reply::arm_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "Method not allowed on tags.",
            ))
        }
    }
    Ok(())
}

fn render_assignment(ra: &RoleAssignment) -> Value {
    json!({
        "id": format!("{}/providers/Microsoft.Authorization/roleAssignments/{}", ra.scope, ra.name), "name": ra.name,
        "type": "Microsoft.Authorization/roleAssignments",
        "properties": { "roleDefinitionId": ra.role_definition_id, "principalId": ra.principal_id,
                        "principalType": ra.principal_type, "scope": ra.scope, "condition": null, "conditionVersion": null,
                        "createdOn": "2026-01-01T00:00:00Z", "updatedOn": "2026-01-01T00:00:00Z",
                        "createdBy": super::state::APP_PRINCIPAL_ID, "updatedBy": super::state::APP_PRINCIPAL_ID, "delegatedManagedIdentityResourceId": null, "description": null }
    })
}

fn role_assignments(state: &mut SimState, req: &Request, scope: &str, tail: &[String]) -> Reply {
    match (req.method.clone(), tail) {
        (Method::GET, []) => {
            let list: Vec<Value> = state
                .role_assignments
                .iter()
                .filter(|ra| {
                    scope
                        .to_ascii_lowercase()
                        .starts_with(&ra.scope.to_ascii_lowercase())
                })
                .map(render_assignment)
                .collect();
            Reply::ok(json!({ "value": list }))
        }
        (Method::GET, [name]) => match state
            .role_assignments
            .iter()
            .find(|ra| same(&ra.name, name) && same(&ra.scope, scope))
        {
            Some(ra) => Reply::ok(render_assignment(ra)),
            None => Reply::arm_error(
                StatusCode::NOT_FOUND,
                "RoleAssignmentNotFound",
                &format!("The role assignment '{name}' is not found."),
            ),
        },
        (Method::PUT, [name]) => {
            let vault = state.key_vaults.iter().find(|kv| {
                kv.id()
                    .to_ascii_lowercase()
                    .starts_with(&scope.to_ascii_lowercase())
            });
            if vault.is_some_and(|kv| !kv.app_can_manage_access) {
                return Reply::arm_error(StatusCode::FORBIDDEN, "AuthorizationFailed", &format!(
                    "The client '{0}' with object id '{0}' does not have authorization to perform action 'Microsoft.Authorization/roleAssignments/write' over scope '{scope}/providers/Microsoft.Authorization/roleAssignments/{name}' or the scope is invalid.",
                    super::state::APP_PRINCIPAL_ID));
            }
            let body = match req.json_body() {
                Ok(b) => b,
                Err(e) => return e,
            };
            let text = |k: &str| {
                body.pointer(&format!("/properties/{k}"))
                    .and_then(Value::as_str)
                    .map(String::from)
            };
            let (Some(role), Some(principal)) = (text("roleDefinitionId"), text("principalId"))
            else {
                return Reply::bad_request(
                    "InvalidRoleAssignmentRequest",
                    "properties.roleDefinitionId and properties.principalId are required.",
                );
            };
            if let Some(existing) = state.role_assignments.iter().find(|ra| {
                same(&ra.scope, scope)
                    && same(&ra.principal_id, &principal)
                    && same(&ra.role_definition_id, &role)
                    && !same(&ra.name, name)
            }) {
                return Reply::arm_error(StatusCode::CONFLICT, "RoleAssignmentExists", &format!("The role assignment already exists. The ID of the existing role assignment is {}.", existing.name));
            }
            let created = !state.role_assignments.iter().any(|ra| same(&ra.name, name));
            state.role_assignments.retain(|ra| !same(&ra.name, name));
            let ra = RoleAssignment {
                name: name.clone(),
                scope: scope.to_string(),
                role_definition_id: role,
                principal_id: principal,
                principal_type: text("principalType").unwrap_or_else(|| "ServicePrincipal".into()),
            };
            let rendered = render_assignment(&ra);
            state.role_assignments.push(ra);
            Reply::json(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                rendered,
            )
        }
        (Method::DELETE, [name]) => {
            let found = state
                .role_assignments
                .iter()
                .position(|ra| same(&ra.name, name));
            match found {
                Some(i) => Reply::ok(render_assignment(&state.role_assignments.remove(i))),
                None => Reply::empty(StatusCode::NO_CONTENT),
            }
        }
        _ => Reply::arm_error(
            StatusCode::NOT_FOUND,
            "InvalidResourceType",
            "Unsupported role assignment operation.",
        ),
    }
}
