//! Microsoft.Resources deployments into a resource group (LRO): the template's virtual machines are
//! created when the deployment completes. Template expressions: `[parameters('x')]`,
//! `[variables('x')]` and `[resourceGroup().location]`; any other expression fails the deployment.

use super::http::{iso_duration, rfc3339, Reply, Request};
use super::state::{later, same, Deployment, JobFailure, SimState};
use axum::http::{Method, StatusCode};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

const D: &str = "subscriptions/{}/resourcegroups/{}/providers/microsoft.resources/deployments/{}";
/// Simulated seconds a deployment runs.
const DEPLOYMENT_SECONDS: u64 = 60;

pub fn route(state: &mut SimState, req: &Request) -> Option<Reply> {
    if let Some(c) = req.route(Method::PUT, D) {
        return Some(put(state, req, &c[0], &c[1], &c[2]));
    }
    if let Some(c) = req.route(Method::GET, D) {
        return Some(match find(state, &c[0], &c[1], &c[2]) {
            Some(d) => Reply::ok(render(d, req.now)),
            None => Reply::arm_error(
                StatusCode::NOT_FOUND,
                "DeploymentNotFound",
                &format!("Deployment '{}' could not be found.", c[2]),
            ),
        });
    }
    if let Some(c) = req.route(Method::GET, &format!("{D}/operationstatuses/{{}}")) {
        let d = find(state, &c[0], &c[1], &c[2])?;
        let status = status(d, req.now);
        let mut body = json!({ "status": status });
        if let (Some(f), "Failed") = (&d.failure, status) {
            body["error"] = json!({ "code": f.code, "message": f.message });
        }
        return Some(Reply::ok(body));
    }
    None
}

fn find<'a>(state: &'a SimState, sub: &str, rg: &str, name: &str) -> Option<&'a Deployment> {
    state
        .deployments
        .iter()
        .find(|d| same(&d.name, name) && same(&d.resource_group, rg) && same(&d.subscription, sub))
}

fn status(d: &Deployment, now: DateTime<Utc>) -> &'static str {
    if now < d.end {
        "Running"
    } else if d.failure.is_some() {
        "Failed"
    } else {
        "Succeeded"
    }
}

fn render(d: &Deployment, now: DateTime<Utc>) -> Value {
    let st = status(d, now);
    let mut properties = json!({
        "provisioningState": st, "correlationId": d.correlation_id, "timestamp": rfc3339(if st == "Running" { now } else { d.end }),
        "duration": iso_duration(((if st == "Running" { now } else { d.end }) - d.start).num_milliseconds() as f64 / 1000.0),
        "mode": d.mode, "parameters": d.parameters,
        "providers": d.providers,
        "templateHash": template_hash(&d.template),
        "dependencies": [],
        "outputResources": d.output_resources.iter().map(|id| json!({ "id": id })).collect::<Vec<_>>()
    });
    if let Some(link) = &d.template_link {
        let mut link = link.clone();
        if let Some(version) = d.template.get("contentVersion") {
            link["contentVersion"] = version.clone();
        }
        properties["templateLink"] = link;
    }
    if let (Some(f), "Failed") = (&d.failure, st) {
        properties["error"] = json!({ "code": f.code, "message": f.message });
    }
    json!({
        "id": format!("/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Resources/deployments/{}", d.subscription, d.resource_group, d.name),
        "name": d.name, "type": "Microsoft.Resources/deployments", "properties": properties
    })
}

