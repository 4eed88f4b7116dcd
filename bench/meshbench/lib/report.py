#!/usr/bin/env python3
"""meshbench report: turn one run directory into results JSON + a Markdown table.

Usage: report.py RUN_DIR RESULTS_JSON [--rounds N --wrk STR --rates "1000 3000" ...]
Reads RUN_DIR/{scenarios,measurements,rss,smoke,versions}.tsv and RUN_DIR/raw/*.
Only the standard library is used.
"""
import argparse
import datetime
import json
import os
import re
import socket
import statistics
import sys

HZ = os.sysconf("SC_CLK_TCK")
PCTS = ["p50", "p90", "p99", "p99.9"]
K6_KEYS = {"p50": "p(50)", "p90": "p(90)", "p99": "p(99)", "p99.9": "p(99.9)"}


def read_tsv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def parse_snap(s):
    out = {}
    for tok in s.split():
        k, v = tok.split(":", 1)
        out[k] = int(v)
    return out


def stat(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "values": vals}


def parse_wrk(path):
    txt = open(path).read()
    r = {"raw": os.path.basename(path)}
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s|m)\b", txt)
    if m:
        r["requests"] = int(m.group(1))
        d = float(m.group(2))
        r["duration_s"] = d / 1000 if m.group(3) == "ms" else d * 60 if m.group(3) == "m" else d
    m = re.search(r"Requests/sec:\s+([\d.]+)", txt)
    r["rps"] = float(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", txt)
    r["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", txt)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    dist = {}
    for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", txt, re.M):
        dist["p" + p] = float(v) * {"us": 1, "ms": 1e3, "s": 1e6}[u]
    r["closed_loop_latency_us"] = dist
    return r


def parse_k6(path):
    r = {"raw": os.path.basename(path)}
    if not os.path.exists(path):
        r["error"] = "no k6 summary"
        return r
    data = json.load(open(path))
    m = data.get("metrics", {})

    def vals(name):
        x = m.get(name, {})
        return x.get("values", x)

    d = vals("http_req_duration")
    r["latency_us"] = {p: d.get(K6_KEYS[p]) * 1000 if d.get(K6_KEYS[p]) is not None else None for p in PCTS}
    r["latency_us"]["avg"] = d.get("avg", 0) * 1000
    r["latency_us"]["max"] = d.get("max", 0) * 1000
    reqs = vals("http_reqs")
    r["requests"] = int(reqs.get("count", 0))
    r["achieved_rps"] = reqs.get("rate")
    failed = vals("http_req_failed")
    r["failed"] = int(failed.get("passes", 0))  # 'passes' of http_req_failed = failed requests
    r["dropped_iterations"] = int(vals("dropped_iterations").get("count", 0)) if "dropped_iterations" in m else 0
    r["vus_max"] = vals("vus_max").get("max", vals("vus_max").get("value"))
    r["duration_s"] = data.get("state", {}).get("testRunDurationMs", 0) / 1000
    return r


def fmt_stat(s, fmt="{:.0f}", rng=True):
    if not s:
        return "n/a"
    if not rng or s["n"] == 1:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def fmt_added(s):
    if not s:
        return "n/a"
    f = lambda v: f"{v:+.0f}"
    if s["n"] == 1:
        return f(s["median"])
    return f"{f(s['median'])} ({f(s['min'])}…{f(s['max'])})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("results")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wrk", default="")
    ap.add_argument("--rates", default="1000 3000")
    ap.add_argument("--rate-duration", default="15")
    ap.add_argument("--k6-vus", default="")
    a = ap.parse_args()
    run = a.run
    rates = a.rates.split()

    scen_rows = read_tsv(os.path.join(run, "scenarios.tsv"))
    upstream_pids = []
    scenarios = {}
    order = []
    for row in scen_rows:
        if row[0] == "upstream":
            upstream_pids = row[1].split()
            continue
        s, url, host, roles, desc = (row + [""] * 5)[:5]
        rl = {}
        for part in filter(None, roles.split(";")):
            name, pids = part.split("=", 1)
            rl[name] = pids.split()
        scenarios[s] = {"description": desc, "url": url, "host_header": host or None, "roles": rl}
        order.append(s)

    runs = []
    for row in read_tsv(os.path.join(run, "measurements.tsv")):
        row = row + [""] * (11 - len(row))
        rnd, phase, s, out, rc, t0, t1, before, after, conns0, conns1 = row[:11]
        b, af = parse_snap(before), parse_snap(after)
        wall = float(t1) - float(t0)
        delta = lambda pids: sum(af.get(p, 0) - b.get(p, 0) for p in pids) / HZ
        rec = {"round": int(rnd), "phase": phase, "scenario": s, "exit_code": int(rc), "wall_s": round(wall, 3)}
        if phase == "wrk":
            rec.update(parse_wrk(out))
        else:
            rec["target_rps"] = int(phase[4:])
            rec.update(parse_k6(out[:-4] + ".json"))
        roles = scenarios.get(s, {}).get("roles", {})
        rec["cpu_s"] = {role: round(delta(pids), 3) for role, pids in roles.items()}
        rec["proxy_cpu_s"] = round(sum(rec["cpu_s"].values()), 3) if roles else None
        rec["upstream_cpu_s"] = round(delta(upstream_pids), 3)
        rec["loadgen_cpu_s"] = round((af.get("self", 0) - b.get("self", 0)) / HZ, 3)
        dt = af.get("total", 0) - b.get("total", 0)
        rec["machine_busy_pct"] = round(100 * (af.get("busy", 0) - b.get("busy", 0)) / dt, 1) if dt else None
        rec["steal_pct"] = round(100 * (af.get("steal", 0) - b.get("steal", 0)) / dt, 2) if dt else None
        rec["mesh_conns_before"] = parse_snap(conns0)
        rec["mesh_conns_after"] = parse_snap(conns1)
        n = rec.get("requests") or 0
        rec["proxy_cpu_s_per_10k"] = (rec["proxy_cpu_s"] / n * 1e4) if (roles and n) else None
        rec["cpu_s_per_10k_by_role"] = {r: (c / n * 1e4 if n else None) for r, c in rec["cpu_s"].items()}
        runs.append(rec)

    rss = {}
    for row in read_tsv(os.path.join(run, "rss.tsv")):
        row = row + [""] * 5
        rss[row[0]] = {"vmhwm_kb": int(row[1] or 0), "vmrss_kb": int(row[2] or 0),
                       "pss_kb": int(row[3]) if row[3] else None, "uss_kb": int(row[4]) if row[4] else None}
    smoke = [{"check": r[0], "ok": r[1] == "1", "detail": r[2] if len(r) > 2 else ""}
             for r in read_tsv(os.path.join(run, "smoke.tsv"))]
    versions = {r[0]: r[1] for r in read_tsv(os.path.join(run, "versions.tsv")) if len(r) > 1}

    def pick(s, phase):
        return [r for r in runs if r["scenario"] == s and r["phase"] == phase]

    summary = {}
    for s in order:
        sm = {"description": scenarios[s]["description"]}
        w = pick(s, "wrk")
        sm["max_rps"] = stat([r.get("rps") for r in w])
        sm["wrk_errors"] = sum((r.get("non_2xx") or 0) + (r.get("socket_errors") or 0) for r in w)
        sm["proxy_cpu_s_per_10k"] = {}
        sm["cpu_s_per_10k_by_role"] = {}
        for phase in ["wrk"] + ["rate" + x for x in rates]:
            rs = pick(s, phase)
            sm["proxy_cpu_s_per_10k"][phase] = stat([r["proxy_cpu_s_per_10k"] for r in rs])
            sm["cpu_s_per_10k_by_role"][phase] = {
                role: stat([r["cpu_s_per_10k_by_role"].get(role) for r in rs]) for role in scenarios[s]["roles"]}
            sm.setdefault("loadgen_cpu_s", {})[phase] = stat([r["loadgen_cpu_s"] for r in rs])
            sm.setdefault("machine_busy_pct", {})[phase] = stat([r["machine_busy_pct"] for r in rs])
            sm.setdefault("upstream_cpu_s_per_10k", {})[phase] = stat(
                [r["upstream_cpu_s"] / r["requests"] * 1e4 if r.get("requests") else None for r in rs])
        sm["peak_rss_kb"] = {}
        for role, pids in scenarios[s]["roles"].items():
            sm["peak_rss_kb"][role] = {"sum_vmhwm_kb": sum(rss.get(p, {}).get("vmhwm_kb", 0) for p in pids),
                                       "sum_pss_end_kb": sum(rss.get(p, {}).get("pss_kb") or 0 for p in pids),
                                       "sum_uss_end_kb": sum(rss.get(p, {}).get("uss_kb") or 0 for p in pids),
                                       "per_pid": {p: rss.get(p) for p in pids}}
        sm["latency"] = {}
        for rate in rates:
            rs = pick(s, "rate" + rate)
            base = {r["round"]: r for r in pick("A", "rate" + rate)}
            lat = {p: stat([(r.get("latency_us") or {}).get(p) for r in rs]) for p in PCTS}
            added = {}
            for p in PCTS:
                diffs = []
                for r in rs:
                    br = base.get(r["round"])
                    if br and (r.get("latency_us") or {}).get(p) is not None and (br.get("latency_us") or {}).get(p) is not None:
                        diffs.append(r["latency_us"][p] - br["latency_us"][p])
                added[p] = stat(diffs) if s != "A" else None
            sm["latency"][rate] = {
                "latency_us": lat, "added_vs_direct_us": added,
                "achieved_rps": stat([r.get("achieved_rps") for r in rs]),
                "failed": sum(r.get("failed") or 0 for r in rs),
                "dropped_iterations": sum(r.get("dropped_iterations") or 0 for r in rs),
                "vus_max": max([r.get("vus_max") or 0 for r in rs] or [0]),
            }
        summary[s] = sm

    ts = os.path.basename(os.path.normpath(run))
    result = {
        "tool": "meshbench",
        "timestamp": ts,
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "versions": versions,
        "config": {"rounds": a.rounds, "wrk": a.wrk, "rates": rates, "rate_duration_s": a.rate_duration,
                   "k6_vus_prealloc_max": a.k6_vus, "latency_tool": "k6 constant-arrival-rate (open model)",
                   "k6_gogc": os.environ.get("GOGC"), "k6_gomemlimit": os.environ.get("GOMEMLIMIT"),
                   "clk_tck": HZ},
        "caveat": ("All processes (load generator, proxies, upstream) share the same 2 CPU cores; "
                   "numbers include CPU contention and are only comparable within one run."),
        "run_dir": run,
        "scenarios": scenarios,
        "smoke": smoke,
        "summary": summary,
        "runs": runs,
        "rss": rss,
    }
    with open(a.results, "w") as f:
        json.dump(result, f, indent=1)

    # ---------------- Markdown ----------------
    out = []
    out.append(f"## meshbench {ts} — {versions.get('cpus', '?')} CPUs ({versions.get('cpu_model', '')})")
    out.append("")
    out.append(f"envoy {versions.get('envoy', '?')}, nginx {versions.get('nginx', '?')}, wrk {versions.get('wrk', '?')}, "
               f"k6 {versions.get('k6', '?')}, kernel {versions.get('kernel', '?')}. "
               f"Medians over {a.rounds} interleaved rounds, (min–max) in brackets.")
    out.append("")
    out.append(f"### Throughput and proxy resources (wrk {a.wrk}; CPU = utime+stime of the proxy processes)")
    out.append("")
    hdr = ["Scenario", "max req/s", "proxy CPU s/10k @max"] + [f"CPU s/10k @{r}/s" for r in rates] + \
          ["CPU split out+in @max", "peak RSS MiB out / in", "USS MiB out / in (end)", "wrk errors"]
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "---|" * len(hdr))
    for s in order:
        sm = summary[s]
        cpu = sm["proxy_cpu_s_per_10k"]
        roles = list(scenarios[s]["roles"])
        if roles:
            split = " + ".join(fmt_stat(sm["cpu_s_per_10k_by_role"]["wrk"][r], "{:.3f}", rng=False) for r in roles)
            rssc = " / ".join(f"{sm['peak_rss_kb'][r]['sum_vmhwm_kb'] / 1024:.1f}" for r in roles)
            pssc = " / ".join(f"{sm['peak_rss_kb'][r]['sum_uss_end_kb'] / 1024:.1f}" for r in roles)
        else:
            split, rssc, pssc = "—", "—", "—"
        row = [f"{s} {sm['description'].split(':')[0]}", fmt_stat(sm["max_rps"]),
               fmt_stat(cpu["wrk"], "{:.3f}") if roles else "—"] + \
              [fmt_stat(cpu["rate" + r], "{:.3f}") if roles else "—" for r in rates] + \
              [split, rssc, pssc, str(sm["wrk_errors"])]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.append(f"### Latency at a fixed rate (k6 constant-arrival-rate, {a.rate_duration}s each; µs; "
               "'+' = added vs A in the same round)")
    out.append("")
    hdr = ["Scenario", "rate/s", "p50", "p90", "p99", "p99.9", "+p50", "+p90", "+p99", "+p99.9",
           "achieved/s", "failed / dropped"]
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "---|" * len(hdr))
    for rate in rates:
        for s in order:
            L = summary[s]["latency"][rate]
            row = [s, rate] + [fmt_stat(L["latency_us"][p]) for p in PCTS] + \
                  [fmt_added(L["added_vs_direct_us"][p]) if s != "A" else "—" for p in PCTS] + \
                  [fmt_stat(L["achieved_rps"], "{:.0f}", rng=False), f"{L['failed']} / {L['dropped_iterations']}"]
            out.append("| " + " | ".join(row) + " |")
    out.append("")
    # the product's goals are ratios against the Envoy pair (and the nginx pair) measured in
    # the same run: one table per meshflow scenario (D: same worker count as the others; E: its
    # defaults)
    def ratio(x, y):
        return f"{x / y:.2f}×" if (x is not None and y) else "n/a"
    med = lambda st: st["median"] if st else None
    fmt = lambda v, f="{:.0f}": "n/a" if v is None else f.format(v)
    for X in ("D", "E"):
        if X not in summary or "B" not in summary:
            continue
        D, B = summary[X], summary["B"]
        C = summary.get("C")
        out.append(f"### meshflow ({X}) relative to the Envoy pair (B) and the nginx pair (C), same run "
                   "(medians; <1 = uses less / adds less)")
        out.append("")
        out.append(f"| metric | {X} | B | {X}/B | C | {X}/C |")
        out.append("|---|---|---|---|---|---|")
        def row(name, d_, b_, c_, f="{:.0f}"):
            out.append(f"| {name} | {fmt(d_, f)} | {fmt(b_, f)} | {ratio(d_, b_)} | {fmt(c_, f)} | {ratio(d_, c_)} |")
        for rate in rates:
            for p in ("p50", "p99", "p99.9"):
                g = lambda S: med(S["latency"][rate]["added_vs_direct_us"][p]) if S else None
                row(f"added {p} @{rate}/s (µs)", g(D), g(B), g(C))
        for phase in ["wrk"] + ["rate" + r for r in rates]:
            g = lambda S: med(S["proxy_cpu_s_per_10k"][phase]) if S else None
            row(f"proxy CPU s/10k req @{phase}", g(D), g(B), g(C), "{:.3f}")
        for role in D["peak_rss_kb"]:
            g = lambda S: (S["peak_rss_kb"].get(role, {}).get("sum_vmhwm_kb", 0) / 1024) if S else None
            row(f"peak RSS MiB {role}", g(D), g(B), g(C), "{:.1f}")
        g = lambda S: med(S["max_rps"]) if S else None
        row("max req/s", g(D), g(B), g(C))
        for rate in rates:
            L = D["latency"][rate]
            out.append(f"| achieved/s @{rate}/s, failed / dropped | {fmt(med(L['achieved_rps']))} | "
                       f"{L['failed']} / {L['dropped_iterations']} | | | |")
        out.append("")
    lg = []
    for s in order:
        sm = summary[s]
        lg.append(f"{s}: wrk {fmt_stat(sm['loadgen_cpu_s']['wrk'], '{:.1f}', rng=False)} s, machine busy "
                  f"{fmt_stat(sm['machine_busy_pct']['wrk'], '{:.0f}', rng=False)}%")
    out.append("Load-generator CPU and machine busy during wrk — " + "; ".join(lg) + ".")
    steal = [r["steal_pct"] for r in runs if r.get("steal_pct")]
    if steal and max(steal) >= 1:
        out.append(f"Hypervisor steal up to {max(steal):.1f}% of CPU time in a phase (see runs[].steal_pct).")
    grew = [f"{r['scenario']} {r['phase']} r{r['round']}: {r['mesh_conns_before']}→{r['mesh_conns_after']}"
            for r in runs
            if any(v > r["mesh_conns_before"].get(k, 0) for k, v in r["mesh_conns_after"].items())]
    if grew:
        out.append("New sidecar-to-sidecar connections (TLS handshakes) opened during a measured phase: "
                   + "; ".join(grew[:8]) + ("…" if len(grew) > 8 else "") + ".")
    bad = [c for c in smoke if not c["ok"]]
    out.append(f"Smoke checks: {len(smoke) - len(bad)}/{len(smoke)} passed"
               + (": FAILED " + ", ".join(c["check"] for c in bad) if bad else "."))
    out.append("Caveat: " + result["caveat"])
    print("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
