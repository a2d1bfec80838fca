"""The same greedy tokens whatever the engine configuration: prefix caching on/off, chunked prefill,
a KV cache so small that requests are preempted, and max_num_seqs=1 versus many."""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from tests.utils import check_logprobs_close, jaxllm_seqs

MAX_TOKENS = 24


def _prompts():
    rng = np.random.default_rng(1)
    shared = rng.integers(3, 320, size=40).tolist()  # a common 40-token prefix: prefix-cache hits
    prompts = [[1] + shared + rng.integers(3, 320, size=n).tolist() for n in (1, 5, 9, 17)]
    prompts += [[1] + rng.integers(3, 320, size=n).tolist() for n in (2, 6, 30, 55)]
    return prompts


def _run(model_dir, **kw):
    llm = LLM(model_dir, dtype="float32", progress=False, **kw)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = llm.generate(_prompts(), params, use_tqdm=False)
    stats = llm.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"], stats
    return jaxllm_seqs(outs), stats


@pytest.fixture(scope="module")
def baseline(tiny_llama_dir):
    return _run(tiny_llama_dir, max_num_seqs=16, max_num_batched_tokens=128)


def test_prefix_caching_hits_and_same_tokens(tiny_llama_dir, baseline):
    seqs, stats = baseline
    assert stats["prefix_cache_hits"] > 0  # the shared 40-token prefix was reused
    seqs_off, stats_off = _run(tiny_llama_dir, max_num_seqs=16, max_num_batched_tokens=128,
                               enable_prefix_caching=False)
    assert stats_off["prefix_cache_hits"] == 0
    check_logprobs_close(seqs, seqs_off, "cache-on", "cache-off")


def test_chunked_prefill_same_tokens(tiny_llama_dir, baseline):
    seqs, _ = _run(tiny_llama_dir, max_num_seqs=16, max_num_batched_tokens=16)
    check_logprobs_close(baseline[0], seqs, "baseline", "chunked")


def test_preemption_same_tokens(tiny_llama_dir, baseline):
    # 12 blocks of 16 tokens: the 8 requests (up to 80 tokens each) cannot all stay resident.
    seqs, stats = _run(tiny_llama_dir, max_num_seqs=16, max_num_batched_tokens=128, num_kv_blocks=12)
    assert stats["num_preemptions"] > 0
    check_logprobs_close(baseline[0], seqs, "baseline", "preempted")


def test_one_seq_at_a_time_same_tokens(tiny_llama_dir, baseline):
    seqs, _ = _run(tiny_llama_dir, max_num_seqs=1, max_num_batched_tokens=128)
    check_logprobs_close(baseline[0], seqs, "many", "max_num_seqs=1")


def test_single_step_decode_same_tokens(tiny_llama_dir, baseline):
    # The baseline decodes 8 steps per dispatch (the default); one step per dispatch must agree.
    seqs, _ = _run(tiny_llama_dir, max_num_seqs=16, max_num_batched_tokens=128, num_decode_steps=1)
    check_logprobs_close(baseline[0], seqs, "8-step", "1-step")
