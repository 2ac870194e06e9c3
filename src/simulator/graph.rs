//! Azure Resource Graph (`POST /providers/Microsoft.ResourceGraph/resources`) over the simulated estate.
//!
//! No Rust crate parses KQL, so this is a hand-written parser for the subset the project uses:
//! tables `Resources` and `RecoveryServicesResources`; `| where` with `=~`, `==`, `!=`, `!~`, `contains`, `!contains`,
//! `contains_cs`, `in (…)`,
//! `in~ (…)`, `isnotempty(…)`, `isempty(…)`, joined by `and` / `or`; `| project a, b`;
//! `| order by x asc|desc`; `| limit n`. Anything else is a 400 naming the unsupported part.

use super::http::{Reply, Request};
use super::state::{same, SimState, TENANT_ID};
use axum::http::{Method, StatusCode};
use base64::Engine;
use serde_json::{json, Map, Value};

pub fn route(state: &mut SimState, req: &Request) -> Option<Reply> {
    req.route(Method::POST, "providers/microsoft.resourcegraph/resources")?;
    Some(query(state, req))
}

fn invalid_query(detail: &str) -> Reply {
    Reply::json(
        StatusCode::BAD_REQUEST,
        json!({ "error": {
            "code": "BadRequest",
            "message": "Please provide below info when asking for support: timestamp, correlationId.",
            "details": [
                { "code": "InvalidQuery", "message": "Query is invalid. Please refer to the documentation for the Azure Resource Graph service and fix the error before retrying." },
                // Simulator's own detail code.
                { "code": "UnsupportedQueryPart", "message": detail }
            ]
        }}),
    )
}

fn query(state: &mut SimState, req: &Request) -> Reply {
    let body = match req.json_body() {
        Ok(b) => b,
        Err(e) => return e,
    };
    let Some(text) = body.get("query").and_then(Value::as_str) else {
        return Reply::bad_request("BadRequest", "The 'query' property is required.");
    };
    let subscriptions: Vec<String> = body
        .get("subscriptions")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_else(|| state.subscriptions.clone());
    let top = body
        .pointer("/options/$top")
        .and_then(Value::as_u64)
        .unwrap_or(1000);
    if !(1..=1000).contains(&top) {
        return Reply::bad_request("BadRequest", "options.$top must be between 1 and 1000.");
    }
    let (skip, snapshot) = match body.pointer("/options/$skipToken").and_then(Value::as_str) {
        Some(token) => match decode_skip_token(token) {
            Some(position) => position,
            None => return Reply::bad_request("BadRequest", "options.$skipToken is invalid."),
        },
        None => (
            body.pointer("/options/$skip")
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize,
            None,
        ),
    };
    let pipeline = match parse(text) {
        Ok(p) => p,
        Err(e) => return invalid_query(&e),
    };
    // A continuation reads the result set its first page computed (as Resource Graph pages one
    // result, and rendering every row again per page made 10,000-VM sweeps slow); a token whose
    // snapshot is gone is answered by running the query again.
    let query_key = format!("{}\n{}", subscriptions.join(",").to_ascii_lowercase(), text);
    let kept = snapshot.and_then(|id| {
        state
            .graph_snapshots
            .get(id, &query_key)
            .map(|rows| (id, rows))
    });
    let (kept_id, rows) = match kept {
        Some((id, rows)) => (Some(id), rows),
        None => (
            None,
            std::sync::Arc::new(run_pipeline(state, &pipeline, &subscriptions)),
        ),
    };
    let total = rows.len();
    let end = skip.saturating_add(top as usize);
    let page: Vec<Value> = rows.iter().skip(skip).take(top as usize).cloned().collect();
    let mut response = json!({
        "totalRecords": total, "count": page.len(), "resultTruncated": "false", "facets": [], "data": page
    });
    if end < total {
        let id = match kept_id {
            Some(id) => id,
            None => state.graph_snapshots.insert(query_key, rows),
        };
        response["$skipToken"] = json!(encode_skip_token(end, id));
    } else if let Some(id) = kept_id {
        state.graph_snapshots.remove(id);
    }
    Reply::ok(response)
}

