"""Tensor parallelism on 8 simulated CPU devices (the body runs in a fresh process: see tp_check.py)."""

import os
import subprocess
import sys


def test_tensor_parallel_matches_tp1_and_shards_as_designed():
    script = os.path.join(os.path.dirname(__file__), "tp_check.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count(": ok") == 8
