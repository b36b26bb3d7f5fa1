//! The `sluice` binary: parses the command line, sets up logging and signals, runs a role.

mod cli;

/// mimalloc instead of the system allocator: a request allocates many small, short-lived
/// objects on the runtime's threads, where glibc's malloc took a fifth of the CPU in a profile
/// of the request path (consolidating and unlinking chunks).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use sluice::config::{self, AnyConfig, ConnectorConfig, EdgeConfig, LogFormat};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let log_format = cli.log_format.as_deref().map(|f| {
        f.parse::<LogFormat>()
            .expect("clap allows only text and json")
    });
    match cli.command {
        cli::Command::Check {
            config,
            match_url: Some(url),
            ..
        } => check_match(&config, &url),
        cli::Command::Check {
            config,
            connectivity: false,
            ..
        } => check(&config),
        cli::Command::Check {
            config,
            connectivity: true,
            ..
        } => check_connectivity(&config),
        cli::Command::Tunnel { action } => match action {
            cli::TunnelCommand::New {
                name,
                hostnames,
                token_file,
            } => tunnel_new(&name, &hostnames, token_file.as_deref()),
            cli::TunnelCommand::Rotate {
                name,
                config,
                token_file,
            } => tunnel_rotate(&name, &config, token_file.as_deref()),
        },
        cli::Command::Plugin { action } => plugin_command(action),
        cli::Command::Cert {
            action: cli::CertCommand::New { names, ips, out },
        } => cert_new(&names, &ips, &out),
        cli::Command::Status { admin, json } => status(&admin, json),
        cli::Command::Access {
            action: cli::AccessCommand::Tcp { .. },
        } => access(cli.command, log_format),
        command => serve(command, log_format),
    }
}

/// A role to run, its file already loaded.
enum Role {
    Edge(EdgeConfig, std::path::PathBuf),
    Connector(ConnectorConfig, std::path::PathBuf),
    Demo {
        port: u16,
        plugins: Option<std::path::PathBuf>,
    },
}

/// Runs the edge, the connector or the demo. The file is read before logging starts, so that
/// a bad one is reported once, as `error: FILE:LINE:COL: …`; an error after that is logged
/// once.
fn serve(command: cli::Command, log_format: Option<LogFormat>) -> ExitCode {
    let role = match command {
        cli::Command::Edge { config } => EdgeConfig::load(&config).map(|c| Role::Edge(c, config)),
        cli::Command::Connector { config } => {
            ConnectorConfig::load(&config).map(|c| Role::Connector(c, config))
        }
        cli::Command::Demo {
            port,
            plugins,
            no_plugins,
        } => Ok(Role::Demo {
            port,
            plugins: (!no_plugins).then_some(plugins),
        }),
        _ => unreachable!("the other commands do not serve"),
    };
    let role = match role {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let from_file = match &role {
        Role::Edge(c, _) => c.log_format,
        Role::Connector(c, _) => c.log_format,
        Role::Demo { .. } => LogFormat::Text,
    };
    init_logging(log_format.unwrap_or(from_file));
    // Purges every free page of every heap: about 10 MB of a connector's resident memory after
    // its plugins are compiled.
    sluice::plugin::set_memory_release(|| unsafe { libmimalloc_sys::mi_collect(true) });
    sluice::plugin::set_compiler(compile_in_helper);
    let workers = match &role {
        Role::Edge(c, _) => c.workers,
        Role::Connector(c, _) => c.workers,
        Role::Demo { .. } => config::default_workers(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(role)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `RUST_LOG` (default `info`), as text or JSON lines. Text has colours
/// only on a terminal, and never when `NO_COLOR` is set.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => {
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            builder
                .with_ansi(std::io::stderr().is_terminal() && !no_color)
                .init()
        }
    }
}

/// Tells systemd (`Type=notify`) about the service's state; nothing without `NOTIFY_SOCKET`.
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!(cause = %e, "could not notify systemd");
    }
}

