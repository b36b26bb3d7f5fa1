//! A compact JWS (RFC 7515) carrying JWT claims (RFC 7519): parsing, signature verification
//! and the claim checks. Only asymmetric algorithms exist here: `none` and the HMAC family
//! are refused whatever a token's header says.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::keys::{Key, KeySet};

/// The algorithms jwt verifies.
pub const ALGORITHMS: &[&str] = &["RS256", "ES256", "EdDSA"];

/// What a token must satisfy besides its signature.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Required `iss`.
    pub issuer: String,
    /// `aud` must name one of these.
    pub audience: Vec<String>,
    /// Accepted algorithms.
    pub algorithms: Vec<String>,
    /// Tolerated clock skew, seconds.
    pub leeway: u64,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// No bearer token.
    Missing,
    /// Not a well-formed token.
    Invalid(String),
    /// The signature does not verify with any key that may have made it.
    Signature,
    /// `exp` passed.
    Expired,
    /// `nbf` not reached.
    NotYetValid,
    /// A claim check failed (issuer, audience), the message says which.
    Claim(String),
    /// The keys could not be had (the JWKS is unreachable and nothing is cached).
    Unavailable(String),
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reject::Missing => f.write_str("no bearer token"),
            Reject::Invalid(m) => write!(f, "malformed token: {m}"),
            Reject::Signature => f.write_str("bad signature"),
            Reject::Expired => f.write_str("token expired"),
            Reject::NotYetValid => f.write_str("token not yet valid"),
            Reject::Claim(m) => f.write_str(m),
            Reject::Unavailable(m) => write!(f, "keys unavailable: {m}"),
        }
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    crit: Option<Value>,
}

/// A token split and decoded, not yet verified.
pub struct Token<'a> {
    header: Header,
    signed: &'a str,
    signature: Vec<u8>,
    payload: Vec<u8>,
}

fn decode(part: &str, what: &str) -> Result<Vec<u8>, Reject> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| Reject::Invalid(format!("the {what} is not base64url")))
}

impl<'a> Token<'a> {
    /// Splits and decodes `raw` (`header.payload.signature`).
    pub fn parse(raw: &'a str) -> Result<Token<'a>, Reject> {
        let mut parts = raw.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Reject::Invalid("not three dot-separated parts".into()));
        };
        let header: Header = serde_json::from_slice(&decode(h, "header")?)
            .map_err(|_| Reject::Invalid("the header is not JSON with an alg".into()))?;
        if header.crit.is_some() {
            return Err(Reject::Invalid("critical header extensions".into()));
        }
        Ok(Token {
            header,
            signed: &raw[..h.len() + 1 + p.len()],
            signature: decode(s, "signature")?,
            payload: decode(p, "payload")?,
        })
    }

    /// The key id the header names.
    pub fn kid(&self) -> Option<&str> {
        self.header.kid.as_deref()
    }

    /// Verifies the signature with `keys`, then the claims against `policy` at `now`
    /// (seconds since the epoch).
    pub fn verify(&self, keys: &KeySet, policy: &Policy, now: u64) -> Result<Claims, Reject> {
        let alg = self.header.alg.as_str();
        if !policy.algorithms.iter().any(|a| a == alg) {
            return Err(Reject::Invalid(format!(
                "algorithm {alg:?} is not accepted"
            )));
        }
        let verified = keys
            .candidates(alg, self.kid())
            .any(|key| check(key, self.signed.as_bytes(), &self.signature));
        if !verified {
            return Err(Reject::Signature);
        }
        let claims: Map<String, Value> = serde_json::from_slice(&self.payload)
            .map_err(|_| Reject::Invalid("the payload is not a JSON object".into()))?;
        let claims = Claims(claims);
        claims.check(policy, now)?;
        Ok(claims)
    }
}

fn check(key: &Key, message: &[u8], signature: &[u8]) -> bool {
    match key {
        Key::Rsa(k) => {
            use rsa::signature::Verifier;
            rsa::pkcs1v15::Signature::try_from(signature)
                .is_ok_and(|sig| k.verify(message, &sig).is_ok())
        }
        Key::P256(k) => {
            use p256::ecdsa::signature::Verifier;
            p256::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|sig| k.verify(message, &sig).is_ok())
        }
        Key::Ed25519(k) => ed25519_dalek::Signature::from_slice(signature)
            .is_ok_and(|sig| k.verify_strict(message, &sig).is_ok()),
    }
}

/// A verified token's claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims(pub Map<String, Value>);

impl Claims {
    fn seconds(&self, name: &str) -> Result<Option<u64>, Reject> {
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| Some(s as u64))
                .ok_or_else(|| Reject::Invalid(format!("{name} is not a number of seconds"))),
        }
    }

    fn check(&self, policy: &Policy, now: u64) -> Result<(), Reject> {
        let exp = self
            .seconds("exp")?
            .ok_or_else(|| Reject::Claim("the token has no exp".into()))?;
        if now >= exp.saturating_add(policy.leeway) {
            return Err(Reject::Expired);
        }
        if let Some(nbf) = self.seconds("nbf")? {
            if now.saturating_add(policy.leeway) < nbf {
                return Err(Reject::NotYetValid);
            }
        }
        if self.0.get("iss").and_then(Value::as_str) != Some(policy.issuer.as_str()) {
            return Err(Reject::Claim("wrong issuer".into()));
        }
        let audiences: Vec<&str> = match self.0.get("aud") {
            Some(Value::String(a)) => vec![a.as_str()],
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !audiences
            .iter()
            .any(|a| policy.audience.iter().any(|want| want == a))
        {
            return Err(Reject::Claim("wrong audience".into()));
        }
        Ok(())
    }

    /// Claim `name` as a header value: text as is, numbers and booleans as JSON, a list of
    /// texts joined with `,`, anything else as JSON; `None` when absent, null, or not a valid
    /// header value.
    pub fn header_value(&self, name: &str) -> Option<String> {
        let text = match self.0.get(name)? {
            Value::Null => return None,
            Value::String(s) => s.clone(),
            Value::Array(list) if list.iter().all(Value::is_string) => list
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        let printable = text
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
        (printable && text.len() <= 4096).then_some(text)
    }
}
