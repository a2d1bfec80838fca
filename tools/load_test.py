"""Closed-loop load test of a jaxllm gRPC server: sustained requests/s, TTFT and latency percentiles.

    # against a running server
    python tools/load_test.py --target 127.0.0.1:50051 --num-requests 500 --concurrency 32
    # or start `jaxllm serve` in a subprocess first (engine flags after --); --api both: gRPC then HTTP
    python tools/load_test.py --model /path/to/ckpt --api both -- --max-num-seqs 32 --max-model-len 256

Each of ``--concurrency`` workers sends streaming Generate requests back to back (greedy,
``ignore_eos`` so every request makes exactly ``--max-tokens`` tokens). TTFT is measured at the
client: from sending the request to receiving the first chunk with tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxllm._proto import jaxllm_pb2 as pb  # noqa: E402
from jaxllm._proto import jaxllm_pb2_grpc as pb_grpc  # noqa: E402


async def _grpc_chunks(stub, ids: list[int], max_tokens: int):
    """Yield the number of new tokens of each streamed chunk (gRPC Generate)."""
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling_params=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    async for chunk in stub.Generate(req):
        yield len(chunk.token_ids)


async def _http_chunks(http, ids: list[int], max_tokens: int):
    """Yield the number of new tokens of each streamed SSE chunk (OpenAI /v1/completions).

    ``logprobs: 0`` makes each chunk list its tokens, so tokens are counted exactly.
    """
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "logprobs": 0}
    async with http.post("/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:  # one SSE line at a time
            line = raw.decode().strip()
            if line.startswith("data: {"):
                obj = json.loads(line[6:])
                if obj.get("choices") and obj["choices"][0]["logprobs"]:
                    yield len(obj["choices"][0]["logprobs"]["tokens"])


async def run_load(target: str, num_requests: int, concurrency: int, prompt_len: int, max_tokens: int,
                   vocab: int, warmup: int, seed: int, http_url: str | None = None) -> dict:
    import aiohttp  # the client side must not be the bottleneck: httpx tops out far lower

    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_concurrent_streams", 4096)]) as ch, \
            aiohttp.ClientSession(base_url=http_url or "http://unused", timeout=aiohttp.ClientTimeout(120),
                                  connector=aiohttp.TCPConnector(limit=concurrency + warmup)) as http:
        stub = pb_grpc.JaxLLMStub(ch)
        vocab = vocab or (await stub.GetModelInfo(pb.GetModelInfoRequest())).vocab_size
        ttft, e2e, itl, ntok = [], [], [], []
        queue = list(range(num_requests + warmup))

        async def one(i: int) -> None:
            ids = [rng.randrange(3, min(vocab, 300)) for _ in range(prompt_len)]
            chunks = _http_chunks(http, ids, max_tokens) if http_url else _grpc_chunks(stub, ids, max_tokens)
            t0 = time.perf_counter()
            first = last = None
            gaps, n = [], 0
            async for k in chunks:
                now = time.perf_counter()
                if k:
                    if first is None:
                        first = now
                    else:
                        gaps.append((now - last) / k)
                    last = now
                    n += k
            if i >= warmup:
                ttft.append(first - t0)
                e2e.append(time.perf_counter() - t0)
                itl.extend(gaps)
                ntok.append(n)

        async def worker() -> None:
            while queue:
                await one(queue.pop(0))

        # Warm-up requests first (not measured), then the timed run.
        t_start = None
        if warmup:
            wq, queue[:] = queue[:warmup], queue[warmup:]
            await asyncio.gather(*[one(i) for i in wq])
        t_start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - t_start

    def pct(xs, q):
        return float(np.percentile(xs, q)) * 1000 if xs else float("nan")

    return {"api": "http" if http_url else "grpc", "requests": len(e2e), "concurrency": concurrency, "prompt_len": prompt_len, "max_tokens": max_tokens,
            "elapsed_s": round(elapsed, 2), "requests_per_s": round(len(e2e) / elapsed, 2),
            "output_tokens_per_s": round(sum(ntok) / elapsed, 1),
            "ttft_ms_p50": round(pct(ttft, 50), 1), "ttft_ms_p99": round(pct(ttft, 99), 1),
            "e2e_ms_p50": round(pct(e2e, 50), 1), "e2e_ms_p99": round(pct(e2e, 99), 1),
            "itl_ms_p50": round(pct(itl, 50), 2), "itl_ms_p99": round(pct(itl, 99), 2)}


def start_server(model: str, engine_args: list[str]) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "jaxllm.entrypoints.serve", "--model", model, "--grpc-port", "0",
           "--http-port", "0", *engine_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("jaxllm serve ready:"):
            ports = dict(kv.split("=") for kv in line.split(":", 1)[1].split())
            return proc, f"127.0.0.1:{ports['grpc']}", f"http://127.0.0.1:{ports['http']}"
    raise RuntimeError(f"server exited with {proc.wait()}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="HOST:PORT of a running gRPC server")
    p.add_argument("--model", help="start `jaxllm serve --model MODEL` in a subprocess instead")
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--vocab", type=int, default=0, help="sample prompt ids below this (default: model's)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api", choices=["grpc", "http", "both"], default="grpc",
                   help="which API to load (http needs --http-url with --target)")
    p.add_argument("--http-url", help="base URL of the HTTP server (with --target)")
    p.add_argument("engine_args", nargs="*", help="extra `jaxllm serve` flags (after --)")
    args = p.parse_args()
    if bool(args.target) == bool(args.model):
        p.error("give exactly one of --target and --model")
    proc = None
    target, http_url = args.target, args.http_url
    if args.model:
        proc, target, http_url = start_server(args.model, args.engine_args)
    apis = ["grpc", "http"] if args.api == "both" else [args.api]
    if "http" in apis and not http_url:
        p.error("--api http needs --http-url (or --model)")
    try:
        for api in apis:
            result = asyncio.run(run_load(target, args.num_requests, args.concurrency, args.prompt_len,
                                          args.max_tokens, args.vocab, args.warmup, args.seed,
                                          http_url if api == "http" else None))
            print(json.dumps(result, indent=2), flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
