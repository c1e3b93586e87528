#!/usr/bin/env python3
"""Renders the results of bench/proxy.sh (JSON lines) as a markdown report on stdout."""

import json
import re
import statistics
import sys

MB = 1e6  # throughput in MB/s, 10^6 bytes per second

CONFIGS = [
    ("nginx", "nginx, sendfile (physical limit)"),
    ("registry", "distribution, direct GET (the origin)"),
    ("ptc-cold", "distribution pull-through cache, cold"),
    ("ptc-warm", "distribution pull-through cache, warm"),
    ("larder-cold", "larder cold (empty disk, from the origin)"),
    ("larder-cache", "larder via the cache registry (empty disk)"),
    ("larder-warm", "larder warm (disk tier)"),
]
TARGETS = {
    "warm": 0.9,  # larder warm / nginx
    "cold": 0.9,  # larder cold miss / direct origin GET
    "tag": 5.0,  # larder manifests by tag / pull-through cache
    "digest": 20.0,  # larder manifests by digest / pull-through cache
    "p99_ms": 10.0,
    "rss_mib": 64.0,
}


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def wrk_parse(path):
    text = open(path).read()
    out = {"rps": None, "p50": None, "p99": None, "errors": 0, "requests": None}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", text)
    if m:
        out["requests"] = int(m.group(1))
    for pct, key in (("50", "p50"), ("99", "p99")):
        m = re.search(rf"^\s+{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if m:
            value = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
            out[key] = value
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        out["errors"] += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["errors"] += sum(int(g) for g in m.groups())
    return out


def fmt(x, digits=0):
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}"


def met(ok):
    return "**met**" if ok else "**not met**"


