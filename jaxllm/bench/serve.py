"""`jaxllm bench serve`: online serving benchmark against the OpenAI HTTP API (vLLM's metrics).

Each request is a streaming ``/v1/completions`` call whose prompt is ``--input-len`` random token
ids, with ``max_tokens=--output-len`` and ``ignore_eos``. Requests arrive as a Poisson process at
``--request-rate`` (``inf``: all at once; ``--burstiness`` shapes the gamma-distributed gaps as in
vLLM), optionally capped at ``--max-concurrency`` in flight. Per request, at the client:

* TTFT: send → first streamed chunk with a choice;
* ITL: the gaps between successive chunks;
* TPOT: ``(E2EL - TTFT) / (output_tokens - 1)`` with output tokens from the final ``usage``;
* E2EL: send → end of stream.

Reported: request / output / total token throughput, mean, median, std and p99 of TTFT, TPOT, ITL,
E2EL, and goodput (requests/s meeting every ``--goodput`` SLO, e.g. ``ttft:500 tpot:50``).
``--sweep concurrency:1,4,16`` or ``--sweep rate:1,2,inf`` repeats the run per value; ``--plot``
draws throughput and latency against it. ``--launch`` serves ``--model`` in this process first
(engine flags as ``jaxllm serve``), which also makes ``--profile`` possible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from jaxllm.bench.results import maybe_profile, print_table, random_prompts, run_metadata, summarize, write_json

GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` → ``{"ttft": 0.5, "tpot": 0.05}`` (seconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"goodput: expected NAME:MS with NAME in {GOODPUT_METRICS}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput: {item!r}: {value!r} is not a number of milliseconds") from None
        if ms <= 0:
            raise ValueError(f"goodput: {item!r}: the SLO must be > 0 ms")
        slos[name] = ms / 1000
    return slos


def parse_sweep(spec: str | None) -> tuple[str, list[float]] | None:
    """``"concurrency:1,4,16"`` or ``"rate:1,2,inf"`` → (kind, values)."""
    if not spec:
        return None
    kind, sep, values = spec.partition(":")
    if not sep or kind not in ("concurrency", "rate"):
        raise ValueError(f"sweep: expected 'concurrency:N,N,...' or 'rate:R,R,...', got {spec!r}")
    try:
        vals = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"sweep: {spec!r} holds a value that is not a number") from None
    if not vals or any(v <= 0 for v in vals) or (kind == "concurrency" and any(
            math.isinf(v) or v != int(v) for v in vals)):
        raise ValueError(f"sweep: values must be > 0 (whole numbers for concurrency), got {spec!r}")
    return kind, vals


async def send_request(client, url: str, model: str | None, prompt: list[int], output_len: int,
                       api_key: str | None = None) -> RequestResult:
    """One streaming completion; returns its client-side timings."""
    payload = {"prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}}
    if model:
        payload["model"] = model
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    res = RequestResult(prompt_len=len(prompt))
    chunks = 0
    st = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"])[:200]
                    return res
                if obj.get("usage"):
                    res.output_tokens = int(obj["usage"]["completion_tokens"])
                if obj.get("choices"):
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - st
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
        res.latency = time.perf_counter() - st
        res.output_tokens = res.output_tokens or chunks
        res.success = chunks > 0
        if not res.success:
            res.error = "no tokens streamed"
    except Exception as e:  # connection errors count as failed requests, as in vLLM
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _arrivals(n: int, rate: float, burstiness: float, rng: np.random.Generator):
    """Yield 0..n-1 at Poisson (gamma, if burstiness != 1) arrival times; all at once if rate is inf."""
    for i in range(n):
        yield i
        if math.isinf(rate) or i == n - 1:
            continue
        await asyncio.sleep(float(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness))))


async def benchmark(base_url: str, model: str | None, prompts: list[list[int]], output_len: int, *,
                    request_rate: float = math.inf, max_concurrency: int | None = None, burstiness: float = 1.0,
                    goodput: dict[str, float] | None = None, seed: int = 0, num_warmups: int = 1,
                    api_key: str | None = None, disable_tqdm: bool = False) -> dict:
    """Run one load level and return vLLM's serving metrics (times in ms)."""
    import httpx

    if request_rate <= 0:
        raise ValueError(f"request_rate: must be > 0 (inf for all at once), got {request_rate}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
    if burstiness <= 0:
        raise ValueError(f"burstiness: must be > 0, got {burstiness}")
    url = base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        for _ in range(num_warmups):
            warm = await send_request(client, url, model, prompts[0], min(output_len, 4), api_key)
            if not warm.success:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        in_flight = peak = 0
        bar = tqdm(total=len(prompts), desc="Requests", disable=disable_tqdm, dynamic_ncols=True)

        async def one(p: list[int]) -> RequestResult:
            nonlocal in_flight, peak
            if sem is not None:
                await sem.acquire()
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await send_request(client, url, model, p, output_len, api_key)
            finally:
                in_flight -= 1
                if sem is not None:
                    sem.release()
                bar.update(1)

        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        tasks = []
        async for i in _arrivals(len(prompts), request_rate, burstiness, rng):
            tasks.append(asyncio.create_task(one(prompts[i])))
        results: list[RequestResult] = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    return compute_metrics(results, duration, goodput or {}, request_rate=request_rate,
                           max_concurrency=max_concurrency, peak_concurrency=peak)


def _meets(r: RequestResult, name: str, slo_s: float) -> bool:
    value = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.latency}[name]
    return value is None or value <= slo_s   # TPOT of a one-token request is undefined: not held against it


