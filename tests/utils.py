"""Test helpers: Hugging Face references and vLLM's ``check_logprobs_close`` rule."""

from __future__ import annotations

from typing import Sequence

# One generated sequence: (token_ids, per-token {token_id: logprob} dicts holding at least the top-k).
Seq = tuple[list[int], list[dict[int, float]]]


def check_logprobs_close(outputs_0: Sequence[Seq], outputs_1: Sequence[Seq], name_0: str = "a",
                         name_1: str = "b") -> None:
    """vLLM's rule (tests/models/utils.py): two greedy generations agree until their first difference;
    there, each one's token must be in the other's top-k logprobs, and comparison stops."""
    assert len(outputs_0) == len(outputs_1)
    for i, ((ids_0, lps_0), (ids_1, lps_1)) in enumerate(zip(outputs_0, outputs_1)):
        assert len(ids_0) == len(ids_1), f"prompt {i}: lengths {len(ids_0)} vs {len(ids_1)}"
        for j, (t0, t1) in enumerate(zip(ids_0, ids_1)):
            if t0 != t1:
                assert t0 in lps_1[j], (f"prompt {i} token {j}: {name_0} chose {t0}, not in {name_1}'s top "
                                        f"logprobs {lps_1[j]}")
                assert t1 in lps_0[j], (f"prompt {i} token {j}: {name_1} chose {t1}, not in {name_0}'s top "
                                        f"logprobs {lps_0[j]}")
                break


def hf_greedy(model_dir: str, prompts: Sequence[list[int]], max_tokens: int, top_k: int = 5) -> list[Seq]:
    """Greedy generation with transformers (float32, no EOS stop) with top-k logprobs per token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: list[Seq] = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            # Raw logits (not processed scores) and an explicit mask: id 0 may be a real token.
            g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                               do_sample=False, output_logits=True, return_dict_in_generate=True,
                               eos_token_id=None, pad_token_id=None)
        toks = g.sequences[0, x.shape[1]:].tolist()
        assert len(toks) == max_tokens
        lps = []
        for step, tok in zip(g.logits, toks):
            logp = torch.log_softmax(step[0].float(), -1)
            vals, idx = logp.topk(top_k)
            d = {int(k): float(v) for k, v in zip(idx, vals)}
            d[tok] = float(logp[tok])
            lps.append(d)
        out.append((toks, lps))
    return out


def hf_prefill_logprobs(model_dir: str, ids: list[int]):
    """log_softmax of the HF model's logits at every position of ``ids``: [len(ids), vocab]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()


def jaxllm_seqs(outputs) -> list[Seq]:
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]
