//! jwt: admits a request only with a valid bearer token — a JWT signed with RS256, ES256 or
//! EdDSA (Ed25519) by a key of the operator's JWKS, issued by the configured issuer for the
//! configured audience, and within its validity period — and forwards chosen claims to the
//! origin as headers.
//!
//! The JWKS is fetched with the `http` grant and cached in the plugin's key-value store (the
//! `kv` grant), so that every instance, and with `[kv] redis` every connector, shares one copy.
//! A token naming a key the cache does not have causes one refetch (a key rotation), at most
//! once per `refetch-interval` whatever the traffic. Reading `authorization` needs the
//! `credentials` grant.

mod keys;
mod token;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use sluice_sdk::{
    audit, clock, export_plugin, http, kv, log, LocalResponse, Plugin, Request, RequestDecision,
};

pub use keys::KeySet;
pub use token::{Claims, Reject};

/// The operator's `[plugin.config]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Where the JWKS is: an `https://` URL on the plugin's `allow-hosts`, or with
    /// `jwks-origin` a path on that configured origin.
    pub jwks_url: String,
    /// A configured origin (on `allow-origins`) serving the JWKS at `jwks-url`.
    #[serde(default)]
    pub jwks_origin: Option<String>,
    /// The `iss` a token must carry.
    pub issuer: String,
    /// The audience: a token's `aud` must name one of these.
    pub audience: OneOrMany,
    /// Algorithms accepted (all three by default): `RS256`, `ES256`, `EdDSA`.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`, seconds.
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    /// Claims forwarded to the origin: claim name → header name. A header named here is
    /// always removed from the client's request first, so a client cannot forge it.
    #[serde(default = "default_claims")]
    pub claims: BTreeMap<String, String>,
    /// How long the fetched JWKS is used before it is fetched again, seconds.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl_s: u64,
    /// The shortest time between two fetches caused by unknown key ids, and the time a
    /// failed fetch is not tried again, seconds.
    #[serde(default = "default_refetch_interval")]
    pub refetch_interval_s: u64,
    /// Allows an `http://` JWKS URL: keys fetched in the clear can be swapped by anyone on
    /// the path, who can then forge tokens. For a JWKS on the connector's own machine.
    #[serde(default)]
    pub danger_allow_http: bool,
}

/// A string, or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

fn default_algorithms() -> Vec<String> {
    token::ALGORITHMS.iter().map(|a| a.to_string()).collect()
}
fn default_leeway() -> u64 {
    60
}
fn default_claims() -> BTreeMap<String, String> {
    BTreeMap::from([("sub".to_string(), "x-auth-subject".to_string())])
}
fn default_cache_ttl() -> u64 {
    600
}
fn default_refetch_interval() -> u64 {
    30
}

/// Key of the cached JWKS document in the plugin's store.
const JWKS_KEY: &str = "jwks";
/// Key whose presence says a refetch happened recently.
const REFETCH_KEY: &str = "jwks:refetch";
/// Key whose presence says a fetch failed recently: no fetch until it expires.
const DOWN_KEY: &str = "jwks:down";
/// Longest token accepted, bytes.
const MAX_TOKEN: usize = 8 * 1024;

/// The plugin.
#[derive(Debug)]
pub struct Jwt {
    jwks_url: String,
    jwks_origin: Option<String>,
    policy: token::Policy,
    claims: Vec<(String, String)>,
    cache_ttl: Duration,
    refetch_interval: Duration,
    /// This instance's parsed copy of the JWKS, and the document it came from.
    memo: RefCell<Option<(Vec<u8>, KeySet)>>,
}

/// Why no key set is at hand.
#[derive(Debug)]
struct Unavailable(String);

