//! Issue 12, item 1: the exact bytes an app receives for every request body shape, and each
//! client gets its own response over reused connections.
//!
//! The apps are in-process loggers on ports the mesh file names (no `command`): an HTTP/1.1
//! app that records the raw bytes of every request and, like a tolerant server, answers a
//! garbled "request" with 400 and keeps the connection (so a duplicated last chunk turns into
//! a phantom request whose response a later client would receive), and an h2c app that records
//! each DATA frame and the trailers. Requests reach the inbound sidecar as HTTP/2 frames shaped
//! by hand (a forged mesh certificate, ALPN h2), and through an outbound sidecar as the
//! HTTP/1.1 bodies an app sends (chunked, Content-Length, none).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

const MESH: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: framing }
spec:
  workloads:
    - name: client
      app: { protocol: http1, command: ["meshflow-echo", "--name", "client", "--listen", "127.0.0.1:{port}"] }
    - name: quote
      app: { protocol: http1, port: H1_PORT }
    - name: quote2
      app: { protocol: h2c, port: H2_PORT }
"#;

/// One request as an app saw it.
#[derive(Debug, Clone)]
struct Seen {
    /// Index of the app-side connection it arrived on.
    conn: usize,
    /// `x-test-id`, `None` for a phantom (bytes that did not form a request).
    id: Option<String>,
    /// HTTP/1.1: the raw head (request line and fields); h2c: empty.
    head: String,
    /// HTTP/1.1: the raw body bytes exactly as received (chunk framing included); h2c: the
    /// payload of each DATA frame.
    body: Vec<String>,
    /// h2c: the trailer fields, `name: value`.
    trailers: Vec<String>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads from `stream` into `buf` until `buf` holds at least `n` bytes; `false` on EOF.
async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>, n: usize) -> bool {
    while buf.len() < n {
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    true
}

/// Reads from `stream` into `buf` until it holds a whole HTTP/1.x head; returns the offset just
/// past the head's empty line, or `None` on EOF first.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            return Some(p + 4);
        }
        let have = buf.len();
        if !fill(stream, buf, have + 1).await {
            return None;
        }
    }
}

/// Reads through the next CRLF; returns the line's bytes including the CRLF.
async fn line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(p) = find(buf, b"\r\n") {
            return Some(buf.drain(..p + 2).collect());
        }
        let have = buf.len();
        if !fill(stream, buf, have + 1).await {
            return None;
        }
    }
}

