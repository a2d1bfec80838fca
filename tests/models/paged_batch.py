"""Hand-built paged batches for model tests: a toy scheduler + page table, no engine needed.

``PagedBatcher`` owns per-sequence page lists drawn from a shuffled page pool (so sequences'
pages interleave) and turns "sequence i gets these new tokens" into the padded arrays of
``AttentionMetadata``, exactly as the runner would.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from jaxllm.layers.attention_metadata import AttentionMetadata


class PagedBatcher:
    def __init__(self, num_pages: int, page_size: int, pages_per_seq: int, max_seqs: int, seed: int = 0):
        self.page_size = page_size
        self.pages_per_seq = pages_per_seq
        self.max_seqs = max_seqs
        rng = np.random.default_rng(seed)
        # Page 0 stays unused so that padding page-table entries (0) point at foreign memory.
        self.free = [int(p) for p in rng.permutation(np.arange(1, num_pages))]
        self.pages: dict[int, list[int]] = {}
        self.num_computed: dict[int, int] = {}

    def _slot(self, seq: int, pos: int) -> int:
        pages = self.pages.setdefault(seq, [])
        while len(pages) <= pos // self.page_size:
            pages.append(self.free.pop())
        return pages[pos // self.page_size] * self.page_size + pos % self.page_size

    def step(self, new_tokens: dict[int, list[int]], pad_tokens: int, pad_seqs: int
             ) -> tuple[jnp.ndarray, AttentionMetadata]:
        """Pack ``{seq_id: new token ids}`` into one padded ragged batch (and advance the seqs)."""
        ids, pos, slots, kv_lens, cu = [], [], [], [], [0]
        table = np.zeros((pad_seqs, self.pages_per_seq), np.int32)
        for i, (seq, toks) in enumerate(new_tokens.items()):
            start = self.num_computed.get(seq, 0)
            for j, t in enumerate(toks):
                ids.append(t)
                pos.append(start + j)
                slots.append(self._slot(seq, start + j))
            self.num_computed[seq] = start + len(toks)
            kv_lens.append(start + len(toks))
            cu.append(cu[-1] + len(toks))
            table[i, :len(self.pages[seq])] = self.pages[seq]
        n, s = len(ids), len(new_tokens)
        assert n <= pad_tokens and s <= pad_seqs
        pad = pad_tokens - n
        md = AttentionMetadata(
            input_positions=jnp.asarray(pos + [0] * pad, jnp.int32),
            slot_mapping=jnp.asarray(slots + [-1] * pad, jnp.int32),
            kv_lens=jnp.asarray(kv_lens + [0] * (pad_seqs - s), jnp.int32),
            page_indices=jnp.asarray(table),
            cu_q_lens=jnp.asarray(cu + [n] * (pad_seqs - s), jnp.int32),
            num_seqs=jnp.asarray([s], jnp.int32),
        )
        return jnp.asarray(ids + [0] * pad, jnp.int32), md


def jitted_step(model):
    """``step(kv_caches, input_ids, md) -> (kv_caches, f32 logits [T, vocab])`` for ``model``,
    jitted with the caches donated (the runner's step without sampling)."""
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(kv_caches, input_ids, md):
        m = nnx.merge(graphdef, state)
        kv_caches, hidden = m(kv_caches, input_ids, md)   # hidden: [T, hidden_size]
        return kv_caches, m.compute_logits(hidden)         # f32[T, vocab]
    return step
