//! Body hooks (`on-request-body`, `on-response-body`): a body streamed through the plugins of
//! a chain that implement them, piece by piece.
//!
//! The filter runs on a task of its own between the body's source and its reader (the origin
//! connection for a request, the relay to the edge for a response), joined by a small channel:
//! back-pressure carries through, and the reader never runs plugin code in its poll. Each
//! plugin's held-back bytes are kept here, bounded by its `body-buffer`. A plugin that answers
//! "not implemented" is passed through from then on (and, being marked so on the plugin, is
//! never part of a later request's filter: a chain whose plugins do not implement body hooks
//! has no filter, and its body path is as without plugins).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::{mpsc, oneshot};

use super::chain::{emit, on_failure, AuditContext, Refused};
use crate::plugin::bindings::sluice::plugin::types::BodyAction;
use crate::plugin::{decision, Held, Plugin, RequestView};
use crate::relay::{BoxError, HttpBody};

/// Why a body was stopped.
#[derive(Debug)]
pub enum Stop {
    /// A plugin rejected it with this response (status, headers, body, plugin).
    Respond(StatusCode, HeaderMap, Bytes, String),
    /// A plugin failed and its policy is fail-closed.
    Failed(Refused),
}

/// One plugin's place in the filter.
pub struct Stage {
    plugin: Arc<Plugin>,
    view: Arc<RequestView>,
    held: Held,
    kept: BytesMut,
    live: bool,
}

impl Stage {
    /// `plugin` seeing the request's `view` through its grants (see `SharedView`).
    pub fn new(plugin: Arc<Plugin>, view: Arc<RequestView>) -> Stage {
        Stage {
            plugin,
            view,
            held: Held::default(),
            kept: BytesMut::new(),
            live: true,
        }
    }
}

/// The plugins a body goes through, in order.
pub struct BodyFilter {
    stages: Vec<Stage>,
    /// `None` for a request body; the client's status for a response body.
    status: Option<u16>,
    context: AuditContext,
}

impl BodyFilter {
    /// A filter of `stages` (in the order the body meets them).
    pub fn new(stages: Vec<Stage>, status: Option<u16>, context: AuditContext) -> Self {
        BodyFilter {
            stages,
            status,
            context,
        }
    }

    /// Starts filtering `body` on a task of its own: returns the filtered body, which fails
    /// if a plugin stops it, and the stop's reason.
    pub fn spawn(mut self, mut body: HttpBody) -> (HttpBody, oneshot::Receiver<Stop>) {
        let (tx, rx) = mpsc::channel::<Result<http_body::Frame<Bytes>, BoxError>>(2);
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(async move {
            loop {
                // Trailers end the body for the hooks, and follow what they let through.
                let mut trailers = None;
                // A reader that went away ends the filter at once, not at its next piece.
                let frame = tokio::select! {
                    f = body.frame() => f,
                    _ = tx.closed() => return,
                };
                let (chunk, end) = match frame {
                    None => (Bytes::new(), true),
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) if data.is_empty() => continue,
                        Ok(data) => (data, false),
                        Err(frame) => {
                            trailers = frame.into_trailers().ok();
                            (Bytes::new(), true)
                        }
                    },
                    Some(Err(e)) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                match self.run(chunk, end).await {
                    Ok(out) => {
                        let out = (!out.is_empty()).then(|| http_body::Frame::data(out));
                        let last = trailers.map(http_body::Frame::trailers);
                        for frame in out.into_iter().chain(last) {
                            if tx.send(Ok(frame)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(stop) => {
                        let _ = stop_tx.send(stop);
                        let _ = tx
                            .send(Err("the body was stopped by a plugin".into()))
                            .await;
                        return;
                    }
                }
                if end {
                    return;
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let item = rx.recv().await?;
            Some((item, rx))
        });
        (http_body_util::StreamBody::new(stream).boxed(), stop_rx)
    }

    /// Takes one piece (or the end) through every stage; what comes out the other side.
    async fn run(&mut self, chunk: Bytes, end: bool) -> Result<Bytes, Stop> {
        let mut data = chunk;
        for stage in &mut self.stages {
            if !stage.live || (data.is_empty() && stage.kept.is_empty() && !end) {
                data = flush(stage, data);
                continue;
            }
            let mut input = std::mem::take(&mut stage.kept);
            input.extend_from_slice(&data);
            let input = input.freeze();
            let called = stage
                .plugin
                .on_body(
                    &mut stage.held,
                    stage.view.clone(),
                    self.status,
                    input.to_vec(),
                    end,
                )
                .await;
            emit(
                &self.context,
                &stage.view,
                stage.plugin.name(),
                called.events,
            )
            .await;
            let (req_hook, resp_hook) = stage.plugin.body_hooks();
            let implemented = match self.status {
                None => req_hook,
                Some(_) => resp_hook,
            };
            let step = called
                .result
                .and_then(|action| act(stage, action, input.clone(), end));
            data = match step {
                Ok(Step::Send(out)) => out,
                Ok(Step::Held) => Bytes::new(),
                Ok(Step::Stop(stop)) => return Err(stop),
                Err(error) => match on_failure(&stage.plugin, error) {
                    // Failed open: the plugin is skipped for the rest of this body.
                    Ok(()) => {
                        stage.live = false;
                        input
                    }
                    Err(refused) => return Err(Stop::Failed(refused)),
                },
            };
            if !implemented {
                stage.live = false;
            }
        }
        Ok(data)
    }
}

/// A stage no longer called passes what it still holds, then everything.
fn flush(stage: &mut Stage, data: Bytes) -> Bytes {
    if stage.kept.is_empty() {
        return data;
    }
    let mut out = std::mem::take(&mut stage.kept);
    out.extend_from_slice(&data);
    out.freeze()
}

/// What a stage's action comes to.
enum Step {
    /// These bytes go on.
    Send(Bytes),
    /// The stage kept the bytes.
    Held,
    /// The body stops.
    Stop(Stop),
}

/// Applies one plugin's action on `input`, within its `body-buffer`.
fn act(
    stage: &mut Stage,
    action: BodyAction,
    input: Bytes,
    end: bool,
) -> Result<Step, crate::plugin::PluginError> {
    let cap = stage.plugin.config().body_buffer;
    let plugin = &stage.plugin;
    Ok(match action {
        BodyAction::Pass => Step::Send(input),
        BodyAction::Hold if end => Step::Send(input),
        BodyAction::Hold if input.len() > cap => {
            return Err(plugin.refuse(format!(
                "held {} bytes of body; its body-buffer is {cap}",
                input.len()
            )))
        }
        BodyAction::Hold => {
            stage.kept = BytesMut::from(&input[..]);
            Step::Held
        }
        BodyAction::Replace(b) if b.len() > cap => {
            return Err(plugin.refuse(format!(
                "a replacement of {} bytes; its body-buffer is {cap}",
                b.len()
            )))
        }
        BodyAction::Replace(b) => Step::Send(Bytes::from(b)),
        BodyAction::Reject(r) => {
            let (status, headers, body) =
                decision::local_response(&r).map_err(|e| plugin.refuse(e))?;
            Step::Stop(Stop::Respond(
                status,
                headers,
                body,
                plugin.name().to_string(),
            ))
        }
    })
}
