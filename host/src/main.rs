//! The `sluice` binary: parses the command line, sets up logging and signals, runs a role.

mod cli;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use sluice::config::{self, AnyConfig, ConnectorConfig, EdgeConfig};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if let cli::Command::Check { config } = &cli.command {
        return check(config);
    }
    if let cli::Command::Tunnel {
        action:
            cli::TunnelCommand::New {
                name,
                hostnames,
                token_file,
            },
    } = &cli.command
    {
        return tunnel_new(name, hostnames, token_file.as_deref());
    }
    if let cli::Command::Plugin { action } = cli.command {
        return plugin_command(action);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load_any(path) {
        Ok(AnyConfig::Edge(c)) => {
            println!(
                "{}: valid edge config ({} tunnels)",
                path.display(),
                c.tunnels.len()
            );
            ExitCode::SUCCESS
        }
        Ok(AnyConfig::Connector(c)) => {
            println!(
                "{}: valid connector config ({} origins, {} ingress rules)",
                path.display(),
                c.origins.len(),
                c.ingress.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn plugin_command(action: cli::PluginCommand) -> ExitCode {
    let cli::PluginCommand::Test {
        wasm,
        config,
        request,
        headers,
        status,
        grants,
        client,
        timeout,
    } = action;
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
            match grant.as_str() {
                "client-addr" => g.client_addr = true,
                "credentials" => g.credentials = true,
                other => {
                    anyhow::bail!("unknown grant {other:?}: \"client-addr\" or \"credentials\"")
                }
            }
        }
        let timeout = sluice::config::Duration::try_from(timeout)
            .map_err(anyhow::Error::msg)?
            .0;
        Ok(sluice::plugin::tester::TestRun {
            wasm,
            config_json,
            request,
            headers: parsed,
            status,
            grants: g,
            client_addr: client,
            timeout,
        })
    };
    let test = match run() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sluice::plugin::tester::run(&test)) {
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

fn tunnel_new(name: &str, hostnames: &[String], token_file: Option<&std::path::Path>) -> ExitCode {
    let tunnel = match config::new_tunnel(name, hostnames) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
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
    println!("# Add to the edge's file:");
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

async fn run(command: cli::Command) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    match command {
        cli::Command::Edge { config } => {
            tokio::spawn(watch_signals(shutdown.clone(), None));
            let cfg = EdgeConfig::load(&config)?;
            let edge = sluice::edge::Edge::bind(cfg)
                .await
                .context("failed to start the edge")?;
            let reloader = edge.reloader();
            tokio::spawn(on_sighup(config, move |path| {
                let reloader = reloader.clone();
                async move {
                    let cfg = EdgeConfig::load(&path)?;
                    reloader.reload(&cfg);
                    Ok(())
                }
            }));
            edge.run(shutdown).await;
        }
        cli::Command::Connector { config } => {
            let cfg = ConnectorConfig::load(&config)?;
            let connector = sluice::connector::Connector::new(cfg)
                .await
                .context("failed to start the connector")?;
            tokio::spawn(watch_signals(shutdown.clone(), Some(connector.audit())));
            let reloader = connector.reloader();
            tokio::spawn(on_sighup(config, move |path| {
                let reloader = reloader.clone();
                async move {
                    let cfg = ConnectorConfig::load(&path)?;
                    reloader.reload(&cfg).await?;
                    Ok(())
                }
            }));
            connector.run(shutdown).await?;
        }
        cli::Command::Demo {
            port,
            plugins,
            no_plugins,
        } => {
            tokio::spawn(watch_signals(shutdown.clone(), None));
            let plugins = (!no_plugins).then_some(plugins.as_path());
            let demo = sluice::demo::Demo::start(port, plugins)
                .await
                .context("failed to start the demo")?;
            demo.run(shutdown).await?;
        }
        cli::Command::Check { .. } | cli::Command::Tunnel { .. } | cli::Command::Plugin { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
    Ok(())
}

/// Re-reads `path` on every SIGHUP and applies it; a file with an error is refused, logged,
/// and the running configuration keeps serving.
async fn on_sighup<F, Fut>(path: std::path::PathBuf, apply: F)
where
    F: Fn(std::path::PathBuf) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            error!(cause = %e, "cannot watch SIGHUP; reload disabled");
            return;
        }
    };
    while hup.recv().await.is_some() {
        info!(file = %path.display(), "SIGHUP: reloading the configuration");
        if let Err(e) = apply(path.clone()).await {
            error!(cause = %e, "reload refused; the running configuration keeps serving");
        }
    }
}

/// How long a second signal waits for queued audit events to be written before exiting.
const FORCED_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Cancels `shutdown` on SIGINT or SIGTERM; a second signal exits at once, after writing the
/// audit events already queued (for at most [`FORCED_FLUSH`]).
async fn watch_signals(shutdown: CancellationToken, audit: Option<sluice::audit::Audit>) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(cause = %e, "cannot watch SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutting down (signal again to exit at once)");
    shutdown.cancel();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
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
