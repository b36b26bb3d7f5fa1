//! Write [sluice](https://github.com/sluice-tunnel/sluice) plugins in Rust.
//!
//! A plugin is a type implementing [`Plugin`]: it is built once per instance from its
//! configuration, then asked for a decision at each hook. Every hook has a default that
//! changes nothing, so a plugin implements only what it needs. [`export_plugin!`] turns the
//! type into a WebAssembly component of the `sluice:plugin` world.
//!
//! # Quickstart
//!
//! ```no_run
//! use serde::Deserialize;
//! use sluice_sdk::{export_plugin, Plugin, Request, RequestDecision};
//!
//! #[derive(Deserialize)]
//! struct Config {
//!     greeting: String,
//! }
//!
//! struct Greeter {
//!     greeting: String,
//! }
//!
//! impl Plugin for Greeter {
//!     type Config = Config;
//!
//!     fn new(config: Config) -> Result<Self, String> {
//!         Ok(Greeter { greeting: config.greeting })
//!     }
//!
//!     fn on_request(&self, req: &Request) -> RequestDecision {
//!         sluice_sdk::log::info(&format!("greeting {}", req.path()));
//!         RequestDecision::new().set_header("x-greeting", &self.greeting)
//!     }
//! }
//!
//! export_plugin!(Greeter);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (crate type `cdylib`), and
//! test its logic natively with plain `cargo test`, using [`testing`]: log lines and audit
//! events are recorded instead of sent to a host.
//!
//! # Hooks
//!
//! | hook | when | may |
//! |---|---|---|
//! | [`Plugin::new`] | once per instance, with the operator's `config` table | refuse the configuration |
//! | [`Plugin::on_request`] | before the origin is chosen, in chain order | edit headers, rewrite the path, pick an origin, answer locally |
//! | [`Plugin::on_response`] | when the response head arrives, in reverse chain order | edit response headers, change the status, replace the body |
//! | [`Plugin::on_complete`] | after the response was sent | log, emit audit events |
//!
//! The host validates every decision; see [`RequestDecision`] for what it refuses.
//! [`context`] keeps values from one hook to the next of the same request. A hook left to the
//! trait's default tells the host it is not implemented, and the host stops calling it; so
//! does a hook that calls [`decline`] because the configuration leaves it nothing to do.
//!
//! Components built with this crate are of the `sluice:plugin@0.2.0` world.
#![deny(missing_docs)]

mod types;

pub mod audit;
pub mod clock;
pub mod context;
pub mod http;
pub mod kv;
pub mod log;
pub mod metrics;
pub mod testing;

pub use types::{
    BodyAction, Completion, HeaderEdit, LocalResponse, Request, RequestDecision, Response,
    ResponseDecision,
};

/// A sluice plugin.
pub trait Plugin: Sized + 'static {
    /// The plugin's configuration: the `config` table of its `[[plugin]]` entry, deserialized
    /// from JSON. Use `serde_json::Value` to take it as is.
    type Config: serde::de::DeserializeOwned;

    /// Builds the plugin. An error rejects the configuration: the connector refuses to start
    /// (or to reload) and prints the message.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// Decides what to do with a request before the origin is chosen.
    fn on_request(&self, req: &Request) -> RequestDecision {
        let _ = req;
        __rt::not_implemented(__rt::ON_REQUEST);
        RequestDecision::default()
    }

    /// Decides what to do with the response head.
    fn on_response(&self, req: &Request, resp: &Response) -> ResponseDecision {
        let _ = (req, resp);
        __rt::not_implemented(__rt::ON_RESPONSE);
        ResponseDecision::default()
    }

    /// Sees how the request ended, after the response was sent.
    fn on_complete(&self, req: &Request, info: &Completion) {
        let _ = (req, info);
        __rt::not_implemented(__rt::ON_COMPLETE);
    }

    /// Sees the request body piece by piece on its way to the origin, and once more at the
    /// end (`end` true, maybe no bytes). Opt-in: while a plugin implements it, the origin
    /// gets the body chunked. `chunk` is the new piece after whatever the plugin held back.
    fn on_request_body(&self, req: &Request, chunk: &[u8], end: bool) -> BodyAction {
        let _ = (req, chunk, end);
        __rt::not_implemented(__rt::ON_REQUEST_BODY);
        BodyAction::Pass
    }

    /// Sees the response body piece by piece on its way to the client (after
    /// [`Plugin::on_response`]; `status` is what the client gets), as
    /// [`Plugin::on_request_body`]. While a plugin implements it, the response has no
    /// `content-length`.
    fn on_response_body(&self, req: &Request, status: u16, chunk: &[u8], end: bool) -> BodyAction {
        let _ = (req, status, chunk, end);
        __rt::not_implemented(__rt::ON_RESPONSE_BODY);
        BodyAction::Pass
    }
}

