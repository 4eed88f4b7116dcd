//! Pure resilience decisions for the outbound path: retry eligibility and classification,
//! backoff with full jitter, `Retry-After` / `grpc-retry-pushback-ms`, gRPC deadlines, and the
//! retry budget. No I/O and no clock of their own: every time is passed in, so the decisions
//! are unit-tested on a controlled clock.
//!
//! Specs: RFC 9110 §9.2.2 (idempotent methods), §10.2.3 (`Retry-After`); gRPC A6 (retry
//! pushback), gRPC over HTTP/2 (`grpc-timeout`); Finagle/Linkerd retry budgets.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use meshflow_policies::traffic::{RetryCondition, RetryOn};

/// What an attempt ended with, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// No connection could be made (never reached the server).
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM (the server did not process it).
    RefusedStream,
    /// Connection or stream reset before response headers.
    Reset,
    /// The attempt hit `perAttempt` before response headers.
    PerAttemptTimeout,
    /// Response headers arrived with this HTTP status and, for gRPC Trailers-Only responses,
    /// this gRPC status code.
    Response {
        /// HTTP status.
        status: u16,
        /// `grpc-status` from the response headers, if any.
        grpc_status: Option<u32>,
    },
}

/// gRPC status codes meshflow names in `retryOn`.
fn grpc_code(condition: RetryCondition) -> Option<u32> {
    match condition {
        RetryCondition::Cancelled => Some(1),
        RetryCondition::DeadlineExceeded => Some(4),
        RetryCondition::ResourceExhausted => Some(8),
        RetryCondition::Internal => Some(13),
        RetryCondition::Unavailable => Some(14),
        _ => None,
    }
}

/// Whether `method` is idempotent (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// Why a request may not be retried at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRetryable {
    /// Body larger than the replay buffer or not yet complete when needed.
    Body,
}

/// Whether `outcome` matches a `retryOn` list, given whether the request's method permits
/// retrying after the server may have acted on it (idempotent, `Idempotency-Key`, or
/// `retryNonIdempotent`). Connect failures and refused streams never reached the server, so
/// they apply to any method; gRPC status conditions are the service owner's opt-in and apply
/// to any method too.
pub fn matches_retry_on(retry_on: &[RetryOn], outcome: AttemptOutcome, replay_safe: bool) -> bool {
    retry_on.iter().any(|on| match (*on, outcome) {
        (RetryOn::Condition(RetryCondition::ConnectFailure), AttemptOutcome::ConnectFailure) => {
            true
        }
        (RetryOn::Condition(RetryCondition::RefusedStream), AttemptOutcome::RefusedStream) => true,
        (RetryOn::Condition(RetryCondition::Reset), AttemptOutcome::Reset) => replay_safe,
        (
            RetryOn::Condition(RetryCondition::PerAttemptTimeout),
            AttemptOutcome::PerAttemptTimeout,
        ) => replay_safe,
        (RetryOn::Condition(RetryCondition::FiveXx), AttemptOutcome::Response { status, .. }) => {
            replay_safe && (500..=599).contains(&status)
        }
        (
            RetryOn::Condition(RetryCondition::GatewayError),
            AttemptOutcome::Response { status, .. },
        ) => replay_safe && matches!(status, 502..=504),
        (RetryOn::Status(code), AttemptOutcome::Response { status, .. }) => {
            replay_safe && code == status
        }
        (
            RetryOn::Condition(c),
            AttemptOutcome::Response {
                grpc_status: Some(g),
                ..
            },
        ) => grpc_code(c) == Some(g),
        _ => false,
    })
}

/// The retry conditions used when no TrafficPolicy applies: only what never reached the server.
pub const DEFAULT_RETRY_ON: &[RetryOn] = &[
    RetryOn::Condition(RetryCondition::ConnectFailure),
    RetryOn::Condition(RetryCondition::RefusedStream),
];

/// Full-jitter exponential backoff before retry number `retry` (1 = first retry):
/// `uniform(0, min(max, base · 2^(retry−1)))`; `unit` is a uniform sample in [0, 1).
pub fn backoff_delay(retry: u32, base: Duration, max: Duration, unit: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << (retry.saturating_sub(1)).min(20));
    exp.min(max).mul_f64(unit.clamp(0.0, 1.0))
}