fn put(state: &mut SimState, req: &Request, sub: &str, rg: &str, name: &str) -> Reply {
    let body = match req.json_body() {
        Ok(b) => b,
        Err(e) => return e,
    };
    let props = body.get("properties").cloned().unwrap_or(Value::Null);
    let template = match (
        props.get("template"),
        props.pointer("/templateLink/uri").and_then(Value::as_str),
    ) {
        (Some(t), _) => t.clone(),
        (None, Some(uri)) => match fetch_blob(state, uri) {
            Some(t) => t,
            None => {
                return Reply::bad_request(
                    "InvalidContentLink",
                    &format!("Unable to download deployment content from '{uri}'."),
                )
            }
        },
        (None, None) => {
            return Reply::bad_request(
                "InvalidDeployment",
                "properties.template or properties.templateLink is required.",
            )
        }
    };
    let parameters = props.get("parameters").cloned().unwrap_or(json!({}));
    let existed = find(state, sub, rg, name).is_some();
    state.deployments.retain(|d| {
        !(same(&d.name, name) && same(&d.resource_group, rg) && same(&d.subscription, sub))
    });
    let deployment = Deployment {
        subscription: sub.into(),
        resource_group: rg.into(),
        name: name.into(),
        start: req.now,
        end: later(req.now, DEPLOYMENT_SECONDS),
        correlation_id: uuid::Uuid::new_v4().to_string(),
        template,
        parameters,
        mode: props
            .get("mode")
            .and_then(Value::as_str)
            .unwrap_or("Incremental")
            .into(),
        failure: None,
        output_resources: Vec::new(),
        finalized: false,
        template_link: props.get("templateLink").cloned(),
        providers: Value::Null,
    };
    let deployment = Deployment {
        providers: providers(
            &deployment,
            &resource_group_location(state, sub, rg).unwrap_or_default(),
        ),
        ..deployment
    };
    let rendered = render(&deployment, req.now);
    state.deployments.push(deployment);
    let status_url = format!("{}/subscriptions/{sub}/resourcegroups/{rg}/providers/Microsoft.Resources/deployments/{name}/operationStatuses/{}?api-version={}",
        req.base_url, uuid::Uuid::new_v4(), req.api_version());
    Reply::json(
        if existed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        rendered,
    )
    .with_header("azure-asyncoperation", status_url)
    .with_header("retry-after", "10")
}

/// ARM's template hash is a decimal string derived from the template; any stable digest serves.
fn template_hash(template: &Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    template.to_string().hash(&mut hasher);
    hasher.finish().to_string()
}

/// Where a resource group's resources are (the simulator keeps no resource groups of its own).
fn resource_group_location(state: &SimState, sub: &str, rg: &str) -> Option<String> {
    let in_rg = |s: &str, r: &str| same(s, sub) && same(r, rg);
    state
        .vms
        .iter()
        .find(|v| in_rg(&v.subscription, &v.resource_group))
        .map(|v| v.location.clone())
        .or_else(|| {
            state
                .disks
                .iter()
                .find(|d| in_rg(&d.subscription, &d.resource_group))
                .map(|d| d.location.clone())
        })
}

