//! Audit events and their sinks: JSON lines on standard output and/or appended to a file.
//!
//! Events go through a bounded queue to one writer task. A full queue makes emitters wait
//! (back-pressure) rather than drop events, and [`Audit::flush`] returns only once every
//! event queued before it is written and flushed, which shutdown relies on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
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
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|source| AuditError {
                        path: path.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        let (tx, rx) = mpsc::channel(config.queue);
        tokio::spawn(write_events(rx, config.stdout, file, metrics));
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

async fn write_events(
    mut rx: mpsc::Receiver<Msg>,
    stdout: bool,
    file: Option<tokio::fs::File>,
    metrics: Arc<Metrics>,
) {
    let mut out = stdout.then(|| tokio::io::BufWriter::new(tokio::io::stdout()));
    let mut file = file.map(tokio::io::BufWriter::new);
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Event(event) => {
                let mut line = match serde_json::to_vec(&*event) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(cause = %e, "cannot encode an audit event");
                        continue;
                    }
                };
                line.push(b'\n');
                let mut written = true;
                if let Some(o) = &mut out {
                    if let Err(e) = o.write_all(&line).await {
                        tracing::error!(cause = %e, "cannot write an audit event to stdout");
                        written = false;
                    }
                }
                if let Some(f) = &mut file {
                    if let Err(e) = f.write_all(&line).await {
                        tracing::error!(cause = %e, "cannot write an audit event to the audit file");
                        written = false;
                    }
                }
                // Counted only when every sink took it; failures are in the log.
                if written {
                    metrics.audit_events.inc();
                }
                // Flush whenever the queue runs dry, so events do not sit in a buffer.
                if rx.is_empty() {
                    flush(&mut out, &mut file).await;
                }
            }
            Msg::Flush(done) => {
                flush(&mut out, &mut file).await;
                let _ = done.send(());
            }
            Msg::Close(done) => {
                flush(&mut out, &mut file).await;
                let _ = done.send(());
                return;
            }
        }
    }
    flush(&mut out, &mut file).await;
}

async fn flush(
    out: &mut Option<tokio::io::BufWriter<tokio::io::Stdout>>,
    file: &mut Option<tokio::io::BufWriter<tokio::fs::File>>,
) {
    if let Some(o) = out {
        if let Err(e) = o.flush().await {
            tracing::error!(cause = %e, "cannot flush audit events to stdout");
        }
    }
    if let Some(f) = file {
        if let Err(e) = f.flush().await {
            tracing::error!(cause = %e, "cannot flush the audit file");
        }
    }
}