/// A hook, for [`decline`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// [`Plugin::on_request`].
    Request,
    /// [`Plugin::on_response`].
    Response,
    /// [`Plugin::on_complete`].
    Complete,
    /// [`Plugin::on_request_body`].
    RequestBody,
    /// [`Plugin::on_response_body`].
    ResponseBody,
}

/// Called from a hook, says that the hook has nothing to do under this plugin's
/// configuration: the hook answers "not implemented", as a hook left to the trait's default
/// does, what it returns is ignored, and the host stops calling it. Every instance of a plugin
/// has the same configuration, so this holds for all of them until a reload.
///
/// ```
/// # use sluice_sdk::{Hook, Request, Response, ResponseDecision};
/// # struct Rewrite { response_edits: Vec<(String, String)> }
/// # impl Rewrite {
/// fn on_response(&self, req: &Request, resp: &Response) -> ResponseDecision {
///     if self.response_edits.is_empty() {
///         sluice_sdk::decline(Hook::Response);
///     }
///     // ...
/// #   ResponseDecision::default()
/// }
/// # }
/// ```
pub fn decline(hook: Hook) {
    __rt::not_implemented(match hook {
        Hook::Request => __rt::ON_REQUEST,
        Hook::Response => __rt::ON_RESPONSE,
        Hook::Complete => __rt::ON_COMPLETE,
        Hook::RequestBody => __rt::ON_REQUEST_BODY,
        Hook::ResponseBody => __rt::ON_RESPONSE_BODY,
    });
}

/// Parses a JSON configuration the way the host's `init` does and builds the plugin.
///
/// A configuration that does not fit `P::Config` is refused with the key path of the problem
/// (`rules[0].name: unknown field ...`), as in the `[plugin.config]` table of the connector's
/// file, not a position in the JSON the host passes.
pub fn load<P: Plugin>(config: &[u8]) -> Result<P, String> {
    let mut de = serde_json::Deserializer::from_slice(config);
    let parsed: P::Config = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.inner().to_string();
        // serde_json ends its messages with a position in the JSON, which means nothing to
        // someone reading the TOML.
        let inner = inner.split(" at line ").next().unwrap_or(&inner);
        match e.path().to_string().as_str() {
            "." => format!("invalid configuration: {inner}"),
            path => format!("invalid configuration: {path}: {inner}"),
        }
    })?;
    P::new(parsed)
}

/// Exports a [`Plugin`] type as the component's hooks.
///
/// ```
/// struct Noop;
///
/// impl sluice_sdk::Plugin for Noop {
///     type Config = serde_json::Value;
///     fn new(_config: serde_json::Value) -> Result<Self, String> {
///         Ok(Noop)
///     }
/// }
///
/// sluice_sdk::export_plugin!(Noop);
/// ```
///
/// In a non-wasm build (native unit tests) this expands to nothing but a type check.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub struct __SluicePluginExport;

        impl $crate::__bindings::exports::sluice::plugin::init::Guest for __SluicePluginExport {
            fn init(config: ::std::vec::Vec<u8>) -> ::std::result::Result<(), ::std::string::String> {
                $crate::__rt::init::<$plugin>(config)
            }
        }

        impl $crate::__bindings::exports::sluice::plugin::on_request::Guest for __SluicePluginExport {
            fn on_request(
                req: &$crate::__bindings::sluice::plugin::types::Request,
            ) -> ::std::option::Option<$crate::__bindings::sluice::plugin::types::RequestDecision> {
                $crate::__rt::on_request::<$plugin>(req)
            }
        }

        impl $crate::__bindings::exports::sluice::plugin::on_response::Guest for __SluicePluginExport {
            fn on_response(
                req: &$crate::__bindings::sluice::plugin::types::Request,
                resp: $crate::__bindings::sluice::plugin::types::Response,
            ) -> ::std::option::Option<$crate::__bindings::sluice::plugin::types::ResponseDecision> {
                $crate::__rt::on_response::<$plugin>(req, resp)
            }
        }

        impl $crate::__bindings::exports::sluice::plugin::on_complete::Guest for __SluicePluginExport {
            fn on_complete(
                req: &$crate::__bindings::sluice::plugin::types::Request,
                info: $crate::__bindings::sluice::plugin::types::Completion,
            ) -> bool {
                $crate::__rt::on_complete::<$plugin>(req, info)
            }
        }

        impl $crate::__bindings::exports::sluice::plugin::on_request_body::Guest for __SluicePluginExport {
            fn on_request_body(
                req: &$crate::__bindings::sluice::plugin::types::Request,
                chunk: ::std::vec::Vec<u8>,
                end: bool,
            ) -> ::std::option::Option<$crate::__bindings::sluice::plugin::types::BodyAction> {
                $crate::__rt::on_body::<$plugin>(req, None, chunk, end)
            }
        }

        impl $crate::__bindings::exports::sluice::plugin::on_response_body::Guest for __SluicePluginExport {
            fn on_response_body(
                req: &$crate::__bindings::sluice::plugin::types::Request,
                status: u16,
                chunk: ::std::vec::Vec<u8>,
                end: bool,
            ) -> ::std::option::Option<$crate::__bindings::sluice::plugin::types::BodyAction> {
                $crate::__rt::on_body::<$plugin>(req, Some(status), chunk, end)
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::__bindings::__export_plugin_world!(__SluicePluginExport with_types_in $crate::__bindings);
    };
}

