//! Per-request cost of authorization: path normalization plus evaluation against 1, 10 and 100
//! AuthorizationPolicies selecting the workload (the request matches only the last one, the
//! worst case for ALLOW scanning). `cargo bench -p meshflow-policies`.

use std::collections::BTreeMap;
use std::path::Path;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use meshflow_policies::authz::{authorize, AuthorizationPolicy, RequestAttributes};
use meshflow_policies::path::normalize_path;

fn policies(n: usize) -> Vec<AuthorizationPolicy> {
    (0..n)
        .map(|i| {
            let yaml = format!(
                "apiVersion: meshflow.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{ name: p{i}, namespace: shop }}\nspec:\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/shop/sa/caller-{i}\"]}}}}]\n    to: [{{operation: {{methods: [\"GET\", \"POST\"], paths: [\"/api/v1/{{*}}/items\", \"/admin/*\"]}}}}]\n    when: [{{key: \"request.headers[x-tenant]\", values: [\"gold\", \"silver\"]}}]\n"
            );
            AuthorizationPolicy::parse(Path::new("bench.yaml"), &yaml).unwrap()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    for n in [1usize, 10, 100] {
        let set = policies(n);
        let mut headers = BTreeMap::new();
        headers.insert("x-tenant".to_string(), vec!["gold".to_string()]);
        let template = RequestAttributes {
            principal: Some(format!("cluster.local/ns/shop/sa/caller-{}", n - 1)),
            source_namespace: Some("shop".into()),
            method: "GET".into(),
            host: "orders.shop".into(),
            port: 8080,
            headers,
            ..Default::default()
        };
        c.bench_function(&format!("normalize + authorize, {n} policies"), |b| {
            b.iter(|| {
                let mut r = template.clone();
                r.path = normalize_path(black_box("/api//v1/./orders/items")).unwrap();
                let d = authorize(set.iter(), &r);
                assert!(d.allowed);
                black_box(d)
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
