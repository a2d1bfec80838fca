"""One process of the multi-host test (run by test_multihost.py in a fresh interpreter).

    multihost_worker.py single <ckpt> <out.json>                      one process, tp=1: the reference
    multihost_worker.py multi <ckpt> <out.json> <port> <process_id>   2 processes x 4 CPU devices, tp=8

Process 0 generates and writes its outputs to out.json; process 1 serves its steps inside LLM(...),
which exits the process with status 0 when process 0 closes the engine.
"""

import json
import logging
import os
import sys
import time

MODE = sys.argv[1]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + ("4" if MODE == "multi" else "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402

MULTI_TP = 8  # 2 processes x 4 devices


def workload():
    """Mixed requests: chunked prefill, a shared prefix, penalties (history broadcast), prompt
    logprobs (the "lp" program) and, once only greedy rows remain, multi-step decode."""
    rng = np.random.default_rng(0)
    shared = rng.integers(3, 320, size=20).tolist()
    prompts = [[1] + shared + rng.integers(3, 320, size=n).tolist() for n in (1, 7)] + \
              [[1] + rng.integers(3, 320, size=n).tolist() for n in (2, 13, 30)]
    greedy = dict(temperature=0.0, ignore_eos=True, logprobs=5)
    params = [SamplingParams(max_tokens=12, **greedy),
              SamplingParams(max_tokens=12, prompt_logprobs=3, **greedy),
              SamplingParams(max_tokens=4, repetition_penalty=1.3, **greedy),
              SamplingParams(max_tokens=12, **greedy),
              SamplingParams(max_tokens=9, **greedy)]
    return prompts, params


def _seqs(outs) -> list:
    return [[o.outputs[0].token_ids, [{str(k): v for k, v in d.items()} for d in o.outputs[0].logprobs]]
            for o in outs]


def main() -> None:
    ckpt, out_path = sys.argv[2], sys.argv[3]
    kw = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=16, num_decode_steps=4,
              compilation_cache_dir="", progress=False)
    if MODE == "multi":
        port, pid = sys.argv[4], int(sys.argv[5])
        logging.basicConfig(level=logging.WARNING, format=f"[p{pid}] %(levelname)s %(name)s: %(message)s")
        logging.getLogger("jaxllm.parallel.multihost").setLevel(logging.INFO)
        kw.update(tensor_parallel_size=MULTI_TP, coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                  process_id=pid)
    t0 = time.perf_counter()
    llm = LLM(ckpt, **kw)  # a follower (process 1) runs the leader's steps in here and exits
    t_ready = time.perf_counter()
    prompts, params = workload()
    outs = llm.generate(prompts, params, use_tqdm=False)
    t_gen = time.perf_counter() - t_ready
    # Timing only: the same workload again, warm (broadcast programs compiled), prefix cache hot.
    runner = llm.llm_engine.runner
    mh = runner.multihost
    n0, s0, t1 = (mh.num_programs, mh.share_s, time.perf_counter()) if mh else (0, 0.0, time.perf_counter())
    outs_warm = llm.generate(prompts, params, use_tqdm=False)
    t_warm = time.perf_counter() - t1
    warm = llm.llm_engine._warm_compilations
    stats = llm.stats()
    result = {
        "seqs": _seqs(outs), "seqs_warm": _seqs(outs_warm),
        "prompt_logprobs": [None if o.prompt_logprobs is None else
                            [None if d is None else {str(k): v for k, v in d.items()} for d in o.prompt_logprobs]
                            for o in outs],
        "stats": stats, "warm_compilations": warm,
        "num_programs": None if mh is None else mh.num_programs,
        "kv_sharding": str(getattr(runner.kv_caches[0].sharding, "spec", None)),
        "kv_addressable_shards": len(runner.kv_caches[0].addressable_shards),
        "startup_s": t_ready - t0, "compile_s": llm.llm_engine.compile_time_s, "generate_s": t_gen,
        "ms_per_program": None if mh is None else 1e3 * t_gen / max(1, n0),
        "generate_warm_s": t_warm,
        "warm_ms_per_program": None if mh is None else 1e3 * t_warm / max(1, mh.num_programs - n0),
        "warm_share_ms_per_program": None if mh is None else 1e3 * (mh.share_s - s0) / max(1, mh.num_programs - n0),
    }
    llm.close()  # multi-host: the follower leaves its loop and exits 0
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
