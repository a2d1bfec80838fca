"""Chained block hashes: prefix-dependent, incremental, stable across processes."""

import pathlib
import subprocess
import sys

from jaxllm.core.hashing import ROOT_HASH, hash_block_tokens, update_block_hashes
from tests.core.helpers import make_request

_ROOT = str(pathlib.Path(__file__).resolve().parents[2])


def test_hash_depends_on_the_whole_prefix():
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8])
    b = make_request("b", [9, 2, 3, 4, 5, 6, 7, 8])
    ha, hb = update_block_hashes(a, 4), update_block_hashes(b, 4)
    assert len(ha) == 2 and ha[0] != hb[0]
    assert ha[1] != hb[1]  # same tokens in block 1, different parent
    assert ha[1] == hash_block_tokens(ha[0], [5, 6, 7, 8])


def test_incremental_update_covers_only_full_blocks():
    r = make_request("r", [1, 2, 3, 4, 5])
    assert len(update_block_hashes(r, 4)) == 1
    r.append_output_token_ids([6, 7])
    assert len(update_block_hashes(r, 4)) == 1
    r.append_output_token_ids([8])
    hashes = update_block_hashes(r, 4)
    fresh = make_request("f", list(range(1, 9)))
    assert hashes == update_block_hashes(fresh, 4)


def test_hash_is_stable_across_processes():
    code = ("from jaxllm.core.hashing import hash_block_tokens, ROOT_HASH;"
            "print(hash_block_tokens(ROOT_HASH, [1, 2, 3]))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PYTHONPATH": _ROOT}, cwd=_ROOT).stdout.strip()
            for seed in ("1", "2")}
    assert outs == {str(hash_block_tokens(ROOT_HASH, [1, 2, 3]))}
