use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::review::{Admission, FailureMode, NamespaceLabels, Verdict};
use super::server::{self, CertSlot, InjectorMetrics, Webhook, MAX_BODY};
use crate::ca::CertificateAuthority;
use meshflow_policies::inject::{self, InjectSettings};

/// Namespaces `shop` (injection enabled), `plain` (not), and `broken` (unreadable).
struct Namespaces;

#[async_trait]
impl NamespaceLabels for Namespaces {
    async fn labels(&self, name: &str) -> Result<BTreeMap<String, String>, String> {
        match name {
            "shop" => Ok(BTreeMap::from([(
                inject::INJECT.to_string(),
                inject::ENABLED.to_string(),
            )])),
            "plain" => Ok(BTreeMap::new()),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(BTreeMap::new())
            }
            other => Err(format!("namespaces \"{other}\" is forbidden")),
        }
    }
}

fn admission(failure_mode: FailureMode) -> Admission {
    Admission {
        settings: InjectSettings::default(),
        native_sidecar: false,
        failure_mode,
    }
}

fn pod(namespace: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "web", "namespace": namespace },
        "spec": { "containers": [{
            "name": "app", "image": "web:1",
            "ports": [{ "containerPort": 8080 }],
            "readinessProbe": { "httpGet": { "path": "/ready", "port": 8080 } }
        }]}
    })
}

fn review(api_version: &str, namespace: &str, object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "request": {
            "uid": "0b8c6c0e-6c43-4b0f-9a55-4d1f2c3b4a5e",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "name": "web",
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": { "username": "alice" },
            "object": object,
            "oldObject": null,
            "dryRun": false
        }
    }))
    .unwrap()
}

async fn answer(admission: &Admission, body: &[u8]) -> (u16, Value, Verdict) {
    let reply = admission.review(body, &Namespaces).await;
    let value = if reply.status == 200 {
        serde_json::from_slice(&reply.body).unwrap()
    } else {
        Value::String(String::from_utf8(reply.body).unwrap())
    };
    (reply.status, value, reply.verdict)
}

fn patch_of(response: &Value) -> Value {
    let encoded = response["response"]["patch"].as_str().expect("a patch");
    serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_pod_in_an_enabled_namespace_is_answered_with_the_injection_patch_in_either_version() {
    for version in ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"] {
        let (status, injected, verdict) = answer(
            &admission(FailureMode::Deny),
            &review(version, "shop", pod("shop")),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(verdict, Verdict::Injected);
        assert_eq!(injected["apiVersion"], version, "the review's own version");
        assert_eq!(injected["kind"], "AdmissionReview");
        let response = &injected["response"];
        assert_eq!(response["uid"], "0b8c6c0e-6c43-4b0f-9a55-4d1f2c3b4a5e");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        // The patch is the pure function's.
        let expected = inject::inject(
            &serde_json::from_value(pod("shop")).unwrap(),
            &BTreeMap::from([(inject::INJECT.into(), inject::ENABLED.into())]),
            &InjectSettings::default(),
            false,
        )
        .unwrap()
        .patch;
        assert_eq!(
            patch_of(&injected),
            serde_json::to_value(&expected).unwrap()
        );
    }
}

#[tokio::test]
async fn pods_not_to_inject_are_admitted_untouched() {
    let deny = admission(FailureMode::Deny);
    let injected = inject::inject(
        &serde_json::from_value(pod("shop")).unwrap(),
        &BTreeMap::from([(inject::INJECT.into(), inject::ENABLED.into())]),
        &InjectSettings::default(),
        false,
    )
    .unwrap()
    .pod;
    let mut opted_out = pod("shop");
    opted_out["metadata"]["annotations"] = json!({ inject::INJECT: inject::DISABLED });
    let mut update =
        serde_json::from_slice::<Value>(&review("admission.k8s.io/v1", "shop", pod("shop")))
            .unwrap();
    update["request"]["operation"] = json!("UPDATE");
    let mut service = serde_json::from_slice::<Value>(&review(
        "admission.k8s.io/v1",
        "shop",
        json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "name": "web" } }),
    ))
    .unwrap();
    service["request"]["kind"]["kind"] = json!("Service");
    for (what, body) in [
        (
            "other namespace",
            review("admission.k8s.io/v1", "plain", pod("plain")),
        ),
        (
            "opted out",
            review("admission.k8s.io/v1", "shop", opted_out),
        ),
        (
            "injected already",
            review(
                "admission.k8s.io/v1",
                "shop",
                serde_json::to_value(&injected).unwrap(),
            ),
        ),
        ("an update", serde_json::to_vec(&update).unwrap()),
        ("not a pod", serde_json::to_vec(&service).unwrap()),
    ] {
        let (status, admitted, verdict) = answer(&deny, &body).await;
        assert_eq!(status, 200, "{what}");
        assert_eq!(verdict, Verdict::Skipped, "{what}");
        assert_eq!(admitted["response"]["allowed"], true, "{what}");
        assert!(
            admitted["response"]["patch"].is_null(),
            "{what}: {admitted}"
        );
    }
}

