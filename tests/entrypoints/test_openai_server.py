"""OpenAI-compatible HTTP API over the fake engine, driven by the official ``openai`` client."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from jaxllm.entrypoints.serve import ServeOptions, ServerThread
from tests.entrypoints.serving_fakes import FakeEngine, expected_tokens


@pytest.fixture(scope="module")
def server():
    st = ServerThread(FakeEngine(step_delay=0.002), ServeOptions(grpc_port=None, http_port=0)).start()
    yield st
    assert st.stop() == 0


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_and_health(oai, server):
    assert [m.id for m in oai.models.list().data] == ["fake-model"]
    assert httpx.get(server.http_url + "/health").status_code == 200


def test_completion_token_prompt_with_vllm_extras(oai, server):
    r = oai.completions.create(model="fake-model", prompt=[5, 6, 7], max_tokens=5, temperature=0.0,
                               extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.0, "seed": 3,
                                           "ignore_eos": True, "min_tokens": 1})
    tok = server.engine.tokenizer
    assert r.choices[0].text == tok.decode(expected_tokens([5, 6, 7], 5))
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 5, 8)


def test_batched_prompts_and_stop_token_ids(oai, server):
    tok = server.engine.tokenizer
    stop_at = expected_tokens(tok.encode("w1 w2"), 3)[2]
    r = oai.completions.create(model="fake-model", prompt=["w1 w2", "w3"], max_tokens=4,
                               extra_body={"stop_token_ids": [stop_at]})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == tok.decode(expected_tokens(tok.encode("w1 w2"), 3))
    assert r.usage.prompt_tokens == 3


def test_echo_with_logprobs_scores_the_prompt(oai, server):
    tok = server.engine.tokenizer
    r = oai.completions.create(model="fake-model", prompt="w1 w2 w3", max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["w1", "w2", "w3"] and r.choices[0].text.startswith("w1 w2 w3")
    assert lp.token_logprobs[0] is None and all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert lp.text_offset == [0, 2, 4]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 0)
    r2 = oai.completions.create(model="fake-model", prompt="w1 w2", max_tokens=2, echo=True, logprobs=2)
    assert len(r2.choices[0].logprobs.tokens) == 4 and len(r2.choices[0].logprobs.top_logprobs[2]) == 2
    assert r2.choices[0].text.replace(" ", "") == (
        "w1w2" + tok.decode(expected_tokens(tok.encode("w1 w2"), 2)).replace(" ", ""))


def test_streaming_completion_with_usage(oai, server):
    tok = server.engine.tokenizer
    chunks = list(oai.completions.create(model="fake-model", prompt="w4", max_tokens=4, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == tok.decode(expected_tokens(tok.encode("w4"), 4))
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_chat_completion_and_stream(oai, server):
    tok = server.engine.tokenizer
    msgs = [{"role": "user", "content": "w1 w2"}]
    ids = tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    r = oai.chat.completions.create(model="fake-model", messages=msgs, max_tokens=3, logprobs=True, top_logprobs=2)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(expected_tokens(ids, 3))
    assert len(r.choices[0].logprobs.content) == 3 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    assert r.usage.prompt_tokens == len(ids)
    stream = list(oai.chat.completions.create(model="fake-model", messages=msgs, max_tokens=3, stream=True,
                                              stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content
    assert stream[-1].usage.total_tokens == len(ids) + 3
    parts = [{"role": "user", "content": [{"type": "text", "text": "w1 "}, {"type": "text", "text": "w2"}]}]
    r2 = oai.chat.completions.create(model="fake-model", messages=parts, max_tokens=3)
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_raw_sse_ends_with_done(server):
    with httpx.stream("POST", server.http_url + "/v1/completions",
                      json={"prompt": "w1", "max_tokens": 2, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


@pytest.mark.parametrize("body, param", [({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p"),
                                         ({"max_tokens": "x"}, "max_tokens"), ({"n": 0}, "n"),
                                         ({"max_tokens": 1000}, "max_tokens")])
def test_bad_request_is_400_naming_the_field(oai, body, param):
    with pytest.raises(openai.BadRequestError) as ei:
        oai.completions.create(model="fake-model", prompt="w1", **{k: v for k, v in body.items()})
    err = ei.value.body
    assert ei.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert param in err["message"] and (err["param"] in (param, "prompt"))


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError) as ei:
        oai.completions.create(model="nope", prompt="w1", max_tokens=1)
    assert ei.value.body["param"] == "model"


def test_metrics_endpoint_counts_tokens(oai, server):
    oai.completions.create(model="fake-model", prompt=[3, 4], max_tokens=3)
    text = httpx.get(server.http_url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['jaxllm:generation_tokens_total{model_name="fake-model"}'] >= 3
    assert values['jaxllm:prompt_tokens_total{model_name="fake-model"}'] >= 2
    assert values['jaxllm:time_to_first_token_seconds_count{model_name="fake-model"}'] >= 1
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                 "request_queue_time_seconds_count"):
        assert f'jaxllm:{name}{{model_name="fake-model"}}' in values, name


def test_client_disconnect_aborts(server):
    engine = server.engine
    with httpx.stream("POST", server.http_url + "/v1/completions",
                      json={"prompt": [9], "max_tokens": 60, "stream": True, "request_id": "http-gone"}) as resp:
        next(resp.iter_lines())
    deadline = time.monotonic() + 10
    while "http-gone" not in engine.aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "http-gone" in engine.aborted


def test_401_429_503():
    engine = FakeEngine()
    st = ServerThread(engine, ServeOptions(grpc_port=None, http_port=0, api_key="k", max_queued_requests=1,
                                           shutdown_timeout=1.0)).start()
    try:
        anon = openai.OpenAI(base_url=st.http_url + "/v1", api_key="wrong", max_retries=0, timeout=10)
        with pytest.raises(openai.AuthenticationError) as ei:
            anon.models.list()
        assert ei.value.status_code == 401 and ei.value.body["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=st.http_url + "/v1", api_key="k", max_retries=0, timeout=10)
        engine.gate.clear()
        holder = threading.Thread(target=lambda: good.completions.create(model="fake-model", prompt="w1",
                                                                         max_tokens=2))
        holder.start()
        deadline = time.monotonic() + 5
        while not engine.waiting and not engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as ei:
            good.completions.create(model="fake-model", prompt="w2", max_tokens=2)
        assert ei.value.status_code == 429
        engine.gate.set()
        holder.join(10)
        # Drain: an in-flight stream keeps the server up; new work gets 503, the stream ends "abort".
        engine.step_delay = 0.05
        finals = []
        long = threading.Thread(target=lambda: finals.extend(
            c.choices[0].finish_reason for c in good.completions.create(
                model="fake-model", prompt="w3", max_tokens=60, stream=True) if c.choices))
        long.start()
        while not engine.running and time.monotonic() < deadline + 5:
            time.sleep(0.01)
        st.request_stop()
        deadline = time.monotonic() + 5
        while httpx.get(st.http_url + "/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.get(st.http_url + "/health").status_code == 503
        with pytest.raises(openai.APIStatusError) as ei:
            good.completions.create(model="fake-model", prompt="w2", max_tokens=2)
        assert ei.value.status_code == 503
        long.join(10)
        assert finals[-1] == "abort"
    finally:
        engine.gate.set()
        assert st.stop() == 0


def test_non_streaming_client_timeout_aborts(server):
    engine = server.engine
    engine.step_delay = 0.02  # 60 tokens take >= 1.2 s
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.http_url + "/v1/completions", timeout=0.3,
                       json={"prompt": [10], "max_tokens": 60, "request_id": "http-timeout"})
    finally:
        engine.step_delay = 0.002
    deadline = time.monotonic() + 10
    while "http-timeout" not in engine.aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "http-timeout" in engine.aborted


def test_engine_failure_503_and_health():
    import asyncio

    from jaxllm.engine.async_engine import AsyncEngine
    from jaxllm.entrypoints.openai_server import build_app

    async def body():
        engine = FakeEngine()
        ae = AsyncEngine(engine, idle_poll_s=0.05)
        ae.start()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(ae)), base_url="http://t") as http:
            assert (await http.get("/health")).status_code == 200
            engine.fail_at_step = 1
            r = await http.post("/v1/completions", json={"prompt": [3], "max_tokens": 5})
            assert r.status_code == 503 and "injected failure" in r.json()["error"]["message"]
            assert (await http.get("/health")).status_code == 503
            r = await http.post("/v1/completions", json={"prompt": [3], "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        await ae.shutdown()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_engine_failure_mid_stream_sends_error_event_and_exits_1():
    engine = FakeEngine(step_delay=0.005)
    st = ServerThread(engine, ServeOptions(grpc_port=None, http_port=0)).start()
    lines = []
    with httpx.stream("POST", st.http_url + "/v1/completions",
                      json={"prompt": [3], "max_tokens": 50, "stream": True}, timeout=20) as resp:
        for line in resp.iter_lines():
            if line:
                lines.append(line)
                if len(lines) == 1:
                    engine.fail_at_step = engine.num_steps + 1
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][6:])["error"]
    assert "injected failure" in err["message"] and err["type"] == "service_unavailable"
    assert st.wait(20) == 1
