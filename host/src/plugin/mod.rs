//! WebAssembly plugins on the connector's request path.
//!
//! A plugin is a component of the `sluice:plugin` world (`wit/plugin.wit`), compiled once at
//! load into an `InstancePre`. Instances come from the engine's pooling allocator (copy-on-write
//! memory images), are reused one call at a time and recycled after a trap or `max-calls`
//! calls; `isolation = "per-request"` gives every request a fresh instance. Each hook call has
//! an epoch deadline and each instance a memory limit; a trap, an overrun or an invalid
//! decision is a [`PluginError`], never a crash: the caller applies the plugin's `on-error`
//! policy.

pub mod bindings;
pub mod decision;
pub mod host;
pub mod kv;
pub mod metrics;
pub mod outbound;
pub mod runtime;
pub mod scaffold;
pub mod tester;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use wasmtime::component::{Instance, InstancePre, Resource};
use wasmtime::Store;

use bindings::exports::sluice::plugin::{
    init, on_complete, on_request, on_request_body, on_response, on_response_body,
};
use bindings::sluice::plugin::types::{
    BodyAction, Completion, RequestDecision, Response, ResponseDecision,
};
use bindings::v0_1::exports::sluice::plugin as v0_1;
use host::StoreData;
pub use host::{Context, RawEvent, RequestView, SharedView};
pub use runtime::{
    release_compiler_memory, set_compiler, set_memory_release, Compiled, Compiler, HelperError,
    Runtime, RuntimeError,
};

use crate::admin::metrics::{Metrics, PluginErrorLabels, PluginHookLabels, PluginLabels};
use crate::config::{Isolation, OnError, PluginConfig};

/// Headers hidden from plugins without the `credentials` grant.
pub const CREDENTIALS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// Headers that carry the client's address, hidden from plugins without `client-addr`.
pub const CLIENT_ADDRESS: &[&str] = &["x-forwarded-for", "forwarded", "x-real-ip"];

/// Idle instances kept per plugin for reuse.
pub const MAX_IDLE: usize = 64;

/// Wall-clock limit on instantiation plus `init` (which may parse a large configuration).
const INIT_DEADLINE: Duration = Duration::from_secs(1);

/// Why a plugin could not be loaded. Every message names the plugin.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read or is not a component.
    #[error("plugin {plugin:?}: cannot load {path}: {reason}")]
    Component {
        /// Plugin name.
        plugin: String,
        /// Its file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The component imports something the host does not grant.
    #[error("plugin {plugin:?} imports {}, which sluice does not provide to plugins (no filesystem or sockets; outbound HTTP is sluice:plugin/http, with the http grant)", .imports.join(", "))]
    ForbiddenImport {
        /// Plugin name.
        plugin: String,
        /// The imports it wanted and may not have.
        imports: Vec<String>,
    },
    /// The component imports what only a grant allows, without the grant.
    #[error("plugin {plugin:?} imports {import} but is not granted {grant:?}: add it to the plugin's grants (grants = [\"{grant}\"]) if it may have it")]
    NotGranted {
        /// Plugin name.
        plugin: String,
        /// The import.
        import: String,
        /// The grant it needs.
        grant: &'static str,
    },
    /// The component does not match the `sluice:plugin` world.
    #[error("plugin {plugin:?} does not match the sluice:plugin world: {reason}")]
    World {
        /// Plugin name.
        plugin: String,
        /// The linker's explanation.
        reason: String,
    },
    /// `init` refused the plugin's configuration.
    #[error("{}plugin {plugin:?} rejected its configuration: {message:?}", .at.as_deref().map(|a| format!("{a}: ")).unwrap_or_default())]
    Init {
        /// Where the plugin's block is in the connector's file, if it came from one.
        at: Option<String>,
        /// Plugin name.
        plugin: String,
        /// The plugin's message.
        message: String,
    },
    /// The component exports none of the hooks: built without `export_plugin!`, it would
    /// load and do nothing.
    #[error("plugin {plugin:?} ({path}) exports no hook (on-request, on-response, on-complete, on-request-body or on-response-body), so it would do nothing: a plugin written with sluice-sdk must end with `sluice_sdk::export_plugin!(YourPlugin);`")]
    NoHooks {
        /// Plugin name.
        plugin: String,
        /// Its file.
        path: String,
    },
    /// The first instance could not be created or initialised.
    #[error("plugin {plugin:?} failed to start: {reason}")]
    Start {
        /// Plugin name.
        plugin: String,
        /// What went wrong.
        reason: String,
    },
}

