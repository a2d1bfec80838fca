"""Prometheus metrics with vLLM's names under ``jaxllm:``, and a periodic throughput log line.

Each server owns a :class:`ServerMetrics` with its own ``CollectorRegistry`` (tests start several
servers in one process). It implements :class:`jaxllm.engine.async_engine.EngineObserver`, so the
AsyncEngine feeds it on the event-loop thread; engine-level counters (prefix cache, preemptions)
are cumulative in ``engine.stats()`` and are turned into counter increments here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

logger = logging.getLogger("jaxllm.metrics")

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class ServerMetrics:
    """All serving metrics of one server process, in a dedicated registry."""

    def __init__(self, model_name: str = ""):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def g(name, doc):
            return Gauge(f"jaxllm:{name}", doc, labels, registry=r).labels(model_name)

        def c(name, doc):
            return Counter(f"jaxllm:{name}", doc, labels, registry=r).labels(model_name)

        def h(name, doc, buckets):
            return Histogram(f"jaxllm:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = g("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = g("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage_perc = g("kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.")
        self.prompt_tokens = c("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = c("generation_tokens", "Generation tokens produced.")
        self.prefix_cache_queries = c("prefix_cache_queries", "Prefix-cache queries, in tokens.")
        self.prefix_cache_hits = c("prefix_cache_hits", "Prefix-cache hits, in tokens.")
        self.num_preemptions = c("num_preemptions", "Cumulative number of preemptions.")
        self.request_success = Counter("jaxllm:request_success", "Finished requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = h("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = h("inter_token_latency_seconds", "Time between consecutive output tokens.", _ITL_BUCKETS)
        self.e2e = h("e2e_request_latency_seconds", "End-to-end request latency.", _E2E_BUCKETS)
        self.queue_time = h("request_queue_time_seconds", "Time from arrival to first scheduling.",
                            _E2E_BUCKETS)
        self.model_name = model_name
        self._last_engine_counters: dict[str, int] = {}
        self._stats: dict[str, Any] = {}
        # For the periodic log line.
        self._window_prompt = 0
        self._window_gen = 0
        self._window_start = time.monotonic()

    # ---------------------------------------------------------------- EngineObserver
    def on_stats(self, stats: dict[str, Any]) -> None:
        self._stats = stats
        self.num_requests_running.set(stats.get("num_requests_running", 0))
        self.num_requests_waiting.set(stats.get("num_requests_waiting", 0))
        total = stats.get("kv_blocks_total", 0)
        if total:
            self.kv_cache_usage_perc.set(1.0 - stats.get("kv_blocks_free", total) / total)
        for key, counter in (("prefix_cache_queries", self.prefix_cache_queries),
                             ("prefix_cache_hits", self.prefix_cache_hits),
                             ("num_preemptions", self.num_preemptions)):
            value = int(stats.get(key, 0))
            delta = value - self._last_engine_counters.get(key, 0)
            if delta > 0:
                counter.inc(delta)
            self._last_engine_counters[key] = value

    def on_first_token(self, ttft_s: float, queue_s: float | None, num_prompt_tokens: int) -> None:
        self.ttft.observe(ttft_s)
        if queue_s is not None:
            self.queue_time.observe(queue_s)
        self.prompt_tokens.inc(num_prompt_tokens)
        self._window_prompt += num_prompt_tokens

    def on_tokens(self, num_tokens: int, itl_s: float | None) -> None:
        self.generation_tokens.inc(num_tokens)
        self._window_gen += num_tokens
        if itl_s is not None and num_tokens > 0:
            # Several tokens in one chunk (multi-step decode): spread the gap over them.
            for _ in range(num_tokens):
                self.itl.observe(itl_s / num_tokens)

    def on_finished(self, e2e_s: float, finish_reason: str | None) -> None:
        self.e2e.observe(e2e_s)
        self.request_success.labels(self.model_name, finish_reason or "unknown").inc()

    # ---------------------------------------------------------------- exposition and logging
    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def log_line(self) -> str:
        """One throughput/usage line for the window since the previous call (vLLM's format)."""
        now = time.monotonic()
        dt = max(now - self._window_start, 1e-9)
        s = self._stats
        total = s.get("kv_blocks_total", 0) or 1
        line = (f"Avg prompt throughput: {self._window_prompt / dt:.1f} tokens/s, "
                f"Avg generation throughput: {self._window_gen / dt:.1f} tokens/s, "
                f"Running: {s.get('num_requests_running', 0)} reqs, "
                f"Waiting: {s.get('num_requests_waiting', 0)} reqs, "
                f"KV cache usage: {100.0 * (1 - s.get('kv_blocks_free', total) / total):.1f}%, "
                f"Prefix cache hit rate: {_rate(s):.1f}%")
        self._window_prompt = self._window_gen = 0
        self._window_start = now
        return line

    async def log_periodically(self, interval_s: float = 5.0) -> None:
        """Log :meth:`log_line` every ``interval_s`` while there is (or was) traffic."""
        idle_logged = False
        while True:
            await asyncio.sleep(interval_s)
            busy = self._window_prompt or self._window_gen or self._stats.get("num_requests_running") \
                or self._stats.get("num_requests_waiting")
            if busy or not idle_logged:
                logger.info(self.log_line())
                idle_logged = not busy
            else:
                self.log_line()  # reset the window quietly


def _rate(stats: dict[str, Any]) -> float:
    q = stats.get("prefix_cache_queries", 0)
    return 100.0 * stats.get("prefix_cache_hits", 0) / q if q else 0.0
