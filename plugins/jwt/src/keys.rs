//! A JWKS (RFC 7517) reduced to the verification keys jwt can use: RSA (2048 to 4096 bits),
//! P-256 and Ed25519 public keys meant for signatures. Other keys (encryption keys, other
//! curves, symmetric keys) are skipped, not refused: a provider's set often mixes them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;

/// Most keys taken from one set.
const MAX_KEYS: usize = 64;
/// Most keys tried for a token that names none.
pub const MAX_CANDIDATES: usize = 4;

/// One verification key.
#[derive(Debug, Clone)]
pub enum Key {
    /// For RS256.
    Rsa(rsa::pkcs1v15::VerifyingKey<sha2::Sha256>),
    /// For ES256.
    P256(p256::ecdsa::VerifyingKey),
    /// For EdDSA (Ed25519).
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl Key {
    /// The one algorithm this key verifies.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Key::Rsa(_) => "RS256",
            Key::P256(_) => "ES256",
            Key::Ed25519(_) => "EdDSA",
        }
    }
}

/// The usable keys of a JWKS, with their ids.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<(Option<String>, Key)>,
}

#[derive(Deserialize)]
struct Document {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    alg: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

fn b64(field: &Option<String>, name: &str) -> Result<Vec<u8>, String> {
    let text = field.as_deref().ok_or_else(|| format!("no {name:?}"))?;
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|e| format!("{name:?} is not base64url: {e}"))
}

impl Jwk {
    /// The key, `Ok(None)` for a key jwt does not use.
    fn key(&self) -> Result<Option<Key>, String> {
        if self.use_.as_deref().is_some_and(|u| u != "sig") {
            return Ok(None);
        }
        let key = match (self.kty.as_str(), self.crv.as_deref()) {
            ("RSA", _) => {
                let n = rsa::BigUint::from_bytes_be(&b64(&self.n, "n")?);
                let e = rsa::BigUint::from_bytes_be(&b64(&self.e, "e")?);
                if n.bits() < 2048 {
                    return Err(format!("an RSA key of {} bits; at least 2048", n.bits()));
                }
                let public = rsa::RsaPublicKey::new(n, e).map_err(|e| e.to_string())?;
                Key::Rsa(rsa::pkcs1v15::VerifyingKey::new(public))
            }
            ("EC", Some("P-256")) => {
                let (x, y) = (b64(&self.x, "x")?, b64(&self.y, "y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err("a P-256 coordinate is not 32 bytes".into());
                }
                let point = p256::EncodedPoint::from_affine_coordinates(
                    x.as_slice().into(),
                    y.as_slice().into(),
                    false,
                );
                Key::P256(
                    p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                        .map_err(|_| "a P-256 key not on the curve".to_string())?,
                )
            }
            ("OKP", Some("Ed25519")) => {
                let x: [u8; 32] = b64(&self.x, "x")?
                    .try_into()
                    .map_err(|_| "an Ed25519 key is not 32 bytes".to_string())?;
                Key::Ed25519(
                    ed25519_dalek::VerifyingKey::from_bytes(&x)
                        .map_err(|_| "an invalid Ed25519 key".to_string())?,
                )
            }
            _ => return Ok(None),
        };
        // A key published for one algorithm is not used for another.
        if self.alg.as_deref().is_some_and(|a| a != key.algorithm()) {
            return Ok(None);
        }
        Ok(Some(key))
    }
}

impl KeySet {
    /// Parses a JWKS document. A set with no usable key is an error (the provider's URL is
    /// probably wrong); so is a usable-looking key that does not decode.
    pub fn parse(doc: &[u8]) -> Result<KeySet, String> {
        let doc: Document =
            serde_json::from_slice(doc).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        for (i, jwk) in doc.keys.iter().enumerate().take(MAX_KEYS) {
            if let Some(key) = jwk.key().map_err(|e| format!("keys[{i}]: {e}"))? {
                keys.push((jwk.kid.clone(), key));
            }
        }
        if keys.is_empty() {
            return Err("no RS256, ES256 or EdDSA signing key in the set".into());
        }
        Ok(KeySet { keys })
    }

    /// Whether a key has id `kid`.
    pub fn has(&self, kid: &str) -> bool {
        self.keys.iter().any(|(k, _)| k.as_deref() == Some(kid))
    }

    /// The keys that may have signed a token of `alg` with id `kid`: without a `kid`, the
    /// first [`MAX_CANDIDATES`] of the algorithm (a token without one must not make the
    /// plugin try every key of a large set).
    pub fn candidates<'a>(
        &'a self,
        alg: &'a str,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys
            .iter()
            .filter(move |(k, key)| {
                key.algorithm() == alg && kid.is_none_or(|kid| k.as_deref() == Some(kid))
            })
            .map(|(_, key)| key)
            .take(if kid.is_some() {
                usize::MAX
            } else {
                MAX_CANDIDATES
            })
    }
}