/// How a hook call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The guest trapped (panic, unreachable, …).
    #[error("trapped: {0}")]
    Trap(String),
    /// The call ran past its deadline.
    #[error("ran past its {0:?} deadline")]
    Timeout(Duration),
    /// The instance hit its memory limit.
    #[error("ran out of memory (limit {0} bytes)")]
    Memory(usize),
    /// The decision broke a rule of the host.
    #[error("returned an invalid decision: {0}")]
    InvalidDecision(String),
    /// A fresh instance could not be created or its `init` failed.
    #[error("could not start an instance: {0}")]
    Instantiate(String),
    /// Every instance the pool allows is in use: the request waits for no instance and is
    /// never let through without the plugin (whatever `on-error` says).
    #[error("no instance available (the pool is exhausted)")]
    Unavailable,
}

impl PluginError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Trap(_) => "trap",
            PluginError::Timeout(_) => "timeout",
            PluginError::Memory(_) => "memory",
            PluginError::InvalidDecision(_) => "invalid-decision",
            PluginError::Instantiate(_) => "instantiate",
            PluginError::Unavailable => "unavailable",
        }
    }
}

/// The hooks of one world version: their indices, looked up once at load, or their
/// functions in one instance.
struct Hooks<I, Q, S, C> {
    init: Option<I>,
    on_request: Option<Q>,
    on_response: Option<S>,
    on_complete: Option<C>,
}

impl<I, Q, S, C> Hooks<I, Q, S, C> {
    fn any(&self) -> bool {
        self.on_request.is_some() || self.on_response.is_some() || self.on_complete.is_some()
    }
}

/// The body hooks (0.2.0 on): indices, or functions in one instance.
struct Bodies<RB, SB> {
    on_request_body: Option<RB>,
    on_response_body: Option<SB>,
}

/// The hooks a component exports, by the world version it was built for.
enum HookIndices {
    /// `sluice:plugin@0.2.0`.
    Now(
        Hooks<
            init::GuestIndices,
            on_request::GuestIndices,
            on_response::GuestIndices,
            on_complete::GuestIndices,
        >,
        Bodies<on_request_body::GuestIndices, on_response_body::GuestIndices>,
    ),
    /// `sluice:plugin@0.1.0`.
    V0_1(
        Hooks<
            v0_1::init::GuestIndices,
            v0_1::on_request::GuestIndices,
            v0_1::on_response::GuestIndices,
            v0_1::on_complete::GuestIndices,
        >,
    ),
}

impl HookIndices {
    /// The hooks `pre` exports: 0.2.0's if it exports any, else 0.1.0's.
    fn of(pre: &InstancePre<StoreData>) -> HookIndices {
        let now = Hooks {
            init: init::GuestIndices::new(pre).ok(),
            on_request: on_request::GuestIndices::new(pre).ok(),
            on_response: on_response::GuestIndices::new(pre).ok(),
            on_complete: on_complete::GuestIndices::new(pre).ok(),
        };
        let bodies = Bodies {
            on_request_body: on_request_body::GuestIndices::new(pre).ok(),
            on_response_body: on_response_body::GuestIndices::new(pre).ok(),
        };
        let any_body = bodies.on_request_body.is_some() || bodies.on_response_body.is_some();
        if now.any() || any_body || now.init.is_some() {
            return HookIndices::Now(now, bodies);
        }
        HookIndices::V0_1(Hooks {
            init: v0_1::init::GuestIndices::new(pre).ok(),
            on_request: v0_1::on_request::GuestIndices::new(pre).ok(),
            on_response: v0_1::on_response::GuestIndices::new(pre).ok(),
            on_complete: v0_1::on_complete::GuestIndices::new(pre).ok(),
        })
    }