/// The rows of a query: the table, the subscriptions asked for, then each operator in order.
fn run_pipeline(state: &SimState, pipeline: &Pipeline, subscriptions: &[String]) -> Vec<Value> {
    let mut rows: Vec<Value> = match pipeline.table {
        Table::Resources => resources_rows(state),
        Table::RecoveryServicesResources => recovery_rows(state),
    };
    rows.retain(|r| {
        r.get("subscriptionId")
            .and_then(Value::as_str)
            .is_some_and(|s| subscriptions.iter().any(|x| same(x, s)))
    });
    for op in &pipeline.operators {
        match op {
            Operator::Where(expr) => rows.retain(|r| expr.eval(r)),
            Operator::Order(path, descending) => {
                rows.sort_by(|a, b| {
                    let key = |r: &Value| {
                        lookup(r, path)
                            .map(|v| {
                                v.as_str()
                                    .map(|s| s.to_ascii_lowercase())
                                    .unwrap_or_else(|| v.to_string())
                            })
                            .unwrap_or_default()
                    };
                    let ord = key(a).cmp(&key(b));
                    if *descending {
                        ord.reverse()
                    } else {
                        ord
                    }
                });
            }
            Operator::Project(columns) => {
                rows = rows
                    .iter()
                    .map(|r| {
                        let mut out = Map::new();
                        for (name, path) in columns {
                            out.insert(
                                name.clone(),
                                lookup(r, path).cloned().unwrap_or(Value::Null),
                            );
                        }
                        Value::Object(out)
                    })
                    .collect();
            }
            Operator::Limit(n) => rows.truncate(*n),
        }
    }
    rows
}

/// Result sets of queries whose later pages have not been read yet, newest last; a few at most.
#[derive(Debug, Default)]
pub struct GraphSnapshots {
    next_id: u64,
    entries: std::collections::VecDeque<(u64, String, std::sync::Arc<Vec<Value>>)>,
}

impl GraphSnapshots {
    const KEPT: usize = 8;

    fn get(&self, id: u64, query_key: &str) -> Option<std::sync::Arc<Vec<Value>>> {
        self.entries
            .iter()
            .find(|(entry, key, _)| *entry == id && key == query_key)
            .map(|(_, _, rows)| rows.clone())
    }

    fn insert(&mut self, query_key: String, rows: std::sync::Arc<Vec<Value>>) -> u64 {
        self.next_id += 1;
        if self.entries.len() == Self::KEPT {
            self.entries.pop_front();
        }
        self.entries.push_back((self.next_id, query_key, rows));
        self.next_id
    }

    fn remove(&mut self, id: u64) {
        self.entries.retain(|(entry, _, _)| *entry != id);
    }
}

fn encode_skip_token(offset: usize, snapshot: u64) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("{{\"$skip\":{offset},\"snapshot\":{snapshot}}}"))
}

/// The offset, and the snapshot the token continues when it names one.
fn decode_skip_token(token: &str) -> Option<(usize, Option<u64>)> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    let offset = value.get("$skip")?.as_u64()? as usize;
    Some((offset, value.get("snapshot").and_then(Value::as_u64)))
}

#[allow(clippy::too_many_arguments)] // one argument per column of a Resource Graph row
fn arg_row(
    id: String,
    name: &str,
    kind: &str,
    location: &str,
    rg: &str,
    sub: &str,
    tags: Value,
    properties: Value,
) -> Value {
    json!({
        "id": id, "name": name, "type": kind.to_ascii_lowercase(), "tenantId": TENANT_ID, "kind": "", "location": location,
        "resourceGroup": rg.to_ascii_lowercase(), "subscriptionId": sub, "managedBy": "", "sku": null, "plan": null,
        "properties": properties, "tags": tags, "identity": null, "zones": null, "extendedLocation": null
    })
}