/// A tolerant HTTP/1.1 app: logs raw requests, answers each with its `x-test-id`, answers
/// anything that is not a request line with 400 on the same connection.
async fn h1_app(listener: TcpListener, log: Log) {
    let mut conn = 0;
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        conn += 1;
        let log = log.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                let Some(head_end) = read_head(&mut stream, &mut buf).await else {
                    return;
                };
                let head: Vec<u8> = buf.drain(..head_end).collect();
                let head = String::from_utf8_lossy(&head).into_owned();
                let request_line: Vec<&str> =
                    head.lines().next().unwrap_or("").split(' ').collect();
                if request_line.len() != 3 || !request_line[2].starts_with("HTTP/1.") {
                    log.lock().unwrap().push(Seen {
                        conn,
                        id: None,
                        head,
                        body: Vec::new(),
                        trailers: Vec::new(),
                    });
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 7\r\n\r\nphantom")
                        .await;
                    continue;
                }
                let field = |name: &str| {
                    head.lines().skip(1).find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.trim()
                            .eq_ignore_ascii_case(name)
                            .then(|| v.trim().to_string())
                    })
                };
                let mut body = Vec::new();
                if field("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
                    loop {
                        let Some(size_line) = line(&mut stream, &mut buf).await else {
                            return;
                        };
                        body.extend_from_slice(&size_line);
                        let text = String::from_utf8_lossy(&size_line);
                        let size = usize::from_str_radix(
                            text.trim().split(';').next().unwrap_or("").trim(),
                            16,
                        )
                        .unwrap_or(0);
                        if size == 0 {
                            // Trailer section, up to the empty line.
                            loop {
                                let Some(l) = line(&mut stream, &mut buf).await else {
                                    return;
                                };
                                body.extend_from_slice(&l);
                                if l == b"\r\n" {
                                    break;
                                }
                            }
                            break;
                        }
                        if !fill(&mut stream, &mut buf, size + 2).await {
                            return;
                        }
                        body.extend(buf.drain(..size + 2));
                    }
                } else if let Some(n) = field("content-length").and_then(|v| v.parse().ok()) {
                    if !fill(&mut stream, &mut buf, n).await {
                        return;
                    }
                    body.extend(buf.drain(..n));
                }
                let id = field("x-test-id").unwrap_or_default();
                log.lock().unwrap().push(Seen {
                    conn,
                    id: Some(id.clone()),
                    head,
                    body: vec![String::from_utf8_lossy(&body).into_owned()],
                    trailers: Vec::new(),
                });
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{id}",
                    id.len()
                );
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// An h2c app: logs each request's DATA frames and trailers, answers with its `x-test-id`.
async fn h2_app(listener: TcpListener, log: Log) {
    let mut conn = 0;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        conn += 1;
        let log = log.clone();
        tokio::spawn(async move {
            let Ok(mut connection) = h2::server::handshake(stream).await else {
                return;
            };
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let id = request
                        .headers()
                        .get("x-test-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let mut body = request.into_body();
                    let mut frames = Vec::new();
                    while let Some(Ok(data)) = body.data().await {
                        let _ = body.flow_control().release_capacity(data.len());
                        frames.push(String::from_utf8_lossy(&data).into_owned());
                    }
                    let trailers = match body.trailers().await {
                        Ok(Some(t)) => t
                            .iter()
                            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap_or("?")))
                            .collect(),
                        _ => Vec::new(),
                    };
                    log.lock().unwrap().push(Seen {
                        conn,
                        id: Some(id.clone()),
                        head: String::new(),
                        body: frames,
                        trailers,
                    });
                    let response = http::Response::builder().status(200).body(()).unwrap();
                    if let Ok(mut send) = respond.send_response(response, false) {
                        let _ = send.send_data(Bytes::from(id), true);
                    }
                });
            }
        });
    }
}

/// A request body as HTTP/2 frames.
#[derive(Debug, Clone, Copy)]
struct Shape {
    name: &'static str,
    /// DATA frame payloads; the last one carries END_STREAM unless there are trailers. No
    /// frames: END_STREAM on the HEADERS frame.
    frames: &'static [&'static str],
    trailers: bool,
    content_length: bool,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "empty",
        frames: &[],
        trailers: false,
        content_length: false,
    },
    Shape {
        name: "empty-data-frame",
        frames: &[""],
        trailers: false,
        content_length: false,
    },
    Shape {
        name: "one-frame",
        frames: &["abc"],
        trailers: false,
        content_length: false,
    },
    Shape {
        name: "many-frames",
        frames: &["ab", "cd", "efg"],
        trailers: false,
        content_length: false,
    },
    Shape {
        name: "empty-final-frame",
        frames: &["abc", ""],
        trailers: false,
        content_length: false,
    },
    Shape {
        name: "many-then-empty-final-frame",
        frames: &["ab", "cd", ""],
        trailers: false,
        content_length: false,
    },
    Shape {
        name: "trailers",
        frames: &["abc"],
        trailers: true,
        content_length: false,
    },
    Shape {
        name: "empty-frame-then-trailers",
        frames: &["abc", ""],
        trailers: true,
        content_length: false,
    },
    Shape {
        name: "one-frame-content-length",
        frames: &["abc"],
        trailers: false,
        content_length: true,
    },
    Shape {
        name: "empty-final-frame-content-length",
        frames: &["abc", ""],
        trailers: false,
        content_length: true,
    },
];

impl Shape {
    fn payload(&self) -> String {
        self.frames.concat()
    }

