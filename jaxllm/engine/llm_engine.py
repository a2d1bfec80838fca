"""LLMEngine: the one loop that owns all state.

``add_request`` validates and tokenizes, fans ``n > 1`` out into n sequences (which share the
prompt's blocks through the prefix cache) and hands them to the scheduler. ``step`` runs one
schedule → execute → update cycle, detokenizes the new tokens, applies stop strings and returns
one ``RequestOutput`` per request that made progress. Not thread-safe: one thread drives it
(``LLM.generate`` directly, the servers through ``AsyncEngine``).

Async scheduling (on by default as in vLLM; ``async_scheduling=False`` / ``--no-async-scheduling``
turns it off, and several processes run synchronously): ``step`` schedules and
dispatches step t+1 *before* it reads step t's sampled ids, so the device runs t+1 while the host
updates requests, detokenizes and checks stops for t. Step t's tokens reach t+1 on device (see
``ModelRunner.dispatch``); the scheduler counts them as pending until they arrive. Outputs are thus
one ``step`` call later than in the synchronous engine, and a request that stops at step t may
have computed one more token in t+1, which is dropped. A step falls back to the synchronous order
when a running request needs its whole token history on the host (penalties).

``stats()`` carries cumulative host timings (``time_*_s``) so a benchmark can report the host gap.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from jaxllm.config import EngineConfig
from jaxllm.core.scheduler import Scheduler
from jaxllm.engine.detokenizer import IncrementalDetokenizer
from jaxllm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxllm.request import Request, RequestStatus
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Seq:
    """Per-sequence output state beside the scheduler's Request."""
    request: Request
    index: int
    detok: IncrementalDetokenizer | None
    num_seen: int = 0                     # output tokens already processed
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class StepTimings:
    """Cumulative seconds per phase of ``LLMEngine.step`` (host side) and the number of steps.

    ``wait`` is the time the host sat blocked on the device for sampled ids; everything else is
    host work that, without async scheduling, leaves the device idle between steps."""
    steps: int = 0             # device steps dispatched
    overlapped: int = 0        # of those, dispatched while the step before was still in flight
    sync_fallbacks: int = 0    # async scheduling: steps that had to wait for the one before first
    schedule: float = 0.0      # Scheduler.schedule / schedule_decode_steps
    pack: float = 0.0          # pack_batch (SchedulerOutput -> padded numpy)
    dispatch: float = 0.0      # launching the program (host -> device argument transfer included)
    wait: float = 0.0          # blocked on the device for the sampled ids
    postprocess: float = 0.0   # readback, update_from_output, detokenize, stop checks, outputs

    def as_stats(self) -> dict[str, float]:
        host = self.schedule + self.pack + self.dispatch + self.postprocess
        return {"num_steps": self.steps, "num_steps_overlapped": self.overlapped,
                "num_sync_fallbacks": self.sync_fallbacks, "time_schedule_s": self.schedule, "time_pack_s": self.pack,
                "time_dispatch_s": self.dispatch, "time_wait_s": self.wait,
                "time_postprocess_s": self.postprocess, "time_host_s": host}


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[_Seq]
    arrival_time: float
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finished_time: float | None = None


def _start_backend() -> None:
    try:
        import jax
        jax.devices()
    except Exception:  # noqa: BLE001 - the main thread's first jax call reports the error
        pass


def _enable_compilation_cache(cache_dir: str | None) -> None:
    import jax
    if cache_dir == "":
        return
    if jax.config.jax_compilation_cache_dir:
        return  # the user configured it already
    cache_dir = cache_dir or os.environ.get("JAXLLM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxllm", "xla")
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