/// Bindings generated from `wit/plugin.wit`. Not part of the API.
#[doc(hidden)]
#[allow(missing_docs)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "sluice_sdk::__bindings",
        ownership: Borrowing {
            duplicate_if_necessary: true
        },
        generate_all,
    });
}

/// Glue between the generated bindings and a [`Plugin`]. Not part of the API.
#[doc(hidden)]
pub mod __rt {
    use std::any::Any;
    use std::cell::{Cell, RefCell};

    use crate::__bindings::sluice::plugin::types as wit;
    use crate::{types, Plugin};

    thread_local! {
        // A component instance is single-threaded; the plugin lives here between calls.
        static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
        // The hooks whose trait default ran: the plugin does not implement them.
        static DEFAULTS: Cell<u8> = const { Cell::new(0) };
    }

    /// Hook bits for [`not_implemented`].
    pub const ON_REQUEST: u8 = 1;
    /// See [`ON_REQUEST`].
    pub const ON_RESPONSE: u8 = 2;
    /// See [`ON_REQUEST`].
    pub const ON_COMPLETE: u8 = 4;
    /// See [`ON_REQUEST`].
    pub const ON_REQUEST_BODY: u8 = 8;
    /// See [`ON_REQUEST`].
    pub const ON_RESPONSE_BODY: u8 = 16;

    /// Called by the trait's default hooks. Every hook is exported (a trait cannot tell which
    /// methods a type overrides), so a hook the plugin leaves out is still called once: its
    /// default runs, and the hook answers "not implemented" (`none`), after which the host
    /// stops calling it.
    pub fn not_implemented(hook: u8) {
        DEFAULTS.with(|d| d.set(d.get() | hook));
    }

    fn is_default(hook: u8) -> bool {
        DEFAULTS.with(|d| d.get() & hook != 0)
    }

    fn with<P: Plugin, R>(f: impl FnOnce(&P) -> R) -> Option<R> {
        INSTANCE.with(|i| {
            i.borrow()
                .as_ref()
                .and_then(|b| b.downcast_ref::<P>())
                .map(f)
        })
    }

    pub fn init<P: Plugin>(config: Vec<u8>) -> Result<(), String> {
        let plugin = crate::load::<P>(&config)?;
        INSTANCE.with(|i| *i.borrow_mut() = Some(Box::new(plugin)));
        Ok(())
    }

    pub fn on_request<P: Plugin>(req: &wit::Request) -> Option<wit::RequestDecision> {
        if is_default(ON_REQUEST) {
            return None;
        }
        let req = types::Request::from_wit(req);
        let decision = with::<P, _>(|p| p.on_request(&req)).unwrap_or_default();
        (!is_default(ON_REQUEST)).then(|| decision.into_wit())
    }

    pub fn on_response<P: Plugin>(
        req: &wit::Request,
        resp: wit::Response,
    ) -> Option<wit::ResponseDecision> {
        if is_default(ON_RESPONSE) {
            return None;
        }
        let req = types::Request::from_wit(req);
        let resp = types::Response::from_wit(resp);
        let decision = with::<P, _>(|p| p.on_response(&req, &resp)).unwrap_or_default();
        (!is_default(ON_RESPONSE)).then(|| decision.into_wit())
    }

    pub fn on_body<P: Plugin>(
        req: &wit::Request,
        status: Option<u16>,
        chunk: Vec<u8>,
        end: bool,
    ) -> Option<wit::BodyAction> {
        let hook = match status {
            None => ON_REQUEST_BODY,
            Some(_) => ON_RESPONSE_BODY,
        };
        if is_default(hook) {
            return None;
        }
        let req = types::Request::from_wit(req);
        let action = with::<P, _>(|p| match status {
            None => p.on_request_body(&req, &chunk, end),
            Some(s) => p.on_response_body(&req, s, &chunk, end),
        })
        .unwrap_or_default();
        (!is_default(hook)).then(|| action.into_wit())
    }

    pub fn on_complete<P: Plugin>(req: &wit::Request, info: wit::Completion) -> bool {
        if is_default(ON_COMPLETE) {
            return false;
        }
        let req = types::Request::from_wit(req);
        let info = types::Completion::from_wit(info);
        with::<P, _>(|p| p.on_complete(&req, &info));
        !is_default(ON_COMPLETE)
    }
}