    /// The exact body bytes an HTTP/1.1 app must receive.
    fn h1_body(&self) -> String {
        if self.content_length {
            return self.payload();
        }
        if self.frames.is_empty() && !self.trailers {
            // No body at all: no chunked framing either (asserted on the head separately).
            return String::new();
        }
        // One chunk per non-empty DATA frame, exactly one last-chunk (RFC 9112 §7.1); request
        // trailers are not forwarded (Pingora 0.9 carries response trailers only).
        let mut out = String::new();
        for frame in self.frames.iter().filter(|f| !f.is_empty()) {
            out.push_str(&format!("{:X}\r\n{frame}\r\n", frame.len()));
        }
        out.push_str("0\r\n\r\n");
        out
    }
}

/// An mTLS connection to `inbound` with a mesh certificate for the `client` workload, verifying
/// the server as `target_workload`'s SVID, offering `alpn` (e.g. `h2`, `http/1.1`).
async fn mesh_tls(
    t: &TestMesh,
    inbound: &str,
    target_workload: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let pki = Pki::mesh(&t.state_dir());
    let leaf = pki.issue(LeafSpec::spiffe(
        "spiffe://cluster.local/ns/default/sa/client",
    ));
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(pki.roots())
        .with_client_auth_cert(leaf.chain, leaf.key)
        .unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(inbound).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(identity_dns(target_workload)).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("mTLS to the inbound listener")
}

/// An HTTP/2 connection to `inbound` with a mesh certificate for `client` (ALPN h2).
async fn h2_client(
    t: &TestMesh,
    inbound: &str,
    target_workload: &str,
) -> h2::client::SendRequest<Bytes> {
    let tls = mesh_tls(t, inbound, target_workload, b"h2").await;
    let (send, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

/// Sends `shape` as frames on `client`; returns (status, body).
async fn send_shape(
    client: &mut h2::client::SendRequest<Bytes>,
    authority: &str,
    shape: &Shape,
    id: &str,
) -> (u16, String) {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}/shape/{}", shape.name))
        .header("x-test-id", id);
    if shape.content_length {
        request = request.header("content-length", shape.payload().len());
    }
    let request = request.body(()).unwrap();
    let no_body = shape.frames.is_empty() && !shape.trailers;
    let mut ready = client.clone().ready().await.expect("h2 ready");
    let (response, mut stream) = ready.send_request(request, no_body).expect("send");
    for (n, frame) in shape.frames.iter().enumerate() {
        let last = n + 1 == shape.frames.len() && !shape.trailers;
        stream
            .send_data(Bytes::from_static(frame.as_bytes()), last)
            .expect("DATA");
    }
    if shape.trailers {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().unwrap());
        stream.send_trailers(trailers).expect("trailers");
    }
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("response in time")
        .expect("response");
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
        text.extend_from_slice(&data);
    }
    (status, String::from_utf8_lossy(&text).into_owned())
}

fn take(log: &Log) -> Vec<Seen> {
    std::mem::take(&mut *log.lock().unwrap())
}

