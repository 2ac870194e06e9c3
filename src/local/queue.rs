//! The embedded durable Service Bus: queues in one SQLite file under the state directory.
//!
//! Semantics follow Azure Service Bus queues: peek-lock with a lock duration (an expired lock makes
//! the message available again), complete, abandon (the next delivery has `DeliveryCount` + 1),
//! dead-letter after `maxDeliveryCount` deliveries with reason `MaxDeliveryCountExceeded`, explicit
//! dead-lettering, scheduled messages, and duplicate detection on `MessageId` within a window.
//! All times are simulated time from [`Clock`].
//!
//! [`Queue::complete_with_outputs`] completes a trigger message and enqueues the invocation's output
//! messages in one SQLite transaction, so a crash can neither lose nor double an event.

use crate::clock::Clock;
use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{broadcast, Notify};

pub const DEFAULT_LOCK_DURATION: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_DELIVERY_COUNT: u32 = 10;
/// Service Bus's default duplicate detection history window.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
pub const MAX_DELIVERY_COUNT_EXCEEDED: &str = "MaxDeliveryCountExceeded";
/// The database file inside the state directory.
pub const DATABASE_FILE: &str = "servicebus.sqlite";

#[derive(Debug, Clone, PartialEq)]
pub struct QueueOptions {
    pub lock_duration: Duration,
    pub max_delivery_count: u32,
    /// `None` turns duplicate detection off.
    pub duplicate_detection_window: Option<Duration>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            lock_duration: DEFAULT_LOCK_DURATION,
            max_delivery_count: DEFAULT_MAX_DELIVERY_COUNT,
            duplicate_detection_window: Some(DEFAULT_DUPLICATE_WINDOW),
        }
    }
}

impl QueueOptions {
    /// The options infra gives `queue` (`infra/modules/servicebus.bicep`, kept equal by
    /// `tests/infra.rs`), so local runs lock and deduplicate as Azure does; the defaults for a queue
    /// infra does not declare.
    pub fn as_in_infra(queue: &str) -> QueueOptions {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        let (lock_minutes, duplicate_window) = INFRA_QUEUES
            .iter()
            .find(|(name, _, _)| *name == queue)
            .map(|(_, lock, window)| (*lock, minutes(*window)))
            .unwrap_or((
                DEFAULT_LOCK_DURATION.as_secs() / 60,
                DEFAULT_DUPLICATE_WINDOW,
            ));
        QueueOptions {
            lock_duration: minutes(lock_minutes),
            duplicate_detection_window: Some(duplicate_window),
            ..QueueOptions::default()
        }
    }
}

/// `(queue, lock duration in minutes, duplicate detection window in minutes)` as infra declares them.
/// `job-tracking` and `backup-requests` keep message ids for an hour: their messages are scheduled
/// ahead (job re-checks up to 30 minutes, paced sweep requests), and a redelivered or retried step
/// re-sends them under the same id, which Service Bus must still remember to drop the copy.
pub const INFRA_QUEUES: &[(&str, u64, u64)] = &[
    ("vm-events", 1, 10),
    ("protection-requests", 2, 10),
    ("key-vault-access", 2, 10),
    ("protection-ready", 5, 10),
    ("backup-requests", 5, 60),
    ("job-tracking", 1, 60),
    ("restore-requests", 5, 10),
    ("restore-disks-restored", 5, 10),
    ("restore-vm-recreated", 5, 10),
    ("outcomes", 1, 10),
    ("notifications", 1, 10),
];

/// The settable properties of a message (Service Bus broker and application properties).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MessageProperties {
    /// Generated (a GUID without dashes) when not given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// `Label` in the REST API, `Subject` in the newer SDKs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_enqueue_time_utc: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub application_properties: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutgoingMessage {
    pub body: Vec<u8>,
    pub properties: MessageProperties,
}