    /// Whether the component exports `on-request`, `on-response`, `on-complete`,
    /// `on-request-body`, `on-response-body`.
    fn exported(&self) -> [bool; HOOKS] {
        match self {
            HookIndices::Now(h, b) => [
                h.on_request.is_some(),
                h.on_response.is_some(),
                h.on_complete.is_some(),
                b.on_request_body.is_some(),
                b.on_response_body.is_some(),
            ],
            HookIndices::V0_1(h) => [
                h.on_request.is_some(),
                h.on_response.is_some(),
                h.on_complete.is_some(),
                false,
                false,
            ],
        }
    }

    /// The hook functions of `instance`.
    fn load(&self, store: &mut Store<StoreData>, instance: &Instance) -> wasmtime::Result<Guests> {
        fn each<I, G>(
            i: &Option<I>,
            load: impl FnOnce(&I) -> wasmtime::Result<G>,
        ) -> wasmtime::Result<Option<G>> {
            i.as_ref().map(load).transpose()
        }
        Ok(match self {
            HookIndices::Now(h, b) => Guests::Now(
                Hooks {
                    init: None,
                    on_request: each(&h.on_request, |i| i.load(&mut *store, instance))?,
                    on_response: each(&h.on_response, |i| i.load(&mut *store, instance))?,
                    on_complete: each(&h.on_complete, |i| i.load(&mut *store, instance))?,
                },
                Bodies {
                    on_request_body: each(&b.on_request_body, |i| i.load(&mut *store, instance))?,
                    on_response_body: each(&b.on_response_body, |i| i.load(&mut *store, instance))?,
                },
            ),
            HookIndices::V0_1(h) => Guests::V0_1(Hooks {
                init: None,
                on_request: each(&h.on_request, |i| i.load(&mut *store, instance))?,
                on_response: each(&h.on_response, |i| i.load(&mut *store, instance))?,
                on_complete: each(&h.on_complete, |i| i.load(&mut *store, instance))?,
            }),
        })
    }

    /// Runs `init`, if exported.
    async fn init(
        &self,
        store: &mut Store<StoreData>,
        instance: &Instance,
        config: &[u8],
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            HookIndices::Now(Hooks { init: Some(i), .. }, _) => {
                i.load(&mut *store, instance)?
                    .call_init(&mut *store, config)
                    .await
            }
            HookIndices::V0_1(Hooks { init: Some(i), .. }) => {
                i.load(&mut *store, instance)?
                    .call_init(&mut *store, config)
                    .await
            }
            _ => Ok(Ok(())),
        }
    }
}

/// The hook functions of one instance.
enum Guests {
    Now(
        Hooks<(), on_request::Guest, on_response::Guest, on_complete::Guest>,
        Bodies<on_request_body::Guest, on_response_body::Guest>,
    ),
    V0_1(Hooks<(), v0_1::on_request::Guest, v0_1::on_response::Guest, v0_1::on_complete::Guest>),
}

/// Hook indices for `unimplemented` and the duration series.
const ON_REQUEST: usize = 0;
const ON_RESPONSE: usize = 1;
const ON_COMPLETE: usize = 2;
const ON_REQUEST_BODY: usize = 3;
const ON_RESPONSE_BODY: usize = 4;
/// Hooks a plugin may export (besides `init`).
const HOOKS: usize = 5;
/// Their names, by index.
const HOOK_NAMES: [&str; HOOKS] = [
    "on-request",
    "on-response",
    "on-complete",
    "on-request-body",
    "on-response-body",
];

/// What one request keeps of one plugin between its hooks: the plugin's context, and under
/// per-request isolation its own instance.
#[derive(Default)]
pub struct Held {
    slot: Option<Slot>,
    context: Context,
}

impl Held {
    /// Gives back the request's own instance (per-request isolation), keeping the context.
    pub fn release_instance(&mut self) {
        self.slot = None;
    }
}

/// One instance and its store.
pub struct Slot {
    store: Store<StoreData>,
    guests: Guests,
    calls: u64,
    /// The plugin's live-instance gauge, decremented when the instance goes.
    live: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.live.dec();
    }
}

