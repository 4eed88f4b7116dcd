//! Shared test harness: start a mesh through the same supervisor `meshflow up` uses, forge
//! certificates with the mesh CA (or another), speak raw HTTP over TLS, read metrics.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshflow_cli::up::{LocalMesh, UpOptions};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A mesh of two echo workloads: `frontend` (http1) and `backend` (grpc = HTTP/1.1, h2c, gRPC).
pub const HELLO: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: test }
spec:
  workloads:
    - name: frontend
      app:
        protocol: http1
        command: ["meshflow-echo", "--name", "frontend", "--listen", "127.0.0.1:{port}"]
    - name: backend
      app:
        protocol: grpc
        command: ["meshflow-echo", "--name", "backend", "--listen", "127.0.0.1:{port}"]
"#;

/// A running test mesh plus its temp dir (kept alive with it).
pub struct TestMesh {
    pub mesh: LocalMesh,
    pub dir: tempfile::TempDir,
}

impl TestMesh {
    pub fn state_dir(&self) -> PathBuf {
        self.mesh.options.state_dir.clone()
    }

    /// Writes (or replaces) `name` in the policy directory of a mesh from [`start_dir`].
    pub fn write_policy_file(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join("policies").join(name), text).unwrap();
    }

    pub fn mesh_path(&self) -> PathBuf {
        self.mesh.mesh_path.clone()
    }
}

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Starts `yaml` as a mesh; `tune` adjusts options first.
pub fn start_mesh(yaml: &str, tune: impl FnOnce(&mut UpOptions)) -> TestMesh {
    install_crypto();
    let dir = tempfile::tempdir().expect("temp dir");
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_path, yaml).expect("write mesh");
    let mut options = UpOptions::new(&dir.path().join("state"));
    options.drain = Duration::from_millis(500);
    tune(&mut options);
    let mesh = LocalMesh::start(&mesh_path, options).unwrap_or_else(|e| {
        panic!(
            "mesh did not start: {e}\n{}",
            process_logs(&dir.path().join("state"))
        )
    });
    TestMesh { mesh, dir }
}

/// Every process log under `<state_dir>/logs`, each after a `--- <path>` line (for a test
/// that failed to start or restart a mesh).
pub fn process_logs(state_dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(state_dir.join("logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        text.push_str(&format!(
            "--- {}\n{}\n",
            entry.path().display(),
            std::fs::read_to_string(entry.path()).unwrap_or_default()
        ));
    }
    text
}

/// Starts `mesh` with `policies` written to `policies/policies.yaml` next to the mesh file (the
/// mesh names `policiesDir: policies`).
pub fn start_dir(
    mesh: &str,
    policies: &str,
    tune: impl FnOnce(&mut meshflow_cli::up::UpOptions),
) -> TestMesh {
    start_with_files(mesh, &[("policies.yaml", policies)], tune)
}

/// Starts `mesh` (whose `policiesDir` is `policies`) with `files` (name, text) written into
/// the policy directory first.
pub fn start_with_files(
    mesh: &str,
    files: &[(&str, &str)],
    tune: impl FnOnce(&mut meshflow_cli::up::UpOptions),
) -> TestMesh {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join("policies").join(name), text).unwrap();
    }
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_path, mesh).unwrap();
    let mut options = meshflow_cli::up::UpOptions::new(&dir.path().join("state"));
    options.drain = Duration::from_millis(500);
    tune(&mut options);
    let mesh = meshflow_cli::up::LocalMesh::start(&mesh_path, options).expect("mesh starts");
    TestMesh { mesh, dir }
}

pub fn start_hello() -> TestMesh {
    start_mesh(HELLO, |_| {})
}

/// The mesh CA and certificates forged with it (or with another CA) for hostile clients.
pub struct Pki {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
}

pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

pub struct LeafSpec {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
}

impl LeafSpec {
    pub fn spiffe(uri: &str) -> Self {
        let now = time::OffsetDateTime::now_utc();
        Self {
            uris: vec![uri.to_string()],
            dns: vec![],
            not_before: now - time::Duration::minutes(1),
            not_after: now + time::Duration::hours(1),
        }
    }
}

impl Pki {
    /// The mesh's own CA, read from the control plane's state directory.
    pub fn mesh(state_dir: &Path) -> Self {
        Self {
            ca_cert_pem: std::fs::read_to_string(state_dir.join("ca/root.pem")).expect("root.pem"),
            ca_key_pem: std::fs::read_to_string(state_dir.join("ca/root-key.pem"))
                .expect("root-key.pem"),
        }
    }

    /// A fresh, unrelated CA.
    pub fn foreign() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        Self {
            ca_cert_pem: cert.pem(),
            ca_key_pem: key.serialize_pem(),
        }
    }

    pub fn issue(&self, spec: LeafSpec) -> Leaf {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem).unwrap();
        let ca = CertificateParams::from_ca_cert_pem(&self.ca_cert_pem)
            .unwrap()
            .self_signed(&ca_key)
            .unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        for uri in spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into().unwrap()));
        }
        for dns in spec.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.as_str().try_into().unwrap()));
        }
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        }
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut self.ca_cert_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    }
}

