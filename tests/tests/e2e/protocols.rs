//! Acceptance 1 and 9: calls through two sidecars over HTTP/1.1, HTTP/2 and gRPC with trailers;
//! exactly one XFCC; `meshflow up --smoke`; `promtool check metrics` on every admin endpoint.

use std::time::Duration;

use meshflow_example_echo::pb::{echo_client::EchoClient, EchoReply, EchoRequest, StreamRequest};
use tonic::transport::Endpoint;

use crate::common::*;

const CALLER: &str = "spiffe://cluster.local/ns/default/sa/frontend";
const BACKEND: &str = "spiffe://cluster.local/ns/default/sa/backend";

fn assert_one_xfcc(json: &serde_json::Value) {
    let xfcc: Vec<&str> = json["xfcc"]
        .as_array()
        .expect("xfcc array")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        xfcc,
        vec![format!("By={BACKEND};URI={CALLER}")],
        "app must see exactly the proxy's XFCC: {json}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_http2_and_grpc_through_two_sidecars() {
    let t = start_hello();
    let frontend = t.mesh.workload("frontend").clone();

    // HTTP/1.1 with several forged XFCC headers in mixed case, Host routing.
    let client = reqwest::Client::builder().http1_only().build().unwrap();
    let response = client
        .post(format!("http://{}/orders?id=7", frontend.outbound))
        .header("host", "backend.default")
        .header(
            "X-Forwarded-Client-Cert",
            "By=spiffe://evil;URI=spiffe://cluster.local/ns/default/sa/admin",
        )
        .header(
            "x-forwarded-client-cert",
            "URI=spiffe://cluster.local/ns/kube-system/sa/root",
        )
        .header("X-FORWARDED-CLIENT-CERT", "forged")
        .body("hello body")
        .send()
        .await
        .expect("HTTP/1.1 call");
    assert_eq!(response.status(), 200);
    let json: serde_json::Value = response.json().await.unwrap();
    assert_eq!(json["service"], "backend");
    assert_eq!(json["path"], "/orders?id=7");
    assert_eq!(json["body"], "hello body");
    assert_one_xfcc(&json);

    // Absolute-form request target (HTTP_PROXY style), svc.cluster.local suffix and a port.
    let response = via(&frontend.outbound)
        .get("http://backend.default.svc.cluster.local:8080/abs")
        .header("x-forwarded-client-cert", "forged")
        .send()
        .await
        .expect("absolute-form call");
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "absolute-form: {text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["path"], "/abs");
    assert_one_xfcc(&json);

    // HTTP/2 (h2c prior knowledge) from the app.
    // RFC 9113 §8.3.1: :authority is what routes an HTTP/2 request.
    let outbound_addr: std::net::SocketAddr = frontend.outbound.parse().unwrap();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve("backend.default", outbound_addr)
        .build()
        .unwrap();
    let response = h2
        .get(format!(
            "http://backend.default:{}/h2",
            outbound_addr.port()
        ))
        .header("x-forwarded-client-cert", "forged")
        .send()
        .await
        .expect("h2c call");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let json: serde_json::Value = response.json().await.unwrap();
    assert_one_xfcc(&json);

    // gRPC: unary with a custom trailer, an error status, server-streaming, bidi.
    let channel = Endpoint::from_shared(format!("http://{}", frontend.outbound))
        .unwrap()
        .origin("http://backend.default".parse().unwrap())
        .connect()
        .await
        .expect("gRPC channel");
    let mut echo = EchoClient::new(channel);
    let mut request = tonic::Request::new(EchoRequest {
        message: "ping".into(),
    });
    request
        .metadata_mut()
        .insert("x-forwarded-client-cert", "forged".parse().unwrap());
    let reply = echo.unary(request).await.expect("unary");
    assert_eq!(
        reply
            .metadata()
            .get("x-echo-trailer")
            .map(|v| v.to_str().unwrap()),
        Some("done"),
        "custom trailer"
    );
    let reply = reply.into_inner();
    assert_eq!(reply.message, "ping");
    assert_eq!(reply.xfcc, vec![format!("By={BACKEND};URI={CALLER}")]);

    let status = echo
        .unary(EchoRequest {
            message: "fail:14".into(),
        })
        .await
        .expect_err("status");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(
        status.message(),
        "requested failure fail:14",
        "grpc-message intact"
    );

    let mut stream = echo
        .server_stream(StreamRequest {
            message: "s".into(),
            count: 5,
            interval_ms: 20,
        })
        .await
        .expect("server stream")
        .into_inner();
    let mut sequences = Vec::new();
    while let Some(reply) = stream.message().await.expect("stream message") {
        sequences.push(reply.sequence);
    }
    assert_eq!(sequences, vec![1, 2, 3, 4, 5]);
    let trailers = stream.trailers().await.expect("trailers");
    assert!(trailers.is_some(), "server stream ends with trailers");

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = echo
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi")
        .into_inner();
    for i in 0..3 {
        tx.send(EchoRequest {
            message: format!("m{i}"),
        })
        .await
        .unwrap();
        let reply = next_bidi_reply(&mut replies, "bidi reply").await;
        assert_eq!(reply.message, format!("m{i}"));
        assert_eq!(reply.sequence, i + 1);
    }
    drop(tx);
    assert!(replies.message().await.expect("clean end").is_none());

    // Bidi again with messages that take several HTTP/2 DATA frames of 256 bytes or more in one
    // write round: a 64 KiB message (four 16 KiB frames), then three 4 KiB messages sent before
    // any reply is read. To take each such frame after the first, the patched h2
    // (third_party/) writes the waiting one out without flushing and flushes at the end of the
    // round; the inbound sidecar's socket buffers up to 16 KiB below TLS. A reply held in
    // either buffer without a flush would not arrive in time.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = echo
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi with large messages")
        .into_inner();
    let large = "L".repeat(64 * 1024);
    tx.send(EchoRequest {
        message: large.clone(),
    })
    .await
    .unwrap();
    let reply = next_bidi_reply(&mut replies, "64 KiB bidi reply").await;
    assert_eq!(reply.message, large);
    assert_eq!(reply.sequence, 1);
    let messages: Vec<String> = (0..3).map(|i| format!("{i}").repeat(4096)).collect();
    for message in &messages {
        tx.send(EchoRequest {
            message: message.clone(),
        })
        .await
        .unwrap();
    }
    for (i, message) in messages.iter().enumerate() {
        let reply = next_bidi_reply(&mut replies, "4 KiB bidi reply").await;
        assert_eq!(&reply.message, message);
        assert_eq!(reply.sequence, i as u32 + 2);
    }
    drop(tx);
    assert!(replies.message().await.expect("clean end").is_none());

    // Unknown service → 503 with a clear body.
    let response = client
        .get(format!("http://{}/", frontend.outbound))
        .header("host", "nosuch.default")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("unknown service nosuch.default"));
}

