//! The app's original kubelet probes, run by the admin listener (issue 14).
//!
//! Injection rewrites an app container's HTTP, gRPC and TCP probes to an HTTP GET of the proxy's
//! admin port, `/app-health/<container>/<livez|readyz|startupz>`, and keeps the originals in
//! the pod annotation `meshflow.io/app-probes`, which reaches the proxy as `MESHFLOW_APP_PROBES`
//! (downward API; format: `meshflow_policies::inject::APP_PROBES`). The admin listener answers
//! such a path by performing the original probe against the app on this host and judging it as
//! the kubelet would: 200 when it succeeds, 503 when it fails, within the probe's
//! `timeoutSeconds`. The admin port is plaintext and never captured, so STRICT mTLS on the app's
//! ports cannot fail a probe.
//!
//! - **HTTP(S)**: `GET` of the original `path` on `host` (default: the pod IP, as the kubelet
//!   probes it — `POD_IP`, which injection sets from the downward API — else 127.0.0.1) and
//!   `port`, with the
//!   original `httpHeaders` (a `Host` header sets the request's host) plus the kubelet's
//!   defaults (`User-Agent: kube-probe/…`, `Accept: */*`, `Connection: close`); a status from
//!   200 to 399 is a success (a redirect is not followed: 3xx succeeds). HTTPS does not verify
//!   the app's certificate, as the kubelet does not.
//! - **gRPC**: `grpc.health.v1.Health/Check` with the original `service` (plaintext HTTP/2, to
//!   the same default host);
//!   success is `SERVING`.
//! - **TCP**: a connection to `host` (the same default) and `port`.
//!
//! The proxy's own connections are never captured, so probing the pod IP reaches the app
//! directly; an app bound to loopback only fails, as it would fail the kubelet's probe.
//!
//! Only the declared paths are served (anything else under `/app-health/` is 404): the admin
//! listener is no proxy to arbitrary ports. Concurrent requests for one path share one probe of
//! the app (a request waits for a probe that starts after it arrived, or runs one), so a flood of
//! requests on the admin port never multiplies into probes of the app.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The admin paths of app probes start with this.
pub const PREFIX: &str = "/app-health/";

/// What the kubelet sends when a probe sets no `User-Agent` (the version is the kubelet's; the
/// kubelet's own is passed on when its request carries one).
const DEFAULT_USER_AGENT: &str = "kube-probe/meshflow";

/// The result of one probe: whether it succeeded and a line saying why, for the response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Success (the admin listener answers 200) or failure (503).
    pub success: bool,
    /// What happened, e.g. `HTTP probe failed with statuscode: 500`.
    pub message: String,
}

impl Outcome {
    fn ok(message: impl Into<String>) -> Self {
        Self {
            success: true,
            message: message.into(),
        }
    }

    fn failed(message: impl Into<String>) -> Self {
        Self {
            success: false,
            message: message.into(),
        }
    }
}

/// The pod's original probes by admin path.
#[derive(Default)]
pub struct AppProbes {
    probes: BTreeMap<String, Arc<Probe>>,
}

