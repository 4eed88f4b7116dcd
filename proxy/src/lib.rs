//! meshflow sidecar proxy on Cloudflare Pingora with rustls.
//!
//! - Inbound listener: TLS 1.3 only, client certificate required (SPIFFE X.509-SVID from the
//!   mesh CA, exactly one URI SAN in the trust domain); plaintext on the same port only under
//!   PeerAuthentication PERMISSIVE ([`inbound::accept`]). Checks JWTs (RequestAuthentication) and
//!   AuthorizationPolicy, then forwards to the app on 127.0.0.1 with one XFCC header from the
//!   verified peer.
//! - Outbound listener (127.0.0.1): routes by authority to a mesh service, originates mTLS over
//!   HTTP/2 and verifies the server is the destination's expected identity.
//! - Admin listener: `/ready`, `/live`, `/metrics`, `/config_dump`, `POST /shutdown`.
//! - Traffic capture: `meshflow-proxy init` installs the pod's iptables rules ([`capture`]);
//!   connections they redirect to the outbound listener are proxied transparently by their
//!   original destination ([`outbound::transparent`]).
//!
//! Folders by layer: [`inbound`] (accept, admission, forwarding to the app), [`outbound`]
//! (compiled routes, balancing, retries, transparent capture), [`identity`] (SVID, trust
//! bundle, TLS verification), [`config`] (bootstrap, control-plane client, snapshots), [`http`]
//! (request hygiene shared by both directions), [`telemetry`] (metrics, access log). The Pingora
//! `ProxyHttp` impls are thin adapters over pure functions (here and in `meshflow_policies`).

pub mod admin;
pub mod app_probes;
pub mod capture;
pub mod config;
pub mod control_plane;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod outbound;
pub mod shared;
pub mod telemetry;
pub mod wait_ready;

use crate::config::bootstrap;
use crate::control_plane as cp_client;
use crate::inbound::accept as inbound_accept;
use crate::outbound::transparent;
use crate::telemetry::{access_log, metrics};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use meshflow_api::ReadyFile;
use meshflow_policies::{AppProtocol, SpiffeId};
use pingora_core::apps::HttpServerOptions;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig, TcpSocketOptions};
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::ShutdownWatch;
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use prometheus::Registry;
use tokio::sync::Notify;

use crate::shared::Shared;

