//! The control plane's replicas as `meshflow check` reaches their admin listeners: at a URL
//! given with `--control-plane-admin` (a control plane outside the cluster), or through the
//! API server's pod proxy (`/api/v1/namespaces/<ns>/pods/<pod>:<port>/proxy/<path>`, as
//! istioctl does), which needs no network path from this machine to the pods.

use std::time::Duration;

use http_body_util::BodyExt;

/// At most this much of an admin answer is read (`/config_dump` of a large mesh is big).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Where one replica's admin listener is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replica {
    /// `http://host:port` (no trailing slash).
    Url(String),
    /// A pod, through the API server's proxy.
    Pod {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The admin container port (the chart's port `admin`, 15014).
        port: u16,
    },
}

impl Replica {
    /// How it is named in results: the URL, or `pod <ns>/<name>`.
    pub fn label(&self) -> String {
        match self {
            Replica::Url(url) => url.clone(),
            Replica::Pod {
                namespace, name, ..
            } => format!("pod {namespace}/{name}"),
        }
    }

    /// Where `path` is fetched from, for messages.
    pub fn location(&self, path: &str) -> String {
        match self {
            Replica::Url(url) => format!("{url}{path}"),
            Replica::Pod {
                namespace,
                name,
                port,
            } => format!("/api/v1/namespaces/{namespace}/pods/{name}:{port}/proxy{path}"),
        }
    }

    /// GETs `path` (`/ready`, `/proxies`, `/config_dump`) within `timeout`: the HTTP status and
    /// the body.
    ///
    /// # Errors
    /// Nothing answered (refused, unreachable, timed out), or the body was unreadable — the
    /// message names the URL (or the pod-proxy path) and the error.
    pub async fn get(
        &self,
        http: &reqwest::Client,
        kube: &kube::Client,
        path: &str,
        timeout: Duration,
    ) -> Result<(u16, String), String> {
        let location = self.location(path);
        let fetch = async {
            match self {
                Replica::Url(url) => {
                    let response = http
                        .get(format!("{url}{path}"))
                        .send()
                        .await
                        .map_err(|e| format!("cannot reach {location}: {}", chain(&e)))?;
                    let status = response.status().as_u16();
                    let body = response
                        .text()
                        .await
                        .map_err(|e| format!("reading {location}: {}", chain(&e)))?;
                    Ok((status, body))
                }
                Replica::Pod { .. } => {
                    let request = http::Request::get(&location)
                        .body(kube::client::Body::empty())
                        .map_err(|e| e.to_string())?;
                    let response = kube.send(request).await.map_err(|e| {
                        format!(
                            "cannot reach {location} through the API server: {}",
                            chain(&e)
                        )
                    })?;
                    let status = response.status().as_u16();
                    let bytes = http_body_util::Limited::new(response.into_body(), MAX_BODY)
                        .collect()
                        .await
                        .map_err(|e| format!("reading {location}: {e}"))?
                        .to_bytes();
                    let body = String::from_utf8_lossy(&bytes).into_owned();
                    // A `Status` object is the API server's own answer (it could not reach the
                    // pod, or refused the proxy); the control plane never answers one.
                    if !(200..300).contains(&status) {
                        if let Some(message) = api_server_refusal(&body) {
                            return Err(format!(
                                "the API server could not proxy to {location}: {status} {message}"
                            ));
                        }
                    }
                    Ok((status, body))
                }
            }
        };
        match tokio::time::timeout(timeout, fetch).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer from {location} within {timeout:?}")),
        }
    }
}

/// `--control-plane-admin` as a base URL: `http://host:port` (a bare `host:port` gets
/// `http://`; a trailing slash is dropped).
///
/// # Errors
/// Not an `http://` or `https://` URL with a host.
pub fn admin_url(given: &str) -> Result<String, String> {
    let with_scheme = if given.contains("://") {
        given.to_string()
    } else {
        format!("http://{given}")
    };
    let url = reqwest::Url::parse(&with_scheme)
        .map_err(|e| format!("--control-plane-admin {given:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "--control-plane-admin {given:?}: expected http://host:port"
        ));
    }
    Ok(with_scheme.trim_end_matches('/').to_string())
}

/// The message of a Kubernetes `Status` object (`{"kind": "Status", "message": …}`), when
/// `body` is one.
pub fn api_server_refusal(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    (value["kind"] == "Status").then(|| value["message"].as_str().unwrap_or_default().to_string())
}

/// An error and its sources, `: `-separated.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// One sidecar in a replica's `/proxies` answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyEntry {
    /// `<namespace>/<pod>`.
    pub workload: String,
    /// Its SPIFFE ID.
    #[serde(default)]
    pub identity: String,
    /// The newest version sent to it.
    #[serde(default)]
    pub sent_version: Option<u64>,
    /// The newest version it accepted.
    #[serde(default)]
    pub accepted_version: Option<u64>,
    /// Its newest rejection, when its newest acknowledgement was one.
    #[serde(default)]
    pub rejected: Option<RejectedEntry>,
}

/// A version a sidecar refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct RejectedEntry {
    /// The version.
    pub version: u64,
    /// The sidecar's reason.
    pub reason: String,
}

/// A replica's `/proxies` answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ProxiesAnswer {
    /// The replica's current snapshot version.
    pub version: u64,
    /// The sidecars connected to it.
    pub proxies: Vec<ProxyEntry>,
}

