"""Serving end to end with the real LLMEngine and a tiny random Llama (CPU, loopback only).

One engine is built per module; expected outputs come from stepping that same engine directly
before the servers take it over, so "the server returns what the engine returns" is checked
token for token.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import openai
import pytest

from jaxllm._proto import jaxllm_pb2 as pb
from jaxllm.client import JaxLLMClient
from jaxllm.entrypoints.serve import ServeOptions, ServerThread
from jaxllm.sampling_params import SamplingParams

# Shared by the in-process engine and the `jaxllm serve` subprocess so the second start hits the
# persistent compilation cache.
ENGINE_KW = dict(max_num_seqs=16, max_model_len=256, num_kv_blocks=160, max_num_batched_tokens=64)
PROMPTS = ["Hello world", "The quick brown fox", "Paged attention stores", "1 2 3 4",
           "Continuous batching", "jumps over the lazy dog", "This is a tiny", "keys and values"]
MAX_TOKENS = 8


def run_direct(engine, prompt, params: SamplingParams):
    engine.add_request("direct", prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    return final


class FaultInjector:
    """The real engine, except that ``step`` raises once ``fail`` is set (the last test sets it)."""

    def __init__(self, engine):
        self._engine = engine
        self.fail = False
        self.step_delay_s = 0.0  # slows every step (so a deadline reliably expires mid-request)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self):
        if self.fail:
            raise RuntimeError("injected failure in the real engine's step")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        return self._engine.step()


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig.create(model=tiny_llama_dir, **ENGINE_KW), progress=False)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = {p: run_direct(engine, p, greedy).outputs[0].token_ids for p in PROMPTS}
    proxy = FaultInjector(engine)
    st = ServerThread(proxy, ServeOptions(grpc_port=0, http_port=0)).start()
    yield st, proxy, expected
    assert st.stop() == (1 if proxy.fail else 0)


@pytest.fixture(scope="module")
def client(served):
    with JaxLLMClient(served[0].grpc_target, timeout=60) as c:
        yield c


def wait_all_blocks_free(client, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        info = client.server_info()
        if info.kv_blocks_used == 0 and info.num_open_streams == 0 and info.num_requests_running == 0:
            return info
        assert time.monotonic() < deadline, f"blocks not freed: {info}"
        time.sleep(0.05)


def test_grpc_greedy_matches_engine(served, client):
    _, engine, expected = served
    for p in PROMPTS[:3]:
        chunks = list(client.generate_stream(p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                             logprobs=2))
        assert [t for c in chunks for t in c.token_ids] == expected[p]
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert chunks[-1].prompt_tokens == len(engine.tokenizer.encode(p))
        # greedy: the sampled token is the most likely one
        assert all(max(lp.top, key=lambda t: t.logprob).token_id == lp.sampled.token_id
                   for c in chunks for lp in c.logprobs)
    ids = engine.tokenizer.encode(PROMPTS[3])
    assert client.generate(ids, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True).token_ids == \
        expected[PROMPTS[3]]


def test_openai_completion_and_chat(served):
    st, engine, expected = served
    oai = openai.OpenAI(base_url=st.http_url + "/v1", api_key="x", max_retries=0, timeout=60)
    model = oai.models.list().data[0].id
    r = oai.completions.create(model=model, prompt=PROMPTS[4], max_tokens=MAX_TOKENS, temperature=0.0,
                               extra_body={"ignore_eos": True})
    assert r.choices[0].text == engine.tokenizer.decode(expected[PROMPTS[4]])
    assert r.usage.completion_tokens == MAX_TOKENS
    streamed = list(oai.completions.create(model=model, prompt=PROMPTS[4], max_tokens=MAX_TOKENS,
                                           temperature=0.0, stream=True, extra_body={"ignore_eos": True},
                                           stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    assert streamed[-1].usage.completion_tokens == MAX_TOKENS
    chat = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=4, temperature=0.0)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as ei:
        oai.completions.create(model=model, prompt="x", max_tokens=300)
    assert "max_tokens" in ei.value.body["message"]


def test_n_completions_over_both_apis(served, client):
    st, engine, _ = served
    comps = client.generate_n(PROMPTS[2], n=2, max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)
    assert [c.index for c in comps] == [0, 1]
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in comps)
    assert all(c.text == engine.tokenizer.decode(c.token_ids) for c in comps)
    oai = openai.OpenAI(base_url=st.http_url + "/v1", api_key="x", max_retries=0, timeout=60)
    model = oai.models.list().data[0].id
    r = oai.completions.create(model=model, prompt=[PROMPTS[2], PROMPTS[3]], n=2, max_tokens=5, seed=7,
                               extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3] and r.usage.completion_tokens == 20
    # same seed, same prompt → same samples as over gRPC (seeds are per request: seed + i)
    assert [c.text for c in r.choices if c.index < 2] == [c.text for c in comps]


def test_echo_logprobs_scores_the_prompt(served):
    st, engine, _ = served
    oai = openai.OpenAI(base_url=st.http_url + "/v1", api_key="x", max_retries=0, timeout=60)
    model = oai.models.list().data[0].id
    r = oai.completions.create(model=model, prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    n_prompt = len(engine.tokenizer.encode(PROMPTS[1]))
    assert r.choices[0].text.endswith(PROMPTS[1]) and len(lp.tokens) == n_prompt
    assert lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0.0 for x in lp.token_logprobs[1:]), lp.token_logprobs


def test_cancel_and_deadline_free_every_block(served, client):
    it = client.generate_stream(PROMPTS[0], max_tokens=200, ignore_eos=True)
    next(it)
    it.close()
    wait_all_blocks_free(client)
    proxy = served[1]
    proxy.step_delay_s = 0.05  # 200 tokens take >= 25 steps (8 per dispatch): well past the deadline
    try:
        with pytest.raises(grpc.RpcError) as ei:
            list(client.generate_stream(PROMPTS[1], max_tokens=200, ignore_eos=True, timeout=0.3))
    finally:
        proxy.step_delay_s = 0.0
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = wait_all_blocks_free(client)
    assert info.kv_blocks_total > 0


def test_200_concurrent_streaming_clients(served, client):
    _, _, expected = served
    results, errors = {}, []

    def worker(i):
        p = PROMPTS[i % len(PROMPTS)]
        try:
            toks = [t for c in client.generate_stream(p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
                    for t in c.token_ids]
            results[i] = toks == expected[p]
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(200)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - t0
    assert not errors, errors[:3]
    assert len(results) == 200 and all(results.values()), sum(not v for v in results.values())
    assert elapsed < 120
    wait_all_blocks_free(client)


def test_zz_engine_step_failure_ends_streams_and_exits_1(served, client):
    """Runs last in the module: it takes the module's server down."""
    st, proxy, _ = served
    it = client.generate_stream(PROMPTS[0], max_tokens=240, ignore_eos=True)
    next(it)
    proxy.fail = True
    with pytest.raises(grpc.RpcError) as ei:
        list(it)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "injected failure" in ei.value.details()
    assert st.wait(30) == 1