#[tokio::test(flavor = "multi_thread")]
async fn up_smoke_and_promtool_clean_metrics() {
    // `meshflow up --smoke` on the shipped example, exactly as the README runs it.
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let meshflow = meshflow_cli::supervisor::find_program("meshflow");
    let output = tokio::process::Command::new(&meshflow)
        .args(["up", "-f", "examples/hello/mesh.yaml", "--smoke"])
        .current_dir(repo)
        .output()
        .await
        .expect("run meshflow up --smoke");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "meshflow up --smoke failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("the backend saw the caller as {CALLER}")),
        "{stdout}"
    );

    // promtool on each admin endpoint after traffic.
    let t = start_hello();
    let frontend = t.mesh.workload("frontend").clone();
    for _ in 0..5 {
        let response = via(&frontend.outbound)
            .get("http://backend.default/x")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let _ = via(&frontend.outbound)
        .get("http://nosuch.default/x")
        .send()
        .await
        .unwrap();
    let mut admins: Vec<String> = t.mesh.workloads.values().map(|w| w.admin.clone()).collect();
    admins.push(t.mesh.control_plane_admin.clone());
    for admin in admins {
        let text = metrics(&admin).await;
        assert!(
            text.contains("meshflow_"),
            "{admin} exposes meshflow metrics"
        );
        promtool_check(&admin, &text).await;
    }
    let backend_metrics = metrics(&t.mesh.workload("backend").admin).await;
    assert!(
        metric(
            &backend_metrics,
            "meshflow_requests_total",
            &[("direction", "inbound"), ("status_code", "200")]
        ) >= 5.0
    );
}

/// The next reply of a bidi stream, within 5 s: a reply a proxy holds in a buffer without
/// flushing it never comes. Panics, naming `what`, on a timeout, an error or the stream's end.
async fn next_bidi_reply(replies: &mut tonic::Streaming<EchoReply>, what: &str) -> EchoReply {
    match tokio::time::timeout(Duration::from_secs(5), replies.message()).await {
        Err(_) => panic!("{what}: not within 5 s"),
        Ok(Err(status)) => panic!("{what}: {status}"),
        Ok(Ok(None)) => panic!("{what}: the stream closed"),
        Ok(Ok(Some(reply))) => reply,
    }
}
