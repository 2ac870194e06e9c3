//! Infrastructure agrees with the code: every queue the code and `functions/*/function.json` use
//! exists in `infra/`, every app setting the code reads is set there, and nothing points the app
//! away from Azure's defaults.
//!
//! The Bicep is read as text (no Bicep toolchain needed): the queue list is the `var queues = [...]`
//! block of `infra/modules/servicebus.bicep`, the app settings are the `name: '…'` entries of the
//! `var appSettings = [...]` block of `infra/modules/functionapp.bicep`. `.ci/run` separately proves
//! that every Bicep file parses (pycep) and passes checkov.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmbackup::azure::config;
use vmbackup::domain::backup::JobTrackingPolicy;
use vmbackup::events::queues;
use vmbackup::local::queue::{QueueOptions, INFRA_QUEUES};
use vmbackup::workflow::settings;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The text of a single-quoted-string-free line, so brackets inside strings don't count.
fn without_strings(line: &str) -> String {
    let mut out = String::new();
    let mut in_string = false;
    for c in line.chars() {
        match c {
            '\'' => in_string = !in_string,
            _ if !in_string => out.push(c),
            _ => {}
        }
    }
    out
}

/// The lines of the block that opens on the line starting with `opener` (e.g. `var queues = [`),
/// up to its closing bracket (the kind of bracket that ends the opening line).
fn block(text: &str, opener: &str) -> Vec<String> {
    let mut lines = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(opener));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("no line starts with {opener:?}"));
    let (open, close) = match without_strings(first).trim_end().chars().last() {
        Some('[') => ('[', ']'),
        Some('{') => ('{', '}'),
        _ => panic!("the line {first:?} does not open a block"),
    };
    let mut depth = 0i32;
    let mut body = Vec::new();
    for line in std::iter::once(first).chain(lines) {
        let code = without_strings(line.split("//").next().unwrap_or(""));
        depth += code.matches(open).count() as i32 - code.matches(close).count() as i32;
        body.push(line.to_string());
        if depth == 0 {
            return body;
        }
    }
    panic!("the block opened by {opener:?} never closes");
}

/// The values of `key: 'value'` lines.
fn quoted_values(lines: &[String], key: &str) -> Vec<String> {
    let prefix = format!("{key}: '");
    lines
        .iter()
        .filter_map(|l| l.trim_start().strip_prefix(&prefix))
        .filter_map(|rest| rest.split('\'').next())
        .map(str::to_string)
        .collect()
}

fn infra_queues() -> Vec<String> {
    quoted_values(
        &block(&read("infra/modules/servicebus.bicep"), "var queues = ["),
        "name",
    )
}

fn infra_app_settings() -> BTreeSet<String> {
    let text = read("infra/modules/functionapp.bicep");
    let mut names: BTreeSet<String> = quoted_values(&block(&text, "var appSettings = ["), "name")
        .into_iter()
        .collect();
    names.extend(quoted_values(
        &block(&text, "var premiumOnlySettings = ["),
        "name",
    ));
    names
}

fn function_jsons() -> Vec<(String, Value)> {
    let Ok(entries) = std::fs::read_dir(root().join("functions")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path().join("function.json"))
        .filter(|p| p.is_file())
        .map(|p: PathBuf| {
            let text = std::fs::read_to_string(&p).unwrap();
            let json: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.display().to_string(), json)
        })
        .collect()
}

fn bindings(function: &Value) -> impl Iterator<Item = &Value> {
    function["bindings"].as_array().into_iter().flatten()
}

fn is_service_bus(binding: &Value) -> bool {
    binding["type"]
        .as_str()
        .is_some_and(|t| t.to_ascii_lowercase().starts_with("servicebus"))
}

/// The queues a function.json's Service Bus bindings use.
fn queues_of(path: &str, function: &Value) -> Vec<String> {
    bindings(function)
        .filter(|b| is_service_bus(b))
        .map(|b| {
            b["queueName"]
                .as_str()
                .unwrap_or_else(|| panic!("{path}: a Service Bus binding without queueName"))
                .to_string()
        })
        .collect()
}

/// The app settings a function.json makes the host read: `<connection>__fullyQualifiedNamespace`
/// of each Service Bus binding, and NAME of a timer schedule written `%NAME%`.
fn settings_of(path: &str, function: &Value) -> Vec<String> {
    let mut names = Vec::new();
    for binding in bindings(function) {
        if is_service_bus(binding) {
            let connection = binding["connection"]
                .as_str()
                .unwrap_or_else(|| panic!("{path}: a Service Bus binding without connection"));
            names.push(format!("{connection}__fullyQualifiedNamespace"));
        }
        if let Some(setting) = binding["schedule"]
            .as_str()
            .and_then(|s| s.strip_prefix('%'))
            .and_then(|s| s.strip_suffix('%'))
        {
            names.push(setting.to_string());
        }
    }
    names
}

