//! Plugin chains: which plugins run for a request, in which order, and what their decisions
//! do to it. The pipeline calls the three phases; this module applies the rules of
//! `wit/plugin.wit` (chain order, first local response wins, later plugins see earlier edits,
//! response chain in reverse, failure policies).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tracing::warn;

use crate::audit::{Audit, AuditEvent};
use crate::config::{ConnectorConfig, OnError};
use crate::plugin::bindings::sluice::plugin::types::{
    Completion, RequestDecision, Response, ResponseDecision,
};
use crate::plugin::{decision, Held, Plugin, PluginError, RawEvent, RequestView};

use super::body::{BodyFilter, Stage};

/// Every plugin of a configuration and the chain of each ingress rule.
#[derive(Debug, Default)]
pub struct Chains {
    plugins: Vec<Arc<Plugin>>,
    /// Per ingress rule: indices into `plugins`, global chain first.
    by_rule: Vec<Vec<usize>>,
}

impl Chains {
    /// Frees every plugin's idle instances for good (see [`Plugin::retire`]).
    pub fn retire(&self) {
        for p in &self.plugins {
            p.retire();
        }
    }

    /// Builds the chains of `config` from loaded plugins (by name).
    pub fn new(config: &ConnectorConfig, loaded: HashMap<String, Arc<Plugin>>) -> Chains {
        let mut plugins = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for p in &config.plugins {
            if let Some(plugin) = loaded.get(&p.name) {
                index.insert(p.name.clone(), plugins.len());
                plugins.push(plugin.clone());
            }
        }
        let global: Vec<usize> = config
            .global_plugins
            .iter()
            .filter_map(|n| index.get(n).copied())
            .collect();
        let by_rule = config
            .ingress
            .iter()
            .map(|rule| {
                let mut chain = global.clone();
                chain.extend(rule.plugins.iter().filter_map(|n| index.get(n).copied()));
                chain
            })
            .collect();
        Chains { plugins, by_rule }
    }

    /// Starts the chain of ingress rule `rule` for one request; `None` when no plugin runs
    /// for the rule, without building the request's view (the no-plugin path allocates
    /// nothing here).
    pub fn start(
        &self,
        rule: usize,
        view: impl FnOnce() -> RequestView,
        context: &AuditContext,
    ) -> Option<ChainRun<'_>> {
        let chain = self.by_rule.get(rule).filter(|c| !c.is_empty())?;
        Some(ChainRun {
            chains: self,
            chain,
            held: chain.iter().map(|_| Held::default()).collect(),
            view: Arc::new(view()),
            context: context.clone(),
        })
    }
}

/// What the host adds to every audit event of a request.
#[derive(Debug, Clone)]
pub struct AuditContext {
    /// Where events go.
    pub audit: Audit,
    /// Tunnel id.
    pub tunnel: String,
}

/// A failure the `fail-closed` policy turns into a 502.
#[derive(Debug)]
pub struct Refused {
    /// The plugin that failed (for logs only: the client never sees it).
    pub plugin: String,
    /// What went wrong.
    pub error: PluginError,
}

/// The outcome of the request phase.
#[derive(Debug, Default)]
pub struct RequestEdits {
    /// New path and query, if a plugin rewrote it.
    pub target: Option<String>,
    /// Origin chosen by a plugin.
    pub origin: Option<String>,
    /// A local response, if a plugin answered.
    pub respond: Option<(StatusCode, HeaderMap, Bytes, String)>,
}

/// The hook that just ran, for [`ChainRun::release_unneeded`].
#[derive(Debug, Clone, Copy)]
enum Phase {
    Request,
    Response,
}

/// One request's trip through its chain.
pub struct ChainRun<'a> {
    chains: &'a Chains,
    chain: &'a [usize],
    /// What the request keeps of each plugin between hooks (its context; its own instance
    /// under per-request isolation), by chain position.
    held: Vec<Held>,
    /// The request as the chain sees it, shared by every hook (each plugin sees it through
    /// its own grants); changed in place when a plugin edits the request (copied first only
    /// if a body stage still holds it).
    view: Arc<RequestView>,
    context: AuditContext,
}

