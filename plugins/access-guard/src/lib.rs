//! access-guard: answers 401 or 403 locally unless the request carries one of a list of bearer
//! tokens or a valid HS256 JWT (signature, issuer, audience, expiry and not-before checked).
//!
//! The plugin reads the `authorization` header, which the host shows only to plugins granted
//! `credentials`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use sluice_sdk::{audit, export_plugin, LocalResponse, Plugin, Request, RequestDecision};
use subtle::ConstantTimeEq;

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Accepted opaque bearer tokens.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Accept HS256 JWTs.
    pub jwt: Option<JwtConfig>,
    /// Realm in `WWW-Authenticate`. Default `sluice`.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Remove `authorization` before the request goes to the origin. Default false.
    #[serde(default)]
    pub strip_authorization: bool,
    /// Emit a `denied` audit event for every refused request. Default false.
    #[serde(default)]
    pub audit_denials: bool,
}

/// HS256 JWT checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The shared secret.
    pub secret: String,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud` (a string, or one of an array).
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, seconds. Default 30.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
}

/// Header carrying the JWT's `sub` to the origin.
pub const SUBJECT: &str = "x-auth-subject";

fn default_realm() -> String {
    "sluice".into()
}

fn default_leeway() -> u64 {
    30
}

/// Why a JWT was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    /// Not three base64url parts of JSON.
    Malformed,
    /// `alg` is not HS256.
    Algorithm,
    /// The signature does not match.
    Signature,
    /// `exp` missing or in the past.
    Expired,
    /// `nbf` in the future.
    NotYetValid,
    /// `iss` differs.
    Issuer,
    /// `aud` differs.
    Audience,
}

/// The plugin.
#[derive(Debug)]
pub struct AccessGuard {
    config: Config,
}

impl AccessGuard {
    /// Verifies an HS256 JWT at time `now` (seconds since the epoch); returns its claims.
    pub fn verify_jwt(
        cfg: &JwtConfig,
        token: &str,
        now: u64,
    ) -> Result<serde_json::Value, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).map_err(|_| JwtError::Malformed)?)
                .map_err(|_| JwtError::Malformed)?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            return Err(JwtError::Algorithm);
        }
        let signature = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Malformed)?;
        let mut mac = Hmac::<Sha256>::new_from_slice(cfg.secret.as_bytes())
            .map_err(|_| JwtError::Signature)?;
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&signature)
            .map_err(|_| JwtError::Signature)?;
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).map_err(|_| JwtError::Malformed)?)
                .map_err(|_| JwtError::Malformed)?;
        let exp = claims
            .get("exp")
            .and_then(|v| v.as_u64())
            .ok_or(JwtError::Expired)?;
        if now > exp.saturating_add(cfg.leeway_secs) {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = claims.get("nbf").and_then(|v| v.as_u64()) {
            if nbf > now.saturating_add(cfg.leeway_secs) {
                return Err(JwtError::NotYetValid);
            }
        }
        if let Some(iss) = &cfg.issuer {
            if claims.get("iss").and_then(|v| v.as_str()) != Some(iss.as_str()) {
                return Err(JwtError::Issuer);
            }
        }
        if let Some(aud) = &cfg.audience {
            let ok = match claims.get("aud") {
                Some(serde_json::Value::String(a)) => a == aud,
                Some(serde_json::Value::Array(list)) => {
                    list.iter().any(|a| a.as_str() == Some(aud.as_str()))
                }
                _ => false,
            };
            if !ok {
                return Err(JwtError::Audience);
            }
        }
        Ok(claims)
    }

    fn token_listed(&self, token: &str) -> bool {
        // Check every token, so the time taken does not tell which one came close.
        self.config.tokens.iter().fold(0u8, |found, t| {
            found | u8::from(bool::from(t.as_bytes().ct_eq(token.as_bytes())))
        }) == 1
    }

    fn deny(
        &self,
        req: &Request,
        status: u16,
        error: Option<&str>,
        reason: &str,
    ) -> RequestDecision {
        if self.config.audit_denials {
            audit::emit(
                "denied",
                &[
                    ("status", &status.to_string()),
                    ("reason", reason),
                    ("path", req.path()),
                ],
            );
        }
        let challenge = match error {
            Some(e) => format!("Bearer realm=\"{}\", error=\"{e}\"", self.config.realm),
            None => format!("Bearer realm=\"{}\"", self.config.realm),
        };
        let text = if status == 401 {
            "authentication required\n"
        } else {
            "access denied\n"
        };
        RequestDecision::new().respond(
            LocalResponse::new(status)
                .header("www-authenticate", &challenge)
                .text(text),
        )
    }

    /// The decision for `req` at time `now` (seconds since the epoch).
    pub fn decide(&self, req: &Request, now: u64) -> RequestDecision {
        let Some(auth) = req.header("authorization") else {
            return self.deny(req, 401, None, "no credentials");
        };
        let Some(token) = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
            .map(str::trim)
        else {
            return self.deny(req, 401, Some("invalid_request"), "not a bearer token");
        };
        // The subject header is the plugin's to set: a client-sent one never reaches the origin.
        let mut allowed = RequestDecision::new().remove_header(SUBJECT);
        if self.config.strip_authorization {
            allowed = allowed.remove_header("authorization");
        }
        if self.token_listed(token) {
            return allowed;
        }
        if let Some(jwt) = &self.config.jwt {
            match Self::verify_jwt(jwt, token, now) {
                Ok(claims) => {
                    if let Some(sub) = claims.get("sub").and_then(|s| s.as_str()) {
                        allowed = allowed.set_header(SUBJECT, sub);
                    }
                    return allowed;
                }
                Err(e) => return self.deny(req, 403, Some("invalid_token"), &format!("{e:?}")),
            }
        }
        self.deny(req, 403, Some("invalid_token"), "unknown token")
    }
}

impl Plugin for AccessGuard {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.tokens.is_empty() && config.jwt.is_none() {
            return Err("configure `tokens`, `jwt`, or both".into());
        }
        if config.tokens.iter().any(|t| t.len() < 16) {
            return Err("bearer tokens must be at least 16 characters".into());
        }
        if config.realm.is_empty()
            || !config
                .realm
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            return Err("realm must be printable ASCII without quotes or backslashes".into());
        }
        if let Some(j) = &config.jwt {
            if j.secret.len() < 32 {
                return Err("jwt.secret must be at least 32 bytes".into());
            }
        }
        Ok(AccessGuard { config })
    }

    fn on_request(&self, req: &Request) -> RequestDecision {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.decide(req, now)
    }
}

export_plugin!(AccessGuard);

/// Signs claims as an HS256 JWT (for tests and tooling).
pub fn sign_hs256(secret: &str, claims: &serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{sig}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_sdk::load;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_800_000_000;

    fn guard() -> AccessGuard {
        load(
            json!({
                "tokens": ["static-token-0123456789"],
                "jwt": {"secret": SECRET, "issuer": "https://id.example.com", "audience": "app"},
                "strip_authorization": true
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    fn with_token(t: &str) -> Request<'static> {
        Request::new("GET", "https://app.test/")
            .with_header("authorization", &format!("Bearer {t}"))
    }

    fn status(d: &RequestDecision) -> Option<u16> {
        d.respond.as_ref().map(|r| r.status)
    }

    #[test]
    fn missing_credentials_get_401_with_a_challenge() {
        let d = guard().decide(&Request::new("GET", "https://app.test/"), NOW);
        let r = d.respond.unwrap();
        assert_eq!(r.status, 401);
        assert!(r
            .headers
            .iter()
            .any(|(n, v)| n == "www-authenticate" && v == br#"Bearer realm="sluice""#));
    }

    #[test]
    fn listed_bearer_tokens_pass() {
        let d = guard().decide(
            &with_token("static-token-0123456789").with_header(SUBJECT, "forged"),
            NOW,
        );
        assert_eq!(status(&d), None);
        assert_eq!(
            d.headers,
            vec![
                sluice_sdk::HeaderEdit::Remove(SUBJECT.into()),
                sluice_sdk::HeaderEdit::Remove("authorization".into())
            ],
            "a client-sent subject header is removed"
        );
        assert_eq!(
            status(&guard().decide(&with_token("static-token-0123456780"), NOW)),
            Some(403)
        );
    }

    #[test]
    fn jwt_claims_are_checked() {
        let g = guard();
        let good = json!({"sub": "ada", "iss": "https://id.example.com", "aud": ["app", "other"], "exp": NOW + 60, "nbf": NOW - 60});
        let d = g.decide(&with_token(&sign_hs256(SECRET, &good)), NOW);
        assert_eq!(status(&d), None);
        assert!(d.headers.contains(&sluice_sdk::HeaderEdit::Set(
            "x-auth-subject".into(),
            b"ada".to_vec()
        )));

        let cfg = g.config.jwt.as_ref().unwrap();
        let check = |claims: serde_json::Value| {
            AccessGuard::verify_jwt(cfg, &sign_hs256(SECRET, &claims), NOW).unwrap_err()
        };
        assert_eq!(
            check(json!({"iss": "https://id.example.com", "aud": "app", "exp": NOW - 3600})),
            JwtError::Expired
        );
        assert_eq!(
            check(json!({"iss": "https://id.example.com", "aud": "app"})),
            JwtError::Expired
        );
        assert_eq!(
            check(
                json!({"iss": "https://id.example.com", "aud": "app", "exp": NOW + 60, "nbf": NOW + 3600})
            ),
            JwtError::NotYetValid
        );
        assert_eq!(
            check(json!({"iss": "https://evil.example.com", "aud": "app", "exp": NOW + 60})),
            JwtError::Issuer
        );
        assert_eq!(
            check(json!({"iss": "https://id.example.com", "aud": "other", "exp": NOW + 60})),
            JwtError::Audience
        );
        let forged = sign_hs256("another-secret-another-secret-xx", &good);
        assert_eq!(
            AccessGuard::verify_jwt(cfg, &forged, NOW).unwrap_err(),
            JwtError::Signature
        );
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(good.to_string())
        );
        assert_eq!(
            AccessGuard::verify_jwt(cfg, &none_alg, NOW).unwrap_err(),
            JwtError::Algorithm
        );
        assert_eq!(
            AccessGuard::verify_jwt(cfg, "a.b", NOW).unwrap_err(),
            JwtError::Malformed
        );
        assert_eq!(status(&g.decide(&with_token(&forged), NOW)), Some(403));
    }

    #[test]
    fn weak_configs_are_refused() {
        assert!(load::<AccessGuard>(br#"{}"#).is_err());
        assert!(load::<AccessGuard>(br#"{"tokens": ["short"]}"#).is_err());
        assert!(load::<AccessGuard>(br#"{"jwt": {"secret": "short"}}"#).is_err());
        assert!(load::<AccessGuard>(
            br#"{"tokens": ["static-token-0123456789"], "realm": "a\"b"}"#
        )
        .is_err());
    }
}