/// Waits until `log` holds `n` entries (the app logs before it answers, so this is immediate
/// for answered requests; a phantom may trail its request).
async fn settle(log: &Log, n: usize) {
    for _ in 0..20 {
        if log.lock().unwrap().len() > n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Apps {
    t: TestMesh,
    h1: Log,
    h2: Log,
}

async fn start() -> Apps {
    let h1_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h2_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mesh = MESH
        .replace(
            "H1_PORT",
            &h1_listener.local_addr().unwrap().port().to_string(),
        )
        .replace(
            "H2_PORT",
            &h2_listener.local_addr().unwrap().port().to_string(),
        );
    let h1: Log = Arc::default();
    let h2: Log = Arc::default();
    tokio::spawn(h1_app(h1_listener, h1.clone()));
    tokio::spawn(h2_app(h2_listener, h2.clone()));
    // On this test's own thread, not a blocking-pool one: the mesh's processes die with the
    // thread that spawned them (see `LocalMesh::start`). The runtime's workers serve the apps
    // meanwhile.
    let t = start_mesh(&mesh, |_| {});
    Apps { t, h1, h2 }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_body_shape_reaches_http1_and_h2c_apps_byte_exact() {
    let apps = start().await;
    for (workload, log, h1) in [("quote", &apps.h1, true), ("quote2", &apps.h2, false)] {
        let inbound = apps.t.mesh.workload(workload).inbound.clone();
        let authority = format!("{workload}.default");
        // Two clients (two HTTP/2 connections) take turns; every request travels to the app
        // over the sidecar's pooled connections, so a desync would hand one client another's
        // response.
        let mut clients = [
            h2_client(&apps.t, &inbound, workload).await,
            h2_client(&apps.t, &inbound, workload).await,
        ];
        let mut n = 0;
        let mut all: Vec<Seen> = Vec::new();
        for round in 0..2 {
            for shape in SHAPES {
                n += 1;
                let id = format!("{workload}-{}-{round}-{n}", shape.name);
                let client = &mut clients[n % 2];
                let (status, body) = send_shape(client, &authority, shape, &id).await;
                assert_eq!(
                    (status, body.as_str()),
                    (200, id.as_str()),
                    "{workload} {}: the client must get its own response",
                    shape.name
                );
                settle(log, 1).await;
                let seen = take(log);
                let ids: Vec<Option<&str>> = seen.iter().map(|s| s.id.as_deref()).collect();
                assert_eq!(
                    ids,
                    vec![Some(id.as_str())],
                    "{workload} {}: exactly one request reached the app (no phantom): {seen:#?}",
                    shape.name
                );
                all.push(seen[0].clone());
                let seen = &seen[0];
                if h1 {
                    let chunked = seen
                        .head
                        .to_ascii_lowercase()
                        .contains("transfer-encoding: chunked");
                    assert_eq!(
                        seen.body[0],
                        shape.h1_body(),
                        "{workload} {}: exact body bytes (head {:?})",
                        shape.name,
                        seen.head
                    );
                    if shape.content_length {
                        assert!(
                            !chunked,
                            "{}: Content-Length kept: {}",
                            shape.name, seen.head
                        );
                    } else if shape.frames.is_empty() {
                        assert!(
                            !chunked,
                            "{}: no body, no chunks: {}",
                            shape.name, seen.head
                        );
                    }
                } else {
                    // The same non-empty DATA frames, in order (an empty END_STREAM frame
                    // carries no bytes and may or may not be passed on).
                    let non_empty: Vec<&str> = seen
                        .body
                        .iter()
                        .map(String::as_str)
                        .filter(|f| !f.is_empty())
                        .collect();
                    let sent: Vec<&str> = shape
                        .frames
                        .iter()
                        .copied()
                        .filter(|f| !f.is_empty())
                        .collect();
                    assert_eq!(non_empty, sent, "{workload} {}: DATA frames", shape.name);
                    assert_eq!(
                        seen.trailers,
                        Vec::<String>::new(),
                        "{workload} {}: request trailers are not forwarded (Pingora 0.9 \
                         carries response trailers only)",
                        shape.name
                    );
                }
            }
        }
        assert_reused(workload, &all);
    }
}

/// The issue's reproduction and its class: an HTTP/1.1 app sends bodies through its outbound
/// sidecar (chunked with one or many chunks, an empty chunked body, chunk extensions,
/// trailers, Content-Length, none) on one keep-alive connection; the HTTP/1.1 app behind the
/// other sidecar receives each body once, with one last-chunk, and each request its own
/// response.
#[tokio::test(flavor = "multi_thread")]
async fn chunked_bodies_through_both_sidecars_keep_responses_in_order() {
    let apps = start().await;
    let outbound = apps.t.mesh.workload("client").outbound.clone();
    let mut conn = TcpStream::connect(&outbound).await.unwrap();
    const CHUNKED: &str = "Transfer-Encoding: chunked\r\n";
    // (name, framing header, body as sent, payload)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("chunked-one", CHUNKED, "3\r\nabc\r\n0\r\n\r\n", "abc"),
        (
            "chunked-many",
            CHUNKED,
            "2\r\nab\r\n2\r\ncd\r\n3\r\nefg\r\n0\r\n\r\n",
            "abcdefg",
        ),
        ("chunked-empty", CHUNKED, "0\r\n\r\n", ""),
        (
            "chunked-extension",
            CHUNKED,
            "3;x=1\r\nabc\r\n0\r\n\r\n",
            "abc",
        ),
        (
            "chunked-trailers",
            CHUNKED,
            "3\r\nabc\r\n0\r\nx-checksum: abc\r\n\r\n",
            "abc",
        ),
        ("content-length", "Content-Length: 3\r\n", "abc", "abc"),
        ("content-length-zero", "Content-Length: 0\r\n", "", ""),
        ("no-body", "", "", ""),
    ];
    let mut all: Vec<Seen> = Vec::new();
    for round in 0..2 {
        for (name, framing, body, payload) in cases {
            let id = format!("{name}-{round}");
            let request = format!(
                "POST /x HTTP/1.1\r\nHost: quote.default\r\nx-test-id: {id}\r\n{framing}\r\n{body}"
            );
            conn.write_all(request.as_bytes()).await.unwrap();
            // One response with a Content-Length (the logger's and the sidecar's answers).
            let mut buf = Vec::new();
            let head_end = read_head(&mut conn, &mut buf)
                .await
                .unwrap_or_else(|| panic!("{id}: connection closed"));
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{id}: no content-length in {head}"));
            assert!(fill(&mut conn, &mut buf, head_end + length).await);
            let text = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
            assert!(head.starts_with("http/1.1 200"), "{id}: {head}{text}");
            assert_eq!(text, id, "{id}: the client must get its own response");
            assert_eq!(
                buf.len(),
                head_end + length,
                "{id}: nothing after the response"
            );

            settle(&apps.h1, 1).await;
            let seen = take(&apps.h1);
            let ids: Vec<Option<&str>> = seen.iter().map(|s| s.id.as_deref()).collect();
            assert_eq!(
                ids,
                vec![Some(id.as_str())],
                "{id}: one request, no phantom: {seen:#?}"
            );
            all.push(seen[0].clone());
            // Decode what the app got: the same payload, framed once.
            let got = seen[0].body[0].clone();
            let chunked_head = seen[0]
                .head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked");
            let decoded = if chunked_head {
                assert!(
                    got.ends_with("0\r\n\r\n") && got.matches("0\r\n\r\n").count() == 1,
                    "{id}: exactly one last-chunk: {got:?}"
                );
                dechunk(&got)
            } else {
                got.clone()
            };
            assert_eq!(decoded, *payload, "{id}: payload (raw {got:?})");
        }
    }
    assert_reused("quote", &all);
}

/// The sidecar's pooled connection to the app carried more than one request (a duplicated
/// last chunk only turns into a wrong response when a connection is reused).
fn assert_reused(workload: &str, seen: &[Seen]) {
    let mut per_conn = std::collections::BTreeMap::<usize, usize>::new();
    for s in seen {
        *per_conn.entry(s.conn).or_default() += 1;
    }
    assert!(
        per_conn.values().any(|n| *n > 1),
        "{workload}: no app connection was reused: {per_conn:?}"
    );
}

/// The payload of a chunked body (chunk extensions and trailers dropped).
fn dechunk(mut text: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size_line, rest)) = text.split_once("\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        text = &rest[size + 2..];
    }
}

