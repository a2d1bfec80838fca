"""Summarize a JAX profiler trace: GPU kernel time by name, how busy the GPU was, and its idle gaps.

    python tools/trace_summary.py TRACE_DIR [--top 25] [--json out.json]

TRACE_DIR is what ``jaxllm bench ... --profile TRACE_DIR`` (or ``jax.profiler.trace(dir,
create_perfetto_trace=True)``) wrote; the newest ``perfetto_trace.json.gz`` under it is read.
Device events are those of processes named ``/device:GPU:*`` (TPU: ``/device:TPU:*``). Busy time is
the union of kernel intervals over all streams; an idle gap is time inside the traced span with no
kernel running (host work, launch latency, synchronization). Gaps are reported by size, so launch
overhead (many gaps of a few µs) and host stalls (few long gaps) can be told apart.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys


def load_events(path: str) -> tuple[list[dict], dict[int, str]]:
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True),
                       key=os.path.getmtime)
        if not found:
            raise SystemExit(f"trace_summary: no perfetto_trace.json.gz under {path}")
        path = found[-1]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    return events, names


def summarize(events: list[dict], names: dict[int, str], top: int = 25) -> dict:
    dev_pids = {pid for pid, n in names.items() if n.startswith("/device:") and "CPU" not in n}
    kern = [e for e in events if e.get("ph") == "X" and e.get("pid") in dev_pids and e.get("dur", 0) > 0]
    if not kern:
        return {"error": "no device events (CPU trace, or the profiler saw no GPU activity)"}
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kern:
        by_name[e["name"]].append(e["dur"])
    iv = sorted((e["ts"], e["ts"] + e["dur"]) for e in kern)
    busy, gaps = 0.0, []
    cur_s, cur_e = iv[0]
    for s, e in iv[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = iv[-1][1] - iv[0][0]
    # Stream-level events (whole XLA modules, memcpy) overlap kernels; the table is per event name.
    rows = sorted(((n, len(d), sum(d)) for n, d in by_name.items()), key=lambda r: -r[2])
    buckets = [(0, 5), (5, 20), (20, 100), (100, 1000), (1000, float("inf"))]
    gap_hist = [{"us": f"{lo:g}-{hi:g}", "count": sum(lo <= g < hi for g in gaps),
                 "total_us": round(sum(g for g in gaps if lo <= g < hi), 1)} for lo, hi in buckets]
    return {"span_us": round(span, 1), "busy_us": round(busy, 1), "busy_fraction": round(busy / span, 4),
            "num_events": len(kern), "idle_us": round(span - busy, 1), "gaps": gap_hist,
            "top": [{"name": n[:120], "count": c, "total_us": round(t, 1), "mean_us": round(t / c, 2),
                     "fraction_of_busy": round(t / busy, 4)} for n, c, t in rows[:top]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="trace directory (or a perfetto_trace.json[.gz] file)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    events, names = load_events(args.trace)
    s = summarize(events, names, args.top)
    if "error" in s:
        print(f"trace_summary: {s['error']}", file=sys.stderr)
        return 1
    print(f"span {s['span_us'] / 1e3:.2f} ms, device busy {s['busy_us'] / 1e3:.2f} ms "
          f"({100 * s['busy_fraction']:.1f}%), {s['num_events']} device events, idle {s['idle_us'] / 1e3:.2f} ms")
    print("idle gaps: " + ", ".join(f"{g['us']} us: {g['count']} ({g['total_us'] / 1e3:.2f} ms)" for g in s["gaps"]))
    print(f"{'total ms':>9} {'count':>7} {'mean us':>9} {'busy%':>6}  name")
    for r in s["top"]:
        print(f"{r['total_us'] / 1e3:9.2f} {r['count']:7d} {r['mean_us']:9.2f} {100 * r['fraction_of_busy']:6.1f}  "
              f"{r['name']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
