use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;

fn enabled() -> BTreeMap<String, String> {
    BTreeMap::from([(INJECT.to_string(), ENABLED.to_string())])
}

fn pod(value: Value) -> Pod {
    serde_json::from_value(value).unwrap()
}

/// A web pod: one app container with an HTTP liveness probe on a named port, a TCP readiness
/// probe, an exec startup probe.
fn web() -> Pod {
    pod(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "web", "namespace": "shop", "labels": { "app": "web" } },
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "app", "image": "web:1",
                "ports": [{ "name": "http", "containerPort": 8080 }],
                "livenessProbe": {
                    "httpGet": { "path": "/healthz", "port": "http",
                                 "httpHeaders": [{ "name": "x-probe", "value": "1" }] },
                    "periodSeconds": 7, "timeoutSeconds": 3, "failureThreshold": 4
                },
                "readinessProbe": { "tcpSocket": { "port": 8080 } },
                "startupProbe": { "exec": { "command": ["true"] } }
            }]
        }
    }))
}

fn json_of(pod: &Pod) -> Value {
    serde_json::to_value(pod).unwrap()
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {list}"))
}

fn env_value<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name}"))
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|a| a.iter().map(|c| c["name"].as_str().unwrap()).collect())
        .unwrap_or_default()
}

/// The patch applied to the pod's JSON gives the returned pod.
fn assert_patch_gives_pod(before: &Pod, injection: &Injection) {
    let mut doc = json_of(before);
    json_patch::patch(&mut doc, &injection.patch).unwrap();
    assert_eq!(doc, json_of(&injection.pod));
}