const PIECES_MESH: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: pieces }
spec:
  workloads:
    - name: client
      app: { protocol: http1, command: ["meshflow-echo", "--name", "client", "--listen", "127.0.0.1:{port}"] }
    - name: pieces
      app: { protocol: http1, port: PIECES_PORT }
"#;

/// How many pieces the pieces app writes per response.
const PIECES: usize = 3;

/// An HTTP/1.1 app that answers `GET /pieces/<size>` with a Content-Length body of
/// [`PIECES`] pieces of `<size>` bytes (`a…`, `b…`, `c…`), and writes each piece after the
/// first only once the test has read the one before (`read` gets a permit per piece read).
async fn pieces_app(listener: TcpListener, read: Arc<tokio::sync::Semaphore>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let read = read.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                let Some(head_end) = read_head(&mut stream, &mut buf).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                buf.drain(..head_end);
                let size: usize = head
                    .split(' ')
                    .nth(1)
                    .and_then(|path| path.strip_prefix("/pieces/"))
                    .and_then(|size| size.parse().ok())
                    .unwrap_or(1);
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                    size * PIECES
                );
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
                for piece in 0..PIECES {
                    if piece > 0 {
                        read.acquire().await.unwrap().forget();
                    }
                    let bytes = vec![b'a' + piece as u8; size];
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

/// Reads a response to `GET /pieces/<size>` from `stream` piece by piece: each piece must
/// arrive within 5 s of the app writing it, and the app writes the next only after this read
/// the last (a permit on `read`). A piece the proxy keeps in a write buffer until the body is
/// complete never arrives: the timeout fails the test, naming the piece.
async fn read_pieces<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    read: &tokio::sync::Semaphore,
    authority: &str,
    size: usize,
    what: &str,
) {
    let request = format!("GET /pieces/{size} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let head_end = tokio::time::timeout(Duration::from_secs(5), read_head(stream, &mut buf))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: no response head within 5 s: held in a write buffer with the first piece"
            )
        })
        .unwrap_or_else(|| panic!("{what}: the connection closed before the head"));
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{what}: {head}");
    assert!(
        head.contains(&format!("content-length: {}", size * PIECES)),
        "{what}: the body must keep its Content-Length framing (chunked bodies are flushed \
         anyway): {head}"
    );
    for piece in 1..=PIECES {
        let filled = tokio::time::timeout(
            Duration::from_secs(5),
            fill(stream, &mut buf, head_end + piece * size),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: piece {piece} of {PIECES} ({size} bytes) not delivered within 5 s of \
                 the app writing it ({} of {} body bytes arrived): held in a write buffer",
                buf.len() - head_end,
                piece * size
            )
        });
        assert!(filled, "{what}: the connection closed in piece {piece}");
        if piece < PIECES {
            read.add_permits(1);
        }
    }
    let body = &buf[head_end..];
    assert_eq!(body.len(), size * PIECES, "{what}: nothing after the body");
    for piece in 0..PIECES {
        assert!(
            body[piece * size..(piece + 1) * size]
                .iter()
                .all(|b| *b == b'a' + piece as u8),
            "{what}: piece {} has other bytes",
            piece + 1
        );
    }
}

