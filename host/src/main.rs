//! The `sluice` binary: parses the command line, sets up logging and signals, runs a role.

mod cli;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use sluice::config::{self, AnyConfig, ConnectorConfig, EdgeConfig};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if let cli::Command::Check { config } = &cli.command {
        return check(config);
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
            println!("{}: valid edge config ({} tunnels)", path.display(), c.tunnels.len());
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

async fn run(command: cli::Command) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    match command {
        cli::Command::Edge { config } => {
            let cfg = EdgeConfig::load(&config)?;
            let edge = sluice::edge::Edge::bind(cfg).await.context("failed to start the edge")?;
            edge.run(shutdown).await;
        }
        cli::Command::Connector { config } => {
            let cfg = ConnectorConfig::load(&config)?;
            let connector = sluice::connector::Connector::new(cfg).context("failed to start the connector")?;
            connector.run(shutdown).await?;
        }
        cli::Command::Demo { port } => {
            let demo = sluice::demo::Demo::start(port).await.context("failed to start the demo")?;
            demo.run(shutdown).await?;
        }
        cli::Command::Check { .. } => unreachable!("handled before the runtime starts"),
    }
    Ok(())
}

/// Cancels `shutdown` on SIGINT or SIGTERM; a second signal exits at once.
async fn watch_signals(shutdown: CancellationToken) {
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
    std::process::exit(130);
}
