//! The function app layout is generated from the code's declarations: the checked-in `host.json` and
//! `functions/*/function.json` must match, and must satisfy SchemaStore's schemas.
//!
//! After changing a declaration, regenerate the checked-in files with
//! `VMBACKUP_BLESS=1 cargo test --test app_layout`.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use vmbackup::runtime::package::AppFiles;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn checked_in_functions() -> BTreeSet<String> {
    let dir = root().join("functions");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeSet::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("function.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn checked_in_layout_matches_the_declarations() {
    let generated = AppFiles::render(&vmbackup::workflow::declared_app().unwrap());
    if std::env::var_os("VMBACKUP_BLESS").is_some() {
        let functions = root().join("functions");
        for stale in checked_in_functions() {
            if !generated.functions.contains_key(&stale) {
                std::fs::remove_dir_all(functions.join(&stale)).unwrap();
            }
        }
        generated.write(&root(), &functions).unwrap();
    }
    let regenerate = "run `VMBACKUP_BLESS=1 cargo test --test app_layout` to regenerate";
    let host = std::fs::read_to_string(root().join("host.json")).unwrap_or_default();
    assert_eq!(
        host, generated.host_json,
        "host.json drifted from the code; {regenerate}"
    );
    let declared: BTreeSet<String> = generated.functions.keys().cloned().collect();
    assert_eq!(
        checked_in_functions(),
        declared,
        "function folders drifted; {regenerate}"
    );
    for (name, text) in &generated.functions {
        let path = root().join("functions").join(name).join("function.json");
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            &checked_in,
            text,
            "{} drifted; {regenerate}",
            path.display()
        );
    }
}

fn schema(name: &str) -> Option<jsonschema::Validator> {
    let path = root().join("../shared/reference/schemas").join(name);
    let Ok(text) = std::fs::read_to_string(&path) else {
        println!(
            "SKIPPED: {} is missing (CI has ../shared beside the checkout)",
            path.display()
        );
        return None;
    };
    let schema: Value = serde_json::from_str(&text).expect("SchemaStore schema is JSON");
    // SchemaStore's function.json declares draft-04 but uses `const`: only a draft-7 validator
    // accepts SchemaStore's own fixtures, so force draft 7 for both.
    Some(
        jsonschema::draft7::options()
            .build(&schema)
            .expect("SchemaStore schema compiles"),
    )
}

fn assert_valid(validator: &jsonschema::Validator, path: &Path, document: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(document)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{} fails its schema: {errors:#?}",
        path.display()
    );
}

#[test]
fn generated_files_satisfy_schemastore_schemas() {
    let generated = AppFiles::render(&vmbackup::workflow::declared_app().unwrap());
    if let Some(host_schema) = schema("host.json") {
        let host: Value = serde_json::from_str(&generated.host_json).unwrap();
        assert_valid(&host_schema, Path::new("host.json"), &host);
        // The validator does reject what the host would reject.
        let mut wrong_version = host.clone();
        wrong_version["version"] = Value::String("3.0".into());
        assert!(!host_schema.is_valid(&wrong_version));
        let mut unknown_key = host.clone();
        unknown_key["customHandler"]["unknownKey"] = Value::Bool(true);
        assert!(!host_schema.is_valid(&unknown_key));
    }
    if let Some(function_schema) = schema("function.json") {
        for (name, text) in &generated.functions {
            let function: Value = serde_json::from_str(text).unwrap();
            assert_valid(&function_schema, Path::new(name), &function);
        }
        // The runtime's binding shapes for every trigger kind, not only the ones the app uses today.
        use vmbackup::runtime::{AuthLevel, FunctionSpec, OutputBinding, Trigger};
        for spec in [
            FunctionSpec::new("a", Trigger::service_bus("q"))
                .output(OutputBinding::service_bus("out", "r")),
            FunctionSpec::new("b", Trigger::timer("0 30 9 * * 1-5")),
            FunctionSpec::new("c", Trigger::http(AuthLevel::Function, &["post"]))
                .output(OutputBinding::http()),
        ] {
            assert_valid(
                &function_schema,
                Path::new(&spec.name),
                &spec.function_json(),
            );
        }
        let broken = serde_json::json!({ "bindings": [{ "type": "serviceBusTrigger", "direction": "sideways", "name": "m" }] });
        assert!(!function_schema.is_valid(&broken));
    }
}

#[test]
fn package_lays_out_host_json_functions_and_the_binary() {
    let out = std::env::temp_dir().join(format!("vmbackup-package-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_vmbackup"))
        .args(["package", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let host: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("host.json")).unwrap()).unwrap();
    let executable = host["customHandler"]["description"]["defaultExecutablePath"]
        .as_str()
        .unwrap();
    let binary = out.join(executable);
    assert!(binary.is_file());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_ne!(
            std::fs::metadata(&binary).unwrap().permissions().mode() & 0o111,
            0
        );
    }
    for spec in vmbackup::workflow::declared_app().unwrap().specs() {
        assert!(out.join(&spec.name).join("function.json").is_file());
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn package_without_out_is_a_usage_error() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_vmbackup"))
        .arg("package")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}
