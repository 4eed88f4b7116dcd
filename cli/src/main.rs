//! `meshflow`: run a local mesh (`up`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshflow_cli::up::{LocalMesh, UpError, UpOptions};

#[derive(Parser)]
#[command(
    name = "meshflow",
    version,
    about = "meshflow: a service mesh with durable call-chain coordination"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local mesh from one mesh file in the foreground; Ctrl-C stops everything.
    Up {
        /// Mesh definition (kind: Mesh).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// State directory; default: a fresh temporary directory removed on exit.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Sidecar drain time on shutdown.
        #[arg(long, default_value = "1s", value_parser = humantime_parse)]
        drain: Duration,
        /// Send one request through the mesh (spec.smoke, or first → second workload), print
        /// it, and exit 0 if it succeeded over mTLS.
        #[arg(long)]
        smoke: bool,
    },
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 500ms, 2s)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(60 * n)),
        _ => Err(format!("bad duration {s:?} (units: ms, s, m)")),
    }
}

async fn smoke(mesh: &LocalMesh) -> anyhow::Result<()> {
    let spec = &mesh.mesh.spec;
    let (from, url) = match &spec.smoke {
        Some(s) => (
            format!(
                "{}/{}",
                spec.workloads
                    .iter()
                    .find(|w| w.name == s.from)
                    .map_or("default", |w| w.namespace.as_str()),
                s.from
            ),
            s.url.clone(),
        ),
        None => {
            let first = spec
                .workloads
                .first()
                .ok_or_else(|| anyhow::anyhow!("no workloads"))?;
            let second = spec.workloads.get(1).unwrap_or(first);
            (
                first.key(),
                format!("http://{}.{}/smoke", second.service(), second.namespace),
            )
        }
    };
    let outbound = &mesh.workload(&from).outbound;
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{outbound}"))?)
        .timeout(Duration::from_secs(10))
        .build()?;
    println!("smoke: GET {url} from {from} (outbound {outbound})");
    let response = client.get(&url).send().await?;
    let status = response.status();
    let body = response.text().await?;
    println!("smoke: {status}\n{body}");
    let caller = &mesh.workload(&from).spiffe_id;
    if !status.is_success() {
        anyhow::bail!("smoke request failed with {status}");
    }
    if !body.contains(caller.as_str()) {
        anyhow::bail!("the backend did not report the caller's SPIFFE ID {caller}");
    }
    println!("smoke: ok — the backend saw the caller as {caller} over mTLS");
    Ok(())
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Up {
            file,
            state_dir,
            drain,
            smoke: run_smoke,
        } => {
            let temp = tempfile::Builder::new()
                .prefix("meshflow-up-")
                .tempdir()
                .expect("temp dir");
            let state_dir = state_dir.unwrap_or_else(|| temp.path().to_path_buf());
            let mut options = UpOptions::new(&state_dir);
            options.drain = drain;
            // Starting processes blocks; keep it on this (main) thread so children's
            // parent-death signal is tied to the process's main thread.
            match LocalMesh::start(&file, options) {
                Ok(mut mesh) => {
                    println!("{}", mesh.describe());
                    let code = if run_smoke {
                        match smoke(&mesh).await {
                            Ok(()) => 0,
                            Err(e) => {
                                eprintln!("meshflow up --smoke: {e}");
                                1
                            }
                        }
                    } else {
                        println!(
                            "mesh is up; logs in {}. Ctrl-C to stop.",
                            state_dir.join("logs").display()
                        );
                        wait_for_signal().await;
                        0
                    };
                    println!("stopping…");
                    mesh.supervisor.shutdown();
                    code
                }
                Err(UpError::Config(e)) => {
                    eprintln!("meshflow up: invalid mesh file: {e}");
                    64
                }
                Err(e) => {
                    eprintln!("meshflow up: {e}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}