#[test]
fn every_catalog_queue_is_in_infra_and_nothing_else() {
    let infra = infra_queues();
    let infra_set: BTreeSet<&str> = infra.iter().map(String::as_str).collect();
    assert_eq!(
        infra.len(),
        infra_set.len(),
        "a queue is declared twice: {infra:?}"
    );
    let catalog: BTreeSet<&str> = queues::ALL.into_iter().collect();
    let missing: Vec<_> = catalog.difference(&infra_set).collect();
    assert!(
        missing.is_empty(),
        "queues of events::queues::ALL missing from infra: {missing:?}"
    );
    let unknown: Vec<_> = infra_set.difference(&catalog).collect();
    assert!(
        unknown.is_empty(),
        "infra declares queues the code does not know: {unknown:?}"
    );
    // The Event Grid subscription's destination is the module's `queue[0]`.
    assert_eq!(infra.first().map(String::as_str), Some(queues::VM_EVENTS));
}

#[test]
fn every_queue_of_function_json_is_in_infra() {
    let infra: BTreeSet<String> = infra_queues().into_iter().collect();
    for (path, function) in function_jsons() {
        for queue in queues_of(&path, &function) {
            assert!(
                infra.contains(&queue),
                "{path}: queue {queue:?} is not in infra"
            );
        }
    }
}

/// Minutes of an ISO 8601 duration of whole minutes or hours (`PT5M`, `PT1H`).
fn minutes(duration: &str) -> u64 {
    let parsed = duration.strip_prefix("PT").and_then(|rest| {
        let (number, factor) = match rest.strip_suffix('H') {
            Some(hours) => (hours, 60),
            None => (rest.strip_suffix('M')?, 1),
        };
        number.parse::<u64>().ok().map(|n| n * factor)
    });
    parsed.unwrap_or_else(|| panic!("{duration:?} is not PT<n>M or PT<n>H"))
}

/// Local runs lock and deduplicate each queue as infra makes Azure do (the local queue options
/// come from `INFRA_QUEUES`), and the dedup window outlasts the longest scheduled re-check.
#[test]
fn local_queue_options_match_infra() {
    let queue_list = block(&read("infra/modules/servicebus.bicep"), "var queues = [");
    let names = quoted_values(&queue_list, "name");
    let locks = quoted_values(&queue_list, "lockDuration");
    let windows = quoted_values(&queue_list, "duplicateDetectionWindow");
    assert_eq!(names.len(), locks.len());
    assert_eq!(
        names.len(),
        windows.len(),
        "every queue needs a duplicateDetectionWindow"
    );
    let infra: Vec<(String, u64, u64)> = names
        .into_iter()
        .zip(locks.iter().map(|l| minutes(l)))
        .zip(windows.iter().map(|w| minutes(w)))
        .map(|((name, lock), window)| (name, lock, window))
        .collect();
    let local: Vec<(String, u64, u64)> = INFRA_QUEUES
        .iter()
        .map(|(name, lock, window)| (name.to_string(), *lock, *window))
        .collect();
    assert_eq!(
        infra, local,
        "infra and vmbackup::local::queue::INFRA_QUEUES differ"
    );
    for (name, lock, window) in &infra {
        let options = QueueOptions::as_in_infra(name);
        assert_eq!(options.lock_duration, Duration::from_secs(lock * 60));
        assert_eq!(
            options.duplicate_detection_window,
            Some(Duration::from_secs(window * 60))
        );
    }
    let longest_check = JobTrackingPolicy::backup()
        .max_delay
        .max(JobTrackingPolicy::restore().max_delay);
    for queue in [queues::JOB_TRACKING, queues::BACKUP_REQUESTS] {
        let window = QueueOptions::as_in_infra(queue)
            .duplicate_detection_window
            .unwrap();
        assert!(
            window > longest_check,
            "{queue}: {window:?} <= {longest_check:?}"
        );
    }
}

#[test]
fn queues_are_durable_and_deduplicated() {
    let module = read("infra/modules/servicebus.bicep");
    let queue_list = block(&module, "var queues = [");
    let locks = quoted_values(&queue_list, "lockDuration");
    assert_eq!(
        locks.len(),
        queues::ALL.len(),
        "every queue needs a lockDuration"
    );
    for lock in &locks {
        assert!(
            (1..=5).contains(&minutes(lock)),
            "Service Bus allows 1 s to 5 min, got {lock}"
        );
    }
    let queue_resource = block(
        &module,
        "resource queue 'Microsoft.ServiceBus/namespaces/queues@",
    );
    for property in [
        "maxDeliveryCount: 10",
        "deadLetteringOnMessageExpiration: true",
        "requiresDuplicateDetection: true",
        "lockDuration: q.lockDuration",
        "duplicateDetectionHistoryTimeWindow: q.duplicateDetectionWindow",
    ] {
        assert!(
            queue_resource.iter().any(|l| l.trim() == property),
            "queues lack `{property}`"
        );
    }
    let namespace = block(
        &module,
        "resource namespace 'Microsoft.ServiceBus/namespaces@",
    );
    for property in ["disableLocalAuth: true", "name: 'Standard'"] {
        assert!(
            namespace.iter().any(|l| l.trim() == property),
            "the namespace lacks `{property}`"
        );
    }
}

