//! Endpoint choice and health for the outbound path: power-of-two-choices over peak-EWMA
//! latency × in-flight requests (Linkerd's default), round robin and least-request, plus
//! outlier ejection after consecutive failures. Every time is passed in (unit-tested on explicit
//! instants); the outbound adapter records outcomes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshflow_policies::traffic::{LoadBalancerPolicy, OutlierDetection};

use crate::config::Endpoint;

/// How fast old latency observations fade (peak-EWMA decay time).
pub const EWMA_DECAY: Duration = Duration::from_secs(10);

/// Peak-EWMA latency estimate: jumps up to a slower observation at once, decays towards faster
/// ones with time constant [`EWMA_DECAY`].
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    estimate_ns: f64,
    stamp: Option<Instant>,
}

impl PeakEwma {
    /// No observation yet (cost 0: new endpoints get tried).
    pub const fn new() -> Self {
        Self {
            estimate_ns: 0.0,
            stamp: None,
        }
    }

    /// Records one round-trip time observed at `now`.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        match self.stamp {
            Some(stamp) if rtt <= self.estimate_ns => {
                let elapsed = now.saturating_duration_since(stamp).as_secs_f64();
                let w = (-elapsed / EWMA_DECAY.as_secs_f64()).exp();
                self.estimate_ns = self.estimate_ns * w + rtt * (1.0 - w);
            }
            _ => self.estimate_ns = rtt,
        }
        self.stamp = Some(now);
    }

    /// The estimate in nanoseconds.
    pub fn estimate_ns(&self) -> f64 {
        self.estimate_ns
    }
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self::new()
    }
}

/// Live statistics of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointStats {
    in_flight: AtomicU32,
    latency: Mutex<PeakEwma>,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl EndpointStats {
    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn cost(&self) -> f64 {
        // +1: an idle endpoint with a high latency still costs more than an idle fast one.
        let latency = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .estimate_ns()
            + 1.0;
        latency * f64::from(self.in_flight() + 1)
    }

    /// Until when the endpoint is ejected, if it is at `now`.
    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        self.ejected_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .filter(|until| now < *until)
    }

    /// Whether the endpoint is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| now < until)
    }
}

/// Decrements an endpoint's in-flight count when the attempt ends (dropped).
#[derive(Debug)]
pub struct InFlight(Arc<EndpointStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What an attempt did, for health tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Response headers arrived (not 5xx).
    Success,
    /// Connect failure, reset, timeout or a 5xx response.
    Failure,
}

/// Statistics for every endpoint the sidecar has talked to, keyed by address.
#[derive(Debug, Default)]
pub struct Balancer {
    stats: Mutex<HashMap<String, Arc<EndpointStats>>>,
    round_robin: AtomicUsize,
}