fn resources_rows(state: &SimState) -> Vec<Value> {
    let mut rows = Vec::new();
    for vm in &state.vms {
        let rendered = super::compute::render_vm(state, vm, false);
        rows.push(arg_row(
            vm.id(),
            &vm.name,
            "Microsoft.Compute/virtualMachines",
            &vm.location,
            &vm.resource_group,
            &vm.subscription,
            json!(vm.tags),
            rendered["properties"].clone(),
        ));
    }
    for disk in &state.disks {
        let rendered = super::compute::render_disk(disk);
        rows.push(arg_row(
            disk.id(),
            &disk.name,
            "Microsoft.Compute/disks",
            &disk.location,
            &disk.resource_group,
            &disk.subscription,
            json!({}),
            rendered["properties"].clone(),
        ));
    }
    for kv in &state.key_vaults {
        rows.push(arg_row(kv.id(), &kv.name, "Microsoft.KeyVault/vaults", &kv.location, &kv.resource_group, &kv.subscription, json!({}),
            json!({ "vaultUri": kv.vault_uri(&state.base_url), "enableRbacAuthorization": kv.rbac, "enabledForDiskEncryption": true, "tenantId": TENANT_ID })));
    }
    for vault in &state.recovery_vaults {
        rows.push(arg_row(
            vault.id(),
            &vault.name,
            "Microsoft.RecoveryServices/vaults",
            &vault.location,
            &vault.resource_group,
            &vault.subscription,
            json!({}),
            json!({ "provisioningState": "Succeeded" }),
        ));
    }
    for account in &state.storage_accounts {
        rows.push(arg_row(account.id(), &account.name, "Microsoft.Storage/storageAccounts", &account.location, &account.resource_group, &account.subscription, json!({}),
            json!({ "primaryEndpoints": { "blob": account.blob_endpoint(&state.base_url) }, "provisioningState": "Succeeded" })));
    }
    rows
}

fn recovery_rows(state: &SimState) -> Vec<Value> {
    state.protected_items.iter().filter_map(|p| {
        let vault = state.recovery_vaults.iter().find(|v| same(&v.id(), &p.vault_id))?;
        let props = json!({
            "sourceResourceId": p.vm_id, "friendlyName": p.vm_name, "policyName": p.policy,
            "policyId": format!("{}/backupPolicies/{}", p.vault_id, p.policy), "protectionState": p.protection_state,
            "lastBackupStatus": p.last_backup_status, "backupManagementType": "AzureIaasVM", "workloadType": "VM",
            "dataSourceInfo": { "resourceID": p.vm_id, "datasourceType": "Microsoft.Compute/virtualMachines" },
            "vaultId": p.vault_id
        });
        Some(arg_row(p.id(), &p.item_name(), "microsoft.recoveryservices/vaults/backupfabrics/protectioncontainers/protecteditems",
            &vault.location, &vault.resource_group, &vault.subscription, json!({}), props))
    }).collect()
}

// ---- the KQL subset ----

#[derive(Debug, Clone, PartialEq)]
enum Table {
    Resources,
    RecoveryServicesResources,
}

#[derive(Debug, Clone, PartialEq)]
enum PathPart {
    Key(String),
}

type Path = Vec<PathPart>;

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare {
        path: Path,
        op: String,
        value: String,
    },
    In {
        path: Path,
        values: Vec<String>,
        case_insensitive: bool,
    },
    IsNotEmpty(Path, bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Operator {
    Where(Expr),
    Project(Vec<(String, Path)>),
    Order(Path, bool),
    Limit(usize),
}

#[derive(Debug)]
struct Pipeline {
    table: Table,
    operators: Vec<Operator>,
}

fn lookup<'a>(row: &'a Value, path: &Path) -> Option<&'a Value> {
    let mut current = row;
    for PathPart::Key(key) in path {
        let map = current.as_object()?;
        // Resource Graph property names are matched case-insensitively here, as ARG does for tags.
        current = map.get(key).or_else(|| {
            map.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
        })?;
    }
    Some(current)
}

fn as_text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

