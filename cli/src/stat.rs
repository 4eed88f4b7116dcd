//! `meshflow stat`: per-workload success rate, request rate and p50/p99 latency of a running
//! local mesh, like `linkerd viz stat`, read from each sidecar's admin `/metrics` twice, a
//! window apart (inbound traffic: what each workload served). Success = not 5xx (Linkerd's
//! definition). Latency quantiles are interpolated within histogram buckets, as Prometheus'
//! `histogram_quantile` does.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};

/// One workload's figures over the window.
#[derive(Debug, Clone, PartialEq)]
pub struct StatRow {
    /// `namespace/name`.
    pub workload: String,
    /// Requests in the window.
    pub requests: f64,
    /// Share of them that were not 5xx (0–1); `None` without requests.
    pub success: Option<f64>,
    /// Requests per second.
    pub rps: f64,
    /// Median latency, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, ms.
    pub p99_ms: Option<f64>,
}

/// Inbound totals of one scrape: (requests by status code, latency buckets (le, count)).
#[derive(Debug, Default, Clone)]
struct Totals {
    by_code: BTreeMap<String, f64>,
    buckets: Vec<(f64, f64)>,
}

fn totals(text: &str) -> std::io::Result<Totals> {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    let mut t = Totals::default();
    for sample in scrape.samples {
        if sample.labels.get("direction") != Some("inbound") {
            continue;
        }
        match (sample.metric.as_str(), sample.value) {
            ("meshflow_requests_total", Value::Counter(v) | Value::Untyped(v)) => {
                let code = sample.labels.get("status_code").unwrap_or("0").to_string();
                *t.by_code.entry(code).or_default() += v;
            }
            // One series per caller: add the cumulative buckets up by bound.
            ("meshflow_request_duration_seconds", Value::Histogram(buckets)) => {
                if t.buckets.is_empty() {
                    t.buckets = buckets.iter().map(|b| (b.less_than, 0.0)).collect();
                }
                for (sum, b) in t.buckets.iter_mut().zip(buckets.iter()) {
                    sum.1 += b.count;
                }
            }
            _ => {}
        }
    }
    Ok(t)
}

/// Prometheus' `histogram_quantile` over cumulative buckets (le in seconds), in ms.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0 * 1000.0);
            }
            let within = if count > prev.1 {
                (rank - prev.1) / (count - prev.1)
            } else {
                0.0
            };
            return Some((prev.0 + (le - prev.0) * within) * 1000.0);
        }
        prev = (le, count);
    }
    None
}

/// Figures between two scrapes taken `window` apart.
fn row(workload: String, before: &Totals, after: &Totals, window: Duration) -> StatRow {
    let delta = |code: &str| {
        after.by_code.get(code).copied().unwrap_or(0.0)
            - before.by_code.get(code).copied().unwrap_or(0.0)
    };
    // `+ 0.0`: an empty f64 sum is -0.0, which prints as "-0.00".
    let requests: f64 = after.by_code.keys().map(|c| delta(c)).sum::<f64>() + 0.0;
    let failures: f64 = after
        .by_code
        .keys()
        .filter(|c| c.starts_with('5'))
        .map(|c| delta(c))
        .sum();
    let buckets: Vec<(f64, f64)> = after
        .buckets
        .iter()
        .map(|(le, count)| {
            let was = before
                .buckets
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, count - was)
        })
        .collect();
    StatRow {
        workload,
        requests,
        success: (requests > 0.0).then(|| (requests - failures) / requests),
        rps: requests / window.as_secs_f64(),
        p50_ms: quantile(0.5, &buckets),
        p99_ms: quantile(0.99, &buckets),
    }
}

