//! The simulated estate of a local run, kept durable under the state directory.
//!
//! The queue is durable by itself; the simulator lives in memory. So that killing `vmbackup local`
//! and starting it again with the same `--state` continues the same run, the estate is written to
//! `simulator.json` (atomically: a temporary file, then a rename):
//! - before the queue accepts any message or completes any trigger (the queue's commit barrier), so
//!   the estate on disk is never behind the events on disk: a handler's Azure writes are saved
//!   before its output events are, and after a crash a redelivered step finds its own work done;
//! - after each Azure-side timeline action (with the set of actions already played);
//! - on a timer and at shutdown.
//!
//! A snapshot is only written when the estate changed: a write request reached the simulator since
//! the last one, or a save is forced. `run.json` beside it keeps the simulated clock (start, scale,
//! the last simulated instant seen) and the simulator's port, so a restart resumes the clock where
//! it stopped and serves the estate at the same addresses when it can.

use crate::clock::Clock;
use crate::simulator::state::SimState;
use crate::simulator::SimulatorHandle;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const SNAPSHOT_FILE: &str = "simulator.json";
pub const RUN_FILE: &str = "run.json";
pub const FLEET_FILE: &str = "fleet.json";
const SNAPSHOT_VERSION: u32 = 1;

/// The clock and addresses of a run, persisted so that a restart continues it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    /// Simulated instant the run (and its timeline) started.
    pub sim_start: DateTime<Utc>,
    pub time_scale: f64,
    /// The latest simulated instant this run is known to have reached.
    pub sim_now: DateTime<Utc>,
    pub simulator_port: u16,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SnapshotOut<'a> {
    version: u32,
    base_url: &'a str,
    sim_now: DateTime<Utc>,
    timeline_applied: &'a BTreeSet<usize>,
    state: &'a SimState,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SnapshotIn {
    version: u32,
    sim_now: DateTime<Utc>,
    timeline_applied: BTreeSet<usize>,
    state: SimState,
}