struct Probe {
    handler: Handler,
    timeout: Duration,
    /// The last probe of the app: when it started, and its outcome.
    last: tokio::sync::Mutex<Option<(Instant, Outcome)>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Handler {
    Http {
        https: bool,
        host: Option<String>,
        port: u16,
        path: String,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    Tcp {
        host: Option<String>,
        port: u16,
    },
    Grpc {
        port: u16,
        service: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OriginalProbe {
    http_get: Option<OriginalHttpGet>,
    tcp_socket: Option<OriginalTcp>,
    grpc: Option<OriginalGrpc>,
    timeout_seconds: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OriginalHttpGet {
    path: Option<String>,
    port: serde_json::Value,
    host: Option<String>,
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Vec<OriginalHeader>,
}

#[derive(Deserialize)]
struct OriginalHeader {
    name: String,
    value: String,
}

#[derive(Deserialize)]
struct OriginalTcp {
    port: serde_json::Value,
    host: Option<String>,
}

#[derive(Deserialize)]
struct OriginalGrpc {
    port: serde_json::Value,
    service: Option<String>,
}

/// A probe's port: a number 1-65535 (the injector resolves named ports), or those digits as a
/// string.
fn port(value: &serde_json::Value, at: &str) -> Result<u16, String> {
    let number = match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    number
        .filter(|n| (1..=65535).contains(n))
        .map(|n| n as u16)
        .ok_or_else(|| format!("{at}.port: {value} is not a port number (1-65535)"))
}

fn host(value: Option<String>) -> Option<String> {
    value.filter(|h| !h.trim().is_empty())
}

impl AppProbes {
    /// Reads `MESHFLOW_APP_PROBES`: a JSON object from admin path to original probe; empty text
    /// (the annotation is absent) is no probes.
    ///
    /// # Errors
    /// Not a JSON object, a key outside `/app-health/`, a probe without exactly one of
    /// `httpGet`, `tcpSocket`, `grpc`, an unusable port, scheme or header: named.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let map: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON object of probes: {e}"))?;
        let mut probes = BTreeMap::new();
        for (path, value) in map {
            if !path.starts_with(PREFIX) || path.len() == PREFIX.len() {
                return Err(format!("{path:?}: a probe's path starts with {PREFIX}"));
            }
            let original: OriginalProbe =
                serde_json::from_value(value).map_err(|e| format!("{path:?}: not a probe: {e}"))?;
            let handler = match (original.http_get, original.tcp_socket, original.grpc) {
                (Some(http), None, None) => {
                    let at = format!("{path:?}.httpGet");
                    let https = match http.scheme.as_deref().map(str::to_ascii_uppercase) {
                        None => false,
                        Some(s) if s == "HTTP" => false,
                        Some(s) if s == "HTTPS" => true,
                        Some(other) => {
                            return Err(format!("{at}.scheme: {other:?} is not HTTP or HTTPS"))
                        }
                    };
                    let mut headers = Vec::new();
                    for header in http.http_headers {
                        let name =
                            HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| {
                                format!("{at}.httpHeaders: {:?} is not a header name", header.name)
                            })?;
                        let value = HeaderValue::from_str(&header.value).map_err(|_| {
                            format!(
                                "{at}.httpHeaders: the value of {:?} is not a header value",
                                header.name
                            )
                        })?;
                        headers.push((name, value));
                    }
                    let mut request_path = http.path.unwrap_or_default();
                    if !request_path.starts_with('/') {
                        request_path.insert(0, '/');
                    }
                    http::uri::PathAndQuery::try_from(request_path.as_str())
                        .map_err(|e| format!("{at}.path: {request_path:?}: {e}"))?;
                    Handler::Http {
                        https,
                        host: host(http.host),
                        port: port(&http.port, &at)?,
                        path: request_path,
                        headers,
                    }
                }
                (None, Some(tcp), None) => Handler::Tcp {
                    port: port(&tcp.port, &format!("{path:?}.tcpSocket"))?,
                    host: host(tcp.host),
                },
                (None, None, Some(grpc)) => Handler::Grpc {
                    port: port(&grpc.port, &format!("{path:?}.grpc"))?,
                    service: grpc.service.unwrap_or_default(),
                },
                _ => {
                    return Err(format!(
                        "{path:?}: a probe has exactly one of httpGet, tcpSocket, grpc"
                    ))
                }
            };
            let timeout = Duration::from_secs(original.timeout_seconds.unwrap_or(1).max(1) as u64);
            probes.insert(
                path,
                Arc::new(Probe {
                    handler,
                    timeout,
                    last: tokio::sync::Mutex::new(None),
                }),
            );
        }
        Ok(Self { probes })
    }

    /// No probes declared.
    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// The declared admin paths.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.probes.keys().map(String::as_str)
    }

    /// Runs the probe behind admin `path` (sharing a probe that starts after this call, see the
    /// module docs); `None` when the pod declared no such probe. `user_agent`: the caller's, sent
    /// on when it is the kubelet's (`kube-probe/…`) and the probe sets none.
    pub async fn run(&self, path: &str, user_agent: Option<&str>) -> Option<Outcome> {
        let probe = self.probes.get(path)?.clone();
        let arrived = Instant::now();
        let user_agent = user_agent
            .filter(|ua| ua.starts_with("kube-probe/"))
            .unwrap_or(DEFAULT_USER_AGENT)
            .to_string();
        let timeout = probe.timeout;
        let outcome = tokio::time::timeout(timeout, async move {
            let mut last = probe.last.lock().await;
            if let Some((started, outcome)) = &*last {
                if *started >= arrived {
                    return outcome.clone();
                }
            }
            let started = Instant::now();
            let outcome = perform(&probe.handler, &user_agent, timeout).await;
            *last = Some((started, outcome.clone()));
            outcome
        })
        .await
        .unwrap_or_else(|_| {
            Outcome::failed(format!("probe timed out after {}s", timeout.as_secs()))
        });
        Some(outcome)
    }
}

/// One probe of the app, bounded by `timeout`.
async fn perform(handler: &Handler, user_agent: &str, timeout: Duration) -> Outcome {
    let work = async {
        match handler {
            Handler::Http {
                https,
                host,
                port,
                path,
                headers,
            } => http_probe(*https, host.as_deref(), *port, path, headers, user_agent).await,
            Handler::Tcp { host, port } => {
                let host = host.as_deref().unwrap_or(default_host());
                match TcpStream::connect((host, *port)).await {
                    Ok(_) => Outcome::ok(format!("TCP probe succeeded: {host}:{port} accepts")),
                    Err(e) => Outcome::failed(format!("dial tcp {host}:{port}: {e}")),
                }
            }
            Handler::Grpc { port, service } => grpc_probe(*port, service, timeout).await,
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Outcome::failed(format!("probe timed out after {}s", timeout.as_secs()))
        })
}

/// Where a probe without a `host` goes: the pod IP (`POD_IP`, from the downward API in an
/// injected pod) like the kubelet's probe, else 127.0.0.1 (a sidecar outside Kubernetes).
fn default_host() -> &'static str {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        std::env::var("POD_IP")
            .ok()
            .and_then(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
            .map_or_else(|| "127.0.0.1".to_string(), |ip| ip.to_string())
    })
}

