//! What a pod gets: its annotations read over the settings ([`PodOptions`]), and the
//! containers and volumes injection adds, as the JSON the patch carries.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Container;
use serde_json::{json, Value};

use super::settings::{is_cidr, is_quantity};
use super::*;

/// What a pod's annotations (and containers) decide, over the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PodOptions {
    cpu_request: String,
    cpu_limit: String,
    memory_request: String,
    memory_limit: String,
    exclude_inbound_ports: Vec<u16>,
    exclude_outbound_ports: Vec<u16>,
    exclude_outbound_cidrs: Vec<String>,
    app_port: u16,
    app_protocol: &'static str,
}

pub(super) fn annotation_field(key: &str) -> String {
    format!("metadata.annotations[{key:?}]")
}

impl PodOptions {
    pub(super) fn read(
        annotations: &BTreeMap<String, String>,
        containers: &[Container],
        settings: &InjectSettings,
    ) -> Result<PodOptions, InjectError> {
        let quantity = |key: &str, default: &str| -> Result<String, InjectError> {
            match annotations.get(key) {
                None => Ok(default.to_string()),
                Some(v) if is_quantity(v.trim()) => Ok(v.trim().to_string()),
                Some(v) => Err(error(
                    annotation_field(key),
                    format!("{v:?} is not a Kubernetes quantity (e.g. 100m, 64Mi)"),
                )),
            }
        };
        let list = |key: &str| -> Vec<String> {
            annotations
                .get(key)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default()
        };
        let ports = |key: &str, base: &[u16]| -> Result<Vec<u16>, InjectError> {
            let mut out = base.to_vec();
            for p in list(key) {
                let port = p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    error(
                        annotation_field(key),
                        format!("{p:?} is not a port (1-65535)"),
                    )
                })?;
                if !out.contains(&port) {
                    out.push(port);
                }
            }
            Ok(out)
        };
        let mut cidrs = settings.exclude_outbound_cidrs.clone();
        for cidr in list(EXCLUDE_OUTBOUND_CIDRS) {
            if !is_cidr(&cidr) {
                return Err(error(
                    annotation_field(EXCLUDE_OUTBOUND_CIDRS),
                    format!("{cidr:?} is not an IPv4 CIDR (e.g. 10.0.0.0/8; IPv6 is not captured)"),
                ));
            }
            if !cidrs.contains(&cidr) {
                cidrs.push(cidr);
            }
        }
        let first_port = containers
            .iter()
            .filter(|c| c.name != PROXY_CONTAINER)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP");
        let app_port = match annotations.get(APP_PORT) {
            Some(v) => v
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    error(
                        annotation_field(APP_PORT),
                        format!("{v:?} is not a port (1-65535)"),
                    )
                })?,
            // No declared port: the proxy has no app to forward inbound requests to.
            None => first_port
                .and_then(|p| u16::try_from(p.container_port).ok())
                .unwrap_or(0),
        };
        let app_protocol = match annotations.get(APP_PROTOCOL).map(|v| v.trim()) {
            Some("http1") => "http1",
            Some("h2c") => "h2c",
            Some("grpc") => "grpc",
            Some(other) => {
                return Err(error(
                    annotation_field(APP_PROTOCOL),
                    format!("{other:?} is not http1, h2c or grpc"),
                ))
            }
            None => {
                let name = first_port
                    .and_then(|p| p.name.as_deref())
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                if name.starts_with("grpc") {
                    "grpc"
                } else if name.starts_with("http2") || name.starts_with("h2c") {
                    "h2c"
                } else {
                    "http1"
                }
            }
        };
        Ok(PodOptions {
            cpu_request: quantity(PROXY_CPU_REQUEST, &settings.cpu_request)?,
            cpu_limit: quantity(PROXY_CPU_LIMIT, &settings.cpu_limit)?,
            memory_request: quantity(PROXY_MEMORY_REQUEST, &settings.memory_request)?,
            memory_limit: quantity(PROXY_MEMORY_LIMIT, &settings.memory_limit)?,
            exclude_inbound_ports: ports(EXCLUDE_INBOUND_PORTS, &settings.exclude_inbound_ports)?,
            exclude_outbound_ports: ports(
                EXCLUDE_OUTBOUND_PORTS,
                &settings.exclude_outbound_ports,
            )?,
            exclude_outbound_cidrs: cidrs,
            app_port,
            app_protocol,
        })
    }

    /// `MESHFLOW_THREADS` for the proxy: the CPU limit in whole cores, rounded up (Linkerd's
    /// `proxy-cpu-limit` → worker count; the proxy also caps it at the CPUs it can use), or
    /// `None` without a usable limit (the proxy's default, one worker per listener).
    pub(super) fn worker_threads(&self) -> Option<u64> {
        (!self.cpu_limit.is_empty())
            .then(|| cpu_millicores(&self.cpu_limit))
            .flatten()
            .map(|millicores| millicores.div_ceil(1000).max(1))
    }

    pub(super) fn resources(&self) -> Value {
        let quantities = |pairs: [(&str, &String); 2]| -> serde_json::Map<String, Value> {
            pairs
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect()
        };
        let requests = quantities([("cpu", &self.cpu_request), ("memory", &self.memory_request)]);
        let limits = quantities([("cpu", &self.cpu_limit), ("memory", &self.memory_limit)]);
        let mut out = serde_json::Map::new();
        if !limits.is_empty() {
            out.insert("limits".into(), Value::Object(limits));
        }
        if !requests.is_empty() {
            out.insert("requests".into(), Value::Object(requests));
        }
        Value::Object(out)
    }
}

