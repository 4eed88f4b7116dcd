//! `meshflow inject -f <manifest>`: the webhook's mutation offline (like `linkerd inject`).
//! Multi-document YAML in, YAML out: every Pod, and the pod template of every Deployment,
//! StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job and CronJob (also inside a
//! `List`), is injected by [`meshflow_policies::inject::inject`] — the function the control
//! plane's webhook runs — and the JSON Patch is applied to the document itself, so fields this
//! client does not know survive. Other documents pass through unchanged. Offline there is no
//! namespace to read: every pod is injected unless it opts out
//! (`meshflow.io/inject: disabled`).

use std::collections::BTreeMap;

use meshflow_policies::inject::{self, InjectError, InjectSettings, Outcome};
use serde::Deserialize;
use serde_json::{json, Value};

/// A document that cannot be read or injected: the file, the document (1-based), the object
/// and the field.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: document {document}{object}: {message}")]
pub struct InjectCliError {
    /// The file (or `-` for standard input).
    pub origin: String,
    /// The document's position in the stream, from 1.
    pub document: usize,
    /// ` (Deployment shop/web)`, when the document says what it is.
    pub object: String,
    /// `<field>: <what is wrong>`.
    pub message: String,
}

/// What was injected, for the summary on stderr.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// `Kind namespace/name` of each injected object.
    pub injected: Vec<String>,
    /// `Kind namespace/name: why` of each object holding a pod that was not injected.
    pub skipped: Vec<String>,
}

/// Where a kind keeps its pod: the document itself (`Pod`) or a template at this path.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Injects every document of `text` (read from `origin`); returns the YAML stream to print.
///
/// # Errors
/// The first document that is not YAML, whose pod does not parse, or that cannot be injected.
pub fn inject_stream(
    origin: &str,
    text: &str,
    settings: &InjectSettings,
    native_sidecar: bool,
    report: &mut Report,
) -> Result<String, InjectCliError> {
    let mut out = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let fail = |object: String, message: String| InjectCliError {
            origin: origin.to_string(),
            document: index + 1,
            object,
            message,
        };
        let yaml = serde_yaml::Value::deserialize(document)
            .map_err(|e| fail(String::new(), e.to_string()))?;
        if yaml.is_null() {
            continue;
        }
        let mut doc: Value =
            serde_json::to_value(yaml).map_err(|e| fail(String::new(), e.to_string()))?;
        inject_object(&mut doc, "", settings, native_sidecar, report)
            .map_err(|(object, message)| fail(object, message))?;
        out.push(serde_yaml::to_string(&doc).map_err(|e| fail(String::new(), e.to_string()))?);
    }
    Ok(out.join("---\n"))
}

