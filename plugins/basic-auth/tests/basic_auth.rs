//! basic-auth on the SDK's test host, with htpasswd entries hashed here at bcrypt's lowest
//! cost (the plugin reads the cost from each entry).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use basic_auth::BasicAuth;
use serde_json::json;
use sluice_sdk::testing::{self, Grant};
use sluice_sdk::{Plugin, Request, RequestDecision};

fn htpasswd() -> String {
    format!(
        "# team\nalice:{}\n\nbob:{}\n",
        bcrypt::hash("wonderland", 4).unwrap(),
        bcrypt::hash_with_result("builder", 4)
            .unwrap()
            .format_for_version(bcrypt::Version::TwoB),
    )
}

fn plugin(extra: serde_json::Value) -> BasicAuth {
    let mut config = json!({ "htpasswd": htpasswd() });
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    sluice_sdk::load(config.to_string().as_bytes()).unwrap()
}

fn request(authorization: Option<&str>) -> Request<'static> {
    let mut req = Request::new("GET", "https://app.test/").with_header("x-auth-user", "root");
    if let Some(a) = authorization {
        req = req.with_header("authorization", a);
    }
    testing::granted(req, &[Grant::Credentials])
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

#[test]
fn valid_credentials_pass_and_the_password_stays_here() {
    let p = plugin(json!({}));
    for (user, password) in [("alice", "wonderland"), ("bob", "builder")] {
        let d = p.on_request(&request(Some(&basic(user, password))));
        assert_eq!(
            d,
            RequestDecision::new()
                .set_header("x-auth-user", user)
                .remove_header("authorization")
        );
    }
    let keep = plugin(json!({"strip-authorization": false, "user-header": "X-User"}));
    let d = keep.on_request(&request(Some(&basic("alice", "wonderland"))));
    assert_eq!(d, RequestDecision::new().set_header("x-user", "alice"));
}

#[test]
fn anything_else_gets_a_challenge() {
    let p = plugin(json!({"realm": "ops"}));
    testing::reset();
    for auth in [
        None,
        Some(basic("alice", "wrong")),
        Some(basic("mallory", "wonderland")),
        Some(basic("alice", "")),
        Some("Bearer abc".to_string()),
        Some("Basic !!!".to_string()),
        Some(format!("Basic {}", STANDARD.encode("no-colon"))),
    ] {
        let d = p.on_request(&request(auth.as_deref()));
        let r = d.respond.unwrap_or_else(|| panic!("{auth:?} passed"));
        assert_eq!(r.status, 401);
        assert!(r.headers.iter().any(
            |(n, v)| n == "www-authenticate" && v == b"Basic realm=\"ops\", charset=\"UTF-8\""
        ));
    }
    let events = testing::events();
    assert_eq!(events.len(), 7);
    assert_eq!(events[2].get("user"), Some("mallory"));
}

#[test]
fn a_success_is_remembered_until_the_cache_expires() {
    let p = plugin(json!({"cache-s": 60}));
    testing::clear_kv();
    let auth = basic("alice", "wonderland");
    assert_eq!(p.remembered(), 0);
    assert!(p.check("alice", "wonderland"));
    assert_eq!(p.remembered(), 1);
    // The same credentials pass from memory; a wrong password is checked, never remembered.
    assert!(p.check("alice", "wonderland"));
    assert!(!p.check("alice", "wonderland2"));
    assert!(!p.check("mallory", "x"));
    assert_eq!(p.remembered(), 1);
    testing::advance(std::time::Duration::from_secs(61));
    assert_eq!(p.remembered(), 0);
    assert!(p.check("alice", "wonderland"));
    assert_eq!(p.remembered(), 1);
    assert!(p.on_request(&request(Some(&auth))).respond.is_none());
}

#[test]
fn only_bcrypt_entries_are_accepted() {
    let load = |htpasswd: &str| {
        sluice_sdk::load::<BasicAuth>(json!({ "htpasswd": htpasswd }).to_string().as_bytes())
    };
    let md5 = load("alice:$apr1$abcdefgh$0123456789abcdefghijkl").unwrap_err();
    assert!(md5.contains("line 1 (alice): only bcrypt"), "{md5}");
    assert!(load("").unwrap_err().contains("no entry"));
    assert!(load("alice").unwrap_err().contains("user:hash"));
    let twice = format!("alice:{h}\nalice:{h}", h = bcrypt::hash("x", 4).unwrap());
    assert!(load(&twice).unwrap_err().contains("twice"));
    assert!(sluice_sdk::load::<BasicAuth>(
        json!({"htpasswd": htpasswd(), "realm": "a\"b"})
            .to_string()
            .as_bytes()
    )
    .is_err());
}