class LLMEngine:
    def __init__(self, config: EngineConfig, *, progress: bool = True):
        t_start = time.perf_counter()
        from jaxllm.engine.model_loading import load_everything  # jax-heavy imports stay lazy
        from jaxllm.parallel.multihost import initialize as initialize_multihost

        initialize_multihost(config.parallel_config)  # jax.distributed first (no-op for one process)
        # vLLM's gpu_memory_utilization is XLA's pool fraction (effective if jax has not started its
        # GPU backend yet; an explicit XLA_PYTHON_CLIENT_MEM_FRACTION wins).
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(config.cache_config.gpu_memory_utilization))
        _enable_compilation_cache(config.compilation_cache_dir)
        # Start jax's backend (CUDA context, allocator) in a thread while this one imports
        # transformers, which imports torch (~6 s on the H100 image); jax guards the backend
        # initialization with a lock, so load_everything's first jax call just waits for it.
        threading.Thread(target=_start_backend, name="jaxllm-backend-init", daemon=True).start()
        loaded = load_everything(config, progress=progress)
        self.config: EngineConfig = loaded.config
        self.hf_config = loaded.hf_config
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        self.runner = loaded.runner
        self.model_info = loaded.model_info
        self.vocab_size = loaded.model_info["vocab_size"]
        self.max_model_len = self.config.model_config.max_model_len
        self.scheduler = Scheduler(self.config.scheduler_config, self.config.cache_config,
                                   self.runner.num_blocks)
        self._rng = np.random.default_rng(self.config.model_config.seed)
        self._parents: dict[str, _Parent] = {}
        self._seq_of: dict[str, tuple[_Parent, _Seq]] = {}
        self._pending: dict[str, _Parent] = {}  # finished outside step (aborts): reported next step
        self.timings = StepTimings()
        self._inflight = None  # async scheduling: the dispatched, not yet collected StepHandle
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.load_time_s = time.perf_counter() - t_start
        self.compile_time_s = 0.0
        if self.config.precompile:
            self.compile_time_s = self.runner.precompile(progress=progress)
        self.runner.allocate_kv_caches()
        self.startup_time_s = time.perf_counter() - t_start
        self._warm_compilations = self.runner.num_compilations
        requested = self.config.scheduler_config.async_scheduling   # None: on where supported
        self.async_scheduling = requested is not False and self.runner.multihost is None
        if requested and self.runner.multihost is not None:
            logger.warning("async_scheduling: not supported with several processes (the leader broadcasts "
                           "host inputs); running synchronously")
        logger.info("Engine ready in %.1fs (load %.1fs, compile %.1fs for %d buckets)", self.startup_time_s,
                    self.load_time_s, self.compile_time_s, len(self.runner.buckets))
        mh = self.runner.multihost
        if mh is not None and not mh.is_leader:
            # A follower process (process_id > 0) only mirrors the leader's device programs: it serves
            # them here, then exits when the leader stops (LLM.close()/exit) — generate, serve, LLM alike.
            from jaxllm.parallel.multihost import follower_loop
            follower_loop(self.runner)
            raise SystemExit(0)

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids instead of text")
            return list(self.tokenizer.encode(prompt))
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt: must be a string or a list of integer token ids")
        return [int(t) for t in prompt]

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, *,
                    priority: int = 0, arrival_time: float | None = None) -> None:
        """Queue a request. Raises ValueError naming the field for input that can never be served."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params: must be a SamplingParams")
        if request_id in self._parents:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority: must be an integer, got {priority!r}")
        prompt_ids = self.tokenize(prompt)
        if not prompt_ids:
            raise ValueError("prompt: must not be empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        n_prompt = len(prompt_ids)
        if n_prompt >= self.max_model_len:
            raise ValueError(f"prompt: {n_prompt} tokens leave no room to generate within "
                             f"max_model_len={self.max_model_len}")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n_prompt
        if n_prompt + max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens: prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds "
                             f"max_model_len={self.max_model_len}")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs: list[_Seq] = []
        parent = _Parent(request_id, prompt if isinstance(prompt, str) else None, prompt_ids, params, seqs,
                         arrival)
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seed = (params.seed + i) if params.seed is not None else int(self._rng.integers(0, 2**31 - 1))
            req = Request(child_id, prompt_ids, params, max_tokens=max_tokens, arrival_time=arrival,
                          priority=priority, eos_token_ids=self.eos_token_ids, seed=seed)
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params) \
                if self.tokenizer is not None and params.detokenize else None
            seqs.append(_Seq(req, i, detok, logprobs=[] if params.logprobs is not None else None,
                             cumulative_logprob=0.0 if params.logprobs is not None else None))
        added: list[Request] = []
        try:
            for s in seqs:
                self.scheduler.add_request(s.request)
                added.append(s.request)
        except ValueError:
            if added:
                self.scheduler.finish_requests([r.request_id for r in added], RequestStatus.FINISHED_ABORTED)
            raise
        self._parents[request_id] = parent
        for s in seqs:
            self._seq_of[s.request.request_id] = (parent, s)
        self.num_prompt_tokens_total += n_prompt * params.n

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Abort requests (unknown or finished ids are ignored); their final output comes next step."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            parent = self._parents.get(rid)
            if parent is None:
                continue
            live = [s.request.request_id for s in parent.seqs if not s.request.is_finished()]
            self.scheduler.finish_requests(live, RequestStatus.FINISHED_ABORTED)
            self._pending[rid] = parent

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        changed: dict[str, _Parent] = dict(self._pending)
        self._pending.clear()
        inflight, self._inflight = self._inflight, None
        if inflight is not None and not self._can_overlap():
            self._finish(inflight, changed)  # this step needs the in-flight tokens on the host
            inflight = None
            self.timings.sync_fallbacks += 1
        t0 = time.perf_counter()
        so = None
        if self.config.scheduler_config.num_decode_steps > 1 and self._can_multi_step():
            so = self.scheduler.schedule_decode_steps(self.config.scheduler_config.num_decode_steps)
        if so is None:
            so = self.scheduler.schedule()
        self.timings.schedule += time.perf_counter() - t0
        handle = None
        if not so.is_empty:
            handle = self.runner.dispatch(so, inflight)
            self.timings.steps += 1
            self.timings.overlapped += inflight is not None
            self.timings.pack += handle.pack_s
            self.timings.dispatch += handle.dispatch_s
        if inflight is not None:
            self._finish(inflight, changed)
        if handle is not None:
            if self.async_scheduling:
                self._inflight = handle
            else:
                self._finish(handle, changed)
        t1 = time.perf_counter()
        outputs = [self._make_output(p) for p in changed.values()]
        for out in outputs:
            if out.finished:
                parent = self._parents.pop(out.request_id, None)
                if parent is not None:
                    for s in parent.seqs:
                        self._seq_of.pop(s.request.request_id, None)
        self.timings.postprocess += time.perf_counter() - t1
        if handle is not None and logger.isEnabledFor(logging.DEBUG):
            logger.debug("step %d: %d reqs, %d tokens, %s; pack %.2f ms, dispatch %.2f ms", self.timings.steps,
                         len(so.scheduled), so.total_num_scheduled_tokens,
                         "async" if self.async_scheduling else "sync", 1e3 * handle.pack_s, 1e3 * handle.dispatch_s)
        return outputs

    def _can_overlap(self) -> bool:
        """Whether the next step may be scheduled before the in-flight one's tokens are read:
        not if a running request with a token in flight uses penalties (they need its history)."""
        pending = self.scheduler.num_pending_tokens
        return not any(r.sampling_params.uses_penalties and pending(r) for r in self.scheduler.running)

    def _finish(self, handle, changed: dict[str, _Parent]) -> None:
        """Read a dispatched step's tokens back and apply them (stops, detokenization, outputs)."""
        ro = self.runner.collect(handle)
        t0 = time.perf_counter()
        so = handle.so
        now = time.monotonic()
        self.scheduler.update_from_output(so, ro)
        for sr in so.scheduled:
            entry = self._seq_of.get(sr.request_id)
            if entry is None or entry[1].request is not sr.request:
                continue  # finished and gone (its id may be in use again by a newer request)
            parent, seq = entry
            if sr.request_id in ro.prompt_logprobs:
                parent.prompt_logprobs = (parent.prompt_logprobs or []) + ro.prompt_logprobs[sr.request_id]
            if self._process_tokens(seq, ro.logprobs.get(sr.request_id), now):
                changed[parent.request_id] = parent
            elif seq.request.is_finished():
                changed[parent.request_id] = parent
        self.timings.wait += handle.wait_s
        self.timings.postprocess += handle.readback_s + time.perf_counter() - t0

    def _can_multi_step(self) -> bool:
        """Multi-step decode keeps per-step inputs fixed on device: no penalties (token history) and
        no min_tokens bans, which change every step."""
        for r in self.scheduler.running:
            sp = r.sampling_params
            if sp.uses_penalties or r.num_output_tokens < sp.min_tokens:
                return False
        return True

    def _process_tokens(self, seq: _Seq, logprobs: list[dict[int, float]] | None, now: float) -> bool:
        req = seq.request
        new = req.output_token_ids[seq.num_seen:]
        if not new:
            return False
        seq.num_seen = req.num_output_tokens
        seq.delta_token_ids.extend(new)
        self.num_generation_tokens_total += len(new)
        if req.first_token_time is None:
            req.first_token_time = now
        req.last_token_time = now
        if seq.logprobs is not None and logprobs:
            seq.logprobs.extend(logprobs)
            for tok, d in zip(new, logprobs):
                seq.cumulative_logprob += d.get(tok, 0.0)
        if seq.detok is not None:
            stop = seq.detok.update(new)
            if stop is not None and not req.is_finished():
                req.stop_reason = stop
                self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
                req.stop_reason = stop
        return True

    def _make_output(self, parent: _Parent) -> RequestOutput:
        completions = []
        finished = True
        for seq in parent.seqs:
            req = seq.request
            done = req.is_finished()
            finished &= done
            if seq.detok is not None:
                delta_text = seq.detok.next_delta(done)
                text = seq.detok.streamed_text()
            else:
                delta_text, text = "", ""
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(req.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=req.get_finished_reason(), stop_reason=req.stop_reason,
                delta_text=delta_text, delta_token_ids=seq.delta_token_ids))
            seq.delta_token_ids = []
        first = parent.seqs[0].request
        if finished and parent.finished_time is None:
            parent.finished_time = time.monotonic()
        metrics = RequestMetrics(arrival_time=parent.arrival_time, first_scheduled_time=first.first_scheduled_time,
                                 first_token_time=first.first_token_time, last_token_time=first.last_token_time,
                                 finished_time=parent.finished_time)
        return RequestOutput(request_id=parent.request_id, prompt=parent.prompt,
                             prompt_token_ids=parent.prompt_token_ids, outputs=completions, finished=finished,
                             prompt_logprobs=parent.prompt_logprobs,
                             num_cached_tokens=max(0, first.num_cached_tokens), metrics=metrics)

    # ------------------------------------------------------------------ stats
    @property
    def num_compilations(self) -> int:
        return self.runner.num_compilations

    def stats(self) -> dict:
        s = dict(self.scheduler.stats())
        s["num_compilations"] = self.runner.num_compilations
        s["prompt_tokens_total"] = self.num_prompt_tokens_total
        s["generation_tokens_total"] = self.num_generation_tokens_total
        s.update(self.timings.as_stats())
        return s
