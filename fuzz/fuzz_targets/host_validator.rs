//! The Host/:authority validator on arbitrary strings: it never panics, what it accepts holds
//! only host-name characters, and its canonical spelling parses back to the same authority.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::authority::Authority;

fuzz_target!(|s: &str| {
    let Ok(a) = Authority::parse(s) else {
        return;
    };
    let host = a.host();
    assert!(!host.is_empty() && host.len() <= 253 + 2);
    assert!(host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:[]".contains(&b)));
    assert_eq!(host, host.to_ascii_lowercase());
    let canonical = a.to_string();
    let again = Authority::parse(&canonical).expect("the canonical form is accepted");
    assert_eq!(again, a, "{s:?} -> {canonical:?}");
});