#[tokio::test]
async fn a_pod_that_cannot_be_injected_is_denied_naming_why_or_admitted_per_the_failure_mode() {
    let mut bad = pod("shop");
    bad["metadata"]["annotations"] = json!({ inject::PROXY_CPU_REQUEST: "lots" });
    let containers: Vec<Value> = (0..1000)
        .map(|i| json!({ "name": format!("c{i}"), "image": "x" }))
        .collect();
    let mut crowded = pod("shop");
    crowded["spec"]["containers"] = json!(containers);
    let mut mistyped = pod("shop");
    mistyped["spec"]["containers"][0]["ports"][0]["containerPort"] = json!("eighty");
    for (body, expect) in [
        (
            review("admission.k8s.io/v1", "shop", bad),
            "metadata.annotations[\"meshflow.io/proxy-cpu-request\"]: \"lots\" is not a Kubernetes quantity",
        ),
        (
            review("admission.k8s.io/v1", "shop", crowded),
            "the pod has 1000 containers",
        ),
        (
            review("admission.k8s.io/v1", "shop", mistyped),
            "spec.containers[0].ports[0].containerPort",
        ),
        (
            review("admission.k8s.io/v1", "secret", pod("secret")),
            "cannot read namespace secret: namespaces \"secret\" is forbidden",
        ),
    ] {
        let (status, denied, verdict) = answer(&admission(FailureMode::Deny), &body).await;
        assert_eq!((status, verdict), (200, Verdict::Denied), "{denied}");
        let response = &denied["response"];
        assert_eq!(response["allowed"], false);
        let message = response["status"]["message"].as_str().unwrap();
        assert!(message.contains(expect), "{message}");
        assert!(
            message.starts_with("meshflow: cannot inject the sidecar into pod "),
            "{message}"
        );
        assert!(response["patch"].is_null());

        let (status, admitted, verdict) = answer(&admission(FailureMode::Allow), &body).await;
        assert_eq!((status, verdict), (200, Verdict::Uninjected), "{admitted}");
        assert_eq!(admitted["response"]["allowed"], true);
        assert!(admitted["response"]["patch"].is_null());
        let warning = admitted["response"]["warnings"][0].as_str().unwrap();
        assert!(warning.contains("admitted without a sidecar"), "{warning}");
    }
}

#[tokio::test]
async fn what_is_no_admission_review_gets_a_400() {
    let nested = "[".repeat(100_000) + &"]".repeat(100_000);
    let deep = format!(
        "{{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\
         \"request\":{{\"uid\":\"u\",\"object\":{{\"spec\":{nested}}}}}}}"
    );
    let mut no_request =
        serde_json::from_slice::<Value>(&review("admission.k8s.io/v1", "shop", pod("shop")))
            .unwrap();
    no_request.as_object_mut().unwrap().remove("request");
    let mut wrong_kind = no_request.clone();
    wrong_kind["request"] = json!({});
    wrong_kind["apiVersion"] = json!("v1");
    for (what, body, expect) in [
        ("malformed", b"{\"apiVersion\": ".to_vec(), "EOF"),
        ("deep", deep.into_bytes(), "recursion limit exceeded"),
        ("deep, bare", nested.into_bytes(), "not an AdmissionReview"),
        (
            "no request",
            serde_json::to_vec(&no_request).unwrap(),
            "without a request",
        ),
        (
            "not a review",
            serde_json::to_vec(&wrong_kind).unwrap(),
            "not an AdmissionReview",
        ),
    ] {
        let (status, answer, verdict) = answer(&admission(FailureMode::Deny), &body).await;
        assert_eq!((status, verdict), (400, Verdict::Error), "{what}: {answer}");
        assert!(
            answer.as_str().unwrap().contains(expect),
            "{what}: {answer}"
        );
    }
}

