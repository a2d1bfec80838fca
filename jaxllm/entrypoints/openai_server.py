"""OpenAI-compatible HTTP API (FastAPI) over an :class:`AsyncEngine`.

Routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics. Streaming uses SSE
(``data: {...}`` lines, ending with ``data: [DONE]``). Errors use OpenAI's JSON shape with status
400 (bad input, naming the field), 401 (API key), 404 (unknown model), 429 (queue full) and
503 (draining or engine failed). A client that disconnects aborts its requests.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jaxllm.engine.async_engine import (AsyncEngine, EngineDeadError, EngineDrainingError, QueueFullError,
                                        RequestStream)
from jaxllm.engine.outputs import RequestOutput
from jaxllm.entrypoints.metrics import ServerMetrics
from jaxllm.entrypoints.openai_protocol import (ChatCompletionRequest, CompletionRequest, LogprobFormatter,
                                                OpenAIError, new_id, now_s, usage)
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def _engine_error(e: Exception) -> OpenAIError:
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, ValueError):
        return OpenAIError.from_value_error(e)
    if isinstance(e, QueueFullError):
        return OpenAIError(429, str(e), code="queue_full")
    if isinstance(e, (EngineDrainingError, EngineDeadError)):
        return OpenAIError(503, str(e), code="unavailable")
    logger.exception("unexpected error")
    return OpenAIError(500, f"internal error: {type(e).__name__}: {e}")


class _Submitted:
    """The engine streams of one HTTP request (one per prompt), merged into (prompt_index, output)."""

    def __init__(self, engine: AsyncEngine, streams: list[RequestStream]):
        self.engine, self.streams = engine, streams

    @classmethod
    async def create(cls, engine: AsyncEngine, base_id: str, prompts: list[str | list[int]],
                     params: SamplingParams, priority: int) -> "_Submitted":
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(await engine.add_request(rid, prompt, params.clone(), priority=priority))
        except BaseException:
            for s in streams:
                engine.release(s)
            raise
        return cls(engine, streams)

    async def merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream):
            try:
                async for out in stream:
                    await queue.put((i, out))
                await queue.put((i, None))
            except BaseException as e:  # forwarded: EngineDeadError ends the whole response
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            self.release()

    def release(self) -> None:
        for s in self.streams:
            self.engine.release(s)


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _run_or_cancel(request: Request, coro) -> Any:
    """Run ``coro``; cancel it (aborting its engine requests) if the client disconnects first."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        raise OpenAIError(499, "client disconnected")
    finally:
        watch.cancel()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def build_app(engine: AsyncEngine, metrics: ServerMetrics | None = None, *, api_key: str | None = None,
              served_model_name: str | None = None) -> FastAPI:
    """The FastAPI application. ``engine`` must be started in the loop that serves the app."""
    app = FastAPI(title="jaxllm", docs_url=None, redoc_url=None)
    info = engine.model_info
    model_name = served_model_name or str(info.get("model", "model"))
    accepted_names = {model_name, str(info.get("model", ""))}
    tok = engine.tokenizer
    fmt = LogprobFormatter(tok) if tok is not None else None

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return JSONResponse(OpenAIError(400, f"{param or 'body'}: {err.get('msg')}", param=param).body(),
                            status_code=400)

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise OpenAIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                              code="invalid_api_key")

    def check_model(model: str | None) -> None:
        if model is not None and model not in accepted_names:
            raise OpenAIError(404, f"model: {model!r} does not exist; this server serves {model_name!r}",
                              param="model", code="model_not_found")

    def check_tokenizer(what: str) -> None:
        if tok is None:
            raise OpenAIError(400, f"{what}: this model has no tokenizer", param=what)

    # ---------------------------------------------------------------- plain routes
    @app.get("/health")
    async def health():
        if engine.dead_error is not None or engine.draining or not engine.is_running:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics():
        if metrics is None:
            return Response(status_code=404)
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": now_s(),
                                            "owned_by": "jaxllm", "root": str(info.get("model", "")),
                                            "max_model_len": info.get("max_model_len")}]}

    # ---------------------------------------------------------------- /v1/completions
    @app.post("/v1/completions", dependencies=[Depends(check_api_key)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        params, drop_generated = body.to_sampling_params()
        prompts = body.prompts()
        if body.echo or any(isinstance(p, str) for p in prompts):
            check_tokenizer("prompt")
        rid = body.request_id or new_id("cmpl")
        try:
            sub = await _Submitted.create(engine, rid, prompts, params, body.priority)
        except Exception as e:
            raise _engine_error(e) from None
        k = body.logprobs
        want_lp = k is not None

        def prompt_parts(out: RequestOutput) -> tuple[str, list[int], list | None]:
            text = out.prompt if out.prompt is not None else tok.decode(out.prompt_token_ids)
            return text, out.prompt_token_ids, out.prompt_logprobs

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_completion_stream(sub, rid, body, params, drop_generated, include_usage,
                                                        fmt, prompt_parts), media_type="text/event-stream")

        async def collect() -> dict:
            finals: dict[int, RequestOutput] = {}
            async for i, out in sub.merged():
                if out.finished:
                    finals[i] = out
            return finals

        try:
            finals = await _run_or_cancel(request, collect())
        except Exception as e:
            raise _engine_error(e) from None
        choices, n_prompt, n_gen, n_cached = [], 0, 0, 0
        for i in range(len(prompts)):
            out = finals[i]
            n_prompt += len(out.prompt_token_ids)
            n_cached += out.num_cached_tokens
            for c in out.outputs:
                ids = [] if drop_generated else list(c.token_ids)
                text = "" if drop_generated else c.text
                lps = (c.logprobs or [])[:len(ids)]
                n_gen += len(ids)  # 0 when echo-only scoring drops its one generated token
                logprobs = None
                if body.echo:
                    p_text, p_ids, p_lps = prompt_parts(out)
                    if want_lp:
                        p_lps = p_lps if p_lps is not None else [None] * len(p_ids)
                        logprobs = fmt.completion(p_ids + ids, list(p_lps) + list(lps), k)
                    text = p_text + text
                elif want_lp:
                    logprobs = fmt.completion(ids, lps, k)
                choices.append({"index": i * params.n + c.index, "text": text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": rid, "object": "text_completion", "created": now_s(), "model": model_name,
                "choices": choices, "usage": usage(n_prompt, n_gen, n_cached)}

    async def _completion_stream(sub: _Submitted, rid: str, body: CompletionRequest, params: SamplingParams,
                                 drop_generated: bool, include_usage: bool, fmt, prompt_parts):
        created, k = now_s(), body.logprobs
        echoed: set[int] = set()
        done: set[int] = set()
        n_prompt, n_gen, n_cached = {}, {}, {}
        try:
            async for i, out in sub.merged():
                n_prompt[i], n_cached[i] = len(out.prompt_token_ids), out.num_cached_tokens
                for c in out.outputs:
                    idx = i * params.n + c.index
                    if idx in done:
                        continue
                    ids = [] if drop_generated else list(c.delta_token_ids)
                    text = "" if drop_generated else c.delta_text
                    lps = (c.logprobs[len(c.logprobs) - len(c.delta_token_ids):] if c.logprobs else [])[:len(ids)]
                    n_gen[idx] = 0 if drop_generated else len(c.token_ids)
                    logprobs = fmt.completion(ids, lps, k) if k is not None else None
                    if body.echo and idx not in echoed:
                        echoed.add(idx)
                        p_text, p_ids, p_lps = prompt_parts(out)
                        if k is not None:
                            p_lps = p_lps if p_lps is not None else [None] * len(p_ids)
                            logprobs = fmt.completion(p_ids + ids, list(p_lps) + list(lps), k)
                        text = p_text + text
                    if not text and not ids and not c.finish_reason:
                        continue
                    if c.finish_reason:
                        done.add(idx)
                    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                             "choices": [{"index": idx, "text": text, "logprobs": logprobs,
                                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}
                    if include_usage:
                        chunk["usage"] = None
                    yield _sse(chunk)
            if include_usage:
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                            "choices": [], "usage": usage(sum(n_prompt.values()), sum(n_gen.values()),
                                                          sum(n_cached.values()))})
        except Exception as e:
            yield _sse(_engine_error(e).body())
        yield "data: [DONE]\n\n"

    # ---------------------------------------------------------------- /v1/chat/completions
    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        check_tokenizer("messages")
        params = body.to_sampling_params()
        try:
            text = tok.apply_chat_template(body.template_messages(), tokenize=False,
                                           add_generation_prompt=body.add_generation_prompt,
                                           **(body.chat_template_kwargs or {}))
        except Exception as e:  # no template, bad message shape, template error
            raise OpenAIError(400, f"messages: could not apply the chat template: {e}", param="messages") from None
        # The template already holds any BOS; do not let the tokenizer add another.
        prompt_ids = list(tok.encode(text, add_special_tokens=False))
        rid = body.request_id or new_id("chatcmpl")
        try:
            sub = await _Submitted.create(engine, rid, [prompt_ids], params, body.priority)
        except Exception as e:
            raise _engine_error(e) from None
        k = body.top_logprobs or 0
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_stream(sub, rid, body.logprobs, k, include_usage),
                                     media_type="text/event-stream")

        async def collect() -> RequestOutput:
            final = None
            async for _, out in sub.merged():
                final = out
            return final

        try:
            out = await _run_or_cancel(request, collect())
        except Exception as e:
            raise _engine_error(e) from None
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": fmt.chat(c.token_ids, c.logprobs or [], k) if body.logprobs else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
        return {"id": rid, "object": "chat.completion", "created": now_s(), "model": model_name,
                "choices": choices, "usage": usage(len(out.prompt_token_ids),
                                                   sum(len(c.token_ids) for c in out.outputs),
                                                   out.num_cached_tokens)}

    async def _chat_stream(sub: _Submitted, rid: str, want_lp: bool, k: int, include_usage: bool):
        created = now_s()
        started: set[int] = set()
        done: set[int] = set()
        n_prompt = n_gen = n_cached = 0

        def chunk(choice: dict) -> str:
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                   "choices": [choice]}
            if include_usage:
                obj["usage"] = None
            return _sse(obj)

        try:
            async for _, out in sub.merged():
                n_prompt, n_cached = len(out.prompt_token_ids), out.num_cached_tokens
                n_gen = sum(len(c.token_ids) for c in out.outputs)
                for c in out.outputs:
                    if c.index in done:
                        continue
                    if c.index not in started:
                        started.add(c.index)
                        yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None})
                    if c.delta_text or c.delta_token_ids:
                        lps = None
                        if want_lp and c.logprobs:
                            n = len(c.delta_token_ids)
                            lps = fmt.chat(c.delta_token_ids, c.logprobs[len(c.logprobs) - n:], k)
                        if c.delta_text or lps:
                            yield chunk({"index": c.index, "delta": {"content": c.delta_text}, "logprobs": lps,
                                         "finish_reason": None})
                    if c.finish_reason:
                        done.add(c.index)
                        yield chunk({"index": c.index, "delta": {}, "logprobs": None,
                                     "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            if include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": model_name, "choices": [], "usage": usage(n_prompt, n_gen, n_cached)})
        except Exception as e:
            yield _sse(_engine_error(e).body())
        yield "data: [DONE]\n\n"

    return app
