//! `meshflow-proxy init`: the traffic-capture rules of a pod (the injected `meshflow-init`
//! container runs it as root with `NET_ADMIN` + `NET_RAW`, before any other container).
//!
//! iptables, `nat` table, IPv4, in the pod's network namespace — Linkerd's proxy-init and
//! Istio's `istio-iptables` in REDIRECT mode do the same:
//!
//! ```text
//! PREROUTING -p tcp → MESHFLOW_INBOUND:  the proxy's own ports (inbound, admin, outbound) and
//!                                       --exclude-inbound-ports RETURN; the rest (or only
//!                                       --include-inbound-ports) → MESHFLOW_IN_REDIRECT
//!                                       (REDIRECT to the inbound port)
//! OUTPUT -p tcp → MESHFLOW_OUTPUT:       the proxy's UID (and --proxy-gid) RETURN — its own
//!                                       connections are never captured, so nothing loops;
//!                                       `-o lo` and 127.0.0.1 RETURN (loopback: the app's own
//!                                       sidecar, its own pod IP); --exclude-outbound-ports and
//!                                       --exclude-outbound-cidrs RETURN; the rest →
//!                                       MESHFLOW_REDIRECT (REDIRECT to the outbound port)
//! ```
//!
//! A redirected connection keeps its original destination in conntrack; the proxy reads it
//! with `SO_ORIGINAL_DST` (see [`crate::outbound::transparent`]).
//!
//! Applied with `iptables-restore --noflush` — one atomic transaction, nothing outside the
//! `MESHFLOW_*` chains touched. Declaring a chain flushes it (also with `--noflush`), so the
//! chains' contents are replaced on every run; the two jumps from the built-in chains are
//! added only when missing (and duplicates removed), read from `iptables-save` first. Running
//! it again therefore gives the same rules, never duplicates; the result is read back and
//! compared. `--dry-run` prints the rules and touches nothing (no root needed).
//!
//! The backend: `--iptables auto` (default) uses the one whose `nat` table already has rules
//! in the pod's namespace (`iptables-legacy` vs `iptables-nft`) — in a fresh pod namespace
//! neither has, so it is the image's `iptables-restore`; `--iptables legacy|nft` forces one.
//! IPv6 is not captured (the outbound listener is IPv4 loopback).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use clap::Parser;

/// The chain inbound TCP goes through.
pub const INBOUND_CHAIN: &str = "MESHFLOW_INBOUND";
/// The chain that redirects inbound TCP to the proxy's inbound port.
pub const IN_REDIRECT_CHAIN: &str = "MESHFLOW_IN_REDIRECT";
/// The chain outbound TCP goes through.
pub const OUTPUT_CHAIN: &str = "MESHFLOW_OUTPUT";
/// The chain that redirects outbound TCP to the proxy's outbound port.
pub const REDIRECT_CHAIN: &str = "MESHFLOW_REDIRECT";

/// `iptables -m multiport` takes at most 15 ports per rule.
const MULTIPORT_MAX: usize = 15;

/// Which iptables binaries to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The backend whose `nat` table already has rules, else the system's `iptables`.
    Auto,
    /// `iptables-legacy-restore` / `iptables-legacy-save`.
    Legacy,
    /// `iptables-nft-restore` / `iptables-nft-save`.
    Nft,
    /// `iptables-restore` / `iptables-save` (whatever the system's alternative points to).
    Default,
}

impl Backend {
    fn binaries(self) -> (&'static str, &'static str) {
        match self {
            Backend::Legacy => ("iptables-legacy-restore", "iptables-legacy-save"),
            Backend::Nft => ("iptables-nft-restore", "iptables-nft-save"),
            Backend::Auto | Backend::Default => ("iptables-restore", "iptables-save"),
        }
    }
}

