//! Compiled outbound routes. Each config snapshot is compiled once, when it arrives, into one
//! immutable [`ServiceRoute`] per destination service — its `name.namespace` label, the
//! TrafficPolicy and (when no per-route match can change it) the resolved [`AttemptPlan`], the
//! retry budget, the `maxPendingRequests` counter, and its endpoints with their parsed
//! addresses, TLS server names, balancer statistics and metric series — and swapped in
//! atomically with the snapshot. A request resolves its route with one lookup by borrowed
//! `(name, namespace)` and from then on touches only the route's atomics and its own state: no
//! process-wide lock, no allocated key, no per-request label hashing.
//!
//! State that must outlive a snapshot (endpoint latency and ejection, retry budgets, pending
//! counts) lives in [`OutboundState`]'s registries, keyed by address or service, and is looked
//! up here at compile time, so a config push neither resets a budget nor forgets an ejected
//! endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, OnceLock};

use meshflow_policies::traffic::Budget;
use meshflow_policies::TrafficPolicy;
use prometheus::{IntCounter, IntGauge};

use super::balancer::EndpointStats;
use super::plan::AttemptPlan;
use super::resilience::RetryBudget;
use super::OutboundState;
use crate::config::{ConfigSnapshot, Endpoint};
use crate::shared::Shared;
use crate::telemetry::metrics::{Traffic, TrafficSeries};

/// Every destination service of one snapshot, by namespace then name (looked up with borrowed
/// strings), with the snapshot they were compiled from (so a request sees one consistent
/// version of both).
#[derive(Debug, Default)]
pub struct RouteTable {
    /// The snapshot compiled (`None` before the first one arrives).
    pub snapshot: Option<Arc<ConfigSnapshot>>,
    by_namespace: HashMap<String, HashMap<String, Arc<ServiceRoute>>>,
}

impl RouteTable {
    /// Compiles `snapshot`'s services, keeping the long-lived per-endpoint and per-service
    /// state in `state`.
    pub fn compile(snapshot: Arc<ConfigSnapshot>, state: &OutboundState) -> Self {
        let mut by_namespace: HashMap<String, HashMap<String, Arc<ServiceRoute>>> = HashMap::new();
        for ((name, namespace), entry) in &snapshot.services {
            let label: Arc<str> = Arc::from(format!("{name}.{namespace}"));
            let policy = snapshot
                .traffic
                .get(&(name.clone(), namespace.clone()))
                .cloned();
            // Without per-route matches the plan cannot depend on the request: resolve it now.
            let fixed_plan = match &policy {
                Some(p) if !p.spec.routes.is_empty() => None,
                p => Some(Arc::new(AttemptPlan::resolve(p.as_deref(), "", "", |_| {
                    None
                }))),
            };
            let budget_settings = fixed_plan
                .as_ref()
                .map_or_else(|| service_budget(policy.as_deref()), |p| p.budget);
            let endpoints = entry
                .endpoints
                .iter()
                .filter_map(|e| RouteEndpoint::new(e, state))
                .map(Arc::new)
                .collect();
            let route = ServiceRoute {
                name: name.clone(),
                namespace: namespace.clone(),
                budget: state.budgets.get(&label, budget_settings),
                budget_settings,
                outstanding: state.outstanding.counter(&label),
                label,
                policy,
                fixed_plan,
                endpoints,
                attempts: OnceLock::new(),
                unrouted: OnceLock::new(),
            };
            by_namespace
                .entry(namespace.clone())
                .or_default()
                .insert(name.clone(), Arc::new(route));
        }
        Self {
            snapshot: Some(snapshot),
            by_namespace,
        }
    }

    /// The route of service `name` in `namespace`.
    pub fn get(&self, name: &str, namespace: &str) -> Option<&Arc<ServiceRoute>> {
        self.by_namespace.get(namespace)?.get(name)
    }
}

/// The budget settings of a policy's service-level retries (or the defaults).
fn service_budget(policy: Option<&TrafficPolicy>) -> Budget {
    policy
        .and_then(|p| p.spec.retries.as_ref())
        .map(|r| r.budget)
        .unwrap_or_default()
}

