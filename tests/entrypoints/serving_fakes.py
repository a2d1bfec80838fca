"""A small deterministic stand-in for LLMEngine (same API) and a local tokenizer, for serving tests.

The fake "model" generates ``next = (31 * sum(all_tokens) + 7) % num_words + 3`` (ids 0..2 are
specials), so any test can recompute the expected output with :func:`expected_tokens`. Failure
injection: ``fail_at_step``; pacing: ``step_delay``; pausing: clear ``gate``.
"""

from __future__ import annotations

import math
import threading
import time

from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

from jaxllm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxllm.sampling_params import SamplingParams

NUM_WORDS = 40
SPECIALS = ["<pad>", "<s>", "</s>"]
EOS_ID = 2
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: specials + w0..w39 + a few punctuation words used by the chat template."""
    words = SPECIALS + [f"w{i}" for i in range(NUM_WORDS)] + ["user", "assistant", "system", ":", ";", "[UNK]"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def next_token(all_tokens: list[int]) -> int:
    return (31 * sum(all_tokens) + 7) % NUM_WORDS + 3


def expected_tokens(prompt_ids: list[int], max_tokens: int) -> list[int]:
    toks, out = list(prompt_ids), []
    for _ in range(max_tokens):
        out.append(next_token(toks))
        toks.append(out[-1])
    return out


def fake_logprobs(all_tokens: list[int], sampled: int, k: int) -> dict[int, float]:
    """Deterministic top-k ``{id: logprob}`` holding the sampled token (always the most likely)."""
    d = {sampled: -0.5}
    for j in range(1, k + 1):
        d.setdefault((sampled + j) % (NUM_WORDS + 3), -0.5 - j)
    return d


class _Req:
    def __init__(self, rid, prompt_ids, params, arrival):
        self.rid, self.prompt_ids, self.params = rid, prompt_ids, params
        self.out: list[int] = []
        self.logprobs: list[dict[int, float]] = []
        self.text = ""
        self.metrics = RequestMetrics(arrival_time=arrival)


class FakeEngine:
    """LLMEngine's public API over a deterministic toy model with paged-KV accounting."""

    def __init__(self, *, max_model_len: int = 64, num_kv_blocks: int = 256, block_size: int = 4,
                 max_num_seqs: int = 8, step_delay: float = 0.0, fail_at_step: int | None = None):
        self.tokenizer = make_tokenizer()
        self.model_info = {"model": "fake-model", "max_model_len": max_model_len,
                           "vocab_size": len(self.tokenizer), "dtype": "float32",
                           "tensor_parallel_size": 1, "data_parallel_size": 1, "block_size": block_size}
        self.max_model_len, self.num_kv_blocks, self.block_size = max_model_len, num_kv_blocks, block_size
        self.max_num_seqs, self.step_delay, self.fail_at_step = max_num_seqs, step_delay, fail_at_step
        self.gate = threading.Event()
        self.gate.set()
        self.waiting: list[_Req] = []
        self.running: list[_Req] = []
        self.num_steps = 0
        self.aborted: list[str] = []
        self.thread_ids: set[int] = set()

    # --- API -----------------------------------------------------------------------------------
    def add_request(self, request_id, prompt, params: SamplingParams, *, priority=0, arrival_time=None):
        self.thread_ids.add(threading.get_ident())
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt: must not be empty")
        if any(not 0 <= t < len(self.tokenizer) for t in ids):
            raise ValueError(f"prompt_token_ids: every id must be in [0, {len(self.tokenizer)})")
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        if len(ids) + max_tokens > self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} prompt tokens + max_tokens {max_tokens} exceed "
                             f"max_model_len {self.max_model_len}")
        if any(r.rid == request_id for r in self.waiting + self.running):
            raise ValueError(f"request_id: {request_id!r} already exists")
        self.waiting.append(_Req(request_id, ids, params, arrival_time or time.monotonic()))

    def abort_request(self, request_ids):
        self.thread_ids.add(threading.get_ident())
        ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        self.aborted.extend(ids)
        self.waiting = [r for r in self.waiting if r.rid not in ids]
        self.running = [r for r in self.running if r.rid not in ids]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        used = sum(math.ceil((len(r.prompt_ids) + len(r.out)) / self.block_size) for r in self.running)
        return {"kv_blocks_total": self.num_kv_blocks, "kv_blocks_free": self.num_kv_blocks - used,
                "prefix_cache_queries": 0, "prefix_cache_hits": 0, "num_preemptions": 0,
                "num_compilations": 0, "num_requests_running": len(self.running),
                "num_requests_waiting": len(self.waiting)}

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        self.gate.wait()
        self.num_steps += 1
        if self.fail_at_step is not None and self.num_steps >= self.fail_at_step:
            raise RuntimeError("injected failure in engine step")
        if self.step_delay:
            time.sleep(self.step_delay)
        now = time.monotonic()
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting.pop(0)
            r.metrics.first_scheduled_time = now
            self.running.append(r)
        outputs = []
        for r in list(self.running):
            tok = next_token(r.prompt_ids + r.out)
            r.out.append(tok)
            p = r.params
            if p.logprobs is not None:
                r.logprobs.append(fake_logprobs(r.prompt_ids + r.out, tok, p.logprobs))
            text = self.tokenizer.decode(r.out, skip_special_tokens=True)
            delta, r.text = text[len(r.text):], text
            finish = None
            if tok in (p.stop_token_ids or []):
                finish = "stop"
            elif len(r.out) >= (p.max_tokens or self.max_model_len - len(r.prompt_ids)):
                finish = "length"
            if r.metrics.first_token_time is None:
                r.metrics.first_token_time = now
            comp = CompletionOutput(index=0, text=r.text, token_ids=list(r.out),
                                    logprobs=list(r.logprobs) if p.logprobs is not None else None,
                                    finish_reason=finish, stop_reason=tok if finish == "stop" else None,
                                    delta_text=delta, delta_token_ids=[tok])
            prompt_lp = None
            if p.prompt_logprobs is not None:
                prompt_lp = [None] + [fake_logprobs(r.prompt_ids[:i + 1], t, p.prompt_logprobs)
                                      for i, t in enumerate(r.prompt_ids[1:], 1)]
            outputs.append(RequestOutput(request_id=r.rid, prompt=None, prompt_token_ids=list(r.prompt_ids),
                                         outputs=[comp], finished=finish is not None,
                                         prompt_logprobs=prompt_lp, metrics=r.metrics))
            if finish:
                self.running.remove(r)
        return outputs