impl ChainRun<'_> {
    /// Runs `on-request` in chain order. Edits are applied to `headers` as they come, so later
    /// plugins see them; the first local response ends the chain. `origin_exists` tells
    /// whether an origin name is configured.
    pub async fn on_request(
        &mut self,
        headers: &mut HeaderMap,
        origin_exists: impl Fn(&str) -> bool,
    ) -> Result<RequestEdits, Refused> {
        let mut edits = RequestEdits::default();
        for pos in 0..self.chain.len() {
            let plugin = self.chains.plugins[self.chain[pos]].clone();
            if !plugin.exports().0 {
                continue;
            }
            let called = plugin
                .on_request(&mut self.held[pos], self.view.clone())
                .await;
            self.release_unneeded(pos, &plugin, Phase::Request);
            emit(&self.context, &self.view, plugin.name(), called.events).await;
            let result = called
                .result
                .and_then(|d| self.apply(&plugin, d, headers, &origin_exists, &mut edits));
            match result {
                Ok(true) => return Ok(edits),
                Ok(false) => {}
                Err(error) => self.failed(&plugin, error)?,
            }
        }
        Ok(edits)
    }

    /// Validates and applies one decision; `Ok(true)` when it answered locally.
    fn apply(
        &mut self,
        plugin: &Plugin,
        d: RequestDecision,
        headers: &mut HeaderMap,
        origin_exists: &impl Fn(&str) -> bool,
        edits: &mut RequestEdits,
    ) -> Result<bool, PluginError> {
        let invalid = |e: String| plugin.refuse(e);
        let target = d
            .path
            .as_deref()
            .map(decision::check_path)
            .transpose()
            .map_err(invalid)?;
        if let Some(origin) = &d.origin {
            if !origin_exists(origin) {
                return Err(invalid(format!("origin {origin:?} is not configured")));
            }
        }
        let local = d
            .respond
            .as_ref()
            .map(decision::local_response)
            .transpose()
            .map_err(invalid)?;
        // Header edits last: all-or-nothing, and only once the rest is known to be valid.
        let header_edits = decision::Edits::check(&d.headers).map_err(invalid)?;
        header_edits.apply(headers);
        if let Some(t) = target {
            Arc::make_mut(&mut self.view).path = t.clone();
            edits.target = Some(t);
        }
        if let Some(o) = d.origin {
            edits.origin = Some(o);
        }
        if !d.headers.is_empty() {
            // The view's headers are `headers` as they were before this decision: the same
            // edits keep them equal, without copying the map. In place when no body stage holds
            // the view yet (the usual case), else on a copy of the view.
            header_edits.apply(&mut Arc::make_mut(&mut self.view).headers);
        }
        if let Some((status, h, body)) = local {
            edits.respond = Some((status, h, body, plugin.name().to_string()));
            return Ok(true);
        }
        Ok(false)
    }

    /// Runs `on-response` in reverse chain order on the response head. Plugins may change
    /// `status` (later ones see the change) and replace the body: the last replacement is
    /// returned.
    pub async fn on_response(
        &mut self,
        status: &mut StatusCode,
        headers: &mut HeaderMap,
    ) -> Result<Option<Bytes>, Refused> {
        let mut body = None;
        for pos in (0..self.chain.len()).rev() {
            let plugin = self.chains.plugins[self.chain[pos]].clone();
            if !plugin.exports().1 {
                continue;
            }
            let view = self.view.clone();
            let mut visible = decision::to_wit(headers);
            let grants = plugin.config().grants;
            visible.retain(|h| !grants.hides_response_header(&h.name));
            let resp = Response {
                status: status.as_u16(),
                headers: visible,
            };
            let called = plugin.on_response(&mut self.held[pos], view, resp).await;
            self.release_unneeded(pos, &plugin, Phase::Response);
            emit(&self.context, &self.view, plugin.name(), called.events).await;
            let result = called
                .result
                .and_then(|d| apply_response(&plugin, d, status, headers, &mut body));
            if let Err(error) = result {
                self.failed(&plugin, error)?;
            }
        }
        Ok(body)
    }

    /// Runs `on-complete` in chain order, after the answer was sent. Failures are logged and
    /// counted; there is nothing left to refuse.
    pub async fn on_complete(mut self, info: Completion) {
        for pos in 0..self.chain.len() {
            let plugin = self.chains.plugins[self.chain[pos]].clone();
            if !plugin.exports().2 {
                continue;
            }
            let called = plugin
                .on_complete(&mut self.held[pos], self.view.clone(), info.clone())
                .await;
            self.held[pos].release_instance();
            emit(&self.context, &self.view, plugin.name(), called.events).await;
            if let Err(error) = called.result {
                warn!(plugin = plugin.name(), kind = error.kind(), %error, "plugin failed in on-complete");
            }
        }
    }

    /// Logs a failure and applies the plugin's policy (see [`on_failure`]).
    fn failed(&self, plugin: &Plugin, error: PluginError) -> Result<(), Refused> {
        on_failure(plugin, error)
    }

    /// The body filter of this request's body (`status` `None`) or response body (the
    /// client's status): the plugins that implement the body hook, in chain order for a
    /// request and in reverse for a response; `None` when there is none.
    pub fn body_filter(&mut self, status: Option<u16>) -> Option<BodyFilter> {
        let mut stages = Vec::new();
        for i in 0..self.chain.len() {
            let pos = if status.is_some() {
                self.chain.len() - 1 - i
            } else {
                i
            };
            let plugin = self.chains.plugins[self.chain[pos]].clone();
            let (req, resp) = plugin.body_hooks();
            if (status.is_none() && req) || (status.is_some() && resp) {
                stages.push(Stage::new(plugin, self.view.clone()));
            }
        }
        (!stages.is_empty()).then(|| BodyFilter::new(stages, status, self.context.clone()))
    }

    /// Gives back the request's own instance of the plugin at `pos` (per-request isolation)
    /// once no later hook of the plugin will run for this request, instead of holding it
    /// while the body streams.
    fn release_unneeded(&mut self, pos: usize, plugin: &Plugin, after: Phase) {
        let (_, on_response, on_complete) = plugin.exports();
        let needed = match after {
            Phase::Request => on_response || on_complete,
            Phase::Response => on_complete,
        };
        if !needed {
            self.held[pos].release_instance();
        }
    }
}