#[test]
fn classic_injection_puts_the_proxy_first_and_holds_the_app_until_it_is_ready() {
    let settings = InjectSettings::default();
    let before = web();
    let injected = inject(&before, &enabled(), &settings, false).unwrap();
    assert_eq!(injected.outcome, Outcome::Injected);
    assert_patch_gives_pod(&before, &injected);
    let doc = json_of(&injected.pod);
    let spec = &doc["spec"];
    assert_eq!(names(&spec["containers"]), ["meshflow-proxy", "app"]);
    assert_eq!(names(&spec["initContainers"]), ["meshflow-init"]);

    let proxy = &spec["containers"][0];
    assert_eq!(proxy["image"], DEFAULT_PROXY_IMAGE);
    assert!(proxy["restartPolicy"].is_null());
    assert_eq!(
        proxy["lifecycle"]["postStart"]["exec"]["command"],
        json!([
            "meshflow-proxy",
            "wait-ready",
            "--admin",
            "127.0.0.1:15020",
            "--timeout",
            "120s"
        ])
    );
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["readinessProbe"]["httpGet"]["port"], 15020);
    let sc = &proxy["securityContext"];
    assert_eq!(sc["runAsUser"], 2102);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"], json!({ "drop": ["ALL"] }));
    assert_eq!(
        proxy["resources"],
        json!({ "requests": { "cpu": "100m", "memory": "64Mi" }, "limits": { "memory": "256Mi" } })
    );
    // No CPU limit: the proxy's own default worker count (one per listener).
    assert!(proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["name"] != "MESHFLOW_THREADS"));
    // The bootstrap, from env.
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_IP", "status.podIP"),
        ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        (
            "MESHFLOW_APP_PROBES",
            "metadata.annotations['meshflow.io/app-probes']",
        ),
    ] {
        assert_eq!(
            env_value(proxy, name)["valueFrom"]["fieldRef"]["fieldPath"],
            field
        );
    }
    for (name, value) in [
        ("MESHFLOW_WORKLOAD", "$(POD_NAMESPACE)/$(POD_NAME)"),
        (
            "MESHFLOW_SPIFFE_ID",
            "spiffe://cluster.local/ns/$(POD_NAMESPACE)/sa/$(SERVICE_ACCOUNT)",
        ),
        (
            "MESHFLOW_CONTROL_PLANE",
            "meshflow-control-plane.meshflow-system.svc:15012",
        ),
        (
            "MESHFLOW_CONTROL_PLANE_SERVER_NAME",
            "meshflow-control-plane.meshflow-system.serviceaccount.identity.cluster.local",
        ),
        (
            "MESHFLOW_TRUST_BUNDLE_FILE",
            "/var/run/meshflow/trust-bundle/ca.crt",
        ),
        (
            "MESHFLOW_TOKEN_FILE",
            "/var/run/secrets/meshflow.io/serviceaccount/token",
        ),
        ("MESHFLOW_INBOUND", "0.0.0.0:15006"),
        ("MESHFLOW_OUTBOUND", "127.0.0.1:15001"),
        ("MESHFLOW_ADMIN", "0.0.0.0:15020"),
        ("MESHFLOW_APP_PORT", "8080"),
        ("MESHFLOW_APP_PROTOCOL", "http1"),
    ] {
        assert_eq!(env_value(proxy, name)["value"], value, "{name}");
    }
    // `$(VAR)` expands only variables defined before it.
    let order: Vec<&str> = names(&proxy["env"]);
    let at = |n: &str| order.iter().position(|x| *x == n).unwrap();
    assert!(at("POD_NAMESPACE") < at("MESHFLOW_WORKLOAD"));
    assert!(at("SERVICE_ACCOUNT") < at("MESHFLOW_SPIFFE_ID"));

    // Token and trust bundle mounted into the proxy.
    let volumes = &spec["volumes"];
    assert_eq!(
        container(volumes, TOKEN_VOLUME)["projected"]["sources"][0]["serviceAccountToken"],
        json!({ "audience": "meshflow", "expirationSeconds": 3600, "path": "token" })
    );
    assert_eq!(
        container(volumes, TRUST_BUNDLE_VOLUME)["configMap"]["name"],
        "meshflow-trust-bundle"
    );
    let mounts: Vec<(&str, &str)> = proxy["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap(),
                m["mountPath"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        mounts,
        [
            (TOKEN_VOLUME, TOKEN_DIR),
            (TRUST_BUNDLE_VOLUME, TRUST_BUNDLE_DIR)
        ]
    );

    // The init container: root only there, NET_ADMIN + NET_RAW only.
    let init = &spec["initContainers"][0];
    assert_eq!(
        init["args"],
        json!([
            "init",
            "--proxy-uid",
            "2102",
            "--inbound-port",
            "15006",
            "--outbound-port",
            "15001",
            "--admin-port",
            "15020"
        ])
    );
    let sc = &init["securityContext"];
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["runAsNonRoot"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(
        sc["capabilities"],
        json!({ "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] })
    );

    let annotations = &doc["metadata"]["annotations"];
    assert_eq!(annotations[INJECTED], VERSION);
    assert_eq!(annotations[INBOUND_PORT], "15006");

    // Injecting the injected pod changes nothing.
    let again = inject(&injected.pod, &enabled(), &settings, false).unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyInjected);
    assert!(again.patch.0.is_empty());
    assert_eq!(json_of(&again.pod), doc);
}

#[test]
fn probes_point_at_the_admin_port_and_the_originals_are_kept_in_the_annotation() {
    let injected = inject(&web(), &enabled(), &InjectSettings::default(), false).unwrap();
    let doc = json_of(&injected.pod);
    let app = container(&doc["spec"]["containers"], "app");
    assert_eq!(
        app["livenessProbe"],
        json!({
            "httpGet": { "path": "/app-health/app/livez", "port": 15020, "scheme": "HTTP" },
            "periodSeconds": 7, "timeoutSeconds": 3, "failureThreshold": 4
        }),
        "timing kept, handler replaced"
    );
    assert_eq!(
        app["readinessProbe"],
        json!({ "httpGet": { "path": "/app-health/app/readyz", "port": 15020, "scheme": "HTTP" } })
    );
    assert_eq!(
        app["startupProbe"],
        json!({ "exec": { "command": ["true"] } }),
        "exec probes need no network"
    );
    let originals: Value =
        serde_json::from_str(doc["metadata"]["annotations"][APP_PROBES].as_str().unwrap()).unwrap();
    assert_eq!(
        originals,
        json!({
            "/app-health/app/livez": {
                "httpGet": { "path": "/healthz", "port": 8080, "scheme": "HTTP",
                             "httpHeaders": [{ "name": "x-probe", "value": "1" }] },
                "timeoutSeconds": 3
            },
            "/app-health/app/readyz": { "tcpSocket": { "port": 8080 }, "timeoutSeconds": 1 }
        }),
        "named ports resolved, headers kept"
    );
}

/// The app's own native sidecar (a restartable init container) may have probes; they are
/// rewritten like an app container's, at their index among the pod's init containers, before
/// the proxy's containers are put in front.
#[test]
fn probes_of_the_apps_restartable_init_containers_are_rewritten_too() {
    let mut doc = json_of(&web());
    doc["spec"]["initContainers"] = json!([
        { "name": "setup", "image": "setup:1" },
        { "name": "logs", "image": "logs:1", "restartPolicy": "Always",
          "ports": [{ "name": "metrics", "containerPort": 9000 }],
          "readinessProbe": { "httpGet": { "path": "/ok", "port": "metrics" } } }
    ]);
    let settings = InjectSettings {
        native_sidecar: NativeSidecar::Always,
        ..InjectSettings::default()
    };
    let injected = inject(&pod(doc), &enabled(), &settings, false).unwrap();
    let out = json_of(&injected.pod);
    let logs = container(&out["spec"]["initContainers"], "logs");
    assert_eq!(
        logs["readinessProbe"],
        json!({ "httpGet": { "path": "/app-health/logs/readyz", "port": 15020, "scheme": "HTTP" } })
    );
    assert!(container(&out["spec"]["initContainers"], "setup")["readinessProbe"].is_null());
    let originals: Value =
        serde_json::from_str(out["metadata"]["annotations"][APP_PROBES].as_str().unwrap()).unwrap();
    assert_eq!(
        originals["/app-health/logs/readyz"],
        json!({ "httpGet": { "path": "/ok", "port": 9000, "scheme": "HTTP" }, "timeoutSeconds": 1 })
    );
    assert!(originals["/app-health/app/livez"].is_object());
    // Injecting the injected pod changes nothing.
    let again = inject(&injected.pod, &enabled(), &settings, false).unwrap();
    assert_eq!(json_of(&again.pod), out);
}

#[test]
fn original_http_probes_carry_the_api_servers_defaults() {
    // The webhook sees a defaulted pod, `meshflow inject` the manifest: same annotation.
    let manifest = pod(json!({
        "metadata": { "name": "p" },
        "spec": { "containers": [{ "name": "app", "image": "x",
            "livenessProbe": { "httpGet": { "port": 8080 } } }] }
    }));
    let mut defaulted = json_of(&manifest);
    defaulted["spec"]["containers"][0]["livenessProbe"] = json!({
        "httpGet": { "path": "/", "port": 8080, "scheme": "HTTP" },
        "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3
    });
    let annotation = |p: &Pod| {
        let out = inject(p, &enabled(), &InjectSettings::default(), false).unwrap();
        json_of(&out.pod)["metadata"]["annotations"][APP_PROBES].clone()
    };
    assert_eq!(annotation(&manifest), annotation(&pod(defaulted)));
    let originals: Value = serde_json::from_str(annotation(&manifest).as_str().unwrap()).unwrap();
    assert_eq!(
        originals["/app-health/app/livez"],
        json!({ "httpGet": { "path": "/", "port": 8080, "scheme": "HTTP" }, "timeoutSeconds": 1 })
    );
}

#[test]
fn grpc_probes_are_rewritten_and_a_named_port_that_does_not_exist_is_refused() {
    let grpc = pod(json!({
        "metadata": { "name": "api" },
        "spec": { "containers": [{
            "name": "api", "image": "api:1",
            "ports": [{ "name": "grpc", "containerPort": 9090 }],
            "livenessProbe": { "grpc": { "port": 9090, "service": "api" }, "timeoutSeconds": 2 }
        }]}
    }));
    let injected = inject(&grpc, &enabled(), &InjectSettings::default(), false).unwrap();
    let doc = json_of(&injected.pod);
    let api = container(&doc["spec"]["containers"], "api");
    assert_eq!(
        api["livenessProbe"]["httpGet"]["path"],
        "/app-health/api/livez"
    );
    assert!(api["livenessProbe"]["grpc"].is_null());
    let originals: Value =
        serde_json::from_str(doc["metadata"]["annotations"][APP_PROBES].as_str().unwrap()).unwrap();
    assert_eq!(
        originals["/app-health/api/livez"],
        json!({ "grpc": { "port": 9090, "service": "api" }, "timeoutSeconds": 2 })
    );
    let proxy = container(&doc["spec"]["containers"], PROXY_CONTAINER);
    assert_eq!(env_value(proxy, "MESHFLOW_APP_PROTOCOL")["value"], "grpc");

    let mut bad = json_of(&web());
    bad["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = json!("metrics");
    let err = inject(&pod(bad), &enabled(), &InjectSettings::default(), false).unwrap_err();
    assert_eq!(err.field, "spec.containers[0].livenessProbe.httpGet.port");
    assert!(err.message.contains("\"metrics\""), "{err}");
}

#[test]
fn native_sidecar_is_an_init_container_that_restarts_and_precedes_the_apps_init_containers() {
    let mut before = json_of(&web());
    before["spec"]["initContainers"] = json!([{ "name": "migrate", "image": "web:1" }]);
    before["metadata"]["annotations"] = json!({ "team": "shop" });
    before["spec"]["volumes"] = json!([{ "name": "data", "emptyDir": {} }]);
    let before = pod(before);
    let injected = inject(&before, &enabled(), &InjectSettings::default(), true).unwrap();
    assert_patch_gives_pod(&before, &injected);
    let doc = json_of(&injected.pod);
    let spec = &doc["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        ["meshflow-init", "meshflow-proxy", "migrate"]
    );
    assert_eq!(names(&spec["containers"]), ["app"]);
    assert_eq!(
        names(&spec["volumes"]),
        ["data", TOKEN_VOLUME, TRUST_BUNDLE_VOLUME, XTABLES_VOLUME]
    );
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert!(proxy["lifecycle"].is_null(), "no postStart hook needed");
    assert_eq!(
        proxy["startupProbe"],
        json!({ "httpGet": { "path": "/ready", "port": 15020 },
                "periodSeconds": 1, "failureThreshold": 120 })
    );
    assert_eq!(doc["metadata"]["annotations"]["team"], "shop");
    // The patch appends to existing arrays and maps rather than replacing them.
    let paths: Vec<String> = injected
        .patch
        .iter()
        .map(|op| op.path().to_string())
        .collect();
    assert!(
        paths.contains(&"/spec/initContainers/0".to_string()),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"/spec/initContainers/1".to_string()),
        "{paths:?}"
    );
    assert!(paths.contains(&"/spec/volumes/-".to_string()), "{paths:?}");
    assert!(
        paths.contains(&"/metadata/annotations/meshflow.io~1injected".to_string()),
        "{paths:?}"
    );
    let again = inject(&injected.pod, &enabled(), &InjectSettings::default(), true).unwrap();
    assert!(again.patch.0.is_empty(), "{:?}", again.patch);
}

#[test]
fn opted_out_pods_and_other_namespaces_are_skipped_untouched() {
    let settings = InjectSettings::default();
    let cases = [
        (
            json!({ "labels": { INJECT: DISABLED } }),
            enabled(),
            "labelled",
        ),
        (
            json!({ "annotations": { INJECT: DISABLED } }),
            enabled(),
            "annotated",
        ),
        (json!({}), BTreeMap::new(), "namespace"),
        (
            json!({}),
            BTreeMap::from([(INJECT.to_string(), DISABLED.to_string())]),
            "namespace",
        ),
    ];
    for (meta, ns, why) in cases {
        let mut doc = json_of(&web());
        for (k, v) in meta.as_object().unwrap() {
            doc["metadata"][k] = v.clone();
        }
        let before = pod(doc);
        let out = inject(&before, &ns, &settings, false).unwrap();
        match &out.outcome {
            Outcome::Skipped(reason) => assert!(reason.contains(why), "{reason}"),
            other => panic!("{why}: {other:?}"),
        }
        assert!(out.patch.0.is_empty());
        assert_eq!(json_of(&out.pod), json_of(&before));
    }
    let mut host = json_of(&web());
    host["spec"]["hostNetwork"] = json!(true);
    let out = inject(&pod(host), &enabled(), &settings, false).unwrap();
    assert!(matches!(out.outcome, Outcome::Skipped(ref r) if r.contains("hostNetwork")));
}

#[test]
fn annotations_set_resources_and_exclusions_and_bad_values_are_refused_naming_them() {
    let settings = InjectSettings {
        exclude_outbound_cidrs: vec!["169.254.169.254/32".into()],
        exclude_inbound_ports: vec![9901],
        ..InjectSettings::default()
    };
    let mut doc = json_of(&web());
    doc["metadata"]["annotations"] = json!({
        PROXY_CPU_REQUEST: "250m",
        PROXY_CPU_LIMIT: "1",
        PROXY_MEMORY_LIMIT: "1Gi",
        EXCLUDE_INBOUND_PORTS: "9090, 9901",
        EXCLUDE_OUTBOUND_PORTS: "5432",
        EXCLUDE_OUTBOUND_CIDRS: "10.0.0.0/8,172.16.0.0/12",
        APP_PORT: "8443",
        APP_PROTOCOL: "h2c",
    });
    let injected = inject(&pod(doc.clone()), &enabled(), &settings, false).unwrap();
    let out = json_of(&injected.pod);
    let proxy = container(&out["spec"]["containers"], PROXY_CONTAINER);
    assert_eq!(
        proxy["resources"],
        json!({ "requests": { "cpu": "250m", "memory": "64Mi" },
                "limits": { "cpu": "1", "memory": "1Gi" } })
    );
    assert_eq!(env_value(proxy, "MESHFLOW_APP_PORT")["value"], "8443");
    assert_eq!(env_value(proxy, "MESHFLOW_APP_PROTOCOL")["value"], "h2c");
    // A CPU limit of one core: one worker thread per listener, said explicitly.
    assert_eq!(env_value(proxy, "MESHFLOW_THREADS")["value"], "1");
    let init = container(&out["spec"]["initContainers"], INIT_CONTAINER);
    let args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args[9..],
        [
            "--exclude-inbound-ports",
            "9901,9090",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32,10.0.0.0/8,172.16.0.0/12"
        ]
    );
    assert_eq!(init["resources"], proxy["resources"]);

    for (key, value, expect) in [
        (PROXY_CPU_REQUEST, "lots", "not a Kubernetes quantity"),
        (PROXY_MEMORY_LIMIT, "1GB", "not a Kubernetes quantity"),
        (EXCLUDE_INBOUND_PORTS, "80,http", "not a port"),
        (EXCLUDE_OUTBOUND_PORTS, "0", "not a port"),
        (EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/33", "not an IPv4 CIDR"),
        // `meshflow-proxy init` captures IPv4 only and would refuse it, failing the pod.
        (EXCLUDE_OUTBOUND_CIDRS, "fd00::/8", "IPv6 is not captured"),
        (APP_PORT, "70000", "not a port"),
        (APP_PROTOCOL, "http3", "not http1, h2c or grpc"),
        (APP_PROBES, "[1]", "not a JSON object"),
    ] {
        let mut bad = json_of(&web());
        bad["metadata"]["annotations"] = json!({ key: value });
        let err = inject(&pod(bad), &enabled(), &settings, false).unwrap_err();
        assert_eq!(err.field, format!("metadata.annotations[{key:?}]"));
        assert!(err.message.contains(expect), "{key}: {err}");
    }
}

#[test]
fn a_pod_with_too_many_containers_is_refused() {
    let containers: Vec<Value> = (0..MAX_CONTAINERS + 1)
        .map(|i| json!({ "name": format!("c{i}"), "image": "x" }))
        .collect();
    let big = pod(json!({ "metadata": { "name": "big" }, "spec": { "containers": containers } }));
    let err = inject(&big, &enabled(), &InjectSettings::default(), false).unwrap_err();
    assert_eq!(err.field, "spec.containers");
    assert!(err.message.contains("251 containers"), "{err}");
    let err = inject(
        &pod(json!({ "metadata": {} })),
        &enabled(),
        &InjectSettings::default(),
        false,
    )
    .unwrap_err();
    assert_eq!(err.field, "spec");
}

#[test]
fn a_reinvocation_after_another_webhook_added_a_container_only_rewrites_its_probes() {
    let settings = InjectSettings::default();
    let injected = inject(&web(), &enabled(), &settings, false).unwrap().pod;
    let mut doc = json_of(&injected);
    doc["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "name": "logger", "image": "log:1",
            "readinessProbe": { "httpGet": { "path": "/up", "port": 2020 } }
        }));
    let before = pod(doc);
    let again = inject(&before, &enabled(), &settings, false).unwrap();
    assert_eq!(again.outcome, Outcome::Injected);
    assert_patch_gives_pod(&before, &again);
    let paths: Vec<String> = again.patch.iter().map(|op| op.path().to_string()).collect();
    assert_eq!(
        paths,
        [
            "/spec/containers/2/readinessProbe",
            "/metadata/annotations/meshflow.io~1app-probes"
        ]
    );
    let out = json_of(&again.pod);
    let originals: Value =
        serde_json::from_str(out["metadata"]["annotations"][APP_PROBES].as_str().unwrap()).unwrap();
    assert_eq!(originals.as_object().unwrap().len(), 3, "{originals}");
    assert_eq!(
        originals["/app-health/logger/readyz"]["httpGet"]["port"],
        2020
    );
}