/// `n thing` or `n things`.
fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load_any(path) {
        Ok(AnyConfig::Edge(c)) => {
            println!(
                "{}: valid edge config ({})",
                path.display(),
                count(c.tunnels.len(), "tunnel")
            );
            ExitCode::SUCCESS
        }
        Ok(AnyConfig::Connector(c)) => {
            // Plugins load and run `init` as at start: a typo in a plugin's configuration, a
            // missing or wrongly built `.wasm` fail here, not when the connector starts.
            let plugins = if c.plugins.is_empty() {
                Vec::new()
            } else {
                let runtime = match one_thread_runtime() {
                    Ok(r) => r,
                    Err(code) => return code,
                };
                match runtime.block_on(sluice::plugin::check(&c.plugins)) {
                    Ok(lines) => lines,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            };
            let defined = c
                .origins
                .iter()
                .filter(|o| {
                    !matches!(
                        o.target,
                        config::OriginTarget::Hello | config::OriginTarget::Status(_)
                    )
                })
                .count();
            let built_in = match c.origins.len() - defined {
                0 => String::new(),
                n => format!(" + {n} built-in"),
            };
            println!(
                "{}: valid connector config ({}, {}{built_in}, {})",
                path.display(),
                count(c.ingress.len(), "ingress rule"),
                count(defined, "origin"),
                count(c.plugins.len(), "plugin"),
            );
            for line in plugins {
                println!("  {line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a command's report, or its error.
fn report<E: std::fmt::Display>(result: Result<String, E>) -> ExitCode {
    match result {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A connector's file for a `check` option that needs one; `what` says why an edge's will
/// not do.
fn connector_file(path: &std::path::Path, what: &str) -> Result<ConnectorConfig, ExitCode> {
    match config::load_any(path) {
        Ok(AnyConfig::Connector(c)) => Ok(*c),
        Ok(AnyConfig::Edge(_)) => {
            eprintln!("error: {}: {what}", path.display());
            Err(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// `sluice check --match URL`: the routing of a connector's file applied to one URL.
fn check_match(path: &std::path::Path, url: &str) -> ExitCode {
    let config = match connector_file(path, "--match explains a connector's routing") {
        Ok(c) => c,
        Err(code) => return code,
    };
    report(sluice::connector::dry_run::explain(&config, url))
}

fn cert_new(names: &[String], ips: &[std::net::IpAddr], out: &std::path::Path) -> ExitCode {
    let issued = match sluice::certs::new_server_certs(names, ips) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let files = [
        ("ca.crt", issued.ca_cert.as_str(), false),
        ("ca.key", issued.ca_key.as_str(), true),
        ("edge.crt", issued.cert.as_str(), false),
        ("edge.key", issued.key.as_str(), true),
    ];
    for (name, _, _) in &files {
        if out.join(name).exists() {
            eprintln!(
                "error: {} exists already; choose another --out or move it away",
                out.join(name).display()
            );
            return ExitCode::FAILURE;
        }
    }
    for (name, pem, private) in &files {
        let path = out.join(name);
        let written = if *private {
            write_private(&path, pem.trim_end())
        } else {
            std::fs::write(&path, pem)
        };
        if let Err(e) = written {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let at = |name: &str| out.join(name).display().to_string();
    println!(
        "# Wrote {} (keep it offline: it signs the next certificate), {} and",
        at("ca.key"),
        at("ca.crt")
    );
    println!(
        "# {} + {} (mode 0600), valid for the listed names.",
        at("edge.crt"),
        at("edge.key")
    );
    println!();
    println!("# In the edge's file ([connectors] and, for clients, [https]):");
    println!("cert = {:?}", at("edge.crt"));
    println!("key = {:?}", at("edge.key"));
    println!();
    println!("# In each connector's file (copy ca.crt beside it):");
    println!("edge-ca = \"ca.crt\"");
    ExitCode::SUCCESS
}

/// The compile helper's exit status for "the plugin does not compile" (clap takes 2 for its
/// own argument errors).
const HELPER_PLUGIN_FAILED: u8 = 3;

/// The compile helper's side: the serialized component on stdout.
fn compile_helper(wasm: &std::path::Path, max_memory: usize, instances: u32) -> ExitCode {
    use std::io::Write;
    match sluice::plugin::Runtime::compile_serialized(wasm, max_memory, instances) {
        Ok(bytes) => match std::io::stdout().lock().write_all(&bytes) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cannot write the compiled plugin: {e}");
                ExitCode::FAILURE
            }
        },
        Err(message) => {
            eprint!("{message}");
            ExitCode::from(HELPER_PLUGIN_FAILED)
        }
    }
}

/// Compiles a plugin in a helper process of this same binary (see
/// `sluice::plugin::set_compiler`).
fn compile_in_helper(
    wasm: &std::path::Path,
    max_memory: usize,
    instances: u32,
) -> Result<Vec<u8>, sluice::plugin::HelperError> {
    use sluice::plugin::HelperError;
    // The running image itself, even when its file was replaced by an upgrade since.
    let exe = match std::path::Path::new("/proc/self/exe") {
        p if p.exists() => p.to_path_buf(),
        _ => std::env::current_exe()
            .map_err(|e| HelperError::Helper(format!("cannot find this binary: {e}")))?,
    };
    let out = std::process::Command::new(exe)
        .args(["plugin", "compile-helper", "--max-memory"])
        .arg(max_memory.to_string())
        .arg("--instances")
        .arg(instances.to_string())
        .arg("--")
        .arg(wasm)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| HelperError::Helper(format!("cannot start the helper: {e}")))?;
    match out.status.code() {
        Some(0) => Ok(out.stdout),
        Some(code) if code == i32::from(HELPER_PLUGIN_FAILED) => Err(HelperError::Plugin(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )),
        _ => Err(HelperError::Helper(format!(
            "the helper failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// `sluice check --connectivity`: the file first, then every edge over both transports.
fn check_connectivity(path: &std::path::Path) -> ExitCode {
    let config = match connector_file(path, "--connectivity checks a connector's file (its edges)")
    {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match one_thread_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let reports = match runtime.block_on(sluice::connector::check::connectivity(&config)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for report in &reports {
        print!("{report}");
    }
    let unreachable = reports.iter().filter(|r| !r.works()).count();
    if unreachable == 0 {
        println!("every edge is reachable");
        ExitCode::SUCCESS
    } else {
        println!(
            "{unreachable} of {} edges reachable over no transport",
            reports.len()
        );
        ExitCode::FAILURE
    }
}

/// A runtime for a command that does a little I/O; on error, says so and gives the exit code.
/// A command-line value that is text, or `@file` for the file's bytes.
fn text_or_file(value: &str) -> anyhow::Result<Vec<u8>> {
    match value.strip_prefix('@') {
        Some(path) => std::fs::read(path).with_context(|| format!("cannot read {path}")),
        None => Ok(value.as_bytes().to_vec()),
    }
}

fn one_thread_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

/// `sluice status`: GET `/status` on an admin listener and print it.
fn status(admin: &str, json: bool) -> ExitCode {
    let runtime = match one_thread_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let fetched = runtime.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(10), fetch_status(admin))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 10s"))?
    });
    let value = match fetched {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: cannot get the status from {admin}: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{value:#}");
    } else {
        print!("{}", describe_status(&value));
    }
    ExitCode::SUCCESS
}

async fn fetch_status(admin: &str) -> anyhow::Result<serde_json::Value> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(admin).await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = http::Request::get("/status")
        .header(http::header::HOST, admin)
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status.is_success(), "it answered {status}");
    serde_json::from_slice(&body).context("the answer is not JSON")
}

/// A human-readable summary of an edge's or a connector's `/status`.
fn describe_status(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let mut out = String::new();
    if v["role"] == "connector" {
        let _ = writeln!(
            out,
            "connector {} of tunnel {} (sluice {}): {} registered, {} in flight, ingress {}",
            s(&v["connector_id"]),
            s(&v["tunnel"]),
            s(&v["version"]),
            count(
                v["registered_connections"].as_u64().unwrap_or(0) as usize,
                "connection"
            ),
            v["in_flight"],
            s(&v["digest"]),
        );
        return out;
    }
    let ready = if v["ready"] == true {
        "ready"
    } else {
        "not ready"
    };
    let _ = writeln!(
        out,
        "edge {} (sluice {}), {ready}",
        s(&v["edge_id"]),
        s(&v["version"])
    );
    for t in v["tunnels"].as_array().into_iter().flatten() {
        let conns = t["connections"].as_array().cloned().unwrap_or_default();
        let digests = t["digests"].as_object().cloned().unwrap_or_default();
        let state = match (conns.len(), digests.len()) {
            (0, _) => "OFFLINE".to_string(),
            (_, 1) => format!("ingress {}", digests.keys().next().map_or("-", |k| k)),
            _ => {
                let listed: Vec<String> =
                    digests.iter().map(|(d, n)| format!("{d} on {n}")).collect();
                format!("REPLICAS DISAGREE: {}", listed.join(", "))
            }
        };
        let _ = writeln!(
            out,
            "tunnel {}: {}, {} in flight, {state}",
            s(&t["id"]),
            count(conns.len(), "connection"),
            t["in_flight"],
        );
        for c in conns {
            let _ = writeln!(
                out,
                "  #{} {} ({}) {} from {}, up {}s, {} in flight, token #{}{}",
                c["id"],
                s(&c["connector"]),
                s(&c["software"]),
                s(&c["protocol"]),
                s(&c["peer"]),
                c["registered_secs"],
                c["in_flight"],
                c["token"],
                if c["draining"] == true {
                    ", draining"
                } else {
                    ""
                },
            );
        }
    }
    out
}

fn plugin_command(action: cli::PluginCommand) -> ExitCode {
    if let cli::PluginCommand::New {
        name,
        dir,
        sdk_path,
    } = action
    {
        use sluice::plugin::scaffold::{create, SdkSource};
        let sdk = match sdk_path {
            Some(p) => SdkSource::Path(std::fs::canonicalize(&p).unwrap_or(p)),
            None => SdkSource::Git(env!("CARGO_PKG_REPOSITORY").to_string()),
        };
        return match create(&name, &dir, &sdk) {
            Ok(root) => {
                println!("created {}", root.display());
                println!(
                    "next: cd {} && cargo test && cargo build --release --target wasm32-wasip2",
                    root.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let cli::PluginCommand::CompileHelper {
        max_memory,
        instances,
        wasm,
    } = action
    {
        return compile_helper(&wasm, max_memory, instances);
    }
    let cli::PluginCommand::Test {
        wasm,
        config,
        request,
        headers,
        status,
        grants,
        client,
        timeout,
        kv,
        http,
        body,
        response_body,
    } = action
    else {
        unreachable!("the compile helper returned above");
    };
    // Plugin logs go to stdout with the report, without timestamps.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .without_time()
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stdout)
        .init();
    let run = || -> anyhow::Result<sluice::plugin::tester::TestRun> {
        let config_json = match config {
            None => b"{}".to_vec(),
            Some(c) if std::path::Path::new(&c).is_file() => {
                let text =
                    std::fs::read_to_string(&c).with_context(|| format!("cannot read {c}"))?;
                if c.ends_with(".toml") {
                    let table: toml::Table =
                        toml::from_str(&text).with_context(|| format!("invalid TOML in {c}"))?;
                    serde_json::to_vec(&table)?
                } else {
                    serde_json::from_str::<serde_json::Value>(&text)
                        .with_context(|| format!("invalid JSON in {c}"))?;
                    text.into_bytes()
                }
            }
            Some(inline) => {
                serde_json::from_str::<serde_json::Value>(&inline)
                    .context("--config is neither a file nor valid JSON")?;
                inline.into_bytes()
            }
        };
        let mut parsed = Vec::new();
        for h in headers {
            let (n, v) = h
                .split_once(':')
                .with_context(|| format!("invalid header {h:?}: expected \"name: value\""))?;
            parsed.push((n.to_string(), v.to_string()));
        }
        let mut g = sluice::config::Grants::default();
        for grant in grants {
            g.add(&grant).map_err(anyhow::Error::msg)?;
        }
        let timeout = sluice::config::Duration::try_from(timeout)
            .map_err(anyhow::Error::msg)?
            .0;
        let mut seed = Vec::new();
        for entry in kv {
            let (k, v) = entry
                .split_once('=')
                .with_context(|| format!("invalid --kv {entry:?}: expected key=value"))?;
            seed.push((k.to_string(), v.as_bytes().to_vec()));
        }
        if !seed.is_empty() && !g.kv {
            anyhow::bail!("--kv seeds the key-value store, which needs --grant kv");
        }
        let http = http
            .iter()
            .map(|entry| sluice::plugin::tester::scripted_answer(entry))
            .collect::<Result<Vec<_>, String>>()
            .map_err(anyhow::Error::msg)?;
        if !http.is_empty() && !g.http {
            anyhow::bail!("--http answers outbound calls, which need --grant http");
        }
        Ok(sluice::plugin::tester::TestRun {
            wasm,
            config_json,
            request,
            headers: parsed,
            status,
            grants: g,
            client_addr: client,
            timeout,
            kv: seed,
            http,
            body: body.as_deref().map(text_or_file).transpose()?,
            response_body: response_body.as_deref().map(text_or_file).transpose()?,
        })
    };
    let test = match run() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match one_thread_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    report(runtime.block_on(sluice::plugin::tester::run(&test)))
}

fn tunnel_new(name: &str, hostnames: &[String], token_file: Option<&std::path::Path>) -> ExitCode {
    match config::new_tunnel(name, hostnames) {
        Ok(t) => print_tunnel(name, &t, token_file),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn tunnel_rotate(
    name: &str,
    edge_file: &std::path::Path,
    token_file: Option<&std::path::Path>,
) -> ExitCode {
    let rotated = EdgeConfig::load(edge_file)
        .map_err(|e| e.to_string())
        .and_then(|cfg| {
            let tunnel =
                cfg.tunnels.iter().find(|t| t.id == name).ok_or_else(|| {
                    format!("{}: no tunnel with id {name:?}", edge_file.display())
                })?;
            config::rotate_tunnel(tunnel)
        });
    match rotated {
        Ok(t) => print_tunnel(name, &t, token_file),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints (or writes) a new token and the edge block that goes with it.
fn print_tunnel(
    name: &str,
    tunnel: &config::NewTunnel,
    token_file: Option<&std::path::Path>,
) -> ExitCode {
    match token_file {
        Some(path) => {
            if let Err(e) = write_private(path, tunnel.token.expose()) {
                eprintln!("error: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("# Token for tunnel {name:?} written to {} (give it to the connector as token-file).", path.display());
        }
        None => {
            println!(
                "# Token for tunnel {name:?}: give it to the connector (token-file or token-env)."
            );
            println!("# It is shown only this once; the edge keeps only its hash.");
            println!("{}", tunnel.token.expose());
        }
    }
    println!();
    println!("# The tunnel's block in the edge's file (replace the one it has, if any):");
    print!("{}", tunnel.edge_block);
    ExitCode::SUCCESS
}

/// Creates `path` readable by its owner only and writes `text` to it.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{text}")
}

async fn run(role: Role) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    match role {
        Role::Edge(cfg, path) => {
            tokio::spawn(watch_signals(shutdown.clone(), None));
            let edge = sluice::edge::Edge::bind(cfg)
                .await
                .context("failed to start the edge")?;
            let reloader = edge.reloader();
            tokio::spawn(on_sighup(path, shutdown.clone(), move |path| {
                let reloader = reloader.clone();
                async move {
                    let cfg = EdgeConfig::load(&path)?;
                    reloader.reload(&cfg);
                    Ok(())
                }
            }));
            notify(&[sd_notify::NotifyState::Ready]);
            edge.run(shutdown).await;
        }
        Role::Connector(cfg, path) => {
            let connector = sluice::connector::Connector::new(cfg)
                .await
                .context("failed to start the connector")?;
            tokio::spawn(watch_signals(shutdown.clone(), Some(connector.audit())));
            let reloader = connector.reloader();
            tokio::spawn(on_sighup(path, shutdown.clone(), move |path| {
                let reloader = reloader.clone();
                async move {
                    let cfg = ConnectorConfig::load(&path)?;
                    reloader.reload(&cfg).await?;
                    Ok(())
                }
            }));
            notify(&[sd_notify::NotifyState::Ready]);
            connector.run(shutdown).await?;
        }
        Role::Demo { port, plugins } => {
            tokio::spawn(watch_signals(shutdown.clone(), None));
            let demo = sluice::demo::Demo::start(port, plugins.as_deref())
                .await
                .context("failed to start the demo")?;
            demo.run(shutdown).await?;
        }
    }
    Ok(())
}

/// Re-reads `path` on every SIGHUP and applies it; a file with an error is refused, logged,
/// and the running configuration keeps serving. Stops once shutdown begins. The signal is
/// caught from the moment this is called (before readiness is reported), not from the
/// first poll of the returned future.
fn on_sighup<F, Fut>(
    path: std::path::PathBuf,
    shutdown: CancellationToken,
    apply: F,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    F: Fn(std::path::PathBuf) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        let mut hup = match hup {
            Ok(s) => s,
            Err(e) => {
                error!(cause = %e, "cannot watch SIGHUP; reload disabled");
                return;
            }
        };
        loop {
            tokio::select! {
                signal = hup.recv() => if signal.is_none() { return },
                _ = shutdown.cancelled() => return,
            }
            info!(file = %path.display(), "SIGHUP: reloading the configuration");
            let mut reloading = vec![sd_notify::NotifyState::Reloading];
            reloading.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
            notify(&reloading);
            if let Err(e) = apply(path.clone()).await {
                error!(cause = %e, "reload refused; the running configuration keeps serving");
            }
            if !shutdown.is_cancelled() {
                notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
}

/// How long a second signal waits for queued audit events to be written before exiting.
const FORCED_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Cancels `shutdown` on SIGINT or SIGTERM; a second signal exits at once, after writing the
/// audit events already queued (for at most [`FORCED_FLUSH`]). Both signals are caught from
/// the moment this is called.
fn watch_signals(
    shutdown: CancellationToken,
    audit: Option<sluice::audit::Audit>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let signals =
        signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)));
    async move {
        let (mut term, mut int) = match signals {
            Ok(s) => s,
            Err(e) => {
                error!(cause = %e, "cannot watch SIGTERM and SIGINT");
                return;
            }
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        info!("shutting down (signal again to exit at once)");
        notify(&[sd_notify::NotifyState::Stopping]);
        shutdown.cancel();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        if let Some(audit) = audit {
            info!("exiting now: writing the queued audit events first");
            if tokio::time::timeout(FORCED_FLUSH, audit.flush())
                .await
                .is_err()
            {
                warn!("audit events still queued after {FORCED_FLUSH:?} are lost");
            }
        }
        std::process::exit(130);
    }
}

/// `sluice access tcp`: the file-less client of a TCP service.
fn access(command: cli::Command, log_format: Option<LogFormat>) -> ExitCode {
    let cli::Command::Access {
        action:
            cli::AccessCommand::Tcp {
                hostname,
                stdio,
                listen,
                edge,
                edge_ca,
                edge_server_name,
                token_file,
                danger_allow_remote,
            },
    } = command
    else {
        unreachable!("called for `access tcp` only")
    };
    let target = match access_target(hostname, edge, edge_ca, edge_server_name, token_file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Under ssh, the terminal is the user's: only warnings and errors unless RUST_LOG says.
    if stdio && std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    init_logging(log_format.unwrap_or(LogFormat::Text));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match listen {
            None => target.stdio().await.map_err(|e| e.to_string()),
            Some(listen) => {
                let addr = sluice::access::parse_listen(&listen, danger_allow_remote)?;
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                let bound = listener.local_addr().map_err(|e| e.to_string())?;
                info!(addr = %bound, hostname = %target.hostname, edge = %target.edge, "listening; each connection becomes a session");
                let shutdown = tokio_util::sync::CancellationToken::new();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    let _ = tokio::signal::ctrl_c().await;
                    stop.cancel();
                });
                std::sync::Arc::new(target).listen(listener, shutdown).await;
                Ok(())
            }
        }
    });
    // Standard input may still be read by a blocking thread: do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn access_target(
    hostname: String,
    edge: Option<String>,
    edge_ca: Option<std::path::PathBuf>,
    edge_server_name: Option<String>,
    token_file: Option<std::path::PathBuf>,
) -> Result<sluice::access::AccessTarget, String> {
    let edge_ca = match edge_ca {
        Some(p) => sluice::config::read_certs(&p).map_err(|e| format!("--edge-ca: {e}"))?,
        None => Vec::new(),
    };
    let token = match token_file {
        Some(p) => {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| format!("cannot read --token-file {}: {e}", p.display()))?;
            Some(text.trim().to_string())
        }
        None => std::env::var("SLUICE_ACCESS_TOKEN").ok(),
    };
    let token = match token {
        Some(t) if t.trim().is_empty() => {
            return Err("the token is empty (--token-file, or SLUICE_ACCESS_TOKEN)".into())
        }
        t => t.map(|t| sluice::secret::Secret::new(t.trim())),
    };
    Ok(sluice::access::AccessTarget {
        edge: sluice::access::default_edge(&hostname, edge.as_deref()),
        hostname,
        edge_ca,
        edge_server_name,
        token,
    })
}
