//! One AdmissionReview (`admission.k8s.io/v1` or `v1beta1`) in, the answer out: the bytes of
//! a request body become an HTTP status and a JSON body. The mutation itself is
//! [`meshflow_policies::inject::inject`]; this adds reading the review, the namespace's
//! labels and the failure mode. No sockets: the server ([`super::server`]) bounds size and
//! time, and tests call [`Admission::review`] directly.

use std::collections::BTreeMap;

use async_trait::async_trait;
use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::DynamicObject;
use meshflow_policies::inject::{self, InjectSettings, Outcome};
use serde::Serialize;

/// What the webhook does with a pod it cannot inject (an unusable annotation, a probe on an
/// undeclared port, too many containers, the namespace unreadable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Refuse the pod, with a message naming why (the chart's `failurePolicy: Fail`).
    #[default]
    Deny,
    /// Admit it untouched, without a sidecar, with a warning (`failurePolicy: Ignore`).
    Allow,
}

/// The labels of a namespace, from the API server (or a test double).
#[async_trait]
pub trait NamespaceLabels: Send + Sync {
    /// The labels of namespace `name`.
    ///
    /// # Errors
    /// A message saying why they could not be read.
    async fn labels(&self, name: &str) -> Result<BTreeMap<String, String>, String>;
}

/// The webhook's settings, fixed at start.
#[derive(Debug, Clone)]
pub struct Admission {
    /// What injected pods get.
    pub settings: InjectSettings,
    /// Inject native sidecars ([`inject::NativeSidecar::resolve`] for this cluster).
    pub native_sidecar: bool,
    /// What happens to a pod that cannot be injected.
    pub failure_mode: FailureMode,
}

/// How a review ended, for `meshflow_injector_requests_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted with a patch that injects the pod.
    Injected,
    /// Admitted untouched: opted out, namespace not enabled, already injected, not a pod
    /// creation.
    Skipped,
    /// Refused: it cannot be injected and the failure mode is deny.
    Denied,
    /// Admitted untouched although it should have been injected: failure mode allow.
    Uninjected,
    /// Not a readable AdmissionReview: a 4xx.
    Error,
}

impl Verdict {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Injected => "injected",
            Verdict::Skipped => "skipped",
            Verdict::Denied => "denied",
            Verdict::Uninjected => "uninjected",
            Verdict::Error => "error",
        }
    }
}

/// The HTTP answer to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    /// 200 with an AdmissionReview, or 4xx with a plain-text reason.
    pub status: u16,
    /// `application/json` (200) or `text/plain` (4xx).
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
    /// How it ended.
    pub verdict: Verdict,
}

impl Reply {
    /// A plain-text refusal of the request itself.
    pub fn error(status: u16, message: impl Into<String>) -> Reply {
        let mut body = message.into().into_bytes();
        body.push(b'\n');
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
            verdict: Verdict::Error,
        }
    }

    fn review(response: AdmissionResponse, verdict: Verdict) -> Reply {
        let mut review = serde_json::to_value(response.into_review()).unwrap_or_default();
        // kube serializes the patch bytes as an array of numbers; the API (Go `[]byte`)
        // defines base64.
        if let Some(patch) = review.pointer_mut("/response/patch") {
            if let Ok(bytes) = serde_json::from_value::<Vec<u8>>(patch.clone()) {
                *patch = serde_json::Value::String(
                    base64::engine::general_purpose::STANDARD.encode(bytes),
                );
            }
        }
        Reply {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_vec(&review).unwrap_or_default(),
            verdict,
        }
    }
}

/// Where a pod is named in messages: `namespace/name` (or its `generateName…`).
fn pod_name(request: &AdmissionRequest<DynamicObject>, pod: Option<&Pod>) -> String {
    let namespace = request.namespace.as_deref().unwrap_or("default");
    let name = Some(request.name.as_str())
        .filter(|n| !n.is_empty())
        .map(String::from)
        .or_else(|| pod.and_then(|p| p.metadata.name.clone()))
        .or_else(|| {
            pod.and_then(|p| p.metadata.generate_name.clone())
                .map(|g| format!("{g}…"))
        })
        .unwrap_or_default();
    format!("{namespace}/{name}")
}