/// Flags of `meshflow-proxy init` (names as the injector passes them; Linkerd's proxy-init and
/// Istio's istio-iptables have the same settings under other names).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "meshflow-proxy init",
    about = "Install the pod's traffic-capture iptables rules (nat table), idempotently"
)]
pub struct CaptureArgs {
    /// The UID the proxy runs as: its connections are never redirected.
    #[arg(long, env = "MESHFLOW_PROXY_UID")]
    pub proxy_uid: u32,
    /// Also never redirect connections of processes with this GID.
    #[arg(long, env = "MESHFLOW_PROXY_GID")]
    pub proxy_gid: Option<u32>,
    /// The proxy's inbound port: redirected inbound TCP arrives here.
    #[arg(long, env = "MESHFLOW_PROXY_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    /// The proxy's outbound port (127.0.0.1): redirected outbound TCP arrives here.
    #[arg(long, env = "MESHFLOW_PROXY_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// The proxy's admin port (probes, metrics): never redirected.
    #[arg(long, env = "MESHFLOW_PROXY_ADMIN_PORT", default_value_t = 15020)]
    pub admin_port: u16,
    /// Inbound ports to redirect, comma-separated, or `*` for all (default).
    #[arg(long, default_value = "*")]
    pub include_inbound_ports: String,
    /// Inbound ports never redirected, comma-separated.
    #[arg(long, default_value = "")]
    pub exclude_inbound_ports: String,
    /// Outbound destination ports never redirected, comma-separated.
    #[arg(long, default_value = "")]
    pub exclude_outbound_ports: String,
    /// Outbound destination CIDRs never redirected, comma-separated (`10.0.0.0/8,1.2.3.4`).
    #[arg(long, default_value = "")]
    pub exclude_outbound_cidrs: String,
    /// iptables backend: auto, legacy, nft or default.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub iptables: Backend,
    /// Print the rules (`iptables-restore` input) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// The rules to install: each `MESHFLOW_*` chain with its rules, and the jumps into them from
/// the built-in chains. Rules are written the way `iptables-save` prints them, so what is read
/// back can be compared line by line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// `(chain, rules)`; a rule is the text after `-A <chain> `.
    pub chains: Vec<(&'static str, Vec<String>)>,
    /// `(built-in chain, rule)`.
    pub jumps: Vec<(&'static str, String)>,
}

/// A comma-separated port list (empty: none).
fn parse_ports(flag: &str, text: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u16>() {
            Ok(port) if port > 0 => ports.push(port),
            _ => return Err(format!("--{flag}: {item:?} is not a port (1-65535)")),
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// An IPv4 CIDR (a bare address is /32) in the form `iptables-save` prints: host bits cleared.
fn parse_cidr(text: &str) -> Result<String, String> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, prefix),
        None => (text, "32"),
    };
    let address: Ipv4Addr = address
        .parse()
        .map_err(|_| format!("--exclude-outbound-cidrs: {text:?} is not an IPv4 CIDR"))?;
    let prefix: u32 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("--exclude-outbound-cidrs: {text:?}: prefix must be 0-32"))?;
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    let network = Ipv4Addr::from(u32::from(address) & mask);
    Ok(format!("{network}/{prefix}"))
}

fn multiport(ports: &[u16], target: &str) -> Vec<String> {
    ports
        .chunks(MULTIPORT_MAX)
        .map(|chunk| {
            let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
            format!(
                "-p tcp -m multiport --dports {} -j {target}",
                list.join(",")
            )
        })
        .collect()
}

impl CaptureArgs {
    /// The rules these flags ask for.
    ///
    /// # Errors
    /// A malformed port or CIDR list, port 0, or two proxy ports that are the same.
    pub fn rules(&self) -> Result<Rules, String> {
        let own = [
            ("inbound-port", self.inbound_port),
            ("outbound-port", self.outbound_port),
            ("admin-port", self.admin_port),
        ];
        for (i, (name, port)) in own.iter().enumerate() {
            if *port == 0 {
                return Err(format!("--{name} must not be 0"));
            }
            if let Some((other, _)) = own[..i].iter().find(|(_, p)| p == port) {
                return Err(format!("--{name} and --{other} are both {port}"));
            }
        }
        let include = match self.include_inbound_ports.trim() {
            "*" => None,
            text => Some(parse_ports("include-inbound-ports", text)?),
        };
        let mut exclude_inbound =
            parse_ports("exclude-inbound-ports", &self.exclude_inbound_ports)?;
        exclude_inbound.extend(own.iter().map(|(_, p)| *p));
        exclude_inbound.sort_unstable();
        exclude_inbound.dedup();
        let exclude_outbound = parse_ports("exclude-outbound-ports", &self.exclude_outbound_ports)?;
        let mut cidrs = Vec::new();
        for item in self
            .exclude_outbound_cidrs
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let cidr = parse_cidr(item)?;
            if !cidrs.contains(&cidr) {
                cidrs.push(cidr);
            }
        }