/// `host:port`, bracketing an IPv6 address.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

async fn http_probe(
    https: bool,
    host: Option<&str>,
    port: u16,
    path: &str,
    headers: &[(HeaderName, HeaderValue)],
    user_agent: &str,
) -> Outcome {
    let connect_host = host.unwrap_or(default_host());
    let url = format!(
        "{}://{}{path}",
        if https { "https" } else { "http" },
        authority(connect_host, port)
    );
    let tcp = match TcpStream::connect((connect_host, port)).await {
        Ok(tcp) => tcp,
        Err(e) => return Outcome::failed(format!("GET {url}: {e}")),
    };
    let _ = tcp.set_nodelay(true);
    // Headers as the kubelet builds them: the probe's own (repeated names add values), then
    // its defaults where the probe set none; a `Host` header is the request's host.
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(name.clone(), value.clone());
    }
    if !map.contains_key(http::header::HOST) {
        let value = HeaderValue::from_str(&authority(connect_host, port))
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        map.insert(http::header::HOST, value);
    }
    if !map.contains_key(http::header::USER_AGENT) {
        let value = HeaderValue::from_str(user_agent)
            .unwrap_or_else(|_| HeaderValue::from_static(DEFAULT_USER_AGENT));
        map.insert(http::header::USER_AGENT, value);
    }
    if !map.contains_key(http::header::ACCEPT) {
        map.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
    }
    map.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    let mut request = match Request::builder()
        .method(Method::GET)
        .uri(path)
        .body(Empty::<Bytes>::new())
    {
        Ok(r) => r,
        Err(e) => return Outcome::failed(format!("GET {url}: {e}")),
    };
    *request.headers_mut() = map;
    let status = if https {
        let connector = tokio_rustls::TlsConnector::from(insecure_tls());
        let name = match rustls_pki_types::ServerName::try_from(connect_host.to_string()) {
            Ok(name) => name,
            Err(e) => return Outcome::failed(format!("GET {url}: {e}")),
        };
        match connector.connect(name, tcp).await {
            Ok(tls) => send(tls, request).await,
            Err(e) => Err(format!("TLS handshake: {e}")),
        }
    } else {
        send(tcp, request).await
    };
    match status {
        Ok(code) if (200..400).contains(&code) => {
            Outcome::ok(format!("HTTP probe succeeded with statuscode: {code}"))
        }
        Ok(code) => Outcome::failed(format!("HTTP probe failed with statuscode: {code}")),
        Err(e) => Outcome::failed(format!("GET {url}: {e}")),
    }
}

/// Sends `request` over HTTP/1.1 on `io`; the response's status code.
async fn send<S>(io: S, request: Request<Empty<Bytes>>) -> Result<u16, String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let result = sender
        .send_request(request)
        .await
        .map(|response| response.status().as_u16())
        .map_err(|e| e.to_string());
    driver.abort();
    result
}

/// A TLS client that accepts any server certificate (the kubelet's HTTPS probes do not verify
/// the app's certificate either).
fn insecure_tls() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config)
        })
        .clone()
}

#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse` (`status`: 1 = SERVING).
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

fn serving_status(status: i32) -> &'static str {
    match status {
        0 => "UNKNOWN",
        1 => "SERVING",
        2 => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "an unknown status",
    }
}

