//! Example echo app: HTTP/1.1 and h2c JSON echo plus a gRPC `Echo` service on one port.
//!
//! HTTP: every path answers JSON `{service, method, path, headers, body, xfcc}`;
//! `/status/<code>` answers that status; `/sleep/<ms>` answers after a delay;
//! `/flaky/<n>/<code>[?retry-after=v]` answers `<code>` to the first n requests carrying the same
//! `x-test-key`; `/__stats` answers `{"requests": N}` (itself excluded), so tests can prove a
//! request never reached the app; `/__attempts/<key>` lists the requests seen for a key (method,
//! body, `Idempotency-Key`, `grpc-timeout`, time). `x-echo-response-header: <name>: <value>` on a
//! request adds that header to the response (a test hook for what an app may try to say).
//! gRPC: see `proto/echo.proto`; unary replies carry the custom trailer `x-echo-trailer: done`.
#![allow(clippy::all)]

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::Request;
use axum::response::IntoResponse;
use futures::Stream;
use tonic::{Response, Status, Streaming};

/// Generated gRPC code for `meshflow.echo.v1`.
pub mod pb {
    tonic::include_proto!("meshflow.echo.v1");
}

use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest, StreamRequest};

#[derive(Clone)]
struct App {
    name: Arc<str>,
    requests: Arc<AtomicU64>,
    /// Every request (HTTP, or gRPC `flaky:`) with an `x-test-key`, by key.
    attempts: Arc<std::sync::Mutex<BTreeMap<String, Vec<serde_json::Value>>>>,
    /// When set, every HTTP request (but `/__…`) answers this status.
    always: Option<u16>,
    /// Added to every HTTP response (a slow endpoint).
    delay: Duration,
    started: std::time::Instant,
}

impl App {
    /// Records an attempt for `key` and returns how many came before it.
    fn record(&self, key: &str, detail: serde_json::Value) -> usize {
        let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        let list = attempts.entry(key.to_string()).or_default();
        let mut detail = detail;
        detail["atMs"] = serde_json::json!(self.started.elapsed().as_millis() as u64);
        detail["service"] = serde_json::json!(&*self.name);
        list.push(detail);
        list.len() - 1
    }
}

/// Marks attempt `index` of `key` as `cancelled` if dropped while armed (the handler was
/// abandoned because the caller reset the stream or closed the connection).
struct Cancellation {
    attempts: Arc<std::sync::Mutex<BTreeMap<String, Vec<serde_json::Value>>>>,
    key: String,
    index: usize,
    armed: bool,
}

impl Drop for Cancellation {
    fn drop(&mut self) {
        if self.armed {
            let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(attempt) = attempts
                .get_mut(&self.key)
                .and_then(|l| l.get_mut(self.index))
            {
                attempt["cancelled"] = serde_json::json!(true);
            }
        }
    }
}

