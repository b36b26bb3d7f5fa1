//! Command-line interface of the `sluice` binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// sluice: a self-hosted, programmable tunnel.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// Log format on stderr: `text` or `json` (overrides `log-format` in the file).
    #[arg(long, global = true, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an edge: public HTTP(S) listeners and a QUIC listener for connectors.
    Edge {
        /// The edge's TOML file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a connector: dial the edges and proxy their requests to origins.
    Connector {
        /// The connector's TOML file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file of either role and exit (non-zero with the error if invalid).
    Check {
        /// The TOML file to check.
        #[arg(long, short)]
        config: PathBuf,
        /// Also try every edge of a connector's file over QUIC and over TCP (certificate and
        /// registration included, nothing served); exits 1 when an edge is reachable over
        /// neither.
        #[arg(long)]
        connectivity: bool,
        /// With a connector's file: print which ingress rule a request for this URL would
        /// match, the plugin chain that would run and the origin it would go to (a dry run;
        /// nothing is sent).
        #[arg(long = "match", value_name = "URL")]
        match_url: Option<String>,
    },
    /// Work on plugins.
    Plugin {
        /// What to do.
        #[command(subcommand)]
        action: PluginCommand,
    },
    /// Ask a running edge or connector for its status (its admin `/status`).
    Status {
        /// The admin listener, `host:port`.
        #[arg(long)]
        admin: String,
        /// Print the JSON as the process gave it.
        #[arg(long)]
        json: bool,
    },
    /// Make certificates.
    Cert {
        /// What to do.
        #[command(subcommand)]
        action: CertCommand,
    },
    /// Administer tunnels.
    Tunnel {
        /// What to do.
        #[command(subcommand)]
        action: TunnelCommand,
    },
    /// Reach a TCP service of a tunnel (SSH, a database…) through the edge's HTTPS listener.
    Access {
        /// What to reach.
        #[command(subcommand)]
        action: AccessCommand,
    },
    /// Run an edge, a connector and the hello origin on loopback and print a curl to try.
    Demo {
        /// Port of the demo's HTTP listener on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Where the example plugins were built (`cargo build-plugins`).
        #[arg(long, default_value = sluice::demo::DEFAULT_PLUGIN_DIR)]
        plugins: PathBuf,
        /// Run without plugins.
        #[arg(long)]
        no_plugins: bool,
    },
}

/// `sluice access …`
#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// One session per local connection (`--listen`) or one on standard input and output
    /// (`--stdio`, for ssh's `ProxyCommand`), each a WebSocket to the edge.
    Tcp {
        /// The service's public hostname (its ingress rule names a `tcp://` origin).
        #[arg(long)]
        hostname: String,
        /// Carry standard input and output (ssh: `-o ProxyCommand='sluice access tcp
        /// --hostname %h --stdio'`).
        #[arg(long, conflicts_with = "listen", required_unless_present = "listen")]
        stdio: bool,
        /// Accept local connections here, one session each (`127.0.0.1:2222`). Only loopback
        /// addresses, unless --danger-allow-remote.
        #[arg(long)]
        listen: Option<String>,
        /// Let --listen take a non-loopback address: anyone who can reach it gets sessions
        /// that carry this client's token.
        #[arg(long, requires = "listen")]
        danger_allow_remote: bool,
        /// The edge's HTTPS listener, `host:port`, when the hostname does not resolve to it
        /// (default: the hostname, port 443).
        #[arg(long)]
        edge: Option<String>,
        /// A PEM file of CA certificates trusted for the edge, besides the system roots.
        #[arg(long)]
        edge_ca: Option<PathBuf>,
        /// The name to verify in the edge's certificate (default: the hostname).
        #[arg(long)]
        edge_server_name: Option<String>,
        /// A file holding the token sent as `Authorization: Bearer` (for access-guard);
        /// without it, the `SLUICE_ACCESS_TOKEN` environment variable, if set.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
}

/// `sluice cert …`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Write a private CA (`ca.crt`, `ca.key`) and a server certificate it signed for the
    /// edge's listeners (`edge.crt`, `edge.key`), and print the config lines that use them.
    New {
        /// A DNS name of the server; repeat for several.
        #[arg(long = "name")]
        names: Vec<String>,
        /// An IP address of the server; repeat for several.
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
        /// Directory to write the four files to (they must not exist yet).
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

/// `sluice tunnel …`
#[derive(Debug, Subcommand)]
pub enum TunnelCommand {
    /// Create a tunnel: print a fresh token and the [[tunnel]] block for the edge's file.
    New {
        /// Tunnel id (letters, digits, '-', '_').
        name: String,
        /// A public hostname of the tunnel (exact or `*.` wildcard); repeat for several.
        #[arg(long = "hostname", required = true)]
        hostnames: Vec<String>,
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Start a token rotation: print a fresh token and the tunnel's block accepting both the
    /// current token(s) and the new one (see the README's rotation procedure).
    Rotate {
        /// Tunnel id.
        name: String,
        /// The edge's TOML file, to read the tunnel's current token(s) from.
        #[arg(long, short)]
        config: PathBuf,
        /// Write the new token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
}

/// `sluice plugin …`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Create a plugin crate: Cargo.toml, a plugin with one hook and a configuration, a native
    /// test and a README, ready to build for wasm32-wasip2 and to `plugin test`.
    New {
        /// The crate's name (lowercase letters, digits, '-', '_').
        name: String,
        /// The folder to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// A local checkout's `sdk/` folder to depend on (default: the sluice repository's
        /// git URL).
        #[arg(long)]
        sdk_path: Option<PathBuf>,
    },
    /// Run a plugin's hooks on a made-up exchange and print its decisions, logs and audit events.
    Test {
        /// The plugin component (`.wasm`).
        wasm: PathBuf,
        /// The plugin's configuration: inline JSON, or a `.json` or `.toml` file.
        #[arg(long)]
        config: Option<String>,
        /// The request, as `METHOD URL`.
        #[arg(long, default_value = "GET https://app.example.com/")]
        request: String,
        /// A request header, `name: value`; repeat for several.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Status of the made-up origin response.
        #[arg(long, default_value_t = 200)]
        status: u16,
        /// Grant a capability (`client-addr`, `credentials`, `kv`, `metrics`, `http`); repeat for
        /// several.
        #[arg(long = "grant")]
        grants: Vec<String>,
        /// The client address shown to a plugin granted `client-addr`.
        #[arg(long, default_value = "203.0.113.7:50123")]
        client: String,
        /// Seed the plugin's key-value store (needs `--grant kv`): `key=value`; repeat for
        /// several. The store's contents are printed after the hooks.
        #[arg(long = "kv")]
        kv: Vec<String>,
        /// Answer the plugin's outbound calls (needs `--grant http`):
        /// `"TARGET STATUS [BODY]"`, where TARGET is the URL the plugin calls (or
        /// `origin:NAME/path`) and BODY is text or `@file`; repeat for several (a target given
        /// twice answers in turn). No call leaves the machine; each is printed after the hooks.
        #[arg(long = "http")]
        http: Vec<String>,
        /// A request body for `on-request-body` (text, or `@file`).
        #[arg(long)]
        body: Option<String>,
        /// A response body for `on-response-body` (text, or `@file`).
        #[arg(long)]
        response_body: Option<String>,
        /// Deadline of each hook call (the connector's default is 10ms; this default leaves
        /// room for a debug build of sluice).
        #[arg(long, default_value = "1s")]
        timeout: String,
    },
    /// The connector's compile helper: writes the plugin compiled for an engine of these
    /// settings to stdout (exit 3 with the compiler's message when it does not compile).
    #[command(hide = true)]
    CompileHelper {
        /// Largest memory of an instance, in bytes.
        #[arg(long)]
        max_memory: usize,
        /// Instances of the engine's pool.
        #[arg(long)]
        instances: u32,
        /// The plugin component (`.wasm`).
        wasm: PathBuf,
    },
}