        let mut inbound = multiport(&exclude_inbound, "RETURN");
        match &include {
            None => inbound.push(format!("-p tcp -j {IN_REDIRECT_CHAIN}")),
            Some(ports) => {
                let ports: Vec<u16> = ports
                    .iter()
                    .copied()
                    .filter(|p| !exclude_inbound.contains(p))
                    .collect();
                inbound.extend(multiport(&ports, IN_REDIRECT_CHAIN));
            }
        }
        let mut output = vec![format!("-m owner --uid-owner {} -j RETURN", self.proxy_uid)];
        if let Some(gid) = self.proxy_gid {
            output.push(format!("-m owner --gid-owner {gid} -j RETURN"));
        }
        output.push("-o lo -j RETURN".into());
        output.push("-d 127.0.0.1/32 -j RETURN".into());
        output.extend(multiport(&exclude_outbound, "RETURN"));
        output.extend(cidrs.iter().map(|c| format!("-d {c} -j RETURN")));
        output.push(format!("-p tcp -j {REDIRECT_CHAIN}"));
        Ok(Rules {
            chains: vec![
                (INBOUND_CHAIN, inbound),
                (
                    IN_REDIRECT_CHAIN,
                    vec![format!(
                        "-p tcp -j REDIRECT --to-ports {}",
                        self.inbound_port
                    )],
                ),
                (OUTPUT_CHAIN, output),
                (
                    REDIRECT_CHAIN,
                    vec![format!(
                        "-p tcp -j REDIRECT --to-ports {}",
                        self.outbound_port
                    )],
                ),
            ],
            jumps: vec![
                ("PREROUTING", format!("-p tcp -j {INBOUND_CHAIN}")),
                ("OUTPUT", format!("-p tcp -j {OUTPUT_CHAIN}")),
            ],
        })
    }
}

impl Rules {
    /// The `iptables-restore --noflush` input for a `nat` table whose current rules are
    /// `current` (`iptables-save -t nat` output): our chains declared (hence flushed) and
    /// filled, each jump added when missing, extra copies of a jump deleted.
    pub fn restore_input(&self, current: &str) -> String {
        let mut text = String::from("*nat\n");
        for (chain, _) in &self.chains {
            let _ = writeln!(text, ":{chain} - [0:0]");
        }
        for (chain, rules) in &self.chains {
            for rule in rules {
                let _ = writeln!(text, "-A {chain} {rule}");
            }
        }
        for (builtin, rule) in &self.jumps {
            let line = format!("-A {builtin} {rule}");
            let present = current.lines().filter(|l| l.trim_end() == line).count();
            if present == 0 {
                let _ = writeln!(text, "{line}");
            }
            for _ in 1..present.max(1) {
                let _ = writeln!(text, "-D {builtin} {rule}");
            }
        }
        text.push_str("COMMIT\n");
        text
    }

    /// What `--dry-run` prints: the input for a table without our rules.
    pub fn dry_run(&self) -> String {
        self.restore_input("")
    }

    /// Checks `save` (`iptables-save -t nat` after applying): every `MESHFLOW_*` chain holds
    /// exactly our rules in order, and each jump is there exactly once.
    ///
    /// # Errors
    /// What differs.
    pub fn verify(&self, save: &str) -> Result<(), String> {
        for (chain, rules) in &self.chains {
            let prefix = format!("-A {chain} ");
            let found: Vec<&str> = save
                .lines()
                .filter_map(|l| l.trim_end().strip_prefix(&prefix))
                .collect();
            if found != rules.iter().map(String::as_str).collect::<Vec<_>>() {
                return Err(format!(
                    "chain {chain} holds {found:?} after applying, expected {rules:?}"
                ));
            }
        }
        for (builtin, rule) in &self.jumps {
            let line = format!("-A {builtin} {rule}");
            let count = save.lines().filter(|l| l.trim_end() == line).count();
            if count != 1 {
                return Err(format!("{line:?} is there {count} times after applying"));
            }
        }
        Ok(())
    }
}

