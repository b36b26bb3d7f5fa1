//! The jwt plugin on the SDK's test host: tokens of each algorithm signed here, the JWKS
//! answered by the HTTP fake, the cache in the KV fake, time from the test clock.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt::Jwt;
use serde_json::{json, Value};
use sluice_sdk::http::Response;
use sluice_sdk::testing::{self, Grant};
use sluice_sdk::{Plugin, Request, RequestDecision};

const JWKS: &str = "https://auth.example.com/jwks";
const NOW: u64 = testing::CLOCK_START.as_secs();

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key of each algorithm, fixed so that tests are repeatable.
enum Signer {
    Rs256(Box<rsa::RsaPrivateKey>),
    Es256(p256::ecdsa::SigningKey),
    EdDsa(ed25519_dalek::SigningKey),
}

impl Signer {
    fn rs256() -> Signer {
        use rsa::pkcs8::DecodePrivateKey;
        let pem = include_str!("rsa-2048-test-key.pem");
        Signer::Rs256(Box::new(rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap()))
    }
    fn es256(seed: u8) -> Signer {
        Signer::Es256(p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap())
    }
    fn eddsa(seed: u8) -> Signer {
        Signer::EdDsa(ed25519_dalek::SigningKey::from_bytes(&[seed; 32]))
    }

    fn alg(&self) -> &'static str {
        match self {
            Signer::Rs256(_) => "RS256",
            Signer::Es256(_) => "ES256",
            Signer::EdDsa(_) => "EdDSA",
        }
    }

    fn jwk(&self, kid: &str) -> Value {
        match self {
            Signer::Rs256(k) => {
                use rsa::traits::PublicKeyParts;
                json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                       "n": b64(&k.n().to_bytes_be()), "e": b64(&k.e().to_bytes_be())})
            }
            Signer::Es256(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-256", "kid": kid,
                       "x": b64(p.x().unwrap()), "y": b64(p.y().unwrap())})
            }
            Signer::EdDsa(k) => {
                json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                       "x": b64(k.verifying_key().as_bytes())})
            }
        }
    }

    fn sign(&self, header: &Value, claims: &Value) -> String {
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = match self {
            Signer::Rs256(k) => {
                use rsa::signature::{SignatureEncoding, Signer as _};
                let sk = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new((**k).clone());
                sk.sign(signed.as_bytes()).to_vec()
            }
            Signer::Es256(k) => {
                use p256::ecdsa::signature::Signer as _;
                let sig: p256::ecdsa::Signature = k.sign(signed.as_bytes());
                sig.to_bytes().to_vec()
            }
            Signer::EdDsa(k) => {
                use ed25519_dalek::Signer as _;
                k.sign(signed.as_bytes()).to_bytes().to_vec()
            }
        };
        format!("{signed}.{}", b64(&sig))
    }

    fn token(&self, kid: &str, claims: Value) -> String {
        self.sign(
            &json!({"alg": self.alg(), "kid": kid, "typ": "JWT"}),
            &claims,
        )
    }
}

fn claims() -> Value {
    json!({"iss": "https://auth.example.com/", "aud": "api", "sub": "alice",
           "email": "alice@example.com", "groups": ["ops", "dev"],
           "exp": NOW + 300, "nbf": NOW - 10})
}

fn jwks(keys: &[(&Signer, &str)]) -> Response {
    let keys: Vec<Value> = keys.iter().map(|(s, kid)| s.jwk(kid)).collect();
    Response::new(200, json!({ "keys": keys }).to_string())
}

fn plugin(extra: Value) -> Jwt {
    let mut config = json!({
        "jwks-url": JWKS,
        "issuer": "https://auth.example.com/",
        "audience": ["api", "admin"],
        "claims": {"sub": "x-auth-subject", "groups": "x-groups"},
    });
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    sluice_sdk::load(config.to_string().as_bytes()).unwrap()
}

fn fresh() {
    testing::reset();
    testing::clear_kv();
    testing::clear_http();
}

fn request(token: Option<&str>) -> Request<'static> {
    let mut req = Request::new("GET", "https://api.test/orders").with_header("x-groups", "root");
    if let Some(t) = token {
        req = req.with_header("authorization", &format!("Bearer {t}"));
    }
    testing::granted(req, &[Grant::Credentials])
}

fn status(d: &RequestDecision) -> Option<u16> {
    d.respond.as_ref().map(|r| r.status)
}