/// The sidecars of a local mesh: (admin address) from `<state-dir>/ready/proxy-*.json`.
pub fn sidecar_admins(state_dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(state_dir.join("ready"))? {
        let path = entry?.path();
        let is_proxy = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("proxy-") && n.ends_with(".json"));
        if let (true, Some(ready)) = (is_proxy, meshflow_api::ReadyFile::read(&path)) {
            if let Some(admin) = ready.address("admin") {
                out.push(admin.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Scrapes every admin address twice, `window` apart, and returns one row per workload.
///
/// # Errors
/// A sidecar that cannot be scraped.
pub async fn stat(admins: &[String], window: Duration) -> Result<Vec<StatRow>, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let scrape = |admin: String| {
        let http = http.clone();
        async move {
            let text = http
                .get(format!("http://{admin}/metrics"))
                .send()
                .await
                .map_err(|e| format!("{admin}: {e}"))?
                .text()
                .await
                .map_err(|e| e.to_string())?;
            totals(&text).map_err(|e| format!("{admin}: {e}"))
        }
    };
    let mut names = Vec::new();
    for admin in admins {
        let dump: serde_json::Value = http
            .get(format!("http://{admin}/config_dump"))
            .send()
            .await
            .map_err(|e| format!("{admin}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("{admin}: {e}"))?;
        names.push(dump["workload"].as_str().unwrap_or(admin).to_string());
    }
    let before = futures::future::try_join_all(admins.iter().cloned().map(scrape)).await?;
    tokio::time::sleep(window).await;
    let after = futures::future::try_join_all(admins.iter().cloned().map(scrape)).await?;
    Ok(names
        .into_iter()
        .zip(before.iter().zip(after.iter()))
        .map(|(name, (b, a))| row(name, b, a, window))
        .collect())
}

/// `host:port` of a sidecar admin endpoint given as `host:port` or `http://host:port[/]`
/// (the form `meshflow up` prints).
///
/// # Errors
/// Another scheme or a path.
pub fn admin_address(given: &str) -> Result<String, String> {
    let trimmed = given.trim().trim_end_matches('/');
    let host_port = match trimmed.split_once("://") {
        Some(("http", rest)) => rest,
        Some(_) => return Err(format!("--admin {given:?}: the admin endpoint speaks plain http; give host:port or http://host:port")),
        None => trimmed,
    };
    match host_port.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok() => {
            Ok(host_port.to_string())
        }
        _ => Err(format!(
            "--admin {given:?}: expected a sidecar's admin address, host:port or http://host:port (the ADMIN column of `meshflow up`)"
        )),
    }
}

/// `v` with a negative zero made positive (so it never prints as `-0.00`).
fn unsigned_zero(v: f64) -> f64 {
    if v == 0.0 {
        0.0
    } else {
        v
    }
}

/// The human table.
pub fn table(rows: &[StatRow]) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}ms", unsigned_zero(v)));
    let mut out = format!(
        "{:<28} {:>8} {:>9} {:>11} {:>11}\n",
        "WORKLOAD", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P99"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<28} {:>8} {:>9.2} {:>11} {:>11}\n",
            r.workload,
            r.success.map_or("-".to_string(), |s| format!(
                "{:.2}%",
                unsigned_zero(s * 100.0)
            )),
            unsigned_zero(r.rps),
            ms(r.p50_ms),
            ms(r.p99_ms)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        // 10 requests ≤ 1 ms, 10 more ≤ 5 ms.
        let buckets = [(0.001, 10.0), (0.005, 20.0), (f64::INFINITY, 20.0)];
        assert_eq!(quantile(0.5, &buckets), Some(1.0));
        let p99 = quantile(0.99, &buckets).unwrap();
        assert!((p99 - 4.92).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(0.5, &[(0.001, 0.0)]), None);
    }

    /// Issue 12, item 15: a workload without requests printed `-0.00` requests/s.
    #[test]
    fn no_requests_print_zero_not_negative_zero() {
        let idle = totals("# TYPE meshflow_requests_total counter\n").unwrap();
        let r = row("default/b".into(), &idle, &idle, Duration::from_secs(2));
        assert!(r.rps.is_sign_positive(), "{r:?}");
        let text = table(&[
            r,
            StatRow {
                workload: "x".into(),
                requests: -0.0,
                success: None,
                rps: -0.0,
                p50_ms: Some(-0.0),
                p99_ms: None,
            },
        ]);
        assert!(!text.contains("-0"), "{text}");
        assert!(text.contains(" 0.00 "), "{text}");
    }

    #[test]
    fn admin_addresses_as_up_prints_them() {
        for given in [
            "127.0.0.1:9901",
            "http://127.0.0.1:9901",
            "http://127.0.0.1:9901/",
        ] {
            assert_eq!(admin_address(given).unwrap(), "127.0.0.1:9901");
        }
        assert!(admin_address("https://127.0.0.1:1").is_err());
        assert!(admin_address("http://127.0.0.1:1/metrics").is_err());
        assert!(admin_address("nonsense").is_err());
    }

    #[test]
    fn rows_come_from_deltas() {
        let before = totals("# TYPE meshflow_requests_total counter\nmeshflow_requests_total{direction=\"inbound\",service=\"b\",status_code=\"200\"} 5\n").unwrap();
        let after = totals("# TYPE meshflow_requests_total counter\nmeshflow_requests_total{direction=\"inbound\",service=\"b\",status_code=\"200\"} 35\nmeshflow_requests_total{direction=\"inbound\",service=\"b\",status_code=\"500\"} 10\nmeshflow_requests_total{direction=\"outbound\",service=\"b\",status_code=\"500\"} 99\n").unwrap();
        let r = row("default/b".into(), &before, &after, Duration::from_secs(2));
        assert_eq!(r.requests, 40.0);
        assert_eq!(r.success, Some(0.75));
        assert_eq!(r.rps, 20.0);
    }
}
