//! `meshflow-proxy`: parses flags, starts logging, runs [`meshflow_proxy::run`]. Helper
//! commands (first argument): `wait-ready` ([`meshflow_proxy::wait_ready`], the injected
//! proxy's `postStart` hook), `init` ([`meshflow_proxy::capture`], the capture rules the
//! injected init container installs).

use clap::Parser;
use meshflow_proxy::{run, ProxyConfig, StartError};

fn main() {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "wait-ready")
    {
        std::process::exit(meshflow_proxy::wait_ready::main(
            std::env::args_os().skip(2),
        ));
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "init") {
        std::process::exit(meshflow_proxy::capture::main(std::env::args_os().skip(2)));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHFLOW_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ProxyConfig::parse();
    match run(config) {
        Ok(()) => {}
        Err(StartError::Config(e)) => {
            eprintln!("meshflow-proxy: invalid configuration: {e}");
            std::process::exit(64);
        }
        Err(e) => {
            eprintln!("meshflow-proxy: {e}");
            std::process::exit(1);
        }
    }
}