def compute_metrics(results: list[RequestResult], duration: float, goodput: dict[str, float], **extra) -> dict:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = sum(1 for r in ok if all(_meets(r, name, slo) for name, slo in goodput.items()))
    out = {
        **{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in extra.items()},
        "request_rate_is_inf": math.isinf(extra.get("request_rate", 0.0)),
        "duration_s": duration,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.success})[:5],
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if goodput else None,
        "goodput_slos_ms": {k: v * 1000 for k, v in goodput.items()},
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        **summarize([r.ttft for r in ok], "ttft", (99,)),
        **summarize([r.tpot for r in ok if r.tpot is not None], "tpot", (99,)),
        **summarize([g for r in ok for g in r.itl], "itl", (99,)),
        **summarize([r.latency for r in ok], "e2el", (99,)),
    }
    return out


def _print(m: dict, label: str) -> None:
    rows = [("Load:", label), ("Successful requests:", m["completed"]), ("Failed requests:", m["failed"]),
            ("Benchmark duration (s):", m["duration_s"]), ("Total input tokens:", m["total_input_tokens"]),
            ("Total generated tokens:", m["total_output_tokens"]),
            ("Request throughput (req/s):", m["request_throughput"])]
    if m["request_goodput"] is not None:
        rows.append(("Request goodput (req/s):", m["request_goodput"]))
    rows += [("Output token throughput (tok/s):", m["output_throughput"]),
             ("Total token throughput (tok/s):", m["total_token_throughput"]),
             ("Peak concurrent requests:", m["peak_concurrency"])]
    for name in ("ttft", "tpot", "itl", "e2el"):
        rows += [(f"Mean {name.upper()} (ms):", m[f"{name}_mean_ms"]),
                 (f"Median {name.upper()} (ms):", m[f"{name}_median_ms"]),
                 (f"P99 {name.upper()} (ms):", m[f"{name}_p99_ms"])]
    print_table("Serving Benchmark Result", rows)


def _server_model(base_url: str, api_key: str | None) -> tuple[str | None, int | None]:
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    data = r.json()["data"][0]
    return data.get("id"), data.get("max_model_len")


def run_serve_bench(args: argparse.Namespace) -> dict:
    """Entry point of ``jaxllm bench serve`` (optionally launching the server in this process)."""
    goodput = parse_goodput(args.goodput)
    sweep = parse_sweep(args.sweep)
    for name in ("num_prompts", "input_len", "output_len", "vocab_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    if args.profile and not args.launch:
        raise ValueError("profile: needs --launch (the trace is taken in the process that runs the engine)")
    server = None
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    if args.launch:
        from jaxllm.config import EngineConfig
        from jaxllm.engine.llm_engine import LLMEngine
        from jaxllm.entrypoints.cli import engine_kwargs
        from jaxllm.entrypoints.serve import ServeOptions, ServerThread
        engine = LLMEngine(EngineConfig.create(args.model, **engine_kwargs(args)), progress=not args.disable_tqdm)
        server = ServerThread(engine, ServeOptions(grpc_port=None, http_port=0)).start()
        base_url = server.http_url
    try:
        name, max_len = _server_model(base_url, args.api_key)
        if max_len and args.input_len + args.output_len > max_len:
            raise ValueError(f"input_len: input_len + output_len = {args.input_len + args.output_len} exceeds "
                             f"the server's max_model_len={max_len}")
        model = args.served_model_name or name
        levels: list[tuple[float, int | None]]
        if sweep is None:
            levels = [(args.request_rate, args.max_concurrency)]
        elif sweep[0] == "concurrency":
            levels = [(args.request_rate, int(v)) for v in sweep[1]]
        else:
            levels = [(v, args.max_concurrency) for v in sweep[1]]
        runs = []
        with maybe_profile(args.profile):
            for k, (rate, conc) in enumerate(levels):
                prompts = random_prompts(args.num_prompts, args.input_len, args.vocab_size, args.seed, k)
                m = asyncio.run(benchmark(base_url, model, prompts, args.output_len, request_rate=rate,
                                          max_concurrency=conc, burstiness=args.burstiness, goodput=goodput,
                                          seed=args.seed + k, num_warmups=args.num_warmups,
                                          api_key=args.api_key, disable_tqdm=args.disable_tqdm))
                _print(m, f"rate={rate:g} req/s, max_concurrency={conc}")
                runs.append(m)
    finally:
        if server is not None:
            server.stop()
    result = {"bench": "serve", **run_metadata(args), "base_url": base_url, "model": model,
              "input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
              "sweep": {"kind": sweep[0], "values": sweep[1]} if sweep else None, "runs": runs}
    if len(runs) == 1:
        result.update(runs[0])
    if args.plot:
        from jaxllm.bench.plot import plot_sweep
        plot_sweep(result, args.plot)
    write_json(args.output_json, result)
    return result


def add_serve_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serve benchmark")
    g.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000, help="the server's --http-port")
    g.add_argument("--launch", action="store_true",
                   help="serve --model in this process first (engine flags as `jaxllm serve`)")
    g.add_argument("--served-model-name", default=None, help="model name to send (default: the server's)")
    g.add_argument("--api-key", default=None)
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--input-len", type=int, default=1024)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--vocab-size", type=int, default=32000,
                   help="random prompt ids are drawn from [10, vocab-size): at most the model's vocabulary")
    g.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1: Poisson)")
    g.add_argument("--max-concurrency", type=int, default=None)
    g.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2el)")
    g.add_argument("--sweep", default=None, metavar="KIND:V,V,...",
                   help="repeat per value: concurrency:1,4,16 or rate:1,2,inf")
    g.add_argument("--num-warmups", type=int, default=1, help="unmeasured requests sent first")