def main():
    rows = load(sys.argv[1])
    meta = {r["key"]: r["value"] for r in rows if r["t"] == "meta"}
    runs = meta.get("runs", "?")

    # Blobs: medians per (config, size).
    gets = {}
    sizes = []
    for r in rows:
        if r["t"] == "get":
            gets.setdefault((r["config"], r["size"]), []).append(r)
            if r["size"] not in sizes:
                sizes.append(r["size"])
    verified = {(r["config"], r["size"]): r["ok"] for r in rows if r["t"] == "verify"}
    sources = {(r["config"], r["size"]): r["sources"] for r in rows if r["t"] == "source"}
    origin_gets = {}
    for r in rows:
        if r["t"] == "origin_gets":
            origin_gets.setdefault((r["config"], r["size"]), []).append(r["gets"])

    def og(config, size):
        counts = origin_gets.get((config, size))
        if not counts:
            return ""
        lo, hi = min(counts), max(counts)
        return str(lo) if lo == hi else f"{lo}–{hi}"

    def rs_bytes(config, size):
        return gets[(config, size)][0]["bytes"]

    def stats(config, size):
        rs = gets.get((config, size))
        if not rs:
            return None
        tput = [r["bytes"] / r["total"] / MB for r in rs]
        return {
            "tput": statistics.median(tput),
            "min": min(tput),
            "max": max(tput),
            "ttfb": statistics.median(r["ttfb"] for r in rs) * 1e3,
            "total": statistics.median(r["total"] for r in rs),
            "n": len(rs),
            "busy": sum(r.get("busy", 0) for r in rs),
            "cpu": (statistics.median(r["cpu_ticks"] / r["clk_tck"] for r in rs)
                    if all(r.get("cpu_ticks", -1) >= 0 for r in rs) else None),
        }

    p = print
    p("# larder proxy benchmark")
    p()
    p(f"- date: {meta.get('date')}; commit `{meta.get('commit')}`")
    p(f"- machine: {meta.get('cores')} cores ({meta.get('cpu')}), {meta.get('memory')} RAM, "
      f"Linux {meta.get('kernel')}")
    p(f"- software: {meta.get('versions')}")
    p(f"- `uptime` at start: `{meta.get('uptime_start', '').strip()}`")
    p(f"- `uptime` at end: `{meta.get('uptime_end', '').strip()}`")
    loads = [r for r in rows if r["t"] == "load"]
    if loads:
        p("- load when each section started (1/5/15 min), and whether other engineers' "
          "`cargo`/`rustc` were running:")
        for r in loads:
            waited = f", after waiting {r['waited']} s" if r["waited"] else ""
            p(f"  - {r['section']}: load {r['loadavg']}, {r['builds']}{waited}")
    p()

    p(f"## Blobs (median of {runs} runs per configuration; MB/s = 10^6 bytes/s)")
    p()
    p("Runs are made in rounds, one run of each configuration per round in turn, so that load from "
      "elsewhere hits all of them alike: cold rounds (nginx, direct GET, pull-through cache cold, "
      "larder cold, larder via the cache registry), then warm rounds (nginx, direct GET, "
      f"pull-through cache warm, larder warm); nginx and the direct GET therefore have 2×{runs} runs. "
      "Every cold run starts from a fresh state: larder restarted on an emptied disk directory, the "
      "pull-through cache restarted on a fresh storage directory. Each configuration's bytes were "
      "checked once with sha256sum (an untimed GET); the timed GETs go to /dev/null.")
    p()
    p("| configuration | size | MB/s (median) | MB/s (min–max) | TTFB ms (median) | × nginx | × direct GET | server CPU s per GiB | origin GETs per run | sha256 | larder served from | runs during builds |")
    p("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for size in sizes:
        ref_nginx = stats("nginx", size)
        ref_direct = stats("registry", size)
        for config, name in CONFIGS:
            s = stats(config, size)
            if not s:
                continue
            vs_nginx = s["tput"] / ref_nginx["tput"] if ref_nginx else None
            vs_direct = s["tput"] / ref_direct["tput"] if ref_direct else None
            ok = verified.get((config, size))
            p(f"| {name} | {size} | {fmt(s['tput'])} | {fmt(s['min'])}–{fmt(s['max'])} | "
              f"{fmt(s['ttfb'], 1)} | {fmt(vs_nginx, 2)} | {fmt(vs_direct, 2)} | "
              f"{fmt(s['cpu'] / (rs_bytes(config, size) / 2**30), 2) if s['cpu'] is not None else 'n/a'} | "
              f"{og(config, size)} | "
              f"{'ok' if ok else ('MISMATCH' if ok is False else 'n/a')} | "
              f"{sources.get((config, size), '')} | {s['busy']}/{s['n']} |")
    p()
    p("Server CPU: user+system time of the serving process (larder, or the registry) during one GET, "
      "median, scaled to 1 GiB (`/proc/PID/stat`, 10 ms ticks; nginx not measured). For cold larder "
      "runs the origin's CPU is not included. Origin GETs per run: blob GETs in the origin's access "
      "log during a cold round's run of that configuration (and the background work it started).")
    if meta.get("sha256"):
        sha = float(meta["sha256"])
        p()
        p(f"SHA-256 on one core of this machine (`openssl speed -evp sha256`, 256 KiB blocks): "
          f"{sha:,.0f} MB/s. A proxy that verifies a blob before its last byte cannot complete a "
          f"cold miss faster than that on one stream, whatever its I/O does.")
    p()

    # Manifests.
    wrks = {(r["target"], r["ref"]): (r, wrk_parse(r["file"])) for r in rows if r["t"] == "wrk"}
    p(f"## Manifests (`{meta.get('wrk')}`, OCI manifest, warm)")
    p()
    p("| target | by | req/s | p50 ms | p99 ms | errors | origin HEADs / GETs during the run | × pull-through cache | builds running |")
    p("|---|---|---:|---:|---:|---:|---:|---:|---|")
    names = {
        "registry": "distribution, direct",
        "ptc": "distribution pull-through cache",
        "larder": "larder (default `--tag-freshness` 10s)",
        "larder-fresh0": "larder `--tag-freshness 0s` (HEAD to origin per request)",
    }
    for (target, ref), (r, w) in wrks.items():
        peer = wrks.get(("ptc", ref))
        ratio = w["rps"] / peer[1]["rps"] if peer and peer[1]["rps"] and w["rps"] else None
        p(f"| {names.get(target, target)} | {ref} | {fmt(w['rps'])} | {fmt(w['p50'], 2)} | "
          f"{fmt(w['p99'], 2)} | {w['errors']} | {r['origin_heads']} / {r['origin_gets']} | "
          f"{fmt(ratio, 1) if target != 'ptc' else '1.0'} | {'yes' if r.get('busy') else 'no'} |")
    p()

    # RSS.
    rss = [r for r in rows if r["t"] == "rss"]
    p(f"## larder peak RSS under {meta.get('clients')} concurrent GETs of the largest blob")
    p()
    p("`VmHWM` of the larder process (started fresh before each phase) from /proc/PID/status.")
    p()
    p("| phase | VmHWM MiB | VmHWM before the GETs MiB | all complete | wall s | aggregate MB/s | origin GETs of the blob | coalesced | served from | builds running |")
    p("|---|---:|---:|---|---:|---:|---:|---:|---|---|")
    for r in rss:
        agg = r["ok"] * r["bytes"] / r["wall"] / MB if r["wall"] else None
        p(f"| {r['phase']} | {fmt(r['hwm_kib'] / 1024, 1)} | {fmt(r['base_kib'] / 1024, 1)} | "
          f"{r['ok']}/{r['clients']} | {fmt(r['wall'], 2)} | {fmt(agg)} | {r['origin_gets']} | "
          f"{r['coalesced']} | {r['sources']} | {'yes' if r.get('busy') else 'no'} |")
    p()

    # Targets.
    p("## Targets (issue 3)")
    p()
    p("| target | measured | ratio / value | |")
    p("|---|---|---:|---|")
    for size in sizes:
        w, n = stats("larder-warm", size), stats("nginx", size)
        if w and n:
            ratio = w["tput"] / n["tput"]
            p(f"| warm blob ≥ {TARGETS['warm']}× nginx ({size}) | {fmt(w['tput'])} vs {fmt(n['tput'])} MB/s | "
              f"{ratio:.2f}× | {met(ratio >= TARGETS['warm'])} |")
    for size in sizes:
        d = stats("registry", size)
        for config, label in (("larder-cold", "from the origin"), ("larder-cache", "via the cache registry")):
            c = stats(config, size)
            if c and d:
                ratio = c["tput"] / d["tput"]
                p(f"| cold miss ≥ {TARGETS['cold']}× direct GET ({size}, {label}) | "
                  f"{fmt(c['tput'])} vs {fmt(d['tput'])} MB/s | {ratio:.2f}× | {met(ratio >= TARGETS['cold'])} |")
        if d and meta.get("sha256"):
            ceiling = float(meta["sha256"]) / d["tput"]
            p(f"| (for information, {size}: one core's SHA-256 speed ÷ the direct GET, the bound on a verified cold miss here) | "
              f"SHA-256 {fmt(float(meta['sha256']))} vs {fmt(d['tput'])} MB/s | {ceiling:.2f}× | |")
    for ref, target_key in (("tag", "tag"), ("digest", "digest")):
        for larder in ("larder", "larder-fresh0"):
            if (larder, ref) not in wrks or ("ptc", ref) not in wrks:
                continue
            lw, pw = wrks[(larder, ref)][1], wrks[("ptc", ref)][1]
            if not (lw["rps"] and pw["rps"]):
                continue
            ratio = lw["rps"] / pw["rps"]
            note = "" if larder == "larder" else ", `--tag-freshness 0s` (for information)"
            p(f"| manifests by {ref} ≥ {TARGETS[target_key]:g}× pull-through cache{note} | "
              f"{fmt(lw['rps'])} vs {fmt(pw['rps'])} req/s | {ratio:.1f}× | "
              f"{met(ratio >= TARGETS[target_key])} |")
    for (target, ref), (_, w) in wrks.items():
        if target.startswith("larder") and w["p99"] is not None:
            note = "" if target == "larder" else ", `--tag-freshness 0s`"
            p(f"| manifest p99 < {TARGETS['p99_ms']:g} ms (by {ref}{note}) | p50 {fmt(w['p50'], 2)} ms | "
              f"p99 {fmt(w['p99'], 2)} ms | {met(w['p99'] < TARGETS['p99_ms'])} |")
    for r in rss:
        mib = r["hwm_kib"] / 1024
        p(f"| RSS < {TARGETS['rss_mib']:g} MiB ({r['phase']}, {r['clients']} clients) | VmHWM | "
          f"{mib:.1f} MiB | {met(mib < TARGETS['rss_mib'] and r['ok'] == r['clients'])} |")
    p()


if __name__ == "__main__":
    main()