impl Jwt {
    /// The key set: this instance's copy if it is the stored one, else the stored one, else
    /// fetched. `fresh` asks for a refetch (an unknown key id), rate-limited across instances.
    fn key_set(&self, refetch: bool) -> Result<std::cell::Ref<'_, KeySet>, Unavailable> {
        let stored = kv::get(JWKS_KEY).unwrap_or_else(|e| {
            log::warn(&format!("cannot read the cached JWKS: {e}"));
            None
        });
        let mut doc = stored;
        if refetch && self.may_refetch() {
            doc = self.fetch().map(Some).unwrap_or_else(|e| {
                log::warn(&format!(
                    "JWKS refetch failed, keeping the cached keys: {}",
                    e.0
                ));
                doc
            });
        }
        let doc = match doc {
            Some(d) => d,
            // A fetch failed a moment ago: no request waits on another until the marker
            // expires (the last keys this instance knew serve meanwhile, if any).
            None if kv::get(DOWN_KEY).ok().flatten().is_some() => {
                match self.memo.borrow().is_some() {
                    true => {
                        return Ok(std::cell::Ref::map(self.memo.borrow(), |m| {
                            &m.as_ref().expect("checked above").1
                        }))
                    }
                    false => {
                        return Err(Unavailable("the JWKS could not be fetched just now".into()))
                    }
                }
            }
            None => match self.fetch() {
                Ok(d) => d,
                // The last keys this instance knew beat no keys at all.
                Err(e) if self.memo.borrow().is_some() => {
                    log::warn(&format!("JWKS fetch failed, using the last keys: {}", e.0));
                    return Ok(std::cell::Ref::map(self.memo.borrow(), |m| {
                        &m.as_ref().expect("checked above").1
                    }));
                }
                Err(e) => return Err(e),
            },
        };
        let current = matches!(&*self.memo.borrow(), Some((d, _)) if *d == doc);
        if !current {
            let set = KeySet::parse(&doc).map_err(|e| Unavailable(format!("the JWKS: {e}")))?;
            *self.memo.borrow_mut() = Some((doc, set));
        }
        Ok(std::cell::Ref::map(self.memo.borrow(), |m| {
            &m.as_ref().expect("set above").1
        }))
    }

    /// Whether this request may refetch: one refetch per interval across all instances.
    fn may_refetch(&self) -> bool {
        kv::compare_and_swap(REFETCH_KEY, None, "1", Some(self.refetch_interval)).unwrap_or(false)
    }

    /// Fetches the JWKS, checks that it parses and caches it.
    fn fetch(&self) -> Result<Vec<u8>, Unavailable> {
        let mut req = http::Request::get(&self.jwks_url).header("accept", "application/json");
        if let Some(o) = &self.jwks_origin {
            req = req.origin(o);
        }
        let fetched = req
            .send()
            .map_err(|e| Unavailable(format!("fetching {}: {e}", self.jwks_url)))
            .and_then(|resp| match resp.status {
                200 => Ok(resp),
                status => Err(Unavailable(format!(
                    "fetching {}: status {status}",
                    self.jwks_url
                ))),
            })
            .and_then(|resp| {
                KeySet::parse(&resp.body).map(|_| resp).map_err(|e| {
                    Unavailable(format!("{} is not a usable JWKS: {e}", self.jwks_url))
                })
            });
        let resp = match fetched {
            Ok(r) => r,
            Err(e) => {
                let _ = kv::set(DOWN_KEY, "1", Some(self.refetch_interval));
                return Err(e);
            }
        };
        if let Err(e) = kv::set(JWKS_KEY, &resp.body, Some(self.cache_ttl)) {
            log::warn(&format!("cannot cache the JWKS: {e}"));
        }
        Ok(resp.body)
    }

    /// Verifies `raw`, refetching the keys once if it names a key id not among them.
    fn verify(&self, raw: &str) -> Result<Claims, Reject> {
        let now = clock::now_ms() / 1000;
        let parsed = token::Token::parse(raw)?;
        let known = |set: &KeySet| parsed.kid().is_none_or(|kid| set.has(kid));
        let set = match self.key_set(false) {
            Ok(set) if known(&set) => set,
            Ok(set) => {
                drop(set);
                self.key_set(true).map_err(|e| Reject::Unavailable(e.0))?
            }
            Err(e) => return Err(Reject::Unavailable(e.0)),
        };
        parsed.verify(&set, &self.policy, now)
    }
}