fn xfcc(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all("x-forwarded-client-cert")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

#[tonic::async_trait]
impl Echo for App {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<Response<EchoReply>, Status> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let xfcc = xfcc(&request.metadata().clone().into_headers());
        let grpc_timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let message = request.into_inner().message;
        // flaky:<key>:<n>:<code> fails the first n calls for key with gRPC status code.
        if let Some(rest) = message.strip_prefix("flaky:") {
            let parts: Vec<&str> = rest.split(':').collect();
            if let [key, n, code] = parts.as_slice() {
                let before = self.record(key, serde_json::json!({"grpcTimeout": grpc_timeout}));
                if before < n.parse::<usize>().unwrap_or(0) {
                    let code = tonic::Code::from_i32(code.parse().unwrap_or(14));
                    return Err(Status::new(code, format!("flaky failure {}", before + 1)));
                }
            }
        }
        // sleep:<key>:<ms> records grpc-timeout and sleeps.
        if let Some(rest) = message.strip_prefix("sleep:") {
            if let Some((key, ms)) = rest.split_once(':') {
                self.record(key, serde_json::json!({"grpcTimeout": grpc_timeout}));
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            }
        }
        if let Some(code) = message.strip_prefix("fail:") {
            let code = tonic::Code::from_i32(code.parse().unwrap_or(2));
            return Err(Status::new(code, format!("requested failure {message}")));
        }
        let mut response = Response::new(EchoReply {
            message,
            service: self.name.to_string(),
            xfcc,
            sequence: 0,
        });
        response
            .metadata_mut()
            .insert("x-echo-trailer", "done".parse().expect("static"));
        Ok(response)
    }

    type ServerStreamStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

    async fn server_stream(
        &self,
        request: tonic::Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let xfcc = xfcc(&request.metadata().clone().into_headers());
        let req = request.into_inner();
        let name = self.name.to_string();
        let stream = async_stream(req, name, xfcc);
        Ok(Response::new(Box::pin(stream)))
    }

    type BidiStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

    async fn bidi(
        &self,
        request: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let xfcc = xfcc(&request.metadata().clone().into_headers());
        let name = self.name.to_string();
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut sequence = 0;
            while let Ok(Some(msg)) = inbound.message().await {
                sequence += 1;
                let reply = EchoReply {
                    message: msg.message,
                    service: name.clone(),
                    xfcc: xfcc.clone(),
                    sequence,
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

fn async_stream(
    req: StreamRequest,
    name: String,
    xfcc: Vec<String>,
) -> impl Stream<Item = Result<EchoReply, Status>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for sequence in 1..=req.count {
            let reply = EchoReply {
                message: req.message.clone(),
                service: name.clone(),
                xfcc: xfcc.clone(),
                sequence,
            };
            if tx.send(Ok(reply)).await.is_err() {
                return;
            }
            if sequence < req.count {
                tokio::time::sleep(Duration::from_millis(req.interval_ms as u64)).await;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn http_echo(app: App, request: Request) -> axum::response::Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    if path == "/__stats" {
        return axum::Json(serde_json::json!({"requests": app.requests.load(Ordering::Relaxed)}))
            .into_response();
    }
    app.requests.fetch_add(1, Ordering::Relaxed);
    let body: Bytes = axum::body::to_bytes(body, 16 * 1024 * 1024)
        .await
        .unwrap_or_default();
    if let Some(key) = path.strip_prefix("/__attempts/") {
        let attempts = app.attempts.lock().unwrap_or_else(|e| e.into_inner());
        return axum::Json(attempts.get(key).cloned().unwrap_or_default()).into_response();
    }
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut before = 0;
    if let Some(key) = header("x-test-key") {
        before = app.record(
            &key,
            serde_json::json!({
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "body": String::from_utf8_lossy(&body),
                "idempotencyKey": header("idempotency-key"),
                "grpcTimeout": header("grpc-timeout"),
            }),
        );
    }
    if !app.delay.is_zero() {
        tokio::time::sleep(app.delay).await;
    }
    if let Some(code) = app.always {
        let status =
            http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
        return (status, format!("{} always answers {code}\n", app.name)).into_response();
    }
    // /sleep/<ms>: answer after a delay.
    if let Some(ms) = path
        .split_once("/sleep/")
        .and_then(|(_, m)| m.parse::<u64>().ok())
    {
        // If the caller resets the stream mid-sleep, this future is dropped: record that.
        let _watch = header("x-test-key").map(|key| Cancellation {
            attempts: app.attempts.clone(),
            key,
            index: before,
            armed: true,
        });
        tokio::time::sleep(Duration::from_millis(ms)).await;
        if let Some(mut watch) = _watch {
            watch.armed = false;
        }
    }
    // /flaky/<n>/<code>[?retry-after=<v>]: the first n requests with this x-test-key get <code>.
    if let Some((_, rest)) = path.split_once("/flaky/") {
        let mut it = rest.split('/');
        let n: usize = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let code: u16 = it.next().and_then(|c| c.parse().ok()).unwrap_or(503);
        if before < n {
            let mut response = (
                http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE),
                "flaky\n",
            )
                .into_response();
            if let Some(v) = parts
                .uri
                .query()
                .and_then(|q| q.strip_prefix("retry-after="))
            {
                if let Ok(v) = http::HeaderValue::from_str(&v.replace("%20", " ")) {
                    response.headers_mut().insert("retry-after", v);
                }
            }
            return response;
        }
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in &parts.headers {
        headers
            .entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let status = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| http::StatusCode::from_u16(c).ok())
        .unwrap_or(http::StatusCode::OK);
    let json = serde_json::json!({
        "service": &*app.name,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "xfcc": xfcc(&parts.headers),
        "body": String::from_utf8_lossy(&body),
    });
    let mut response = (status, axum::Json(json)).into_response();
    if let Some((name, value)) = parts
        .headers
        .get("x-echo-response-header")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(':'))
    {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.trim().as_bytes()),
            http::HeaderValue::from_str(value.trim()),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// Serves the echo app on `listener` (HTTP/1.1 and h2c prior knowledge) forever.
///
/// `always`: answer every HTTP request (but `/__…`) with this status (a broken endpoint).
///
/// `delay`: add this much to every HTTP response (a slow endpoint).
pub async fn serve(
    listener: tokio::net::TcpListener,
    name: &str,
    always: Option<u16>,
    delay: Duration,
) -> std::io::Result<()> {
    let app = App {
        name: Arc::from(name),
        requests: Arc::new(AtomicU64::new(0)),
        attempts: Arc::default(),
        always,
        delay,
        started: std::time::Instant::now(),
    };
    let grpc = tonic::service::Routes::new(EchoServer::new(app.clone())).into_axum_router();
    let router = grpc.fallback(move |request: Request| http_echo(app.clone(), request));
    axum::serve(listener, router).await
}
