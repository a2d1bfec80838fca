"""End-to-end engine check on a GPU: greedy outputs with each attention backend vs the reference.

    python tools/gpu_engine_check.py [--out DIR]

Builds a tiny random Llama (head_dim 64, GQA 2), generates 6 prompts of different lengths together
(chunked prefill, multi-step decode) in bf16 with backends reference / triton / mosaic_gpu, and
compares each with the reference by vLLM's check_logprobs_close rule. Writes the first backend that
passes (triton, then mosaic_gpu) to DIR/backend.txt for the benchmarks, else "reference".
"""

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402
from tests.conftest import make_tiny_checkpoint  # noqa: E402
from tests.utils import check_logprobs_close, jaxllm_seqs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, 320, size=n).tolist() for n in (1, 9, 30, 77, 150, 300)]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=5)
    results, ref = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint("llama", tmp, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=512)
        for backend in ("reference", "triton", "mosaic_gpu"):
            t0 = time.perf_counter()
            try:
                llm = LLM(path, dtype="bfloat16", attention_backend=backend, max_num_seqs=8,
                          max_num_batched_tokens=128, num_kv_blocks=256, progress=False)
                seqs = jaxllm_seqs(llm.generate(prompts, sp, use_tqdm=False))
                if ref is None:
                    ref = seqs
                    status = "ok (ground truth)"
                else:
                    check_logprobs_close(ref, seqs, "reference", backend)
                    same = sum(a[0] == b[0] for a, b in zip(ref, seqs))
                    status = f"ok: check_logprobs_close passes, {same}/{len(seqs)} sequences identical"
            except Exception as e:  # report and go on with the other backends
                status = f"FAILED: {type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc(limit=3)
            results[backend] = {"status": status, "seconds": round(time.perf_counter() - t0, 1)}
            print(f"### engine check {backend}: {status} ({results[backend]['seconds']} s)", flush=True)
    chosen = next((b for b in ("triton", "mosaic_gpu") if results[b]["status"].startswith("ok")), "reference")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "backend.txt"), "w") as f:
        f.write(chosen)
    with open(os.path.join(args.out, "engine_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"### benchmark backend: {chosen}")


if __name__ == "__main__":
    main()