impl Plugin for Jwt {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        for a in &config.algorithms {
            if !token::ALGORITHMS.contains(&a.as_str()) {
                return Err(format!(
                    "unsupported algorithm {a:?}: jwt verifies {}",
                    token::ALGORITHMS.join(", ")
                ));
            }
        }
        if config.algorithms.is_empty() {
            return Err("algorithms is empty: no token could pass".into());
        }
        let audience = match config.audience {
            OneOrMany::One(a) => vec![a],
            OneOrMany::Many(a) => a,
        };
        if audience.is_empty() || config.issuer.is_empty() {
            return Err("issuer and audience must not be empty".into());
        }
        match &config.jwks_origin {
            Some(_) if !config.jwks_url.starts_with('/') => {
                return Err("with jwks-origin, jwks-url is a path starting with /".into())
            }
            None if !(config.jwks_url.starts_with("https://")
                || config.danger_allow_http && config.jwks_url.starts_with("http://")) =>
            {
                return Err(format!(
                    "jwks-url {:?} must be an https:// URL (or a path, with jwks-origin; http:// only with danger-allow-http)",
                    config.jwks_url
                ))
            }
            _ => {}
        }
        for header in config.claims.values() {
            let valid = !header.is_empty()
                && header
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid || header == "authorization" || header == "host" {
                return Err(format!(
                    "claims: {header:?} cannot carry a claim: use a lowercase header name of your own"
                ));
            }
        }
        if config.refetch_interval_s == 0 || config.cache_ttl_s == 0 {
            return Err("cache-ttl-s and refetch-interval-s must be at least 1".into());
        }
        Ok(Jwt {
            jwks_url: config.jwks_url,
            jwks_origin: config.jwks_origin,
            policy: token::Policy {
                issuer: config.issuer,
                audience,
                algorithms: config.algorithms,
                leeway: config.leeway_s,
            },
            claims: config.claims.into_iter().collect(),
            cache_ttl: Duration::from_secs(config.cache_ttl_s),
            refetch_interval: Duration::from_secs(config.refetch_interval_s),
            memo: RefCell::new(None),
        })
    }

    fn on_request(&self, req: &Request) -> RequestDecision {
        let bearer = req
            .header("authorization")
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let verdict = match bearer {
            None => Err(Reject::Missing),
            Some(t) if t.len() > MAX_TOKEN => Err(Reject::Invalid("token too long".into())),
            Some(t) => self.verify(t),
        };
        match verdict {
            Ok(claims) => {
                let mut d = RequestDecision::new();
                for (claim, header) in &self.claims {
                    d = match claims.header_value(claim) {
                        Some(v) => d.set_header(header, &v),
                        None => d.remove_header(header),
                    };
                }
                d
            }
            Err(reject) => {
                audit::emit(
                    "denied",
                    &[("plugin", "jwt"), ("reason", &reject.to_string())],
                );
                if let Reject::Unavailable(why) = &reject {
                    log::error(&format!("cannot verify tokens: {why}"));
                }
                RequestDecision::new().respond(answer(&reject))
            }
        }
    }
}

/// The client's answer: 401 with a `WWW-Authenticate` challenge (RFC 6750), or 503 when the
/// keys cannot be had.
fn answer(reject: &Reject) -> LocalResponse {
    match reject {
        Reject::Missing => LocalResponse::new(401)
            .header("www-authenticate", "Bearer realm=\"sluice\"")
            .text("unauthorized\n"),
        Reject::Unavailable(_) => LocalResponse::new(503)
            .header("retry-after", "5")
            .text("authentication unavailable\n"),
        other => LocalResponse::new(401)
            .header(
                "www-authenticate",
                &format!(
                    "Bearer realm=\"sluice\", error=\"invalid_token\", error_description=\"{}\"",
                    other.to_string().replace('"', "'")
                ),
            )
            .text("unauthorized\n"),
    }
}

export_plugin!(Jwt);
