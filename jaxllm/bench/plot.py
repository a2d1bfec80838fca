"""Charts of a `jaxllm bench serve` sweep: throughput and latency against the swept load."""

from __future__ import annotations

import os


def plot_sweep(result: dict, path: str) -> str:
    """Two panels against concurrency (or request rate): output tok/s and request/s; median and
    p99 TTFT / TPOT / E2EL. Needs matplotlib (``pip install jaxllm[bench]``). Returns ``path``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("plot: needs matplotlib (pip install 'jaxllm[bench]')") from e
    runs = result["runs"]
    sweep = result.get("sweep") or {"kind": "concurrency"}
    if sweep["kind"] == "rate":
        xs = [r["request_rate"] if r["request_rate"] is not None else float("nan") for r in runs]
        xlabel = "request rate (req/s)"
    else:
        xs = [r["max_concurrency"] or r["peak_concurrency"] for r in runs]
        xlabel = "max concurrency"
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.plot(xs, [r["output_throughput"] for r in runs], "o-", label="output tok/s")
    ax_t.set_xlabel(xlabel)
    ax_t.set_ylabel("output tokens/s")
    ax_r = ax_t.twinx()
    ax_r.plot(xs, [r["request_throughput"] for r in runs], "s--", color="tab:orange", label="requests/s")
    ax_r.set_ylabel("requests/s")
    ax_t.set_title("throughput")
    for name, style in (("ttft", "o-"), ("tpot", "s-"), ("e2el", "^-")):
        ax_l.plot(xs, [r[f"{name}_median_ms"] for r in runs], style, label=f"median {name.upper()}")
        ax_l.plot(xs, [r[f"{name}_p99_ms"] for r in runs], style.replace("-", ":"), alpha=0.6,
                  label=f"p99 {name.upper()}")
    ax_l.set_xlabel(xlabel)
    ax_l.set_ylabel("ms")
    ax_l.set_yscale("log")
    ax_l.set_title("latency")
    ax_l.legend(fontsize=7)
    if sweep["kind"] == "concurrency" and len(set(xs)) > 1 and min(xs) > 0:
        ax_t.set_xscale("log", base=2)
        ax_l.set_xscale("log", base=2)
    fig.suptitle(f"jaxllm bench serve: {result.get('model')} on {result.get('device')}, "
                 f"{result.get('input_len')} in / {result.get('output_len')} out")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
