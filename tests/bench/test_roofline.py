"""Roofline formulas against hand computations (no engine, no device)."""

from __future__ import annotations

import math

import pytest

from jaxllm.bench import roofline as rl

# A made-up model small enough to compute by hand.
COST = rl.ModelCost(param_count=1_000, param_bytes=2_000, embed_bytes=200, matmul_params=700,
                    lm_head_params=100, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8,
                    kv_bytes_per_token=2 * 2 * 2 * 8 * 2)  # layers * (K,V) * kv_heads * head_dim * bf16


def test_attention_flops_causal_prefill():
    # L=3 causal: query i sees i+1 keys → 1+2+3 = 6 (q,k) pairs; 4 FLOPs per pair per head-dim per head per layer
    assert rl.attention_flops(COST, 3, 3) == 4 * 2 * 4 * 8 * 6


def test_attention_flops_decode_sees_whole_context():
    assert rl.attention_flops(COST, 1, 10) == 4 * 2 * 4 * 8 * 10
    with pytest.raises(ValueError, match="q_len"):
        rl.attention_flops(COST, 5, 3)


def test_prefill_flops():
    L = 16
    expected = 2 * 700 * L + 2 * 100 + 4 * 2 * 4 * 8 * (L * (L + 1) / 2)
    assert rl.prefill_flops(COST, L) == expected


def test_decode_step_bytes_weights_once_plus_kv():
    # the untied embedding (200 B) is gathered, not streamed
    assert COST.weight_read_bytes == 1_800
    assert rl.decode_step_bytes(COST, [10, 20]) == 1_800 + 30 * 128


def test_kv_concurrency():
    # 101 blocks (block 0 reserved) of 16 tokens; 40-token sequences need 3 blocks → 33 fit
    assert rl.kv_concurrency(101, 16, 40, 256) == 33
    assert rl.kv_concurrency(101, 16, 40, 8) == 8


def test_throughput_roofline_by_hand():
    rate, bw = 1e6, 1e5
    n, i, o, c = 5, 4, 3, 2          # waves of 2, 2 and 1 sequences; 2 decode steps each
    r = rl.throughput_roofline(COST, num_prompts=n, input_len=i, output_len=o, concurrency=c,
                               matmul_flops_per_s=rate, bandwidth=bw)
    prefill = n * (2 * 700 * i + 2 * 100 + 4 * 2 * 4 * 8 * (i * (i + 1) / 2))
    assert r.prefill_flops == prefill and math.isclose(r.prefill_s, prefill / rate)
    decode_s = 0.0
    for wave in (2, 2, 1):
        for j in (1, 2):              # context i + j
            b = 1_800 + wave * (i + j) * 128
            f = wave * (2 * (700 + 100) + 4 * 2 * 4 * 8 * (i + j))
            decode_s += max(b / bw, f / rate)
    assert r.decode_steps == 3 * 2
    assert math.isclose(r.decode_s, decode_s)
    assert math.isclose(r.total_s, prefill / rate + decode_s)
    assert math.isclose(r.output_tokens_per_s, n * o / r.total_s)


def test_throughput_roofline_rejects_bad_input():
    with pytest.raises(ValueError, match="concurrency"):
        rl.throughput_roofline(COST, num_prompts=1, input_len=1, output_len=1, concurrency=0,
                               matmul_flops_per_s=1.0, bandwidth=1.0)
    with pytest.raises(ValueError, match="num_layers"):
        rl.ModelCost(param_count=1, param_bytes=1, embed_bytes=0, matmul_params=1, lm_head_params=1,
                     num_layers=0, num_q_heads=1, num_kv_heads=1, head_dim=1, kv_bytes_per_token=1)
