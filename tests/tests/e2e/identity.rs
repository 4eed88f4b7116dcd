//! Acceptance 2, 3 and 4: inbound handshake refusals (each counted by reason), outbound refusal
//! of a server with the wrong identity, and Certify/Watch refusals at the control plane.

use std::time::Duration;

use meshflow_api::v1::{
    config_client::ConfigClient, identity_client::IdentityClient, watch_request, CertifyRequest,
    Hello, WatchRequest,
};
use meshflow_api::Bootstrap;
use rcgen::{CertificateParams, KeyPair, SanType};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::common::*;

const REQUEST: &[u8] = b"GET /refused HTTP/1.1\r\nHost: backend.default\r\n\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn inbound_refuses_bad_client_handshakes_and_counts_reasons() {
    let t = start_hello();
    let backend = t.mesh.workload("backend").clone();
    let pki = Pki::mesh(&t.state_dir());
    let server_name = identity_dns("backend");
    let tls13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let tls12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    let now = time::OffsetDateTime::now_utc();
    let frontend_id = "spiffe://cluster.local/ns/default/sa/frontend";

    // Positive control: a valid SVID from the mesh CA is served.
    let good = pki.issue(LeafSpec::spiffe(frontend_id));
    match raw_tls(
        &backend.inbound,
        client_config(pki.roots(), Some(good), tls13),
        &server_name,
        REQUEST,
    )
    .await
    {
        RawOutcome::Response(r) => assert!(r.starts_with("HTTP/1.1 200"), "{r}"),
        other => panic!("valid client refused: {other:?}"),
    }
    let served = app_requests(&backend.app).await;

    let cases: Vec<(
        &str,
        Option<Leaf>,
        &[&rustls::SupportedProtocolVersion],
        &str,
    )> = vec![
        (
            "no client certificate",
            None,
            tls13,
            "no_client_certificate",
        ),
        (
            "another CA",
            Some(Pki::foreign().issue(LeafSpec::spiffe(frontend_id))),
            tls13,
            "unknown_ca",
        ),
        (
            "expired",
            Some(pki.issue(LeafSpec {
                not_before: now - time::Duration::hours(2),
                not_after: now - time::Duration::hours(1),
                ..LeafSpec::spiffe(frontend_id)
            })),
            tls13,
            "expired",
        ),
        (
            "not yet valid",
            Some(pki.issue(LeafSpec {
                not_before: now + time::Duration::hours(1),
                not_after: now + time::Duration::hours(2),
                ..LeafSpec::spiffe(frontend_id)
            })),
            tls13,
            "not_yet_valid",
        ),
        (
            "two URI SANs",
            Some(pki.issue(LeafSpec {
                uris: vec![
                    frontend_id.into(),
                    "spiffe://cluster.local/ns/default/sa/admin".into(),
                ],
                ..LeafSpec::spiffe(frontend_id)
            })),
            tls13,
            "bad_identity",
        ),
        (
            "another trust domain",
            Some(pki.issue(LeafSpec::spiffe(
                "spiffe://evil.example/ns/default/sa/frontend",
            ))),
            tls13,
            "bad_identity",
        ),
        (
            "TLS 1.2 only",
            Some(pki.issue(LeafSpec::spiffe(frontend_id))),
            tls12,
            "protocol_version",
        ),
    ];
    for (name, leaf, versions, reason) in cases {
        let before = metric(
            &metrics(&backend.admin).await,
            "meshflow_tls_handshake_errors_total",
            &[("direction", "inbound"), ("reason", reason)],
        );
        let outcome = raw_tls(
            &backend.inbound,
            client_config(pki.roots(), leaf, versions),
            &server_name,
            REQUEST,
        )
        .await;
        assert!(
            !matches!(outcome, RawOutcome::Response(_)),
            "{name}: must be refused, got {outcome:?}"
        );
        let after = metric(
            &metrics(&backend.admin).await,
            "meshflow_tls_handshake_errors_total",
            &[("direction", "inbound"), ("reason", reason)],
        );
        assert_eq!(
            after,
            before + 1.0,
            "{name}: handshake-error metric with reason {reason}"
        );
    }
    assert_eq!(
        app_requests(&backend.app).await,
        served,
        "the app received nothing from refused clients"
    );
}

