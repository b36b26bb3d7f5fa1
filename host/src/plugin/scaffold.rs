//! `sluice plugin new NAME`: a ready plugin crate (Cargo.toml, a plugin with one hook and a
//! configuration, a native test, a README) that builds for wasm32-wasip2 and passes
//! `sluice plugin test` as generated.

use std::path::{Path, PathBuf};

/// Where the new crate gets `sluice-sdk` from.
#[derive(Debug, Clone)]
pub enum SdkSource {
    /// A checkout's `sdk/` folder.
    Path(PathBuf),
    /// A git repository holding the workspace.
    Git(String),
}

/// Writes the crate `name` into `dir/name` (which must not exist); returns its folder.
pub fn create(name: &str, dir: &Path, sdk: &SdkSource) -> Result<PathBuf, String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        || !name.as_bytes()[0].is_ascii_lowercase()
    {
        return Err(format!(
            "invalid plugin name {name:?}: use lowercase letters, digits, '-' and '_', starting with a letter"
        ));
    }
    let root = dir.join(name);
    if root.exists() {
        return Err(format!("{} already exists", root.display()));
    }
    let sdk_dep = match sdk {
        SdkSource::Path(p) => format!("{{ path = {:?} }}", p.display().to_string()),
        SdkSource::Git(url) => format!("{{ git = {url:?} }}"),
    };
    let crate_name = name.replace('-', "_");
    let files = [
        ("Cargo.toml", cargo_toml(name, &sdk_dep)),
        ("src/lib.rs", LIB_RS.to_string()),
        ("README.md", readme(name, &crate_name)),
        (".gitignore", "/target\n".to_string()),
    ];
    for (file, text) in files {
        let path = root.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(root)
}

fn cargo_toml(name: &str, sdk_dep: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

# A crate of its own, even inside another workspace.
[workspace]

[lib]
# cdylib: the component the connector loads; rlib: native unit tests.
crate-type = ["cdylib", "rlib"]

[dependencies]
sluice-sdk = {sdk_dep}
serde = {{ version = "1", features = ["derive"] }}

[dev-dependencies]
serde_json = "1"

[profile.release]
opt-level = "s"
lto = true
strip = true
"#
    )
}

const LIB_RS: &str = r##"//! A sluice plugin: adds a header to every request on its way to the origin.

use serde::Deserialize;
use sluice_sdk::{export_plugin, Plugin, Request, RequestDecision};

/// The `[plugin.config]` table of the connector's file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Header set on each request.
    pub header_name: String,
    /// Its value.
    #[serde(default = "default_value")]
    pub header_value: String,
}

fn default_value() -> String {
    "1".to_string()
}

/// The plugin: one instance serves many requests, one at a time.
pub struct AddHeader {
    config: Config,
}

impl Plugin for AddHeader {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.header_name.is_empty() {
            return Err("header-name must not be empty".into());
        }
        Ok(AddHeader { config })
    }

    fn on_request(&self, _req: &Request) -> RequestDecision {
        RequestDecision::new().set_header(&self.config.header_name, &self.config.header_value)
    }
}

// Exports the hooks: without this line the component does nothing and the connector refuses it.
export_plugin!(AddHeader);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::load;

    #[test]
    fn sets_the_configured_header() {
        let plugin: AddHeader = load(br#"{"header-name": "x-hello", "header-value": "world"}"#).unwrap();
        let decision = plugin.on_request(&Request::new("GET", "https://app.example.com/"));
        assert_eq!(decision, RequestDecision::new().set_header("x-hello", "world"));
    }

    #[test]
    fn refuses_a_bad_configuration() {
        assert!(load::<AddHeader>(br#"{"header-name": ""}"#).is_err());
        assert!(load::<AddHeader>(br#"{"header": "x"}"#).is_err());
    }
}
"##;

fn readme(name: &str, crate_name: &str) -> String {
    format!(
        r#"# {name}

A sluice plugin that sets a header on every request.

```sh
rustup target add wasm32-wasip2
cargo test                                          # native unit tests
cargo build --release --target wasm32-wasip2        # the component
sluice plugin test target/wasm32-wasip2/release/{crate_name}.wasm \
  --config '{{"header-name": "x-hello"}}'
```

In the connector's file:

```toml
[[plugin]]
name = "{name}"
path = "plugins/{crate_name}.wasm"
[plugin.config]
header-name = "x-hello"
header-value = "world"

[[ingress]]
origin = "web"
plugins = ["{name}"]
```

The SDK's guide (`sdk/README.md` in sluice) covers the hooks, decisions, grants and limits.
"#
    )
}