#[test]
fn tokens_of_each_algorithm_pass_and_forward_their_claims() {
    fresh();
    let (rs, es, ed) = (Signer::rs256(), Signer::es256(7), Signer::eddsa(9));
    testing::http_respond(JWKS, jwks(&[(&rs, "r1"), (&es, "e1"), (&ed, "d1")]));
    let p = plugin(json!({}));
    for (signer, kid) in [(&rs, "r1"), (&es, "e1"), (&ed, "d1")] {
        let d = p.on_request(&request(Some(&signer.token(kid, claims()))));
        assert_eq!(status(&d), None, "{} refused", signer.alg());
        assert_eq!(
            d,
            RequestDecision::new()
                .set_header("x-groups", "ops,dev")
                .set_header("x-auth-subject", "alice"),
            "{}",
            signer.alg()
        );
    }
    // One fetch for the three: the set is cached.
    assert_eq!(testing::http_calls().len(), 1);
}

#[test]
fn bad_tokens_get_401_with_the_reason() {
    fresh();
    let es = Signer::es256(7);
    testing::http_respond(JWKS, jwks(&[(&es, "e1")]));
    let p = plugin(json!({"leeway-s": 0}));
    let other = Signer::es256(8);
    let mut tampered = es.token("e1", claims());
    tampered.insert(tampered.find('.').unwrap() + 3, 'A');
    let with = |patch: Value| {
        let mut c = claims();
        c.as_object_mut()
            .unwrap()
            .extend(patch.as_object().unwrap().clone());
        es.token("e1", c)
    };
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(claims().to_string().as_bytes())
    );
    let hs256 = Signer::es256(7).sign(&json!({"alg": "HS256", "kid": "e1"}), &claims());
    let cases = [
        (None, "Bearer realm=\"sluice\""),
        (Some("not-a-token".to_string()), "malformed token"),
        (Some(none), "malformed token"),
        (Some(hs256), "algorithm \\\"HS256\\\""),
        (Some(tampered), "bad signature"),
        (Some(other.token("e1", claims())), "bad signature"),
        (Some(with(json!({"exp": NOW - 1}))), "token expired"),
        (Some(with(json!({"nbf": NOW + 60}))), "token not yet valid"),
        (
            Some(with(json!({"iss": "https://evil.example.com/"}))),
            "wrong issuer",
        ),
        (Some(with(json!({"aud": ["web"]}))), "wrong audience"),
        (Some(with(json!({"exp": null}))), "malformed token"),
    ];
    for (token, reason) in cases {
        let d = p.on_request(&request(token.as_deref()));
        let r = d.respond.expect("refused");
        assert_eq!(r.status, 401, "{token:?}");
        let challenge = r
            .headers
            .iter()
            .find(|(n, _)| n == "www-authenticate")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap();
        let expected = reason.replace("\\\"", "'");
        assert!(
            challenge.contains(&expected),
            "{token:?}: {challenge} lacks {expected}"
        );
    }
    let denied = testing::events();
    assert_eq!(denied.len(), 11);
    assert_eq!(denied[6].get("reason"), Some("token expired"));
}

#[test]
fn leeway_tolerates_a_little_clock_skew() {
    fresh();
    let ed = Signer::eddsa(9);
    testing::http_respond(JWKS, jwks(&[(&ed, "d1")]));
    let p = plugin(json!({"leeway-s": 30}));
    let mut c = claims();
    c["exp"] = json!(NOW - 20);
    assert_eq!(
        status(&p.on_request(&request(Some(&ed.token("d1", c.clone()))))),
        None
    );
    testing::advance(std::time::Duration::from_secs(11));
    assert_eq!(
        status(&p.on_request(&request(Some(&ed.token("d1", c))))),
        Some(401)
    );
}

#[test]
fn an_unknown_key_id_refetches_once_per_interval() {
    fresh();
    let (old, new) = (Signer::es256(7), Signer::es256(8));
    testing::http_respond(JWKS, jwks(&[(&old, "k1")]));
    testing::http_respond(JWKS, jwks(&[(&old, "k1"), (&new, "k2")]));
    let p = plugin(json!({"refetch-interval-s": 30}));
    let first = p.on_request(&request(Some(&old.token("k1", claims()))));
    assert_eq!(status(&first), None);
    // The provider rotated: k2 is not cached, so the set is fetched again.
    let rotated = p.on_request(&request(Some(&new.token("k2", claims()))));
    assert_eq!(status(&rotated), None);
    assert_eq!(testing::http_calls().len(), 2);
    // Unknown ids do not make a fetch per request: one per interval at most, and the
    // rotation above used this interval's.
    for _ in 0..5 {
        let d = p.on_request(&request(Some(&new.token("k9", claims()))));
        assert_eq!(status(&d), Some(401));
    }
    assert_eq!(testing::http_calls().len(), 2);
    testing::advance(std::time::Duration::from_secs(31));
    for _ in 0..5 {
        p.on_request(&request(Some(&new.token("k9", claims()))));
    }
    assert_eq!(testing::http_calls().len(), 3);
}

