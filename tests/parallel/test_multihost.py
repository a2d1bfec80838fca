"""Multi-host execution: 2 processes x 4 CPU devices, tp=8 over the 8 global devices.

Process 0 leads (scheduler, tokenizer, outputs); process 1 runs the same programs from the
broadcast inputs. Greedy outputs (prefill chunks, penalties, prompt logprobs, multi-step decode)
must match a single-process tp=1 run by the check_logprobs_close rule, and both processes exit 0.
Every process is a fresh interpreter (jax reads the device count and joins the job at start-up):
see multihost_worker.py.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import make_tiny_checkpoint
from tests.utils import check_logprobs_close

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], log_path: str) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, WORKER, *args], stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait_all(procs: dict[str, tuple[subprocess.Popen, str]]) -> dict[str, int]:
    """Wait for every process (bounded); on timeout kill the ones still running and fail."""
    deadline = time.monotonic() + TIMEOUT_S
    codes = {}
    for name, (proc, _) in procs.items():
        try:
            codes[name] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p, _ in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
            pytest.fail(f"{name} did not finish within {TIMEOUT_S}s:\n" + _logs(procs))
    return codes


def _logs(procs) -> str:
    out = []
    for name, (_, path) in procs.items():
        with open(path) as f:
            lines = [ln for ln in f.read().splitlines() if "[Gloo]" not in ln and "Loading" not in ln]
        out.append(f"--- {name}\n" + "\n".join(lines[-40:]))
    return "\n".join(out)


def _seqs(result: dict, name: str = "seqs"):
    return [(ids, [{int(k): v for k, v in d.items()} for d in lps]) for ids, lps in result[name]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tp=1 reference and the 2-process tp=8 run, all three processes started at once."""
    tmp = tmp_path_factory.mktemp("multihost")
    # 8 query heads so tp=8 gives each device one; 2 kv heads (replicated up to one pair per device).
    ckpt = make_tiny_checkpoint("llama", str(tmp / "ckpt"), num_attention_heads=8, num_key_value_heads=2)
    port = str(_free_port())
    procs = {
        "reference": (_launch(["single", ckpt, str(tmp / "ref.json")], str(tmp / "ref.log")), str(tmp / "ref.log")),
        "process 1": (_launch(["multi", ckpt, str(tmp / "p1.json"), port, "1"], str(tmp / "p1.log")),
                      str(tmp / "p1.log")),
        "process 0": (_launch(["multi", ckpt, str(tmp / "p0.json"), port, "0"], str(tmp / "p0.log")),
                      str(tmp / "p0.log")),
    }
    codes = _wait_all(procs)
    logs = _logs(procs)
    with open(tmp / "p1.log") as f:
        follower_log = f.read()
    results = {}
    for name in ("ref", "p0"):
        path = tmp / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.exists() else None
    return codes, results, follower_log, logs, tmp


def test_both_processes_exit_zero(runs):
    codes, results, follower_log, logs, tmp = runs
    assert codes == {"reference": 0, "process 1": 0, "process 0": 0}, logs
    # Only the leader produces outputs; the follower never reaches generate() (LLM() exits it).
    assert results["p0"] is not None and not (tmp / "p1.json").exists(), logs


def test_outputs_match_single_process_tp1(runs):
    codes, results, _, logs, _ = runs
    ref, multi = results["ref"], results["p0"]
    assert ref is not None and multi is not None, logs
    lengths = [len(ids) for ids, _ in ref["seqs"]]
    assert lengths == [12, 12, 4, 12, 9]
    assert [len(ids) for ids, _ in multi["seqs"]] == lengths
    check_logprobs_close(_seqs(ref), _seqs(multi), "tp=1 single process", "tp=8 over 2 processes")
    # The same workload again: prefix-cache hits now (full blocks reused across processes' KV shards).
    assert multi["stats"]["prefix_cache_hits"] > 0
    check_logprobs_close(_seqs(ref), _seqs(multi, "seqs_warm"), "tp=1", "tp=8 over 2 processes, 2nd run")
    # Prompt logprobs (the "lp" program, fed by the step's global hidden states) agree closely.
    ref_plp, multi_plp = ref["prompt_logprobs"][1], multi["prompt_logprobs"][1]
    assert ref_plp[0] is None and multi_plp[0] is None and len(ref_plp) == len(multi_plp) > 1
    for a, b in zip(ref_plp[1:], multi_plp[1:]):
        common = sorted(set(a) & set(b))
        assert len(common) >= 3, (a, b)
        np.testing.assert_allclose([a[k] for k in common], [b[k] for k in common], atol=1e-4)


