//! Table-driven AuthorizationPolicy evaluation: Istio's documented examples with Istio's stated
//! outcomes (files in `examples/istio/`, parsed with only `apiVersion` changed), plus precedence,
//! empty policies, `not…` fields, templates, `when` keys and root-namespace policies.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use meshflow_policies::authz::{authorize, AuthorizationPolicy, RequestAttributes};
use meshflow_policies::documents::PolicySet;

fn istio_examples() -> PolicySet {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/istio/reference.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    // The same documents as Istio writes them parse after changing only apiVersion.
    assert!(text.contains("apiVersion: meshflow.io/v1alpha1"));
    let mut set = PolicySet::default();
    set.add_file(&path, &text).unwrap();
    set
}

fn req() -> RequestAttributes {
    RequestAttributes {
        principal: Some("cluster.local/ns/default/sa/sleep".into()),
        source_namespace: Some("default".into()),
        source_ip: Some("10.0.0.1".parse().unwrap()),
        remote_ip: Some("10.0.0.1".parse().unwrap()),
        host: "httpbin.foo".into(),
        port: 8000,
        method: "GET".into(),
        path: "/info".into(),
        ..Default::default()
    }
}

fn jwt(mut r: RequestAttributes, iss: &str) -> RequestAttributes {
    r.request_principal = Some(format!("{iss}/user-1"));
    r.claims.insert("iss".into(), vec![iss.into()]);
    r
}

fn from_ns(mut r: RequestAttributes, ns: &str) -> RequestAttributes {
    r.principal = Some(format!("cluster.local/ns/{ns}/sa/client"));
    r.source_namespace = Some(ns.into());
    r
}

fn decide(
    set: &PolicySet,
    ns: &str,
    labels: &[(&str, &str)],
    r: &RequestAttributes,
) -> (bool, Option<String>) {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let d = authorize(set.authorization_for(ns, &labels), r);
    (d.allowed, d.policy)
}

const HTTPBIN: &[(&str, &str)] = &[("app", "httpbin")];

