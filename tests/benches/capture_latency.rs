//! Benchmark (not a test): the latency traffic capture adds — the iptables REDIRECT, the
//! original-destination lookup (`SO_ORIGINAL_DST`) and protocol detection on the outbound
//! sidecar — compared with the explicit outbound listener, in the network-namespace setup of
//! `tests/tests/e2e/capture.rs` (pods A and B with `meshflow-proxy init` and real sidecars,
//! the control plane in Kubernetes mode against the dev cluster).
//!
//! Both paths are the same mesh call (A's sidecar → mTLS, HTTP/2 → B's sidecar → B's echo
//! app); they differ only in how A's app reaches its sidecar:
//!
//! - **explicit**: `127.0.0.1:15001` with `Host: backend.<namespace>` (loopback, never
//!   redirected), routed by authority;
//! - **captured**: `<cluster IP>:80`, no proxy settings — redirected to the same listener,
//!   routed by its original destination.
//!
//! Two shapes, interleaved (explicit, captured, explicit, …) so drift hits both alike:
//! requests on one kept-alive connection (capture's per-request cost: the destination lookup
//! and the target-port header), and a new connection per request (plus the redirected
//! connect, `SO_ORIGINAL_DST` and detection of the first bytes). Run with
//! `bench/capture-latency [--requests N] [--connections N]`; prints a table and writes JSON
//! (`--out`).

#[path = "../tests/e2e/capture.rs"]
mod capture;
#[path = "../tests/e2e/cluster.rs"]
mod cluster;
#[path = "../tests/e2e/common.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const USAGE: &str = "capture_latency [--requests 3000] [--connections 1000] [--warmup 300] \
[--out FILE]";

struct Args {
    requests: usize,
    connections: usize,
    warmup: usize,
    out: Option<String>,
}

