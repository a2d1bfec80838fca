"""LLM: vLLM's offline API. ``LLM(model=...).generate(prompts, sampling_params)``."""

from __future__ import annotations

import itertools
from typing import Sequence

from tqdm.auto import tqdm

from jaxllm.config import EngineConfig
from jaxllm.engine.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams


class LLM:
    """Offline batched generation.

    Args mirror vLLM: ``model`` (a local Hugging Face checkpoint directory or a shipped name such as
    "demo"), ``dtype``, ``max_model_len``, ``max_num_seqs``, ``max_num_batched_tokens``,
    ``block_size``, ``num_kv_blocks``, ``gpu_memory_utilization``, ``enable_prefix_caching``,
    ``tensor_parallel_size``, ``load_format`` ("auto" | "dummy" | "orbax"), ``seed``, ...
    """

    def __init__(self, model: str = "demo", **kwargs):
        from jaxllm.engine.llm_engine import LLMEngine
        progress = kwargs.pop("progress", True)
        self.llm_engine = LLMEngine(EngineConfig.create(model, **kwargs), progress=progress)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; returns one RequestOutput per prompt, in input order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else \
            [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params)} for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"priority: got {len(priority)} values for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = []
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, params)):
                rid = str(next(self._counter))
                engine.add_request(rid, prompt, sp, priority=priority[i] if priority else 0)
                ids.append(rid)
        except ValueError:
            engine.abort_request(ids)
            while engine.has_unfinished_requests():
                engine.step()
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, *, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (or a list of them) and generate."""
        tok = self.get_tokenizer()
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=add_generation_prompt)
                   for m in messages]
        prompt_ids = [list(tok.encode(p, add_special_tokens=False)) for p in prompts]
        return self.generate(prompt_ids, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        out_tokens = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id in wanted:
                    results[out.request_id] = out
                    out_tokens += sum(len(c.token_ids) for c in out.outputs)
                    bar.update(1)
                    elapsed = bar.format_dict.get("elapsed") or 0
                    if elapsed:
                        bar.set_postfix_str(f"output {out_tokens / elapsed:.1f} tok/s")
        bar.close()
        return [results[i] for i in ids]

    def stats(self) -> dict:
        return self.llm_engine.stats()

    def close(self) -> None:
        """Release the engine. Multi-host: the leader tells the follower processes to exit."""
        engine = getattr(self, "llm_engine", None)
        mh = getattr(getattr(engine, "runner", None), "multihost", None)
        if mh is not None:
            mh.stop()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown: jax may be gone; atexit covers it)
            pass
