"""OpenAI request schemas (plus vLLM's extra sampling fields) and their conversion to SamplingParams.

Unknown fields are accepted and ignored, as OpenAI clients send newer fields freely. Every invalid
value becomes :class:`OpenAIError` (HTTP 400) whose ``param`` names the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jaxllm.sampling_params import SamplingParams


class OpenAIError(Exception):
    """An error rendered as OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    @staticmethod
    def from_value_error(e: ValueError) -> "OpenAIError":
        """``ValueError("field: msg")`` (SamplingParams / engine convention) → 400 naming the field."""
        msg = str(e)
        head = msg.split(":", 1)[0].strip()
        param = head if head and " " not in head else None
        return OpenAIError(400, msg, param=param)


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's and vLLM's extras)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    request_id: str | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"n": self.n, "stop": self.stop, "stop_token_ids": self.stop_token_ids,
                              "ignore_eos": self.ignore_eos, "min_tokens": self.min_tokens, "seed": self.seed,
                              "skip_special_tokens": self.skip_special_tokens,
                              "include_stop_str_in_output": self.include_stop_str_in_output}
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        return kw


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise OpenAIError(400, "prompt: must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def to_sampling_params(self) -> tuple[SamplingParams, bool]:
        """Returns (params, drop_generated): echo-only scoring (max_tokens=0) runs one token and drops it."""
        if self.suffix:
            raise OpenAIError(400, "suffix: not supported", param="suffix")
        max_tokens, drop = self.max_tokens, False
        if max_tokens == 0 and self.echo:
            max_tokens, drop = 1, True
        kw = self.sampling_kwargs()
        kw.update(max_tokens=max_tokens, logprobs=self.logprobs,
                  prompt_logprobs=self.logprobs if self.echo and self.logprobs is not None else None)
        return _build(kw), drop


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages for the chat template: OpenAI content-part lists are joined into plain text."""
        out = []
        for i, m in enumerate(self.messages):
            content = m.get("content")
            if isinstance(content, list):
                try:
                    content = "".join(part["text"] for part in content if part.get("type") == "text")
                except (TypeError, KeyError, AttributeError):
                    raise OpenAIError(400, f"messages.{i}.content: parts must be {{'type': 'text', 'text': ...}}",
                                      param=f"messages.{i}.content") from None
            out.append({**m, "content": content})
        return out

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs: requires logprobs=true", param="top_logprobs")
        kw = self.sampling_kwargs()
        kw.update(max_tokens=self.max_completion_tokens if self.max_completion_tokens is not None
                  else self.max_tokens,
                  logprobs=(self.top_logprobs or 0) if self.logprobs else None)
        return _build(kw)


def _build(kw: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise OpenAIError.from_value_error(e) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class LogprobFormatter:
    """Renders ``{token_id: logprob}`` lists in the completions or chat-completions format."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion(self, token_ids: list[int], logprobs: list[dict[int, float] | None], k: int,
                   text_offset: int = 0) -> dict[str, Any]:
        """Legacy completions format: tokens / token_logprobs / top_logprobs / text_offset."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for tok, lp in zip(token_ids, logprobs):
            s = self.token(tok)
            tokens.append(s)
            offsets.append(text_offset)
            text_offset += len(s)
            if lp is None:  # the first prompt token has no logprob
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(lp.get(tok))
            best = sorted(lp.items(), key=lambda kv: -kv[1])[:max(k, 0)]
            top = {self.token(t): v for t, v in best}
            top.setdefault(s, lp.get(tok))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat(self, token_ids: list[int], logprobs: list[dict[int, float]], k: int) -> dict[str, Any]:
        content = []
        for tok, lp in zip(token_ids, logprobs):
            s = self.token(tok)
            best = sorted(lp.items(), key=lambda kv: -kv[1])[:k]
            content.append({"token": s, "logprob": lp.get(tok), "bytes": list(s.encode()),
                            "top_logprobs": [{"token": self.token(t), "logprob": v,
                                              "bytes": list(self.token(t).encode())} for t, v in best]})
        return {"content": content}


FinishReason = Literal["stop", "length", "abort"]
