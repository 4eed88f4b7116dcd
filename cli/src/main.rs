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
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
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

#[derive(Subcommand)]
enum PolicyCommand {
    /// Evaluate the AuthorizationPolicies in a directory for one request, with the sidecar's own
    /// evaluation code (path normalization included); prints the decision and the policy and
    /// rule that made it. Exit code 0 = allowed, 1 = denied, 2 = the request is rejected (400),
    /// 64 = invalid policy files.
    Check {
        /// Policy directory (the mesh file's policiesDir).
        #[arg(short = 'd', long)]
        dir: PathBuf,
        /// Target workload's namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Target workload's labels, `key=value` (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Caller principal (Istio form `td/ns/x/sa/y`) or SPIFFE ID; absent = plaintext.
        #[arg(long)]
        principal: Option<String>,
        /// Caller IP.
        #[arg(long)]
        source_ip: Option<std::net::IpAddr>,
        /// Method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Request path (as sent; it is normalized like the sidecar does).
        #[arg(long, default_value = "/")]
        path: String,
        /// Host / :authority.
        #[arg(long, default_value = "")]
        host: String,
        /// Destination (app) port.
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// Request header `name=value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
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
        Command::Policy { command } => policy_check(command),
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

fn policy_check(command: PolicyCommand) -> i32 {
    use meshflow_policies::authz::{authorize, RequestAttributes};
    use meshflow_policies::documents::PolicySet;
    use meshflow_policies::path::{normalize_host, normalize_path};
    let PolicyCommand::Check {
        dir,
        namespace,
        labels,
        principal,
        source_ip,
        method,
        path,
        host,
        port,
        headers,
    } = command;
    let set = match PolicySet::load_dir(&dir) {
        Ok(set) => set,
        Err(e) => {
            eprintln!("meshflow policy check: {e}");
            return 64;
        }
    };
    let split = |pairs: &[String]| -> std::collections::BTreeMap<String, String> {
        pairs
            .iter()
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    };
    let labels = split(&labels);
    let principal = principal.map(|p| p.trim_start_matches("spiffe://").to_string());
    let source_namespace = principal
        .as_deref()
        .and_then(|p| p.split('/').nth(2))
        .map(str::to_string);
    let (raw_path, query) = path
        .split_once('?')
        .map_or((path.as_str(), ""), |(p, q)| (p, q));
    let normalized = match normalize_path(raw_path) {
        Ok(p) => p,
        Err(e) => {
            println!("REJECT 400 ({e}): the sidecar answers before any policy is consulted");
            return 2;
        }
    };
    let mut header_map: std::collections::BTreeMap<String, Vec<String>> =
        std::collections::BTreeMap::new();
    for (k, v) in split(&headers) {
        header_map
            .entry(k.to_ascii_lowercase())
            .or_default()
            .push(v);
    }
    let attributes = RequestAttributes {
        principal,
        source_namespace,
        source_ip,
        remote_ip: source_ip,
        host: normalize_host(&host),
        port,
        method,
        path: normalized.clone(),
        headers: header_map,
        ..Default::default()
    };
    let decision = authorize(set.authorization_for(&namespace, &labels), &attributes);
    let verdict = if decision.allowed { "ALLOW" } else { "DENY" };
    let by = match (&decision.policy, decision.rule) {
        (Some(p), Some(r)) => format!("by {p} rule {r}"),
        (None, _) if decision.allowed => "(no ALLOW policy selects the workload)".to_string(),
        _ => "(ALLOW policies exist and none matches)".to_string(),
    };
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    println!("{verdict} {by}; normalized path {normalized}{query}");
    for audited in &decision.audited {
        println!("AUDIT {audited}");
    }
    if decision.allowed {
        0
    } else {
        1
    }
}
