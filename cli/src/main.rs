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
    /// The order example end to end: starts a local mesh (control plane + workflow
    /// coordinator, inventory, payment, shipping, storefront, one sidecar each) with the demo
    /// policies, runs a batch of orders through the `place-order` saga (some compensate, some
    /// hit a 503 the mesh retries away, one direct call is denied) and prints a summary.
    /// Ctrl-C stops every process it started.
    Demo {
        /// Orders in the batch.
        #[arg(long, default_value_t = 50)]
        orders: u32,
        /// Orders in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Leave the mesh running after the summary (Ctrl-C stops it).
        #[arg(long)]
        keep_running: bool,
        /// Export traces over OTLP/gRPC to this collector, e.g. `http://127.0.0.1:4317`.
        #[arg(long)]
        otlp: Option<String>,
        /// State directory (default: a new temporary directory, removed at exit).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Also write the summary as JSON to this file.
        #[arg(long)]
        summary_json: Option<PathBuf>,
        /// The batch must finish within this long (e.g. `5m`); unfinished runs count as
        /// failed.
        #[arg(long, default_value = "5m", value_parser = humantime_parse)]
        timeout: Duration,
    },
    /// Workflow definitions and runs (a client of the coordinator's API).
    Workflow {
        #[command(flatten)]
        api: meshflow_cli::workflow_cli::ApiArgs,
        #[command(subcommand)]
        command: meshflow_cli::workflow_cli::WorkflowCommand,
    },
    /// Per-workload success rate, request rate and p50/p99 latency of a running local mesh
    /// (inbound traffic each workload served), from its sidecars' admin endpoints.
    Stat {
        /// The mesh's state directory (`meshflow up` prints it: "mesh is up. State directory …").
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Sidecar admin addresses (`host:port` or `http://host:port` as `meshflow up` prints
        /// them, repeatable) instead of a state directory.
        #[arg(long = "admin")]
        admins: Vec<String>,
        /// Measurement window.
        #[arg(long, default_value = "2s", value_parser = humantime_parse)]
        window: Duration,
        /// Output: `table` or `json`.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Inject the sidecar into Kubernetes manifests offline, as the control plane's webhook
    /// would (like `linkerd inject`): every Pod and the pod template of every Deployment,
    /// StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job and CronJob (also in a
    /// List) gets the proxy, the capture init container, the token and trust bundle volumes
    /// and rewritten probes; other documents pass through. Multi-document YAML in, YAML on
    /// stdout; what was injected on stderr. Pods opted out (`meshflow.io/inject: disabled`)
    /// are left alone. Use the flags the control plane runs with (`--proxy-…`,
    /// `--trust-domain`) to get the same result. Exit code 64 names the file, document,
    /// object and field that could not be read or injected.
    Inject {
        /// Manifest file (`-` for standard input); repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// The mesh's SPIFFE trust domain (the proxy's expected ID).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// What injected pods get (`--native-sidecar auto` is classic offline: no API server
        /// says its version; use `always` for Kubernetes 1.29 and later).
        #[command(flatten)]
        settings: meshflow_policies::inject::InjectSettings,
    },
    /// Check a Kubernetes installation of meshflow, like `linkerd check`: the Kubernetes API
    /// and its version, the meshflow CRDs (installed, established, schema of this version),
    /// the control plane (leader Lease held and renewed, each replica's `/ready`), the
    /// injection webhook (caBundle, the certificate it serves — valid, not expiring within 7
    /// days — and a server-side dry-run pod through it), the mesh CA (valid, warning within 30
    /// days) and the trust bundle ConfigMaps, and every connected sidecar's config version.
    /// `--pre`: whether `helm install` can run (RBAC) and which CRDs exist already. One line
    /// per check (√ passed, ‼ warning, × failed with a hint, - skipped); exit code 0 when no
    /// check failed, 1 when one did, 64 for a usage error.
    Check {
        /// Pre-install checks: API, version, the rights `helm install` of the chart needs
        /// (SelfSubjectAccessReview), CRDs already present.
        #[arg(long)]
        pre: bool,
        /// The control plane's namespace.
        #[arg(long, short = 'n', default_value = "meshflow-system")]
        namespace: String,
        /// The kubeconfig file (default: `KUBECONFIG`, `~/.kube/config`, in a pod the
        /// in-cluster config).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// The kubeconfig context (default: its current context).
        #[arg(long)]
        context: Option<String>,
        /// A control-plane replica's admin address (`http://host:port`, repeatable) — for a
        /// control plane outside the cluster. Default: the control-plane pods (labels
        /// `app.kubernetes.io/name=meshflow,app.kubernetes.io/component=control-plane`)
        /// through the API server's pod proxy.
        #[arg(long = "control-plane-admin")]
        control_plane_admin: Vec<String>,
        /// How long sidecars may take to acknowledge the current config.
        #[arg(long, default_value = "10s", value_parser = humantime_parse)]
        wait: Duration,
        /// Bound of each check's API and HTTP calls.
        #[arg(long, default_value = "10s", value_parser = humantime_parse)]
        timeout: Duration,
        /// Output: `text` or `json`.
        #[arg(short = 'o', long, value_enum, default_value_t = CheckOutput::Text)]
        output: CheckOutput,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: Box<PolicyCommand>,
    },
    /// Run a local mesh from one mesh file in the foreground; Ctrl-C stops everything.
    /// Exit code 0 after Ctrl-C (or a good `--smoke`), 1 when a process fails to start or
    /// exits while the mesh runs (named with its exit status and log) or the state directory
    /// is in use, 64 for an invalid mesh file, 130 when interrupted while starting.
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
        /// How long each process (control plane, app, sidecar) may take to become ready (an
        /// app: to listen on its port).
        #[arg(long, default_value = "30s", value_parser = humantime_parse)]
        ready_timeout: Duration,
    },
}

