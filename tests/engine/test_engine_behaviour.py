"""Engine behaviour on one shared tiny Llama engine: accounting, compilations, bad input, stops,
seeds, n > 1, priorities."""

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.request import RequestStatus


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64, progress=False,
               num_kv_blocks=64)


def _all_blocks_free(llm):
    s = llm.stats()
    assert s["kv_blocks_free"] == s["kv_blocks_total"], s
    pool = llm.llm_engine.scheduler.kv_cache_manager.block_pool
    assert all(b.ref_cnt == 0 for b in pool.blocks), [b for b in pool.blocks if b.ref_cnt]


def _prompt(n, seed=0):
    return [1] + np.random.default_rng(seed).integers(3, 320, size=n - 1).tolist()


def test_no_compilation_after_warmup_mixed_workload(llm):
    engine = llm.llm_engine
    before = llm.stats()["num_compilations"]
    assert before == engine._warm_compilations > 0
    rng = np.random.default_rng(0)
    prompts = [_prompt(int(n), seed=i) for i, n in enumerate(rng.integers(1, 90, size=12))]
    params = [SamplingParams(max_tokens=int(m), temperature=float(t), top_p=float(p), top_k=int(k),
                             presence_penalty=0.5 if i % 3 == 0 else 0.0, logprobs=2 if i % 2 else None,
                             seed=i)
              for i, (m, t, p, k) in enumerate(zip(rng.integers(1, 20, 12), rng.uniform(0, 1.5, 12),
                                                   rng.uniform(0.3, 1, 12), rng.integers(0, 50, 12)))]
    llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats()["num_compilations"] == before
    _all_blocks_free(llm)


def test_aborts_free_blocks_and_others_keep_running(llm):
    engine = llm.llm_engine
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"a{i}", _prompt(30 + i, seed=i), sp)
    engine.step()
    engine.step()
    engine.abort_request(["a1", "a3", "nope"])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["a1"].outputs[0].finish_reason == "abort"
    assert finished["a3"].outputs[0].finish_reason == "abort"
    for i in (0, 2, 4, 5):
        assert finished[f"a{i}"].outputs[0].finish_reason == "length"
        assert len(finished[f"a{i}"].outputs[0].token_ids) == 20
    _all_blocks_free(llm)


def test_bad_requests_rejected_engine_keeps_serving(llm):
    engine = llm.llm_engine
    engine.add_request("ok", _prompt(10), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", [5] * 600, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("toolong", _prompt(10), SamplingParams(max_tokens=510))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("oov", [1, 100000], SamplingParams())
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("ok", _prompt(3), SamplingParams())
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outs] == ["ok"] and len(outs[0].outputs[0].token_ids) == 5
    _all_blocks_free(llm)


@pytest.mark.parametrize("kw, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=2.0), "min_p"), (dict(n=0), "n"),
    (dict(logprobs=21), "logprobs"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(stop=[""]), "stop"),
])
def test_sampling_params_validation_names_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kw)




def test_stop_token_ids_min_tokens_ignore_eos(llm):
    greedy = llm.generate([_prompt(12)], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    stop_tok = greedy.token_ids[4]
    first = greedy.token_ids.index(stop_tok)
    out = llm.generate([_prompt(12)], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_tok]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    # min_tokens bans the stop token until reached: it cannot be produced before position 6
    out = llm.generate([_prompt(12)], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_tok],
                                                     min_tokens=6), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 6 and stop_tok not in out.token_ids[:6]


def test_stop_strings_truncate_text(llm):
    base = llm.generate([_prompt(8, seed=3)], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text = base.text
    assert len(text) >= 6
    stop = text[3:6]
    idx = text.find(stop)
    out = llm.generate([_prompt(8, seed=3)], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                                                            stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:idx]
    out = llm.generate([_prompt(8, seed=3)], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                                                            stop=[stop], include_stop_str_in_output=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[:idx + len(stop)]


def test_seed_reproducible_whatever_the_batch(llm):
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    target = _prompt(9, seed=7)
    alone = llm.generate([target], sp, use_tqdm=False)[0].outputs[0].token_ids
    others = [_prompt(n, seed=n) for n in (3, 17, 40)]
    mixed = llm.generate(others[:2] + [target] + others[2:],
                         [SamplingParams(max_tokens=7, temperature=0.7)] * 2 + [sp] +
                         [SamplingParams(max_tokens=12, temperature=1.3)], use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = llm.generate([target], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=99),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_greater_than_one_shares_prompt_blocks(llm):
    engine = llm.llm_engine
    prompt = _prompt(64, seed=11)  # 4 full blocks
    engine.add_request("fan", prompt, SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=5))
    engine.step()
    pool = engine.scheduler.kv_cache_manager.block_pool
    shared = [b for b in pool.blocks if b.ref_cnt == 3]
    assert len(shared) >= 3  # the prompt's full blocks are held by all three sequences
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    (out,) = outs
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different seeds per sample
    _all_blocks_free(llm)


def test_logprobs_are_log_softmax_of_hf(tiny_llama_dir, llm):
    from tests.utils import hf_prefill_logprobs
    prompt = _prompt(10, seed=2)
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    ref = hf_prefill_logprobs(tiny_llama_dir, prompt + out.token_ids)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert len(lp) == 3 and tok in lp  # greedy token is the top-1
        top3 = np.argsort(row)[::-1][:3]
        assert set(lp) == set(int(t) for t in top3)
        for t, v in lp.items():
            assert abs(v - row[t]) < 2e-4
    assert abs(out.cumulative_logprob - sum(lp[t] for t, lp in zip(out.token_ids, out.logprobs))) < 1e-5


def test_priority_policy_serves_urgent_first(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", max_num_seqs=1, max_num_batched_tokens=64, progress=False,
              scheduling_policy="priority", num_kv_blocks=64)
    engine = llm.llm_engine
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add_request("low", _prompt(5), sp, priority=10)
    engine.add_request("high", _prompt(6), sp, priority=-1)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["high", "low"]


def test_prompt_logprobs_complete_even_with_a_cached_prefix(llm):
    prompt = _prompt(40, seed=21)
    llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)  # fills the cache
    out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2),
                       use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    assert all(tok in lp for tok, lp in zip(prompt[1:], out.prompt_logprobs[1:]))
