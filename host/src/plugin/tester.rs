//! `sluice plugin test`: runs a plugin's hooks on a made-up exchange and reports its
//! decisions, logs and audit events — a plugin author's loop without a tunnel.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::bindings::sluice::plugin::types::{Completion, HeaderEdit, RequestDecision, Response};
use super::outbound::{Answer, Script};
use super::{Called, Plugin, RequestView, Runtime};
use crate::admin::Metrics;
use crate::config::{Grants, PluginConfig};

/// What to run.
#[derive(Debug, Clone)]
pub struct TestRun {
    /// The component.
    pub wasm: PathBuf,
    /// The plugin's configuration as JSON.
    pub config_json: Vec<u8>,
    /// Method and URL, such as `GET https://app.example.com/path?q=1`.
    pub request: String,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Status of the made-up origin response.
    pub status: u16,
    /// Grants given to the plugin.
    pub grants: Grants,
    /// The client address shown when `client-addr` is granted.
    pub client_addr: String,
    /// Deadline of each hook call.
    pub timeout: Duration,
    /// Keys and values put in the plugin's key-value store before the hooks run.
    pub kv: Vec<(String, Vec<u8>)>,
    /// Answers to the plugin's outbound calls, by target (see [`scripted_answer`]).
    pub http: Vec<(String, Answer)>,
    /// A request body for `on-request-body`.
    pub body: Option<Vec<u8>>,
    /// A response body for `on-response-body`.
    pub response_body: Option<Vec<u8>>,
}

/// Parses one `--http` entry, `"TARGET STATUS [BODY]"`, BODY being text or `@file`.
pub fn scripted_answer(entry: &str) -> Result<(String, Answer), String> {
    let invalid = || {
        format!("invalid --http {entry:?}: expected \"URL STATUS [BODY]\" (BODY is text or @file)")
    };
    let mut parts = entry.trim().splitn(3, ' ');
    let target = parts.next().filter(|t| !t.is_empty()).ok_or_else(invalid)?;
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(invalid)?;
    let body = match parts.next() {
        Some(file) if file.starts_with('@') => std::fs::read(&file[1..])
            .map_err(|e| format!("--http {target}: cannot read {}: {e}", &file[1..]))?,
        Some(text) => text.as_bytes().to_vec(),
        None => Vec::new(),
    };
    Ok((
        target.to_string(),
        Answer {
            status,
            headers: Vec::new(),
            body,
        },
    ))
}