/// A webhook on 127.0.0.1:0 with a certificate from a fresh mesh CA; returns its address and
/// a TLS connector trusting that CA.
async fn serve(
    timeout: Duration,
) -> (
    std::net::SocketAddr,
    tokio_rustls::TlsConnector,
    prometheus::Registry,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_generate(
        dir.path(),
        "cluster.local",
        Duration::from_secs(3600),
    )
    .unwrap();
    let (chain, key, _) = ca
        .issue_webhook_cert(&["127.0.0.1".into()], Duration::from_secs(3600))
        .unwrap();
    let slot = CertSlot::new(server::certified_key(chain.as_bytes(), key.as_bytes()).unwrap());
    let tls = server::tls_config(slot).unwrap();
    let registry = prometheus::Registry::new();
    let webhook = Arc::new(Webhook {
        admission: admission(FailureMode::Deny),
        namespaces: Arc::new(Namespaces),
        metrics: InjectorMetrics::new(&registry).unwrap(),
        timeout,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::serve(listener, tls, webhook));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.trust_bundle_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (
        addr,
        tokio_rustls::TlsConnector::from(Arc::new(client)),
        registry,
    )
}

/// Sends `head` and then `body` (in 64 KiB writes, ignoring write errors: the server may
/// answer and close before all of it is read) while reading the answer; returns its status
/// and body.
async fn send(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    head: String,
    body: Vec<u8>,
    pause: Duration,
) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = connector.connect(name, tcp).await.unwrap();
    let (mut read, mut write) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        tokio::time::sleep(pause).await;
        for chunk in body.chunks(64 * 1024) {
            write.write_all(chunk).await?;
        }
        write.flush().await
    });
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut response)).await;
    writer.abort();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn post(length: Option<usize>) -> String {
    match length {
        Some(n) => format!(
            "POST /inject HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {n}\r\nconnection: close\r\n\r\n"
        ),
        None => "POST /inject HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".into(),
    }
}

fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in body.chunks(1 << 20) {
        out.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend(chunk);
        out.extend(b"\r\n");
    }
    out.extend(b"0\r\n\r\n");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_bounds_size_and_time_and_serves_the_next_request() {
    let (addr, connector, registry) = serve(Duration::from_millis(500)).await;
    let normal = review("admission.k8s.io/v1", "shop", pod("shop"));
    let big = vec![b' '; 64 << 20];
    let cases: Vec<(&str, String, Vec<u8>, Duration, u16)> = vec![
        (
            "64 MB with a length",
            post(Some(big.len())),
            big.clone(),
            Duration::ZERO,
            413,
        ),
        (
            "64 MB chunked",
            post(None),
            chunked(&big),
            Duration::ZERO,
            413,
        ),
        (
            "a slow body",
            post(Some(normal.len())),
            normal.clone(),
            Duration::from_secs(2),
            408,
        ),
        (
            "an empty body",
            post(Some(0)),
            Vec::new(),
            Duration::ZERO,
            400,
        ),
    ];
    for (what, head, body, pause, expect) in cases {
        let started = Instant::now();
        let (status, text) = send(addr, &connector, head, body, pause).await;
        assert_eq!(status, expect, "{what}: {text}");
        assert!(
            started.elapsed() < Duration::from_secs(2) + pause,
            "{what}: {:?}",
            started.elapsed()
        );
    }
    let slow = review("admission.k8s.io/v1", "slow", pod("slow"));
    let (status, text) = send(
        addr,
        &connector,
        post(Some(slow.len())),
        slow,
        Duration::ZERO,
    )
    .await;
    assert_eq!(status, 503, "{text}");
    let (status, text) = send(
        addr,
        &connector,
        "GET /inject HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".into(),
        Vec::new(),
        Duration::ZERO,
    )
    .await;
    assert_eq!(status, 405, "{text}");
    // And the next normal request is served.
    let (status, text) = send(
        addr,
        &connector,
        post(Some(normal.len())),
        normal,
        Duration::ZERO,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let counted = |result: &str| {
        registry
            .gather()
            .iter()
            .find(|f| f.name() == "meshflow_injector_requests_total")
            .and_then(|f| {
                f.get_metric()
                    .iter()
                    .find(|m| m.get_label().iter().any(|l| l.value() == result))
                    .map(|m| m.get_counter().get_value())
            })
            .unwrap_or(0.0)
    };
    assert_eq!(counted("injected"), 1.0);
    assert_eq!(counted("error"), 5.0);
    const { assert!(MAX_BODY < 64 << 20) };
}
