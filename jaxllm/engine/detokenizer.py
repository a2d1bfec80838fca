"""Incremental detokenization and stop-string checks, one object per sequence.

Text is produced by ``tokenizers.decoders.DecodeStream`` (the same streaming decoder vLLM uses for
fast tokenizers): it buffers tokens until they form whole UTF-8 characters, so a delta never holds
half a character. The stream is prefilled with the prompt so the first generated token gets the
right leading space. Stop strings are searched only in the region the new text can affect; while
a request runs, the last ``max(len(stop)) - 1`` characters are held back from streaming so that a
stop string split across tokens is never sent and then taken back.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from jaxllm.sampling_params import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.params = params
        self.output_text = ""
        self._stops = list(params.stop or [])
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self._sent = 0  # chars of output_text already returned as deltas
        self._fast = getattr(tokenizer, "_tokenizer", None)
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        if not params.detokenize:
            self._stream = None
        elif self._fast is not None:
            # Prefill with (the tail of) the prompt: only the last few tokens affect spacing.
            self._stream = DecodeStream(ids=list(prompt_token_ids[-8:]),
                                        skip_special_tokens=params.skip_special_tokens)
        else:
            self._stream = None

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; return the stop string that matched, if any (text is then truncated)."""
        if not self.params.detokenize:
            return None
        old_len = len(self.output_text)
        for tok in new_token_ids:
            if self._stream is not None:
                try:
                    chunk = self._stream.step(self._fast, tok)
                except Exception:  # out-of-vocab id from a padded vocab: render nothing
                    chunk = None
                if chunk:
                    self.output_text += chunk
            else:
                self._ids.append(tok)
                self.output_text = self._tokenizer.decode(
                    self._ids, skip_special_tokens=self.params.skip_special_tokens)
        if not self._stops or len(self.output_text) == old_len:
            return None
        start = max(0, old_len - self._holdback)
        for stop in self._stops:
            idx = self.output_text.find(stop, start)
            if idx != -1:
                keep = idx + len(stop) if self.params.include_stop_str_in_output else idx
                self.output_text = self.output_text[:keep]
                return stop
        return None

    def next_delta(self, finished: bool) -> str:
        """Text not returned before; holds back a possible partial stop string while running."""
        limit = len(self.output_text) if finished else max(self._sent, len(self.output_text) - self._holdback)
        delta = self.output_text[self._sent:limit]
        self._sent = limit
        return delta

    def streamed_text(self) -> str:
        return self.output_text[:self._sent]