async fn grpc_probe(port: u16, service: &str, timeout: Duration) -> Outcome {
    let target = authority(default_host(), port);
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{target}")) {
        Ok(e) => e.connect_timeout(timeout).timeout(timeout),
        Err(e) => return Outcome::failed(format!("gRPC probe of {target}: {e}")),
    };
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            return Outcome::failed(format!(
                "timeout: failed to connect service {target:?} within {}s: {text}",
                timeout.as_secs()
            ));
        }
    };
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        return Outcome::failed(format!("gRPC probe of {target}: {e}"));
    }
    let path = http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check");
    let codec = tonic::codec::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
    let request = tonic::Request::new(HealthCheckRequest {
        service: service.to_string(),
    });
    match grpc.unary(request, path, codec).await {
        Ok(response) if response.get_ref().status == 1 => Outcome::ok(format!(
            "gRPC probe succeeded: service {service:?} is SERVING"
        )),
        Ok(response) => Outcome::failed(format!(
            "service unhealthy (responded with {:?})",
            serving_status(response.get_ref().status)
        )),
        Err(status) => Outcome::failed(format!(
            "error: health rpc probe failed: {:?}: {}",
            status.code(),
            status.message()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_injectors_annotation() {
        let probes = AppProbes::parse(
            r#"{"/app-health/web/livez": {"httpGet": {"path": "/healthz", "port": 8080,
                  "scheme": "HTTP", "host": "", "httpHeaders": [{"name": "x-probe", "value": "kubelet"},
                  {"name": "Host", "value": "web.local"}]}, "timeoutSeconds": 3},
                "/app-health/web/readyz": {"tcpSocket": {"port": "8080"}, "timeoutSeconds": 1},
                "/app-health/api/startupz": {"grpc": {"port": 9090}}}"#,
        )
        .unwrap();
        assert_eq!(
            probes.paths().collect::<Vec<_>>(),
            [
                "/app-health/api/startupz",
                "/app-health/web/livez",
                "/app-health/web/readyz"
            ]
        );
        let live = &probes.probes["/app-health/web/livez"];
        assert_eq!(live.timeout, Duration::from_secs(3));
        assert_eq!(
            live.handler,
            Handler::Http {
                https: false,
                host: None,
                port: 8080,
                path: "/healthz".into(),
                headers: vec![
                    (
                        HeaderName::from_static("x-probe"),
                        HeaderValue::from_static("kubelet")
                    ),
                    (
                        HeaderName::from_static("host"),
                        HeaderValue::from_static("web.local")
                    ),
                ],
            }
        );
        assert_eq!(
            probes.probes["/app-health/web/readyz"].handler,
            Handler::Tcp {
                host: None,
                port: 8080
            }
        );
        let grpc = &probes.probes["/app-health/api/startupz"];
        assert_eq!(
            grpc.handler,
            Handler::Grpc {
                port: 9090,
                service: String::new()
            }
        );
        assert_eq!(grpc.timeout, Duration::from_secs(1));
        assert!(AppProbes::parse("").unwrap().is_empty());
    }

    #[test]
    fn refuses_what_it_cannot_run_naming_it() {
        for (text, expect) in [
            ("[]", "not a JSON object"),
            (r#"{"/other": {"tcpSocket": {"port": 1}}}"#, "starts with"),
            (
                r#"{"/app-health/a/livez": {"tcpSocket": {"port": "http"}}}"#,
                "tcpSocket.port: \"http\" is not a port number",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"port": 1, "scheme": "FTP"}}}"#,
                "scheme: \"FTP\"",
            ),
            (
                r#"{"/app-health/a/livez": {"timeoutSeconds": 1}}"#,
                "exactly one of",
            ),
            (
                r#"{"/app-health/a/livez": {"httpGet": {"port": 70000}}}"#,
                "is not a port number",
            ),
        ] {
            let error = AppProbes::parse(text).err().unwrap_or_default();
            assert!(error.contains(expect), "{text}: {error}");
        }
    }

    #[tokio::test]
    async fn unknown_paths_run_nothing_and_concurrent_requests_share_one_probe() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let _ = listener.accept().await.unwrap();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let probes = Arc::new(
            AppProbes::parse(&format!(
                r#"{{"/app-health/a/readyz": {{"tcpSocket": {{"port": {port}}}}}}}"#
            ))
            .unwrap(),
        );
        assert!(probes.run("/app-health/a/livez", None).await.is_none());
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let probes = probes.clone();
            tasks.push(tokio::spawn(async move {
                probes.run("/app-health/a/readyz", None).await.unwrap()
            }));
        }
        for task in tasks {
            assert!(task.await.unwrap().success);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let probes_of_the_app = accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            probes_of_the_app <= 2,
            "20 concurrent requests made {probes_of_the_app} probes"
        );
    }
}