#[test]
fn istio_reference_examples_have_istios_outcomes() {
    let set = istio_examples();
    let google = "https://accounts.google.com";
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        RequestAttributes,
        bool,
    );
    let mut cases: Vec<Case> = vec![
        // httpbin (foo): ALLOW sleep SA or ns test, GET /info* or POST /data, iss google.
        (
            "1 sleep GET /info with google JWT",
            "foo",
            HTTPBIN,
            jwt(req(), google),
            true,
        ),
        (
            "2 sleep GET /info/x prefix",
            "foo",
            HTTPBIN,
            {
                let mut r = jwt(req(), google);
                r.path = "/info/x".into();
                r
            },
            true,
        ),
        (
            "3 sleep POST /data",
            "foo",
            HTTPBIN,
            {
                let mut r = jwt(req(), google);
                r.method = "POST".into();
                r.path = "/data".into();
                r
            },
            true,
        ),
        (
            "4 sleep POST /info (wrong method)",
            "foo",
            HTTPBIN,
            {
                let mut r = jwt(req(), google);
                r.method = "POST".into();
                r
            },
            false,
        ),
        (
            "5 ns test GET /info",
            "foo",
            HTTPBIN,
            jwt(from_ns(req(), "test"), google),
            true,
        ),
        (
            "6 other ns denied",
            "foo",
            HTTPBIN,
            jwt(from_ns(req(), "prod"), google),
            false,
        ),
        (
            "7 wrong issuer denied",
            "foo",
            HTTPBIN,
            jwt(req(), "https://evil.example"),
            false,
        ),
        ("8 no JWT denied", "foo", HTTPBIN, req(), false),
        (
            "9 GET /data denied (only POST)",
            "foo",
            HTTPBIN,
            {
                let mut r = jwt(req(), google);
                r.path = "/data".into();
                r
            },
            false,
        ),
        // httpbin-deny (bar): DENY from any namespace except foo; no ALLOW → rest allowed.
        (
            "10 from foo allowed",
            "bar",
            HTTPBIN,
            from_ns(req(), "foo"),
            true,
        ),
        ("11 from default denied", "bar", HTTPBIN, req(), false),
        (
            "12 plaintext (no namespace) denied",
            "bar",
            HTTPBIN,
            RequestAttributes {
                principal: None,
                source_namespace: None,
                ..req()
            },
            false,
        ),
        // allow-nothing: spec {} denies everything.
        ("13 allow-nothing denies", "nothing", HTTPBIN, req(), false),
        // deny-all: DENY with rules [{}].
        ("14 deny-all denies", "denyall", HTTPBIN, req(), false),
        // allow-all: ALLOW with rules [{}].
        ("15 allow-all allows", "allowall", HTTPBIN, req(), true),
        // require-jwt: requestPrincipals ["*"] on app=httpbin.
        (
            "16 with JWT allowed",
            "jwt",
            HTTPBIN,
            jwt(req(), google),
            true,
        ),
        ("17 without JWT denied", "jwt", HTTPBIN, req(), false),
        (
            "18 other app not selected: allowed",
            "jwt",
            &[("app", "other")],
            req(),
            true,
        ),
        // deny-path-headers: DENY /headers unless x-token: admin.
        (
            "19 /headers without token denied",
            "hdr",
            HTTPBIN,
            {
                let mut r = req();
                r.path = "/headers".into();
                r
            },
            false,
        ),
        (
            "20 /headers with admin token allowed",
            "hdr",
            HTTPBIN,
            {
                let mut r = req();
                r.path = "/headers".into();
                r.headers.insert("x-token".into(), vec!["admin".into()]);
                r
            },
            true,
        ),
        (
            "21 /ip allowed",
            "hdr",
            HTTPBIN,
            {
                let mut r = req();
                r.path = "/ip".into();
                r
            },
            true,
        ),
        // audit-profile: AUDIT never blocks.
        (
            "22 audited request allowed",
            "audit",
            HTTPBIN,
            {
                let mut r = req();
                r.path = "/user/profile/1".into();
                r
            },
            true,
        ),
        // ingress-ip: ipBlocks.
        (
            "23 exact IP allowed",
            "ipns",
            HTTPBIN,
            {
                let mut r = req();
                r.source_ip = Some("1.2.3.4".parse().unwrap());
                r
            },
            true,
        ),
        (
            "24 CIDR IP allowed",
            "ipns",
            HTTPBIN,
            {
                let mut r = req();
                r.source_ip = Some("5.6.7.200".parse().unwrap());
                r
            },
            true,
        ),
        (
            "25 other IP denied",
            "ipns",
            HTTPBIN,
            {
                let mut r = req();
                r.source_ip = Some("5.6.8.1".parse().unwrap());
                r
            },
            false,
        ),
        // template: /foo/{*}/bar/{**}.
        (
            "26 template one segment + any",
            "tmpl",
            HTTPBIN,
            {
                let mut r = req();
                r.path = "/foo/x/bar/a/b".into();
                r
            },
            true,
        ),
        (
            "27 template {**} may be empty",
            "tmpl",
            HTTPBIN,
            {
                let mut r = req();
                r.path = "/foo/x/bar".into();
                r
            },
            true,
        ),
        (
            "28 template {*} is one segment",
            "tmpl",
            HTTPBIN,
            {
                let mut r = req();
                r.path = "/foo/x/y/bar".into();
                r
            },
            false,
        ),
    ];
    let n = cases.len();
    for (name, ns, labels, r, want) in cases.drain(..) {
        assert_eq!(decide(&set, ns, labels, &r).0, want, "{name}");
    }
    assert!(n >= 20);
    // AUDIT records without blocking.
    let labels: BTreeMap<String, String> = [("app".to_string(), "httpbin".to_string())].into();
    let mut r = req();
    r.path = "/user/profile/1".into();
    let d = authorize(set.authorization_for("audit", &labels), &r);
    assert_eq!(d.audited, vec!["audit/audit-profile".to_string()]);
}