/// Sidecar settings (flags over `MESHFLOW_…` env over defaults). Dumped at `/config_dump`.
#[derive(Debug, Clone, clap::Parser, serde::Serialize)]
#[command(name = "meshflow-proxy", version, about = "meshflow sidecar proxy")]
pub struct ProxyConfig {
    /// Bootstrap file the control plane wrote for this workload (JSON). Absent: built from
    /// `--control-plane` and the other bootstrap flags (an injected pod's `MESHFLOW_…` env).
    #[arg(
        long,
        env = "MESHFLOW_BOOTSTRAP",
        required_unless_present = "control_plane"
    )]
    pub bootstrap: Option<PathBuf>,
    /// The bootstrap as flags, instead of `--bootstrap`.
    #[command(flatten)]
    pub pod_bootstrap: bootstrap::PodBootstrap,
    /// The app's port on 127.0.0.1.
    #[arg(long, env = "MESHFLOW_APP_PORT")]
    pub app_port: u16,
    /// The app's protocol: http1, h2c or grpc.
    #[arg(long, env = "MESHFLOW_APP_PROTOCOL", default_value = "http1", value_parser = parse_protocol)]
    #[serde(skip)]
    pub app_protocol: AppProtocol,
    /// Inbound (mTLS) listen address; port 0 picks a free port (see the ready file).
    #[arg(long, env = "MESHFLOW_INBOUND", default_value = "127.0.0.1:0")]
    pub inbound: SocketAddr,
    /// Outbound listen address (loopback only).
    #[arg(long, env = "MESHFLOW_OUTBOUND", default_value = "127.0.0.1:0")]
    pub outbound: SocketAddr,
    /// Address registered as this workload's endpoint (default: the bound inbound address).
    /// In Kubernetes this is the pod IP; peers must still see this workload's identity there.
    #[arg(long, env = "MESHFLOW_ADVERTISE")]
    pub advertise: Option<SocketAddr>,
    /// Admin listen address.
    #[arg(long, env = "MESHFLOW_ADMIN", default_value = "127.0.0.1:0")]
    pub admin: SocketAddr,
    /// The app's original kubelet probes as JSON (an injected pod's `meshflow.io/app-probes`
    /// annotation, through the downward API), performed against the app when the kubelet asks
    /// the admin listener for `/app-health/<container>/<probe>`. Empty: none.
    #[arg(long, env = "MESHFLOW_APP_PROBES", default_value = "")]
    pub app_probes: String,
    /// How long in-flight requests may finish after SIGTERM, e.g. `5s`.
    #[arg(long, env = "MESHFLOW_DRAIN", default_value = "5s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
    /// Worker threads per listener (inbound and outbound each). One, like Linkerd's proxy: a
    /// sidecar shares its pod's and node's cores with the app, and on a busy node a second
    /// thread adds wake-ups rather than throughput (ARCHITECTURE "Sidecar performance").
    /// Injection sets it from the proxy's CPU limit (`meshflow.io/proxy-cpu-limit`, cores
    /// rounded up).
    #[arg(long, env = "MESHFLOW_THREADS", default_value_t = 1)]
    pub threads: usize,
    /// HTTP/2 max concurrent streams per connection (RFC 9113 §6.5.2).
    #[arg(
        long,
        env = "MESHFLOW_H2_MAX_CONCURRENT_STREAMS",
        default_value_t = 256
    )]
    pub h2_max_concurrent_streams: u32,
    /// Largest request header section, bytes; larger → 431 (also the HTTP/2
    /// SETTINGS_MAX_HEADER_LIST_SIZE).
    #[arg(long, env = "MESHFLOW_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Structured access log: `-` for stdout or a file to append to; one JSON line per
    /// request (see `access_log`). Default: off.
    #[arg(long, env = "MESHFLOW_ACCESS_LOG")]
    pub access_log: Option<String>,
    /// OTLP/gRPC trace collector, e.g. `http://127.0.0.1:4317`. Default: no export (trace
    /// context is still propagated and invalid `traceparent` headers still replaced).
    #[arg(long, env = "MESHFLOW_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Probability (0.0–1.0) that a request without a sampled parent starts a sampled trace;
    /// a parent's decision is always honoured.
    #[arg(long, env = "MESHFLOW_TRACE_SAMPLING", default_value_t = 1.0)]
    pub trace_sampling: f64,
    /// Also accept B3 trace headers (`b3`, `X-B3-*`) when no valid `traceparent` is present.
    #[arg(long, env = "MESHFLOW_TRACE_B3", default_value_t = false)]
    pub trace_b3: bool,
    /// Written once ready: bound addresses (inbound, outbound, admin) as JSON.
    #[arg(long, env = "MESHFLOW_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Captured connections to destinations outside the mesh: ALLOW_ANY passes them through,
    /// REGISTRY_ONLY refuses them (a mesh-wide setting: give every sidecar the same).
    #[arg(
        long,
        env = "MESHFLOW_OUTBOUND_TRAFFIC_POLICY",
        value_enum,
        default_value = "ALLOW_ANY"
    )]
    pub outbound_traffic_policy: transparent::OutboundTrafficPolicy,
    /// How long a captured connection's first bytes are waited for to detect HTTP; after it
    /// the connection is carried as opaque TCP (clients of server-first protocols send
    /// nothing until the server spoke).
    #[arg(long, env = "MESHFLOW_PROTOCOL_DETECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub protocol_detect_timeout: Duration,
    /// Destination ports of captured connections carried as opaque TCP without detection,
    /// comma-separated (default: Linkerd's server-first ports — SMTP, MySQL, Galera,
    /// PostgreSQL, Redis, Elasticsearch, Memcached). Per destination pod the annotation
    /// `meshflow.io/opaque-ports` adds more (through the control plane).
    #[arg(
        long,
        env = "MESHFLOW_OPAQUE_PORTS",
        value_delimiter = ',',
        default_value = "25,587,3306,4444,5432,6379,9300,11211"
    )]
    pub opaque_ports: Vec<u16>,
}