impl OutgoingMessage {
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        OutgoingMessage {
            body: body.into(),
            properties: MessageProperties::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedMessage {
    pub queue: String,
    pub sequence_number: i64,
    pub message_id: String,
    /// Empty for a message received and deleted.
    pub lock_token: String,
    pub locked_until: DateTime<Utc>,
    /// 1 on the first delivery.
    pub delivery_count: u32,
    pub enqueued_time: DateTime<Utc>,
    pub body: Vec<u8>,
    pub properties: MessageProperties,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetteredMessage {
    pub queue: String,
    pub sequence_number: i64,
    pub message_id: String,
    pub delivery_count: u32,
    pub reason: String,
    pub description: Option<String>,
    pub body: Vec<u8>,
    pub properties: MessageProperties,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    Enqueued {
        sequence_number: i64,
    },
    /// A message with the same `MessageId` was sent within the duplicate detection window; dropped.
    Duplicate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbandonOutcome {
    /// Available again for another delivery.
    Redelivery,
    /// The message had reached `maxDeliveryCount` and moved to the dead-letter queue.
    DeadLettered,
}

/// One message as it was enqueued (see [`Queue::journal_since`]).
#[derive(Debug, Clone, PartialEq)]
pub struct JournalEntry {
    pub position: i64,
    pub queue: String,
    pub message_id: String,
    pub body: Vec<u8>,
    pub enqueued_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum QueueEvent {
    Enqueued {
        queue: String,
        message_id: String,
    },
    DeadLettered {
        queue: String,
        message_id: String,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue {0:?} does not exist")]
    QueueNotFound(String),
    #[error("the lock on the message in queue {queue:?} was lost or the lock token is unknown")]
    LockLost { queue: String },
    #[error("invalid queue name {0:?}: use 1-260 letters, digits, '.', '-', '_' or '/'")]
    InvalidName(String),
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stored message properties are unreadable: {0}")]
    Properties(#[from] serde_json::Error),
    #[error("queue database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot make outside state durable before enqueueing: {0}")]
    Barrier(String),
}

/// Runs before any message is enqueued or any trigger completed, so that state living outside the
/// queue (the simulated estate of `vmbackup local`) is durable at least as far as the queue: after
/// a crash that state is never behind the events that describe it.
pub type CommitBarrier = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A handle on the embedded Service Bus; clones share one database connection.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Mutex<Connection>,
    clock: Clock,
    /// Woken on every change that may make a message available.
    changed: Notify,
    events: broadcast::Sender<QueueEvent>,
    barrier: Mutex<Option<CommitBarrier>>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY,
    lock_ms INTEGER NOT NULL,
    max_delivery_count INTEGER NOT NULL,
    duplicate_window_ms INTEGER
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    properties TEXT NOT NULL,
    enqueued_ms INTEGER NOT NULL,
    -- when the message can next be received: its scheduled time, or the end of its current lock
    available_ms INTEGER NOT NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    lock_token TEXT,
    state TEXT NOT NULL DEFAULT 'active',
    dead_letter_reason TEXT,
    dead_letter_description TEXT
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, state, available_ms, seq);
CREATE UNIQUE INDEX IF NOT EXISTS messages_lock ON messages (lock_token) WHERE lock_token IS NOT NULL;
-- every message ever enqueued, in order: what the live view, the report and tests read back
-- (written in the same transaction as the message, so it survives a restart with it)
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    enqueued_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS duplicates (
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (queue, message_id)
);
";

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn instant(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

pub fn valid_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 260
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
        && !name.starts_with('/')
        && !name.ends_with('/')
}

struct QueueSettings {
    lock_ms: i64,
    max_delivery_count: u32,
    duplicate_window_ms: Option<i64>,
}

impl Queue {
    /// Opens (creating when needed) the queue database under `state_dir`.
    pub fn open(state_dir: &Path, clock: Clock) -> Result<Queue, QueueError> {
        std::fs::create_dir_all(state_dir).map_err(|source| QueueError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let connection = Connection::open(state_dir.join(DATABASE_FILE))?;
        // WAL with synchronous=NORMAL survives a killed process (not a power cut) and is fast.
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.busy_timeout(Duration::from_secs(5))?;
        connection.execute_batch(SCHEMA)?;
        let (events, _) = broadcast::channel(1024);
        Ok(Queue {
            inner: Arc::new(Inner {
                connection: Mutex::new(connection),
                clock,
                changed: Notify::new(),
                events,
                barrier: Mutex::new(None),
            }),
        })
    }

    pub fn clock(&self) -> Clock {
        self.inner.clock
    }

    pub fn subscribe(&self) -> broadcast::Receiver<QueueEvent> {
        self.inner.events.subscribe()
    }

    /// Installs the barrier every later send and completion runs first (see [`CommitBarrier`]).
    pub fn set_commit_barrier(&self, barrier: CommitBarrier) {
        *self
            .inner
            .barrier
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(barrier);
    }

    fn run_barrier(&self) -> Result<(), QueueError> {
        let barrier = self
            .inner
            .barrier
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        match barrier {
            Some(barrier) => barrier().map_err(QueueError::Barrier),
            None => Ok(()),
        }
    }

    fn connection(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll back),
        // so a poisoned lock is safe to reuse.
        self.inner
            .connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now_ms(&self) -> i64 {
        self.inner.clock.now().timestamp_millis()
    }

    fn emit(&self, event: QueueEvent) {
        // Nobody listening is fine.
        let _ = self.inner.events.send(event);
    }

    /// Creates the queue, or updates its options when it exists.
    pub fn create_queue(&self, name: &str, options: &QueueOptions) -> Result<(), QueueError> {
        if !valid_queue_name(name) {
            return Err(QueueError::InvalidName(name.to_string()));
        }
        self.connection().execute(
            "INSERT INTO queues (name, lock_ms, max_delivery_count, duplicate_window_ms)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET lock_ms = ?2, max_delivery_count = ?3, duplicate_window_ms = ?4",
            params![
                name,
                millis(options.lock_duration).max(1),
                options.max_delivery_count.max(1),
                options.duplicate_detection_window.map(millis)
            ],
        )?;
        Ok(())
    }

    pub fn queue_names(&self) -> Result<Vec<String>, QueueError> {
        let connection = self.connection();
        let mut statement = connection.prepare("SELECT name FROM queues ORDER BY name")?;
        let names = statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(names)
    }

    pub fn queue_exists(&self, name: &str) -> Result<bool, QueueError> {
        let connection = self.connection();
        Ok(settings(&connection, name)?.is_some())
    }

    pub fn send(&self, queue: &str, message: &OutgoingMessage) -> Result<SendOutcome, QueueError> {
        let outcomes = self.send_batch(&[(queue.to_string(), message.clone())])?;
        Ok(outcomes[0])
    }

    /// Sends several messages, to one queue or several, in one transaction: all or none.
    pub fn send_batch(
        &self,
        messages: &[(String, OutgoingMessage)],
    ) -> Result<Vec<SendOutcome>, QueueError> {
        self.run_barrier()?;
        let now = self.now_ms();
        let (outcomes, enqueued) = {
            let mut connection = self.connection();
            let tx = connection.transaction()?;
            let result = insert_all(&tx, messages, now)?;
            tx.commit()?;
            result
        };
        self.after_enqueue(enqueued);
        Ok(outcomes)
    }

    fn after_enqueue(&self, enqueued: Vec<(String, String)>) {
        if !enqueued.is_empty() {
            self.inner.changed.notify_waiters();
        }
        for (queue, message_id) in enqueued {
            self.emit(QueueEvent::Enqueued { queue, message_id });
        }
    }

    /// Messages enqueued after journal position `after` (0 = from the start), oldest first.
    pub fn journal_since(&self, after: i64) -> Result<Vec<JournalEntry>, QueueError> {
        let connection = self.connection();
        let mut statement = connection.prepare(
            "SELECT seq, queue, message_id, body, enqueued_ms FROM journal WHERE seq > ?1 ORDER BY seq",
        )?;
        let entries = statement
            .query_map(params![after], |row| {
                Ok(JournalEntry {
                    position: row.get(0)?,
                    queue: row.get(1)?,
                    message_id: row.get(2)?,
                    body: row.get(3)?,
                    enqueued_at: instant(row.get(4)?),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(entries)
    }

    /// Whether a message with this id was ever enqueued on `queue` (the journal keeps every one).
    pub fn journal_has(&self, queue: &str, message_id: &str) -> Result<bool, QueueError> {
        let found: bool = self.connection().query_row(
            "SELECT EXISTS (SELECT 1 FROM journal WHERE queue = ?1 AND message_id = ?2)",
            params![queue, message_id],
            |row| row.get(0),
        )?;
        Ok(found)
    }

    /// Peek-lock: the next available message, locked for the queue's lock duration.
    pub fn receive(&self, queue: &str) -> Result<Option<ReceivedMessage>, QueueError> {
        self.take(queue, true)
    }

    /// Receive-and-delete: the next available message, removed from the queue.
    pub fn receive_and_delete(&self, queue: &str) -> Result<Option<ReceivedMessage>, QueueError> {
        self.take(queue, false)
    }

    fn take(&self, queue: &str, lock: bool) -> Result<Option<ReceivedMessage>, QueueError> {
        let now = self.now_ms();
        let mut dead_lettered = Vec::new();
        let received = {
            let mut connection = self.connection();
            let tx = connection.transaction()?;
            let settings =
                settings(&tx, queue)?.ok_or_else(|| QueueError::QueueNotFound(queue.into()))?;
            let received = loop {
                let row = tx
                    .query_row(
                        "SELECT seq, message_id, body, properties, enqueued_ms, delivery_count
                         FROM messages WHERE queue = ?1 AND state = 'active' AND available_ms <= ?2
                         ORDER BY seq LIMIT 1",
                        params![queue, now],
                        |row| {
                            Ok((
                                row.get::<_, i64>(0)?,
                                row.get::<_, String>(1)?,
                                row.get::<_, Vec<u8>>(2)?,
                                row.get::<_, String>(3)?,
                                row.get::<_, i64>(4)?,
                                row.get::<_, u32>(5)?,
                            ))
                        },
                    )
                    .optional()?;
                let Some((seq, message_id, body, properties, enqueued_ms, delivery_count)) = row
                else {
                    break None;
                };
                // A lock that expired on the last allowed delivery counts as a failed delivery.
                if delivery_count >= settings.max_delivery_count {
                    dead_letter_row(&tx, seq, MAX_DELIVERY_COUNT_EXCEEDED, None)?;
                    dead_lettered.push(message_id);
                    continue;
                }
                let properties: MessageProperties = serde_json::from_str(&properties)?;
                let delivery_count = delivery_count + 1;
                let (lock_token, locked_until) = if lock {
                    let token = uuid::Uuid::new_v4().to_string();
                    let until = now + settings.lock_ms;
                    tx.execute(
                        "UPDATE messages SET delivery_count = ?2, lock_token = ?3, available_ms = ?4
                         WHERE seq = ?1",
                        params![seq, delivery_count, token, until],
                    )?;
                    (token, until)
                } else {
                    tx.execute("DELETE FROM messages WHERE seq = ?1", params![seq])?;
                    (String::new(), now)
                };
                break Some(ReceivedMessage {
                    queue: queue.to_string(),
                    sequence_number: seq,
                    message_id,
                    lock_token,
                    locked_until: instant(locked_until),
                    delivery_count,
                    enqueued_time: instant(enqueued_ms),
                    body,
                    properties,
                });
            };
            tx.commit()?;
            received
        };
        for message_id in dead_lettered {
            self.emit(QueueEvent::DeadLettered {
                queue: queue.to_string(),
                message_id,
                reason: MAX_DELIVERY_COUNT_EXCEEDED.to_string(),
            });
        }
        Ok(received)
    }

    pub fn complete(&self, queue: &str, lock_token: &str) -> Result<(), QueueError> {
        self.complete_with_outputs(queue, lock_token, &[])
            .map(|_| ())
    }

    /// Completes the locked message and enqueues `outputs` in the same transaction.
    pub fn complete_with_outputs(
        &self,
        queue: &str,
        lock_token: &str,
        outputs: &[(String, OutgoingMessage)],
    ) -> Result<Vec<SendOutcome>, QueueError> {
        self.settle_with_outputs(queue, lock_token, outputs, false)
            .map(|(outcomes, _)| outcomes)
    }

    /// At-least-once delivery made real (a chaos option of the host): enqueues `outputs` as a
    /// completion would, but the message stays on the queue, unlocked, and is delivered again with
    /// the same `MessageId` and `DeliveryCount` + 1, as Service Bus does when the lock is lost after
    /// the handler ran and its output bindings were sent. On the last allowed delivery it completes
    /// instead (a redelivery would only dead-letter a message that was handled). Returns the
    /// outputs' outcomes and whether the message will be delivered again.
    pub fn redeliver_with_outputs(
        &self,
        queue: &str,
        lock_token: &str,
        outputs: &[(String, OutgoingMessage)],
    ) -> Result<(Vec<SendOutcome>, bool), QueueError> {
        self.settle_with_outputs(queue, lock_token, outputs, true)
    }

    fn settle_with_outputs(
        &self,
        queue: &str,
        lock_token: &str,
        outputs: &[(String, OutgoingMessage)],
        redeliver: bool,
    ) -> Result<(Vec<SendOutcome>, bool), QueueError> {
        self.run_barrier()?;
        let now = self.now_ms();
        let (outcomes, enqueued, redelivered) = {
            let mut connection = self.connection();
            let tx = connection.transaction()?;
            let (seq, _, delivery_count) = locked_row(&tx, queue, lock_token)?;
            let max_delivery_count = settings(&tx, queue)?
                .ok_or_else(|| QueueError::QueueNotFound(queue.into()))?
                .max_delivery_count;
            let redelivered = redeliver && delivery_count < max_delivery_count;
            if redelivered {
                tx.execute(
                    "UPDATE messages SET lock_token = NULL, available_ms = ?2 WHERE seq = ?1",
                    params![seq, now],
                )?;
            } else {
                tx.execute("DELETE FROM messages WHERE seq = ?1", params![seq])?;
            }
            let (outcomes, enqueued) = insert_all(&tx, outputs, now)?;
            tx.commit()?;
            (outcomes, enqueued, redelivered)
        };
        self.after_enqueue(enqueued);
        if redelivered {
            self.inner.changed.notify_waiters();
        }
        Ok((outcomes, redelivered))
    }

    /// Releases the lock; the message is delivered again, or dead-lettered when it has reached
    /// the queue's maximum delivery count.
    pub fn abandon(&self, queue: &str, lock_token: &str) -> Result<AbandonOutcome, QueueError> {
        let now = self.now_ms();
        let (outcome, message_id) = {
            let mut connection = self.connection();
            let tx = connection.transaction()?;
            let settings =
                settings(&tx, queue)?.ok_or_else(|| QueueError::QueueNotFound(queue.into()))?;
            let (seq, message_id, delivery_count) = locked_row(&tx, queue, lock_token)?;
            let outcome = if delivery_count >= settings.max_delivery_count {
                dead_letter_row(&tx, seq, MAX_DELIVERY_COUNT_EXCEEDED, None)?;
                AbandonOutcome::DeadLettered
            } else {
                tx.execute(
                    "UPDATE messages SET lock_token = NULL, available_ms = ?2 WHERE seq = ?1",
                    params![seq, now],
                )?;
                AbandonOutcome::Redelivery
            };
            tx.commit()?;
            (outcome, message_id)
        };
        match outcome {
            AbandonOutcome::Redelivery => self.inner.changed.notify_waiters(),
            AbandonOutcome::DeadLettered => self.emit(QueueEvent::DeadLettered {
                queue: queue.to_string(),
                message_id,
                reason: MAX_DELIVERY_COUNT_EXCEEDED.to_string(),
            }),
        }
        Ok(outcome)
    }

    /// Moves the locked message to the dead-letter queue with a reason.
    pub fn dead_letter(
        &self,
        queue: &str,
        lock_token: &str,
        reason: &str,
        description: Option<&str>,
    ) -> Result<(), QueueError> {
        let message_id = {
            let mut connection = self.connection();
            let tx = connection.transaction()?;
            let (seq, message_id, _) = locked_row(&tx, queue, lock_token)?;
            dead_letter_row(&tx, seq, reason, description)?;
            tx.commit()?;
            message_id
        };
        self.emit(QueueEvent::DeadLettered {
            queue: queue.to_string(),
            message_id,
            reason: reason.to_string(),
        });
        Ok(())
    }

    /// Extends the lock by the queue's lock duration from now; returns the new expiry.
    pub fn renew_lock(&self, queue: &str, lock_token: &str) -> Result<DateTime<Utc>, QueueError> {
        let now = self.now_ms();
        let connection = self.connection();
        let settings =
            settings(&connection, queue)?.ok_or_else(|| QueueError::QueueNotFound(queue.into()))?;
        let until = now + settings.lock_ms;
        let updated = connection.execute(
            "UPDATE messages SET available_ms = ?3
             WHERE queue = ?1 AND lock_token = ?2 AND state = 'active'",
            params![queue, lock_token, until],
        )?;
        if updated == 0 {
            return Err(QueueError::LockLost {
                queue: queue.to_string(),
            });
        }
        Ok(instant(until))
    }

    /// Messages in flight or scheduled, over all queues (dead-lettered ones excluded).
    pub fn active_count(&self) -> Result<u64, QueueError> {
        let count: i64 = self.connection().query_row(
            "SELECT COUNT(*) FROM messages WHERE state = 'active'",
            [],
            |row| row.get(0),
        )?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// Messages in flight or scheduled in one queue.
    pub fn active_count_in(&self, queue: &str) -> Result<u64, QueueError> {
        let count: i64 = self.connection().query_row(
            "SELECT COUNT(*) FROM messages WHERE queue = ?1 AND state = 'active'",
            params![queue],
            |row| row.get(0),
        )?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    pub fn dead_letter_count(&self) -> Result<u64, QueueError> {
        let count: i64 = self.connection().query_row(
            "SELECT COUNT(*) FROM messages WHERE state = 'deadlettered'",
            [],
            |row| row.get(0),
        )?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// The dead-letter queue of `queue`, oldest first.
    pub fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetteredMessage>, QueueError> {
        let connection = self.connection();
        let mut statement = connection.prepare(
            "SELECT seq, message_id, delivery_count, dead_letter_reason, dead_letter_description,
                    body, properties
             FROM messages WHERE queue = ?1 AND state = 'deadlettered' ORDER BY seq",
        )?;
        let rows = statement
            .query_map(params![queue], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, u32>(2)?,
                    row.get::<_, Option<String>>(3)?,
                    row.get::<_, Option<String>>(4)?,
                    row.get::<_, Vec<u8>>(5)?,
                    row.get::<_, String>(6)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(
                |(seq, message_id, delivery_count, reason, description, body, properties)| {
                    Ok(DeadLetteredMessage {
                        queue: queue.to_string(),
                        sequence_number: seq,
                        message_id,
                        delivery_count,
                        reason: reason.unwrap_or_default(),
                        description,
                        body,
                        properties: serde_json::from_str(&properties)?,
                    })
                },
            )
            .collect()
    }

    /// The earliest instant at which a message of `queue` that is not available now becomes
    /// available (a scheduled message or an expiring lock).
    pub fn next_available_at(&self, queue: &str) -> Result<Option<DateTime<Utc>>, QueueError> {
        let earliest: Option<i64> = self.connection().query_row(
            "SELECT MIN(available_ms) FROM messages WHERE queue = ?1 AND state = 'active'",
            params![queue],
            |row| row.get(0),
        )?;
        Ok(earliest.map(instant))
    }

    /// Waits until something may have become receivable on `queue`: a send or abandon, or the
    /// next scheduled time or lock expiry, but no longer than `max_wall` of wall time.
    pub async fn wait_for_change(&self, queue: &str, max_wall: Duration) {
        let notified = self.inner.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let wait = match self.next_available_at(queue) {
            Ok(Some(at)) => self.inner.clock.wall_until(at).min(max_wall),
            _ => max_wall,
        };
        if wait.is_zero() {
            return;
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn settings(connection: &Connection, queue: &str) -> Result<Option<QueueSettings>, QueueError> {
    Ok(connection
        .query_row(
            "SELECT lock_ms, max_delivery_count, duplicate_window_ms FROM queues WHERE name = ?1",
            params![queue],
            |row| {
                Ok(QueueSettings {
                    lock_ms: row.get(0)?,
                    max_delivery_count: row.get(1)?,
                    duplicate_window_ms: row.get(2)?,
                })
            },
        )
        .optional()?)
}

fn locked_row(
    tx: &Transaction<'_>,
    queue: &str,
    lock_token: &str,
) -> Result<(i64, String, u32), QueueError> {
    tx.query_row(
        "SELECT seq, message_id, delivery_count FROM messages
         WHERE queue = ?1 AND lock_token = ?2 AND state = 'active'",
        params![queue, lock_token],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
    )
    .optional()?
    .ok_or_else(|| QueueError::LockLost {
        queue: queue.to_string(),
    })
}

fn dead_letter_row(
    tx: &Transaction<'_>,
    seq: i64,
    reason: &str,
    description: Option<&str>,
) -> Result<(), QueueError> {
    tx.execute(
        "UPDATE messages SET state = 'deadlettered', lock_token = NULL,
             dead_letter_reason = ?2, dead_letter_description = ?3
         WHERE seq = ?1",
        params![seq, reason, description],
    )?;
    Ok(())
}

/// Inserts messages inside the caller's transaction; returns the outcomes and the
/// `(queue, message id)` of those actually enqueued.
#[allow(clippy::type_complexity)]
fn insert_all(
    tx: &Transaction<'_>,
    messages: &[(String, OutgoingMessage)],
    now: i64,
) -> Result<(Vec<SendOutcome>, Vec<(String, String)>), QueueError> {
    let mut outcomes = Vec::with_capacity(messages.len());
    let mut enqueued = Vec::new();
    for (queue, message) in messages {
        let settings =
            settings(tx, queue)?.ok_or_else(|| QueueError::QueueNotFound(queue.into()))?;
        let message_id = message
            .properties
            .message_id
            .clone()
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        if let Some(window) = settings.duplicate_window_ms {
            let seen = tx
                .query_row(
                    "SELECT expires_ms FROM duplicates WHERE queue = ?1 AND message_id = ?2",
                    params![queue, message_id],
                    |row| row.get::<_, i64>(0),
                )
                .optional()?;
            if seen.is_some_and(|expires| expires > now) {
                outcomes.push(SendOutcome::Duplicate);
                continue;
            }
            tx.execute(
                "DELETE FROM duplicates WHERE queue = ?1 AND expires_ms <= ?2",
                params![queue, now],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO duplicates (queue, message_id, expires_ms) VALUES (?1, ?2, ?3)",
                params![queue, message_id, now.saturating_add(window)],
            )?;
        }
        let mut properties = message.properties.clone();
        properties.message_id = Some(message_id.clone());
        let available = properties
            .scheduled_enqueue_time_utc
            .map(|at| at.timestamp_millis())
            .unwrap_or(now);
        tx.execute(
            "INSERT INTO messages (queue, message_id, body, properties, enqueued_ms, available_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                queue,
                message_id,
                message.body,
                serde_json::to_string(&properties)?,
                now,
                available
            ],
        )?;
        let sequence_number = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO journal (queue, message_id, body, enqueued_ms) VALUES (?1, ?2, ?3, ?4)",
            params![queue, message_id, message.body, now],
        )?;
        outcomes.push(SendOutcome::Enqueued { sequence_number });
        enqueued.push((queue.clone(), message_id));
    }
    Ok((outcomes, enqueued))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_state() -> PathBuf {
        std::env::temp_dir().join(format!("vmbackup-queue-{}", uuid::Uuid::new_v4()))
    }

    fn open_with(dir: &Path, options: &QueueOptions) -> Queue {
        let queue = Queue::open(dir, Clock::real()).unwrap();
        for name in ["in", "out-a", "out-b"] {
            queue.create_queue(name, options).unwrap();
        }
        queue
    }

    fn with_id(body: &str, id: &str) -> OutgoingMessage {
        let mut message = OutgoingMessage::new(body);
        message.properties.message_id = Some(id.to_string());
        message
    }

    #[test]
    fn peek_lock_complete_and_properties_round_trip() {
        let dir = temp_state();
        let queue = open_with(&dir, &QueueOptions::default());
        let mut message = with_id("{\"a\":1}", "m-1");
        message.properties.correlation_id = Some("corr".into());
        message.properties.subject = Some("vmbackup.protection.requested".into());
        message.properties.content_type = Some("application/json".into());
        message
            .properties
            .application_properties
            .insert("tenant".into(), Value::from("a"));
        queue.send("in", &message).unwrap();
        let got = queue.receive("in").unwrap().unwrap();
        assert_eq!(got.delivery_count, 1);
        assert_eq!(got.message_id, "m-1");
        assert_eq!(got.body, b"{\"a\":1}");
        assert_eq!(got.properties.correlation_id.as_deref(), Some("corr"));
        assert_eq!(got.properties.application_properties["tenant"], "a");
        // Locked: not delivered twice.
        assert!(queue.receive("in").unwrap().is_none());
        assert_eq!(queue.active_count().unwrap(), 1);
        queue.complete("in", &got.lock_token).unwrap();
        assert_eq!(queue.active_count().unwrap(), 0);
        assert!(matches!(
            queue.complete("in", &got.lock_token),
            Err(QueueError::LockLost { .. })
        ));
        assert!(matches!(
            queue.send("missing", &message),
            Err(QueueError::QueueNotFound(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn abandon_counts_deliveries_and_dead_letters_after_ten() {
        let dir = temp_state();
        let queue = open_with(&dir, &QueueOptions::default());
        let mut events = queue.subscribe();
        queue.send("in", &with_id("bad", "poison")).unwrap();
        for attempt in 1..=10 {
            let got = queue.receive("in").unwrap().unwrap();
            assert_eq!(got.delivery_count, attempt);
            let outcome = queue.abandon("in", &got.lock_token).unwrap();
            let expected = if attempt < 10 {
                AbandonOutcome::Redelivery
            } else {
                AbandonOutcome::DeadLettered
            };
            assert_eq!(outcome, expected);
        }
        assert!(queue.receive("in").unwrap().is_none());
        assert_eq!(queue.active_count().unwrap(), 0);
        let dead = queue.dead_letters("in").unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].reason, MAX_DELIVERY_COUNT_EXCEEDED);
        assert_eq!(dead[0].delivery_count, 10);
        let mut saw_dead_letter = false;
        while let Ok(event) = events.try_recv() {
            saw_dead_letter |= matches!(event, QueueEvent::DeadLettered { ref message_id, .. } if message_id == "poison");
        }
        assert!(saw_dead_letter);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn explicit_dead_letter_keeps_reason_and_description() {
        let dir = temp_state();
        let queue = open_with(&dir, &QueueOptions::default());
        queue.send("in", &with_id("x", "m")).unwrap();
        let got = queue.receive("in").unwrap().unwrap();
        queue
            .dead_letter(
                "in",
                &got.lock_token,
                "InvalidRequest",
                Some("vm is missing"),
            )
            .unwrap();
        let dead = queue.dead_letters("in").unwrap();
        assert_eq!(dead[0].reason, "InvalidRequest");
        assert_eq!(dead[0].description.as_deref(), Some("vm is missing"));
        assert_eq!(queue.dead_letter_count().unwrap(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn expired_lock_returns_the_message_and_renewal_keeps_it() {
        let dir = temp_state();
        let options = QueueOptions {
            lock_duration: Duration::from_millis(100),
            ..QueueOptions::default()
        };
        let queue = open_with(&dir, &options);
        queue.send("in", &with_id("x", "m")).unwrap();
        let first = queue.receive("in").unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(150));
        let second = queue.receive("in").unwrap().unwrap();
        assert_eq!(second.message_id, "m");
        assert_eq!(second.delivery_count, 2);
        // The first receiver's lock is gone.
        assert!(matches!(
            queue.complete("in", &first.lock_token),
            Err(QueueError::LockLost { .. })
        ));
        let renewed = queue.renew_lock("in", &second.lock_token).unwrap();
        assert!(renewed >= second.locked_until);
        queue.complete("in", &second.lock_token).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_lock_that_expires_on_the_last_delivery_dead_letters() {
        let dir = temp_state();
        let options = QueueOptions {
            lock_duration: Duration::from_millis(20),
            max_delivery_count: 2,
            ..QueueOptions::default()
        };
        let queue = open_with(&dir, &options);
        queue.send("in", &with_id("x", "m")).unwrap();
        for _ in 0..2 {
            assert!(queue.receive("in").unwrap().is_some());
            std::thread::sleep(Duration::from_millis(40));
        }
        assert!(queue.receive("in").unwrap().is_none());
        assert_eq!(
            queue.dead_letters("in").unwrap()[0].reason,
            MAX_DELIVERY_COUNT_EXCEEDED
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn scheduled_messages_wait_for_their_time() {
        let dir = temp_state();
        let queue = open_with(&dir, &QueueOptions::default());
        let mut message = with_id("later", "s");
        let at = Utc::now() + chrono::Duration::milliseconds(150);
        message.properties.scheduled_enqueue_time_utc = Some(at);
        queue.send("in", &message).unwrap();
        assert!(queue.receive("in").unwrap().is_none());
        assert_eq!(
            queue.active_count().unwrap(),
            1,
            "scheduled counts as pending"
        );
        assert_eq!(
            queue
                .next_available_at("in")
                .unwrap()
                .map(|t| t.timestamp_millis()),
            Some(at.timestamp_millis())
        );
        while Utc::now() < at {
            std::thread::sleep(Duration::from_millis(20));
        }
        let got = queue.receive("in").unwrap().unwrap();
        assert_eq!(got.body, b"later");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn duplicates_within_the_window_are_dropped() {
        let dir = temp_state();
        let queue = open_with(&dir, &QueueOptions::default());
        assert!(matches!(
            queue.send("in", &with_id("1", "same")).unwrap(),
            SendOutcome::Enqueued { .. }
        ));
        assert_eq!(
            queue.send("in", &with_id("2", "same")).unwrap(),
            SendOutcome::Duplicate
        );
        // Still a duplicate after the first was consumed: detection is by history, not presence.
        let got = queue.receive("in").unwrap().unwrap();
        queue.complete("in", &got.lock_token).unwrap();
        assert_eq!(
            queue.send("in", &with_id("3", "same")).unwrap(),
            SendOutcome::Duplicate
        );
        // Other queues have their own history; without an id every message is new.
        assert!(matches!(
            queue.send("out-a", &with_id("1", "same")).unwrap(),
            SendOutcome::Enqueued { .. }
        ));
        queue.send("in", &OutgoingMessage::new("a")).unwrap();
        queue.send("in", &OutgoingMessage::new("a")).unwrap();
        assert_eq!(queue.active_count_in("in").unwrap(), 2);

        // A short window expires.
        let short = QueueOptions {
            duplicate_detection_window: Some(Duration::from_millis(50)),
            ..QueueOptions::default()
        };
        queue.create_queue("short", &short).unwrap();
        queue.send("short", &with_id("1", "x")).unwrap();
        std::thread::sleep(Duration::from_millis(80));
        assert!(matches!(
            queue.send("short", &with_id("2", "x")).unwrap(),
            SendOutcome::Enqueued { .. }
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn complete_with_outputs_is_atomic_across_a_crash() {
        let dir = temp_state();
        {
            let queue = open_with(&dir, &QueueOptions::default());
            queue.send("in", &with_id("trigger", "t")).unwrap();
            let got = queue.receive("in").unwrap().unwrap();
            // An output to a queue that does not exist fails half-way through the transaction:
            // the first output was already inserted, and must vanish with the rollback.
            let outputs = vec![
                ("out-a".to_string(), with_id("first", "o1")),
                ("no-such-queue".to_string(), with_id("second", "o2")),
            ];
            assert!(queue
                .complete_with_outputs("in", &got.lock_token, &outputs)
                .is_err());
            assert_eq!(queue.active_count_in("out-a").unwrap(), 0);
            // The process dies here, holding the lock: drop everything without completing.
        }
        {
            let queue = Queue::open(&dir, Clock::real()).unwrap();
            assert_eq!(queue.active_count_in("out-a").unwrap(), 0);
            assert_eq!(queue.active_count_in("in").unwrap(), 1, "trigger not lost");
        }
        // The crashed holder's 60 s lock expires.
        {
            let connection = Connection::open(dir.join(DATABASE_FILE)).unwrap();
            connection
                .execute(
                    "UPDATE messages SET available_ms = 0 WHERE queue = 'in'",
                    [],
                )
                .unwrap();
        }
        {
            let queue = Queue::open(&dir, Clock::real()).unwrap();
            let got = queue.receive("in").unwrap().unwrap();
            assert_eq!(got.delivery_count, 2);
            let outputs = vec![
                ("out-a".to_string(), with_id("first", "o1")),
                ("out-b".to_string(), with_id("second", "o2")),
            ];
            queue
                .complete_with_outputs("in", &got.lock_token, &outputs)
                .unwrap();
        }
        let queue = Queue::open(&dir, Clock::real()).unwrap();
        assert_eq!(queue.active_count_in("in").unwrap(), 0);
        assert_eq!(queue.active_count_in("out-a").unwrap(), 1);
        assert_eq!(queue.active_count_in("out-b").unwrap(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_redelivered_message_keeps_its_id_after_its_outputs_were_sent() {
        let dir = temp_state();
        let options = QueueOptions {
            max_delivery_count: 3,
            ..QueueOptions::default()
        };
        let queue = open_with(&dir, &options);
        queue.send("in", &with_id("trigger", "t")).unwrap();
        let first = queue.receive("in").unwrap().unwrap();
        let (outcomes, redelivered) = queue
            .redeliver_with_outputs(
                "in",
                &first.lock_token,
                &[("out-a".into(), with_id("o", "o1"))],
            )
            .unwrap();
        assert!(redelivered);
        assert!(matches!(outcomes[..], [SendOutcome::Enqueued { .. }]));
        assert_eq!(queue.active_count_in("out-a").unwrap(), 1, "outputs sent");
        // The old lock is gone: the handler's completion would fail as with a lost lock.
        assert!(matches!(
            queue.complete("in", &first.lock_token),
            Err(QueueError::LockLost { .. })
        ));
        let second = queue.receive("in").unwrap().unwrap();
        assert_eq!(second.message_id, "t");
        assert_eq!(second.sequence_number, first.sequence_number);
        assert_eq!(second.delivery_count, 2);
        queue.abandon("in", &second.lock_token).unwrap();
        // The last allowed delivery completes rather than dead-letter a handled message.
        let third = queue.receive("in").unwrap().unwrap();
        assert_eq!(third.delivery_count, 3);
        let (_, redelivered) = queue
            .redeliver_with_outputs("in", &third.lock_token, &[])
            .unwrap();
        assert!(!redelivered);
        assert_eq!(queue.active_count_in("in").unwrap(), 0);
        assert_eq!(queue.dead_letter_count().unwrap(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn queue_names_are_validated() {
        assert!(valid_queue_name("vm-events"));
        assert!(valid_queue_name("a.b_c/d"));
        assert!(!valid_queue_name(""));
        assert!(!valid_queue_name("has space"));
        assert!(!valid_queue_name("/lead"));
    }

    #[tokio::test]
    async fn wait_for_change_wakes_on_send() {
        let dir = temp_state();
        let queue = open_with(&dir, &QueueOptions::default());
        let sender = queue.clone();
        let waiter = tokio::spawn(async move {
            queue.wait_for_change("in", Duration::from_secs(30)).await;
            queue.receive("in").unwrap()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        sender.send("in", &with_id("x", "wake")).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.unwrap().message_id, "wake");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