@pytest.mark.slow
def test_jaxllm_serve_subprocess_sigterm_drains(tiny_llama_dir):
    # --shutdown-timeout 0: the tiny model would finish any request within a short grace period, so the
    # in-flight one is aborted at once (the grace period itself is tested with the fake engine).
    cmd = [sys.executable, "-m", "jaxllm.entrypoints.cli", "serve", "--model", tiny_llama_dir,
           "--grpc-port", "0", "--http-port", "0", "--shutdown-timeout", "0", "--api-key", "topsecret"]
    for k, v in ENGINE_KW.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        ports = None
        deadline = time.monotonic() + 300
        while ports is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, "".join(log)
                continue
            log.append(line)
            if line.startswith("jaxllm serve ready:"):
                ports = dict(kv.split("=") for kv in line.split(":", 1)[1].split())
        assert ports, "".join(log)
        with JaxLLMClient(f"127.0.0.1:{ports['grpc']}", api_key="topsecret", timeout=60) as c:
            long = c.generate_stream(PROMPTS[0], max_tokens=240, ignore_eos=True)
            first = next(long)
            proc.send_signal(signal.SIGTERM)
            rest = list(long)
            assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
            assert first.completion_tokens <= rest[-1].completion_tokens < 240
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    while not lines.empty():
        log.append(lines.get())
    text = "".join(log)
    assert "topsecret" not in text  # the key is never logged
    assert "non-default settings" in text and "'api_key': '***'" in text
