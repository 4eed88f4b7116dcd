//! `meshflow-control-plane`: parses flags, starts logging, runs [`meshflow_control_plane::run`].

use clap::Parser;
use meshflow_control_plane::{run, ControlPlaneConfig, StartError};

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHFLOW_LOG")
                // kube's client logs whole response bodies on some errors: only its errors.
                .unwrap_or_else(|_| "info,kube_client=error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ControlPlaneConfig::parse();
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    match run(config, shutdown).await {
        Ok(()) => {}
        Err(StartError::Config(e)) => {
            eprintln!("meshflow-control-plane: invalid configuration: {e}");
            std::process::exit(64);
        }
        Err(e) => {
            eprintln!("meshflow-control-plane: {e}");
            std::process::exit(1);
        }
    }
}