#[test]
fn settings_defaults_are_the_flags_defaults_and_validation_names_the_flag() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        settings: InjectSettings,
    }
    let parsed = <Cli as clap::Parser>::try_parse_from(["x"]).unwrap();
    assert_eq!(parsed.settings, InjectSettings::default());
    assert_eq!(InjectSettings::default().validate(), Ok(()));
    let parsed = <Cli as clap::Parser>::try_parse_from([
        "x",
        "--proxy-exclude-outbound-ports",
        "5432,6379",
        "--native-sidecar",
        "always",
    ])
    .unwrap();
    assert_eq!(parsed.settings.exclude_outbound_ports, [5432, 6379]);
    assert_eq!(parsed.settings.native_sidecar, NativeSidecar::Always);

    let check = |edit: &dyn Fn(&mut InjectSettings), flag: &str| {
        let mut s = InjectSettings::default();
        edit(&mut s);
        assert_eq!(s.validate().unwrap_err().field, flag);
    };
    check(&|s| s.proxy_uid = 0, "--proxy-uid");
    check(&|s| s.admin_port = 15006, "--proxy-admin-port");
    check(&|s| s.outbound_port = 0, "--proxy-outbound-port");
    check(&|s| s.cpu_request = "fast".into(), "--proxy-cpu-request");
    check(
        &|s| s.control_plane = "no-port".into(),
        "--proxy-control-plane",
    );
    check(
        &|s| s.exclude_outbound_cidrs = vec!["10.0.0.1".into()],
        "--proxy-exclude-outbound-cidrs",
    );
    check(&|s| s.image = " ".into(), "--proxy-image");
    check(
        &|s| s.trust_domain = "Not A Domain".into(),
        "--trust-domain",
    );
}

