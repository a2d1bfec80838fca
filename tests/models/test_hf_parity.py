"""Logits of every architecture against Hugging Face transformers (torch, float32).

One ragged prefill batch (prompts of different lengths, one of them only partly: a chunked
prefill) through the paged KV cache, then decode steps that mix single tokens with the rest of
the chunked prompt; every token's logits must match HF's full forward over the same prefix.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.hf_config import load_hf_config
from jaxllm.models.loader import load_model
from tests.conftest import TINY_CHECKPOINTS, VOCAB_SIZE, make_tiny_checkpoint
from tests.models.paged_batch import PagedBatcher, jitted_step

PAGE_SIZE, NUM_PAGES, PAGES_PER_SEQ = 4, 40, 6
PAD_TOKENS, PAD_SEQS = 32, 6
PROMPT_LENS = (5, 12, 1, 9)   # seq 3 is prefilled in two chunks (6 + 3 tokens)
ATOL, RTOL = 1e-4, 1e-3


def _hf_logits(hf_model, tokens: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float().numpy()   # [L, V]


# Variants only these tests need: (base kind, config overrides).
VARIANTS = {
    # Qwen2 with a sliding window on layers >= max_window_layers only (per-layer windows).
    "qwen2_swa": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
}


@pytest.fixture(scope="module", params=sorted(TINY_CHECKPOINTS) + sorted(VARIANTS))
def models(request, tmp_path_factory):
    import torch
    import transformers

    torch.set_num_threads(1)
    if request.param in VARIANTS:
        base, overrides = VARIANTS[request.param]
        path = make_tiny_checkpoint(base, str(tmp_path_factory.mktemp(request.param)), **overrides)
    else:
        path = request.getfixturevalue(TINY_CHECKPOINTS[request.param])
    model = load_model(ModelConfig(model=path), load_hf_config(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    return request.param, model, hf, jitted_step(model)


def test_prefill_then_decode_matches_hf(models):
    kind, model, hf, step = models
    if kind == "qwen2_swa":
        assert model.args.sliding_windows == (None, 4)
    num_layers, num_kv_heads, head_dim = model.kv_cache_spec
    rng = np.random.default_rng(0)
    # Garbage (finite) in every page: results must not depend on memory a sequence does not own.
    kv_caches = [jnp.asarray(rng.normal(size=(NUM_PAGES, PAGE_SIZE, 2 * num_kv_heads, head_dim)),
                             jnp.float32) for _ in range(num_layers)]
    prompts = [list(rng.integers(3, VOCAB_SIZE, n)) for n in PROMPT_LENS]
    seqs = [list(p) for p in prompts]
    batcher = PagedBatcher(NUM_PAGES, PAGE_SIZE, PAGES_PER_SEQ, PAD_SEQS)

    # Step 0: whole prompts for seqs 0-2, the first 6 tokens of seq 3.
    schedule = {0: seqs[0], 1: seqs[1], 2: seqs[2], 3: seqs[3][:6]}
    for it in range(4):
        ids, md = batcher.step(schedule, PAD_TOKENS if it == 0 else 8, PAD_SEQS)
        kv_caches, logits = step(kv_caches, ids, md)
        logits = np.asarray(logits)
        assert np.all(np.isfinite(logits))
        offset = 0
        for seq, toks in schedule.items():
            done = batcher.num_computed[seq]
            ref = _hf_logits(hf, seqs[seq][:done])[done - len(toks):done]
            ours = logits[offset:offset + len(toks)]
            np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=RTOL,
                                       err_msg=f"{kind}: step {it}, seq {seq}")
            offset += len(toks)
        # Next step: one new token per finished sequence; seq 3 first gets its remaining prompt.
        schedule = {}
        for seq in range(len(seqs)):
            if batcher.num_computed[seq] < len(seqs[seq]):
                schedule[seq] = seqs[seq][batcher.num_computed[seq]:]
            else:
                seqs[seq].append(int(rng.integers(3, VOCAB_SIZE)))
                schedule[seq] = seqs[seq][-1:]
    assert all(len(kv.shape) == 4 for kv in kv_caches)


def test_padding_tokens_do_not_touch_the_cache(models):
    """Padded tokens (slot -1) and padded sequences leave every page as it was."""
    _, model, _, step = models
    num_layers, num_kv_heads, head_dim = model.kv_cache_spec
    kv = [jnp.full((NUM_PAGES, PAGE_SIZE, 2 * num_kv_heads, head_dim), 7.0, jnp.float32)
          for _ in range(num_layers)]
    batcher = PagedBatcher(NUM_PAGES, PAGE_SIZE, PAGES_PER_SEQ, PAD_SEQS)
    ids, md = batcher.step({0: [5, 6, 7]}, 8, PAD_SEQS)
    new_kv, _ = step(list(kv), ids, md)  # same shapes as the decode steps: no new compile
    written = {int(s) for s in np.asarray(md.slot_mapping) if s >= 0}
    for layer in new_kv:
        flat = np.asarray(layer).reshape(NUM_PAGES * PAGE_SIZE, -1)
        untouched = [i for i in range(flat.shape[0]) if i not in written]
        assert np.all(flat[untouched] == 7.0)
        assert not np.any(flat[sorted(written)] == 7.0)


def test_bfloat16_stays_bfloat16_and_close_to_float32(tiny_qwen3_dir):
    """dtype="bfloat16": params, activations and KV cache in bf16; logits near HF's float32 ones."""
    import torch
    import transformers

    model = load_model(ModelConfig(model=tiny_qwen3_dir, dtype="bfloat16"), load_hf_config(tiny_qwen3_dir))
    num_layers, num_kv_heads, head_dim = model.kv_cache_spec
    kv = [jnp.zeros((NUM_PAGES, PAGE_SIZE, 2 * num_kv_heads, head_dim), jnp.bfloat16)
          for _ in range(num_layers)]
    tokens = list(np.random.default_rng(1).integers(3, VOCAB_SIZE, 10))
    ids, md = PagedBatcher(NUM_PAGES, PAGE_SIZE, PAGES_PER_SEQ, PAD_SEQS).step({0: tokens}, 16, 2)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(kv, ids, md):
        m = nnx.merge(graphdef, state)
        kv, hidden = m(kv, ids, md)
        return kv, hidden, m.compute_logits(hidden)

    kv, hidden, logits = run(kv, ids, md)
    assert hidden.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in kv)
    assert logits.dtype == jnp.float32
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32).eval()
    ref = _hf_logits(hf, tokens)
    ours = np.asarray(logits)[:len(tokens)]
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() < 0.05 * scale
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.8
