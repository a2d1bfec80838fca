"""A small Python client for the jaxllm gRPC service (sync and streaming).

    from jaxllm.client import JaxLLMClient
    with JaxLLMClient("127.0.0.1:50051") as client:
        print(client.generate("Hello", max_tokens=16, temperature=0.0).text)
        for chunk in client.generate_stream("Hello", max_tokens=16):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxllm._proto import jaxllm_pb2 as pb
from jaxllm._proto import jaxllm_pb2_grpc as pb_grpc

FINISH_REASONS = {pb.FINISH_REASON_UNSPECIFIED: None, pb.FINISH_REASON_STOP: "stop",
                  pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


@dataclass
class Completion:
    """One finished completion, assembled from its stream of chunks."""
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def sampling_params_proto(**kw: Any) -> pb.SamplingParams:
    """Keyword arguments named like SamplingParams' fields → proto (``stop`` may be a str)."""
    if isinstance(kw.get("stop"), str):
        kw["stop"] = [kw["stop"]]
    kw = {k: v for k, v in kw.items() if v is not None}
    try:
        return pb.SamplingParams(**kw)
    except ValueError as e:  # unknown field name
        raise ValueError(f"sampling params: {e}") from None


class JaxLLMClient:
    """Blocking client. ``target`` is "host:port"; pass ``root_certificates`` (PEM) for TLS."""

    def __init__(self, target: str, *, api_key: str | None = None, root_certificates: bytes | None = None,
                 timeout: float | None = None):
        if root_certificates is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates))
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.JaxLLMStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout

    def __enter__(self) -> "JaxLLMClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _request(self, prompt: str | list[int], request_id: str, priority: int, **sampling) -> pb.GenerateRequest:
        req = pb.GenerateRequest(request_id=request_id, priority=priority,
                                 sampling_params=sampling_params_proto(**sampling))
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(prompt)
        return req

    def generate_stream(self, prompt: str | list[int], *, request_id: str = "", priority: int = 0,
                        timeout: float | None = None, **sampling: Any) -> Iterator[pb.GenerateResponse]:
        """Yield GenerateResponse chunks; closing the iterator early cancels (aborts) the request."""
        call = self.stub.Generate(self._request(prompt, request_id, priority, **sampling),
                                  timeout=timeout or self.timeout, metadata=self.metadata)
        try:
            yield from call
        finally:
            call.cancel()

    def generate(self, prompt: str | list[int], **kw: Any) -> Completion:
        """Run one request to completion (n=1); see :meth:`generate_n` for n > 1."""
        return self.generate_n(prompt, **kw)[0]

    def generate_n(self, prompt: str | list[int], **kw: Any) -> list[Completion]:
        comps: dict[int, Completion] = {}
        for chunk in self.generate_stream(prompt, **kw):
            c = comps.setdefault(chunk.index, Completion(index=chunk.index))
            c.token_ids.extend(chunk.token_ids)
            c.text += chunk.text
            c.logprobs.extend({t.token_id: t.logprob for t in p.top} | {p.sampled.token_id: p.sampled.logprob}
                              for p in chunk.logprobs)
            c.prompt_tokens, c.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
            c.cached_tokens = chunk.cached_tokens
            if chunk.finish_reason:
                c.finish_reason = FINISH_REASONS[chunk.finish_reason]
                c.stop_reason = chunk.stop_reason
        return [comps[i] for i in sorted(comps)]

    def abort(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.stub.Abort(pb.AbortRequest(request_ids=ids), timeout=self.timeout, metadata=self.metadata)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def server_info(self) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def tokenize(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        req = pb.TokenizeRequest(text=text)
        if add_special_tokens is not None:
            req.add_special_tokens = add_special_tokens
        return list(self.stub.Tokenize(req, timeout=self.timeout, metadata=self.metadata).token_ids)

    def health(self, service: str = "") -> str:
        """"SERVING" / "NOT_SERVING" (grpc.health.v1)."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def generate_via_server(args) -> int:
    """``jaxllm generate --server HOST:PORT``: send the prompts to a running server over gRPC.

    Takes the generate subcommand's parsed flags (prompts, --prompts-file, sampling flags, --stream,
    --json); ``--api-key`` is read from the ``JAXLLM_API_KEY`` environment variable or ``args.api_key``.
    """
    import json
    import os
    import sys

    from jaxllm.entrypoints.cli import _read_prompts, sampling_params_from

    if getattr(args, "chat", False):
        print("jaxllm generate: error: --chat is not available with --server; use the server's "
              "/v1/chat/completions", file=sys.stderr)
        return 2
    items = _read_prompts(args)
    params = [sampling_params_from(args, ov) for _, ov in items]  # validates before anything is sent
    fields = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
              "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens",
              "logprobs", "skip_special_tokens", "include_stop_str_in_output")
    api_key = getattr(args, "api_key", None) or os.environ.get("JAXLLM_API_KEY")
    stream = getattr(args, "stream", False) and not getattr(args, "json", False)
    try:
        with JaxLLMClient(args.server, api_key=api_key) as client:
            for i, ((prompt, _), sp) in enumerate(zip(items, params)):
                kw = {f: getattr(sp, f) for f in fields}
                if stream:
                    for chunk in client.generate_stream(prompt, **kw):
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
                    sys.stdout.write("\n")
                    continue
                comps = client.generate_n(prompt, **kw)
                if getattr(args, "json", False):
                    print(json.dumps({"prompt": prompt if isinstance(prompt, str) else None,
                                      "outputs": [{"index": c.index, "text": c.text, "token_ids": c.token_ids,
                                                   "finish_reason": c.finish_reason} for c in comps]}))
                else:
                    for c in comps:
                        print(c.text)
    except grpc.RpcError as e:
        print(f"jaxllm generate: server error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0