/// The template's `resources` array (none when it has no such array).
fn template_resources(d: &Deployment) -> Vec<Value> {
    d.template
        .get("resources")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// `[{namespace, resourceTypes: [{resourceType, locations}]}]` of the template's resources.
fn providers(d: &Deployment, rg_location: &str) -> Value {
    let mut by_namespace: std::collections::BTreeMap<
        String,
        std::collections::BTreeMap<String, Vec<String>>,
    > = Default::default();
    let resources = template_resources(d);
    for resource in resources {
        let Some((namespace, kind)) = resource
            .get("type")
            .and_then(Value::as_str)
            .and_then(|t| t.split_once('/'))
        else {
            continue;
        };
        let location = resource
            .get("location")
            .and_then(|l| resolve(l, &d.template, &d.parameters, rg_location).ok())
            .and_then(|l| l.as_str().map(str::to_string))
            .filter(|l| !l.is_empty());
        let locations = by_namespace
            .entry(namespace.to_string())
            .or_default()
            .entry(kind.to_string())
            .or_default();
        if let Some(location) = location {
            if !locations.contains(&location) {
                locations.push(location);
            }
        }
    }
    Value::Array(
        by_namespace
            .into_iter()
            .map(|(namespace, types)| json!({
                "namespace": namespace,
                "resourceTypes": types.into_iter().map(|(t, l)| json!({ "resourceType": t, "locations": l })).collect::<Vec<_>>()
            }))
            .collect(),
    )
}

/// Read a template from the simulator's own blob endpoint (a SAS query string is ignored).
fn fetch_blob(state: &SimState, uri: &str) -> Option<Value> {
    let prefix = format!("{}/blob/", state.base_url);
    let path = uri.strip_prefix(&prefix)?.split('?').next()?;
    let (account, rest) = path.split_once('/')?;
    let (container, blob) = rest.split_once('/')?;
    let found = state
        .blobs
        .get(&super::blob::blob_key(account, container, blob))?;
    serde_json::from_slice(&found.content).ok()
}

/// Resolve `[parameters('x')]`, `[variables('x')]`, `[resourceGroup().location]` everywhere in a value.
fn resolve(
    value: &Value,
    template: &Value,
    parameters: &Value,
    location: &str,
) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) if s.starts_with('[') && s.ends_with(']') && !s.starts_with("[[") => {
            let expr = &s[1..s.len() - 1];
            let arg = |f: &str| {
                expr.strip_prefix(&format!("{f}('"))
                    .and_then(|r| r.strip_suffix("')"))
                    .map(String::from)
            };
            if let Some(name) = arg("parameters") {
                parameters
                    .pointer(&format!("/{name}/value"))
                    .cloned()
                    .or_else(|| {
                        template
                            .pointer(&format!("/parameters/{name}/defaultValue"))
                            .cloned()
                    })
                    .ok_or_else(|| format!("The template parameter '{name}' has no value."))?
            } else if let Some(name) = arg("variables") {
                template
                    .pointer(&format!("/variables/{name}"))
                    .cloned()
                    .ok_or_else(|| format!("The template variable '{name}' is not found."))?
            } else if expr == "resourceGroup().location" {
                Value::String(location.to_string())
            } else {
                return Err(format!(
                    "The simulator cannot evaluate the template expression '{s}'."
                ));
            }
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| resolve(v, template, parameters, location))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), resolve(v, template, parameters, location)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

pub fn finalize_deployments(state: &mut SimState, now: DateTime<Utc>) {
    let due: Vec<usize> = state
        .deployments
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.finalized && d.end <= now)
        .map(|(i, _)| i)
        .collect();
    for index in due {
        state.deployments[index].finalized = true;
        let d = state.deployments[index].clone();
        let location = state
            .vms
            .iter()
            .find(|v| {
                same(&v.subscription, &d.subscription) && same(&v.resource_group, &d.resource_group)
            })
            .map(|v| v.location.clone())
            .unwrap_or_default();
        let resources = template_resources(&d);
        let mut outputs = Vec::new();
        let mut failure = None;
        for resource in resources {
            let resolved = match resolve(&resource, &d.template, &d.parameters, &location) {
                Ok(r) => r,
                Err(e) => {
                    failure = Some(JobFailure {
                        code: "InvalidTemplate".into(),
                        message: e,
                    });
                    break;
                }
            };
            let kind = resolved
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !same(kind, "Microsoft.Compute/virtualMachines") {
                failure = Some(JobFailure {
                    code: "InvalidTemplate".into(),
                    message: format!("The simulator deploys only virtual machines, not '{kind}'."),
                });
                break;
            }
            let name = resolved
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            match super::compute::upsert_vm_from_body(
                state,
                &d.subscription,
                &d.resource_group,
                &name,
                &resolved,
                d.end,
            ) {
                Ok((id, _)) => outputs.push(id),
                Err(reply) => {
                    let message = match &reply.body {
                        super::http::Body::Json(v) => v
                            .pointer("/error/message")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        _ => String::new(),
                    };
                    failure = Some(JobFailure {
                        code: "ResourceDeploymentFailure".into(),
                        message,
                    });
                    break;
                }
            }
        }
        state.deployments[index].output_resources = outputs;
        state.deployments[index].failure = failure;
    }
}
