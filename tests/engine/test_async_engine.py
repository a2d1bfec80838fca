"""AsyncEngine over the fake engine: ordering, one engine thread, backpressure, aborts, failure, drain."""

from __future__ import annotations

import asyncio
import threading

import pytest

from jaxllm.engine.async_engine import (AsyncEngine, EngineDeadError, EngineDrainingError, QueueFullError)
from jaxllm.sampling_params import SamplingParams
from tests.entrypoints.serving_fakes import FakeEngine, expected_tokens


def run(coro_fn, engine: FakeEngine, **kw):
    """Start an AsyncEngine on a fresh loop, run ``coro_fn(async_engine)``, shut it down."""
    async def main():
        ae = AsyncEngine(engine, idle_poll_s=0.05, **kw)
        ae.start()
        try:
            return await asyncio.wait_for(coro_fn(ae), timeout=30)
        finally:
            await ae.shutdown()
    return asyncio.run(main())


async def collect(ae, rid, prompt, params):
    outs = [o async for o in ae.generate(rid, prompt, params)]
    return outs


def test_stream_matches_model_and_engine_runs_on_one_thread():
    engine = FakeEngine()

    async def body(ae):
        return await collect(ae, "a", [5, 6, 7], SamplingParams(max_tokens=6, temperature=0.0))

    outs = run(body, engine)
    assert [t for o in outs for t in o.outputs[0].delta_token_ids] == expected_tokens([5, 6, 7], 6)
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert not any(o.finished for o in outs[:-1])
    assert len(engine.thread_ids) == 1 and threading.get_ident() not in engine.thread_ids


def test_many_concurrent_requests_each_get_their_own_output():
    engine = FakeEngine(max_num_seqs=4)
    prompts = [[3 + i % 7, 4 + i % 5] for i in range(40)]

    async def body(ae):
        return await asyncio.gather(*[collect(ae, f"r{i}", p, SamplingParams(max_tokens=3 + i % 4))
                                      for i, p in enumerate(prompts)])

    results = run(body, engine)
    for i, (p, outs) in enumerate(zip(prompts, results)):
        assert outs[-1].outputs[0].token_ids == expected_tokens(p, 3 + i % 4)


def test_invalid_request_raises_value_error_and_engine_keeps_serving():
    engine = FakeEngine(max_model_len=16)

    async def body(ae):
        with pytest.raises(ValueError, match="prompt"):
            await ae.add_request("bad", list(range(3, 15)), SamplingParams(max_tokens=8))
        engine.gate.clear()  # keep "dup" running while the second one arrives
        s = await ae.add_request("dup", [3], SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match="request_id"):
            await ae.add_request("dup", [3], SamplingParams(max_tokens=2))
        ae.release(s)
        engine.gate.set()
        return await collect(ae, "good", [3, 4], SamplingParams(max_tokens=2))

    outs = run(body, engine)
    assert outs[-1].outputs[0].token_ids == expected_tokens([3, 4], 2)


def test_queue_full_refuses_then_recovers():
    engine = FakeEngine()
    engine.gate.clear()  # the engine thread blocks in step(): nothing gets a first token

    async def body(ae):
        # Requests are accepted between steps: submit as tasks while the engine is stuck.
        t1 = asyncio.create_task(ae.add_request("q1", [3], SamplingParams(max_tokens=2)))
        t2 = asyncio.create_task(ae.add_request("q2", [4], SamplingParams(max_tokens=2)))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError, match="max_queued_requests=2"):
            await ae.add_request("q3", [5], SamplingParams(max_tokens=2))
        engine.gate.set()
        s1, s2 = await t1, await t2
        outs = [[o async for o in s] for s in (s1, s2)]
        s3 = await ae.add_request("q3", [5], SamplingParams(max_tokens=2))  # room again
        outs.append([o async for o in s3])
        return outs

    outs = run(body, engine, max_queued_requests=2)
    assert [o[-1].outputs[0].token_ids for o in outs] == [expected_tokens([p], 2) for p in (3, 4, 5)]


def test_consumer_leaving_aborts_and_frees_blocks():
    engine = FakeEngine(step_delay=0.01)

    async def body(ae):
        async for out in ae.generate("leave", [3, 4, 5], SamplingParams(max_tokens=50)):
            break  # client went away after the first chunk
        for _ in range(200):
            await asyncio.sleep(0.01)
            st = ae.get_stats()
            if "leave" in engine.aborted and st["kv_blocks_free"] == st["kv_blocks_total"]:
                return st
        raise AssertionError(f"request not aborted: {ae.get_stats()}")

    st = run(body, engine)
    assert st["num_open_streams"] == 0 and st["num_requests_running"] == 0


def test_server_side_abort_ends_stream_with_abort():
    engine = FakeEngine(step_delay=0.01)

    async def body(ae):
        stream = await ae.add_request("x", [3], SamplingParams(max_tokens=50))
        first = await stream.__anext__()
        ae.abort("x")
        return first, [o async for o in stream]

    first, rest = run(body, engine)
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert len(rest[-1].outputs[0].token_ids) >= len(first.outputs[0].token_ids) >= 1
    assert "x" in engine.aborted


def test_engine_failure_ends_every_stream_and_refuses_new_requests():
    engine = FakeEngine(step_delay=0.005)
    dead = []

    async def body(ae):
        ae.add_dead_callback(dead.append)
        streams = [await ae.add_request(f"f{i}", [3 + i], SamplingParams(max_tokens=50)) for i in range(3)]
        engine.fail_at_step = engine.num_steps + 1  # inject: the next step raises
        errors = []
        for s in streams:
            with pytest.raises(EngineDeadError, match="injected failure") as ei:
                async for _ in s:
                    pass
            errors.append(ei.value)
        with pytest.raises(EngineDeadError):
            await ae.add_request("late", [3], SamplingParams(max_tokens=2))
        return errors

    run(body, engine)
    assert len(dead) == 1 and "RuntimeError" in str(dead[0])


def test_drain_lets_short_requests_finish_and_aborts_long_ones():
    engine = FakeEngine(step_delay=0.02)

    async def body(ae):
        short = await ae.add_request("short", [3], SamplingParams(max_tokens=2))
        long = await ae.add_request("long", [4], SamplingParams(max_tokens=60))
        drain = asyncio.create_task(ae.drain(timeout_s=0.3))
        await asyncio.sleep(0.01)
        with pytest.raises(EngineDrainingError):
            await ae.add_request("new", [5], SamplingParams(max_tokens=2))
        outs = [[o async for o in s] for s in (short, long)]
        return outs, await drain

    (short, long), num_aborted = run(body, engine)
    assert short[-1].outputs[0].finish_reason == "length"
    assert long[-1].outputs[0].finish_reason == "abort" and num_aborted == 1
    assert 1 <= len(long[-1].outputs[0].token_ids) < 60


def test_max_queued_requests_is_validated():
    with pytest.raises(ValueError, match="max_queued_requests"):
        AsyncEngine(FakeEngine(), max_queued_requests=0)


def test_cancel_while_waiting_for_acceptance_aborts_in_engine():
    engine = FakeEngine(step_delay=0.01)

    async def body(ae):
        busy = await ae.add_request("busy", [3], SamplingParams(max_tokens=20))  # engine thread is stepping
        task = asyncio.create_task(ae.add_request("late", [4], SamplingParams(max_tokens=50)))
        await asyncio.sleep(0)  # queued, not yet accepted
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        _ = [o async for o in busy]
        for _ in range(200):
            if not engine.has_unfinished_requests():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("cancelled request kept running")

    run(body, engine)
    assert "late" in engine.aborted