/// A loaded plugin: its compiled component and its pool of idle instances.
pub struct Plugin {
    config: PluginConfig,
    name: Arc<str>,
    runtime: Arc<Runtime>,
    pre: InstancePre<StoreData>,
    hooks: HookIndices,
    /// Hooks the component exports but said it does not implement (0.2.0's `none`): never
    /// called again.
    unimplemented: [std::sync::atomic::AtomicBool; HOOKS],
    idle: Mutex<Vec<Slot>>,
    /// Set once a reload replaced this plugin: instances are no longer kept idle.
    retired: std::sync::atomic::AtomicBool,
    metrics: Arc<Metrics>,
    /// This plugin's `plugin_hook_duration_seconds` series for `on-request`, `on-response`
    /// and `on-complete`, looked up once rather than on every call.
    durations: [Histogram; HOOKS],
    /// Where it was compiled, and how long that took.
    compiled: (Compiled, Duration),
    /// Outbound HTTP calls, with the `http` grant.
    outbound: Option<Arc<outbound::Outbound>>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("name", &self.name).finish()
    }
}

/// The result of one hook call, with the audit events it emitted.
#[derive(Debug)]
pub struct Called<T> {
    /// The hook's result.
    pub result: Result<T, PluginError>,
    /// Audit events emitted during the call.
    pub events: Vec<RawEvent>,
}

/// Loads each plugin as the connector would (compile, check the imports and grants, link,
/// run `init` with its configuration), then drops it: what `sluice check` runs. One line per
/// plugin, naming the hooks it exports; the first failure's message otherwise.
pub async fn check(plugins: &[PluginConfig]) -> Result<Vec<String>, String> {
    let memory = plugins
        .iter()
        .map(|p| p.memory)
        .max()
        .unwrap_or(0)
        .max(64 << 20);
    let runtime = Runtime::new(memory, 16).map_err(|e| e.to_string())?;
    let metrics = Arc::new(Metrics::new("check"));
    let mut lines = Vec::new();
    for p in plugins {
        let plugin = Plugin::load(runtime.clone(), p.clone(), metrics.clone())
            .await
            .map_err(|e| e.to_string())?;
        lines.push(format!(
            "plugin {:?}: init ok; exports {}",
            p.name,
            plugin.hook_names().join(", ")
        ));
    }
    Ok(lines)
}

impl Plugin {
    /// Compiles, checks and links the component, then starts one instance and runs `init`
    /// with the plugin's configuration.
    pub async fn load(
        runtime: Arc<Runtime>,
        config: PluginConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Plugin, LoadError> {
        let plugin = config.name.clone();
        // Compiling takes from milliseconds to seconds of CPU: on a blocking thread, so that a
        // reload never stalls the requests sharing an async worker.
        let started = Instant::now();
        let compiled = {
            let (runtime, path) = (runtime.clone(), config.path.clone());
            tokio::task::spawn_blocking(move || runtime.compile(&path)).await
        };
        let (component, compiled_by) = compiled
            .map_err(|e| format!("compilation did not finish: {e}"))
            .and_then(|r| r)
            .map_err(|reason| LoadError::Component {
                plugin: plugin.clone(),
                path: config.path.display().to_string(),
                reason,
            })?;
        let compile_time = started.elapsed();
        let ty = component.component_type();
        let forbidden: Vec<String> = ty
            .imports(&runtime.engine)
            .map(|(import, _)| import)
            .filter(|import| {
                !runtime::ALLOWED_IMPORTS.contains(&import.split('@').next().unwrap_or(import))
            })
            .map(str::to_string)
            .collect();
        if !forbidden.is_empty() {
            return Err(LoadError::ForbiddenImport {
                plugin,
                imports: forbidden,
            });
        }
        let granted = |grant: &str| match grant {
            "kv" => config.grants.kv,
            "metrics" => config.grants.metrics,
            "http" => config.grants.http,
            _ => false,
        };
        if let Some((import, grant)) = ty
            .imports(&runtime.engine)
            .map(|(import, _)| import.split('@').next().unwrap_or(import).to_string())
            .find_map(|import| {
                runtime::GRANTED_IMPORTS
                    .iter()
                    .find(|(i, g)| *i == import && !granted(g))
                    .map(|(_, g)| (import.clone(), *g))
            })
        {
            return Err(LoadError::NotGranted {
                plugin,
                import,
                grant,
            });
        }
        let pre = runtime
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::World {
                plugin: plugin.clone(),
                reason: format!("{e:#}"),
            })?;
        let hooks = HookIndices::of(&pre);
        if hooks.exported() == [false; HOOKS] {
            return Err(LoadError::NoHooks {
                plugin,
                path: config.path.display().to_string(),
            });
        }
        let durations = HOOK_NAMES.map(|hook| {
            metrics
                .plugin_hook_duration
                .get_or_create(&PluginHookLabels {
                    plugin: config.name.clone(),
                    hook,
                })
                .clone()
        });
        let name: Arc<str> = Arc::from(config.name.as_str());
        let outbound = match config.grants.http {
            true => Some(Arc::new(
                outbound::Outbound::new(name.clone(), config.http.clone()).map_err(|reason| {
                    LoadError::Start {
                        plugin: config.name.clone(),
                        reason: format!("outbound HTTP: {reason}"),
                    }
                })?,
            )),
            false => None,
        };
        let plugin = Plugin {
            name,
            outbound,
            config,
            runtime,
            pre,
            hooks,
            unimplemented: Default::default(),
            idle: Mutex::new(Vec::new()),
            retired: std::sync::atomic::AtomicBool::new(false),
            durations,
            metrics,
            compiled: (compiled_by, compile_time),
        };
        // Start one instance now: a bad configuration is refused at load, not on a request.
        let slot = plugin.instantiate().await.map_err(|e| match e {
            PluginError::InvalidDecision(message) => LoadError::Init {
                at: plugin.config.defined_at.clone(),
                plugin: plugin.config.name.clone(),
                message,
            },
            other => LoadError::Start {
                plugin: plugin.config.name.clone(),
                reason: other.to_string(),
            },
        })?;
        if plugin.config.isolation == Isolation::Reuse {
            plugin
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(slot);
        }
        Ok(plugin)
    }