def test_follower_mirrored_every_program_and_state_is_sharded(runs):
    _, results, follower_log, logs, _ = runs
    multi = results["p0"]
    assert multi is not None, logs
    n = multi["num_programs"]
    assert n > 0
    # The follower ran exactly the programs the leader ran, then stopped when told.
    assert f"process 1 stopped by the leader after {n} programs" in follower_log, logs
    # KV pages split over the 8 global devices on the combined kv-head axis; 4 are this process's.
    assert multi["kv_sharding"] == "P(None, None, 'model')"
    assert multi["kv_addressable_shards"] == 4
    # No compilation after warm-up, and every block returned.
    stats = multi["stats"]
    assert stats["num_compilations"] == multi["warm_compilations"]
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] > 0


# ---------------------------------------------------------------- in-process pieces (no jax job)
def test_initialize_validates_before_joining():
    from jaxllm.config import ParallelConfig
    from jaxllm.parallel.multihost import initialize

    initialize(ParallelConfig())  # one process: a no-op
    with pytest.raises(ValueError, match="coordinator_address"):
        initialize(ParallelConfig(num_processes=2, process_id=1))
    with pytest.raises(ValueError, match="process_id"):
        ParallelConfig(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2)


def test_pack_unpack_and_header_round_trip():
    from jaxllm.parallel.multihost import STOP, Multihost, _pack, _unpack
    from jaxllm.runner.buckets import Bucket

    rng = np.random.default_rng(1)
    leaves = [rng.integers(-5, 5, size=7).astype(np.int32), np.asarray(True),
              rng.standard_normal((3, 2)).astype(np.float32), np.zeros((4, 0), np.int32)]
    like = [np.zeros_like(x) for x in leaves]
    back = _unpack(_pack(leaves), like)
    assert [(b.shape, b.dtype) for b in back] == [(x.shape, x.dtype) for x in leaves]
    assert all(np.array_equal(a, b) for a, b in zip(leaves, back))
    with pytest.raises(RuntimeError, match="bytes"):
        _unpack(_pack(leaves[:1] * 300), like)
    assert _pack(leaves).nbytes == 1024 and _pack([np.zeros(300, np.int32)]).nbytes == 2048  # size classes
    for key in (("step", Bucket(16, 8)), ("decode", 8), ("lp", 16)):
        assert Multihost._decode(np.array([*Multihost._encode(key), 0], np.int32)) == key
    assert Multihost._decode(np.array([STOP, 0, 0, 0], np.int32)) is None


def test_follower_loop_needs_a_follower():
    from types import SimpleNamespace

    from jaxllm.parallel.multihost import follower_loop

    with pytest.raises(RuntimeError, match="follower"):
        follower_loop(SimpleNamespace(multihost=None))


def test_cli_flags_reach_the_engine_config():
    import argparse

    from jaxllm.config import EngineConfig
    from jaxllm.entrypoints.cli import add_engine_args, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_args(p)
    kw = engine_kwargs(p.parse_args(["--coordinator-address", "10.0.0.1:1234", "--num-processes", "2",
                                     "--process-id", "1", "-tp", "8"]))
    pc = EngineConfig.create("m", **kw).parallel_config
    assert (pc.coordinator_address, pc.num_processes, pc.process_id, pc.tensor_parallel_size) == \
        ("10.0.0.1:1234", 2, 1, 8)
    assert "num_processes" not in engine_kwargs(p.parse_args([]))  # single process: defaults untouched
