//! rate-limit: a token bucket per key (the client's address, a header's value, or the
//! subject access-guard sets), kept in the plugin's key-value store. A request takes a token;
//! with none left it is answered `429 Too Many Requests` with `Retry-After`. Needs the `kv`
//! grant (and `client-addr` to key by address).

use std::time::Duration;

use serde::Deserialize;
use sluice_sdk::{clock, export_plugin, kv, log, LocalResponse, Plugin, Request, RequestDecision};

/// The operator's `[plugin.config]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Tokens added per second.
    pub rate: f64,
    /// Bucket size: requests that may come at once after a quiet spell.
    pub burst: u32,
    /// `client-ip` (default), `header:NAME`, or `subject` (`x-auth-subject`, set by
    /// access-guard for a valid token).
    #[serde(default = "default_key")]
    pub key: String,
}

fn default_key() -> String {
    "client-ip".into()
}

/// Where a request's bucket key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyFrom {
    ClientIp,
    Header(String),
}

/// The plugin.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    key: KeyFrom,
}

/// Attempts at updating a bucket another instance is updating at the same time.
const ATTEMPTS: usize = 8;

/// A bucket as stored: tokens left, and when it was last updated (ms since the epoch).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    fn parse(v: &[u8]) -> Option<Bucket> {
        let (t, at) = std::str::from_utf8(v).ok()?.split_once(':')?;
        Some(Bucket {
            tokens: t.parse().ok()?,
            at_ms: at.parse().ok()?,
        })
    }

    fn encode(&self) -> String {
        format!("{:.6}:{}", self.tokens, self.at_ms)
    }
}

/// What one request gets.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Through, with this many whole tokens left.
    Pass(u32),
    /// Refused; a token is back after this long.
    Wait(Duration),
}

impl RateLimit {
    /// The bucket `stored` refilled up to `now_ms`.
    fn refill(&self, stored: Option<Bucket>, now_ms: u64) -> Bucket {
        match stored {
            None => Bucket {
                tokens: self.burst,
                at_ms: now_ms,
            },
            Some(b) => {
                let elapsed = now_ms.saturating_sub(b.at_ms) as f64 / 1000.0;
                Bucket {
                    tokens: (b.tokens + elapsed * self.rate).min(self.burst),
                    at_ms: now_ms.max(b.at_ms),
                }
            }
        }
    }

    /// Takes a token from the bucket of `key`, if there is one.
    pub fn take(&self, key: &str) -> Result<Verdict, kv::Error> {
        let key = format!("bucket:{key}");
        // An untouched bucket fills up in burst / rate seconds: it may go then.
        let ttl = Duration::from_secs_f64((self.burst / self.rate).max(1.0) + 1.0);
        for _ in 0..ATTEMPTS {
            let stored = kv::get(&key)?;
            let now = clock::now_ms();
            let bucket = self.refill(stored.as_deref().and_then(Bucket::parse), now);
            if bucket.tokens < 1.0 {
                let wait = (1.0 - bucket.tokens) / self.rate;
                return Ok(Verdict::Wait(Duration::from_secs_f64(wait)));
            }
            let next = Bucket {
                tokens: bucket.tokens - 1.0,
                ..bucket
            };
            if kv::compare_and_swap(&key, stored.as_deref(), next.encode(), Some(ttl))? {
                return Ok(Verdict::Pass(next.tokens as u32));
            }
        }
        // Every attempt lost a race: the bucket is busy enough to call it empty.
        Ok(Verdict::Wait(Duration::from_secs_f64(1.0 / self.rate)))
    }

    fn key_of<'r>(&self, req: &'r Request) -> Option<&'r str> {
        match &self.key {
            KeyFrom::ClientIp => req.client_ip(),
            KeyFrom::Header(h) => req.header(h),
        }
    }
}