/// Millicores in a CPU quantity that [`is_quantity`] accepted (`1` → 1000, `1500m` → 1500,
/// `2.5` → 2500, `1e-3` → 1), in exact decimal arithmetic and rounded up to a whole millicore
/// as the API server rounds CPU quantities. `None` for zero, a negative quantity, a binary
/// (memory) suffix, or more than 1024 cores.
pub(super) fn cpu_millicores(quantity: &str) -> Option<u64> {
    const MAX_MILLICORES: u128 = 1024 * 1000;
    let unsigned = quantity.strip_prefix('+').unwrap_or(quantity);
    let digits_end = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(digits_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    // number = mantissa × 10^-len(fraction); the exponent below counts millicores.
    let significant = format!("{whole}{fraction}");
    let significant = significant.trim_start_matches('0');
    if significant.is_empty() || significant.len() > 30 {
        return None; // zero (or a sign we do not take), or digits beyond any meaning
    }
    let mantissa: u128 = significant.parse().ok()?;
    let exponent = 3 - fraction.len() as i64
        + match suffix {
            "" => 0,
            "n" => -9,
            "u" => -6,
            "m" => -3,
            "k" => 3,
            "M" => 6,
            "G" => 9,
            "T" => 12,
            "P" => 15,
            "E" => 18,
            exponent => exponent.strip_prefix(['e', 'E'])?.parse::<i64>().ok()?,
        };
    let millicores = match u32::try_from(exponent.unsigned_abs()) {
        // 10^8 millicores are far beyond the cap whatever the mantissa.
        Ok(e) if exponent >= 0 => mantissa.checked_mul(10u128.checked_pow(e.min(8))?)?,
        Ok(e) if e <= 38 => mantissa.div_ceil(10u128.pow(e)),
        // Smaller than any power of ten u128 holds: a fraction of a millicore, so one.
        _ if exponent < 0 => 1,
        _ => return None,
    };
    (millicores <= MAX_MILLICORES).then_some(millicores as u64)
}

pub(super) fn wanted_volumes() -> Vec<Value> {
    vec![
        json!({
            "name": TOKEN_VOLUME,
            "projected": { "sources": [{ "serviceAccountToken": {
                "audience": TOKEN_AUDIENCE,
                "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                "path": "token",
            }}]},
        }),
        json!({
            "name": TRUST_BUNDLE_VOLUME,
            "configMap": { "name": TRUST_BUNDLE_CONFIGMAP },
        }),
        json!({ "name": XTABLES_VOLUME, "emptyDir": {} }),
    ]
}

fn downward(name: &str, field: &str) -> Value {
    json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": field } } })
}

fn env(name: &str, value: impl std::fmt::Display) -> Value {
    json!({ "name": name, "value": value.to_string() })
}

/// The proxy container. Its bootstrap comes from env (`meshflow-proxy` reads the `MESHFLOW_…`
/// variables as flags); `$(VAR)` references are expanded by the kubelet from the variables
/// defined before them.
pub(super) fn proxy_container(
    settings: &InjectSettings,
    options: &PodOptions,
    native: bool,
) -> Value {
    let control_plane_name = crate::SpiffeId::new(
        &settings.trust_domain,
        crate::mesh::CONTROL_PLANE_NAMESPACE,
        crate::mesh::CONTROL_PLANE_SERVICE_ACCOUNT,
    )
    .map(|id| id.dns_name())
    .unwrap_or_default();
    let ready = json!({ "httpGet": { "path": "/ready", "port": settings.admin_port } });
    let mut container = json!({
        "name": PROXY_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "env": [
            downward("POD_NAME", "metadata.name"),
            downward("POD_NAMESPACE", "metadata.namespace"),
            downward("POD_IP", "status.podIP"),
            downward("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            env("MESHFLOW_WORKLOAD", "$(POD_NAMESPACE)/$(POD_NAME)"),
            env("MESHFLOW_SPIFFE_ID", format!(
                "spiffe://{}/ns/$(POD_NAMESPACE)/sa/$(SERVICE_ACCOUNT)", settings.trust_domain)),
            env("MESHFLOW_CONTROL_PLANE", &settings.control_plane),
            env("MESHFLOW_CONTROL_PLANE_SERVER_NAME", control_plane_name),
            env("MESHFLOW_TRUST_BUNDLE_FILE", format!("{TRUST_BUNDLE_DIR}/{TRUST_BUNDLE_KEY}")),
            env("MESHFLOW_TOKEN_FILE", format!("{TOKEN_DIR}/token")),
            env("MESHFLOW_INBOUND", format!("0.0.0.0:{}", settings.inbound_port)),
            env("MESHFLOW_OUTBOUND", format!("127.0.0.1:{}", settings.outbound_port)),
            env("MESHFLOW_ADMIN", format!("0.0.0.0:{}", settings.admin_port)),
            env("MESHFLOW_APP_PORT", options.app_port),
            env("MESHFLOW_APP_PROTOCOL", options.app_protocol),
            downward("MESHFLOW_APP_PROBES", &format!("metadata.annotations['{APP_PROBES}']")),
        ],
        "ports": [{ "name": "meshflow-admin", "containerPort": settings.admin_port, "protocol": "TCP" }],
        "readinessProbe": {
            "httpGet": { "path": "/ready", "port": settings.admin_port },
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "resources": options.resources(),
        "securityContext": {
            "runAsUser": settings.proxy_uid,
            "runAsGroup": settings.proxy_uid,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": [
            { "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true },
            { "name": TRUST_BUNDLE_VOLUME, "mountPath": TRUST_BUNDLE_DIR, "readOnly": true },
        ],
    });
    if let Some(threads) = options.worker_threads() {
        if let Some(vars) = container["env"].as_array_mut() {
            vars.push(env("MESHFLOW_THREADS", threads));
        }
    }
    if native {
        container["restartPolicy"] = json!("Always");
        // The kubelet starts the next container only after this succeeds; two minutes.
        let mut startup = ready.clone();
        startup["periodSeconds"] = json!(1);
        startup["failureThreshold"] = json!(120);
        container["startupProbe"] = startup;
    } else {
        // The kubelet starts the next container only once postStart returns: the app never
        // starts before its proxy is ready.
        container["lifecycle"] = json!({ "postStart": { "exec": { "command": [
            "meshflow-proxy", "wait-ready",
            "--admin", format!("127.0.0.1:{}", settings.admin_port),
            "--timeout", "120s",
        ]}}});
    }
    container
}

/// The capture init container: `meshflow-proxy init` with the ports and exclusions. The one
/// container that runs as root, with exactly the capabilities iptables needs.
pub(super) fn init_container(settings: &InjectSettings, options: &PodOptions) -> Value {
    let mut args = vec![
        "init".to_string(),
        "--proxy-uid".into(),
        settings.proxy_uid.to_string(),
        "--inbound-port".into(),
        settings.inbound_port.to_string(),
        "--outbound-port".into(),
        settings.outbound_port.to_string(),
        "--admin-port".into(),
        settings.admin_port.to_string(),
    ];
    let join = |ports: &[u16]| {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    for (flag, value) in [
        (
            "--exclude-inbound-ports",
            join(&options.exclude_inbound_ports),
        ),
        (
            "--exclude-outbound-ports",
            join(&options.exclude_outbound_ports),
        ),
        (
            "--exclude-outbound-cidrs",
            options.exclude_outbound_cidrs.join(","),
        ),
    ] {
        if !value.is_empty() {
            args.push(flag.into());
            args.push(value);
        }
    }
    json!({
        "name": INIT_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": args,
        "resources": options.resources(),
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": [{ "name": XTABLES_VOLUME, "mountPath": "/run" }],
    })
}
