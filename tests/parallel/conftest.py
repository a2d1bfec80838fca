"""Tests of sharded execution run on 8 simulated CPU devices.

XLA reads the flag when the CPU backend starts, so it only takes effect in a process where no test
has touched jax yet; tests that need several devices and find fewer run their body in a fresh
subprocess (see ``run_in_subprocess``).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