#[test]
fn the_cache_expires_and_an_unreachable_jwks_fails_closed() {
    fresh();
    let es = Signer::es256(7);
    testing::http_fail(JWKS, sluice_sdk::http::Error::Timeout);
    let p = plugin(json!({"cache-ttl-s": 60}));
    let token = es.token("e1", claims());
    let d = p.on_request(&request(Some(&token)));
    assert_eq!(
        status(&d),
        Some(503),
        "no keys at all: the request cannot be checked"
    );
    // While the failure is fresh, requests do not wait on fetches of their own.
    for _ in 0..5 {
        assert_eq!(status(&p.on_request(&request(Some(&token)))), Some(503));
    }
    assert_eq!(testing::http_calls().len(), 1);
    testing::clear_http();
    testing::http_respond(JWKS, jwks(&[(&es, "e1")]));
    testing::advance(std::time::Duration::from_secs(31));
    assert_eq!(status(&p.on_request(&request(Some(&token)))), None);
    assert_eq!(testing::http_calls().len(), 1);
    // Cached for cache-ttl-s, then fetched again; if that fails, the last keys serve.
    testing::advance(std::time::Duration::from_secs(59));
    assert_eq!(status(&p.on_request(&request(Some(&token)))), None);
    assert_eq!(testing::http_calls().len(), 1);
    testing::advance(std::time::Duration::from_secs(2));
    testing::clear_http();
    testing::http_respond(JWKS, Response::new(500, "down"));
    let d = p.on_request(&request(Some(&es.token(
        "e1",
        json!({"iss": "https://auth.example.com/", "aud": "api", "sub": "bob",
               "exp": NOW + 300}),
    ))));
    assert_eq!(status(&d), None);
    assert_eq!(testing::http_calls().len(), 1);
}

#[test]
fn configuration_mistakes_are_refused() {
    let load = |config: Value| sluice_sdk::load::<Jwt>(config.to_string().as_bytes());
    let base = json!({"jwks-url": JWKS, "issuer": "i", "audience": "a"});
    assert!(load(base.clone()).is_ok());
    let with = |k: &str, v: Value| {
        let mut c = base.clone();
        c[k] = v;
        load(c).unwrap_err()
    };
    assert!(with("algorithms", json!(["HS256"])).contains("unsupported algorithm"));
    assert!(with("jwks-url", json!("ftp://x")).contains("https://"));
    assert!(with("jwks-url", json!("http://auth.example.com/jwks")).contains("danger-allow-http"));
    let mut plain = base.clone();
    plain["jwks-url"] = json!("http://127.0.0.1:8080/jwks");
    plain["danger-allow-http"] = json!(true);
    assert!(load(plain).is_ok());
    assert!(with("claims", json!({"sub": "authorization"})).contains("cannot carry"));
    assert!(with("jwks-origin", json!("auth")).contains("path"));
    assert!(with("audiences", json!("a")).contains("unknown field"));
}

#[test]
fn a_jwks_without_usable_keys_is_an_error() {
    assert!(jwt::KeySet::parse(br#"{"keys": []}"#).is_err());
    assert!(jwt::KeySet::parse(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).is_err());
    let short_rsa = json!({"keys": [{"kty": "RSA", "n": b64(&[0xff; 128]), "e": "AQAB"}]});
    let err = jwt::KeySet::parse(short_rsa.to_string().as_bytes()).unwrap_err();
    assert!(err.contains("1024 bits"), "{err}");
    let es = Signer::es256(7);
    // Encryption keys are skipped, and a set with one good key parses.
    let mixed = json!({"keys": [{"kty": "EC", "crv": "P-256", "use": "enc", "x": "AA", "y": "AA"}, es.jwk("e1")]});
    assert!(jwt::KeySet::parse(mixed.to_string().as_bytes())
        .unwrap()
        .has("e1"));
}