fn args() -> Args {
    let mut args = Args {
        requests: 3000,
        connections: 1000,
        warmup: 300,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench`.
        if flag == "--bench" {
            continue;
        }
        let value = it
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value\n{USAGE}"));
        let number = || {
            value
                .parse::<usize>()
                .unwrap_or_else(|_| panic!("{flag} {value}: not a number\n{USAGE}"))
        };
        match flag.as_str() {
            "--requests" => args.requests = number(),
            "--connections" => args.connections = number(),
            "--warmup" => args.warmup = number(),
            "--out" => args.out = Some(value),
            _ => panic!("unknown flag {flag}\n{USAGE}"),
        }
    }
    args
}

/// Sends a GET and reads one response (Content-Length or chunked), keeping the connection.
async fn request(
    stream: &mut BufReader<TcpStream>,
    host: &str,
    close: bool,
) -> std::io::Result<u16> {
    let connection = if close { "close" } else { "keep-alive" };
    stream
        .get_mut()
        .write_all(
            format!("GET /bench HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut status = 0u16;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut line = String::new();
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let lower = trimmed.to_ascii_lowercase();
        if let Some(code) = lower.strip_prefix("http/1.1 ") {
            status = code.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        } else if let Some(value) = lower.strip_prefix("content-length:") {
            length = value.trim().parse().ok();
        } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if chunked {
        loop {
            line.clear();
            stream.read_line(&mut line).await?;
            let size = usize::from_str_radix(line.trim_end().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            let mut chunk = vec![0u8; size + 2];
            stream.read_exact(&mut chunk).await?;
            if size == 0 {
                break;
            }
        }
    } else if let Some(length) = length {
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await?;
    } else {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await?;
    }
    Ok(status)
}

/// Latency figures of one series, microseconds.
#[derive(Debug, Clone, Copy)]
struct Stats {
    n: usize,
    mean: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    min: f64,
}

fn stats(samples: &mut [Duration]) -> Stats {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| us(samples[((samples.len() as f64 - 1.0) * q).round() as usize]);
    Stats {
        n: samples.len(),
        mean: samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64,
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        min: us(samples[0]),
    }
}

fn to_json(s: Stats) -> serde_json::Value {
    json!({ "n": s.n, "meanUs": s.mean, "p50Us": s.p50, "p90Us": s.p90, "p99Us": s.p99,
            "minUs": s.min })
}

struct Target {
    addr: SocketAddr,
    host: String,
}

/// Keep-alive: `n` requests on one connection per target, alternating between the targets.
async fn keepalive(
    mesh: &capture::Mesh,
    targets: &[Target; 2],
    warmup: usize,
    n: usize,
) -> [Vec<Duration>; 2] {
    let mut streams = Vec::new();
    for target in targets {
        let stream = mesh.a.ns.connect(target.addr).await.expect("connect");
        streams.push(BufReader::new(stream));
    }
    let mut samples = [Vec::with_capacity(n), Vec::with_capacity(n)];
    for i in 0..warmup + n {
        for (k, target) in targets.iter().enumerate() {
            let started = Instant::now();
            let status = request(&mut streams[k], &target.host, false)
                .await
                .expect("keep-alive request");
            let took = started.elapsed();
            assert_eq!(status, 200, "{}", target.addr);
            if i >= warmup {
                samples[k].push(took);
            }
        }
    }
    samples
}

/// A new connection per request (sockets made beforehand, so only connect + request + the
/// response are timed), alternating between the targets.
async fn per_connection(
    mesh: &capture::Mesh,
    targets: &[Target; 2],
    warmup: usize,
    n: usize,
) -> [Vec<Duration>; 2] {
    let mut samples = [Vec::with_capacity(n), Vec::with_capacity(n)];
    let batch = 100;
    let mut done = 0;
    while done < warmup + n {
        let count = batch.min(warmup + n - done);
        let mut sockets = [mesh.a.ns.sockets(count), mesh.a.ns.sockets(count)];
        for i in 0..count {
            for (k, target) in targets.iter().enumerate() {
                let socket = sockets[k].pop().expect("a socket");
                let started = Instant::now();
                let stream = socket.connect(target.addr).await.expect("connect");
                let mut stream = BufReader::new(stream);
                let status = request(&mut stream, &target.host, true)
                    .await
                    .expect("request");
                let took = started.elapsed();
                assert_eq!(status, 200, "{}", target.addr);
                if done + i >= warmup {
                    samples[k].push(took);
                }
            }
        }
        done += count;
        // Let the closed connections' TIME_WAIT and the sidecars settle a little.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    samples
}

fn main() {
    let args = args();
    if !capture::can_run("bench/capture-latency") {
        std::process::exit(1);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mesh = capture::Mesh::start(capture::Options {
            detect_timeout: Duration::from_secs(1),
        })
        .await;
        let targets = [
            Target {
                addr: SocketAddr::new([127, 0, 0, 1].into(), capture::OUTBOUND),
                host: format!("backend.{}", mesh.ns.name),
            },
            Target {
                addr: SocketAddr::new(mesh.cluster_ip.into(), 80),
                host: mesh.cluster_ip.to_string(),
            },
        ];
        eprintln!(
            "keep-alive: {} requests per path after {} warm-up",
            args.requests, args.warmup
        );
        let [mut ka_explicit, mut ka_captured] =
            keepalive(&mesh, &targets, args.warmup, args.requests).await;
        eprintln!(
            "new connection per request: {} per path after {} warm-up",
            args.connections,
            args.warmup / 3
        );
        let [mut nc_explicit, mut nc_captured] =
            per_connection(&mesh, &targets, args.warmup / 3, args.connections).await;
        let metrics = mesh.metrics(&mesh.a).await;
        let captured_connections = capture::tcp(&metrics, "outbound", "http1");
        let rows = [
            ("keep-alive, explicit", stats(&mut ka_explicit)),
            ("keep-alive, captured", stats(&mut ka_captured)),
            ("new connection, explicit", stats(&mut nc_explicit)),
            ("new connection, captured", stats(&mut nc_captured)),
        ];
        println!(
            "{:<28} {:>6} {:>9} {:>9} {:>9} {:>9}",
            "path (µs)", "n", "mean", "p50", "p90", "p99"
        );
        for (name, s) in &rows {
            println!(
                "{name:<28} {:>6} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
                s.n, s.mean, s.p50, s.p90, s.p99
            );
        }
        let added = |explicit: Stats, captured: Stats| {
            json!({ "p50Us": captured.p50 - explicit.p50, "meanUs": captured.mean - explicit.mean,
                    "p99Us": captured.p99 - explicit.p99 })
        };
        let ka = added(rows[0].1, rows[1].1);
        let nc = added(rows[2].1, rows[3].1);
        println!(
            "added by capture: keep-alive p50 {:+.0} µs (mean {:+.0}); new connection p50 {:+.0} µs \
             (mean {:+.0})",
            ka["p50Us"].as_f64().unwrap(),
            ka["meanUs"].as_f64().unwrap(),
            nc["p50Us"].as_f64().unwrap(),
            nc["meanUs"].as_f64().unwrap()
        );
        let result = json!({
            "bench": "capture-latency",
            "date": std::process::Command::new("date").args(["-u", "+%FT%TZ"]).output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default(),
            "host": {
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default().trim(),
            },
            "setup": "network namespaces as pods (bridge + veth), meshflow-proxy init in A and \
                      B, release sidecars as UID 2102, control plane in Kubernetes mode against \
                      the dev cluster; A's app = the bench's sockets in A's namespace; B's app = \
                      meshflow-echo",
            "paths": {
                "explicit": "A → 127.0.0.1:15001 (Host: backend.<ns>) → mTLS/HTTP2 → B's sidecar → app",
                "captured": "A → <cluster IP>:80 (no proxy settings), redirected to the same listener",
            },
            "keepAlive": { "explicit": to_json(rows[0].1), "captured": to_json(rows[1].1),
                           "addedByCapture": ka },
            "newConnection": { "explicit": to_json(rows[2].1), "captured": to_json(rows[3].1),
                               "addedByCapture": nc },
            "capturedConnectionsCounted": captured_connections,
        });
        let text = serde_json::to_string_pretty(&result).unwrap();
        if let Some(out) = &args.out {
            std::fs::write(out, format!("{text}\n")).unwrap();
            eprintln!("wrote {out}");
        } else {
            println!("{text}");
        }
    });
}