/// An app that writes a Content-Length body in pieces, each after the client has read the one
/// before (a server-side stream of known length, or a full-duplex exchange), reaches an
/// HTTP/1.1 client piece by piece: each piece is flushed, not held in the sidecar's write
/// buffer until the body is complete (Pingora flushes such a body only at its end; patched in
/// `third_party/pingora-core`). Through the pair with 1,000-byte pieces, under the outbound
/// port's 1,460-byte write buffer, and straight to the inbound port over mTLS HTTP/1.1 with
/// 4,000-byte pieces, under its 16 KiB one; both on one keep-alive connection, twice.
#[tokio::test(flavor = "multi_thread")]
async fn content_length_bodies_reach_http1_clients_piece_by_piece() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mesh = PIECES_MESH.replace(
        "PIECES_PORT",
        &listener.local_addr().unwrap().port().to_string(),
    );
    let read = Arc::new(tokio::sync::Semaphore::new(0));
    tokio::spawn(pieces_app(listener, read.clone()));
    // On this test's own thread (see `start`).
    let t = start_mesh(&mesh, |_| {});

    let outbound = t.mesh.workload("client").outbound.clone();
    let mut conn = TcpStream::connect(&outbound).await.unwrap();
    for round in 1..=2 {
        let what = format!("through the pair, round {round}");
        read_pieces(&mut conn, &read, "pieces.default", 1000, &what).await;
    }

    let inbound = t.mesh.workload("pieces").inbound.clone();
    let mut tls = mesh_tls(&t, &inbound, "pieces", b"http/1.1").await;
    for round in 1..=2 {
        let what = format!("mTLS HTTP/1.1 to the inbound port, round {round}");
        read_pieces(&mut tls, &read, "pieces.default", 4000, &what).await;
    }
}