    /// Drops the idle instances and keeps no more: a reload replaced this plugin, and only
    /// requests still running on the old pipeline use it.
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Where the plugin was compiled, and how long that took.
    pub fn compiled(&self) -> (Compiled, Duration) {
        self.compiled
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The failure policy.
    pub fn on_error(&self) -> OnError {
        self.config.on_error
    }

    /// The plugin's configuration.
    pub fn config(&self) -> &PluginConfig {
        &self.config
    }

    /// Whether `on-request`, `on-response`, `on-complete` are to be called: exported, and
    /// not declared unimplemented.
    pub fn exports(&self) -> (bool, bool, bool) {
        let [req, resp, complete, ..] = self.hooks.exported();
        let live =
            |hook: usize| !self.unimplemented[hook].load(std::sync::atomic::Ordering::Relaxed);
        (
            req && live(ON_REQUEST),
            resp && live(ON_RESPONSE),
            complete && live(ON_COMPLETE),
        )
    }

    /// The hooks to be called, by name (exported, and not declared unimplemented).
    pub fn hook_names(&self) -> Vec<&'static str> {
        let exported = self.hooks.exported();
        (0..HOOKS)
            .filter(|&h| {
                exported[h] && !self.unimplemented[h].load(std::sync::atomic::Ordering::Relaxed)
            })
            .map(|h| HOOK_NAMES[h])
            .collect()
    }

    /// Whether `on-request-body` and `on-response-body` are to be called: exported, and not
    /// declared unimplemented.
    pub fn body_hooks(&self) -> (bool, bool) {
        let [.., req, resp] = self.hooks.exported();
        let live =
            |hook: usize| !self.unimplemented[hook].load(std::sync::atomic::Ordering::Relaxed);
        (req && live(ON_REQUEST_BODY), resp && live(ON_RESPONSE_BODY))
    }

    /// Calls `on-request-body` (`status` `None`) or `on-response-body` (`Some`) with `chunk`.
    /// A plugin that does not implement it passes everything.
    pub async fn on_body(
        &self,
        held: &mut Held,
        view: Arc<RequestView>,
        status: Option<u16>,
        chunk: Vec<u8>,
        end: bool,
    ) -> Called<BodyAction> {
        let hook = match status {
            None => ON_REQUEST_BODY,
            Some(_) => ON_RESPONSE_BODY,
        };
        let called = self
            .call(held, hook, view, move |slot, req| {
                Box::pin(async move {
                    let Slot { store, guests, .. } = slot;
                    let Guests::Now(_, b) = guests else {
                        unreachable!("0.1.0 has no body hooks; checked by caller")
                    };
                    match status {
                        None => {
                            let guest = b.on_request_body.as_ref().expect("checked by caller");
                            guest.call_on_request_body(store, req, &chunk, end).await
                        }
                        Some(status) => {
                            let guest = b.on_response_body.as_ref().expect("checked by caller");
                            guest
                                .call_on_response_body(store, req, status, &chunk, end)
                                .await
                        }
                    }
                })
            })
            .await;
        self.implemented(called, hook, || BodyAction::Pass)
    }

