//! Issue 14, acceptance 3: traffic capture and transparent proxying, with network namespaces as
//! pods. Root only (network namespaces, iptables); CI runs as root.
//!
//! Each test builds its own little node: a "node" namespace holding a bridge (10.250.N.1/24, N
//! drawn per test) and one namespace per pod, joined to the bridge by a veth pair; addresses
//! exist only inside namespaces the test creates and deletes. The control plane runs in the
//! root namespace in Kubernetes mode against the dev cluster (`scripts/dev-cluster`), where
//! pods A and B and a Service for B exist with those IPs (no kubelet: the harness writes their
//! status); the sidecars reach it through a forwarder the test listens with inside the node
//! namespace. In pods A and B, `meshflow-proxy init` installs the capture rules and a real
//! `meshflow-proxy` runs as UID 2102 (`setpriv`); B's apps are a `meshflow-echo` (HTTP, the
//! app port) and a line-echo server; C is outside the mesh (no sidecar, no rules): a plain
//! HTTP server and a plaintext client. A's "app" is this test: sockets made inside A's
//! namespace (by a thread that entered it), so its connections are captured like any app's.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams};
use meshflow_api::{Bootstrap, ReadyFile};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cluster::{self, cluster, wait_for, TestNamespace};
use crate::common::{install_crypto, metric};

/// The UID the sidecars run as (the injector's default, Linkerd's too).
pub const PROXY_UID: u32 = 2102;
/// The sidecar's ports, as injection sets them.
pub const INBOUND: u16 = 15006;
pub const OUTBOUND: u16 = 15001;
pub const ADMIN: u16 = 15020;
/// B's HTTP app port, a second HTTP port and its line-echo port (opaque by annotation); C's
/// plain server.
pub const APP: u16 = 8080;
pub const EXTRA: u16 = 8081;
pub const LINE_ECHO: u16 = 7000;
/// A port of B bound to its pod IP only: its TCP probe passes only when the proxy probes the
/// pod IP (as the kubelet does), not 127.0.0.1.
pub const POD_IP_ONLY: u16 = 7001;
pub const OUTSIDE: u16 = 9000;

/// Whether the test can run: network namespaces and iptables need root. Prints why not.
pub fn can_run(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    eprintln!(
        "SKIPPED {test}: needs root (network namespaces, iptables); CI runs the tests as root"
    );
    false
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/install-deps test): {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace of the test's own (`ip netns add`), deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("mf{tag}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec <ns> PROGRAM`, optionally as `uid` (via `setpriv`).
    pub fn command(&self, program: &Path, uid: Option<u32>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]);
        if let Some(uid) = uid {
            command
                .arg("setpriv")
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg("--");
        }
        command.arg(program);
        command
    }

    /// Runs `f` on a thread that entered this namespace: sockets it creates live here.
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(self.path()).expect("open the namespace");
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
    }

    /// `n` unconnected TCP sockets of this namespace (made in one go, so that timing their
    /// connections measures no thread hop).
    pub fn sockets(&self, n: usize) -> Vec<tokio::net::TcpSocket> {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
        self.enter(move || {
            (0..n)
                .map(|_| {
                    let fd = socket(
                        AddressFamily::Inet,
                        SockType::Stream,
                        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                        None,
                    )
                    .expect("socket");
                    std::net::TcpStream::from(fd)
                })
                .collect::<Vec<_>>()
        })
        .into_iter()
        .map(|s| {
            let socket = tokio::net::TcpSocket::from_std_stream(s);
            socket.set_nodelay(true).expect("TCP_NODELAY");
            socket
        })
        .collect()
    }

    /// A TCP connection from inside this namespace (as root: an app, not the proxy).
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = self.sockets(1).pop().expect("a socket");
        tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
            .await
            .map_err(|_| std::io::Error::other(format!("connecting to {addr} timed out")))?
    }

    /// A listener inside this namespace.
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        let listener = self.enter(move || {
            let listener = std::net::TcpListener::bind(addr).expect("bind in namespace");
            listener.set_nonblocking(true).unwrap();
            listener
        });
        TcpListener::from_std(listener).expect("tokio listener")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The node: a namespace with a bridge, 10.250.N.1/24.
pub struct Lan {
    pub node: Netns,
    pub subnet: u8,
}

/// A pod's namespace on the [`Lan`].
pub struct PodNet {
    pub ns: Netns,
    pub ip: Ipv4Addr,
}

impl Lan {
    pub fn new() -> Lan {
        let node = Netns::new("node");
        let subnet = 1 + (rand::random::<u8>() % 254);
        node.ip(&["link", "add", "br0", "type", "bridge"]);
        node.ip(&[
            "addr",
            "add",
            &format!("10.250.{subnet}.1/24"),
            "dev",
            "br0",
        ]);
        node.ip(&["link", "set", "br0", "up"]);
        Lan { node, subnet }
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.subnet, 1)
    }

    /// A pod namespace with address 10.250.N.`host`, its veth's other end `v<tag>` on the
    /// bridge.
    pub fn pod(&self, tag: &str, host: u8) -> PodNet {
        let ns = Netns::new(tag);
        let ip = Ipv4Addr::new(10, 250, self.subnet, host);
        let veth = format!("v{tag}");
        self.node.ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        self.node.ip(&["link", "set", &veth, "master", "br0", "up"]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        PodNet { ns, ip }
    }
}

