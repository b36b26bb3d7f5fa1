//! The connector's configuration parser on arbitrary text: it never panics, and every refusal
//! names the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::ConnectorConfig;

fuzz_target!(|text: &str| {
    let path = std::path::Path::new("fuzz/connector.toml");
    if let Err(e) = ConnectorConfig::parse(text, path) {
        assert!(e.to_string().starts_with("fuzz/connector.toml"), "{e}");
    }
});