const WITH_PAYMENT: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: impostor }
spec:
  workloads:
    - name: frontend
      app: { protocol: http1, command: ["meshflow-echo", "--name", "frontend", "--listen", "127.0.0.1:{port}"] }
    - name: backend
      app: { protocol: http1, command: ["meshflow-echo", "--name", "backend", "--listen", "127.0.0.1:{port}"] }
    - name: payment
      app: { protocol: http1 }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn outbound_refuses_a_server_with_another_identity() {
    // payment's endpoint is advertised at backend's inbound listener: the server there chains
    // to the mesh CA but proves `backend`, not `payment`.
    let mut t = start_mesh(WITH_PAYMENT, |o| {
        o.skip_sidecars.insert("default/payment".into());
    });
    let backend = t.mesh.workload("backend").clone();
    let payment_port = t.mesh.app_ports["default/payment"];
    t.mesh
        .spawn_sidecar(
            "default/payment",
            payment_port,
            &["--advertise".into(), backend.inbound.clone()],
        )
        .unwrap();
    t.mesh
        .wait_sidecar("default/payment", payment_port)
        .unwrap();
    let frontend = t.mesh.workload("frontend").clone();
    // Wait until frontend's snapshot lists the (rogue) payment endpoint.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !get_text(&frontend.admin, "/config_dump")
        .await
        .contains(&backend.inbound)
        || !get_text(&frontend.admin, "/config_dump")
            .await
            .contains("sa/payment")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "payment endpoint never reached frontend"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let served = app_requests(&backend.app).await;
    let response = via(&frontend.outbound)
        .get("http://payment.default/charge")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let text = metrics(&frontend.admin).await;
    assert!(
        metric(
            &text,
            "meshflow_tls_handshake_errors_total",
            &[("direction", "outbound"), ("reason", "identity_mismatch")]
        ) >= 1.0,
        "identity mismatch counted:\n{text}"
    );
    let log =
        std::fs::read_to_string(t.state_dir().join("logs/proxy-default-frontend.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("did not prove the expected identity"))
        .expect("refusal logged");
    assert!(
        line.contains("spiffe://cluster.local/ns/default/sa/payment"),
        "log names the expected identity: {line}"
    );
    assert!(
        line.contains("backend.default.serviceaccount.identity.cluster.local"),
        "log names what was presented: {line}"
    );
    assert_eq!(
        app_requests(&backend.app).await,
        served,
        "backend's app got nothing"
    );
}

fn bootstrap(t: &TestMesh, workload: &str) -> Bootstrap {
    let path = t
        .state_dir()
        .join(format!("bootstrap/default_{workload}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn csr(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn control_plane_refuses_unproven_identities() {
    let t = start_hello();
    let frontend = bootstrap(&t, "frontend");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&frontend.trust_bundle_pem))
        .domain_name(frontend.control_plane_server_name.clone());
    let channel = Endpoint::from_shared(format!("https://{}", frontend.control_plane))
        .unwrap()
        .tls_config(tls.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut identity = IdentityClient::new(channel.clone());

    // Positive control.
    let issued = identity
        .certify(CertifyRequest {
            workload: "default/frontend".into(),
            token: frontend.token.clone(),
            csr_pem: csr(vec![]),
        })
        .await
        .expect("own identity is issued")
        .into_inner();
    assert!(issued.cert_chain_pem.contains("BEGIN CERTIFICATE"));

    let other = SanType::URI(
        "spiffe://cluster.local/ns/default/sa/backend"
            .try_into()
            .unwrap(),
    );
    let status = identity
        .certify(CertifyRequest {
            workload: "default/frontend".into(),
            token: frontend.token.clone(),
            csr_pem: csr(vec![other]),
        })
        .await
        .expect_err("CSR for another workload's identity");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    let status = identity
        .certify(CertifyRequest {
            workload: "default/backend".into(),
            token: frontend.token.clone(),
            csr_pem: csr(vec![]),
        })
        .await
        .expect_err("another workload with my token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    let own = SanType::URI(frontend.spiffe_id.as_str().try_into().unwrap());
    let extra = SanType::DnsName("admin.example".try_into().unwrap());
    let status = identity
        .certify(CertifyRequest {
            workload: "default/frontend".into(),
            token: frontend.token.clone(),
            csr_pem: csr(vec![own, extra]),
        })
        .await
        .expect_err("CSR with extra SANs");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // Watch without the workload's SVID.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchRequest {
        kind: Some(watch_request::Kind::Hello(Hello {
            inbound_address: "127.0.0.1:1".into(),
            workload: "default/frontend".into(),
        })),
    })
    .await
    .unwrap();
    let result = ConfigClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let status = result.expect_err("Watch without a client certificate");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    let cp_metrics = metrics(&t.mesh.control_plane_admin).await;
    assert!(
        metric(
            &cp_metrics,
            "meshflow_certify_refused_total",
            &[("reason", "unproven_san")]
        ) >= 2.0,
        "{cp_metrics}"
    );
    assert!(
        metric(
            &cp_metrics,
            "meshflow_certify_refused_total",
            &[("reason", "bad_token")]
        ) >= 1.0
    );
    assert!(
        metric(
            &cp_metrics,
            "meshflow_watch_refused_total",
            &[("reason", "no_client_certificate")]
        ) >= 1.0
    );
}
