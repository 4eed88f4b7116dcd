//! Issue 12, item 5: who may drive the workflow API. A local process that sets
//! `x-forwarded-client-cert` (or guesses the sidecar's header) gets 401; the bearer token still
//! works; a mesh workload reaches the API through the coordinator's sidecar, which vouches for
//! it and applies the coordinator's AuthorizationPolicy.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;
use crate::workflow::{Api, SHOP_MESH, SHOP_POLICIES};

const COORDINATOR_ONLY_FROM_INVENTORY: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: api-callers, namespace: meshflow-system }
spec:
  selector: { matchLabels: {} }
  action: ALLOW
  rules:
  - from: [{ source: { principals: ["cluster.local/ns/default/sa/inventory"] } }]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn only_the_coordinators_sidecar_vouches_for_workflow_api_callers() {
    let t = start_dir(SHOP_MESH, SHOP_POLICIES, |_| {});
    let api = Api::new(&t);
    let direct = reqwest::Client::new();
    let forged_xfcc = "By=spiffe://cluster.local/ns/meshflow-system/sa/coordinator;URI=spiffe://cluster.local/ns/default/sa/inventory";
    let forgeries: [&[(&str, &str)]; 4] = [
        &[("x-forwarded-client-cert", "x")],
        &[("x-forwarded-client-cert", forged_xfcc)],
        &[
            ("x-forwarded-client-cert", forged_xfcc),
            ("x-meshflow-sidecar-auth", "guess"),
        ],
        &[("x-meshflow-sidecar-auth", "")],
    ];
    for headers in forgeries {
        for (method, path) in [
            ("GET", "/v1/runs"),
            ("POST", "/v1/runs"),
            ("GET", "/v1/workflows"),
        ] {
            let mut request = match method {
                "GET" => direct.get(format!("{}{path}", api.base)),
                _ => direct
                    .post(format!("{}{path}", api.base))
                    .json(&json!({"workflow": "default/place-order"})),
            };
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.status(),
                401,
                "{method} {path} with {headers:?} from a local process"
            );
        }
    }

    // The token (what the CLI's --token-file sends) still works.
    let (status, _) = api.get("/v1/runs").await;
    assert_eq!(status, 200);

    // The secret lives only in the coordinator's bootstrap and its own file, mode 0600.
    let state = t.state_dir();
    let secret = std::fs::read_to_string(state.join("workflow-sidecar-secret")).unwrap();
    assert!(secret.trim().len() >= 32);
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&state.join("workflow-sidecar-secret")), 0o600);
    for entry in std::fs::read_dir(state.join("bootstrap")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let is_coordinator = path.ends_with("meshflow-system_coordinator.json");
        assert_eq!(
            text.contains(secret.trim()),
            is_coordinator,
            "{}",
            path.display()
        );
        assert_eq!(mode(&path), 0o600);
    }

    // A mesh workload, through its outbound and the coordinator's sidecar, while no ALLOW
    // policy selects the coordinator: vouched for, but denied by default (any SVID holder
    // would otherwise drive runs whose calls carry the coordinator's identity).
    let inventory = t.mesh.workload("default/inventory").clone();
    let shipping = t.mesh.workload("default/shipping").clone();
    for (caller, path) in [(&inventory, "/v1/workflows"), (&shipping, "/v1/runs")] {
        let response = via(&caller.outbound)
            .get(format!("http://coordinator.meshflow-system{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{path}");
        assert!(response.text().await.unwrap().contains("denied by default"));
    }

    // Which callers: AuthorizationPolicy on the coordinator workload, at its sidecar. A header
    // an allowed caller forges itself is stripped on the way.
    t.write_policy_file("api-callers.yaml", COORDINATOR_ONLY_FROM_INVENTORY);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = via(&inventory.outbound)
            .get("http://coordinator.meshflow-system/v1/runs")
            .send()
            .await
            .unwrap()
            .status();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "policy never applied: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let response = via(&inventory.outbound)
        .get("http://coordinator.meshflow-system/v1/workflows")
        .header("x-meshflow-sidecar-auth", "guess")
        .header("x-forwarded-client-cert", forged_xfcc)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    // Another workload: refused by the coordinator's sidecar.
    let response = via(&shipping.outbound)
        .get("http://coordinator.meshflow-system/v1/runs")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
}
