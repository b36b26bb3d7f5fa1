//! body-limit: caps the size of request bodies. A body that announces a larger
//! `content-length` is refused before a byte of it moves; a body of unknown length (chunked)
//! is counted as it streams through `on-request-body`, and refused with `413` the moment it
//! passes the cap: the origin's request is abandoned, and the client gets the plugin's answer.
//!
//! Small on purpose: it shows the body hooks (a count kept in the body's context across
//! pieces, `reject` with a response) next to an `on-request` check of the same rule.

use serde::Deserialize;
use sluice_sdk::{
    audit, context, export_plugin, BodyAction, LocalResponse, Plugin, Request, RequestDecision,
};

/// The operator's `[plugin.config]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Largest request body, bytes.
    pub max_bytes: u64,
    /// Methods the cap applies to (all by default), such as `["POST", "PUT"]`.
    #[serde(default)]
    pub methods: Vec<String>,
}

/// The plugin.
#[derive(Debug)]
pub struct BodyLimit {
    max: u64,
    methods: Vec<String>,
}

impl BodyLimit {
    fn applies(&self, req: &Request) -> bool {
        self.methods.is_empty() || self.methods.iter().any(|m| m == req.method())
    }

    fn too_large(&self, seen: u64) -> LocalResponse {
        audit::emit(
            "denied",
            &[
                ("plugin", "body-limit"),
                ("reason", "body too large"),
                ("bytes", &seen.to_string()),
            ],
        );
        LocalResponse::new(413).text(&format!("request body larger than {} bytes\n", self.max))
    }
}

impl Plugin for BodyLimit {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(BodyLimit {
            max: config.max_bytes,
            methods: config
                .methods
                .iter()
                .map(|m| m.to_ascii_uppercase())
                .collect(),
        })
    }

    /// An announced length over the cap is refused at once.
    fn on_request(&self, req: &Request) -> RequestDecision {
        let announced = req
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        match announced {
            Some(n) if n > self.max && self.applies(req) => {
                RequestDecision::new().respond(self.too_large(n))
            }
            _ => RequestDecision::new(),
        }
    }

    /// Counts what streams (the count lives in the body's context) and stops past the cap.
    fn on_request_body(&self, req: &Request, chunk: &[u8], _end: bool) -> BodyAction {
        if !self.applies(req) {
            return BodyAction::Pass;
        }
        let seen = context::get_str("seen")
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            + chunk.len() as u64;
        if seen > self.max {
            return BodyAction::Reject(self.too_large(seen));
        }
        match context::set("seen", seen.to_string()) {
            Ok(()) => BodyAction::Pass,
            // Cannot happen within the context's limits; refuse rather than stop counting.
            Err(_) => BodyAction::Reject(self.too_large(seen)),
        }
    }
}

export_plugin!(BodyLimit);
