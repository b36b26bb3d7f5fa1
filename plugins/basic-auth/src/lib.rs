//! basic-auth: HTTP Basic authentication (RFC 7617) against htpasswd entries hashed with
//! bcrypt (`htpasswd -B`). A request without valid credentials gets `401` with a challenge;
//! a valid one goes on with the user in a header, and (by default) without its
//! `authorization` header, so the origin never sees the password. Reading `authorization`
//! needs the `credentials` grant.
//!
//! bcrypt is slow on purpose (tens of milliseconds at cost 10, more in wasm): the plugin
//! remembers a successful check for `cache-s` seconds, keyed by a SHA-256 of user, password
//! and entry, so that a client sending the same credentials on every request pays once. A
//! failed check is never cached; put rate-limit before this plugin against guessing.

use std::cell::RefCell;
use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_sdk::{audit, clock, export_plugin, LocalResponse, Plugin, Request, RequestDecision};

/// The operator's `[plugin.config]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// The htpasswd file's contents: `user:$2y$...` lines (bcrypt only; `#` comments and
    /// blank lines are skipped).
    pub htpasswd: String,
    /// The realm shown by browsers.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// The header that tells the origin who the user is (a client-sent one is removed).
    #[serde(default = "default_user_header")]
    pub user_header: String,
    /// Removes `authorization` before the origin (the default), so the password stays here.
    #[serde(default = "default_true")]
    pub strip_authorization: bool,
    /// How long a successful check is remembered, seconds (0: never).
    #[serde(default = "default_cache")]
    pub cache_s: u64,
}

fn default_realm() -> String {
    "sluice".into()
}
fn default_user_header() -> String {
    "x-auth-user".into()
}
fn default_true() -> bool {
    true
}
fn default_cache() -> u64 {
    300
}

/// Most remembered successes per instance; the oldest go first past it.
const MAX_CACHED: usize = 4096;

/// The plugin.
#[derive(Debug)]
pub struct BasicAuth {
    users: HashMap<String, String>,
    challenge: String,
    user_header: String,
    strip_authorization: bool,
    cache_ms: u64,
    /// A bcrypt hash of the entries' cost, checked when the user is unknown, so that the
    /// answer takes as long as for a known user with a wrong password (the time does not
    /// tell which users exist).
    decoy: String,
    /// Digest of (user, password, entry) → when the success stops counting (ms).
    recent: RefCell<HashMap<[u8; 32], u64>>,
}

impl BasicAuth {
    /// Parses htpasswd lines; anything but bcrypt entries is refused, naming the line.
    pub fn parse_htpasswd(text: &str) -> Result<HashMap<String, String>, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("htpasswd line {}: expected user:hash", i + 1))?;
            let bcrypt = ["$2a$", "$2b$", "$2y$", "$2x$"]
                .iter()
                .any(|p| hash.starts_with(p));
            if !bcrypt || hash.len() != 60 {
                return Err(format!(
                    "htpasswd line {} ({user}): only bcrypt entries are accepted (htpasswd -B); MD5, SHA-1 and crypt hashes are too weak",
                    i + 1
                ));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(format!(
                    "htpasswd line {}: user {user:?} appears twice",
                    i + 1
                ));
            }
        }
        if users.is_empty() {
            return Err("htpasswd has no entry: nobody could log in".into());
        }
        Ok(users)
    }

    /// Whether `user` with `password` may pass.
    pub fn check(&self, user: &str, password: &str) -> bool {
        let Some(hash) = self.users.get(user) else {
            let _ = bcrypt::verify(password, &self.decoy);
            return false;
        };
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.len().to_be_bytes())
            .chain_update(user)
            .chain_update(password.len().to_be_bytes())
            .chain_update(password)
            .chain_update(hash)
            .finalize()
            .into();
        let now = clock::now_ms();
        if self
            .recent
            .borrow()
            .get(&key)
            .is_some_and(|until| *until > now)
        {
            return true;
        }
        let ok = bcrypt::verify(password, hash).unwrap_or(false);
        if ok && self.cache_ms > 0 {
            let mut recent = self.recent.borrow_mut();
            if recent.len() >= MAX_CACHED {
                recent.retain(|_, until| *until > now);
                if recent.len() >= MAX_CACHED {
                    recent.clear();
                }
            }
            recent.insert(key, now + self.cache_ms);
        }
        ok
    }

    /// Successes remembered and still counting.
    pub fn remembered(&self) -> usize {
        let now = clock::now_ms();
        self.recent
            .borrow()
            .values()
            .filter(|until| **until > now)
            .count()
    }

    fn credentials(req: &Request) -> Option<(String, String)> {
        let value = req.header("authorization")?;
        let (scheme, encoded) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = STANDARD.decode(encoded.trim()).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        Some((user.to_string(), password.to_string()))
    }
}

impl Plugin for BasicAuth {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let users = Self::parse_htpasswd(&config.htpasswd)?;
        let cost = users
            .values()
            .filter_map(|h| h.get(4..6)?.parse::<u32>().ok())
            .max()
            .unwrap_or(bcrypt::DEFAULT_COST);
        let decoy = bcrypt::hash_with_salt("decoy", cost, [7; 16])
            .map_err(|e| format!("htpasswd: a bcrypt cost of {cost}: {e}"))?
            .format_for_version(bcrypt::Version::TwoY);
        if config.realm.contains('"') || config.realm.chars().any(char::is_control) {
            return Err("realm may not contain quotes or control characters".into());
        }
        Ok(BasicAuth {
            users,
            challenge: format!("Basic realm=\"{}\", charset=\"UTF-8\"", config.realm),
            user_header: config.user_header.to_ascii_lowercase(),
            strip_authorization: config.strip_authorization,
            cache_ms: config.cache_s.saturating_mul(1000),
            decoy,
            recent: RefCell::new(HashMap::new()),
        })
    }

    fn on_request(&self, req: &Request) -> RequestDecision {
        match Self::credentials(req) {
            Some((user, password)) if self.check(&user, &password) => {
                let mut d = RequestDecision::new().set_header(&self.user_header, &user);
                if self.strip_authorization {
                    d = d.remove_header("authorization");
                }
                d
            }
            given => {
                let user = given.map(|(u, _)| u).unwrap_or_default();
                audit::emit("denied", &[("plugin", "basic-auth"), ("user", &user)]);
                RequestDecision::new().respond(
                    LocalResponse::new(401)
                        .header("www-authenticate", &self.challenge)
                        .text("unauthorized\n"),
                )
            }
        }
    }
}

export_plugin!(BasicAuth);
