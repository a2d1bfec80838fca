"""SamplingParams: vLLM's fields and defaults, validated on construction.

Every invalid value raises ``ValueError`` whose message starts with the field name and gives the
allowed range, so the HTTP / gRPC layers can hand it to the user unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

MAX_LOGPROBS = 20


class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1


def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"{name}: {msg}")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    # Filled in by the engine: the model's EOS ids (from generation_config / tokenizer).
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._verify()
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        def num(name, value, kind=(int, float)):
            if isinstance(value, bool) or not isinstance(value, kind):
                raise _err(name, f"must be a number, got {value!r}")

        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise _err("n", f"must be an integer >= 1, got {self.n!r}")
        num("temperature", self.temperature)
        if self.temperature < 0.0:
            raise _err("temperature", f"must be >= 0, got {self.temperature}")
        num("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise _err("top_p", f"must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise _err("top_k", f"must be -1 (disable), 0 (disable) or a positive integer, got {self.top_k!r}")
        num("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise _err("min_p", f"must be in [0, 1], got {self.min_p}")
        num("presence_penalty", self.presence_penalty)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise _err("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        num("frequency_penalty", self.frequency_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise _err("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        num("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0.0:
            raise _err("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise _err("seed", f"must be an integer or None, got {self.seed!r}")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise _err("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise _err("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _err("min_tokens", f"must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise _err(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise _err("stop", "must be a non-empty string or a list of non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise _err("stop_token_ids", f"must be a list of non-negative integers, got {self.stop_token_ids!r}")

    @property
    def sampling_type(self) -> SamplingType:
        return SamplingType.GREEDY if self.temperature < 1e-5 else SamplingType.RANDOM

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def clone(self) -> "SamplingParams":
        import copy
        return copy.deepcopy(self)
