//! Example echo app: HTTP/1.1 and h2c JSON echo plus a gRPC `Echo` service on one port.
//!
//! HTTP: every path answers JSON `{service, method, path, headers, body, xfcc}`;
//! `/status/<code>` answers that status; `/__stats` answers `{"requests": N}` (requests seen,
//! itself excluded), so tests can prove a request never reached the app.
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
        let message = request.into_inner().message;
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
    (status, axum::Json(json)).into_response()
}

/// Serves the echo app on `listener` (HTTP/1.1 and h2c prior knowledge) forever.
pub async fn serve(listener: tokio::net::TcpListener, name: &str) -> std::io::Result<()> {
    let app = App {
        name: Arc::from(name),
        requests: Arc::new(AtomicU64::new(0)),
    };
    let grpc = tonic::service::Routes::new(EchoServer::new(app.clone())).into_axum_router();
    let router = grpc.fallback(move |request: Request| http_echo(app.clone(), request));
    axum::serve(listener, router).await
}