/// ` (Kind namespace/name)` of an object.
fn describe(doc: &Value) -> String {
    let kind = doc["kind"].as_str().unwrap_or("object");
    let name = doc["metadata"]["name"]
        .as_str()
        .or(doc["metadata"]["generateName"].as_str())
        .unwrap_or("");
    match doc["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Injects `doc` in place (a `List`'s items one by one); `at` is the field path of `doc`.
fn inject_object(
    doc: &mut Value,
    at: &str,
    settings: &InjectSettings,
    native_sidecar: bool,
    report: &mut Report,
) -> Result<(), (String, String)> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    if kind.ends_with("List") && doc["items"].is_array() {
        let items = doc["items"]
            .as_array_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut injected = Vec::with_capacity(items.len());
        for (i, mut item) in items.into_iter().enumerate() {
            inject_object(
                &mut item,
                &format!("{at}items[{i}]."),
                settings,
                native_sidecar,
                report,
            )?;
            injected.push(item);
        }
        doc["items"] = Value::Array(injected);
        return Ok(());
    }
    let Some(path) = template_path(&kind) else {
        return Ok(());
    };
    let object = describe(doc);
    let with_object = |message: String| (format!(" ({object})"), message);
    // The pod: the document, or {metadata, spec} of the template.
    let template = path.iter().try_fold(&mut *doc, |v, key| v.get_mut(*key));
    let Some(template) = template else {
        return Err(with_object(format!(
            "{at}{}: missing: a {kind} needs a pod template",
            path.join(".")
        )));
    };
    let prefix = if path.is_empty() {
        at.to_string()
    } else {
        format!("{at}{}.", path.join("."))
    };
    if !template.is_object() {
        return Err(with_object(format!(
            "{}: not an object",
            prefix.trim_end_matches('.')
        )));
    }
    if template.get("metadata").is_none_or(Value::is_null) {
        template["metadata"] = json!({});
    }
    let pod_json = json!({ "metadata": template["metadata"], "spec": template["spec"] });
    let pod: k8s_openapi::api::core::v1::Pod = serde_path_to_error::deserialize(pod_json)
        .map_err(|e| with_object(format!("{prefix}{}: {}", e.path(), e.inner())))?;
    // Offline, the pod's namespace counts as injection-enabled.
    let enabled = BTreeMap::from([(inject::INJECT.to_string(), inject::ENABLED.to_string())]);
    let injection = inject::inject(&pod, &enabled, settings, native_sidecar).map_err(
        |InjectError { field, message }| with_object(format!("{prefix}{field}: {message}")),
    )?;
    match injection.outcome {
        Outcome::Injected => {
            json_patch::patch(template, &injection.patch)
                .map_err(|e| with_object(format!("{prefix}: the injection does not apply: {e}")))?;
            report.injected.push(object);
        }
        Outcome::AlreadyInjected => report.injected.push(format!("{object} (already)")),
        Outcome::Skipped(why) => report.skipped.push(format!("{object}: {why}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"# A Deployment, a Service, a Pod that opts out, a CronJob.
apiVersion: apps/v1
kind: Deployment
metadata: { name: web, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  template:
    metadata: { labels: { app: web } }
    spec:
      containers:
        - name: app
          image: web:1
          ports: [{ name: http, containerPort: 8080 }]
          readinessProbe: { httpGet: { path: /ready, port: http } }
          futureField: kept
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec: { ports: [{ port: 80 }] }
---
apiVersion: v1
kind: Pod
metadata:
  name: debug
  annotations: { meshflow.io/inject: disabled }
spec: { containers: [{ name: sh, image: busybox }] }
---
apiVersion: batch/v1
kind: CronJob
metadata: { name: report }
spec:
  schedule: "@daily"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{ name: report, image: report:1 }]
"#;

    fn docs(yaml: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
            .collect()
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn injects_pod_templates_and_passes_everything_else_through() {
        let mut report = Report::default();
        let out = inject_stream(
            "app.yaml",
            MANIFEST,
            &InjectSettings::default(),
            false,
            &mut report,
        )
        .unwrap();
        let out = docs(&out);
        let input = docs(MANIFEST);
        assert_eq!(out.len(), 4);
        let template = &out[0]["spec"]["template"];
        assert_eq!(
            names(&template["spec"]["containers"]),
            ["meshflow-proxy", "app"]
        );
        assert_eq!(
            names(&template["spec"]["initContainers"]),
            ["meshflow-init"]
        );
        assert_eq!(
            template["metadata"]["annotations"]["meshflow.io/injected"],
            inject::VERSION
        );
        assert_eq!(template["metadata"]["labels"]["app"], "web");
        // A field this client does not know is kept (the patch is applied to the document).
        assert_eq!(template["spec"]["containers"][1]["futureField"], "kept");
        assert_eq!(
            template["spec"]["containers"][1]["readinessProbe"]["httpGet"]["path"],
            "/app-health/app/readyz"
        );
        assert_eq!(out[1], input[1], "a Service passes through");
        assert_eq!(out[2], input[2], "an opted-out pod is untouched");
        let job = &out[3]["spec"]["jobTemplate"]["spec"]["template"];
        assert_eq!(
            names(&job["spec"]["containers"]),
            ["meshflow-proxy", "report"]
        );
        assert_eq!(
            report,
            Report {
                injected: vec!["Deployment shop/web".into(), "CronJob report".into()],
                skipped: vec![
                    "Pod debug: the pod is annotated meshflow.io/inject: disabled".into()
                ],
            }
        );

        // Injecting the output again changes nothing.
        let again = inject_stream(
            "out.yaml",
            &out.iter()
                .map(|d| serde_yaml::to_string(d).unwrap())
                .collect::<Vec<_>>()
                .join("---\n"),
            &InjectSettings::default(),
            false,
            &mut Report::default(),
        )
        .unwrap();
        assert_eq!(docs(&again), out);
    }

    #[test]
    fn native_sidecars_and_lists() {
        let list = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"},
             "spec": {"containers": [{"name": "app", "image": "x"}]}}]}"#;
        let out = inject_stream(
            "-",
            list,
            &InjectSettings::default(),
            true,
            &mut Report::default(),
        )
        .unwrap();
        let pod = &docs(&out)[0]["items"][0];
        assert_eq!(
            names(&pod["spec"]["initContainers"]),
            ["meshflow-init", "meshflow-proxy"]
        );
        assert_eq!(pod["spec"]["initContainers"][1]["restartPolicy"], "Always");
        assert_eq!(names(&pod["spec"]["containers"]), ["app"]);
    }

    #[test]
    fn errors_name_the_file_the_document_the_object_and_the_field() {
        let settings = InjectSettings::default();
        let bad_port = MANIFEST.replace("containerPort: 8080", "containerPort: eighty");
        let err = inject_stream(
            "app.yaml",
            &bad_port,
            &settings,
            false,
            &mut Report::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(
                "app.yaml: document 1 (Deployment shop/web): \
                 spec.template.spec.containers[0].ports[0].containerPort: invalid type"
            ),
            "{err}"
        );
        let bad_annotation = MANIFEST.replace(
            "annotations: { meshflow.io/inject: disabled }",
            "annotations: { meshflow.io/proxy-memory-limit: lots }",
        );
        let err = inject_stream(
            "app.yaml",
            &bad_annotation,
            &settings,
            false,
            &mut Report::default(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "app.yaml: document 3 (Pod debug): metadata.annotations[\"meshflow.io/proxy-memory-limit\"]: \
             \"lots\" is not a Kubernetes quantity (e.g. 100m, 64Mi)"
        );
        let bad_probe = MANIFEST.replace("port: http }", "port: metrics }");
        let err = inject_stream(
            "app.yaml",
            &bad_probe,
            &settings,
            false,
            &mut Report::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(
                "app.yaml: document 1 (Deployment shop/web): \
                 spec.template.spec.containers[0].readinessProbe.httpGet.port: named port"
            ),
            "{err}"
        );
        let err = inject_stream("x.yaml", "a: [", &settings, false, &mut Report::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x.yaml: document 1: "), "{err}");
        let err = inject_stream(
            "x.yaml",
            "kind: Deployment\nmetadata: {name: d}\nspec: {}\n",
            &settings,
            false,
            &mut Report::default(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "x.yaml: document 1 (Deployment d): spec.template: missing: a Deployment needs a pod template"
        );
    }
}