/// A process the test started (killed when dropped), with its log files.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut command: Command, dir: &Path, name: &str) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let child = command
            .env("MESHFLOW_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join(format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        Proc { child, log }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (30 s) for `ready` to appear; panics with the log when the process exits first.
    pub fn wait_ready(&mut self, ready: &Path) -> ReadyFile {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(file) = ReadyFile::read(ready) {
                return file;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{} exited ({status}):\n{}", self.log.display(), self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready in 30 s:\n{}",
                self.log.display(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn program(name: &str) -> PathBuf {
    meshflow_cli::supervisor::find_program(name)
}

/// Forwards connections accepted on `listener` (inside the node namespace) to `to` (in the
/// root namespace): how sidecars in pod namespaces reach the control plane on 127.0.0.1.
async fn forward(listener: TcpListener, to: SocketAddr) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// A response read to the end of the connection (`connection: close`).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        let start = self.body.find('{').unwrap_or(0);
        let end = self.body.rfind('}').map_or(self.body.len(), |e| e + 1);
        serde_json::from_str(&self.body[start..end])
            .unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The XFCC values the echo app saw.
    pub fn xfcc(&self) -> Vec<String> {
        self.json()["xfcc"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Sends `GET path` with `host` on `stream` and reads the whole response (status 0: the
/// connection closed without one).
pub async fn get(mut stream: TcpStream, host: &str, path: &str) -> Response {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    read_response(stream).await
}

async fn read_response(mut stream: TcpStream) -> Response {
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes)).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Response {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// The line-echo server (an opaque protocol): every line comes back with `echo: `.
async fn line_echo(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if write
                    .write_all(format!("echo: {line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }
}

/// Sends `line` and reads one line back.
pub async fn echo_line(stream: TcpStream, line: &str) -> std::io::Result<String> {
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{line}\n").as_bytes()).await?;
    let mut lines = tokio::io::BufReader::new(read).lines();
    match tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
        Ok(Ok(Some(line))) => Ok(line),
        Ok(Ok(None)) => Err(std::io::ErrorKind::UnexpectedEof.into()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Installs the committed CRDs (idempotent; the cluster is shared) and waits until served.
fn apply_crds() {
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/meshflow/crds");
    cluster().kubectl_ok(&["apply", "-f", crds.to_str().unwrap()]);
    cluster().kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "-f",
        crds.to_str().unwrap(),
    ]);
}

/// How a mesh is started.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--protocol-detect-timeout` of A's sidecar.
    pub detect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            detect_timeout: Duration::from_millis(300),
        }
    }
}

/// Pods A (client), B (backend) and C (outside the mesh) with everything running.
pub struct Mesh {
    // Processes first: they are dropped (killed) before their namespaces.
    pub sidecar_a: Proc,
    pub sidecar_b: Proc,
    pub apps: Vec<Proc>,
    pub control_plane: Proc,
    pub a: PodNet,
    pub b: PodNet,
    pub c: PodNet,
    pub lan: Lan,
    pub ns: TestNamespace,
    pub dir: tempfile::TempDir,
    /// The backend Service's cluster IP.
    pub cluster_ip: Ipv4Addr,
    /// The control plane as the sidecars reach it (the forwarder in the node namespace).
    cp_address: SocketAddr,
    trust_bundle: String,
    options: Options,
}

impl Mesh {
    pub async fn start(options: Options) -> Mesh {
        install_crypto();
        apply_crds();
        let ns = TestNamespace::new("capture").await;
        let dir = tempfile::tempdir().unwrap();
        // The sidecars (UID 2102) read their bootstrap and write their ready file in here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let lan = Lan::new();
        let a = lan.pod("a", 10);
        let b = lan.pod("b", 20);
        let c = lan.pod("c", 30);

        // The control plane (root namespace), reachable from the pods at 10.250.N.1.
        let state = dir.path().join("control-plane");
        std::fs::create_dir_all(&state).unwrap();
        let ready = dir.path().join("control-plane.ready.json");
        let mut command = Command::new(program("meshflow-control-plane"));
        command
            .args(["--kubernetes", "--namespace", &ns.name])
            .args(["--discovery-selector", &ns.selector])
            .args(["--pod-name", "cp", "--lease-duration", "6s"])
            .arg("--state-dir")
            .arg(&state)
            .arg("--ready-file")
            .arg(&ready)
            .env("KUBECONFIG", &cluster().kubeconfig);
        let mut control_plane = Proc::spawn(command, dir.path(), "control-plane");
        let cp_grpc: SocketAddr = control_plane
            .wait_ready(&ready)
            .address("grpc")
            .unwrap()
            .to_string()
            .parse()
            .unwrap();
        let listener = lan.node.listen(SocketAddr::new(lan.gateway().into(), 0));
        let cp_address = listener.local_addr().unwrap();
        tokio::spawn(forward(listener, cp_grpc));
        let secrets: Api<Secret> = Api::namespaced(cluster().client().await, &ns.name);
        let ca = wait_for("the CA Secret", Duration::from_secs(30), || async {
            secrets.get_opt("meshflow-ca").await.ok().flatten()
        })
        .await;
        let trust_bundle = String::from_utf8(ca.data.unwrap()["ca.crt"].0.clone()).unwrap();

        // The pods, as the API sees them: IPs on the LAN, the sidecar's inbound port and the
        // app port annotated (what injection writes), Ready.
        for (name, sa, labels, pod) in [
            ("client", "client", [("app", "client")], &a),
            ("backend", "backend", [("app", "backend")], &b),
        ] {
            cluster::create_service_account(&ns.name, sa).await;
            cluster::create_pod(
                &ns.name,
                name,
                &labels,
                sa,
                &[("http", APP), ("extra", EXTRA), ("echo", LINE_ECHO)],
            )
            .await;
            Api::<Pod>::namespaced(cluster().client().await, &ns.name)
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "metadata": { "annotations": {
                        "meshflow.io/inbound-port": INBOUND.to_string(),
                        "meshflow.io/app-port": APP.to_string(),
                        "meshflow.io/opaque-ports": LINE_ECHO.to_string(),
                    } } })),
                )
                .await
                .unwrap();
            cluster::set_pod_ready(&ns.name, name, &pod.ip.to_string(), true).await;
        }
        let service = cluster::create_service(
            &ns.name,
            "backend",
            &[("app", "backend")],
            &[
                ("http", 80, APP),
                ("extra", 81, EXTRA),
                ("echo", LINE_ECHO, LINE_ECHO),
            ],
        )
        .await;
        let cluster_ip: Ipv4Addr = service
            .spec
            .and_then(|s| s.cluster_ip)
            .expect("a cluster IP")
            .parse()
            .unwrap();
        // The service range is routed from A towards B (no kube-proxy here: without capture
        // nothing would answer on the cluster IP).
        a.ns.ip(&[
            "route",
            "add",
            &format!("{}/24", Ipv4Addr::from(u32::from(cluster_ip) & 0xffff_ff00)),
            "via",
            &b.ip.to_string(),
        ]);

        // B's apps: the HTTP echo on the app port, the line echo; C's plain server.
        let mut apps = Vec::new();
        for (pod, name, port) in [
            (&b, "backend", APP),
            (&b, "backend-extra", EXTRA),
            (&c, "outside", OUTSIDE),
        ] {
            let ready = dir.path().join(format!("{name}-app.ready.json"));
            let mut command = pod.ns.command(&program("meshflow-echo"), None);
            command
                .args(["--name", name, "--listen", &format!("0.0.0.0:{port}")])
                .arg("--ready-file")
                .arg(&ready);
            let mut app = Proc::spawn(command, dir.path(), &format!("{name}-app"));
            app.wait_ready(&ready);
            apps.push(app);
        }
        tokio::spawn(line_echo(
            b.ns.listen(SocketAddr::new([0, 0, 0, 0].into(), LINE_ECHO)),
        ));
        tokio::spawn(line_echo(
            b.ns.listen(SocketAddr::new(b.ip.into(), POD_IP_ONLY)),
        ));

        // Capture in A and B, then their sidecars.
        for pod in [&a, &b] {
            init(&pod.ns, &[]);
        }
        let token_a = cluster::token_request(&ns.name, "client", "meshflow", 3600).await;
        let token_b = cluster::token_request(&ns.name, "backend", "meshflow", 3600).await;
        let spec = SidecarSpec {
            dir: dir.path(),
            namespace: &ns.name,
            cp_address,
            trust_bundle: &trust_bundle,
        };
        // B's original probes, as injection hands them over (meshflow.io/app-probes): a TCP
        // probe without a host, of a port bound to the pod IP only.
        let probes = json!({
            "/app-health/app/readyz": { "tcpSocket": { "port": POD_IP_ONLY }, "timeoutSeconds": 1 }
        })
        .to_string();
        let sidecar_b = spec.start(
            &b,
            "backend",
            "backend",
            &token_b,
            &["--app-probes", &probes],
        );
        let detect = format!("{}ms", options.detect_timeout.as_millis());
        let sidecar_a = spec.start(
            &a,
            "client",
            "client",
            &token_a,
            &["--protocol-detect-timeout", &detect],
        );
        let mesh = Mesh {
            sidecar_a,
            sidecar_b,
            apps,
            control_plane,
            a,
            b,
            c,
            lan,
            ns,
            dir,
            cluster_ip,
            cp_address,
            trust_bundle,
            options,
        };
        mesh.wait_for_backend().await;
        mesh
    }

    /// Waits until A's sidecar has the backend Service with its cluster IP, ports and B's
    /// endpoint.
    pub async fn wait_for_backend(&self) {
        let expected = format!("{}:{INBOUND}", self.b.ip);
        wait_for(
            "A's sidecar to know the backend service",
            Duration::from_secs(30),
            || async {
                let dump: Value =
                    serde_json::from_str(&self.admin(&self.a, "/config_dump").await.body).ok()?;
                let service = dump["services"]
                    .as_array()?
                    .iter()
                    .find(|s| s["name"] == "backend")?
                    .clone();
                (service["clusterIPs"][0] == self.cluster_ip.to_string()
                    && service["endpoints"][0]["address"] == expected.as_str()
                    && service["ports"].as_array()?.len() == 3)
                    .then_some(())
            },
        )
        .await;
    }

    /// `GET path` on the pod's sidecar admin port (from inside the pod, over loopback).
    pub async fn admin(&self, pod: &PodNet, path: &str) -> Response {
        match pod
            .ns
            .connect(SocketAddr::new([127, 0, 0, 1].into(), ADMIN))
            .await
        {
            Ok(stream) => get(stream, "localhost", path).await,
            Err(e) => Response {
                status: 0,
                head: e.to_string(),
                body: String::new(),
            },
        }
    }

    pub async fn metrics(&self, pod: &PodNet) -> String {
        self.admin(pod, "/metrics").await.body
    }

    /// A's sidecar again, with more flags (e.g. `--outbound-traffic-policy REGISTRY_ONLY`).
    pub async fn restart_sidecar_a(&mut self, extra: &[&str]) {
        self.sidecar_a.child.kill().unwrap();
        self.sidecar_a.child.wait().unwrap();
        let token = cluster::token_request(&self.ns.name, "client", "meshflow", 3601).await;
        let detect = format!("{}ms", self.options.detect_timeout.as_millis());
        let mut flags = vec!["--protocol-detect-timeout", &detect];
        flags.extend_from_slice(extra);
        self.sidecar_a = SidecarSpec {
            dir: self.dir.path(),
            namespace: &self.ns.name,
            cp_address: self.cp_address,
            trust_bundle: &self.trust_bundle,
        }
        .start(&self.a, "client-2", "client", &token, &flags);
        self.wait_for_backend().await;
    }

    /// Makes C a pod of the cluster without a sidecar (Ready, its IP) behind a Service
    /// `plain` (port [`OUTSIDE`] to C's plain server), and waits until A's sidecar knows the
    /// Service. Like B's cluster IP, the Service's is routed only inside the test's
    /// namespaces (no kube-proxy): from A towards C, where it is an address of C's loopback.
    /// Returns the cluster IP and port.
    pub async fn unmeshed_service(&self) -> SocketAddr {
        cluster::create_unmeshed_pod(
            &self.ns.name,
            "plain",
            &[("app", "plain")],
            "default",
            &[("http", OUTSIDE)],
        )
        .await;
        cluster::set_pod_ready(&self.ns.name, "plain", &self.c.ip.to_string(), true).await;
        let service = cluster::create_service(
            &self.ns.name,
            "plain",
            &[("app", "plain")],
            &[("http", OUTSIDE, OUTSIDE)],
        )
        .await;
        let ip: Ipv4Addr = service
            .spec
            .and_then(|s| s.cluster_ip)
            .expect("a cluster IP")
            .parse()
            .unwrap();
        self.c
            .ns
            .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        self.a.ns.ip(&[
            "route",
            "add",
            &format!("{ip}/32"),
            "via",
            &self.c.ip.to_string(),
        ]);
        wait_for(
            "A's sidecar to know the plain service",
            Duration::from_secs(30),
            || async {
                let dump: Value =
                    serde_json::from_str(&self.admin(&self.a, "/config_dump").await.body).ok()?;
                let service = dump["services"]
                    .as_array()?
                    .iter()
                    .find(|s| s["name"] == "plain")?
                    .clone();
                (service["clusterIPs"][0] == ip.to_string()
                    && service["ports"].as_array()?.len() == 1
                    && service["endpoints"].as_array()?.is_empty())
                .then_some(())
            },
        )
        .await;
        SocketAddr::new(ip.into(), OUTSIDE)
    }

    /// The SPIFFE ID of a service account of the test's namespace.
    pub fn spiffe_id(&self, sa: &str) -> String {
        format!("spiffe://cluster.local/ns/{}/sa/{sa}", self.ns.name)
    }
}

/// Runs `meshflow-proxy init` in `ns` with the injector's flags plus `extra`.
pub fn init(ns: &Netns, extra: &[&str]) -> String {
    let output = ns
        .command(&program("meshflow-proxy"), None)
        .args(["init", "--proxy-uid", &PROXY_UID.to_string()])
        .args(["--inbound-port", &INBOUND.to_string()])
        .args(["--outbound-port", &OUTBOUND.to_string()])
        .args(["--admin-port", &ADMIN.to_string()])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "meshflow-proxy init failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

struct SidecarSpec<'a> {
    dir: &'a Path,
    namespace: &'a str,
    cp_address: SocketAddr,
    trust_bundle: &'a str,
}

impl SidecarSpec<'_> {
    /// A real sidecar for pod `pod` (service account `sa`) in `net`, as UID 2102, with the
    /// injector's ports; waits until it is ready.
    fn start(&self, net: &PodNet, name: &str, sa: &str, token: &str, extra: &[&str]) -> Proc {
        let pod = name.split('-').next().unwrap();
        let own = self.dir.join(name);
        std::fs::create_dir_all(&own).unwrap();
        std::os::unix::fs::chown(&own, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        let bootstrap = Bootstrap {
            control_plane: self.cp_address.to_string(),
            control_plane_server_name: meshflow_policies::SpiffeId::new(
                "cluster.local",
                "meshflow-system",
                "meshflow-control-plane",
            )
            .unwrap()
            .dns_name(),
            trust_bundle_pem: self.trust_bundle.to_string(),
            workload: format!("{}/{pod}", self.namespace),
            spiffe_id: format!("spiffe://cluster.local/ns/{}/sa/{sa}", self.namespace),
            token: token.into(),
            token_file: None,
            app_auth_secret: None,
        };
        let path = own.join("bootstrap.json");
        std::fs::write(&path, serde_json::to_vec(&bootstrap).unwrap()).unwrap();
        std::os::unix::fs::chown(&path, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        let ready = own.join("ready.json");
        let mut command = net.ns.command(&program("meshflow-proxy"), Some(PROXY_UID));
        command
            .arg("--bootstrap")
            .arg(&path)
            .args(["--app-port", &APP.to_string()])
            .args(["--inbound", &format!("0.0.0.0:{INBOUND}")])
            .args(["--outbound", &format!("127.0.0.1:{OUTBOUND}")])
            .args(["--admin", &format!("0.0.0.0:{ADMIN}")])
            .args(["--advertise", &format!("{}:{INBOUND}", net.ip)])
            .args(["--drain", "1s"])
            // As injection sets it from the downward API.
            .env("POD_IP", net.ip.to_string())
            .arg("--ready-file")
            .arg(&ready)
            .args(extra);
        let mut proc = Proc::spawn(command, self.dir, &format!("{name}-sidecar"));
        proc.wait_ready(&ready);
        proc
    }
}

/// The value of `meshflow_tcp_connections_total{direction, route}` in `metrics`.
pub fn tcp(metrics: &str, direction: &str, route: &str) -> f64 {
    metric(
        metrics,
        "meshflow_tcp_connections_total",
        &[("direction", direction), ("route", route)],
    )
}

/// Every `meshflow_tcp_connections_total` sample of `direction`, summed.
fn tcp_all(metrics: &str, direction: &str) -> f64 {
    metric(
        metrics,
        "meshflow_tcp_connections_total",
        &[("direction", direction)],
    )
}

/// `tcpdump` on one interface of a namespace, writing a pcap file.
struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &Netns, interface: &str, dir: &Path) -> Capture {
        let file = dir.join(format!("{interface}.pcap"));
        let tcpdump = which("tcpdump");
        let mut command = ns.command(&tcpdump, None);
        command
            .args([
                "-i",
                interface,
                "--immediate-mode",
                "-U",
                "-s",
                "0",
                "-n",
                "-w",
            ])
            .arg(&file)
            .arg("tcp");
        let proc = Proc::spawn(command, dir, &format!("tcpdump-{interface}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !proc.logs().contains("listening on") {
            assert!(
                Instant::now() < deadline,
                "tcpdump did not start: {}",
                proc.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Capture { proc, file }
    }

    /// Stops the capture and returns the raw pcap bytes.
    fn stop(mut self) -> Vec<u8> {
        // Packets reach the file a moment after they crossed the interface: wait until it
        // stops growing.
        let size = |file: &Path| std::fs::metadata(file).map_or(0, |m| m.len());
        let mut last = size(&self.file);
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(100));
            let now = size(&self.file);
            if now == last && now > 24 {
                break;
            }
            last = now;
        }
        // SIGINT: tcpdump flushes and exits.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.proc.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.proc.child.wait();
        std::fs::read(&self.file).unwrap_or_default()
    }
}

fn which(program: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let path = Path::new(dir).join(program);
        if path.is_file() {
            return path;
        }
    }
    panic!("{program} is not installed (scripts/install-deps test)")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `meshflow-proxy init` twice gives the same rules, exactly the ones `--dry-run` prints, with
/// one jump each from PREROUTING and OUTPUT; other flags replace them without leftovers;
/// `--dry-run` changes nothing.
#[tokio::test]
async fn init_is_idempotent_and_dry_run_changes_nothing() {
    if !can_run("capture::init_is_idempotent_and_dry_run_changes_nothing") {
        return;
    }
    let ns = Netns::new("init");
    let nat = |ns: &Netns| -> Vec<String> {
        let save = ns
            .command(&which("iptables-save"), None)
            .args(["-t", "nat"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&save.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(str::to_string)
            .collect()
    };
    let flags = ["--exclude-outbound-cidrs", "169.254.169.254/32"];
    let printed = init(&ns, &[&["--dry-run"][..], &flags[..]].concat());
    assert!(nat(&ns).is_empty(), "--dry-run installed rules");
    init(&ns, &flags);
    let first = nat(&ns);
    init(&ns, &flags);
    let second = nat(&ns);
    assert_eq!(first, second, "a second run changed the rules");
    let mut expected: Vec<String> = printed
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect();
    let mut got = second.clone();
    expected.sort();
    got.sort();
    assert_eq!(
        got, expected,
        "the rules in place are the ones --dry-run prints"
    );
    for jump in [
        "-A PREROUTING -p tcp -j MESHFLOW_INBOUND",
        "-A OUTPUT -p tcp -j MESHFLOW_OUTPUT",
    ] {
        assert_eq!(second.iter().filter(|l| *l == jump).count(), 1, "{jump}");
    }
    assert!(second.contains(&"-A MESHFLOW_OUTPUT -m owner --uid-owner 2102 -j RETURN".into()));
    // Other exclusions replace the old ones.
    init(&ns, &["--exclude-outbound-ports", "5432"]);
    let third = nat(&ns);
    assert!(
        !third.iter().any(|l| l.contains("169.254.169.254")),
        "{third:?}"
    );
    assert!(
        third.iter().any(|l| l.contains("--dports 5432")),
        "{third:?}"
    );
    assert_eq!(third.len(), second.len(), "{third:?}");
}

/// Acceptance 3 (see the module docs), in one world: capture of HTTP/1.1, HTTP/2 and opaque
/// TCP to a mesh service, no loops, detection bounded by its timeout, STRICT/PERMISSIVE for a
/// plaintext client, ALLOW_ANY/REGISTRY_ONLY for a destination outside the mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_namespaces_as_pods() {
    if !can_run("capture::network_namespaces_as_pods") {
        return;
    }
    let mut mesh = Mesh::start(Options::default()).await;
    let cip = mesh.cluster_ip;
    let http = SocketAddr::new(cip.into(), 80);
    let client_id = mesh.spiffe_id("client");
    let before_a = mesh.metrics(&mesh.a).await;
    let before_b = mesh.metrics(&mesh.b).await;
    // The sidecars' own connections (to the control plane, A's to B) were never captured.
    assert_eq!(tcp_all(&before_a, "outbound"), 0.0, "{before_a}");
    assert_eq!(tcp_all(&before_b, "outbound"), 0.0, "{before_b}");

    // 1. HTTP/1.1 to the cluster IP, no proxy settings: captured, mTLS, one XFCC with A's ID.
    let response = get(
        mesh.a.ns.connect(http).await.unwrap(),
        &cip.to_string(),
        "/hello",
    )
    .await;
    assert_eq!(
        response.status,
        200,
        "{response:?}\n{}",
        mesh.sidecar_a.logs()
    );
    assert_eq!(response.json()["service"], "backend", "{response:?}");
    let xfcc = response.xfcc();
    assert_eq!(xfcc.len(), 1, "exactly one XFCC: {xfcc:?}");
    assert!(xfcc[0].contains(&format!("URI={client_id}")), "{xfcc:?}");
    // One hop each: A's sidecar saw one captured connection, B's sidecar none of its own
    // (its connection to the app is not captured), B's app one request.
    let a_metrics = mesh.metrics(&mesh.a).await;
    let b_metrics = mesh.metrics(&mesh.b).await;
    assert_eq!(tcp(&a_metrics, "outbound", "http1"), 1.0, "{a_metrics}");
    assert_eq!(tcp_all(&a_metrics, "outbound"), 1.0, "{a_metrics}");
    assert_eq!(tcp_all(&b_metrics, "outbound"), 0.0, "{b_metrics}");
    assert_eq!(
        metric(
            &b_metrics,
            "meshflow_requests_total",
            &[
                ("direction", "inbound"),
                ("principal", &client_id["spiffe://".len()..])
            ]
        ),
        1.0,
        "{b_metrics}"
    );
    assert_eq!(
        metric(
            &a_metrics,
            "meshflow_requests_total",
            &[
                ("direction", "outbound"),
                ("service", &format!("backend.{}", mesh.ns.name))
            ]
        ),
        1.0,
        "{a_metrics}"
    );

    // 1b. B's rewritten probe, asked on its admin port as the kubelet would: performed
    // against the pod IP (the port is bound there only), answered 200.
    let probe = mesh.admin(&mesh.b, "/app-health/app/readyz").await;
    assert_eq!(probe.status, 200, "{probe:?}");

    // 2. HTTP/2 with prior knowledge to the cluster IP.
    let stream = mesh.a.ns.connect(http).await.unwrap();
    let (mut client, connection) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::builder()
        .uri(format!("http://{cip}/h2"))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    let echoed: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(echoed["xfcc"].as_array().unwrap().len(), 1, "{echoed}");
    drop(client);

    // 3. B's pod IP and app port: captured, to exactly that endpoint.
    let response = get(
        mesh.a
            .ns
            .connect(SocketAddr::new(mesh.b.ip.into(), APP))
            .await
            .unwrap(),
        &mesh.b.ip.to_string(),
        "/pod-ip",
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.xfcc().len(), 1, "{response:?}");

    // 3b. Another HTTP port of B (not its app port): the full mesh treatment, on that port.
    let response = get(
        mesh.a
            .ns
            .connect(SocketAddr::new(cip.into(), 81))
            .await
            .unwrap(),
        &cip.to_string(),
        "/extra",
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json()["service"], "backend-extra", "{response:?}");
    assert_eq!(response.xfcc().len(), 1, "{response:?}");
    assert!(
        !response.json()["headers"]
            .to_string()
            .contains("x-meshflow-target-port"),
        "the mesh's header reached the app: {response:?}"
    );

    // 4. Opaque TCP (a line-echo protocol on an opaque port) works and is mTLS on the wire:
    // B's inbound completed one more handshake, and the veth to B carries no plaintext.
    let handshakes = |m: &str| {
        metric(
            m,
            "meshflow_tls_handshakes_total",
            &[("direction", "inbound")],
        )
    };
    let b_before = mesh.metrics(&mesh.b).await;
    let capture = Capture::start(&mesh.lan.node, "vb", mesh.dir.path());
    let marker = format!("opaque-{:08x}", rand::random::<u32>());
    let reply = echo_line(
        mesh.a
            .ns
            .connect(SocketAddr::new(cip.into(), LINE_ECHO))
            .await
            .unwrap(),
        &marker,
    )
    .await
    .unwrap();
    assert_eq!(reply, format!("echo: {marker}"));
    let pcap = capture.stop();
    let b_after = mesh.metrics(&mesh.b).await;
    assert_eq!(
        handshakes(&b_after) - handshakes(&b_before),
        1.0,
        "{b_after}"
    );
    assert_eq!(tcp(&b_after, "inbound", "opaque"), 1.0, "{b_after}");
    assert!(
        pcap.len() > 24,
        "nothing captured ({} bytes): {}",
        pcap.len(),
        std::fs::read_to_string(mesh.dir.path().join("tcpdump-vb.log")).unwrap_or_default()
    );
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "the opaque payload crossed in plaintext"
    );
    // A TLS handshake record (ContentType 22, TLS 1.x) to B's inbound port.
    assert!(
        contains(&pcap, &[0x16, 0x03, 0x01]),
        "no TLS ClientHello on the wire"
    );
    let a_metrics = mesh.metrics(&mesh.a).await;
    assert_eq!(tcp(&a_metrics, "outbound", "opaque"), 1.0, "{a_metrics}");

    // 5. Not HTTP on the HTTP port: detected as opaque, carried as is (the echo app answers
    // the garbage with 400 itself).
    let mut stream = mesh.a.ns.connect(http).await.unwrap();
    stream.write_all(b"hello\r\n\r\n").await.unwrap();
    let response = read_response(stream).await;
    assert_eq!(response.status, 400, "{response:?}");
    // 6. Nothing sent within the detection timeout (a server-first client): opaque, so the
    // request that follows reaches the app untouched — no XFCC.
    let mut stream = mesh.a.ns.connect(http).await.unwrap();
    tokio::time::sleep(mesh.options.detect_timeout + Duration::from_millis(300)).await;
    stream
        .write_all(
            format!("GET /late HTTP/1.1\r\nHost: {cip}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let response = read_response(stream).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert!(response.xfcc().is_empty(), "{response:?}");
    let a_metrics = mesh.metrics(&mesh.a).await;
    assert_eq!(
        tcp(&a_metrics, "outbound", "opaque_detected"),
        1.0,
        "{a_metrics}"
    );
    assert_eq!(
        tcp(&a_metrics, "outbound", "opaque_timeout"),
        1.0,
        "{a_metrics}"
    );

    // 7. Outside the mesh, ALLOW_ANY (the default): passed through.
    let outside = SocketAddr::new(mesh.c.ip.into(), OUTSIDE);
    let response = get(
        mesh.a.ns.connect(outside).await.unwrap(),
        "outside",
        "/direct",
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json()["service"], "outside");
    assert!(response.xfcc().is_empty());
    let a_metrics = mesh.metrics(&mesh.a).await;
    assert_eq!(
        tcp(&a_metrics, "outbound", "passthrough"),
        1.0,
        "{a_metrics}"
    );

    // 7b. A Service the control plane knows whose pod (C) runs no sidecar: in the registry but
    // not meshed, so A's call to its cluster IP passes through in plaintext to the cluster IP
    // (no mTLS to C's port 15006, where nothing listens), counted as `unmeshed`.
    let plain = mesh.unmeshed_service().await;
    let response = get(
        mesh.a.ns.connect(plain).await.unwrap(),
        &plain.ip().to_string(),
        "/unmeshed",
    )
    .await;
    assert_eq!(
        response.status,
        200,
        "{response:?}\n{}",
        mesh.sidecar_a.logs()
    );
    assert_eq!(response.json()["service"], "outside", "{response:?}");
    assert!(response.xfcc().is_empty(), "{response:?}");
    let a_metrics = mesh.metrics(&mesh.a).await;
    assert_eq!(tcp(&a_metrics, "outbound", "unmeshed"), 1.0, "{a_metrics}");
    assert_eq!(
        tcp(&a_metrics, "outbound", "passthrough"),
        1.0,
        "{a_metrics}"
    );

    // 8. A plaintext client in C calling B's app port: captured by B's rules, refused under
    // STRICT (closed, nothing answered) ...
    let b_app = SocketAddr::new(mesh.b.ip.into(), APP);
    let response = get(mesh.c.ns.connect(b_app).await.unwrap(), "backend", "/plain").await;
    assert_eq!(
        response.status, 0,
        "STRICT answered plaintext: {response:?}"
    );
    let b_metrics = mesh.metrics(&mesh.b).await;
    assert!(
        metric(
            &b_metrics,
            "meshflow_tls_handshake_errors_total",
            &[("direction", "inbound"), ("reason", "plaintext")]
        ) >= 1.0,
        "{b_metrics}"
    );
    // ... and served under PERMISSIVE (no XFCC), also on another port of B.
    let applied = cluster().kubectl_with_input(
        &["apply", "-n", &mesh.ns.name, "-f", "-"],
        &format!(
            "apiVersion: meshflow.io/v1alpha1\nkind: PeerAuthentication\n\
             metadata: {{ name: default, namespace: {} }}\nspec: {{ mtls: {{ mode: PERMISSIVE }} }}\n",
            mesh.ns.name
        ),
    );
    assert!(applied.status.success(), "{applied:?}");
    let c = &mesh.c;
    let response = wait_for(
        "PERMISSIVE in force at B",
        Duration::from_secs(10),
        || async {
            let response = get(c.ns.connect(b_app).await.ok()?, "backend", "/plain").await;
            (response.status == 200).then_some(response)
        },
    )
    .await;
    assert!(response.xfcc().is_empty(), "{response:?}");
    let reply = echo_line(
        c.ns.connect(SocketAddr::new(mesh.b.ip.into(), LINE_ECHO))
            .await
            .unwrap(),
        "plain",
    )
    .await
    .unwrap();
    assert_eq!(reply, "echo: plain");
    let b_metrics = mesh.metrics(&mesh.b).await;
    assert_eq!(
        tcp(&b_metrics, "inbound", "passthrough"),
        1.0,
        "{b_metrics}"
    );

    // 8b. PERMISSIVE does not bypass AuthorizationPolicy: with a policy allowing only A's
    // principal (to the line-echo port and the HTTP ports), C's plaintext connection to the
    // line-echo port is closed (judged as TCP without a principal) and its plaintext request
    // to the app port gets a 403 (judged per request), while A's captured mTLS connections
    // still work.
    let principal = &client_id["spiffe://".len()..];
    let applied = cluster().kubectl_with_input(
        &["apply", "-n", &mesh.ns.name, "-f", "-"],
        &format!(
            "apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{ name: only-client, namespace: {} }}\n\
             spec:\n  selector: {{ matchLabels: {{ app: backend }} }}\n  action: ALLOW\n\
             \x20 rules:\n  - from: [{{ source: {{ principals: [\"{principal}\"] }} }}]\n\
             \x20   to: [{{ operation: {{ ports: [\"{LINE_ECHO}\", \"{APP}\", \"{EXTRA}\"] }} }}]\n",
            mesh.ns.name
        ),
    );
    assert!(applied.status.success(), "{applied:?}");
    let line_echo_b = SocketAddr::new(mesh.b.ip.into(), LINE_ECHO);
    let refused = wait_for(
        "the AuthorizationPolicy in force at B",
        Duration::from_secs(10),
        || async {
            let outcome = echo_line(c.ns.connect(line_echo_b).await.ok()?, "plain again").await;
            outcome.is_err().then_some(outcome)
        },
    )
    .await;
    assert!(refused.is_err(), "{refused:?}");
    let before = mesh.metrics(&mesh.b).await;
    let refused = echo_line(c.ns.connect(line_echo_b).await.unwrap(), "and again").await;
    assert!(refused.is_err(), "{refused:?}");
    let after = mesh.metrics(&mesh.b).await;
    assert_eq!(
        tcp(&after, "inbound", "denied") - tcp(&before, "inbound", "denied"),
        1.0,
        "{after}"
    );
    assert_eq!(
        tcp(&after, "inbound", "passthrough"),
        tcp(&before, "inbound", "passthrough"),
        "a denied connection was passed through: {after}"
    );
    let response = get(c.ns.connect(b_app).await.unwrap(), "backend", "/plain").await;
    assert_eq!(response.status, 403, "{response:?}");
    let marker = format!("allowed-{:08x}", rand::random::<u32>());
    let reply = echo_line(
        mesh.a
            .ns
            .connect(SocketAddr::new(cip.into(), LINE_ECHO))
            .await
            .unwrap(),
        &marker,
    )
    .await
    .unwrap();
    assert_eq!(reply, format!("echo: {marker}"));
    let response = get(
        mesh.a.ns.connect(http).await.unwrap(),
        &cip.to_string(),
        "/a",
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");

    // 9. REGISTRY_ONLY: the destination outside the mesh is refused (HTTP: 502 naming why;
    // other bytes: closed); mesh services still work.
    mesh.restart_sidecar_a(&["--outbound-traffic-policy", "REGISTRY_ONLY"])
        .await;
    let response = get(
        mesh.a.ns.connect(outside).await.unwrap(),
        "outside",
        "/refused",
    )
    .await;
    assert_eq!(response.status, 502, "{response:?}");
    assert!(
        response
            .head
            .contains("meshflow-proxy-error: registry-only"),
        "{response:?}"
    );
    let closed = echo_line(mesh.a.ns.connect(outside).await.unwrap(), "raw").await;
    assert!(closed.is_err(), "{closed:?}");
    let response = get(
        mesh.a.ns.connect(http).await.unwrap(),
        &cip.to_string(),
        "/still",
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.xfcc().len(), 1);
    // The unmeshed Service is in the registry: still passed through.
    let response = get(
        mesh.a.ns.connect(plain).await.unwrap(),
        &plain.ip().to_string(),
        "/unmeshed-registry-only",
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json()["service"], "outside", "{response:?}");
    assert!(response.xfcc().is_empty(), "{response:?}");
    let a_metrics = mesh.metrics(&mesh.a).await;
    assert_eq!(
        tcp(&a_metrics, "outbound", "registry_only"),
        2.0,
        "{a_metrics}"
    );
    assert_eq!(tcp(&a_metrics, "outbound", "unmeshed"), 1.0, "{a_metrics}");
    assert_eq!(
        tcp(&a_metrics, "outbound", "passthrough"),
        0.0,
        "{a_metrics}"
    );
}
