"""Roofline estimates: what a workload would take at the measured matmul rate and copy bandwidth.

The model's cost is summarised by :class:`ModelCost` (read from a live engine: the parameter bytes
actually on the device and the KV-cache arrays' shapes). Counting rules:

* Prefill FLOPs of a prompt of ``L`` tokens: ``2 * matmul_params * L`` (every linear layer, one
  multiply-add per weight per token) ``+ 2 * lm_head_params`` (logits only at the sampled last
  position) ``+ attention``; causal attention is ``4 * layers * q_heads * head_dim * L(L+1)/2``
  (QK^T and PV, 2 FLOPs per multiply-add, query ``i`` sees ``i + 1`` keys). Sliding windows are
  ignored (an upper bound on the attention term).
* A decode step of ``c`` sequences with context lengths ``k_i`` reads every weight once (an untied
  embedding table is only gathered, so it is not counted) plus ``sum(k_i)`` tokens of KV in every
  layer. Its FLOPs are ``c`` times a one-token prefill at that context. The step takes
  ``max(bytes / bandwidth, flops / matmul_rate)``.
* After prefill gives each request its first token, a request of ``O`` output tokens needs
  ``O - 1`` decode steps; at decode step ``j`` (1-based) its context is ``input_len + j``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelCost:
    """What the roofline needs to know about a model (all counts are whole-model, all layers)."""
    param_count: int          # every parameter
    param_bytes: int          # their bytes on the device
    embed_bytes: int          # bytes of an untied input-embedding table (0 if tied): gathered, not read
    matmul_params: int        # weights used in the per-token matmuls, except the LM head
    lm_head_params: int       # vocab * hidden
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    kv_bytes_per_token: int   # K + V bytes of one token over all layers

    def __post_init__(self):
        for name in ("param_count", "param_bytes", "matmul_params", "num_layers", "num_q_heads",
                     "num_kv_heads", "head_dim", "kv_bytes_per_token"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    @property
    def weight_read_bytes(self) -> int:
        """Bytes of weights one forward step reads (the embedding table is gathered, not streamed)."""
        return self.param_bytes - self.embed_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight_read_bytes"] = self.weight_read_bytes
        return d

    @staticmethod
    def from_engine(engine) -> "ModelCost":
        """Read the cost from a live LLMEngine: device parameter bytes and the KV arrays' shapes."""
        import jax

        leaves = [x for x in jax.tree.leaves(engine.runner.state) if hasattr(x, "dtype")]
        count = sum(int(x.size) for x in leaves)
        nbytes = sum(int(x.size) * x.dtype.itemsize for x in leaves)
        cfg = engine.hf_config
        vocab, hidden = int(cfg.vocab_size), int(cfg.hidden_size)
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        embed_count = vocab * hidden
        itemsize = nbytes // max(count, 1)
        kv = engine.runner.kv_caches   # per layer: [num_pages, page_size, 2 * kv_heads, head_dim]
        _, _, two_kvh, head_dim = kv[0].shape
        # Tied: the one table is both the (gathered) embedding and the (multiplied) LM head.
        matmul = count - embed_count if tied else count - 2 * embed_count
        return ModelCost(
            param_count=count, param_bytes=nbytes, embed_bytes=0 if tied else embed_count * itemsize,
            matmul_params=matmul, lm_head_params=embed_count, num_layers=len(kv),
            num_q_heads=int(cfg.num_attention_heads), num_kv_heads=two_kvh // 2, head_dim=int(head_dim),
            kv_bytes_per_token=len(kv) * two_kvh * int(head_dim) * kv[0].dtype.itemsize)


def attention_flops(cost: ModelCost, q_len: int, kv_len: int) -> float:
    """FLOPs of QK^T + PV for ``q_len`` new tokens at the end of a ``kv_len``-token causal context."""
    if not 0 <= q_len <= kv_len:
        raise ValueError(f"q_len: must be in [0, kv_len={kv_len}], got {q_len}")
    # query j of the q_len new ones sees kv_len - q_len + j + 1 keys
    pairs = q_len * (kv_len - q_len) + q_len * (q_len + 1) / 2
    return 4.0 * cost.num_layers * cost.num_q_heads * cost.head_dim * pairs


def prefill_flops(cost: ModelCost, prompt_len: int) -> float:
    """FLOPs of a whole prompt's prefill (logits at the last position only)."""
    return 2.0 * cost.matmul_params * prompt_len + 2.0 * cost.lm_head_params + \
        attention_flops(cost, prompt_len, prompt_len)


def decode_step_bytes(cost: ModelCost, context_lens: list[int] | tuple[int, ...]) -> float:
    """Bytes one decode step reads: the weights once plus every sequence's KV (context incl. the new token)."""
    return float(cost.weight_read_bytes) + float(sum(context_lens)) * cost.kv_bytes_per_token


def decode_step_flops(cost: ModelCost, context_lens: list[int] | tuple[int, ...]) -> float:
    return sum(2.0 * (cost.matmul_params + cost.lm_head_params) + attention_flops(cost, 1, k)
               for k in context_lens)


def kv_concurrency(num_kv_blocks: int, block_size: int, seq_len: int, max_num_seqs: int) -> int:
    """How many ``seq_len``-token sequences fit at once (block 0 is the reserved null block)."""
    per_seq = math.ceil(seq_len / block_size)
    return max(1, min(max_num_seqs, (num_kv_blocks - 1) // per_seq))


@dataclass(frozen=True)
class ThroughputRoofline:
    concurrency: int
    prefill_flops: float
    prefill_s: float
    decode_steps: int
    decode_bytes: float
    decode_flops: float
    decode_s: float
    total_s: float
    output_tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def throughput_roofline(cost: ModelCost, *, num_prompts: int, input_len: int, output_len: int,
                        concurrency: int, matmul_flops_per_s: float, bandwidth: float) -> ThroughputRoofline:
    """Time for ``num_prompts`` requests of ``input_len`` in / ``output_len`` out at the measured rates.

    Prefills run at ``matmul_flops_per_s``; decoding runs in waves of ``concurrency`` sequences
    (the last wave may be smaller), each step bound by bandwidth or compute, whichever is slower.
    """
    for name, v in (("num_prompts", num_prompts), ("input_len", input_len), ("output_len", output_len),
                    ("concurrency", concurrency)):
        if v < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    if matmul_flops_per_s <= 0 or bandwidth <= 0:
        raise ValueError("matmul_flops_per_s: both measured rates must be > 0")
    p_flops = num_prompts * prefill_flops(cost, input_len)
    prefill_s = p_flops / matmul_flops_per_s
    full, rest = divmod(num_prompts, concurrency)
    waves = [(concurrency, full)] + ([(rest, 1)] if rest else [])
    d_bytes = d_flops = decode_s = 0.0
    steps = 0
    for c, times in waves:
        for j in range(1, output_len):
            ctx = [input_len + j] * c
            b, f = decode_step_bytes(cost, ctx), decode_step_flops(cost, ctx)
            d_bytes += times * b
            d_flops += times * f
            decode_s += times * max(b / bandwidth, f / matmul_flops_per_s)
            steps += times
    total = prefill_s + decode_s
    return ThroughputRoofline(concurrency=concurrency, prefill_flops=p_flops, prefill_s=prefill_s,
                              decode_steps=steps, decode_bytes=d_bytes, decode_flops=d_flops,
                              decode_s=decode_s, total_s=total,
                              output_tokens_per_s=num_prompts * output_len / total)