impl Plugin for RateLimit {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if !(config.rate > 0.0 && config.rate.is_finite()) {
            return Err(format!(
                "rate must be above 0 (tokens per second), not {}",
                config.rate
            ));
        }
        if config.burst == 0 {
            return Err("burst must be at least 1".into());
        }
        let key = match config.key.as_str() {
            "client-ip" => KeyFrom::ClientIp,
            "subject" => KeyFrom::Header("x-auth-subject".into()),
            other => match other.strip_prefix("header:") {
                Some(h) if !h.is_empty() => KeyFrom::Header(h.to_ascii_lowercase()),
                _ => {
                    return Err(format!(
                        "key {other:?}: use \"client-ip\", \"subject\" or \"header:NAME\""
                    ))
                }
            },
        };
        Ok(RateLimit {
            rate: config.rate,
            burst: f64::from(config.burst),
            key,
        })
    }

    fn on_request(&self, req: &Request) -> RequestDecision {
        // Requests without a key share one bucket.
        let key = self.key_of(req).unwrap_or("-");
        match self.take(key) {
            Ok(Verdict::Pass(_)) => RequestDecision::new(),
            Ok(Verdict::Wait(wait)) => {
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                RequestDecision::new().respond(
                    LocalResponse::new(429)
                        .header("retry-after", &secs.to_string())
                        .text("too many requests\n"),
                )
            }
            Err(e) => {
                // The limit is a protection, not an access control: a store failure lets the
                // request through, loudly.
                log::warn(&format!(
                    "rate-limit store failed, letting the request through: {e}"
                ));
                RequestDecision::new()
            }
        }
    }
}

export_plugin!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing;

    fn limiter(config: &str) -> RateLimit {
        sluice_sdk::load(config.as_bytes()).unwrap()
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        testing::clear_kv();
        let l = limiter(r#"{"rate": 2, "burst": 3}"#);
        for left in [2, 1, 0] {
            assert_eq!(l.take("a").unwrap(), Verdict::Pass(left));
        }
        assert_eq!(
            l.take("a").unwrap(),
            Verdict::Wait(Duration::from_millis(500))
        );
        // Another key has its own bucket.
        assert_eq!(l.take("b").unwrap(), Verdict::Pass(2));
        testing::advance(Duration::from_millis(500));
        assert_eq!(l.take("a").unwrap(), Verdict::Pass(0));
        assert!(matches!(l.take("a").unwrap(), Verdict::Wait(_)));
        // A quiet spell refills the bucket, never past the burst.
        testing::advance(Duration::from_secs(60));
        for left in [2, 1, 0] {
            assert_eq!(l.take("a").unwrap(), Verdict::Pass(left));
        }
    }

    #[test]
    fn refusals_say_when_to_come_back() {
        testing::clear_kv();
        let l = limiter(r#"{"rate": 0.1, "burst": 1, "key": "header:x-api-key"}"#);
        let req = Request::new("GET", "https://api.test/").with_header("x-api-key", "k1");
        assert_eq!(l.on_request(&req), RequestDecision::new());
        let refused = l.on_request(&req).respond.unwrap();
        assert_eq!(refused.status, 429);
        assert!(refused
            .headers
            .contains(&("retry-after".to_string(), b"10".to_vec())));
        // Keyed by the header: another key passes.
        let other = Request::new("GET", "https://api.test/").with_header("x-api-key", "k2");
        assert_eq!(l.on_request(&other), RequestDecision::new());
    }

    #[test]
    fn configurations_are_checked() {
        for (config, expect) in [
            (r#"{"rate": 0, "burst": 1}"#, "rate must be above 0"),
            (r#"{"rate": 1, "burst": 0}"#, "burst must be at least 1"),
            (
                r#"{"rate": 1, "burst": 1, "key": "cookie"}"#,
                "use \"client-ip\"",
            ),
            (
                r#"{"rate": 1, "burst": 1, "key": "header:"}"#,
                "use \"client-ip\"",
            ),
        ] {
            let err = sluice_sdk::load::<RateLimit>(config.as_bytes()).unwrap_err();
            assert!(err.contains(expect), "{config}: {err}");
        }
        let subject = limiter(r#"{"rate": 1, "burst": 1, "key": "subject"}"#);
        assert_eq!(subject.key, KeyFrom::Header("x-auth-subject".into()));
    }
}