/// `meshflow check -o`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum CheckOutput {
    Text,
    Json,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Judge one request as the target's inbound sidecar would, with its own code: mTLS mode
    /// (PeerAuthentication), path normalization, JWT (RequestAuthentication), then
    /// AuthorizationPolicy. Prints the decision and the policy and rule that made it.
    /// Policies come from a directory (`-d`), from a running control plane
    /// (`--control-plane`, with `--workload` naming the target) or from a Kubernetes cluster
    /// (`--kubernetes`, with `--pod` naming the target, or `--namespace`/`--label`).
    /// Exit code 0 = allowed, 1 = denied (403), 2 = rejected (400), 3 = bad token (401),
    /// 4 = plaintext refused (STRICT), 64 = invalid policy files, unreachable control plane or
    /// cluster, unknown pod, CRDs not installed.
    Check {
        /// Policy directory (the mesh file's policiesDir).
        #[arg(
            short = 'd',
            long,
            required_unless_present_any = ["control_plane", "kubernetes"],
            conflicts_with_all = ["control_plane", "kubernetes"]
        )]
        dir: Option<PathBuf>,
        /// A running control plane's admin address, `http://127.0.0.1:9901` or `127.0.0.1:9901`.
        #[arg(long, requires = "workload", conflicts_with = "kubernetes")]
        control_plane: Option<String>,
        /// Read the policies from a Kubernetes cluster (`KUBECONFIG`, `--kubeconfig`,
        /// `--context`; in a pod, the in-cluster config): the AuthorizationPolicy,
        /// RequestAuthentication and PeerAuthentication custom resources of the target's
        /// namespace and of `meshflow-system` (mesh-wide). Invalid ones are reported on stderr
        /// with their field and left out.
        #[arg(long)]
        kubernetes: bool,
        /// With `--kubernetes`: the target pod (in `--namespace`); its labels select the
        /// policies and its ServiceAccount gives its SPIFFE ID. Without it, `--namespace` and
        /// `--label` describe the target (a workload that need not exist yet).
        #[arg(long, requires = "kubernetes", conflicts_with_all = ["labels", "workload"])]
        pod: Option<String>,
        /// With `--kubernetes`: the calling pod, `name` (in `--namespace`) or `namespace/name`;
        /// its ServiceAccount gives the caller principal (instead of `--principal`).
        #[arg(long, requires = "kubernetes", conflicts_with = "principal")]
        source_pod: Option<String>,
        /// With `--kubernetes`: the kubeconfig file (default: `KUBECONFIG`, `~/.kube/config`).
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// With `--kubernetes`: the kubeconfig context (default: its current context).
        #[arg(long, requires = "kubernetes")]
        context: Option<String>,
        /// With `--kubernetes`: the mesh's SPIFFE trust domain (pods' and `--source-pod`'s IDs).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// With `--kubernetes`: the control plane's `--discovery-selector` (a label selector
        /// for the namespaces in the mesh), when it has one: policies of other namespaces are
        /// not in force.
        #[arg(long, requires = "kubernetes")]
        discovery_selector: Option<String>,
        /// Target workload `namespace/name` (with `--control-plane`: gives namespace, labels
        /// and port from the mesh). Also names the target in the `x-forwarded-client-cert`
        /// the sidecar sets and policies see (`By=`; with `-d` the service account is `name`).
        #[arg(long)]
        workload: Option<String>,
        /// Target workload's namespace (default `default`; with `--kubernetes`, the
        /// kubeconfig context's namespace).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Target workload's labels, `key=value` (repeatable, or comma-separated).
        #[arg(long = "label", alias = "labels", value_delimiter = ',')]
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
        /// Request path, with an optional `?query` (as sent; normalized like the sidecar does).
        #[arg(long, default_value = "/")]
        path: String,
        /// Host / :authority.
        #[arg(long, default_value = "")]
        host: String,
        /// Destination (app) port (default 80); with `--control-plane`, the mesh file's port
        /// unless given (a port the mesh assigns at start, `{port}`, must be given); with
        /// `--pod`, the pod's container port when it declares exactly one.
        #[arg(long)]
        port: Option<u16>,
        /// Request header `name=value` (repeatable), e.g. `authorization=Bearer <jwt>`.
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