#[test]
fn quantities_cidrs_and_server_versions() {
    for ok in [
        "1",
        "100m",
        "0.5",
        ".5",
        "64Mi",
        "1Gi",
        "2e3",
        "1E-2",
        "+1",
        "128974848",
    ] {
        assert!(is_quantity(ok), "{ok}");
    }
    for bad in ["", "m", "1GB", "1.2.3", "lots", "1 Gi", "1e", "."] {
        assert!(!is_quantity(bad), "{bad}");
    }
    // CPU limits in millicores (rounded up, exactly), as the proxy's worker count is derived
    // from them.
    for (quantity, millicores) in [
        ("1", 1000),
        ("1500m", 1500),
        ("250m", 250),
        ("2.5", 2500),
        (".5", 500),
        ("+.5", 500),
        ("2e0", 2000),
        ("1E-2", 10),
        ("1e-3", 1),
        ("0.0001", 1),
        ("1e-400", 1),
        ("+4", 4000),
        ("15000000000n", 15000),
        ("2.0001", 2001),
        ("1024", 1024000),
    ] {
        assert_eq!(
            pod::cpu_millicores(quantity),
            Some(millicores),
            "{quantity}"
        );
    }
    for nonsense in [
        "-1", "0", "0e400", "64Gi", "2Ki", "1e9", "1e400", "1025", "1024001m",
    ] {
        assert_eq!(pod::cpu_millicores(nonsense), None, "{nonsense}");
    }
    for ok in ["10.0.0.0/8", "0.0.0.0/0", "1.2.3.4/32"] {
        assert!(is_cidr(ok), "{ok}");
    }
    for bad in [
        "10.0.0.0",
        "10.0.0.0/33",
        "fd00::/8",
        "::/0",
        "x/8",
        "10.0.0.0/-1",
    ] {
        assert!(!is_cidr(bad), "{bad}");
    }
    assert_eq!(parse_server_version("1", "29+"), Some((1, 29)));
    assert_eq!(parse_server_version("1", "20"), Some((1, 20)));
    assert_eq!(parse_server_version("", "20"), None);
    assert!(!NativeSidecar::Auto.resolve(Some((1, 28))));
    assert!(NativeSidecar::Auto.resolve(Some((1, 29))));
    assert!(NativeSidecar::Auto.resolve(Some((2, 0))));
    assert!(!NativeSidecar::Auto.resolve(None));
    assert!(NativeSidecar::Always.resolve(Some((1, 20))));
    assert!(!NativeSidecar::Never.resolve(Some((1, 33))));
}

