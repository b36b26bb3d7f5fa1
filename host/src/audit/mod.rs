//! Audit events and their sinks: JSON lines on standard output and/or appended to a file.
//!
//! Events go through a bounded queue to one writer thread. A full queue makes emitters wait
//! (back-pressure) rather than drop events, and [`Audit::flush`] returns only once every
//! event queued before it is written and flushed, which shutdown relies on.
//!
//! The writer is an OS thread with blocking writes rather than an async task: an async file
//! write hops to the blocking pool for every flush, which under load cost a context switch
//! per request. The thread writes everything queued at once, in one `write`, as soon as the
//! queue runs dry, then lingers for [`LINGER`] before it looks again: under load the events
//! of a few milliseconds share one write and one wake-up of the thread (waking it for every
//! event cost a context switch per request and preempted the runtime's workers), and an
//! event never waits more than [`LINGER`] to be written.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use std::io::Write;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::admin::Metrics;
use crate::config::AuditConfig;

/// One audit event as written: the plugin's kind and attributes plus the host's context.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditEvent {
    /// RFC 3339 UTC timestamp, set by the host.
    pub ts: String,
    /// The plugin that emitted it.
    pub plugin: String,
    /// The request it concerns.
    pub request_id: String,
    /// The tunnel.
    pub tunnel: String,
    /// The public hostname of the request.
    pub hostname: String,
    /// The plugin's event kind.
    pub kind: String,
    /// The plugin's attributes.
    pub attributes: BTreeMap<String, String>,
}

impl AuditEvent {
    /// Stamps a plugin's event with the current time and the request's context.
    pub fn new(
        plugin: &str,
        request_id: &str,
        tunnel: &str,
        hostname: &str,
        kind: String,
        attributes: Vec<(String, String)>,
    ) -> Self {
        AuditEvent {
            ts: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            plugin: plugin.to_string(),
            request_id: request_id.to_string(),
            tunnel: tunnel.to_string(),
            hostname: hostname.to_string(),
            kind,
            attributes: attributes.into_iter().collect(),
        }
    }
}

/// Why the audit sinks could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the audit file {path}: {source}")]
pub struct AuditError {
    path: PathBuf,
    source: std::io::Error,
}

enum Msg {
    Event(Box<AuditEvent>),
    Flush(oneshot::Sender<()>),
    /// Flush, then stop: events sent later are lost (and logged as such).
    Close(oneshot::Sender<()>),
}

/// Handle to the audit writer. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct Audit {
    tx: Option<mpsc::Sender<Msg>>,
}

impl Audit {
    /// Opens the configured sinks and starts the writer task. With no sink configured,
    /// events are discarded (and nothing is started).
    pub async fn start(config: &AuditConfig, metrics: Arc<Metrics>) -> Result<Audit, AuditError> {
        if !config.stdout && config.file.is_none() {
            return Ok(Audit { tx: None });
        }
        let file = match &config.file {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AuditError {
                        path: path.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        let (tx, rx) = mpsc::channel(config.queue);
        let sinks = Sinks {
            stdout: config.stdout.then(std::io::stdout),
            file,
        };
        std::thread::Builder::new()
            .name("sluice-audit".into())
            .spawn(move || write_events(rx, sinks, metrics))
            .map_err(|source| AuditError {
                path: config.file.clone().unwrap_or_else(|| "stdout".into()),
                source,
            })?;
        Ok(Audit { tx: Some(tx) })
    }

    /// An audit handle that discards everything.
    pub fn disabled() -> Audit {
        Audit { tx: None }
    }

    /// Queues an event, waiting while the queue is full.
    pub async fn emit(&self, event: AuditEvent) {
        if let Some(tx) = &self.tx {
            if tx.send(Msg::Event(Box::new(event))).await.is_err() {
                tracing::error!("audit writer is gone; event lost");
            }
        }
    }

    /// Waits until every event queued so far is written and flushed.
    pub async fn flush(&self) {
        self.request(Msg::Flush).await
    }

    /// Writes every event queued so far, then stops the writer (at shutdown, once nothing
    /// can emit any more).
    pub async fn close(&self) {
        self.request(Msg::Close).await
    }

    async fn request(&self, msg: fn(oneshot::Sender<()>) -> Msg) {
        if let Some(tx) = &self.tx {
            let (done, wait) = oneshot::channel();
            if tx.send(msg(done)).await.is_ok() {
                let _ = wait.await;
            }
        }
    }
}

/// Where events go.
struct Sinks {
    stdout: Option<std::io::Stdout>,
    file: Option<std::fs::File>,
}

impl Sinks {
    /// Writes `batch` (whole lines) to every sink; false if a sink refused it (logged).
    fn write(&mut self, batch: &[u8]) -> bool {
        let mut written = true;
        if let Some(o) = &mut self.stdout {
            if let Err(e) = o.write_all(batch).and_then(|()| o.flush()) {
                tracing::error!(cause = %e, "cannot write audit events to stdout");
                written = false;
            }
        }
        if let Some(f) = &mut self.file {
            if let Err(e) = f.write_all(batch) {
                tracing::error!(cause = %e, "cannot write audit events to the audit file");
                written = false;
            }
        }
        written
    }
}

/// How long the writer rests after a write before it takes the next batch.
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// The writer thread: takes every message queued, writes the events among them in one batch,
/// then answers the flushes and closes among them, in order.
fn write_events(mut rx: mpsc::Receiver<Msg>, mut sinks: Sinks, metrics: Arc<Metrics>) {
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut events = 0u64;
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Event(event) => match serde_json::to_writer(&mut batch, &*event) {
                    Ok(()) => {
                        batch.push(b'\n');
                        events += 1;
                    }
                    Err(e) => tracing::error!(cause = %e, "cannot encode an audit event"),
                },
                Msg::Flush(done) => {
                    write_batch(&mut sinks, &mut batch, &mut events, &metrics);
                    let _ = done.send(());
                }
                Msg::Close(done) => {
                    write_batch(&mut sinks, &mut batch, &mut events, &metrics);
                    let _ = done.send(());
                    return;
                }
            }
            // Everything already queued joins this batch; a large backlog is cut in pieces.
            if batch.len() < 1 << 20 {
                next = rx.try_recv().ok();
            }
        }
        write_batch(&mut sinks, &mut batch, &mut events, &metrics);
        std::thread::sleep(LINGER);
    }
    write_batch(&mut sinks, &mut batch, &mut events, &metrics);
}

fn write_batch(sinks: &mut Sinks, batch: &mut Vec<u8>, events: &mut u64, metrics: &Metrics) {
    if batch.is_empty() {
        return;
    }
    // Counted only when every sink took them; failures are in the log.
    if sinks.write(batch) {
        metrics.audit_events.inc_by(*events);
    }
    batch.clear();
    *events = 0;
}