async fn demo(
    options: meshflow_cli::demo::DemoOptions,
    state_dir: Option<PathBuf>,
    keep_running: bool,
) -> i32 {
    // Handle Ctrl-C / SIGTERM from the start: a signal while the mesh starts is acted on as
    // soon as the start returns, and the temporary directory is still removed.
    let mut signals = Signals::new();
    if options.concurrency == 0 {
        eprintln!("meshflow demo: --concurrency must be at least 1");
        return 64;
    }
    if let Some(endpoint) = &options.otlp {
        // The exporters speak plaintext OTLP/gRPC only (see docs/ARCHITECTURE.md).
        if !endpoint.starts_with("http://") {
            eprintln!(
                "meshflow demo: --otlp {endpoint:?} must be an http:// URL, e.g. http://127.0.0.1:4317 (TLS to the collector is not supported yet)"
            );
            return 64;
        }
    }
    let temp = match tempfile::Builder::new().prefix("meshflow-demo-").tempdir() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("meshflow demo: temp dir: {e}");
            return 1;
        }
    };
    let where_ = if state_dir.is_some() {
        ""
    } else {
        ", a temporary directory removed at exit"
    };
    let dir = state_dir.unwrap_or_else(|| temp.path().to_path_buf());
    let mesh_path = match meshflow_cli::demo::write_files(&dir.join("config")) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("meshflow demo: {}: {e}", dir.display());
            return 1;
        }
    };
    let mut up = UpOptions::new(&dir.join("state"));
    if let Some(endpoint) = &options.otlp {
        up.env
            .insert("MESHFLOW_OTLP_ENDPOINT".into(), endpoint.clone());
    }
    println!(
        "meshflow demo: starting the mesh (state and logs in {}{where_})…",
        dir.display()
    );
    // Starting processes blocks; keep it on the main thread (children's parent-death signal).
    let mut mesh = match LocalMesh::start(&mesh_path, up) {
        Ok(mesh) => mesh,
        Err(e) => {
            eprintln!("meshflow demo: {e}");
            return 1;
        }
    };
    print!("{}", mesh.describe());
    let outcome = tokio::select! {
        r = meshflow_cli::demo::run(&mesh, &options) => Some(r),
        () = signals.recv() => None,
    };
    let code = match outcome {
        None => {
            println!("\ninterrupted");
            130
        }
        Some(Err(e)) => {
            eprintln!("meshflow demo: {e:#}");
            1
        }
        Some(Ok(summary)) => {
            print!("{}", meshflow_cli::demo::render(&summary));
            if let Some(path) = &options.summary_json {
                let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
                if let Err(e) = std::fs::write(path, json) {
                    eprintln!("meshflow demo: {}: {e}", path.display());
                }
            }
            let code = if summary.unexpected.is_empty() { 0 } else { 1 };
            if keep_running {
                print!(
                    "{}",
                    meshflow_cli::demo::keep_running_hints(&summary, &dir.join("state"))
                );
                println!(
                    "mesh is up (logs in {}). Ctrl-C to stop.",
                    dir.join("state/logs").display()
                );
                signals.recv().await;
            }
            code
        }
    };
    println!("stopping…");
    mesh.supervisor.shutdown();
    code
}