fn parse_protocol(s: &str) -> Result<AppProtocol, String> {
    match s {
        "http1" => Ok(AppProtocol::Http1),
        "h2c" => Ok(AppProtocol::H2c),
        "grpc" => Ok(AppProtocol::Grpc),
        other => Err(format!("unknown app protocol {other:?} (http1, h2c, grpc)")),
    }
}

/// Errors that stop the sidecar at start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad flags or bootstrap file (exit code 64).
    #[error("{0}")]
    Config(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// A port held (bound, never listening, SO_REUSEPORT) so that Pingora can bind the same
/// address and we know the port before Pingora starts. A socket that does not listen gets no
/// connections, so the reservation is invisible to clients.
struct PortReservation {
    _socket: socket2::Socket,
    addr: SocketAddr,
}

fn reserve(addr: SocketAddr) -> std::io::Result<PortReservation> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    let addr = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an inet socket"))?;
    Ok(PortReservation {
        _socket: socket,
        addr,
    })
}

/// Read buffer (bytes) of each connection accepted on the outbound port, under the HTTP/1
/// parser. Pingora's default is 64 KiB, allocated zeroed (so resident) per connection: an
/// app's pool of 64 keep-alive connections then held 4 MiB of read buffers in the outbound
/// sidecar. Request heads fit in 4 KiB (Pingora's own head buffer starts at 4 KiB and grows);
/// larger reads (bodies) bypass a buffer this small. The inbound port keeps the default:
/// few connections (one per peer sidecar), each multiplexing many HTTP/2 streams under TLS.
const OUTBOUND_READ_BUFFER: usize = 4096;

/// Write buffer (bytes) of each connection accepted on the inbound port (below TLS for mesh
/// traffic). h2 writes the frames of one write round to the TLS stream and flushes once at the end
/// of the round (the patched `h2` in `third_party/`; before, each DATA frame of 256 bytes or more
/// was flushed alone). rustls turns each write into a TLS record and hands it to this buffer, so
/// with room for several records (Pingora's default is 1,460 bytes, about one 1 KiB response) the
/// records of one round leave in one `send` instead of one `send` per response, each waking the
/// peer sidecar. A record that does not fit (a full 16 KiB DATA frame) bypasses the buffer, as
/// before. Each inbound connection holds this buffer (there are few: one per peer sidecar, plus
/// plaintext and opaque TCP callers). HTTP/1.x responses on this port are flushed after every body
/// write (patched pingora-core; upstream Pingora flushed a Content-Length body only when complete,
/// which with this buffer held streamed pieces), so only an h2 write round and a Content-Length
/// response head waiting for its first body piece sit in it (docs/ARCHITECTURE.md, "Departures
/// forced by Pingora").
const INBOUND_WRITE_BUFFER: usize = 16 * 1024;

fn reuseport() -> TcpSocketOptions {
    let mut options = TcpSocketOptions::default();
    options.so_reuseport = Some(true);
    options
}

/// SIGTERM → graceful (drain), SIGINT → fast, `POST /shutdown` → graceful.
struct SignalWatch {
    admin_shutdown: Arc<Notify>,
}

#[async_trait]
impl ShutdownSignalWatch for SignalWatch {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::FastShutdown,
            _ = self.admin_shutdown.notified() => ShutdownSignal::GracefulTerminate,
        }
    }
}

