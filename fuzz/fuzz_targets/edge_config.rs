//! The edge's configuration parser on arbitrary text: it never panics, and every refusal
//! names the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::EdgeConfig;

fuzz_target!(|text: &str| {
    let path = std::path::Path::new("fuzz/edge.toml");
    if let Err(e) = EdgeConfig::parse(text, path) {
        assert!(e.to_string().starts_with("fuzz/edge.toml"), "{e}");
    }
});