    /// Which world the component was built for: `"0.2.0"` or `"0.1.0"`.
    pub fn world_version(&self) -> &'static str {
        match self.hooks {
            HookIndices::Now(..) => "0.2.0",
            HookIndices::V0_1(_) => "0.1.0",
        }
    }

    /// Remembers that the plugin does not implement `hook` (it said so), so that it is no
    /// longer called.
    fn mark_unimplemented(&self, hook: usize) {
        self.unimplemented[hook].store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Calls `on-request`. `held` is what the request keeps of this plugin between hooks.
    pub async fn on_request(
        &self,
        held: &mut Held,
        view: impl Into<Arc<RequestView>>,
    ) -> Called<RequestDecision> {
        let called = self
            .call(held, ON_REQUEST, view.into(), |slot, req| {
                Box::pin(async move {
                    let Slot { store, guests, .. } = slot;
                    match guests {
                        Guests::Now(g, _) => {
                            let guest = g.on_request.as_ref().expect("checked by caller");
                            guest.call_on_request(store, req).await
                        }
                        Guests::V0_1(g) => {
                            let guest = g.on_request.as_ref().expect("checked by caller");
                            let d = guest.call_on_request(store, req).await?;
                            Ok(Some(d.into()))
                        }
                    }
                })
            })
            .await;
        self.implemented(called, ON_REQUEST, || RequestDecision {
            headers: Vec::new(),
            path: None,
            origin: None,
            respond: None,
        })
    }

    /// Calls `on-response`.
    pub async fn on_response(
        &self,
        held: &mut Held,
        view: impl Into<Arc<RequestView>>,
        resp: Response,
    ) -> Called<ResponseDecision> {
        let called = self
            .call(held, ON_RESPONSE, view.into(), move |slot, req| {
                Box::pin(async move {
                    let Slot { store, guests, .. } = slot;
                    match guests {
                        Guests::Now(g, _) => {
                            let guest = g.on_response.as_ref().expect("checked by caller");
                            guest.call_on_response(store, req, &resp).await
                        }
                        Guests::V0_1(g) => {
                            let guest = g.on_response.as_ref().expect("checked by caller");
                            let old = (&resp).into();
                            let d = guest.call_on_response(store, req, &old).await?;
                            Ok(Some(d.into()))
                        }
                    }
                })
            })
            .await;
        self.implemented(called, ON_RESPONSE, || ResponseDecision {
            headers: Vec::new(),
            status: None,
            body: None,
        })
    }

    /// Calls `on-complete`.
    pub async fn on_complete(
        &self,
        held: &mut Held,
        view: impl Into<Arc<RequestView>>,
        info: Completion,
    ) -> Called<()> {
        let called = self
            .call(held, ON_COMPLETE, view.into(), move |slot, req| {
                Box::pin(async move {
                    let Slot { store, guests, .. } = slot;
                    match guests {
                        Guests::Now(g, _) => {
                            let guest = g.on_complete.as_ref().expect("checked by caller");
                            let implemented = guest.call_on_complete(store, req, &info).await?;
                            Ok(implemented.then_some(()))
                        }
                        Guests::V0_1(g) => {
                            let guest = g.on_complete.as_ref().expect("checked by caller");
                            let old = (&info).into();
                            guest.call_on_complete(store, req, &old).await?;
                            Ok(Some(()))
                        }
                    }
                })
            })
            .await;
        self.implemented(called, ON_COMPLETE, || ())
    }

    /// A hook's answer: a plugin that says it does not implement the hook (an SDK default)
    /// changed nothing, and is not called for it again.
    fn implemented<T>(
        &self,
        called: Called<Option<T>>,
        hook: usize,
        nothing: impl FnOnce() -> T,
    ) -> Called<T> {
        let result = called.result.map(|answer| {
            answer.unwrap_or_else(|| {
                self.mark_unimplemented(hook);
                nothing()
            })
        });
        Called {
            result,
            events: called.events,
        }
    }

    /// Runs one hook on an instance: takes one (held, idle or new), exposes the request view
    /// for the call, enforces the deadline, collects audit events, classifies failures and
    /// returns or drops the instance.
    async fn call<T, F>(
        &self,
        held: &mut Held,
        hook: usize,
        view: Arc<RequestView>,
        f: F,
    ) -> Called<T>
    where
        F: for<'a> FnOnce(
            &'a mut Slot,
            Resource<SharedView>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = wasmtime::Result<T>> + Send + 'a>,
        >,
    {
        let start = Instant::now();
        let duration = &self.durations[hook];
        let mut slot = match self.acquire(&mut held.slot).await {
            Ok(s) => s,
            Err(e) => {
                self.count_error(&e);
                return Called {
                    result: Err(e),
                    events: Vec::new(),
                };
            }
        };
        // The request's context for this plugin, lent for the call (and taken back below,
        // whatever the outcome: the instance itself keeps none between requests).
        std::mem::swap(&mut slot.store.data_mut().context, &mut held.context);
        let waiting = slot.store.data().waiting.clone();
        waiting.reset();
        slot.store.data_mut().outbound_calls = 0;
        let outcome = match slot
            .store
            .data_mut()
            .table
            .push(SharedView::new(view, self.config().grants))
        {
            Ok(own) => {
                let borrow = Resource::new_borrow(own.rep());
                slot.store.data_mut().limiter.denied = false;
                let _running = self.runtime.running();
                slot.store.set_epoch_deadline(1);
                // The deadline bounds the hook's wall-clock time less what it spent waiting on
                // outbound HTTP calls (which have deadlines of their own); it also stops a
                // plugin blocked in another host call. The instance is then dropped below.
                let deadline = self.wall_deadline();
                match outbound::within(deadline, &waiting, f(&mut slot, borrow)).await {
                    Some(r) => {
                        let _ = slot.store.data_mut().table.delete(own);
                        r
                    }
                    None => Err(wasmtime::Error::from(wasmtime::Trap::Interrupt)),
                }
            }
            Err(e) => Err(e.into()),
        };
        let data = slot.store.data_mut();
        std::mem::swap(&mut data.context, &mut held.context);
        let events = std::mem::take(&mut data.events);
        let dropped = std::mem::take(&mut data.dropped_events);
        if dropped > 0 {
            tracing::warn!(
                plugin = &*self.name,
                dropped,
                "plugin emitted more than {} audit events in one call; the rest were dropped",
                host::MAX_EVENTS_PER_CALL
            );
            self.metrics
                .plugin_errors
                .get_or_create(&PluginErrorLabels {
                    plugin: self.name.to_string(),
                    kind: "audit-overflow",
                })
                .inc_by(dropped as u64);
        }
        let result = match outcome {
            Ok(v) => {
                slot.calls += 1;
                self.release(&mut held.slot, slot);
                Ok(v)
            }
            Err(e) => {
                let err = self.classify(&e, slot.store.data());
                // A failed instance is never reused.
                drop(slot);
                Err(err)
            }
        };
        duration.observe(start.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.count_error(e);
        }
        Called { result, events }
    }

    /// Refuses a decision of this plugin: counted in `/metrics` like any other failure.
    pub fn refuse(&self, reason: String) -> PluginError {
        let err = PluginError::InvalidDecision(reason);
        self.count_error(&err);
        err
    }

    /// Counts a failure in `/metrics`.
    pub fn count_error(&self, e: &PluginError) {
        self.metrics
            .plugin_errors
            .get_or_create(&PluginErrorLabels {
                plugin: self.name.to_string(),
                kind: e.kind(),
            })
            .inc();
    }

    async fn acquire(&self, held: &mut Option<Slot>) -> Result<Slot, PluginError> {
        if let Some(slot) = held.take() {
            return Ok(slot);
        }
        if self.config.isolation == Isolation::Reuse {
            if let Some(slot) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
                return Ok(slot);
            }
        }
        self.instantiate().await
    }

    fn release(&self, held: &mut Option<Slot>, slot: Slot) {
        match self.config.isolation {
            Isolation::PerRequest => *held = Some(slot),
            Isolation::Reuse => {
                let retired = self.retired.load(std::sync::atomic::Ordering::Relaxed);
                if slot.calls < self.config.max_calls && !retired {
                    let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                    if idle.len() < MAX_IDLE {
                        idle.push(slot);
                    }
                }
            }
        }
    }

    /// A fresh instance with `init` run. An `init` error comes back as `InvalidDecision`
    /// carrying the plugin's message (the loader turns it into [`LoadError::Init`]).
    async fn instantiate(&self) -> Result<Slot, PluginError> {
        // Guest code runs from here on: `start` functions, then `init`.
        let _running = self.runtime.running();
        let mut data = StoreData::new(self.name.clone(), self.config.memory);
        if self.config.grants.kv {
            data.kv = Some(self.runtime.kv.access(&self.name, self.config.kv));
        }
        data.outbound = self.outbound.clone();
        if self.config.grants.metrics {
            data.metrics = Some(
                self.metrics
                    .plugin_metrics
                    .access(&self.name, self.config.metrics_max_series),
            );
        }
        let mut store = Store::new(&self.runtime.engine, data);
        store.limiter(|d| &mut d.limiter);
        // Guest code yields to the async runtime at every epoch tick, so a hook that runs to
        // its deadline never holds a worker thread; the deadline itself is the wall-clock
        // bound around each call, which drops the call (and the instance) when it passes.
        store.epoch_deadline_async_yield_and_update(1);
        store.set_epoch_deadline(1);
        let started = tokio::time::timeout(INIT_DEADLINE, self.pre.instantiate_async(&mut store))
            .await
            .unwrap_or_else(|_| Err(wasmtime::Error::from(wasmtime::Trap::Interrupt)));
        let instance: Instance = match started {
            Ok(i) => i,
            Err(e) if e.is::<wasmtime::PoolConcurrencyLimitError>() => {
                return Err(PluginError::Unavailable)
            }
            Err(e) => {
                return Err(PluginError::Instantiate(
                    self.classify(&e, store.data()).to_string(),
                ))
            }
        };
        let live = self
            .metrics
            .plugin_instances
            .get_or_create(&PluginLabels {
                plugin: self.name.to_string(),
            })
            .clone();
        live.inc();
        let guests = self
            .hooks
            .load(&mut store, &instance)
            .map_err(|e| PluginError::Instantiate(format!("{e:#}")))?;
        let mut slot = Slot {
            guests,
            calls: 0,
            store,
            live,
        };
        {
            slot.store.set_epoch_deadline(1);
            let init = tokio::time::timeout(
                INIT_DEADLINE,
                self.hooks
                    .init(&mut slot.store, &instance, &self.config.config_json),
            )
            .await
            .unwrap_or_else(|_| Err(wasmtime::Error::from(wasmtime::Trap::Interrupt)));
            match init {
                Ok(Ok(())) => {}
                Ok(Err(message)) => return Err(PluginError::InvalidDecision(message)),
                Err(e) => {
                    return Err(PluginError::Instantiate(
                        self.classify(&e, slot.store.data()).to_string(),
                    ))
                }
            }
            // Events emitted during init have no request to belong to: discarded, and said so.
            let discarded = std::mem::take(&mut slot.store.data_mut().events).len();
            if discarded > 0 {
                tracing::warn!(
                    plugin = &*self.name,
                    discarded,
                    "audit events emitted in init are discarded (no request)"
                );
            }
        }
        Ok(slot)
    }

    /// The wall-clock bound of a hook call: the configured timeout plus one tick of slack, so
    /// that the epoch deadline normally fires first (it is cheaper and keeps the trap inside
    /// wasm).
    fn wall_deadline(&self) -> Duration {
        self.config.timeout + runtime::TICK * 2
    }

    fn classify(&self, err: &wasmtime::Error, data: &StoreData) -> PluginError {
        if data.limiter.denied {
            return PluginError::Memory(self.config.memory);
        }
        if let Some(trap) = err.downcast_ref::<wasmtime::Trap>() {
            if *trap == wasmtime::Trap::Interrupt {
                return PluginError::Timeout(self.config.timeout);
            }
        }
        PluginError::Trap(
            format!("{err:#}")
                .lines()
                .next()
                .unwrap_or("trap")
                .to_string(),
        )
    }
}
