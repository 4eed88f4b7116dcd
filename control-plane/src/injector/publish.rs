//! What the webhook needs from the API server and keeps there: namespace labels (one GET per
//! review), the `caBundle` of its MutatingWebhookConfiguration (the chart cannot know the
//! generated CA, so the control plane writes it and puts it back when an upgrade clears it),
//! and the trust bundle ConfigMap every injected pod's proxy mounts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use meshflow_policies::inject;
use serde_json::json;

use super::review::NamespaceLabels;

/// The field manager of the control plane's writes.
const MANAGER: &str = "meshflow-control-plane";
/// How often the webhook configuration's `caBundle` is checked…
const CA_BUNDLE_EVERY: Duration = Duration::from_secs(10);
/// …and while it cannot be read or written (not created yet, say).
const CA_BUNDLE_RETRY: Duration = Duration::from_secs(1);
/// How often every trust bundle ConfigMap is applied again (repairs edits and deletions).
const RESYNC_EVERY: Duration = Duration::from_secs(300);
/// Bound of one namespace lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Namespace labels by GET (`get namespaces`): a namespace labelled a moment ago is seen at
/// once, which a watch cache might not.
pub struct KubeNamespaces(pub Client);

#[async_trait]
impl NamespaceLabels for KubeNamespaces {
    async fn labels(&self, name: &str) -> Result<BTreeMap<String, String>, String> {
        let api: Api<Namespace> = Api::all(self.0.clone());
        match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_metadata(name)).await {
            Err(_) => Err(format!(
                "no answer from the API server within {LOOKUP_TIMEOUT:?}"
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(meta)) => Ok(meta.metadata.labels.unwrap_or_default()),
        }
    }
}

/// Keeps `clientConfig.caBundle` of every webhook in the MutatingWebhookConfiguration `name`
/// equal to `bundle_pem` (`get` and `patch` on that one object), checking every 10 s (every
/// second while it is missing or the API server refuses).
pub async fn keep_ca_bundle(client: Client, name: String, bundle_pem: String) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let encoded = base64::engine::general_purpose::STANDARD.encode(bundle_pem.as_bytes());
    let mut reported = String::new();
    loop {
        let outcome = match api.get_opt(&name).await {
            Ok(None) => Err(format!(
                "MutatingWebhookConfiguration {name} does not exist (yet)"
            )),
            Err(e) => Err(format!("MutatingWebhookConfiguration {name}: {e}")),
            Ok(Some(config)) => {
                // JSON Patch with a test of each webhook's name: a concurrent reorder fails
                // the patch instead of writing a bundle into the wrong webhook.
                let mut ops = Vec::new();
                for (i, webhook) in config.webhooks.iter().flatten().enumerate() {
                    let current = webhook.client_config.ca_bundle.as_ref().map(|b| &b.0);
                    if current != Some(&bundle_pem.as_bytes().to_vec()) {
                        ops.push(json!({ "op": "test", "path": format!("/webhooks/{i}/name"), "value": webhook.name }));
                        ops.push(json!({ "op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded }));
                    }
                }
                if ops.is_empty() {
                    Ok(false)
                } else {
                    match serde_json::from_value::<inject::json_patch::Patch>(json!(ops)) {
                        Err(e) => Err(e.to_string()),
                        Ok(patch) => api
                            .patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
                            .await
                            .map(|_| true)
                            .map_err(|e| format!("MutatingWebhookConfiguration {name}: {e}")),
                    }
                }
            }
        };
        let next = match outcome {
            Ok(changed) => {
                if changed {
                    tracing::info!(webhook_configuration = %name, "set the webhook's caBundle");
                }
                reported.clear();
                CA_BUNDLE_EVERY
            }
            Err(e) => {
                if e != reported {
                    tracing::warn!("injector caBundle: {e}; retrying every {CA_BUNDLE_RETRY:?}");
                    reported = e;
                }
                CA_BUNDLE_RETRY
            }
        };
        tokio::time::sleep(next).await;
    }
}

/// Publishes the ConfigMap [`inject::TRUST_BUNDLE_CONFIGMAP`] (key `ca.crt` = `bundle_pem`) into
/// every namespace labelled `meshflow.io/inject: enabled` that `discovery_selector` (when set)
/// also selects, by server-side apply: when a namespace appears, every 10 s while that failed,
/// and again every five minutes (repairing edits and deletions).
pub async fn publish_trust_bundle(
    client: Client,
    discovery_selector: Option<String>,
    bundle_pem: String,
) {
    let mut selector = format!("{}={}", inject::INJECT, inject::ENABLED);
    if let Some(extra) = discovery_selector {
        selector = format!("{selector},{extra}");
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let stream =
        watcher(namespaces, watcher::Config::default().labels(&selector)).default_backoff();
    futures::pin_mut!(stream);
    // Namespaces selected now; those whose ConfigMap is applied; a re-list in progress.
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut published: BTreeSet<String> = BTreeSet::new();
    let mut relisting: BTreeSet<String> = BTreeSet::new();
    let mut retry = tokio::time::interval(Duration::from_secs(10));
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    loop {
        tokio::select! {
            event = stream.next() => match event {
                None => return,
                Some(Err(e)) => tracing::warn!(error = %e, "injector: watching namespaces"),
                Some(Ok(watcher::Event::Init)) => relisting.clear(),
                Some(Ok(watcher::Event::InitApply(ns))) => {
                    relisting.extend(ns.metadata.name);
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    known = std::mem::take(&mut relisting);
                    published.retain(|n| known.contains(n));
                }
                Some(Ok(watcher::Event::Apply(ns))) => {
                    if let Some(name) = ns.metadata.name {
                        if ns.metadata.deletion_timestamp.is_some() {
                            known.remove(&name);
                            published.remove(&name);
                        } else {
                            known.insert(name);
                        }
                    }
                }
                Some(Ok(watcher::Event::Delete(ns))) => {
                    if let Some(name) = ns.metadata.name {
                        known.remove(&name);
                        published.remove(&name);
                    }
                }
            },
            _ = retry.tick() => {}
            _ = resync.tick() => published.clear(),
        }
        for name in known.difference(&published).cloned().collect::<Vec<_>>() {
            if apply_trust_bundle(&client, &name, &bundle_pem).await {
                published.insert(name);
            }
        }
    }
}

async fn apply_trust_bundle(client: &Client, namespace: &str, bundle_pem: &str) -> bool {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let config_map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": inject::TRUST_BUNDLE_CONFIGMAP,
            "labels": { "app.kubernetes.io/managed-by": MANAGER },
        },
        "data": { inject::TRUST_BUNDLE_KEY: bundle_pem },
    });
    match api
        .patch(
            inject::TRUST_BUNDLE_CONFIGMAP,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&config_map),
        )
        .await
    {
        Ok(_) => {
            tracing::debug!(%namespace, "published the trust bundle");
            true
        }
        Err(e) => {
            tracing::warn!(%namespace, error = %e, "cannot publish the trust bundle ConfigMap");
            false
        }
    }
}