/// Control-plane client, admin listener and ready file, run inside Pingora's runtime.
struct Background {
    client: Arc<cp_client::ControlPlaneClient>,
    shared: Shared,
    admin: std::sync::Mutex<Option<std::net::TcpListener>>,
    admin_shutdown: Arc<Notify>,
    app_probes: Arc<app_probes::AppProbes>,
    ready_file: Option<PathBuf>,
    addresses: Vec<(&'static str, SocketAddr)>,
}

#[async_trait]
impl BackgroundService for Background {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let admin = self.admin.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(listener) = admin.and_then(|l| tokio::net::TcpListener::from_std(l).ok()) {
            tokio::spawn(admin::serve(
                listener,
                self.shared.clone(),
                admin::AdminContext {
                    shutdown: self.admin_shutdown.clone(),
                    probes: self.app_probes.clone(),
                },
            ));
        }
        tokio::spawn(self.client.clone().run_identity());
        tokio::spawn(self.client.clone().run_config());
        // Ready = SVID + config + every listener accepting connections.
        loop {
            if self.shared.is_ready() {
                let mut all = true;
                for (_, addr) in &self.addresses {
                    all &= tokio::net::TcpStream::connect(addr).await.is_ok();
                }
                if all {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!("sidecar ready");
        if let Some(path) = &self.ready_file {
            let mut file = ReadyFile {
                pid: std::process::id(),
                ..Default::default()
            };
            for (name, addr) in &self.addresses {
                file.addresses.insert((*name).to_string(), addr.to_string());
            }
            if let Err(e) = file.write(path) {
                tracing::error!(error = %e, "cannot write ready file");
            }
        }
        let _ = shutdown.changed().await;
    }
}

/// Runs the sidecar until shutdown. Must not be called inside a tokio runtime (Pingora owns
/// its runtimes).
///
/// # Errors
/// [`StartError::Config`] for unusable flags or bootstrap; [`StartError::Other`] otherwise.
pub fn run(config: ProxyConfig) -> Result<(), StartError> {
    let cfg = |e: String| StartError::Config(e);
    let other = |e: String| StartError::Other(e);
    let (bootstrap, origin) =
        bootstrap::load(config.bootstrap.as_deref(), &config.pod_bootstrap).map_err(cfg)?;
    let spiffe_id: SpiffeId = bootstrap
        .spiffe_id
        .parse()
        .map_err(|e| cfg(format!("{origin}: spiffeId: {e}")))?;
    if !config.outbound.ip().is_loopback() {
        return Err(cfg(format!(
            "--outbound {} must be a loopback address",
            config.outbound
        )));
    }
    let app_probes = app_probes::AppProbes::parse(&config.app_probes)
        .map_err(|e| cfg(format!("--app-probes (MESHFLOW_APP_PROBES): {e}")))?;

    let registry = Registry::new();
    let metrics = metrics::ProxyMetrics::new(&registry).map_err(|e| other(e.to_string()))?;
    metrics
        .info
        .with_label_values(&[
            bootstrap.workload.rsplit('/').next().unwrap_or_default(),
            spiffe_id.namespace(),
        ])
        .set(1);
    let bundle = identity::TrustBundle::from_pem(&bootstrap.trust_bundle_pem)
        .map_err(|e| cfg(format!("{origin}: trustBundlePem: {e}")))?;
    let identity_state =
        identity::IdentityState::new(bundle, spiffe_id.trust_domain(), metrics.clone())
            .map_err(|e| other(e.to_string()))?;
    let tracing = meshflow_telemetry::Tracing::new(
        &meshflow_telemetry::TraceSettings {
            otlp_endpoint: config.otlp_endpoint.clone(),
            sampling_ratio: config.trace_sampling,
            accept_b3: config.trace_b3,
            service_name: bootstrap
                .workload
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string(),
            namespace: spiffe_id.namespace().to_string(),
            instance: Some(spiffe_id.uri()),
        },
        &registry,
    )
    .map_err(|e| cfg(e.to_string()))?;
    let shared_tracing = tracing.clone();
    let shared = Shared {
        tracing,
        metered_services: Arc::default(),
        inbound_series: Arc::default(),
        identity: identity_state.clone(),
        config: Arc::new(config::ConfigState::default()),
        metrics: metrics.clone(),
        registry,
        workload: bootstrap.workload.clone(),
        namespace: spiffe_id.namespace().to_string(),
        app_port: config.app_port,
        app_protocol: config.app_protocol,
        app_auth_secret: bootstrap.app_auth_secret.as_deref().map(Arc::from),
        max_header_bytes: config.max_header_bytes,
        settings: Arc::new(serde_json::to_value(&config).unwrap_or_default()),
        access_log: match &config.access_log {
            Some(target) => Some(Arc::new(
                access_log::AccessLog::open(target)
                    .map_err(|e| other(format!("--access-log {target}: {e}")))?,
            )),
            None => None,
        },
    };

    let inbound_port =
        reserve(config.inbound).map_err(|e| other(format!("bind {}: {e}", config.inbound)))?;
    let outbound_port =
        reserve(config.outbound).map_err(|e| other(format!("bind {}: {e}", config.outbound)))?;
    let admin = std::net::TcpListener::bind(config.admin)
        .map_err(|e| other(format!("bind {}: {e}", config.admin)))?;
    admin
        .set_nonblocking(true)
        .map_err(|e| other(e.to_string()))?;
    let admin_addr = admin.local_addr().map_err(|e| other(e.to_string()))?;

    // Never more workers than CPUs this process may use (the cgroup quota counts): extra
    // threads only add wake-ups (Linkerd caps its proxy's cores the same way).
    let usable_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = config.threads.clamp(1, usable_cpus);
    if threads != config.threads {
        tracing::warn!(
            requested = config.threads,
            threads,
            "worker threads per listener capped at the usable CPUs"
        );
    }
    let conf = ServerConf {
        threads,
        // One single-threaded runtime per worker thread (Pingora's no-steal runtime): a
        // connection stays on the thread that accepted it, so a request never pays the
        // work-stealing scheduler's cross-thread synchronization (measured in bench/mesh-compare;
        // see docs/ARCHITECTURE.md "Sidecar performance").
        work_stealing: false,
        // Pingora's default grace period is 300 s; ours is the configured drain (whole
        // seconds, rounded up).
        grace_period_seconds: Some(config.drain.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut h2 = pingora_core::protocols::http::v2::server::default_h2_options();
    h2.max_concurrent_streams(config.h2_max_concurrent_streams);
    h2.max_header_list_size(config.max_header_bytes as u32);

    // The inbound port is bound plaintext; `InboundAccept` peeks at the first byte and runs
    // the TLS handshake itself, so one port serves STRICT and PERMISSIVE (PeerAuthentication).
    // The sidecar's own ports are never a caller's target port: forwarding a peer to the
    // outbound port would let it call out with this workload's identity.
    let own_ports = vec![
        inbound_port.addr.port(),
        outbound_port.addr.port(),
        admin_addr.port(),
    ];
    let mut inbound_proxy = pingora_proxy::http_proxy(
        &server.configuration,
        inbound::InboundProxy::new(shared.clone()).with_own_ports(own_ports.clone()),
    );
    inbound_proxy.h2_options = Some(h2.clone());
    // No h2c on plaintext inbound: Pingora's h2c detection waits, without a timeout, for 24
    // bytes (the HTTP/2 preface) on every new and reused connection, so a short HTTP/1.0
    // request or an idle client would hang a task. Sidecar-to-sidecar HTTP/2 uses TLS + ALPN.
    let mut tls = TlsSettings::with_callbacks(Box::new(identity::HandshakeCallbacks::new(
        identity_state.clone(),
    )))
    .map_err(|e| other(e.to_string()))?;
    let resolver = Arc::new(identity::SvidResolver::new(identity_state.clone()));
    let verifier = Arc::new(identity::MeshClientVerifier::new(identity_state.clone()));
    tls.set_cert_resolver(resolver.clone());
    tls.set_client_cert_verifier(verifier.clone());
    tls.enable_h2();
    let mut acceptor = tls.build();
    // Same config plus the opaque-TCP ALPN (see `inbound_accept::tls_acceptor`).
    acceptor.acceptor = inbound_accept::tls_acceptor(resolver, verifier);
    let transparent_settings = transparent::TransparentSettings {
        policy: config.outbound_traffic_policy,
        detect_timeout: config.protocol_detect_timeout,
        opaque_ports: config.opaque_ports.clone(),
        own_ports,
    };
    let mut inbound = pingora_core::services::listening::Service::new(
        "meshflow inbound".to_string(),
        inbound_accept::InboundAccept::new(
            inbound_proxy,
            acceptor,
            shared.clone(),
            transparent_settings.clone(),
        ),
    );
    inbound.add_listener(
        ListenerConfig::tcp(inbound_port.addr.to_string())
            .tcp_socket_options(reuseport())
            .l4_buffer(L4BufferSettings::default().write(INBOUND_WRITE_BUFFER)),
    );

    // The outbound port: explicit requests as always, and connections the capture rules
    // redirected (`transparent`), through the same `OutboundProxy`.
    let outbound_state = Arc::new(outbound::OutboundState::default());
    let mut h2c_proxy = pingora_proxy::http_proxy(
        &server.configuration,
        outbound::OutboundProxy::new(shared.clone(), outbound_state.clone()),
    );
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    h2c_proxy.server_options = Some(options);
    h2c_proxy.h2_options = Some(h2.clone());
    let mut http1_proxy = pingora_proxy::http_proxy(
        &server.configuration,
        outbound::OutboundProxy::new(shared.clone(), outbound_state.clone()),
    );
    http1_proxy.h2_options = Some(h2);
    let mut outbound = pingora_core::services::listening::Service::new(
        "meshflow outbound".to_string(),
        transparent::OutboundAccept::new(
            h2c_proxy,
            http1_proxy,
            shared.clone(),
            transparent_settings,
        ),
    );
    outbound.add_listener(
        ListenerConfig::tcp(outbound_port.addr.to_string())
            .tcp_socket_options(reuseport())
            .l4_buffer(L4BufferSettings::default().read(OUTBOUND_READ_BUFFER)),
    );

    let admin_shutdown = Arc::new(Notify::new());
    let advertised = config.advertise.unwrap_or(inbound_port.addr);
    let client = cp_client::ControlPlaneClient::new(
        bootstrap,
        shared.clone(),
        outbound_state,
        advertised.to_string(),
    );
    let background = background_service(
        "control plane client",
        Background {
            client,
            shared,
            admin: std::sync::Mutex::new(Some(admin)),
            admin_shutdown: admin_shutdown.clone(),
            app_probes: Arc::new(app_probes),
            ready_file: config.ready_file.clone(),
            addresses: vec![
                ("inbound", inbound_port.addr),
                ("outbound", outbound_port.addr),
                ("admin", admin_addr),
            ],
        },
    );
    server.add_service(inbound);
    server.add_service(outbound);
    server.add_service(background);
    tracing::info!(inbound = %inbound_port.addr, outbound = %outbound_port.addr, admin = %admin_addr, "sidecar starting");
    let tracing = shared_tracing;
    server.run(RunArgs {
        shutdown_signal: Box::new(SignalWatch { admin_shutdown }),
    });
    // Spans still queued go out before exit (bounded: a dead collector cannot hold us).
    tracing.flush(Duration::from_secs(2));
    drop((inbound_port, outbound_port));
    Ok(())
}
