"""Tensor-parallel checks, run as a script in a fresh process with 8 simulated CPU devices.

For tiny Llamas with 2 and with 8 kv heads, tp in {1, 2, 4, 8}: the same greedy tokens as tp=1 by
the check_logprobs_close rule (chunked prefill and prefix caching on), and the shardings of the
parameters and KV pages are the designed ones. Exits non-zero on the first failure.
"""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.models.fuse import fusion_enabled  # noqa: E402
from tests.conftest import make_tiny_checkpoint  # noqa: E402
from tests.utils import check_logprobs_close, jaxllm_seqs  # noqa: E402


def prompts():
    rng = np.random.default_rng(0)
    shared = rng.integers(3, 320, size=20).tolist()
    return [[1] + shared + rng.integers(3, 320, size=n).tolist() for n in (1, 7)] + \
           [[1] + rng.integers(3, 320, size=n).tolist() for n in (2, 13, 30)]


def check_shardings(llm, tp):
    runner = llm.llm_engine.runner
    kv = runner.kv_caches[0]
    assert kv.sharding.spec == P(None, None, "model"), kv.sharding
    assert {s.data.shape[2] for s in kv.addressable_shards} == {kv.shape[2] // tp}
    attn = runner.state["model"]["layers"][0]["self_attn"]
    mlp = runner.state["model"]["layers"][0]["mlp"]
    split = {  # param -> (array, axis that must be split over the tp devices)
        "o_proj": (attn["o_proj"]["kernel"][...], 0), "down_proj": (mlp["down_proj"]["kernel"][...], 0),
        "embed": (runner.state["model"]["embed_tokens"]["embedding"][...], 0),
    }
    assert ("qkv" in attn) == fusion_enabled(), list(attn)
    if "qkv" in attn:  # fused by the engine (jaxllm/models/fuse.py): whole kv-head groups per device
        assert "q_proj" not in attn and "gate_proj" not in mlp
        split.update(qkv=(attn["qkv"][...], 1), gate_up=(mlp["gate_up"][...], 2))
    else:  # JAXLLM_FUSE_PROJECTIONS=0
        split.update(q_proj=(attn["q_proj"]["kernel"][...], 1), k_proj=(attn["k_proj"]["kernel"][...], 1),
                     gate_proj=(mlp["gate_proj"]["kernel"][...], 1))
    for name, (arr, axis) in split.items():
        shapes = {s.data.shape for s in arr.addressable_shards}
        assert len(arr.addressable_shards) == tp, (name, arr.sharding)
        want = list(arr.shape)
        want[axis] //= tp
        assert shapes == {tuple(want)}, (name, shapes, arr.shape)  # no device holds the whole matrix


def main():
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)
    with tempfile.TemporaryDirectory() as tmp:
        for kv_heads in (2, 8):
            path = make_tiny_checkpoint("llama", os.path.join(tmp, f"kv{kv_heads}"), num_attention_heads=8,
                                        num_key_value_heads=kv_heads)
            ref = None
            for tp in (1, 2, 4, 8):
                llm = LLM(path, dtype="float32", max_num_seqs=8, max_num_batched_tokens=16,
                          tensor_parallel_size=tp, progress=False)
                outs = llm.generate(prompts(), sp, use_tqdm=False)
                stats = llm.stats()
                assert stats["prefix_cache_hits"] > 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
                seqs = jaxllm_seqs(outs)
                if tp == 1:
                    ref = seqs
                else:
                    check_shardings(llm, tp)
                    check_logprobs_close(ref, seqs, "tp=1", f"tp={tp}")
                    replicated = llm.llm_engine.runner.kv_caches[0].shape[2] // 2
                    assert replicated == max(kv_heads, tp), replicated
                print(f"kv_heads={kv_heads} tp={tp}: ok", flush=True)
    print("ALL OK")


if __name__ == "__main__":
    main()