impl Balancer {
    /// Forgets the statistics nothing else holds (no compiled route, no attempt in flight).
    pub fn retain_live(&self) {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, stats| Arc::strong_count(stats) > 1);
    }

    /// The statistics of `address`.
    pub fn stats(&self, address: &str) -> Arc<EndpointStats> {
        let mut map = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(address.to_string()).or_default().clone()
    }

    /// Chooses an endpoint. Ejected endpoints are skipped unless more than `max_ejected_percent`
    /// of the endpoints are ejected (then the ejection is ignored for the excess, like Envoy's
    /// panic threshold); endpoints in `avoid` are skipped when another is available; endpoints
    /// at `max_in_flight` are skipped. `random` gives uniform samples in [0, 1).
    #[allow(clippy::too_many_arguments)]
    pub fn pick<'a>(
        &self,
        endpoints: &'a [Endpoint],
        policy: LoadBalancerPolicy,
        avoid: &[String],
        max_ejected_percent: u32,
        max_in_flight: Option<u32>,
        now: Instant,
        random: impl FnMut() -> f64,
    ) -> Option<(&'a Endpoint, Arc<EndpointStats>)> {
        let all: Vec<(&Endpoint, Arc<EndpointStats>)> = endpoints
            .iter()
            .map(|e| (e, self.stats(&e.address)))
            .collect();
        let chosen = self.pick_by(
            &all,
            |(e, s)| (e.address.as_str(), s),
            policy,
            |address| avoid.iter().any(|a| a == address),
            max_ejected_percent,
            max_in_flight,
            now,
            random,
        )?;
        Some((chosen.0, chosen.1.clone()))
    }

    /// [`Balancer::pick`] over any items that name an address and carry their statistics (the
    /// compiled routes' endpoints): no lookup and, for a single endpoint, no allocation.
    /// `avoided` says whether an address was tried already.
    #[allow(clippy::too_many_arguments)]
    pub fn pick_by<'a, T>(
        &self,
        items: &'a [T],
        parts: impl Fn(&T) -> (&str, &EndpointStats),
        policy: LoadBalancerPolicy,
        avoided: impl Fn(&str) -> bool,
        max_ejected_percent: u32,
        max_in_flight: Option<u32>,
        now: Instant,
        mut random: impl FnMut() -> f64,
    ) -> Option<&'a T> {
        let at_limit = |s: &EndpointStats| max_in_flight.is_some_and(|max| s.in_flight() >= max);
        if let [only] = items {
            // The general rules for one endpoint: its ejection is honoured only at 100 %.
            let (_, stats) = parts(only);
            let honoured = max_ejected_percent >= 100 && stats.ejected_until(now).is_some();
            return (!honoured && !at_limit(stats)).then_some(only);
        }
        // Honour at most max_ejected_percent of the endpoints' ejections (those ejected until
        // latest); beyond that, ejected endpoints take traffic again rather than overload the rest.
        let allowed = items.len() * max_ejected_percent as usize / 100;
        let mut ejected: Vec<(&str, Instant)> = items
            .iter()
            .filter_map(|item| {
                let (address, stats) = parts(item);
                stats.ejected_until(now).map(|until| (address, until))
            })
            .collect();
        ejected.sort_by_key(|(_, until)| *until);
        let honoured: Vec<&str> = ejected
            .iter()
            .rev()
            .take(allowed)
            .map(|(a, _)| *a)
            .collect();
        let usable = |avoid_tried: bool| -> Vec<&T> {
            items
                .iter()
                .filter(|item| {
                    let (address, stats) = parts(item);
                    let ejected_now = honoured.contains(&address);
                    let avoid = avoid_tried && avoided(address);
                    !(ejected_now || avoid || at_limit(stats))
                })
                .collect()
        };
        let mut candidates = usable(true);
        if candidates.is_empty() {
            candidates = usable(false);
        }
        let chosen = match (candidates.len(), policy) {
            (0, _) => return None,
            (1, _) => candidates[0],
            (n, LoadBalancerPolicy::RoundRobin) => {
                candidates[self.round_robin.fetch_add(1, Ordering::Relaxed) % n]
            }
            (n, LoadBalancerPolicy::P2cPeakEwma | LoadBalancerPolicy::LeastRequest) => {
                let a = ((random() * n as f64) as usize).min(n - 1);
                let mut b = ((random() * (n - 1) as f64) as usize).min(n - 2);
                if b >= a {
                    b += 1;
                }
                let (x, y) = (candidates[a], candidates[b]);
                let (xs, ys) = (parts(x).1, parts(y).1);
                let better = match policy {
                    LoadBalancerPolicy::LeastRequest => xs.in_flight() <= ys.in_flight(),
                    _ => xs.cost() <= ys.cost(),
                };
                if better {
                    x
                } else {
                    y
                }
            }
        };
        Some(chosen)
    }

    /// Starts an attempt on `stats` (in-flight +1 until the guard drops).
    pub fn start(stats: &Arc<EndpointStats>) -> InFlight {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(stats.clone())
    }

    /// Records an attempt's outcome. Returns `true` when this failure ejected the endpoint.
    pub fn record(
        stats: &EndpointStats,
        health: Health,
        latency: Option<Duration>,
        outlier: Option<&OutlierDetection>,
        now: Instant,
    ) -> bool {
        if let Some(rtt) = latency {
            stats
                .latency
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .observe(rtt, now);
        }
        match health {
            Health::Success => {
                stats.consecutive_failures.store(0, Ordering::Relaxed);
                // Health earns back the ejection multiplier, one step per success.
                let _ = stats
                    .ejections
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
                false
            }
            Health::Failure => {
                // Failures of attempts still running when the endpoint was ejected do not count
                // towards the next ejection; it starts from zero when re-admitted.
                if stats.is_ejected(now) {
                    return false;
                }
                let failures = stats.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                let Some(outlier) = outlier else { return false };
                if failures < outlier.consecutive_failures {
                    return false;
                }
                let mut until = stats
                    .ejected_until
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if until.is_some_and(|u| now < u) {
                    return false; // a concurrent failure ejected it already
                }
                // The n-th ejection lasts n × base (Envoy), capped at 10 × base.
                let n = (stats.ejections.fetch_add(1, Ordering::Relaxed) + 1).min(10);
                *until = now.checked_add(outlier.base_ejection_time.get() * n);
                stats.consecutive_failures.store(0, Ordering::Relaxed);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshflow_policies::SpiffeId;

    fn endpoints(n: usize) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                address: format!("127.0.0.1:{}", 1000 + i),
                identity: SpiffeId::new("cluster.local", "default", "x").unwrap(),
            })
            .collect()
    }

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new();
        e.observe(Duration::from_millis(10), t0);
        e.observe(Duration::from_millis(50), t0 + Duration::from_millis(1));
        assert_eq!(e.estimate_ns(), 50e6, "a slower sample is taken at once");
        e.observe(Duration::from_millis(10), t0 + Duration::from_secs(10));
        let after = e.estimate_ns();
        assert!(
            after < 30e6 && after > 10e6,
            "decays towards faster samples: {after}"
        );
    }

    #[test]
    fn p2c_avoids_the_slow_endpoint() {
        let b = Balancer::default();
        let eps = endpoints(3);
        let start = Instant::now();
        let mut seed = 7;
        let mut slow_hits = 0;
        for i in 0..2000u64 {
            let now = start + Duration::from_millis(i);
            let (ep, stats) = b
                .pick(
                    &eps,
                    LoadBalancerPolicy::P2cPeakEwma,
                    &[],
                    50,
                    None,
                    now,
                    || lcg(&mut seed),
                )
                .unwrap();
            let rtt = if ep.address.ends_with("1002") {
                Duration::from_millis(51)
            } else {
                Duration::from_millis(1)
            };
            if ep.address.ends_with("1002") {
                slow_hits += 1;
            }
            Balancer::record(&stats, Health::Success, Some(rtt), None, now);
        }
        assert!(slow_hits < 400, "slow endpoint got {slow_hits} of 2000");
    }

    #[test]
    fn ejection_skips_then_readmits() {
        let b = Balancer::default();
        let eps = endpoints(2);
        let outlier = OutlierDetection {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(2).into(),
            max_ejected_percent: 50,
        };
        let now = Instant::now();
        let bad = b.stats(&eps[0].address);
        for i in 0..3 {
            let ejected = Balancer::record(&bad, Health::Failure, None, Some(&outlier), now);
            assert_eq!(ejected, i == 2);
        }
        let mut seed = 1;
        for _ in 0..100 {
            let (ep, _) = b
                .pick(
                    &eps,
                    LoadBalancerPolicy::RoundRobin,
                    &[],
                    50,
                    None,
                    now,
                    || lcg(&mut seed),
                )
                .unwrap();
            assert_eq!(ep.address, eps[1].address, "ejected endpoint gets nothing");
        }
        let later = now + Duration::from_secs(3);
        let picked: Vec<String> = (0..10)
            .map(|_| {
                b.pick(
                    &eps,
                    LoadBalancerPolicy::RoundRobin,
                    &[],
                    50,
                    None,
                    later,
                    || lcg(&mut seed),
                )
                .unwrap()
                .0
                .address
                .clone()
            })
            .collect();
        assert!(
            picked.contains(&eps[0].address),
            "re-admitted after the ejection time"
        );
    }

    #[test]
    fn in_flight_limit_and_avoid() {
        let b = Balancer::default();
        let eps = endpoints(2);
        let now = Instant::now();
        let mut seed = 3;
        let (first, stats) = b
            .pick(
                &eps,
                LoadBalancerPolicy::RoundRobin,
                &[],
                50,
                Some(1),
                now,
                || lcg(&mut seed),
            )
            .unwrap();
        let _guard = Balancer::start(&stats);
        let (second, stats2) = b
            .pick(
                &eps,
                LoadBalancerPolicy::RoundRobin,
                &[],
                50,
                Some(1),
                now,
                || lcg(&mut seed),
            )
            .unwrap();
        assert_ne!(
            first.address, second.address,
            "the busy endpoint is at its limit"
        );
        let _guard2 = Balancer::start(&stats2);
        assert!(b
            .pick(
                &eps,
                LoadBalancerPolicy::RoundRobin,
                &[],
                50,
                Some(1),
                now,
                || lcg(&mut seed)
            )
            .is_none());
        drop(_guard);
        let avoid = vec![eps[1].address.clone()];
        let (ep, _) = b
            .pick(
                &eps,
                LoadBalancerPolicy::RoundRobin,
                &avoid,
                50,
                None,
                now,
                || lcg(&mut seed),
            )
            .unwrap();
        assert_eq!(ep.address, eps[0].address);
    }
}