fn arbitrary_pod() -> impl Strategy<Value = (Value, bool)> {
    let probe = prop_oneof![
        Just(Value::Null),
        Just(json!({ "httpGet": { "path": "/h", "port": 8080 } })),
        Just(json!({ "httpGet": { "path": "/h", "port": "http" } })),
        Just(json!({ "tcpSocket": { "port": 8080 } })),
        Just(json!({ "grpc": { "port": 8080 } })),
        Just(json!({ "exec": { "command": ["true"] } })),
    ];
    let container = (probe.clone(), probe.clone(), probe);
    (
        proptest::collection::vec(container, 1..4),
        0usize..3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(containers, inits, annotations, volumes, native)| {
            let containers: Vec<Value> = containers
                .into_iter()
                .enumerate()
                .map(|(i, (live, ready, startup))| {
                    let mut c = json!({
                        "name": format!("c{i}"), "image": "x",
                        "ports": [{ "name": "http", "containerPort": 8080 }],
                    });
                    for (field, probe) in [
                        ("livenessProbe", live),
                        ("readinessProbe", ready),
                        ("startupProbe", startup),
                    ] {
                        if !probe.is_null() {
                            c[field] = probe;
                        }
                    }
                    c
                })
                .collect();
            let mut doc =
                json!({ "metadata": { "name": "p" }, "spec": { "containers": containers } });
            if inits > 0 {
                doc["spec"]["initContainers"] = (0..inits)
                    .map(|i| json!({ "name": format!("i{i}"), "image": "x" }))
                    .collect();
            }
            if annotations {
                doc["metadata"]["annotations"] = json!({ "a": "b" });
            }
            if volumes {
                doc["spec"]["volumes"] = json!([{ "name": "v", "emptyDir": {} }]);
            }
            (doc, native)
        })
}

