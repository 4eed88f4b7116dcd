//! Injection settings: the `--proxy-*` flags both binaries share, where the proxy runs, and
//! the validators of quantities and CIDRs that settings and annotations both go through.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{InjectError, DEFAULT_PROXY_IMAGE};

/// Where the proxy runs: a native sidecar (Kubernetes ≥ 1.29, `restartPolicy: Always` on an
/// init container) or a classic first container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NativeSidecar {
    /// Native where the API server is 1.29 or newer.
    #[default]
    Auto,
    /// Always native (the cluster must support it).
    Always,
    /// Never: the classic first container with a `postStart` hook.
    Never,
}

impl NativeSidecar {
    /// Whether to inject a native sidecar into a cluster whose API server is `server`
    /// (`(major, minor)`, `None` when unknown — then classic, which every version runs).
    pub fn resolve(self, server: Option<(u32, u32)>) -> bool {
        match self {
            NativeSidecar::Always => true,
            NativeSidecar::Never => false,
            NativeSidecar::Auto => server.is_some_and(|v| v >= (1, 29)),
        }
    }
}

/// `(major, minor)` from the API server's `/version` strings (`"1"`, `"29+"` on some
/// distributions).
pub fn parse_server_version(major: &str, minor: &str) -> Option<(u32, u32)> {
    let digits = |s: &str| -> Option<u32> {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .ok()
    };
    Some((digits(major)?, digits(minor)?))
}

/// What every injected pod gets unless its annotations say otherwise: the control plane's
/// `--proxy-*` flags and `meshflow inject`'s, one definition for both. Flags over
/// `MESHFLOW_PROXY_…` env over the defaults below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(rename_all = "camelCase")]
pub struct InjectSettings {
    /// The sidecar image: holds `meshflow-proxy` (the proxy, `meshflow-proxy init` and
    /// `meshflow-proxy wait-ready`).
    #[arg(long = "proxy-image", env = "MESHFLOW_PROXY_IMAGE", default_value = DEFAULT_PROXY_IMAGE)]
    pub image: String,
    /// Pull policy of the sidecar image: Always, IfNotPresent or Never.
    #[arg(
        long = "proxy-image-pull-policy",
        env = "MESHFLOW_PROXY_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent",
        value_parser = ["Always", "IfNotPresent", "Never"]
    )]
    pub image_pull_policy: String,
    /// The UID the proxy runs as; the capture rules let this UID's traffic through, so no app
    /// may run as it.
    #[arg(long = "proxy-uid", env = "MESHFLOW_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: i64,
    /// The proxy's inbound (mTLS) port; redirected inbound traffic arrives here.
    #[arg(
        long = "proxy-inbound-port",
        env = "MESHFLOW_PROXY_INBOUND_PORT",
        default_value_t = 15006
    )]
    pub inbound_port: u16,
    /// The proxy's outbound port (loopback); redirected outbound traffic arrives here.
    #[arg(
        long = "proxy-outbound-port",
        env = "MESHFLOW_PROXY_OUTBOUND_PORT",
        default_value_t = 15001
    )]
    pub outbound_port: u16,
    /// The proxy's admin port (`/ready`, `/app-health/…`): probes and Prometheus reach it on
    /// the pod IP; never redirected.
    #[arg(
        long = "proxy-admin-port",
        env = "MESHFLOW_PROXY_ADMIN_PORT",
        default_value_t = 15020
    )]
    pub admin_port: u16,
    /// The proxy's CPU request (Kubernetes quantity).
    #[arg(
        long = "proxy-cpu-request",
        env = "MESHFLOW_PROXY_CPU_REQUEST",
        default_value = "100m"
    )]
    pub cpu_request: String,
    /// The proxy's CPU limit; empty: none.
    #[arg(
        long = "proxy-cpu-limit",
        env = "MESHFLOW_PROXY_CPU_LIMIT",
        default_value = ""
    )]
    pub cpu_limit: String,
    /// The proxy's memory request.
    #[arg(
        long = "proxy-memory-request",
        env = "MESHFLOW_PROXY_MEMORY_REQUEST",
        default_value = "64Mi"
    )]
    pub memory_request: String,
    /// The proxy's memory limit; empty: none.
    #[arg(
        long = "proxy-memory-limit",
        env = "MESHFLOW_PROXY_MEMORY_LIMIT",
        default_value = "256Mi"
    )]
    pub memory_limit: String,
    /// Inject the proxy as a native sidecar: auto (API server ≥ 1.29), always or never.
    #[arg(long = "native-sidecar", env = "MESHFLOW_NATIVE_SIDECAR", value_enum, default_value_t = NativeSidecar::Auto)]
    pub native_sidecar: NativeSidecar,
    /// The control plane's gRPC address (`host:port`) as the proxy reaches it.
    #[arg(
        long = "proxy-control-plane",
        env = "MESHFLOW_PROXY_CONTROL_PLANE",
        default_value = "meshflow-control-plane.meshflow-system.svc:15012"
    )]
    pub control_plane: String,
    /// Inbound ports never redirected to the proxy, for every pod (comma-separated).
    #[arg(
        long = "proxy-exclude-inbound-ports",
        env = "MESHFLOW_PROXY_EXCLUDE_INBOUND_PORTS",
        value_delimiter = ','
    )]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports never redirected, for every pod (comma-separated).
    #[arg(
        long = "proxy-exclude-outbound-ports",
        env = "MESHFLOW_PROXY_EXCLUDE_OUTBOUND_PORTS",
        value_delimiter = ','
    )]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs never redirected, for every pod (comma-separated), e.g. the
    /// cloud metadata address `169.254.169.254/32`.
    #[arg(
        long = "proxy-exclude-outbound-cidrs",
        env = "MESHFLOW_PROXY_EXCLUDE_OUTBOUND_CIDRS",
        value_delimiter = ','
    )]
    pub exclude_outbound_cidrs: Vec<String>,
    /// The SPIFFE trust domain (the proxy's expected ID and the control plane's server name).
    /// Set from the binary's own `--trust-domain`.
    #[arg(skip = String::from("cluster.local"))]
    pub trust_domain: String,
}