#[test]
fn every_setting_the_code_reads_is_set_by_infra() {
    let infra = infra_app_settings();
    let mut required: BTreeSet<String> = settings::ALL
        .iter()
        .map(|(name, _)| name.to_string())
        .collect();
    // What the app needs in Azure of the Azure configuration: the Service Bus namespace for its
    // scheduled sends, the credential choice and the user-assigned identity's client id.
    required.extend(
        [
            config::ENV_SERVICEBUS_NAMESPACE,
            config::ENV_CREDENTIAL,
            config::ENV_AZURE_CLIENT_ID,
        ]
        .map(str::to_string),
    );
    // The host's own storage, identity-based.
    required.insert("AzureWebJobsStorage__accountName".into());
    for (path, function) in function_jsons() {
        required.extend(settings_of(&path, &function));
    }
    let missing: Vec<_> = required.difference(&infra).collect();
    assert!(
        missing.is_empty(),
        "app settings the code reads but infra does not set: {missing:?}"
    );
}

#[test]
fn infra_keeps_azure_defaults_and_sets_no_secret() {
    let infra = infra_app_settings();
    // Endpoints and audiences default to Azure public cloud; a connection string or client secret
    // would bypass the managed identity; the clock variables belong to simulated runs.
    let forbidden = [
        config::ENV_ARM_ENDPOINT,
        config::ENV_RESOURCE_GRAPH_ENDPOINT,
        config::ENV_AUTHORITY_HOST,
        config::ENV_ARM_AUDIENCE,
        config::ENV_KEYVAULT_AUDIENCE,
        config::ENV_STORAGE_AUDIENCE,
        config::ENV_SERVICEBUS_AUDIENCE,
        config::ENV_SERVICEBUS_ENDPOINT,
        config::ENV_SERVICEBUS_CONNECTION_STRING,
        config::ENV_AZURE_CLIENT_SECRET,
        vmbackup::clock::ENV_TIME_SCALE,
        vmbackup::clock::ENV_ORIGIN_WALL_MS,
        vmbackup::clock::ENV_ORIGIN_SIM_MS,
        "AzureWebJobsStorage",
    ];
    let set: Vec<_> = forbidden.iter().filter(|n| infra.contains(**n)).collect();
    assert!(set.is_empty(), "infra must not set {set:?}");

    let storage = read("infra/modules/storage.bicep");
    assert!(
        storage
            .lines()
            .any(|l| l.trim() == "allowSharedKeyAccess: false"),
        "host storage must have shared-key access off"
    );
}

#[test]
fn the_block_reader_finds_nested_blocks_and_ignores_brackets_in_strings() {
    let text = "var x = [\n  {\n    name: 'a[b'\n  }\n]\nvar y = 1\n";
    let lines = block(text, "var x = [");
    assert_eq!(lines.len(), 5);
    assert_eq!(quoted_values(&lines, "name"), vec!["a[b"]);
    assert!(Path::new(&root()).join("infra/main.bicep").is_file());
}

#[test]
fn function_json_readers_find_queues_connections_and_schedule_settings() {
    // The shapes `vmbackup::runtime` writes (see src/runtime/spec.rs).
    let queue_function = serde_json::json!({"bindings": [
        {"type": "serviceBusTrigger", "direction": "in", "name": "message",
         "queueName": "backup-requests", "connection": "ServiceBusConnection"},
        {"type": "serviceBus", "direction": "out", "name": "next",
         "queueName": "job-tracking", "connection": "OtherConnection"}
    ]});
    assert_eq!(
        queues_of("f", &queue_function),
        vec!["backup-requests", "job-tracking"]
    );
    assert_eq!(
        settings_of("f", &queue_function),
        vec![
            "ServiceBusConnection__fullyQualifiedNamespace",
            "OtherConnection__fullyQualifiedNamespace"
        ]
    );
    let timer = serde_json::json!({"bindings": [
        {"type": "timerTrigger", "direction": "in", "name": "timer",
         "schedule": "%VMBACKUP_BACKUP_SCHEDULE%"},
        {"type": "timerTrigger", "direction": "in", "name": "fixed", "schedule": "0 0 * * * *"}
    ]});
    assert_eq!(settings_of("t", &timer), vec!["VMBACKUP_BACKUP_SCHEDULE"]);
    assert!(queues_of("t", &timer).is_empty());
}
