//! The deployable layout, generated from the functions' declarations: `host.json` at the root, one
//! folder per function holding `function.json`, and the handler executable.

use super::server::FunctionApp;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The generated JSON files of an app: `host.json` and each function's `function.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppFiles {
    pub host_json: String,
    /// Function name → `function.json` text.
    pub functions: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot copy the handler binary {from} to {to}: {source}")]
    CopyBinary {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn pretty(value: &serde_json::Value) -> String {
    // Serializing a `Value` cannot fail; fall back to the compact form rather than panic.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.push('\n');
    text
}

impl AppFiles {
    pub fn render(app: &FunctionApp) -> Self {
        AppFiles {
            host_json: pretty(&app.host_settings().host_json()),
            functions: app
                .specs()
                .map(|spec| (spec.name.clone(), pretty(&spec.function_json())))
                .collect(),
        }
    }

    /// Write `host.json` into `root` and each `function.json` into `functions_dir/<name>/`.
    pub fn write(&self, root: &Path, functions_dir: &Path) -> Result<(), PackageError> {
        write_file(&root.join("host.json"), &self.host_json)?;
        for (name, text) in &self.functions {
            write_file(&functions_dir.join(name).join("function.json"), text)?;
        }
        Ok(())
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), PackageError> {
    let wrap = |source| PackageError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(wrap)?;
    }
    std::fs::write(path, text).map_err(wrap)
}

/// Lay out the deployable app in `out`: `host.json`, `<function>/function.json`, and the handler
/// binary under the name `host.json` starts.
pub fn package(app: &FunctionApp, out: &Path, binary: &Path) -> Result<PathBuf, PackageError> {
    let files = AppFiles::render(app);
    files.write(out, out)?;
    let target = out.join(&app.host_settings().executable);
    std::fs::copy(binary, &target).map_err(|source| PackageError::CopyBinary {
        from: binary.to_path_buf(),
        to: target.clone(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let wrap = |source| PackageError::Write {
            path: target.clone(),
            source,
        };
        let mut permissions = std::fs::metadata(&target).map_err(wrap)?.permissions();
        permissions.set_mode(0o755);
        std::fs::set_permissions(&target, permissions).map_err(wrap)?;
    }
    Ok(target)
}