/// One destination service, compiled.
#[derive(Debug)]
pub struct ServiceRoute {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
    /// `name.namespace`: the `service` metric label and the log/error name.
    pub label: Arc<str>,
    /// The service's TrafficPolicy, if any.
    pub policy: Option<Arc<TrafficPolicy>>,
    /// The plan of every request, when it cannot depend on the request (no policy, or a
    /// policy without routes); `None`: resolve per request from `policy`.
    pub fixed_plan: Option<Arc<AttemptPlan>>,
    /// The retry budget for `budget_settings` (shared by the service's requests and kept
    /// across snapshots).
    pub budget: Arc<RetryBudget>,
    /// The settings `budget` was made with.
    pub budget_settings: Budget,
    /// Requests outstanding to the service (for `maxPendingRequests`).
    pub outstanding: Arc<AtomicU32>,
    /// The service's endpoints (its sidecars' inbound listeners).
    pub endpoints: Vec<Arc<RouteEndpoint>>,
    attempts: OnceLock<IntCounter>,
    unrouted: OnceLock<TrafficSeries>,
}

impl ServiceRoute {
    /// The plan for a request (`method`, normalized-enough `path`, `header` by lower-case
    /// name): the compiled one, or resolved from the policy's routes.
    pub fn plan<'a>(
        &self,
        method: &str,
        path: &str,
        header: impl FnMut(&str) -> Option<&'a str>,
    ) -> Arc<AttemptPlan> {
        match &self.fixed_plan {
            Some(plan) => plan.clone(),
            None => Arc::new(AttemptPlan::resolve(
                self.policy.as_deref(),
                method,
                path,
                header,
            )),
        }
    }

    /// The endpoint listening at `address`, if it is one of the route's.
    pub fn endpoint_at(&self, address: &str) -> Option<&Arc<RouteEndpoint>> {
        self.endpoints
            .iter()
            .find(|e| e.endpoint.address == address)
    }

    /// `meshflow_attempts_total{service}`; the first call also creates the service's
    /// zero-valued per-service series ([`crate::telemetry::metrics::ProxyMetrics::init_service`]),
    /// so only services this sidecar called have them.
    pub fn attempts(&self, shared: &Shared) -> &IntCounter {
        self.attempts.get_or_init(|| {
            shared.init_service_metrics(&self.label);
            shared.metrics.attempts.with_label_values(&[&self.label])
        })
    }

    /// The request series of a request that never got an endpoint (the service names the
    /// destination; no principal).
    pub fn unrouted_series(&self, shared: &Shared) -> &TrafficSeries {
        self.unrouted.get_or_init(|| {
            TrafficSeries::new(
                &shared.metrics,
                &Traffic {
                    direction: "outbound",
                    source_workload: shared.workload_name(),
                    source_namespace: &shared.namespace,
                    destination_workload: &self.name,
                    destination_namespace: &self.namespace,
                    principal: "",
                    service: &self.label,
                },
            )
        })
    }
}

/// One endpoint of a route.
#[derive(Debug)]
pub struct RouteEndpoint {
    /// Address and expected identity, as in the snapshot.
    pub endpoint: Endpoint,
    /// The parsed address.
    pub address: SocketAddr,
    /// The TLS server name sent and verified: the expected identity's DNS SAN.
    pub server_name: String,
    /// Latency, in-flight and ejection state (kept across snapshots, by address).
    pub stats: Arc<EndpointStats>,
    in_flight: OnceLock<IntGauge>,
    series: OnceLock<TrafficSeries>,
}

impl RouteEndpoint {
    /// Compiles `endpoint`; `None` when its address does not parse (the snapshot already
    /// skips those).
    pub fn new(endpoint: &Endpoint, state: &OutboundState) -> Option<Self> {
        Some(Self {
            address: endpoint.address.parse().ok()?,
            server_name: endpoint.identity.dns_name(),
            stats: state.balancer.stats(&endpoint.address),
            endpoint: endpoint.clone(),
            in_flight: OnceLock::new(),
            series: OnceLock::new(),
        })
    }

    /// `meshflow_endpoint_in_flight{service, endpoint}` of this endpoint under `route`.
    pub fn in_flight_gauge(&self, route: &ServiceRoute, shared: &Shared) -> &IntGauge {
        self.in_flight.get_or_init(|| {
            shared
                .metrics
                .endpoint_in_flight
                .with_label_values(&[&*route.label, self.endpoint.address.as_str()])
        })
    }

    /// The request series of requests answered through this endpoint.
    pub fn series(&self, route: &ServiceRoute, shared: &Shared) -> &TrafficSeries {
        self.series.get_or_init(|| {
            let identity = &self.endpoint.identity;
            TrafficSeries::new(
                &shared.metrics,
                &Traffic {
                    direction: "outbound",
                    source_workload: shared.workload_name(),
                    source_namespace: &shared.namespace,
                    destination_workload: identity.service_account(),
                    destination_namespace: identity.namespace(),
                    principal: &identity.principal(),
                    service: &route.label,
                },
            )
        })
    }
}
