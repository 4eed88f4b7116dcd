//! Acceptance 7, on both listeners: request smuggling shapes → 400 and never reach the app;
//! `Connection` nominating the XFCC header cannot remove the proxy's own; 100 KB header → 431.

use crate::common::*;

enum Listener {
    Inbound,
    Outbound,
}

async fn send(t: &TestMesh, listener: &Listener, request: &[u8]) -> RawOutcome {
    match listener {
        Listener::Outbound => raw_tcp(&t.mesh.workload("frontend").outbound, request).await,
        Listener::Inbound => {
            let pki = Pki::mesh(&t.state_dir());
            let leaf = pki.issue(LeafSpec::spiffe(
                "spiffe://cluster.local/ns/default/sa/frontend",
            ));
            let config = client_config(pki.roots(), Some(leaf), &[&rustls::version::TLS13]);
            raw_tls(
                &t.mesh.workload("backend").inbound,
                config,
                &identity_dns("backend"),
                request,
            )
            .await
        }
    }
}

fn status_line(outcome: &RawOutcome) -> String {
    match outcome {
        RawOutcome::Response(r) => r.lines().next().unwrap_or_default().to_string(),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn both_listeners_refuse_smuggling_and_keep_their_own_headers() {
    let t = start_hello();
    let backend_app = t.mesh.workload("backend").app.clone();
    for listener in [Listener::Outbound, Listener::Inbound] {
        let which = match listener {
            Listener::Inbound => "inbound",
            Listener::Outbound => "outbound",
        };
        let served = app_requests(&backend_app).await;
        for (name, request) in [
            (
                "CL+TE",
                "POST /smuggle HTTP/1.1\r\nHost: backend.default\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ),
            (
                "differing duplicate Content-Length",
                "POST /smuggle HTTP/1.1\r\nHost: backend.default\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            ),
            (
                "unknown Transfer-Encoding",
                "POST /smuggle HTTP/1.1\r\nHost: backend.default\r\nTransfer-Encoding: identity\r\n\r\nhello",
            ),
            (
                "non-final chunked",
                "POST /smuggle HTTP/1.1\r\nHost: backend.default\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
            ),
        ] {
            let outcome = send(&t, &listener, request.as_bytes()).await;
            assert!(status_line(&outcome).starts_with("HTTP/1.1 400"), "{which} {name}: {outcome:?}");
        }
        assert_eq!(
            app_requests(&backend_app).await,
            served,
            "{which}: smuggling attempts never reach the app"
        );

        let outcome = send(
            &t,
            &listener,
            b"GET /nominated HTTP/1.1\r\nHost: backend.default\r\nConnection: close, x-forwarded-client-cert\r\nX-Forwarded-Client-Cert: By=evil;URI=spiffe://cluster.local/ns/default/sa/admin\r\nx-forwarded-client-cert: forged\r\n\r\n",
        )
        .await;
        let RawOutcome::Response(response) = &outcome else {
            panic!("{which}: nominated request not served: {outcome:?}")
        };
        assert!(response.starts_with("HTTP/1.1 200"), "{which}: {response}");
        let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
        let json: serde_json::Value =
            serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{which}: {e}: {body}"));
        assert_eq!(
            json["xfcc"],
            serde_json::json!(["By=spiffe://cluster.local/ns/default/sa/backend;URI=spiffe://cluster.local/ns/default/sa/frontend"]),
            "{which}: exactly one XFCC, the proxy's"
        );

        let big = format!(
            "GET /big HTTP/1.1\r\nHost: backend.default\r\nX-Big: {}\r\n\r\n",
            "a".repeat(100 * 1024)
        );
        let outcome = send(&t, &listener, big.as_bytes()).await;
        assert!(
            status_line(&outcome).starts_with("HTTP/1.1 431"),
            "{which} 100 KB header: {outcome:?}"
        );
    }
}