/// A TLS client config trusting `roots`, presenting `leaf` (or nothing), with `versions`.
pub fn client_config(
    roots: rustls::RootCertStore,
    leaf: Option<Leaf>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots);
    let mut config = match leaf {
        Some(leaf) => builder.with_client_auth_cert(leaf.chain, leaf.key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The DNS name a workload's SVID carries.
pub fn identity_dns(workload: &str) -> String {
    format!("{workload}.default.serviceaccount.identity.cluster.local")
}

/// Outcome of one raw request over TLS.
#[derive(Debug)]
pub enum RawOutcome {
    /// The handshake failed.
    HandshakeFailed(String),
    /// Handshake passed, but the connection failed or closed without a response.
    NoResponse(String),
    /// Bytes of the response.
    Response(String),
}

/// Connects to `addr` with `config`, verifying the server as `server_name`, writes `request`,
/// reads until EOF or 5 s.
pub async fn raw_tls(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
    request: &[u8],
) -> RawOutcome {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let mut tls = match connector.connect(name, tcp).await {
        Ok(tls) => tls,
        Err(e) => return RawOutcome::HandshakeFailed(e.to_string()),
    };
    if let Err(e) = tls.write_all(request).await {
        return RawOutcome::NoResponse(e.to_string());
    }
    read_response(&mut tls).await
}

/// Writes `request` to `addr` in plaintext and reads the response.
pub async fn raw_tcp(addr: &str, request: &[u8]) -> RawOutcome {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    if let Err(e) = tcp.write_all(request).await {
        return RawOutcome::NoResponse(e.to_string());
    }
    read_response(&mut tcp).await
}

async fn read_response<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> RawOutcome {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 16384];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    // Stop once a full response with a known length has arrived.
                    if response_complete(&buf) {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    match read {
        Ok(Err(e)) if buf.is_empty() => RawOutcome::NoResponse(e),
        _ if buf.is_empty() => RawOutcome::NoResponse("closed without a response".into()),
        _ => RawOutcome::Response(String::from_utf8_lossy(&buf).into_owned()),
    }
}

fn response_complete(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    let head = text[..end].to_ascii_lowercase();
    let length = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
    });
    match length {
        Some(n) => buf.len() >= end + 4 + n,
        None => head.contains("transfer-encoding: chunked") && text.ends_with("0\r\n\r\n"),
    }
}

/// GETs `http://addr/path`.
pub async fn get_text(addr: &str, path: &str) -> String {
    reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("GET")
        .text()
        .await
        .expect("body")
}

/// Requests the app has seen (its `/__stats`, read directly, not through the mesh).
pub async fn app_requests(app: &str) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&get_text(app, "/__stats").await).expect("stats json");
    stats["requests"].as_u64().expect("requests")
}

/// Sum of the samples of metric `name` whose labels include every `label="value"` in `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn metrics(admin: &str) -> String {
    get_text(admin, "/metrics").await
}

/// An HTTP client that sends everything through `outbound` as an HTTP proxy.
pub fn via(outbound: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{outbound}")).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A PostgreSQL server of its own for one test (Debian's binaries, `initdb` + `pg_ctl`, run as
/// the `postgres` user when the tests run as root), on 127.0.0.1 and a free port, with a fresh
/// database. Stopped (immediate mode) and deleted on drop.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    /// `postgres://postgres@127.0.0.1:<port>/meshflow`.
    pub url: String,
}

fn as_postgres_user(program: &Path) -> std::process::Command {
    if nix::unistd::Uid::effective().is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        std::process::Command::new(program)
    }
}

impl Postgres {
    /// Starts a fresh server. Panics with a clear message when PostgreSQL is not installed
    /// (`scripts/install-deps test` installs it).
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is not installed: run scripts/install-deps test")
            .flatten()
            .map(|e| e.path().join("bin"))
            .find(|b| b.join("initdb").exists())
            .expect("no initdb under /usr/lib/postgresql/*/bin");
        let dir = std::env::temp_dir().join(format!(
            "meshflow-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        if nix::unistd::Uid::effective().is_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success());
        }
        let data = dir.join("data");
        let out = as_postgres_user(&bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = meshflow_cli::supervisor::free_port().unwrap();
        let out = as_postgres_user(&bin.join("pg_ctl"))
            .args(["-D"])
            .arg(&data)
            .args(["-w", "-l"])
            .arg(dir.join("log"))
            .args([
                "-o",
                &format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=on",
                    dir.display()
                ),
            ])
            .arg("start")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let out = as_postgres_user(&bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "meshflow",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "createdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Postgres {
            dir,
            bin,
            url: format!("postgres://postgres@127.0.0.1:{port}/meshflow"),
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres_user(&self.bin.join("pg_ctl"))
            .args(["-D"])
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `promtool check metrics` (installed by `scripts/install-deps`) on `text` scraped from
/// `admin`; panics with promtool's findings.
pub async fn promtool_check(admin: &str, text: &str) {
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/install-deps");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .await
        .unwrap();
    let out = promtool.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed for {admin}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens `cap` idle connections to `addr` from the local address `from` and checks that one
/// more from there is closed at once (a per-address connection cap). Returns the idle ones:
/// dropping them frees their slots.
pub async fn fill_per_address_cap(
    addr: std::net::SocketAddr,
    from: std::net::IpAddr,
    cap: usize,
) -> Vec<tokio::net::TcpStream> {
    let connect = || async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(from, 0)).unwrap();
        socket.connect(addr).await.unwrap()
    };
    let mut idle = Vec::new();
    for _ in 0..cap {
        idle.push(connect().await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = connect().await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut byte))
        .await
        .unwrap_or_else(|_| panic!("connection {} from {from} was left waiting", cap + 1));
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    idle
}