impl Expr {
    fn eval(&self, row: &Value) -> bool {
        match self {
            Expr::And(a, b) => a.eval(row) && b.eval(row),
            Expr::Or(a, b) => a.eval(row) || b.eval(row),
            Expr::Compare { path, op, value } => {
                let actual = as_text(lookup(row, path));
                match op.as_str() {
                    "=~" => actual.eq_ignore_ascii_case(value),
                    "!~" => !actual.eq_ignore_ascii_case(value),
                    "==" => actual == *value,
                    // KQL's `contains` is case-insensitive; `contains_cs` is not.
                    "contains" => actual.to_lowercase().contains(&value.to_lowercase()),
                    "!contains" => !actual.to_lowercase().contains(&value.to_lowercase()),
                    "contains_cs" => actual.contains(value.as_str()),
                    _ => actual != *value,
                }
            }
            Expr::In {
                path,
                values,
                case_insensitive,
            } => {
                let actual = as_text(lookup(row, path));
                values.iter().any(|v| {
                    if *case_insensitive {
                        v.eq_ignore_ascii_case(&actual)
                    } else {
                        *v == actual
                    }
                })
            }
            Expr::IsNotEmpty(path, want_not_empty) => {
                let empty = match lookup(row, path) {
                    None | Some(Value::Null) => true,
                    Some(Value::String(s)) => s.is_empty(),
                    Some(_) => false,
                };
                empty != *want_not_empty
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Num(usize),
    Sym(String),
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '\'' || c == '"' {
            let end = chars[i + 1..]
                .iter()
                .position(|&x| x == c)
                .ok_or("an unterminated string literal")?;
            tokens.push(Token::Str(chars[i + 1..i + 1 + end].iter().collect()));
            i += end + 2;
        } else if c.is_ascii_alphabetic() || c == '_' || c == '$' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '$')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word == "in" && chars.get(i) == Some(&'~') {
                i += 1;
                tokens.push(Token::Sym("in~".into()));
            } else {
                tokens.push(Token::Ident(word));
            }
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let n: String = chars[start..i].iter().collect();
            tokens.push(Token::Num(
                n.parse().map_err(|_| format!("the number {n}"))?,
            ));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            if ["=~", "==", "!=", "!~"].contains(&two.as_str()) {
                tokens.push(Token::Sym(two));
                i += 2;
            } else if "|.[](),!".contains(c) {
                tokens.push(Token::Sym(c.to_string()));
                i += 1;
            } else {
                return Err(format!("the character '{c}'"));
            }
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }
    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn sym(&mut self, s: &str) -> bool {
        if self.peek() == Some(&Token::Sym(s.into())) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn keyword(&mut self, k: &str) -> bool {
        if matches!(self.peek(), Some(Token::Ident(w)) if w.eq_ignore_ascii_case(k)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect_sym(&mut self, s: &str) -> Result<(), String> {
        if self.sym(s) {
            Ok(())
        } else {
            Err(format!("expected '{s}' near {}", self.here()))
        }
    }
    fn here(&self) -> String {
        match self.peek() {
            Some(Token::Ident(w)) => format!("'{w}'"),
            Some(Token::Str(s)) => format!("'{s}'"),
            Some(Token::Num(n)) => n.to_string(),
            Some(Token::Sym(s)) => format!("'{s}'"),
            None => "the end".into(),
        }
    }
    fn path(&mut self) -> Result<Path, String> {
        let Some(Token::Ident(first)) = self.next() else {
            return Err(format!("expected a column near {}", self.here()));
        };
        let mut path = vec![PathPart::Key(first)];
        loop {
            if self.sym(".") {
                match self.next() {
                    Some(Token::Ident(k)) => path.push(PathPart::Key(k)),
                    _ => return Err("expected a property name after '.'".into()),
                }
            } else if self.sym("[") {
                match self.next() {
                    Some(Token::Str(k)) => path.push(PathPart::Key(k)),
                    _ => return Err("expected a quoted key inside [ ]".into()),
                }
                self.expect_sym("]")?;
            } else {
                return Ok(path);
            }
        }
    }
    fn string(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Token::Str(s)) => Ok(s),
            _ => Err("expected a string literal".into()),
        }
    }
    fn term(&mut self) -> Result<Expr, String> {
        if self.sym("(") {
            let e = self.or()?;
            self.expect_sym(")")?;
            return Ok(e);
        }
        for (f, want) in [("isnotempty", true), ("isempty", false)] {
            if matches!(self.peek(), Some(Token::Ident(w)) if w.eq_ignore_ascii_case(f)) {
                self.pos += 1;
                self.expect_sym("(")?;
                let p = self.path()?;
                self.expect_sym(")")?;
                return Ok(Expr::IsNotEmpty(p, want));
            }
        }
        if let Some(Token::Ident(w)) = self.peek() {
            if self.tokens.get(self.pos + 1) == Some(&Token::Sym("(".into())) {
                return Err(format!("the function '{w}'"));
            }
        }
        let path = self.path()?;
        for op in ["=~", "==", "!=", "!~"] {
            if self.sym(op) {
                return Ok(Expr::Compare {
                    path,
                    op: op.into(),
                    value: self.string()?,
                });
            }
        }
        for op in ["contains", "contains_cs"] {
            if self.keyword(op) {
                return Ok(Expr::Compare {
                    path,
                    op: op.into(),
                    value: self.string()?,
                });
            }
        }
        if self.sym("!") {
            if self.keyword("contains") {
                return Ok(Expr::Compare {
                    path,
                    op: "!contains".into(),
                    value: self.string()?,
                });
            }
            return Err(format!("the operator !{}", self.here()));
        }
        let case_insensitive = if self.sym("in~") {
            true
        } else if self.keyword("in") {
            false
        } else {
            return Err(format!("the operator {}", self.here()));
        };
        self.expect_sym("(")?;
        let mut values = vec![self.string()?];
        while self.sym(",") {
            values.push(self.string()?);
        }
        self.expect_sym(")")?;
        Ok(Expr::In {
            path,
            values,
            case_insensitive,
        })
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut e = self.term()?;
        while self.keyword("and") {
            e = Expr::And(Box::new(e), Box::new(self.term()?));
        }
        Ok(e)
    }
    fn or(&mut self) -> Result<Expr, String> {
        let mut e = self.and()?;
        while self.keyword("or") {
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }
    fn operator(&mut self) -> Result<Operator, String> {
        if self.keyword("where") {
            return Ok(Operator::Where(self.or()?));
        }
        if self.keyword("project") {
            let mut columns = Vec::new();
            loop {
                let path = self.path()?;
                let name = match path.last() {
                    Some(PathPart::Key(k)) => k.clone(),
                    None => String::new(),
                };
                columns.push((name, path));
                if !self.sym(",") {
                    break;
                }
            }
            return Ok(Operator::Project(columns));
        }
        if self.keyword("order") || self.keyword("sort") {
            if !self.keyword("by") {
                return Err("expected 'by' after order".into());
            }
            let path = self.path()?;
            // KQL sorts descending unless told `asc`.
            let descending = if self.keyword("asc") {
                false
            } else {
                let _ = self.keyword("desc");
                true
            };
            return Ok(Operator::Order(path, descending));
        }
        if self.keyword("limit") || self.keyword("take") {
            return match self.next() {
                Some(Token::Num(n)) => Ok(Operator::Limit(n)),
                _ => Err("expected a number after limit".into()),
            };
        }
        Err(format!("the operator {}", self.here()))
    }
}

fn parse(text: &str) -> Result<Pipeline, String> {
    let unsupported = |what: String| {
        format!("The simulator's Resource Graph does not support {what} in this query.")
    };
    let tokens = tokenize(text).map_err(unsupported)?;
    let mut parser = Parser { tokens, pos: 0 };
    let table = match parser.next() {
        Some(Token::Ident(t)) if t.eq_ignore_ascii_case("resources") => Table::Resources,
        Some(Token::Ident(t)) if t.eq_ignore_ascii_case("recoveryservicesresources") => {
            Table::RecoveryServicesResources
        }
        Some(Token::Ident(t)) => return Err(unsupported(format!("the table '{t}'"))),
        _ => {
            return Err(unsupported(
                "a query that does not start with a table".into(),
            ))
        }
    };
    let mut operators = Vec::new();
    while parser.peek().is_some() {
        parser.expect_sym("|").map_err(unsupported)?;
        operators.push(parser.operator().map_err(unsupported)?);
    }
    Ok(Pipeline { table, operators })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_project_forms_and_names_unsupported_parts() {
        let p = parse("Resources | where type =~ 'microsoft.compute/virtualmachines' and isnotempty(tags['backup-policy']) and subscriptionId in ('a','b') | project id, name, tags | order by id asc").unwrap();
        assert_eq!(p.table, Table::Resources);
        assert_eq!(p.operators.len(), 3);
        let row = json!({"type": "Microsoft.Compute/virtualMachines", "tags": {"backup-policy": "Daily"}, "subscriptionId": "b"});
        let Operator::Where(expr) = &p.operators[0] else {
            panic!("where expected")
        };
        assert!(expr.eval(&row));
        assert!(!expr.eval(&json!({"type": "x", "tags": {}, "subscriptionId": "b"})));
        assert!(parse("Resources | summarize count()")
            .unwrap_err()
            .contains("summarize"));
        assert!(parse("ResourceContainers")
            .unwrap_err()
            .contains("ResourceContainers"));
        assert!(parse("Resources | where strlen(name) == '1'")
            .unwrap_err()
            .contains("strlen"));
    }

    #[test]
    fn skip_tokens_round_trip() {
        assert_eq!(
            decode_skip_token(&encode_skip_token(1000, 7)),
            Some((1000, Some(7)))
        );
        assert_eq!(decode_skip_token("garbage"), None);
    }
}
