"""Greedy generation matches Hugging Face transformers for every supported architecture.

8 prompts of different lengths are generated together (one continuous batch, the longest ones
chunked by max_num_batched_tokens=64), 32 tokens each in float32, and compared with transformers
by vLLM's check_logprobs_close rule; the prompt logprobs match HF's prefill log_softmax.
"""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from tests.conftest import TINY_CHECKPOINTS
from tests.utils import check_logprobs_close, hf_greedy, hf_prefill_logprobs, jaxllm_seqs

PROMPT_LENS = [1, 3, 7, 12, 20, 33, 47, 70]
MAX_TOKENS = 32


def _prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, 320, size=n - 1).tolist() for n in PROMPT_LENS]


@pytest.mark.parametrize("kind", list(TINY_CHECKPOINTS))
def test_greedy_matches_transformers(kind, request):
    model_dir = request.getfixturevalue(TINY_CHECKPOINTS[kind])
    prompts = _prompts()
    llm = LLM(model_dir, dtype="float32", max_num_seqs=16, max_num_batched_tokens=64, progress=False)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5,
                            prompt_logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    check_logprobs_close(jaxllm_seqs(outs), hf_greedy(model_dir, prompts, MAX_TOKENS), "jaxllm", "hf")

    # Prefill: the logprob jaxllm reports for each prompt token equals HF's log_softmax there.
    longest = outs[-1]
    ref = hf_prefill_logprobs(model_dir, longest.prompt_token_ids)
    assert longest.prompt_logprobs[0] is None
    got = [lp[tok] for lp, tok in zip(longest.prompt_logprobs[1:], longest.prompt_token_ids[1:])]
    want = [ref[i, tok] for i, tok in enumerate(longest.prompt_token_ids[1:])]
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)

    stats = llm.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["num_requests_running"] == stats["num_requests_waiting"] == 0
