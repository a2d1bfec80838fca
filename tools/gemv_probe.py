"""Batch-1/8 GEMV speed on the GPU by weight layout: ``x @ W`` with W [in, out] (jaxllm's Linear)
against ``x @ W.T`` with W [out, in] (Hugging Face's layout), and q/k/v (gate/up) as separate
weights against one fused weight. Each timed program applies a chain of ``--layers`` layers'
projections (distinct weights, a data dependency between layers, as in a decoder), so the time
per layer includes what XLA emits around the dots.

    python tools/gemv_probe.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

SHAPES = {  # hidden, q heads, kv heads, head_dim, intermediate
    "qwen2.5-0.5b": (896, 14, 2, 64, 4864),
    "llama-3.1-8b": (4096, 32, 8, 128, 14336),
}


def make_weights(key, layers, hidden, hq, hkv, d, inter, out_in: bool, fused: bool):
    shapes = {"q": (hidden, hq * d), "k": (hidden, hkv * d), "v": (hidden, hkv * d),
              "o": (hq * d, hidden), "gate": (hidden, inter), "up": (hidden, inter),
              "down": (inter, hidden)}
    if fused:
        shapes = {"qkv": (hidden, (hq + 2 * hkv) * d), "o": shapes["o"],
                  "gate_up": (hidden, 2 * inter), "down": shapes["down"]}
    ws = []
    for i in range(layers):
        layer = {}
        for j, (n, (a, b)) in enumerate(shapes.items()):
            k = jax.random.fold_in(key, i * 16 + j)
            shape = (b, a) if out_in else (a, b)
            layer[n] = (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
        ws.append(layer)
    return ws


def forward(ws, x, hq, hkv, d, inter, out_in: bool, fused: bool):
    mm = (lambda a, w: jnp.einsum("tk,nk->tn", a, w)) if out_in else (lambda a, w: a @ w)
    for w in ws:
        if fused:
            qkv = mm(x, w["qkv"])
            q = qkv[:, :hq * d]
            k, v = qkv[:, hq * d:(hq + hkv) * d], qkv[:, (hq + hkv) * d:]
        else:
            q, k, v = mm(x, w["q"]), mm(x, w["k"]), mm(x, w["v"])
        attn = q + jnp.tile(k + v, (1, hq // hkv))        # stands in for attention
        x = x + mm(attn, w["o"])
        if fused:
            gu = mm(x, w["gate_up"])
            g, u = gu[:, :inter], gu[:, inter:]
        else:
            g, u = mm(x, w["gate"]), mm(x, w["up"])
        x = x + mm(jax.nn.silu(g) * u, w["down"])
    return x


def kernels_per_layer(f, layers, *args) -> float:
    """Kernel launches per layer in the optimized HLO: fusions and custom calls (cuBLAS, Triton)
    in the entry computation, divided by the number of layers."""
    text = f.lower(*args).compile().as_text()
    entry = text[text.find("ENTRY"):]
    entry = entry[:entry.find("\n}\n")]
    n = sum(1 for line in entry.splitlines() if " fusion(" in line or " custom-call(" in line)
    return round(n / layers, 1)


def timeit(f, *args, reps=30):
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--batches", default="1,8")
    a = p.parse_args()
    rows = []
    for model, (hidden, hq, hkv, d, inter) in SHAPES.items():
        nbytes = 2 * (hidden * (hq + 2 * hkv) * d + hq * d * hidden + 3 * hidden * inter)
        for out_in in (False, True):
            for fused in (False, True):
                ws = make_weights(jax.random.key(0), a.layers, hidden, hq, hkv, d, inter, out_in, fused)
                f = jax.jit(lambda ws, x, oi=out_in, fu=fused: forward(ws, x, hq, hkv, d, inter, oi, fu))
                for b in map(int, a.batches.split(",")):
                    x = jax.random.normal(jax.random.key(1), (b, hidden), jnp.bfloat16)
                    t = timeit(f, ws, x)
                    try:
                        kpl = kernels_per_layer(f, a.layers, ws, x)
                    except Exception as e:  # noqa: BLE001 - the count is only informative
                        kpl = repr(e)[:80]
                    r = dict(model=model, layout="[out,in]" if out_in else "[in,out]",
                             fused=fused, batch=b, us_per_layer=round(t / a.layers * 1e6, 2),
                             GBps=round(nbytes * a.layers / t / 1e9), kernels_per_layer=kpl)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                del ws
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gemv_probe.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
