//! The sidecars connected to this replica over `Watch`, and where each stands: the version last
//! sent to it and the versions it acknowledged. The admin listener lists them at `/proxies`
//! (`meshflow check` reads it to tell whether every sidecar runs the current config).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// One connected sidecar, as `/proxies` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    /// The workload its `Hello` named (`<namespace>/<pod>` in Kubernetes mode).
    pub workload: String,
    /// Its SPIFFE ID (from its client certificate).
    pub identity: String,
    /// When its stream opened, Unix milliseconds.
    pub connected_at_unix_ms: u64,
    /// The newest snapshot version sent to it.
    pub sent_version: Option<u64>,
    /// When that version was sent, Unix milliseconds.
    pub sent_at_unix_ms: Option<u64>,
    /// The newest version it accepted (the config it runs).
    pub accepted_version: Option<u64>,
    /// When its newest acknowledgement rejected a version: that version and the reason (it
    /// keeps running `accepted_version`).
    pub rejected: Option<Rejected>,
}

/// A version a sidecar refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejected {
    /// The version.
    pub version: u64,
    /// The sidecar's reason.
    pub reason: String,
}

/// The registry of connected sidecars. Cheap to share (`Arc`).
#[derive(Debug, Default)]
pub struct Proxies {
    entries: Mutex<BTreeMap<u64, ProxyStatus>>,
    next: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Proxies {
    /// Registers a stream; it is listed until the returned [`Connection`] is dropped.
    pub fn connect(self: &Arc<Self>, workload: &str, identity: &str) -> Connection {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            ProxyStatus {
                workload: workload.to_string(),
                identity: identity.to_string(),
                connected_at_unix_ms: now_ms(),
                sent_version: None,
                sent_at_unix_ms: None,
                accepted_version: None,
                rejected: None,
            },
        );
        Connection {
            proxies: self.clone(),
            id,
        }
    }

    /// The connected sidecars, by workload.
    pub fn list(&self) -> Vec<ProxyStatus> {
        let mut list: Vec<ProxyStatus> = self.lock().values().cloned().collect();
        list.sort_by(|a, b| {
            (&a.workload, a.connected_at_unix_ms).cmp(&(&b.workload, b.connected_at_unix_ms))
        });
        list
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxyStatus>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, id: u64, change: impl FnOnce(&mut ProxyStatus)) {
        if let Some(entry) = self.lock().get_mut(&id) {
            change(entry);
        }
    }
}

/// One sidecar's open `Watch` stream; unlisted when dropped.
#[derive(Debug)]
pub struct Connection {
    proxies: Arc<Proxies>,
    id: u64,
}

impl Connection {
    /// A snapshot of `version` was sent.
    pub fn sent(&self, version: u64) {
        self.proxies.update(self.id, |e| {
            e.sent_version = Some(version);
            e.sent_at_unix_ms = Some(now_ms());
        });
    }

    /// The sidecar acknowledged `version`: accepted, or rejected for `reason`.
    pub fn acked(&self, version: u64, accepted: bool, reason: &str) {
        self.proxies.update(self.id, |e| {
            if accepted {
                if e.accepted_version.is_none_or(|v| v < version) {
                    e.accepted_version = Some(version);
                }
                e.rejected = None;
            } else {
                e.rejected = Some(Rejected {
                    version,
                    reason: reason.chars().take(1024).collect(),
                });
            }
        });
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.proxies.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_connected_streams_with_what_they_acknowledged() {
        let proxies = Arc::new(Proxies::default());
        let a = proxies.connect("shop/web-1", "spiffe://cluster.local/ns/shop/sa/web");
        let b = proxies.connect("shop/api-1", "spiffe://cluster.local/ns/shop/sa/api");
        a.sent(7);
        a.acked(7, true, "");
        b.sent(7);
        b.acked(7, false, "bad policy");
        let list = proxies.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].workload, "shop/api-1");
        assert_eq!(list[0].accepted_version, None);
        assert_eq!(
            list[0].rejected,
            Some(Rejected {
                version: 7,
                reason: "bad policy".into()
            })
        );
        assert_eq!(list[1].sent_version, Some(7));
        assert_eq!(list[1].accepted_version, Some(7));
        // An old ack arriving late does not move the accepted version back.
        a.acked(5, true, "");
        assert_eq!(proxies.list()[1].accepted_version, Some(7));
        drop(a);
        assert_eq!(proxies.list().len(), 1);
        drop(b);
        assert!(proxies.list().is_empty());
    }
}