/// `meshflow inject`: 0, or 64 naming what could not be read or injected.
fn inject(
    files: &[PathBuf],
    trust_domain: String,
    mut settings: meshflow_policies::inject::InjectSettings,
) -> i32 {
    use std::io::{Read, Write};
    settings.trust_domain = trust_domain;
    if let Err(e) = settings.validate() {
        eprintln!("meshflow inject: {e}");
        return 64;
    }
    // Offline no API server says its version: `auto` is classic.
    let native = settings.native_sidecar.resolve(None);
    let mut report = meshflow_cli::inject::Report::default();
    let mut streams = Vec::new();
    for file in files {
        let (origin, text) = if file.as_os_str() == "-" {
            let mut text = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut text) {
                eprintln!("meshflow inject: standard input: {e}");
                return 64;
            }
            ("-".to_string(), text)
        } else {
            match std::fs::read_to_string(file) {
                Ok(text) => (file.display().to_string(), text),
                Err(e) => {
                    eprintln!("meshflow inject: {}: {e}", file.display());
                    return 64;
                }
            }
        };
        match meshflow_cli::inject::inject_stream(&origin, &text, &settings, native, &mut report) {
            Ok(stream) if !stream.is_empty() => streams.push(stream),
            Ok(_) => {}
            Err(e) => {
                eprintln!("meshflow inject: {e}");
                return 64;
            }
        }
    }
    let mut stdout = std::io::stdout().lock();
    if stdout.write_all(streams.join("---\n").as_bytes()).is_err() {
        return 1;
    }
    for object in &report.injected {
        eprintln!("injected: {object}");
    }
    for object in &report.skipped {
        eprintln!("not injected: {object}");
    }
    0
}

/// SIGINT, SIGTERM and SIGHUP (the terminal or SSH session closed), registered once (a signal
/// that arrives before `recv` is kept). Each stops the mesh and removes a temporary state
/// directory (it holds the CA key and tokens).
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            hup: signal(SignalKind::hangup()).expect("SIGHUP handler"),
        }
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
            _ = self.hup.recv() => {}
        }
    }
}