/// A server's request to wait before retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushback {
    /// Wait this long.
    Wait(Duration),
    /// Do not retry (gRPC A6: negative or unparsable `grpc-retry-pushback-ms`).
    DoNotRetry,
}

/// Parses `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date. `None` when
/// unparsable (the caller falls back to its default backoff).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// Parses `grpc-retry-pushback-ms` (gRPC A6).
pub fn parse_grpc_pushback(value: &str) -> Pushback {
    match value.trim().parse::<i64>() {
        Ok(ms) if ms >= 0 => Pushback::Wait(Duration::from_millis(ms as u64)),
        _ => Pushback::DoNotRetry,
    }
}

/// Parses a `grpc-timeout` header: at most 8 digits and a unit (`H M S m u n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a remaining deadline as `grpc-timeout`, rounding down to the finest unit that fits
/// in 8 digits (so the upstream never gets more time than is left).
pub fn format_grpc_timeout(remaining: Duration) -> String {
    let units: [(u128, &str); 4] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
    ];
    let nanos = remaining.as_nanos();
    for (per, unit) in units {
        let n = nanos / per;
        if n < 100_000_000 {
            return format!("{n}{unit}");
        }
    }
    format!("{}M", (remaining.as_secs() / 60).min(99_999_999))
}

/// What to do about a server's requested wait (`Retry-After`, `grpc-retry-pushback-ms`): wait
/// exactly that long if it is within `max_retry_after` and fits the remaining deadline; otherwise
/// `None`, and the response goes back to the caller at once (waiting less than the server asked
/// would be ignoring it; waiting longer than allowed would hold the caller).
pub fn pushback_wait(
    pushback: Duration,
    max_retry_after: Duration,
    remaining: Option<Duration>,
) -> Option<Duration> {
    if pushback > max_retry_after {
        return None;
    }
    match remaining {
        Some(left) if pushback >= left => None,
        _ => Some(pushback),
    }
}

/// Retry budget (Finagle/Linkerd): over a sliding window, retries may add at most `ratio` of
/// the requests seen plus `min_per_second` × window seconds. Ten one-second buckets.
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    inner: Mutex<BudgetWindow>,
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.ratio)
            .field("min_per_second", &self.min_per_second)
            .finish_non_exhaustive()
    }
}

/// Length of the budget window.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
const BUCKETS: usize = 10;

struct BudgetWindow {
    /// The start of second 0: the first request or retry counted (a budget made when a route
    /// is compiled starts its seconds with its traffic, not with the config push).
    origin: Option<Instant>,
    /// (second index, requests, retries) per bucket.
    buckets: [(u64, u64, u64); BUCKETS],
}