/// Whether a sidecar refused `version` (or a newer one): it keeps its previous config until
/// the cause is fixed, so waiting does not help.
fn refused(entry: &ProxyEntry, version: u64) -> bool {
    entry
        .rejected
        .as_ref()
        .is_some_and(|r| r.version >= version)
}

/// Whether a sidecar is not on `version` yet but has not refused it: its acknowledgement may
/// still come.
pub fn awaiting_ack(entry: &ProxyEntry, version: u64) -> bool {
    entry.accepted_version != Some(version) && !refused(entry, version)
}

/// Why a sidecar is not on `version`, or `None` when it is. (A rejection of an older version
/// while `version` is in flight counts as in flight.)
pub fn behind(entry: &ProxyEntry, version: u64) -> Option<String> {
    if let (true, Some(rejected)) = (refused(entry, version), &entry.rejected) {
        return Some(format!(
            "{} rejected version {}: {} (it runs {})",
            entry.workload,
            rejected.version,
            rejected.reason,
            entry
                .accepted_version
                .map_or("no config".to_string(), |v| format!("version {v}"))
        ));
    }
    if entry.accepted_version == Some(version) {
        return None;
    }
    let accepted = entry
        .accepted_version
        .map_or("has accepted no config".to_string(), |v| {
            format!("runs version {v}")
        });
    let sent = match entry.sent_version {
        Some(v) if v == version => format!("version {v} was sent, no answer yet"),
        Some(v) => format!("was last sent version {v}"),
        None => "was sent nothing yet".to_string(),
    };
    Some(format!("{} {accepted} ({sent})", entry.workload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(accepted: Option<u64>, sent: Option<u64>) -> ProxyEntry {
        ProxyEntry {
            workload: "shop/web-1".into(),
            identity: String::new(),
            sent_version: sent,
            accepted_version: accepted,
            rejected: None,
        }
    }

    #[test]
    fn a_sidecar_is_current_only_on_the_replicas_version_without_a_rejection() {
        assert_eq!(behind(&entry(Some(7), Some(7)), 7), None);
        let text = behind(&entry(Some(6), Some(7)), 7).unwrap();
        assert_eq!(
            text,
            "shop/web-1 runs version 6 (version 7 was sent, no answer yet)"
        );
        assert!(behind(&entry(None, None), 7)
            .unwrap()
            .contains("has accepted no config"));
        let mut rejecting = entry(Some(6), Some(7));
        rejecting.rejected = Some(RejectedEntry {
            version: 7,
            reason: "bad policy".into(),
        });
        assert_eq!(
            behind(&rejecting, 7).unwrap(),
            "shop/web-1 rejected version 7: bad policy (it runs version 6)"
        );
        assert!(!awaiting_ack(&rejecting, 7), "a refusal is final");
        // Version 8 is in flight after the refusal of 7: waiting may help.
        let mut next = rejecting.clone();
        next.sent_version = Some(8);
        assert!(awaiting_ack(&next, 8));
        assert_eq!(
            behind(&next, 8).unwrap(),
            "shop/web-1 runs version 6 (version 8 was sent, no answer yet)"
        );
        assert!(!awaiting_ack(&entry(Some(7), Some(7)), 7));
        assert!(awaiting_ack(&entry(Some(6), Some(7)), 7));
    }

    #[test]
    fn reads_the_control_planes_proxies_answer() {
        let answer: ProxiesAnswer = serde_json::from_str(
            r#"{"version": 3, "proxies": [{"workload": "a/b", "identity": "spiffe://x",
               "connectedAtUnixMs": 1, "sentVersion": 3, "sentAtUnixMs": 2,
               "acceptedVersion": 3, "rejected": null}]}"#,
        )
        .unwrap();
        assert_eq!(answer.version, 3);
        assert_eq!(answer.proxies[0].accepted_version, Some(3));
    }

    #[test]
    fn admin_urls_get_a_scheme_and_lose_a_trailing_slash() {
        assert_eq!(
            admin_url("127.0.0.1:15014").unwrap(),
            "http://127.0.0.1:15014"
        );
        assert_eq!(
            admin_url("http://127.0.0.1:15014/").unwrap(),
            "http://127.0.0.1:15014"
        );
        assert!(admin_url("ftp://x").is_err());
        assert!(admin_url("http://").is_err());
    }

    #[test]
    fn the_api_servers_own_refusals_are_told_from_the_control_planes_answers() {
        assert_eq!(
            api_server_refusal(
                r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"address not allowed","code":400}"#
            ),
            Some("address not allowed".to_string())
        );
        assert_eq!(api_server_refusal("not ready: reading the cluster\n"), None);
        assert_eq!(api_server_refusal(r#"{"version": 1}"#), None);
    }

    #[test]
    fn pod_replicas_go_through_the_pod_proxy() {
        let pod = Replica::Pod {
            namespace: "meshflow-system".into(),
            name: "cp-0".into(),
            port: 15014,
        };
        assert_eq!(
            pod.location("/ready"),
            "/api/v1/namespaces/meshflow-system/pods/cp-0:15014/proxy/ready"
        );
        assert_eq!(pod.label(), "pod meshflow-system/cp-0");
    }
}