/// `meshflow up`: exit 0 after Ctrl-C / SIGTERM (or a good `--smoke`), 1 when a process fails
/// to start or exits while the mesh runs, 64 for an invalid mesh file, 130 when interrupted
/// while starting.
async fn up(
    file: PathBuf,
    state_dir: Option<PathBuf>,
    drain: Duration,
    run_smoke: bool,
    ready_timeout: Duration,
) -> i32 {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Signals are handled from the start: Ctrl-C while processes start stops them and removes
    // the temporary state directory (it holds the CA key and the tokens).
    let interrupted = std::sync::Arc::new(AtomicBool::new(false));
    {
        let mut signals = Signals::new();
        let flag = interrupted.clone();
        tokio::spawn(async move {
            loop {
                signals.recv().await;
                flag.store(true, Ordering::SeqCst);
            }
        });
    }
    let temp = match tempfile::Builder::new().prefix("meshflow-up-").tempdir() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("meshflow up: temp dir: {e}");
            return 1;
        }
    };
    let (state_dir, where_) = match state_dir {
        Some(dir) => (dir, ""),
        None => (
            temp.path().to_path_buf(),
            ", a temporary directory removed on exit",
        ),
    };
    let mut options = UpOptions::new(&state_dir);
    options.drain = drain;
    options.ready_timeout = ready_timeout;
    options.cancel = Some(interrupted.clone());
    options.progress = true;
    // Starting processes blocks; keep it on this (main) thread so children's parent-death
    // signal is tied to the process's main thread.
    let mut mesh = match LocalMesh::start(&file, options) {
        Ok(mesh) => mesh,
        Err(UpError::Config(e)) => {
            eprintln!("meshflow up: invalid mesh file: {e}");
            return 64;
        }
        Err(UpError::Interrupted) => {
            eprintln!("meshflow up: interrupted while starting; stopped everything");
            return 130;
        }
        Err(e) => {
            eprintln!("meshflow up: {e}");
            return 1;
        }
    };
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
            "mesh is up. State directory {dir}{where_} (meshflow stat --state-dir {dir}); logs in {logs}. Ctrl-C to stop.",
            dir = state_dir.display(),
            logs = state_dir.join("logs").display()
        );
        // Until a signal, or until a process of the mesh exits (reaped and reported).
        loop {
            if interrupted.load(Ordering::SeqCst) {
                break 0;
            }
            if let Some(exited) = mesh.supervisor.first_exited() {
                eprintln!(
                    "meshflow up: {} exited with {}; its log: {}. Stopping the mesh.",
                    exited.name,
                    exited.status,
                    exited.log.display()
                );
                break 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    println!("stopping…");
    mesh.supervisor.shutdown();
    drop(mesh);
    drop(temp);
    code
}

/// `meshflow check`: exit code 0 (no check failed), 1 (a check failed) or 64 (usage).
async fn check(options: meshflow_cli::check::CheckOptions, output: CheckOutput) -> i32 {
    let report = meshflow_cli::check::run(&options).await;
    match output {
        CheckOutput::Text => meshflow_cli::output::print(&report.render_text()),
        CheckOutput::Json => meshflow_cli::output::println(
            &serde_json::to_string_pretty(&report.to_json()).unwrap_or_default(),
        ),
    }
    report.exit_code()
}

#[tokio::main]
async fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `meshflow check` reports usage errors with 64 (EX_USAGE) like its other failures
            // to start; the other commands keep clap's 2.
            let is_check = std::env::args().nth(1).as_deref() == Some("check");
            let code = match (e.use_stderr(), is_check) {
                (false, _) => 0,
                (true, true) => 64,
                (true, false) => 2,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let code = match cli.command {
        Command::Check {
            pre,
            namespace,
            kubeconfig,
            context,
            control_plane_admin,
            wait,
            timeout,
            output,
        } => {
            let mut admins = Vec::new();
            for given in &control_plane_admin {
                match meshflow_cli::check::replicas::admin_url(given) {
                    Ok(url) => admins.push(url),
                    Err(e) => {
                        eprintln!("meshflow check: {e}");
                        std::process::exit(64);
                    }
                }
            }
            if timeout.is_zero() {
                eprintln!("meshflow check: --timeout must be more than 0");
                std::process::exit(64);
            }
            let options = meshflow_cli::check::CheckOptions {
                cluster: meshflow_cli::policy_kube::ClusterOptions {
                    kubeconfig,
                    context,
                },
                namespace,
                pre,
                admins,
                wait,
                timeout,
            };
            check(options, output).await
        }
        Command::Policy { command } => policy_check(*command).await,
        Command::Inject {
            files,
            trust_domain,
            settings,
        } => inject(&files, trust_domain, settings),
        Command::Stat {
            state_dir,
            admins: given,
            window,
            output,
        } => {
            let mut admins = Vec::new();
            for a in &given {
                match meshflow_cli::stat::admin_address(a) {
                    Ok(a) => admins.push(a),
                    Err(e) => {
                        eprintln!("meshflow stat: {e}");
                        std::process::exit(64);
                    }
                }
            }
            if let Some(dir) = state_dir {
                match meshflow_cli::stat::sidecar_admins(&dir) {
                    Ok(found) => admins.extend(found),
                    Err(e) => {
                        eprintln!("meshflow stat: {}: {e}", dir.display());
                        std::process::exit(64);
                    }
                }
            }
            if admins.is_empty() {
                eprintln!("meshflow stat: no sidecars: give --state-dir or --admin");
                std::process::exit(64);
            }
            match meshflow_cli::stat::stat(&admins, window).await {
                Ok(rows) if output == "json" => {
                    let json: Vec<serde_json::Value> = rows
                        .iter()
                        .map(|r| {
                            serde_json::json!({
                        "workload": r.workload, "requests": r.requests, "success": r.success,
                        "rps": r.rps, "p50Ms": r.p50_ms, "p99Ms": r.p99_ms})
                        })
                        .collect();
                    meshflow_cli::output::println(
                        &serde_json::to_string_pretty(&json).unwrap_or_default(),
                    );
                    0
                }
                Ok(rows) => {
                    meshflow_cli::output::print(&meshflow_cli::stat::table(&rows));
                    0
                }
                Err(e) => {
                    eprintln!("meshflow stat: {e}");
                    1
                }
            }
        }
        Command::Workflow { api, command } => {
            use meshflow_cli::workflow_cli::{command as verb, run, WorkflowCommand as W};
            match command {
                W::Cancel { id } => verb(api, "cancel", &id).await,
                W::Terminate { id } => verb(api, "terminate", &id).await,
                W::Retry { id } => verb(api, "retry", &id).await,
                other => run(api, other).await,
            }
        }
        Command::Demo {
            orders,
            concurrency,
            keep_running,
            otlp,
            state_dir,
            summary_json,
            timeout,
        } => {
            demo(
                meshflow_cli::demo::DemoOptions {
                    orders,
                    concurrency,
                    otlp,
                    summary_json,
                    timeout,
                },
                state_dir,
                keep_running,
            )
            .await
        }
        Command::Up {
            file,
            state_dir,
            drain,
            smoke: run_smoke,
            ready_timeout,
        } => up(file, state_dir, drain, run_smoke, ready_timeout).await,
    };
    std::process::exit(code);
}

async fn policy_check(command: PolicyCommand) -> i32 {
    use meshflow_cli::policy_check::{
        check, load_dir_with_jwks, load_from_control_plane, render, CheckRequest, Target,
    };
    let PolicyCommand::Check {
        dir,
        control_plane,
        kubernetes,
        pod,
        source_pod,
        kubeconfig,
        context,
        trust_domain,
        discovery_selector,
        workload,
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
    let split = |pairs: &[String]| -> Vec<(String, String)> {
        pairs
            .iter()
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    };
    let mut target = Target {
        namespace: namespace.clone().unwrap_or_else(|| "default".into()),
        labels: split(&labels).into_iter().collect(),
        spiffe_id: None,
    };
    let mut request = CheckRequest {
        port: port.unwrap_or(80),
        principal,
        source_ip,
        method,
        path,
        host,
        headers: Default::default(),
    };
    for (k, v) in split(&headers) {
        request
            .headers
            .entry(k.to_ascii_lowercase())
            .or_default()
            .push(v);
    }
    let set = if kubernetes {
        let options = meshflow_cli::policy_kube::ClusterOptions {
            kubeconfig,
            context,
        };
        let from = KubeTarget {
            namespace,
            pod,
            source_pod,
            trust_domain,
            discovery_selector,
            port,
        };
        match from_cluster(&options, from, &mut target, &mut request).await {
            Ok(set) => set,
            Err(e) => {
                eprintln!("meshflow policy check: {e}");
                return 64;
            }
        }
    } else {
        match (dir, control_plane) {
            (Some(dir), _) => match load_dir_with_jwks(&dir) {
                Ok(set) => {
                    // The target's identity for the sidecar's XFCC: `--workload ns/name`,
                    // service account = name, in the caller's trust domain.
                    target.spiffe_id = workload.as_deref().and_then(|w| {
                        let (ns, name) = w.split_once('/')?;
                        let td = request
                            .principal
                            .as_deref()
                            .map(|p| p.trim_start_matches("spiffe://"))
                            .and_then(|p| p.split('/').next())
                            .unwrap_or("cluster.local");
                        Some(format!("spiffe://{td}/ns/{ns}/sa/{name}"))
                    });
                    set
                }
                Err(e) => {
                    eprintln!("meshflow policy check: {e}");
                    return 64;
                }
            },
            (None, Some(admin)) => match load_from_control_plane(&admin).await {
                Ok((mesh, set)) => {
                    let key = workload.unwrap_or_default();
                    let Some(w) = mesh.workload(&key) else {
                        eprintln!("meshflow policy check: the mesh has no workload {key:?}");
                        return 64;
                    };
                    target = Target {
                        namespace: w.namespace.clone(),
                        labels: w.labels.clone(),
                        spiffe_id: w.spiffe_id(&mesh.spec.trust_domain).ok().map(|id| id.uri()),
                    };
                    request.port = port.or(w.app.port).unwrap_or(request.port);
                    set
                }
                Err(e) => {
                    eprintln!("meshflow policy check: {e}");
                    return 64;
                }
            },
            (None, None) => unreachable!("clap requires --dir, --control-plane or --kubernetes"),
        }
    };
    let (verdict, audited) = check(&set, &target, &request);
    meshflow_cli::output::print(&render(&verdict, &audited));
    verdict.exit_code()
}

/// What `--kubernetes` resolves against the cluster.
struct KubeTarget {
    namespace: Option<String>,
    pod: Option<String>,
    source_pod: Option<String>,
    trust_domain: String,
    discovery_selector: Option<String>,
    port: Option<u16>,
}

/// `--kubernetes`: the target (pod or `--namespace`/`--label`), the caller (`--source-pod`)
/// and the policies from the cluster; invalid custom resources and key sets only the control
/// plane fetches are reported on stderr.
async fn from_cluster(
    options: &meshflow_cli::policy_kube::ClusterOptions,
    from: KubeTarget,
    target: &mut meshflow_cli::policy_check::Target,
    request: &mut meshflow_cli::policy_check::CheckRequest,
) -> Result<meshflow_policies::documents::PolicySet, String> {
    use meshflow_cli::policy_kube as kube_mode;
    let (client, url) = kube_mode::client(options).await?;
    let namespace = from
        .namespace
        .unwrap_or_else(|| client.default_namespace().to_string());
    target.namespace.clone_from(&namespace);
    if let Some(pod) = &from.pod {
        let (of_pod, pod_port) =
            kube_mode::pod_target(&client, &url, &namespace, pod, &from.trust_domain).await?;
        *target = of_pod;
        request.port = from.port.or(pod_port).unwrap_or(request.port);
    }
    if let Some(source) = &from.source_pod {
        let (ns, name) = source
            .split_once('/')
            .unwrap_or((namespace.as_str(), source.as_str()));
        request.principal = Some(
            kube_mode::pod_source_principal(&client, &url, ns, name, &from.trust_domain).await?,
        );
    }
    let policies = kube_mode::cluster_policies(
        &client,
        &url,
        &namespace,
        from.discovery_selector.as_deref(),
    )
    .await?;
    for invalid in &policies.invalid {
        eprintln!("warning: {invalid}");
    }
    for note in &policies.notes {
        eprintln!("{note}");
    }
    for note in kube_mode::key_set_notes(&policies.set) {
        eprintln!("{note}");
    }
    Ok(policies.set)
}