fn policy(yaml: &str) -> AuthorizationPolicy {
    AuthorizationPolicy::parse(Path::new("t.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn set(policies: &[&str]) -> PolicySet {
    PolicySet {
        authorization: policies.iter().map(|p| policy(p)).collect(),
        ..Default::default()
    }
}

const HEAD: &str = "apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\n";

fn p(name: &str, ns: &str, spec: &str) -> String {
    format!("{HEAD}metadata: {{ name: {name}, namespace: {ns} }}\nspec:\n{spec}")
}

#[test]
fn precedence_not_fields_when_keys_and_root_namespace() {
    let deny_admin = p("deny-admin", "shop", "  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin\", \"/admin/*\"]\n");
    let allow_front = p("allow-front", "shop", "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/frontend\"]\n");
    let root_deny = p(
        "no-debug",
        "meshflow-system",
        "  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/debug*\"]\n",
    );
    let s = set(&[&deny_admin, &allow_front, &root_deny]);
    let front = RequestAttributes {
        principal: Some("cluster.local/ns/shop/sa/frontend".into()),
        source_namespace: Some("shop".into()),
        method: "GET".into(),
        path: "/orders".into(),
        host: "payment.shop".into(),
        port: 8080,
        ..Default::default()
    };
    let other = RequestAttributes {
        principal: Some("cluster.local/ns/shop/sa/other".into()),
        ..front.clone()
    };
    let cases: Vec<(&str, RequestAttributes, bool, Option<&str>)> = vec![
        (
            "29 allowed principal",
            front.clone(),
            true,
            Some("shop/allow-front"),
        ),
        (
            "30 other principal denied (ALLOW exists, none match)",
            other.clone(),
            false,
            None,
        ),
        (
            "31 DENY beats ALLOW",
            RequestAttributes {
                path: "/admin".into(),
                ..front.clone()
            },
            false,
            Some("shop/deny-admin"),
        ),
        (
            "32 DENY prefix",
            RequestAttributes {
                path: "/admin/users".into(),
                ..front.clone()
            },
            false,
            Some("shop/deny-admin"),
        ),
        (
            "33 /administrator is not /admin/*",
            RequestAttributes {
                path: "/administrator".into(),
                ..front.clone()
            },
            true,
            Some("shop/allow-front"),
        ),
        (
            "34 root-namespace DENY applies mesh-wide",
            RequestAttributes {
                path: "/debug/pprof".into(),
                ..front.clone()
            },
            false,
            Some("meshflow-system/no-debug"),
        ),
    ];
    for (name, r, allowed, by) in cases {
        let d = authorize(s.authorization_for("shop", &BTreeMap::new()), &r);
        assert_eq!((d.allowed, d.policy.as_deref()), (allowed, by), "{name}");
    }
    // Root-namespace policy also applies in another namespace.
    let d = authorize(
        s.authorization_for("billing", &BTreeMap::new()),
        &RequestAttributes {
            path: "/debug".into(),
            ..front.clone()
        },
    );
    assert!(!d.allowed, "35 root policy in namespace billing");
    let d = authorize(s.authorization_for("billing", &BTreeMap::new()), &front);
    assert!(d.allowed, "36 no ALLOW in billing → allowed");
}

#[test]
fn field_by_field() {
    let base = RequestAttributes {
        principal: Some("cluster.local/ns/a/sa/x".into()),
        source_namespace: Some("a".into()),
        source_ip: Some("192.168.1.10".parse::<IpAddr>().unwrap()),
        remote_ip: Some("203.0.113.7".parse::<IpAddr>().unwrap()),
        method: "GET".into(),
        path: "/api/v1/items".into(),
        host: "svc.a".into(),
        port: 8080,
        sni: Some("x.a.serviceaccount.identity.cluster.local".into()),
        destination_ip: Some("127.0.0.1".parse::<IpAddr>().unwrap()),
        ..Default::default()
    };
    let mut with_header = base.clone();
    with_header
        .headers
        .insert("x-tenant".into(), vec!["gold".into()]);
    let mut with_claims = base.clone();
    with_claims.request_principal = Some("iss/sub".into());
    with_claims.audiences = vec!["orders".into()];
    with_claims.presenter = Some("web".into());
    with_claims
        .claims
        .insert("groups".into(), vec!["admins".into(), "dev".into()]);
    with_claims
        .claims
        .insert("org.team".into(), vec!["core".into()]);
    // (case, rule yaml (one ALLOW rule), request, allowed)
    let cases: Vec<(&str, &str, RequestAttributes, bool)> = vec![
        (
            "37 principals suffix",
            "from: [{source: {principals: [\"*/sa/x\"]}}]",
            base.clone(),
            true,
        ),
        (
            "38 principals prefix miss",
            "from: [{source: {principals: [\"cluster.local/ns/b/*\"]}}]",
            base.clone(),
            false,
        ),
        (
            "39 notPrincipals excludes",
            "from: [{source: {notPrincipals: [\"cluster.local/ns/a/sa/x\"]}}]",
            base.clone(),
            false,
        ),
        (
            "40 presence * needs a principal",
            "from: [{source: {principals: [\"*\"]}}]",
            RequestAttributes {
                principal: None,
                ..base.clone()
            },
            false,
        ),
        (
            "41 namespaces",
            "from: [{source: {namespaces: [\"a\"]}}]",
            base.clone(),
            true,
        ),
        (
            "42 notNamespaces",
            "from: [{source: {notNamespaces: [\"a\"]}}]",
            base.clone(),
            false,
        ),
        (
            "43 ipBlocks CIDR",
            "from: [{source: {ipBlocks: [\"192.168.0.0/16\"]}}]",
            base.clone(),
            true,
        ),
        (
            "44 notIpBlocks",
            "from: [{source: {notIpBlocks: [\"192.168.1.10\"]}}]",
            base.clone(),
            false,
        ),
        (
            "45 remoteIpBlocks",
            "from: [{source: {remoteIpBlocks: [\"203.0.113.0/24\"]}}]",
            base.clone(),
            true,
        ),
        (
            "46 notRemoteIpBlocks",
            "from: [{source: {notRemoteIpBlocks: [\"203.0.113.0/24\"]}}]",
            base.clone(),
            false,
        ),
        (
            "47 requestPrincipals without JWT",
            "from: [{source: {requestPrincipals: [\"*\"]}}]",
            base.clone(),
            false,
        ),
        (
            "48 notRequestPrincipals with JWT",
            "from: [{source: {notRequestPrincipals: [\"iss/*\"]}}]",
            with_claims.clone(),
            false,
        ),
        (
            "49 hosts case/port-insensitive pattern",
            "to: [{operation: {hosts: [\"SVC.A:8080\"]}}]",
            base.clone(),
            true,
        ),
        (
            "50 notHosts",
            "to: [{operation: {notHosts: [\"*.a\"]}}]",
            base.clone(),
            false,
        ),
        (
            "51 ports",
            "to: [{operation: {ports: [\"8080\"]}}]",
            base.clone(),
            true,
        ),
        (
            "52 notPorts",
            "to: [{operation: {notPorts: [\"8080\"]}}]",
            base.clone(),
            false,
        ),
        (
            "53 methods",
            "to: [{operation: {methods: [\"GET\", \"HEAD\"]}}]",
            base.clone(),
            true,
        ),
        (
            "54 notMethods",
            "to: [{operation: {notMethods: [\"GET\"]}}]",
            base.clone(),
            false,
        ),
        (
            "55 paths prefix",
            "to: [{operation: {paths: [\"/api/*\"]}}]",
            base.clone(),
            true,
        ),
        (
            "56 notPaths",
            "to: [{operation: {notPaths: [\"/api/*\"]}}]",
            base.clone(),
            false,
        ),
        (
            "57 template {*}",
            "to: [{operation: {paths: [\"/api/{*}/items\"]}}]",
            base.clone(),
            true,
        ),
        (
            "58 template {**}",
            "to: [{operation: {paths: [\"/api/{**}\"]}}]",
            base.clone(),
            true,
        ),
        (
            "59 when header",
            "when: [{key: \"request.headers[X-Tenant]\", values: [\"gold\"]}]",
            with_header.clone(),
            true,
        ),
        (
            "60 when header absent",
            "when: [{key: \"request.headers[x-tenant]\", values: [\"gold\"]}]",
            base.clone(),
            false,
        ),
        (
            "61 when notValues",
            "when: [{key: \"request.headers[x-tenant]\", notValues: [\"gold\"]}]",
            with_header.clone(),
            false,
        ),
        (
            "62 when source.ip CIDR",
            "when: [{key: source.ip, values: [\"192.168.1.0/24\"]}]",
            base.clone(),
            true,
        ),
        (
            "63 when source.namespace",
            "when: [{key: source.namespace, values: [\"a\"]}]",
            base.clone(),
            true,
        ),
        (
            "64 when source.principal",
            "when: [{key: source.principal, values: [\"*/sa/x\"]}]",
            base.clone(),
            true,
        ),
        (
            "65 when request.auth.principal",
            "when: [{key: request.auth.principal, values: [\"iss/sub\"]}]",
            with_claims.clone(),
            true,
        ),
        (
            "66 when audiences",
            "when: [{key: request.auth.audiences, values: [\"orders\"]}]",
            with_claims.clone(),
            true,
        ),
        (
            "67 when presenter",
            "when: [{key: request.auth.presenter, values: [\"web\"]}]",
            with_claims.clone(),
            true,
        ),
        (
            "68 when list claim",
            "when: [{key: \"request.auth.claims[groups]\", values: [\"admins\"]}]",
            with_claims.clone(),
            true,
        ),
        (
            "69 when nested claim",
            "when: [{key: \"request.auth.claims[org][team]\", values: [\"core\"]}]",
            with_claims.clone(),
            true,
        ),
        (
            "70 when destination.port",
            "when: [{key: destination.port, values: [\"8080\"]}]",
            base.clone(),
            true,
        ),
        (
            "71 when destination.ip",
            "when: [{key: destination.ip, values: [\"127.0.0.1\"]}]",
            base.clone(),
            true,
        ),
        (
            "72 when connection.sni",
            "when: [{key: connection.sni, values: [\"*.cluster.local\"]}]",
            base.clone(),
            true,
        ),
        (
            "73 all parts must match",
            "from: [{source: {namespaces: [\"a\"]}}]\n    to: [{operation: {methods: [\"POST\"]}}]",
            base.clone(),
            false,
        ),
        (
            "74 any from entry",
            "from: [{source: {namespaces: [\"z\"]}}, {source: {namespaces: [\"a\"]}}]",
            base.clone(),
            true,
        ),
        ("75 empty rule matches all", "{}", base.clone(), true),
    ];
    let mut n = 0;
    for (name, rule, r, allowed) in cases {
        let yaml = if rule == "{}" {
            p("t", "a", "  rules:\n  - {}\n")
        } else {
            p("t", "a", &format!("  rules:\n  - {rule}\n"))
        };
        let s = set(&[&yaml]);
        assert_eq!(
            authorize(s.authorization_for("a", &BTreeMap::new()), &r).allowed,
            allowed,
            "{name}\n{yaml}"
        );
        n += 1;
    }
    assert!(n >= 39);
}

#[test]
fn unsupported_fields_fail_validation() {
    for (spec, needle) in [
        (
            "  action: CUSTOM\n  provider: { name: ext }\n",
            "CUSTOM is not supported",
        ),
        ("  provider: { name: ext }\n", "provider is not supported"),
        (
            "  targetRef: { kind: Gateway, name: g }\n",
            "targetRef is not supported",
        ),
        (
            "  rules:\n  - when: [{key: request.regex.headers, values: [\"x\"]}]\n",
            "is not supported",
        ),
        (
            "  rules:\n  - to: [{operation: {paths: [\"/a/{**}/b\"]}}]\n",
            "templates are whole segments",
        ),
        (
            "  rules:\n  - to: [{operation: {pathz: [\"/a\"]}}]\n",
            "unknown field",
        ),
    ] {
        let err = AuthorizationPolicy::parse(Path::new("t.yaml"), &p("t", "a", spec))
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{spec}: {err}");
        assert!(err.starts_with("t.yaml:"), "{err}");
    }
    let istio =
        p("t", "a", "  rules:\n  - {}\n").replace("meshflow.io/v1alpha1", "security.istio.io/v1");
    let err = AuthorizationPolicy::parse(Path::new("t.yaml"), &istio)
        .unwrap_err()
        .to_string();
    assert!(err.contains("only this line"), "{err}");
}
