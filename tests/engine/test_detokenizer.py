"""Incremental detokenization: never half a UTF-8 character, deltas add up, stop strings held back."""

import pytest

from jaxllm.engine.detokenizer import IncrementalDetokenizer
from jaxllm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _byte_ids(tok, text):
    """Token ids that spell ``text`` one byte at a time (byte-level BPE has a token per byte)."""
    # GPT-2's byte → unicode map: look up each byte's own token.
    ids = []
    for b in text.encode("utf-8"):
        piece = tok.convert_tokens_to_ids(_bytes_to_unicode()[b])
        assert piece is not None and piece != tok.unk_token_id
        ids.append(piece)
    return ids


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_multibyte_characters_never_split(tok):
    text = "héllo – 日本語 🙂!"
    ids = _byte_ids(tok, text)
    d = IncrementalDetokenizer(tok, [tok.bos_token_id], SamplingParams())
    deltas = []
    for t in ids:
        d.update([t])
        delta = d.next_delta(finished=False)
        assert "\ufffd" not in delta
        deltas.append(delta)
    assert "".join(deltas) == text
    # the 4-byte emoji arrives in one delta, after its last byte; the three before it give nothing
    emoji_end = len("héllo – 日本語 🙂".encode())
    assert deltas[emoji_end - 1].endswith("🙂") and deltas[emoji_end - 2] == ""


def test_stop_string_across_tokens_is_held_back_and_cut(tok):
    ids = _byte_ids(tok, "abcSTOPdef")
    d = IncrementalDetokenizer(tok, [tok.bos_token_id], SamplingParams(stop=["STOP"]))
    sent = ""
    hit = None
    for t in ids:
        hit = d.update([t])
        sent += d.next_delta(finished=hit is not None)
        assert "S" not in sent or hit is not None  # "S", "ST", "STO" are never streamed early
        if hit:
            break
    assert hit == "STOP" and sent == "abc" and d.output_text == "abc"
