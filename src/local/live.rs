//! What a person watches while a local run plays: one line per invocation as it finishes
//! (simulated time, function, VM, outcome), timeline actions and dead letters, and on a terminal an
//! `indicatif` bar of the Azure Backup jobs started and finished. Plain lines when stdout is not a
//! terminal.

use super::host::{HostEvent, Outcome};
use super::queue::Queue;
use crate::clock::Clock;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::io::IsTerminal;
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

/// Prints above the progress bar (or plainly).
#[derive(Clone)]
pub struct Printer {
    bar: Option<ProgressBar>,
    clock: Clock,
}

impl Printer {
    /// A bar on a terminal, plain lines otherwise.
    pub fn for_stdout(clock: Clock) -> Printer {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stdout());
            if let Ok(style) =
                ProgressStyle::with_template("{spinner} {msg:40} [{bar:30}] {pos}/{len} jobs done")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Printer { bar, clock }
    }

    /// A line stamped with the simulated time.
    pub fn line(&self, text: &str) {
        let stamped = format!("{}  {text}", self.clock.now().format("%H:%M:%S"));
        match &self.bar {
            Some(bar) => bar.println(stamped),
            None => println!("{stamped}"),
        }
    }

    fn progress(&self, started: usize, finished: usize, in_flight: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(started as u64);
            bar.set_position(finished.min(started) as u64);
            bar.set_message(format!(
                "sim {} · {in_flight} invocations running",
                self.clock.now().format("%H:%M")
            ));
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// What the journal says about messages (to name a VM in a line) and jobs (for the bar).
#[derive(Default)]
struct JournalView {
    position: i64,
    /// Message id → short VM name.
    vm_of_message: HashMap<String, String>,
    jobs_started: BTreeSet<String>,
    jobs_finished: BTreeSet<String>,
}

impl JournalView {
    fn catch_up(&mut self, queue: &Queue) {
        let Ok(entries) = queue.journal_since(self.position) else {
            return;
        };
        for entry in entries {
            self.position = entry.position;
            let Ok(event) = serde_json::from_slice::<Value>(&entry.body) else {
                continue;
            };
            let data = &event["data"];
            let vm = data["vmId"]
                .as_str()
                .or_else(|| event["subject"].as_str())
                .map(|id| id.rsplit('/').next().unwrap_or(id).to_string());
            if let Some(vm) = vm {
                self.vm_of_message.insert(entry.message_id.clone(), vm);
            }
            let job = data["jobId"].as_str().map(str::to_string);
            match (event["type"].as_str().unwrap_or_default(), job) {
                ("vmbackup.job.started", Some(job)) => {
                    self.jobs_started.insert(job);
                }
                (
                    "vmbackup.backup.completed"
                    | "vmbackup.backup.failed"
                    | "vmbackup.restore.disks-restored"
                    | "vmbackup.restore.failed",
                    Some(job),
                ) => {
                    self.jobs_finished.insert(job);
                }
                _ => {}
            }
        }
    }
}

pub struct LiveView {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl LiveView {
    pub fn spawn(
        mut events: broadcast::Receiver<HostEvent>,
        queue: Queue,
        printer: Printer,
        in_flight: impl Fn() -> usize + Send + 'static,
    ) -> LiveView {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut journal = JournalView::default();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    _ = tick.tick() => {
                        journal.catch_up(&queue);
                        printer.progress(journal.jobs_started.len(), journal.jobs_finished.len(), in_flight());
                    }
                    event = events.recv() => match event {
                        Ok(event) => {
                            if let Some(line) = describe(&event, &mut journal, &queue) {
                                printer.line(&line);
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            printer.line(&format!("… {missed} events not shown"));
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    }
                }
            }
            journal.catch_up(&queue);
            printer.progress(journal.jobs_started.len(), journal.jobs_finished.len(), 0);
        });
        LiveView { stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn describe(event: &HostEvent, journal: &mut JournalView, queue: &Queue) -> Option<String> {
    match event {
        HostEvent::InvocationFinished {
            function,
            message_id,
            outcome,
            messages_out,
            ..
        } => {
            let vm = match message_id {
                Some(id) => {
                    if !journal.vm_of_message.contains_key(id) {
                        journal.catch_up(queue);
                    }
                    journal
                        .vm_of_message
                        .get(id)
                        .cloned()
                        .unwrap_or_else(|| "?".into())
                }
                None => "-".into(),
            };
            let outcome = match outcome {
                Outcome::Succeeded if *messages_out == 0 => "ok".to_string(),
                Outcome::Succeeded => format!("ok, {messages_out} event(s) out"),
                Outcome::Failed { reason } => format!("failed (will retry): {reason}"),
                Outcome::LockLost => "lock lost (will be delivered again)".to_string(),
            };
            Some(format!("{function:<26} {vm:<28} {outcome}"))
        }
        HostEvent::DeadLettered {
            queue,
            message_id,
            reason,
        } => Some(format!(
            "{:<26} {message_id:<28} dead-lettered: {reason}",
            format!("[{queue}]")
        )),
        HostEvent::HandlerExited { status } => {
            Some(format!("handler exited ({status}); restarting"))
        }
        HostEvent::HandlerFailedToStart { reason } => {
            Some(format!("handler failed to start: {reason}"))
        }
        _ => None,
    }
}