impl Admission {
    /// Answers the AdmissionReview in `body`. A body that is no AdmissionReview (malformed
    /// JSON, nested deeper than serde_json's 128 levels, no `request`) gets a 400; every
    /// readable review gets a 200 with the review's `apiVersion` and `uid`.
    pub async fn review(&self, body: &[u8], namespaces: &dyn NamespaceLabels) -> Reply {
        let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
            Ok(review) => review,
            Err(e) => return Reply::error(400, format!("not an AdmissionReview: {e}")),
        };
        let api_version = review.types.api_version.clone();
        if !matches!(
            api_version.as_str(),
            "admission.k8s.io/v1" | "admission.k8s.io/v1beta1"
        ) || review.types.kind != "AdmissionReview"
        {
            return Reply::error(
                400,
                format!(
                    "not an AdmissionReview: apiVersion {api_version:?}, kind {:?} (expected \
                     admission.k8s.io/v1 or v1beta1)",
                    review.types.kind
                ),
            );
        }
        let request: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(request) => request,
            Err(_) => return Reply::error(400, "an AdmissionReview without a request"),
        };
        let admit = AdmissionResponse::from(&request);
        let is_pod_creation = request.kind.group.is_empty()
            && request.kind.kind == "Pod"
            && request.operation == Operation::Create
            && request
                .sub_resource
                .as_deref()
                .unwrap_or_default()
                .is_empty();
        let Some(object) = request.object.as_ref().filter(|_| is_pod_creation) else {
            return Reply::review(admit, Verdict::Skipped);
        };
        let pod: Result<Pod, String> = serde_json::to_value(object)
            .map_err(|e| e.to_string())
            .and_then(|v| {
                serde_path_to_error::deserialize(v)
                    .map_err(|e| format!("the pod does not parse: {}: {}", e.path(), e.inner()))
            });
        let who = pod_name(&request, pod.as_ref().ok());
        let outcome = match pod {
            Err(e) => Err(e),
            Ok(pod) => {
                let namespace = request
                    .namespace
                    .clone()
                    .or_else(|| pod.metadata.namespace.clone())
                    .unwrap_or_else(|| "default".into());
                match namespaces.labels(&namespace).await {
                    Err(e) => Err(format!("cannot read namespace {namespace}: {e}")),
                    Ok(labels) => {
                        inject::inject(&pod, &labels, &self.settings, self.native_sidecar)
                            .map_err(|e| e.to_string())
                    }
                }
            }
        };
        match outcome {
            Ok(injection) => match injection.outcome {
                Outcome::Injected => match admit.clone().with_patch(injection.patch) {
                    Ok(patched) => {
                        tracing::info!(pod = %who, "injected");
                        Reply::review(patched, Verdict::Injected)
                    }
                    Err(e) => self.cannot_inject(admit, &who, &e.to_string()),
                },
                Outcome::AlreadyInjected => Reply::review(admit, Verdict::Skipped),
                Outcome::Skipped(why) => {
                    tracing::debug!(pod = %who, %why, "not injected");
                    Reply::review(admit, Verdict::Skipped)
                }
            },
            Err(why) => self.cannot_inject(admit, &who, &why),
        }
    }

    /// The failure mode's answer for a pod that should be injected but cannot be.
    fn cannot_inject(&self, admit: AdmissionResponse, who: &str, why: &str) -> Reply {
        match self.failure_mode {
            FailureMode::Deny => {
                tracing::warn!(pod = %who, %why, "refused: cannot inject");
                let message = format!(
                    "meshflow: cannot inject the sidecar into pod {who}: {why} (the injector \
                     refuses such pods; label the pod {}: {} to create it without a sidecar)",
                    inject::INJECT,
                    inject::DISABLED
                );
                Reply::review(admit.deny(message), Verdict::Denied)
            }
            FailureMode::Allow => {
                tracing::warn!(pod = %who, %why, "admitted without a sidecar: cannot inject");
                let mut response = admit;
                response.warnings = Some(vec![format!(
                    "meshflow: pod {who} admitted without a sidecar: {why}"
                )]);
                Reply::review(response, Verdict::Uninjected)
            }
        }
    }
}