impl Default for InjectSettings {
    fn default() -> Self {
        InjectSettings {
            image: DEFAULT_PROXY_IMAGE.into(),
            image_pull_policy: "IfNotPresent".into(),
            proxy_uid: 2102,
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15020,
            cpu_request: "100m".into(),
            cpu_limit: String::new(),
            memory_request: "64Mi".into(),
            memory_limit: "256Mi".into(),
            native_sidecar: NativeSidecar::Auto,
            control_plane: "meshflow-control-plane.meshflow-system.svc:15012".into(),
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            trust_domain: "cluster.local".into(),
        }
    }
}

impl InjectSettings {
    /// Checks what clap cannot: quantities, distinct non-zero ports, a non-root UID, CIDRs.
    ///
    /// # Errors
    /// The flag and what is wrong with it.
    pub fn validate(&self) -> Result<(), InjectError> {
        let bad = |field: &str, message: String| {
            Err(InjectError {
                field: field.into(),
                message,
            })
        };
        if self.image.trim().is_empty() {
            return bad("--proxy-image", "must name an image".into());
        }
        if self.proxy_uid <= 0 {
            return bad(
                "--proxy-uid",
                format!(
                    "{} is root or invalid; the proxy runs as a non-root UID",
                    self.proxy_uid
                ),
            );
        }
        let ports = [
            ("--proxy-inbound-port", self.inbound_port),
            ("--proxy-outbound-port", self.outbound_port),
            ("--proxy-admin-port", self.admin_port),
        ];
        for (i, (flag, port)) in ports.iter().enumerate() {
            if *port == 0 {
                return bad(flag, "must not be 0".into());
            }
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                return bad(flag, format!("{port} is also {other}"));
            }
        }
        for (flag, value, optional) in [
            ("--proxy-cpu-request", &self.cpu_request, false),
            ("--proxy-cpu-limit", &self.cpu_limit, true),
            ("--proxy-memory-request", &self.memory_request, false),
            ("--proxy-memory-limit", &self.memory_limit, true),
        ] {
            if !(is_quantity(value) || optional && value.is_empty()) {
                return bad(
                    flag,
                    format!("{value:?} is not a Kubernetes quantity (e.g. 100m, 64Mi)"),
                );
            }
        }
        if self
            .control_plane
            .rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return bad(
                "--proxy-control-plane",
                format!("{:?} is not host:port", self.control_plane),
            );
        }
        for cidr in &self.exclude_outbound_cidrs {
            if !is_cidr(cidr) {
                return bad(
                    "--proxy-exclude-outbound-cidrs",
                    format!("{cidr:?} is not an IPv4 CIDR (e.g. 10.0.0.0/8; IPv6 is not captured)"),
                );
            }
        }
        if crate::SpiffeId::new(&self.trust_domain, "ns", "sa").is_err() {
            return bad(
                "--trust-domain",
                format!("{:?} is not a trust domain", self.trust_domain),
            );
        }
        Ok(())
    }
}

/// Whether `s` is a Kubernetes resource quantity: a signed decimal number with an optional
/// binary (`Ki`…`Ei`), decimal (`n`, `u`, `m`, `k`, `M`…`E`) or exponent (`e3`) suffix.
pub fn is_quantity(s: &str) -> bool {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(digits_end);
    let valid_number = !number.is_empty()
        && number != "."
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit());
    let valid_suffix = match suffix {
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T"
        | "P" | "E" => true,
        exponent => exponent
            .strip_prefix(['e', 'E'])
            .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
            .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())),
    };
    valid_number && valid_suffix
}

/// Whether `s` is an IPv4 `address/prefix` (prefix ≤ 32), the form `meshflow-proxy init`
/// takes for `--exclude-outbound-cidrs`. IPv6 is refused: the capture rules are IPv4 only
/// (an IPv6 exclusion admitted here would stop the pod's init container instead).
pub fn is_cidr(s: &str) -> bool {
    let Some((address, prefix)) = s.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    matches!(address.parse::<IpAddr>(), Ok(IpAddr::V4(_))) && prefix <= 32
}
