"""AsyncEngine: one engine thread owns the (not thread-safe) LLMEngine; asyncio frontends talk to it.

Data flow::

    asyncio loop (gRPC / HTTP handlers)              engine thread (owns all engine state)
    ──────────────────────────────────              ─────────────────────────────────────
    add_request() ── _Command("add") ──► queue.Queue ──► engine.add_request / abort_request
         ▲                                                  │
         │ RequestStream (asyncio.Queue per request)        ▼ engine.step() → [RequestOutput]
         └──── loop.call_soon_threadsafe(_dispatch, batch) ◄┘

Only the engine thread calls ``add_request`` / ``abort_request`` / ``step`` / ``stats``. Handlers get
a :class:`RequestStream` per request; leaving it early (client gone, deadline) aborts the request.
Backpressure: at most ``max_queued_requests`` requests may wait for their first token; more raise
:class:`QueueFullError`. If ``engine.step`` raises, every open stream ends with
:class:`EngineDeadError`, new requests are refused, and ``on_dead`` callbacks run.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from jaxllm.engine.outputs import CompletionOutput, RequestOutput
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served any more (gRPC UNAVAILABLE / HTTP 503)."""


class EngineDrainingError(RuntimeError):
    """The server is shutting down and takes no new requests (gRPC UNAVAILABLE / HTTP 503)."""


class QueueFullError(RuntimeError):
    """Too many requests wait for their first token (gRPC RESOURCE_EXHAUSTED / HTTP 429)."""


class EngineObserver(Protocol):
    """Receives what metrics need; called on the asyncio loop thread."""

    def on_stats(self, stats: dict[str, Any]) -> None: ...

    def on_first_token(self, ttft_s: float, queue_s: float | None, num_prompt_tokens: int) -> None: ...

    def on_tokens(self, num_tokens: int, itl_s: float | None) -> None: ...

    def on_finished(self, e2e_s: float, finish_reason: str | None) -> None: ...


@dataclass
class _Command:
    kind: str  # "add" | "abort" | "abort_all" | "stop"
    request_id: str = ""
    prompt: str | list[int] | None = None
    params: SamplingParams | None = None
    priority: int = 0
    arrival_time: float = 0.0
    accepted: asyncio.Future | None = None
    request_ids: list[str] = field(default_factory=list)