/// Why a test run could not happen.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// `--request` is not `METHOD URL`.
    #[error("invalid --request {0:?}: expected \"METHOD scheme://host/path\"")]
    Request(String),
    /// The runtime could not start.
    #[error(transparent)]
    Runtime(#[from] super::RuntimeError),
    /// The plugin did not load.
    #[error(transparent)]
    Load(#[from] super::LoadError),
    /// A `--header` is not a valid HTTP header.
    #[error("invalid --header {0:?}: not a valid HTTP header name and value")]
    Header(String),
    /// `--kv` could not seed the store.
    #[error("{0}")]
    Kv(String),
}

/// Runs the hooks and returns the report, one line per fact.
pub async fn run(t: &TestRun) -> Result<String, TestError> {
    let (method, url) = t
        .request
        .trim()
        .split_once(' ')
        .ok_or_else(|| TestError::Request(t.request.clone()))?;
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| TestError::Request(t.request.clone()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(TestError::Request(t.request.clone()));
    }
    // As in the tunnel, the view carries the authority separately, not as a `host` header.
    let mut headers = http::HeaderMap::new();
    for (n, v) in &t.headers {
        let invalid = || TestError::Header(format!("{}: {}", n.trim(), v.trim()));
        let name = http::HeaderName::from_bytes(n.trim().as_bytes()).map_err(|_| invalid())?;
        let value = http::HeaderValue::from_bytes(v.trim().as_bytes()).map_err(|_| invalid())?;
        headers.append(name, value);
    }
    let view = RequestView {
        method: method.to_ascii_uppercase(),
        scheme: scheme.to_string(),
        authority: authority.to_string(),
        path: path.to_string(),
        headers,
        request_id: hex::encode(rand::random::<[u8; 16]>()),
        hostname: crate::config::normalize_host(authority).into_owned(),
        ingress_rule: 0,
        client_addr: Some(t.client_addr.clone()),
    };

    let name = t
        .wasm
        .file_stem()
        .map_or("plugin".to_string(), |s| s.to_string_lossy().into_owned());
    let mut cfg = PluginConfig::new(name.clone(), &t.wasm);
    cfg.config_json = t.config_json.clone();
    cfg.timeout = t.timeout;
    // The grants also decide what the plugin sees of the request (see `SharedView`).
    cfg.grants = t.grants;
    let script = Arc::new(Script::new(t.http.clone()));
    // Every call is answered from the script: a test run reaches no network.
    cfg.http.script = Some(script.clone());
    let runtime = Runtime::new(cfg.memory.max(64 << 20), 16)?;
    let store = runtime.kv.access(&name, cfg.kv);
    for (k, v) in &t.kv {
        store
            .set(k, v.clone(), None)
            .await
            .map_err(|e| TestError::Kv(format!("cannot seed {k:?}: {e}")))?;
    }
    let plugin = Plugin::load(runtime, cfg, Arc::new(Metrics::new("plugin_test"))).await?;
    let (req_hook, resp_hook, complete_hook) = plugin.exports();
    let (req_body_hook, resp_body_hook) = plugin.body_hooks();
    let mut out = Vec::new();
    let hooks = plugin.hook_names();
    out.push(format!(
        "plugin {name}: init ok; exports {}",
        if hooks.is_empty() {
            "no hooks".to_string()
        } else {
            hooks.join(", ")
        }
    ));
    out.push(format!(
        "request: {} {}://{}{}",
        view.method, view.scheme, view.authority, view.path
    ));

    let mut held = crate::plugin::Held::default();
    let mut status = t.status;
    let mut origin = Some("origin".to_string());
    if req_hook {
        let called = plugin.on_request(&mut held, view.clone()).await;
        report(&mut out, "on-request", &called, plugin.exports().0);
        if let Ok(d) = &called.result {
            describe_request(&mut out, d);
            if let Some(r) = &d.respond {
                status = r.status;
                origin = None;
            }
        }
    }
    if let (true, Some(body), Some(_)) = (req_body_hook, &t.body, &origin) {
        body_hook(&mut out, &plugin, &view, None, body).await;
    }
    if resp_hook && origin.is_some() {
        let resp = Response {
            status,
            headers: vec![("content-type".into(), b"text/plain".to_vec())]
                .into_iter()
                .map(|(name, value)| super::bindings::sluice::plugin::types::Header { name, value })
                .collect(),
        };
        let called = plugin.on_response(&mut held, view.clone(), resp).await;
        let hook = format!("on-response (status {status})");
        report(&mut out, &hook, &called, plugin.exports().1);
        if let Ok(d) = &called.result {
            for e in &d.headers {
                out.push(format!("  {}", edit(e)));
            }
            if let Some(s) = d.status {
                out.push(format!("  status {s}"));
            }
            if let Some(b) = &d.body {
                out.push(format!(
                    "  body {} bytes: {:?}",
                    b.len(),
                    String::from_utf8_lossy(b)
                ));
            }
        }
    }
    if let (true, Some(body), Some(_)) = (resp_body_hook, &t.response_body, &origin) {
        body_hook(&mut out, &plugin, &view, Some(status), body).await;
    }
    if complete_hook {
        let info = Completion {
            status,
            origin,
            duration_us: 1200,
            bytes_in: 0,
            bytes_out: 42,
            error: None,
        };
        let called = plugin.on_complete(&mut held, view, info).await;
        let hook = format!("on-complete (status {status})");
        report(&mut out, &hook, &called, plugin.exports().2);
    }
    for call in script.calls() {
        out.push(format!("http {call}"));
    }
    if t.grants.kv {
        for (k, v) in store.entries() {
            out.push(format!("kv {k} = {:?}", String::from_utf8_lossy(&v)));
        }
    }
    Ok(out.join("\n") + "\n")
}

/// Runs a body hook on `body` in one piece and then the end, and reports each action.
async fn body_hook(
    out: &mut Vec<String>,
    plugin: &Plugin,
    view: &RequestView,
    status: Option<u16>,
    body: &[u8],
) {
    use super::bindings::sluice::plugin::types::BodyAction;
    let name = match status {
        None => "on-request-body".to_string(),
        Some(s) => format!("on-response-body (status {s})"),
    };
    let mut held = crate::plugin::Held::default();
    let view = Arc::new(view.clone());
    let mut kept = Vec::new();
    for (piece, end) in [(body.to_vec(), false), (Vec::new(), true)] {
        kept.extend_from_slice(&piece);
        let given = std::mem::take(&mut kept);
        let called = plugin
            .on_body(&mut held, view.clone(), status, given.clone(), end)
            .await;
        let implemented = match status {
            None => plugin.body_hooks().0,
            Some(_) => plugin.body_hooks().1,
        };
        let hook = format!(
            "{name}, {} bytes{}",
            given.len(),
            if end { ", end" } else { "" }
        );
        report(out, &hook, &called, implemented);
        match called.result {
            Ok(BodyAction::Hold) if !end => {
                out.push(format!("  hold {} bytes", given.len()));
                kept = given
            }
            Ok(BodyAction::Hold | BodyAction::Pass) => {
                out.push(format!("  pass {} bytes", given.len()))
            }
            Ok(BodyAction::Replace(b)) => out.push(format!(
                "  replace with {} bytes: {:?}",
                b.len(),
                String::from_utf8_lossy(&b)
            )),
            Ok(BodyAction::Reject(r)) => {
                out.push(format!("  reject: respond {}", r.status));
                return;
            }
            Err(_) => return,
        }
        if !implemented {
            return;
        }
    }
}

/// One hook's line; `implemented` is false once the plugin said it does not implement the
/// hook (the connector then stops calling it).
fn report<T>(out: &mut Vec<String>, hook: &str, called: &Called<T>, implemented: bool) {
    match &called.result {
        Ok(_) if !implemented => out.push(format!(
            "{hook}: not implemented (the connector stops calling it)"
        )),
        Ok(_) => out.push(format!("{hook}: ok")),
        Err(e) => out.push(format!("{hook}: FAILED ({}): {e}", e.kind())),
    }
    for e in &called.events {
        let attrs: serde_json::Map<String, serde_json::Value> = e
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        out.push(format!(
            "  audit {} {}",
            e.kind,
            serde_json::Value::Object(attrs)
        ));
    }
}

fn describe_request(out: &mut Vec<String>, d: &RequestDecision) {
    for e in &d.headers {
        out.push(format!("  {}", edit(e)));
    }
    if let Some(p) = &d.path {
        out.push(format!("  rewrite path to {p}"));
    }
    if let Some(o) = &d.origin {
        out.push(format!("  route to origin {o:?}"));
    }
    if let Some(r) = &d.respond {
        out.push(format!(
            "  respond {} with {} bytes",
            r.status,
            r.body.len()
        ));
        for h in &r.headers {
            out.push(format!(
                "    {}: {}",
                h.name,
                String::from_utf8_lossy(&h.value)
            ));
        }
    }
    if d.headers.is_empty() && d.path.is_none() && d.origin.is_none() && d.respond.is_none() {
        out.push("  no change".into());
    }
    // What the host would refuse, so authors see it here rather than as a 502.
    let mut probe = http::HeaderMap::new();
    if let Err(e) = super::decision::apply_edits(&mut probe, &d.headers) {
        out.push(format!("  REFUSED by the host: {e}"));
    }
    if let Some(Err(e)) = d.path.as_deref().map(super::decision::check_path) {
        out.push(format!("  REFUSED by the host: {e}"));
    }
    if let Some(Err(e)) = d.respond.as_ref().map(super::decision::local_response) {
        out.push(format!("  REFUSED by the host: {e}"));
    }
}

fn edit(e: &HeaderEdit) -> String {
    match e {
        HeaderEdit::Set(h) => format!("set {}: {}", h.name, String::from_utf8_lossy(&h.value)),
        HeaderEdit::Append(h) => {
            format!("append {}: {}", h.name, String::from_utf8_lossy(&h.value))
        }
        HeaderEdit::Remove(n) => format!("remove {n}"),
    }
}