/// Rules (`-A` lines) in the `nat` table per `save` binary, or `None` when it cannot run.
fn nat_rule_count(save: &str) -> Option<usize> {
    let output = Command::new(save)
        .args(["-t", "nat"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output.status.success().then(|| {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count()
    })
}

/// Picks the backend for `auto`: the one whose nat table has rules (more of them wins; the
/// node's kube-proxy or CNI chose it), else the system's default `iptables-restore`, else
/// whichever exists.
fn choose_backend(requested: Backend) -> Backend {
    if requested != Backend::Auto {
        return requested;
    }
    let legacy = nat_rule_count(Backend::Legacy.binaries().1);
    let nft = nat_rule_count(Backend::Nft.binaries().1);
    match (legacy, nft) {
        (Some(l), Some(n)) if l > n => Backend::Legacy,
        (Some(l), Some(n)) if n > l => Backend::Nft,
        _ if nat_rule_count(Backend::Default.binaries().1).is_some() => Backend::Default,
        (_, Some(_)) => Backend::Nft,
        (Some(_), _) => Backend::Legacy,
        _ => Backend::Default,
    }
}

fn save_nat(save: &str) -> Result<String, String> {
    let output = Command::new(save)
        .args(["-t", "nat"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {save}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{save} -t nat failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn restore(restore: &str, input: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(restore)
        .args(["--noflush", "-w", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {restore}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("{restore}: {e}"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("{restore}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{restore} --noflush failed ({}): {}\ninput:\n{input}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

/// Applies `rules` with `backend` (chosen for `auto`), reads them back and checks them.
/// Returns the backend used and the number of jumps that had to be added.
///
/// # Errors
/// The iptables binaries are missing or fail (not root, no `NET_ADMIN`), or the rules read
/// back differ.
pub fn apply(rules: &Rules, backend: Backend) -> Result<Backend, String> {
    let backend = choose_backend(backend);
    let (restore_bin, save_bin) = backend.binaries();
    let current = save_nat(save_bin)?;
    restore(restore_bin, &rules.restore_input(&current))?;
    rules.verify(&save_nat(save_bin)?)?;
    Ok(backend)
}

/// Parses `args` (after `init`), installs (or prints) the rules and returns the exit code:
/// 0, 64 for bad flags, 1 when the rules could not be applied.
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let flags = match CaptureArgs::try_parse_from(
        std::iter::once(std::ffi::OsString::from("init")).chain(args),
    ) {
        Ok(flags) => flags,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 64 } else { 0 };
        }
    };
    let rules = match flags.rules() {
        Ok(rules) => rules,
        Err(e) => {
            eprintln!("meshflow-proxy init: {e}");
            return 64;
        }
    };
    if flags.dry_run {
        print!("{}", rules.dry_run());
        return 0;
    }
    match apply(&rules, flags.iptables) {
        Ok(backend) => {
            let count: usize = rules.chains.iter().map(|(_, r)| r.len()).sum();
            eprintln!(
                "meshflow-proxy init: {count} capture rules in place ({}); inbound TCP → :{}, \
                 outbound TCP → :{}, UID {} not captured",
                backend.binaries().0,
                flags.inbound_port,
                flags.outbound_port,
                flags.proxy_uid
            );
            0
        }
        Err(e) => {
            eprintln!("meshflow-proxy init: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> CaptureArgs {
        CaptureArgs::try_parse_from(
            ["init", "--proxy-uid", "2102"]
                .iter()
                .chain(extra.iter())
                .copied(),
        )
        .unwrap()
    }

    /// The injector's default arguments give exactly these rules.
    #[test]
    fn default_rules() {
        let rules = args(&[
            "--inbound-port",
            "15006",
            "--outbound-port",
            "15001",
            "--admin-port",
            "15020",
        ])
        .rules()
        .unwrap();
        assert_eq!(
            rules.dry_run(),
            "*nat
:MESHFLOW_INBOUND - [0:0]
:MESHFLOW_IN_REDIRECT - [0:0]
:MESHFLOW_OUTPUT - [0:0]
:MESHFLOW_REDIRECT - [0:0]
-A MESHFLOW_INBOUND -p tcp -m multiport --dports 15001,15006,15020 -j RETURN
-A MESHFLOW_INBOUND -p tcp -j MESHFLOW_IN_REDIRECT
-A MESHFLOW_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A MESHFLOW_OUTPUT -m owner --uid-owner 2102 -j RETURN
-A MESHFLOW_OUTPUT -o lo -j RETURN
-A MESHFLOW_OUTPUT -d 127.0.0.1/32 -j RETURN
-A MESHFLOW_OUTPUT -p tcp -j MESHFLOW_REDIRECT
-A MESHFLOW_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j MESHFLOW_INBOUND
-A OUTPUT -p tcp -j MESHFLOW_OUTPUT
COMMIT
"
        );
    }

    /// Exclusions (the injector's flags) come before the redirect; the proxy's UID rule is the
    /// first rule of the output chain, so nothing the proxy sends is ever redirected.
    #[test]
    fn exclusions_and_gid() {
        let rules = args(&[
            "--proxy-gid",
            "2103",
            "--exclude-inbound-ports",
            "22, 9090,22",
            "--exclude-outbound-ports",
            "5432,443",
            "--exclude-outbound-cidrs",
            "10.96.0.1/12,169.254.169.254",
        ])
        .rules()
        .unwrap();
        let output = &rules.chains[2];
        assert_eq!(output.0, OUTPUT_CHAIN);
        assert_eq!(
            output.1,
            [
                "-m owner --uid-owner 2102 -j RETURN",
                "-m owner --gid-owner 2103 -j RETURN",
                "-o lo -j RETURN",
                "-d 127.0.0.1/32 -j RETURN",
                "-p tcp -m multiport --dports 443,5432 -j RETURN",
                "-d 10.96.0.0/12 -j RETURN",
                "-d 169.254.169.254/32 -j RETURN",
                "-p tcp -j MESHFLOW_REDIRECT",
            ]
        );
        assert_eq!(
            rules.chains[0].1,
            [
                "-p tcp -m multiport --dports 22,9090,15001,15006,15020 -j RETURN",
                "-p tcp -j MESHFLOW_IN_REDIRECT",
            ]
        );
    }

    /// Only the listed inbound ports are redirected (never the proxy's own); more than 15
    /// ports are split over several multiport rules.
    #[test]
    fn include_ports_and_multiport_limit() {
        let list: Vec<String> = (8000..8020).map(|p| p.to_string()).collect();
        let rules = args(&[
            "--include-inbound-ports",
            &format!("{},15006", list.join(",")),
        ])
        .rules()
        .unwrap();
        assert_eq!(
            rules.chains[0].1,
            [
                "-p tcp -m multiport --dports 15001,15006,15020 -j RETURN".to_string(),
                format!(
                    "-p tcp -m multiport --dports {} -j MESHFLOW_IN_REDIRECT",
                    list[..15].join(",")
                ),
                format!(
                    "-p tcp -m multiport --dports {} -j MESHFLOW_IN_REDIRECT",
                    list[15..].join(",")
                ),
            ]
        );
    }

    #[test]
    fn bad_flags_are_refused() {
        for (extra, message) in [
            (&["--exclude-inbound-ports", "80,x"][..], "not a port"),
            (&["--exclude-outbound-ports", "0"][..], "not a port"),
            (&["--exclude-outbound-cidrs", "10.0.0.0/33"][..], "prefix"),
            (&["--exclude-outbound-cidrs", "fd00::/8"][..], "IPv4"),
            (&["--admin-port", "15006"][..], "both 15006"),
            (&["--outbound-port", "0"][..], "must not be 0"),
        ] {
            let e = args(extra).rules().unwrap_err();
            assert!(e.contains(message), "{extra:?}: {e}");
        }
        assert!(
            CaptureArgs::try_parse_from(["init"]).is_err(),
            "--proxy-uid is required"
        );
    }

    /// Re-running: the jumps already there are not added again, duplicates are deleted, and
    /// the chains are declared (flushed) and refilled either way.
    #[test]
    fn restore_input_is_idempotent() {
        let rules = args(&[]).rules().unwrap();
        let applied = rules.dry_run();
        let save = format!(
            "*nat\n:PREROUTING ACCEPT [0:0]\n{}",
            applied
                .lines()
                .filter(|l| l.starts_with("-A "))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        );
        rules.verify(&save).unwrap();
        let again = rules.restore_input(&save);
        assert!(!again.contains("-A PREROUTING"), "{again}");
        assert!(!again.contains("-A OUTPUT"), "{again}");
        assert!(again.contains(":MESHFLOW_OUTPUT - [0:0]"));
        assert!(again.contains("-A MESHFLOW_OUTPUT -m owner --uid-owner 2102 -j RETURN"));
        let doubled = format!("{save}-A OUTPUT -p tcp -j MESHFLOW_OUTPUT\n");
        assert!(rules.verify(&doubled).unwrap_err().contains("2 times"));
        let fixed = rules.restore_input(&doubled);
        assert_eq!(
            fixed
                .lines()
                .filter(|l| *l == "-D OUTPUT -p tcp -j MESHFLOW_OUTPUT")
                .count(),
            1,
            "{fixed}"
        );
        let stale = save.replace("--uid-owner 2102", "--uid-owner 1337");
        assert!(rules.verify(&stale).unwrap_err().contains(OUTPUT_CHAIN));
    }
}