class RequestStream:
    """Async iterator over one request's RequestOutputs; ends after the finished one.

    Fed on the loop thread by :meth:`AsyncEngine._dispatch`; an exception put in the stream is
    raised to the consumer and ends it.
    """

    def __init__(self, request_id: str, arrival_time: float, num_prompt_tokens: int | None = None):
        self.request_id = request_id
        self.arrival_time = arrival_time
        self.finished = False
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.accepted: asyncio.Future | None = None  # resolved when the engine took the request
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        if not self.finished:
            self._queue.put_nowait(item)
            if isinstance(item, BaseException) or item.finished:
                self.finished = True

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class AsyncEngine:
    """Runs ``engine`` on its own thread and serves many concurrent asyncio consumers.

    Args:
        engine: an object with LLMEngine's API (add_request, abort_request, step,
            has_unfinished_requests, stats, tokenizer, model_info).
        max_queued_requests: refuse new requests while this many wait for their first token
            (None: unbounded).
        observer: optional metrics sink (see :class:`EngineObserver`).
        idle_poll_s: how long the idle engine thread blocks waiting for commands.
    """

    def __init__(self, engine: Any, *, max_queued_requests: int | None = None,
                 observer: EngineObserver | None = None, idle_poll_s: float = 0.5):
        if max_queued_requests is not None and (isinstance(max_queued_requests, bool)
                                                or not isinstance(max_queued_requests, int)
                                                or max_queued_requests < 1):
            raise ValueError(f"max_queued_requests: must be an integer >= 1 or None, got {max_queued_requests!r}")
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.observer = observer
        self.idle_poll_s = idle_poll_s
        # Frontends tokenize / apply chat templates on the loop thread: give them their own copy so
        # the Rust tokenizer is never borrowed by two threads at once.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.model_info: dict[str, Any] = dict(engine.model_info)
        self.start_time = time.monotonic()
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._num_queued = 0  # accepted streams still waiting for their first output (loop thread)
        self._stats: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._idle: asyncio.Event | None = None
        self.dead_error: EngineDeadError | None = None
        self.draining = False
        self._on_dead: list[Callable[[EngineDeadError], None]] = []

    # ------------------------------------------------------------------ lifecycle (loop thread)
    def start(self) -> None:
        """Start the engine thread; call from inside the running asyncio loop that serves requests."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stats = self._safe_stats()
        self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)
        self._thread.start()

    def add_dead_callback(self, fn: Callable[[EngineDeadError], None]) -> None:
        """Run ``fn(error)`` on the loop thread when the engine loop fails."""
        self._on_dead.append(fn)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    def begin_drain(self) -> None:
        """Refuse new requests from now on (in-flight ones go on)."""
        self.draining = True

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests, let in-flight ones finish for ``timeout_s``, then abort the rest.

        Returns:
            The number of requests that had to be aborted.
        """
        self.begin_drain()
        assert self._idle is not None
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(timeout_s, 0.0))
            return 0
        except asyncio.TimeoutError:
            pass
        remaining = len(self._streams)
        self._commands.put(_Command("abort_all"))
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=5.0)
        except asyncio.TimeoutError:  # engine thread stuck: end the streams here
            self._finish_all_aborted()
        return remaining

    async def shutdown(self) -> None:
        """Stop the engine thread (after draining, if the caller wants that)."""
        if self._thread is None:
            return
        self._commands.put(_Command("stop"))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    # ------------------------------------------------------------------ requests (loop thread)
    async def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams,
                          *, priority: int = 0) -> RequestStream:
        """Submit a request; returns its stream once the engine accepted it.

        Raises:
            ValueError: invalid input (message names the field), or a duplicate request id.
            QueueFullError / EngineDrainingError / EngineDeadError: see the class docs.
        """
        if self.dead_error is not None:
            raise EngineDeadError(str(self.dead_error))
        if self.draining:
            raise EngineDrainingError("server is shutting down and accepts no new requests")
        if self._thread is None:
            raise EngineDeadError("engine loop not started")
        if self.max_queued_requests is not None and self._num_queued >= self.max_queued_requests:
            raise QueueFullError(f"request queue is full ({self._num_queued} requests waiting; "
                                 f"max_queued_requests={self.max_queued_requests})")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already running; ids must be unique")
        now = time.monotonic()
        stream = RequestStream(request_id, now)
        accepted = asyncio.get_running_loop().create_future()
        stream.accepted = accepted
        self._streams[request_id] = stream
        self._num_queued += 1
        self._idle.clear()
        self._commands.put(_Command("add", request_id, prompt, params, priority, now, accepted))
        try:
            await accepted
        except BaseException:
            if not accepted.done() or accepted.cancelled():  # caller left while queued: engine may still take it
                self._commands.put(_Command("abort", request_ids=[request_id]))
            self._close_stream(stream)
            raise
        return stream

    async def generate(self, request_id: str | None, prompt: str | list[int], params: SamplingParams,
                       *, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Submit and iterate; abandoning the iterator aborts the request."""
        stream = await self.add_request(request_id, prompt, params, priority=priority)
        try:
            async for out in stream:
                yield out
        finally:
            self.release(stream)

    def release(self, stream: RequestStream) -> None:
        """The consumer is done with ``stream``: abort the request if it has not finished."""
        if self._streams.get(stream.request_id) is stream:
            if not stream.finished:
                self._commands.put(_Command("abort", request_ids=[stream.request_id]))
            self._close_stream(stream)

    def abort(self, request_ids: str | list[str]) -> None:
        """Abort requests by id (server side): their streams end with finish_reason "abort"."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self._commands.put(_Command("abort", request_ids=ids))

    def get_stats(self) -> dict[str, Any]:
        """Latest engine stats snapshot plus server-side counters."""
        stats = dict(self._stats)
        stats["num_open_streams"] = len(self._streams)
        stats["num_queued_streams"] = self._num_queued
        stats["uptime_s"] = time.monotonic() - self.start_time
        return stats

    # ------------------------------------------------------------------ loop-thread internals
    def _close_stream(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
            if stream.first_token_time is None:
                self._num_queued -= 1
        if not self._streams and self._idle is not None:
            self._idle.set()

    def _dispatch(self, batch: list[RequestOutput], now: float, stats: dict[str, Any] | None) -> None:
        obs = self.observer
        for out in batch:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # consumer left; the abort is on its way
            new_tokens = sum(len(c.delta_token_ids) for c in out.outputs)
            if new_tokens and stream.first_token_time is None:
                stream.first_token_time = now
                self._num_queued -= 1
                if obs is not None:
                    queue_s = None
                    if out.metrics is not None and out.metrics.first_scheduled_time is not None:
                        queue_s = max(0.0, out.metrics.first_scheduled_time - stream.arrival_time)
                    obs.on_first_token(now - stream.arrival_time, queue_s, len(out.prompt_token_ids))
                    obs.on_tokens(new_tokens, None)
            elif new_tokens and obs is not None:
                obs.on_tokens(new_tokens, now - (stream.last_token_time or now))
            if new_tokens:
                stream.last_token_time = now
            stream.put(out)
            if out.finished:
                if obs is not None:
                    reasons = [c.finish_reason for c in out.outputs]
                    obs.on_finished(now - stream.arrival_time, reasons[0] if reasons else None)
                self._close_stream(stream)
        if stats is not None:
            self._stats = stats
            if obs is not None:
                obs.on_stats(stats)

    def _fail_all(self, error: EngineDeadError) -> None:
        self.dead_error = error
        for stream in list(self._streams.values()):
            if stream.accepted is not None and not stream.accepted.done():
                stream.accepted.set_exception(error)
            stream.put(error)
            self._close_stream(stream)
        for fn in self._on_dead:
            try:
                fn(error)
            except Exception:  # a broken callback must not hide the others
                logger.exception("engine-dead callback failed")

    def _finish_all_aborted(self) -> None:
        for stream in list(self._streams.values()):
            stream.put(_aborted_output(stream.request_id, None))
            self._close_stream(stream)

    @staticmethod
    def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    # ------------------------------------------------------------------ engine thread
    def _safe_stats(self) -> dict[str, Any]:
        try:
            return dict(self.engine.stats())
        except Exception:
            logger.exception("engine.stats() failed")
            return dict(self._stats)

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        engine = self.engine
        last: dict[str, RequestOutput | None] = {}  # latest output per live request (for aborts)
        try:
            while True:
                busy = engine.has_unfinished_requests()
                cmds: list[_Command] = []
                if not busy:  # idle: block until a command arrives (or poll timeout)
                    try:
                        cmds.append(self._commands.get(timeout=self.idle_poll_s))
                    except queue.Empty:
                        pass
                while True:
                    try:
                        cmds.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                synthetic: list[RequestOutput] = []
                for cmd in cmds:
                    if cmd.kind == "stop":
                        return
                    if cmd.kind == "add":
                        try:
                            engine.add_request(cmd.request_id, cmd.prompt, cmd.params, priority=cmd.priority,
                                               arrival_time=cmd.arrival_time)
                            last[cmd.request_id] = None
                            loop.call_soon_threadsafe(self._resolve, cmd.accepted, None)
                        except Exception as e:  # ValueError: bad input; anything else: this request only
                            if not isinstance(e, ValueError):
                                logger.exception("add_request(%s) failed", cmd.request_id)
                            loop.call_soon_threadsafe(self._resolve, cmd.accepted, e)
                        continue
                    ids = list(last) if cmd.kind == "abort_all" else cmd.request_ids
                    ids = [i for i in ids if i in last]
                    if ids:
                        engine.abort_request(ids)
                    for rid in ids:
                        prev = last.pop(rid)
                        # Dropped in _dispatch when the consumer already left (client-side abort).
                        synthetic.append(_aborted_output(rid, prev))
                outputs: list[RequestOutput] = []
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    for out in outputs:
                        if out.finished:
                            last.pop(out.request_id, None)
                        elif out.request_id in last:
                            last[out.request_id] = out
                if outputs or synthetic or cmds:
                    loop.call_soon_threadsafe(self._dispatch, synthetic + outputs, time.monotonic(),
                                              self._safe_stats())
        except Exception as e:
            logger.exception("engine loop failed")
            error = EngineDeadError(f"engine failed: {type(e).__name__}: {e}")
            try:
                loop.call_soon_threadsafe(self._fail_all, error)
            except RuntimeError:  # loop already closed
                pass


def _aborted_output(request_id: str, prev: RequestOutput | None) -> RequestOutput:
    """A final output with finish_reason "abort", continuing ``prev`` (the last one sent)."""
    if prev is None:
        return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=[],
                             outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason="abort")],
                             finished=True)
    outs = []
    for c in prev.outputs:
        outs.append(CompletionOutput(index=c.index, text=c.text, token_ids=list(c.token_ids),
                                     cumulative_logprob=c.cumulative_logprob, logprobs=c.logprobs,
                                     finish_reason=c.finish_reason or "abort", stop_reason=c.stop_reason))
    return RequestOutput(request_id=request_id, prompt=prev.prompt, prompt_token_ids=prev.prompt_token_ids,
                         outputs=outs, finished=True, num_cached_tokens=prev.num_cached_tokens,
                         metrics=prev.metrics)