/// Logs a plugin's failure and applies its policy: `Err` to refuse the request
/// (fail-closed), `Ok` to skip the plugin (fail-open).
pub(super) fn on_failure(plugin: &Plugin, error: PluginError) -> Result<(), Refused> {
    if error == PluginError::Unavailable {
        // Not a failure of the plugin's logic but of capacity: skipping it would let a
        // load spike bypass an access control configured fail-open.
        warn!(
            plugin = plugin.name(),
            "no plugin instance available; refusing the request"
        );
        return Err(Refused {
            plugin: plugin.name().to_string(),
            error,
        });
    }
    let policy = plugin.on_error();
    warn!(
        plugin = plugin.name(),
        kind = error.kind(),
        %error,
        policy = if policy == OnError::FailClosed { "fail-closed" } else { "fail-open" },
        "plugin failed"
    );
    match policy {
        OnError::FailClosed => Err(Refused {
            plugin: plugin.name().to_string(),
            error,
        }),
        OnError::FailOpen => Ok(()),
    }
}

/// Validates and applies one `on-response` decision, all or nothing.
fn apply_response(
    plugin: &Plugin,
    d: ResponseDecision,
    status: &mut StatusCode,
    headers: &mut HeaderMap,
    body: &mut Option<Bytes>,
) -> Result<(), PluginError> {
    let invalid = |e: String| plugin.refuse(e);
    let new_status = d
        .status
        .map(|s| decision::response_status(*status, s))
        .transpose()
        .map_err(invalid)?;
    let new_body = d
        .body
        .as_deref()
        .map(|b| decision::response_body(new_status.unwrap_or(*status), b))
        .transpose()
        .map_err(invalid)?;
    decision::apply_edits(headers, &d.headers).map_err(invalid)?;
    if let Some(s) = new_status {
        *status = s;
    }
    if new_body.is_some() {
        *body = new_body;
    }
    Ok(())
}

/// Stamps a plugin's events with the request's context and queues them (waiting if the
/// audit queue is full). A free function: the chain run itself is not `Sync`.
pub(super) async fn emit(
    context: &AuditContext,
    view: &RequestView,
    plugin: &str,
    events: Vec<RawEvent>,
) {
    for e in events {
        let event = AuditEvent::new(
            plugin,
            &view.request_id,
            &context.tunnel,
            &view.hostname,
            e.kind,
            e.attributes,
        );
        context.audit.emit(event).await;
    }
}