proptest! {
    /// Whatever the pod's shape: the patch applies to its JSON and gives the returned pod, the
    /// proxy and the init container are there exactly once, the app containers keep their
    /// order, and injecting again changes nothing.
    #[test]
    fn injection_is_a_valid_patch_and_idempotent((doc, native) in arbitrary_pod()) {
        let before = pod(doc);
        let settings = InjectSettings::default();
        let injected = inject(&before, &enabled(), &settings, native).unwrap();
        prop_assert_eq!(&injected.outcome, &Outcome::Injected);
        let mut applied = json_of(&before);
        json_patch::patch(&mut applied, &injected.patch).unwrap();
        prop_assert_eq!(&applied, &json_of(&injected.pod));
        let spec = &applied["spec"];
        let all: Vec<&str> = names(&spec["initContainers"]).into_iter()
            .chain(names(&spec["containers"])).collect();
        prop_assert_eq!(all.iter().filter(|n| **n == PROXY_CONTAINER).count(), 1);
        prop_assert_eq!(all.iter().filter(|n| **n == INIT_CONTAINER).count(), 1);
        let apps: Vec<&str> = names(&spec["containers"]).into_iter()
            .filter(|n| *n != PROXY_CONTAINER).collect();
        let original = json_of(&before);
        prop_assert_eq!(apps, names(&original["spec"]["containers"]));
        for c in spec["containers"].as_array().unwrap() {
            for field in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let probe = &c[field];
                prop_assert!(probe.is_null() || probe["exec"].is_object()
                    || probe["httpGet"]["path"].as_str().is_some_and(|p| p.starts_with("/app-health/")
                        || c["name"] == PROXY_CONTAINER),
                    "{} {}: {}", c["name"], field, probe);
            }
        }
        let again = inject(&injected.pod, &enabled(), &settings, native).unwrap();
        prop_assert!(again.patch.0.is_empty(), "{:?}", again.patch);
    }
}
