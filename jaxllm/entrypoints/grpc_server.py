"""gRPC service ``jaxllm.v1.JaxLLM`` on grpc.aio, plus grpc.health.v1 and server reflection.

Status codes: INVALID_ARGUMENT (message names the field), RESOURCE_EXHAUSTED (queue full),
UNAVAILABLE (draining / engine failed), UNAUTHENTICATED (API key set and metadata
``authorization: Bearer KEY`` missing or wrong). A cancelled call or a passed deadline cancels the
handler, which releases the request's stream and so aborts it in the engine (KV blocks freed).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxllm._proto import jaxllm_pb2 as pb
from jaxllm._proto import jaxllm_pb2_grpc as pb_grpc
from jaxllm.engine.async_engine import (AsyncEngine, EngineDeadError, EngineDrainingError, QueueFullError)
from jaxllm.engine.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JaxLLM"].full_name  # "jaxllm.v1.JaxLLM"
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
_SCALAR_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "seed", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
                  "skip_special_tokens", "include_stop_str_in_output")


def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """proto SamplingParams → jaxllm.SamplingParams; unset optional fields keep the defaults.

    Raises:
        ValueError: naming the field, from SamplingParams' own validation.
    """
    kw: dict[str, Any] = {name: getattr(msg, name) for name in _SCALAR_FIELDS if msg.HasField(name)}
    if msg.stop:
        kw["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        kw["stop_token_ids"] = list(msg.stop_token_ids)
    return SamplingParams(**kw)


def _logprobs_to_proto(token_ids: list[int], logprobs: list[dict[int, float]]) -> list[pb.PositionLogprobs]:
    out = []
    for tok, lp in zip(token_ids, logprobs):
        top = sorted(lp.items(), key=lambda kv: -kv[1])
        out.append(pb.PositionLogprobs(sampled=pb.TokenLogprob(token_id=tok, logprob=lp.get(tok, float("nan"))),
                                       top=[pb.TokenLogprob(token_id=t, logprob=v) for t, v in top]))
    return out


def chunks_from_output(out: RequestOutput, done: set[int]) -> list[pb.GenerateResponse]:
    """One GenerateResponse per completion that has new tokens or just finished.

    ``done`` holds the indices of completions whose final chunk was already sent (updated here).
    """
    chunks = []
    for c in out.outputs:
        if c.index in done or not (c.delta_token_ids or c.finish_reason):
            continue
        msg = pb.GenerateResponse(request_id=out.request_id, index=c.index, token_ids=c.delta_token_ids,
                                  text=c.delta_text, prompt_tokens=len(out.prompt_token_ids),
                                  completion_tokens=len(c.token_ids), cached_tokens=max(out.num_cached_tokens, 0))
        if c.logprobs is not None and c.delta_token_ids:
            n = len(c.delta_token_ids)
            msg.logprobs.extend(_logprobs_to_proto(c.delta_token_ids, c.logprobs[-n:]))
        if c.finish_reason:
            msg.finish_reason = _FINISH.get(c.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
            if c.stop_reason is not None:
                msg.stop_reason = str(c.stop_reason)
            done.add(c.index)
        chunks.append(msg)
    return chunks


def status_for(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, (EngineDrainingError, EngineDeadError)):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


class JaxLLMServicer(pb_grpc.JaxLLMServicer):
    """Implements jaxllm.v1.JaxLLM over an :class:`AsyncEngine`."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        kind = request.WhichOneof("input")
        try:
            if kind is None:
                raise ValueError("input: set either text or token_ids")
            prompt: str | list[int] = request.text if kind == "text" else list(request.token_ids.ids)
            params = params_from_proto(request.sampling_params)
            stream = await self.engine.add_request(request.request_id or None, prompt, params,
                                                   priority=request.priority)
        except (ValueError, QueueFullError, EngineDrainingError, EngineDeadError) as e:
            await context.abort(status_for(e), str(e))
        done: set[int] = set()
        try:
            async for out in stream:
                for chunk in chunks_from_output(out, done):
                    yield chunk
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            self.engine.release(stream)  # no-op when finished; aborts on cancel / deadline

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        self.engine.abort(list(request.request_ids))
        return pb.AbortResponse()

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        info = self.engine.model_info
        return pb.ModelInfo(model=str(info.get("model", "")), max_model_len=int(info.get("max_model_len", 0)),
                            vocab_size=int(info.get("vocab_size", 0)), dtype=str(info.get("dtype", "")),
                            tensor_parallel_size=int(info.get("tensor_parallel_size", 1)),
                            data_parallel_size=int(info.get("data_parallel_size", 1)),
                            block_size=int(info.get("block_size", 0)))

    async def GetServerInfo(self, request, context) -> pb.ServerInfo:
        s = self.engine.get_stats()
        total = int(s.get("kv_blocks_total", 0))
        return pb.ServerInfo(num_requests_running=int(s.get("num_requests_running", 0)),
                             num_requests_waiting=int(s.get("num_requests_waiting", 0)),
                             kv_blocks_used=total - int(s.get("kv_blocks_free", total)), kv_blocks_total=total,
                             uptime_s=float(s["uptime_s"]), num_preemptions=int(s.get("num_preemptions", 0)),
                             prefix_cache_queries=int(s.get("prefix_cache_queries", 0)),
                             prefix_cache_hits=int(s.get("prefix_cache_hits", 0)),
                             num_open_streams=int(s["num_open_streams"]))

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        if self.engine.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "text: this model has no tokenizer")
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = self.engine.tokenizer.encode(request.text, add_special_tokens=add_special)
        return pb.TokenizeResponse(token_ids=ids, count=len(ids),
                                   max_model_len=int(self.engine.model_info.get("max_model_len", 0)))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer KEY`` on jaxllm.v1 calls (health and reflection stay open)."""

    _OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self, api_key: str):
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._OPEN_PREFIXES):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(given).encode(), self._expected):
            return handler

        async def deny_unary(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key "
                                "(send metadata 'authorization: Bearer <key>')")

        async def deny_stream(request, context):
            await deny_unary(request, context)
            yield  # pragma: no cover  (makes this an async generator)

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny_unary, handler.request_deserializer,
                                                   handler.response_serializer)


class GrpcServer:
    """The gRPC server: JaxLLM service + health + reflection, on one port.

    Call :meth:`start` inside the running event loop (after ``engine.start()``).
    """

    def __init__(self, engine: AsyncEngine, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, ssl_certfile: str | None = None, ssl_keyfile: str | None = None):
        self.engine = engine
        self.host, self.requested_port = host, port
        self.api_key = api_key
        self.ssl_certfile, self.ssl_keyfile = ssl_certfile, ssl_keyfile
        if (ssl_certfile is None) != (ssl_keyfile is None):
            raise ValueError("ssl_certfile: --ssl-certfile and --ssl-keyfile must be given together")
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port: int = 0

    async def start(self) -> int:
        interceptors = [ApiKeyInterceptor(self.api_key)] if self.api_key else []
        # Large streams: do not cap concurrent streams below what the engine can hold.
        self.server = grpc.aio.server(interceptors=interceptors,
                                      options=[("grpc.max_concurrent_streams", 4096),
                                               ("grpc.so_reuseport", 0)])
        pb_grpc.add_JaxLLMServicer_to_server(JaxLLMServicer(self.engine), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"{self.host}:{self.requested_port}"
        if self.ssl_certfile:
            with open(self.ssl_keyfile, "rb") as f:
                key = f.read()
            with open(self.ssl_certfile, "rb") as f:
                cert = f.read()
            self.port = self.server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind gRPC server to {address}")
        await self.server.start()
        await self.set_serving(True)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = 1.0) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)
