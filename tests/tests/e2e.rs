//! End-to-end tests: real meshflow processes on 127.0.0.1 (ports from ready files), real TLS.
//! One test binary, so Pingora links once. Timing-sensitive tests live in `timing` and run one
//! at a time (see `.config/nextest.toml`).

#[path = "e2e/api_auth.rs"]
mod api_auth;
#[path = "e2e/authn.rs"]
mod authn;
#[path = "e2e/authz.rs"]
mod authz;
#[path = "e2e/ca_expiry.rs"]
mod ca_expiry;
#[path = "e2e/capture.rs"]
mod capture;
#[path = "e2e/chart.rs"]
mod chart;
#[path = "e2e/chart_rbac.rs"]
mod chart_rbac;
#[path = "e2e/check.rs"]
mod check;
#[path = "e2e/cluster.rs"]
mod cluster;
#[path = "e2e/collector.rs"]
mod collector;
#[path = "e2e/common.rs"]
mod common;
#[path = "e2e/dashboards.rs"]
mod dashboards;
#[path = "e2e/demo.rs"]
mod demo;
#[path = "e2e/framing.rs"]
mod framing;
#[path = "e2e/hygiene.rs"]
mod hygiene;
#[path = "e2e/identity.rs"]
mod identity;
#[path = "e2e/injection.rs"]
mod injection;
#[path = "../../policies/tests/support/issuer.rs"]
mod issuer;
#[path = "e2e/jobs.rs"]
mod jobs;
#[path = "e2e/kubernetes.rs"]
mod kubernetes;
#[path = "e2e/lifecycle.rs"]
mod lifecycle;
#[path = "e2e/newuser.rs"]
mod newuser;
#[path = "e2e/observability.rs"]
mod observability;
#[path = "e2e/policy_check_kube.rs"]
mod policy_check_kube;
#[path = "e2e/probes.rs"]
mod probes;
#[path = "e2e/protocols.rs"]
mod protocols;
#[path = "e2e/readme.rs"]
mod readme;
#[path = "e2e/resilience.rs"]
mod resilience;
#[path = "e2e/restarts.rs"]
mod restarts;
#[path = "e2e/store.rs"]
mod store;
#[path = "e2e/timing.rs"]
mod timing;
#[path = "e2e/traces.rs"]
mod traces;
#[path = "e2e/workflow.rs"]
mod workflow;
#[path = "e2e/workflow_guards.rs"]
mod workflow_guards;
#[path = "e2e/workflow_wait.rs"]
mod workflow_wait;