impl RetryBudget {
    /// A budget; its window starts with the first request or retry counted.
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        Self {
            ratio,
            min_per_second,
            inner: Mutex::new(BudgetWindow {
                origin: None,
                buckets: [(u64::MAX, 0, 0); BUCKETS],
            }),
        }
    }

    fn bucket(window: &mut BudgetWindow, now: Instant) -> &mut (u64, u64, u64) {
        let origin = *window.origin.get_or_insert(now);
        let second = now.saturating_duration_since(origin).as_secs();
        let slot = &mut window.buckets[(second % BUCKETS as u64) as usize];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot
    }

    fn totals(window: &BudgetWindow, now: Instant) -> (u64, u64) {
        let Some(origin) = window.origin else {
            return (0, 0);
        };
        let second = now.saturating_duration_since(origin).as_secs();
        window
            .buckets
            .iter()
            .filter(|(s, _, _)| *s != u64::MAX && *s + BUCKETS as u64 > second && *s <= second)
            .fold((0, 0), |(req, ret), (_, r, t)| (req + r, ret + t))
    }

    /// Records an original request (not a retry).
    pub fn record_request(&self, now: Instant) {
        let mut window = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Self::bucket(&mut window, now).1 += 1;
    }

    /// Withdraws one retry if the budget allows; `false` means "budget exhausted".
    pub fn try_retry(&self, now: Instant) -> bool {
        let mut window = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (requests, retries) = Self::totals(&window, now);
        let allowed = self.ratio * requests as f64
            + f64::from(self.min_per_second) * BUDGET_WINDOW.as_secs_f64();
        if (retries as f64) < allowed {
            Self::bucket(&mut window, now).2 += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[RetryOn] = &[
        RetryOn::Condition(RetryCondition::ConnectFailure),
        RetryOn::Condition(RetryCondition::GatewayError),
        RetryOn::Condition(RetryCondition::Unavailable),
        RetryOn::Status(429),
    ];

    #[test]
    fn classification_respects_method_safety() {
        let r503 = AttemptOutcome::Response {
            status: 503,
            grpc_status: None,
        };
        assert!(matches_retry_on(ALL, r503, true));
        assert!(
            !matches_retry_on(ALL, r503, false),
            "a POST that reached the server is not retried"
        );
        assert!(
            matches_retry_on(ALL, AttemptOutcome::ConnectFailure, false),
            "never reached the server"
        );
        assert!(matches_retry_on(
            ALL,
            AttemptOutcome::Response {
                status: 429,
                grpc_status: None
            },
            true
        ));
        assert!(!matches_retry_on(
            ALL,
            AttemptOutcome::Response {
                status: 500,
                grpc_status: None
            },
            true
        ));
        let unavailable = AttemptOutcome::Response {
            status: 200,
            grpc_status: Some(14),
        };
        assert!(
            matches_retry_on(ALL, unavailable, false),
            "gRPC conditions apply to any method"
        );
        assert!(
            !matches_retry_on(DEFAULT_RETRY_ON, r503, true),
            "no policy: only never-sent failures"
        );
        assert!(is_idempotent("PUT") && !is_idempotent("POST") && !is_idempotent("PATCH"));
    }

    #[test]
    fn backoff_is_full_jitter_and_capped() {
        let (base, max) = (Duration::from_millis(25), Duration::from_millis(250));
        assert_eq!(backoff_delay(1, base, max, 1.0), Duration::from_millis(25));
        assert_eq!(backoff_delay(3, base, max, 1.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(10, base, max, 1.0), max);
        assert_eq!(backoff_delay(3, base, max, 0.5), Duration::from_millis(50));
        assert_eq!(backoff_delay(3, base, max, 0.0), Duration::ZERO);
    }

    #[test]
    fn retry_after_and_pushback() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("soon", now), None);
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_grpc_pushback("150"),
            Pushback::Wait(Duration::from_millis(150))
        );
        assert_eq!(parse_grpc_pushback("-1"), Pushback::DoNotRetry);
        assert_eq!(parse_grpc_pushback("x"), Pushback::DoNotRetry);
        let ten = Duration::from_secs(10);
        assert_eq!(
            pushback_wait(Duration::from_secs(2), ten, Some(Duration::from_secs(5))),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            pushback_wait(Duration::from_secs(30), ten, None),
            None,
            "longer than allowed"
        );
        assert_eq!(
            pushback_wait(Duration::from_secs(30), ten, Some(Duration::from_secs(5))),
            None
        );
    }

    #[test]
    fn grpc_timeout_round_trips_and_never_grows() {
        assert_eq!(parse_grpc_timeout("500m"), Some(Duration::from_millis(500)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789S"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        for d in [
            Duration::from_millis(499),
            Duration::from_secs(3),
            Duration::from_secs(100_000),
            Duration::from_nanos(7),
        ] {
            let text = format_grpc_timeout(d);
            let back = parse_grpc_timeout(&text).unwrap();
            assert!(back <= d, "{d:?} → {text} → {back:?}");
            assert!(d - back < Duration::from_secs(60), "{d:?} → {text}");
        }
    }

    #[test]
    fn budget_allows_ratio_plus_minimum_over_the_window() {
        let start = Instant::now();
        let budget = RetryBudget::new(0.2, 10);
        // 200 req/s for 10 s against an always-failing upstream: each request wants a retry.
        let mut retries = 0u64;
        let mut refused = 0u64;
        for i in 0..2000u64 {
            let now = start + Duration::from_millis(i * 5);
            budget.record_request(now);
            if budget.try_retry(now) {
                retries += 1;
            } else {
                refused += 1;
            }
        }
        assert!((300..=500).contains(&retries), "retries {retries}");
        assert!(refused > 0);
        // After the window passes with no traffic, the minimum is available again.
        let later = start + Duration::from_secs(60);
        assert!(budget.try_retry(later));
    }
}