/// A snapshot read back: what to put into a fresh simulator.
pub struct Restored {
    pub state: SimState,
    pub sim_now: DateTime<Utc>,
    pub timeline_applied: BTreeSet<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum EstateError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is unreadable ({reason}); start with a fresh --state directory")]
    Corrupt { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EstateError + '_ {
    move |source| EstateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` so that a reader sees the old or the new content, never a mix.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), EstateError> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, bytes).map_err(io(&temporary))?;
    std::fs::rename(&temporary, path).map_err(io(path))
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, EstateError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

pub fn read_run(dir: &Path) -> Result<Option<RunRecord>, EstateError> {
    let path = dir.join(RUN_FILE);
    read_optional(&path)?
        .map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|e| EstateError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })
        })
        .transpose()
}

pub fn write_run(dir: &Path, run: &RunRecord) -> Result<(), EstateError> {
    let bytes = serde_json::to_vec_pretty(run).map_err(|e| EstateError::Corrupt {
        path: dir.join(RUN_FILE),
        reason: e.to_string(),
    })?;
    write_atomically(&dir.join(RUN_FILE), &bytes)
}

/// The simulated instant the last snapshot was taken at, if there is one.
pub fn snapshot_time(dir: &Path) -> Result<Option<DateTime<Utc>>, EstateError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Time {
        sim_now: DateTime<Utc>,
    }
    let path = dir.join(SNAPSHOT_FILE);
    read_optional(&path)?
        .map(|bytes| {
            serde_json::from_slice::<Time>(&bytes)
                .map(|t| t.sim_now)
                .map_err(|e| EstateError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })
        })
        .transpose()
}

/// Reads the snapshot, moving the estate's URLs from the old simulator address to `base_url`.
pub fn read_snapshot(dir: &Path, base_url: &str) -> Result<Option<Restored>, EstateError> {
    let path = dir.join(SNAPSHOT_FILE);
    let Some(bytes) = read_optional(&path)? else {
        return Ok(None);
    };
    let corrupt = |reason: String| EstateError::Corrupt {
        path: path.clone(),
        reason,
    };
    let mut text = String::from_utf8(bytes).map_err(|e| corrupt(e.to_string()))?;
    let header: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
    if let Some(old) = header["baseUrl"].as_str() {
        if old != base_url {
            // Key Vault URIs, secret and key URLs and blob endpoints all embed the simulator's address.
            text = text.replace(old, base_url);
        }
    }
    let snapshot: SnapshotIn = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
    if snapshot.version != SNAPSHOT_VERSION {
        return Err(corrupt(format!(
            "snapshot version {} (this build writes {SNAPSHOT_VERSION})",
            snapshot.version
        )));
    }
    Ok(Some(Restored {
        state: snapshot.state,
        sim_now: snapshot.sim_now,
        timeline_applied: snapshot.timeline_applied,
    }))
}

struct Progress {
    /// How much of the simulator's request log has been looked at.
    scanned: usize,
    /// Write requests seen since the last snapshot.
    unsaved_writes: bool,
    timeline_applied: BTreeSet<usize>,
}

/// Saves the simulator's estate under the state directory (see the module docs).
pub struct EstateStore {
    sim: Arc<SimulatorHandle>,
    dir: PathBuf,
    clock: Clock,
    progress: Mutex<Progress>,
}

impl EstateStore {
    pub fn new(
        sim: Arc<SimulatorHandle>,
        dir: &Path,
        timeline_applied: BTreeSet<usize>,
    ) -> Arc<EstateStore> {
        Arc::new(EstateStore {
            clock: sim.clock(),
            sim,
            dir: dir.to_path_buf(),
            progress: Mutex::new(Progress {
                scanned: 0,
                unsaved_writes: true,
                timeline_applied,
            }),
        })
    }

    pub fn timeline_applied(&self) -> BTreeSet<usize> {
        self.lock().timeline_applied.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        // A panic mid-save leaves at worst an unrenamed temporary file: the lock is safe to reuse.
        self.progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a played timeline action and saves the estate that includes its effect.
    pub fn mark_applied(&self, index: usize) -> Result<(), EstateError> {
        self.lock().timeline_applied.insert(index);
        self.save(true)
    }

    /// Saves when the estate changed since the last save, or always when `force`.
    pub fn save(&self, force: bool) -> Result<(), EstateError> {
        let mut progress = self.lock();
        let sim_now = self.clock.now();
        let base_url = self.sim.base_url();
        let bytes = self.sim.with_state(|state| {
            // A request the log lost (it is not kept in snapshots) restarts the scan.
            if progress.scanned > state.request_log.len() {
                progress.scanned = 0;
            }
            let writes = state.request_log[progress.scanned..]
                .iter()
                .any(|r| r.method != "GET" && r.method != "HEAD");
            progress.scanned = state.request_log.len();
            if !(force || writes || progress.unsaved_writes) {
                return None;
            }
            Some(serde_json::to_vec(&SnapshotOut {
                version: SNAPSHOT_VERSION,
                base_url: &base_url,
                sim_now,
                timeline_applied: &progress.timeline_applied,
                state,
            }))
        });
        let Some(bytes) = bytes else {
            return Ok(());
        };
        let path = self.dir.join(SNAPSHOT_FILE);
        let bytes = bytes.map_err(|e| EstateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomically(&path, &bytes)?;
        progress.unsaved_writes = false;
        Ok(())
    }

    /// The queue's commit barrier (see [`crate::local::queue::CommitBarrier`]).
    pub fn barrier(self: &Arc<Self>) -> crate::local::queue::CommitBarrier {
        let store = self.clone();
        Arc::new(move || store.save(false).map_err(|e| e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::fleet::Fleet;
    use crate::simulator::{Simulator, SimulatorConfig};

    const FLEET: &str = r#"{"subscriptions": [{"id": "11111111-1111-1111-1111-111111111111",
        "keyVaults": [{"name": "kv", "resourceGroup": "rg", "location": "westeurope",
                       "keys": [{"name": "kek"}], "secrets": []}],
        "virtualMachines": [{"name": "vm-1", "resourceGroup": "rg", "location": "westeurope",
            "encryption": {"kind": "ade", "keyVault": "kv", "secret": "bek-1", "kek": "kek"}}]}]}"#;

    #[tokio::test]
    async fn a_snapshot_restores_into_a_simulator_at_another_address() {
        let dir = std::env::temp_dir().join(format!("vmbackup-estate-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let fleet = Fleet::from_json_str(FLEET).unwrap();
        let first = Arc::new(
            Simulator::start(SimulatorConfig::new(fleet.clone()))
                .await
                .unwrap(),
        );
        first.with_state(|s| s.vms[0].tags.insert("backup-policy".into(), "Daily".into()));
        let store = EstateStore::new(first.clone(), &dir, BTreeSet::from([3]));
        store.save(false).unwrap();
        let old_base = first.base_url();

        let second = Simulator::start(SimulatorConfig::new(fleet)).await.unwrap();
        let restored = read_snapshot(&dir, &second.base_url()).unwrap().unwrap();
        assert_eq!(restored.timeline_applied, BTreeSet::from([3]));
        assert_eq!(restored.state.vms[0].tags["backup-policy"], "Daily");
        assert_eq!(restored.state.base_url, second.base_url());
        let secret_url = &restored.state.disks[0].ade.as_ref().unwrap().secret_url;
        assert!(secret_url.starts_with(&second.base_url()), "{secret_url}");
        assert!(!secret_url.starts_with(&old_base));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn saves_only_after_a_change_unless_forced() {
        let dir = std::env::temp_dir().join(format!("vmbackup-estate-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let sim = Arc::new(
            Simulator::start(SimulatorConfig::new(Fleet::from_json_str(FLEET).unwrap()))
                .await
                .unwrap(),
        );
        let store = EstateStore::new(sim.clone(), &dir, BTreeSet::new());
        let path = dir.join(SNAPSHOT_FILE);
        store.save(false).unwrap();
        assert!(path.exists(), "the first save always writes");
        std::fs::remove_file(&path).unwrap();
        store.save(false).unwrap();
        assert!(!path.exists(), "nothing changed");
        store.mark_applied(0).unwrap();
        assert!(path.exists(), "a played timeline action is saved");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
