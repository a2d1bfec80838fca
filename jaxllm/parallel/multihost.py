"""Multi-host execution: one leader process drives the engine, every process runs its programs.

Flow of one device program (``ModelRunner._call``, the choke point every program goes through)::

    leader (process 0)                               followers (process 1 .. N-1)
    scheduler → pack_batch → args                    follower_loop: wait for a header
    share_inputs: broadcast header [op, a, b, flags] ──► header → the same program key
                  broadcast the numpy host leaves   ──► fill a template of those leaves
    globalize the host leaves (replicated arrays)    globalize (own state / kv_caches / hidden)
    run the compiled program on its devices     ◄──► run the same program on its devices
    read token ids from its addressable shard        drop the outputs, keep kv_caches / hidden

Why one leader: a single scheduler cannot diverge across hosts, and the broadcast (a few KB per
step, over the devices the processes already share: no extra channel or ports) is tiny next to
the step. The alternative, every host running its own scheduler on replicated requests, needs
bit-identical Python behaviour (timing, tokenizers, aborts) on every host.

Device arrays (parameters, KV pages, the step's hidden states) are global ``jax.Array`` s with the
same structure on every process, so a follower rebuilds the call from its OWN state, KV cache and
last hidden states plus the broadcast host inputs. ``args`` of every program is
``(state, kv_caches | hidden, *host)``: the first two stay put, ``host`` is broadcast.
"""

from __future__ import annotations

import atexit
import logging
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm.config import ParallelConfig
from jaxllm.runner.buckets import Bucket

logger = logging.getLogger(__name__)

# Header: i32[4] = [op, a, b, flags]; op names the program (a, b: its bucket), or STOP.
_OPS = {"step": 1, "decode": 2, "lp": 3}
_KINDS = {v: k for k, v in _OPS.items()}
STOP = 4
# flags bit 0: the sampling history is the runner's all -1 placeholder (not broadcast: it is
# [S, max_model_len] and only carries information when a row uses penalties).
_EMPTY_HIST = 1


def initialize(pc: ParallelConfig) -> None:
    """Join the ``num_processes`` job (no-op for one process). Call before any other jax use.

    Raises:
        ValueError: no coordinator address, or a mesh that does not cover every global device.
    """
    if pc.num_processes == 1:
        return
    if not pc.coordinator_address:
        raise ValueError(f"coordinator_address: required when num_processes > 1 (got num_processes="
                         f"{pc.num_processes}); give host:port of process 0, the same on every process")
    if not jax.distributed.is_initialized():
        # CPU cross-process collectives need an implementation (the default has none); GPU and
        # TPU clients ignore this flag.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(pc.coordinator_address, pc.num_processes, pc.process_id)
    if jax.process_count() != pc.num_processes or jax.process_index() != pc.process_id:
        raise ValueError(f"num_processes: this process already joined a job of {jax.process_count()} "
                         f"processes as process {jax.process_index()}, not {pc.num_processes} / "
                         f"process_id {pc.process_id}")
    need = pc.tensor_parallel_size * pc.data_parallel_size
    if need != jax.device_count():
        raise ValueError(f"tensor_parallel_size: tensor_parallel_size x data_parallel_size ({need}) must "
                         f"equal the {jax.device_count()} devices of the {pc.num_processes} processes "
                         f"({jax.local_device_count()} each): every process runs its share of each step")
    logger.info("Process %d of %d: %d local of %d devices", pc.process_id, pc.num_processes,
                jax.local_device_count(), jax.device_count())


def agree_min(n: int) -> int:
    """The minimum of ``n`` over all processes (e.g. KV blocks sized from each host's free memory)."""
    if jax.process_count() == 1:
        return int(n)
    return int(np.min(multihost_utils.process_allgather(np.asarray(n, np.int64))))


def _padded(nbytes: int) -> int:
    """Buffer sizes are powers of two (>= 1 KiB): each size is one compiled broadcast program."""
    return max(1024, 1 << max(0, nbytes - 1).bit_length())


def _pack(leaves: list[np.ndarray]) -> np.ndarray:
    """Host leaves → one u8 buffer (their bytes, in order, zero-padded to ``_padded``)."""
    parts = [np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in leaves]
    n = sum(p.nbytes for p in parts)
    return np.concatenate(parts + [np.zeros(_padded(n) - n, np.uint8)])


def _unpack(buf: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    """Inverse of ``_pack``: split ``buf`` by the shapes and dtypes of ``like``."""
    want = sum(t.nbytes for t in like)
    if _padded(want) != buf.nbytes:
        raise RuntimeError(f"multihost: got {buf.nbytes} bytes of inputs, the program takes {want} "
                           f"(padded to {_padded(want)})")
    out, off = [], 0
    for t in like:
        out.append(buf[off:off + t.nbytes].view(t.dtype).reshape(t.shape))
        off += t.nbytes
    return out


class Multihost:
    """The runner's side of a multi-process job (``ModelRunner.multihost``; None for one process)."""

    def __init__(self, runner: Any):
        if runner.mesh is None:
            raise ValueError("tensor_parallel_size: a multi-process run needs a mesh over all devices")
        self.runner = runner
        self.is_leader = jax.process_index() == 0
        self._replicated = NamedSharding(runner.mesh, P())
        self._templates: dict[tuple, tuple] = {}
        self._checked: set[tuple] = set()
        self._empty_hist: dict[tuple, jax.Array] = {}
        self._flags = 0          # follower: flags of the header being served
        self.stopped = False
        self.num_programs = 0    # programs run through the broadcast (both roles)
        self.share_s = 0.0       # seconds spent in share_inputs (broadcasts + globalize)
        if self.is_leader:
            atexit.register(self.stop)  # followers must not wait forever if close() is forgotten

    # ------------------------------------------------------------------ templates
    def _fn_and_template(self, key: tuple) -> tuple[Any, list[np.ndarray], Any]:
        """The jit wrapper of ``key`` and zeros shaped like its host leaves (+ their treedef)."""
        if key not in self._templates:
            r, kind = self.runner, key[0]
            if kind == "step":
                fn, host = r._step, r._step_args(r._empty_batch(key[1]))[2:]
            elif kind == "decode":
                s = key[1]
                hb = r._empty_batch(Bucket(s, s))
                fn, host = r._multi_decode, r._multi_args(hb, np.zeros(s, np.int32))[2:]
            elif kind == "lp":
                fn, host = r._prompt_lp, (np.zeros(key[1], np.int32),)
            else:
                raise RuntimeError(f"multihost: unknown program kind {kind!r}")
            leaves, treedef = jax.tree.flatten(host)
            self._templates[key] = (fn, [np.zeros_like(np.asarray(x)) for x in leaves], treedef)
        return self._templates[key]

    @staticmethod
    def _encode(key: tuple) -> tuple[int, int, int]:
        kind, b = key
        if kind == "step":
            return _OPS[kind], b.num_tokens, b.num_seqs
        return _OPS[kind], int(b), 0

    @staticmethod
    def _decode(header: np.ndarray) -> tuple | None:
        op, a, b, _ = (int(v) for v in header)
        if op == STOP:
            return None
        if op not in _KINDS:
            raise RuntimeError(f"multihost: bad header {header.tolist()}")
        if _KINDS[op] == "step":
            return ("step", Bucket(a, b))
        return (_KINDS[op], a)

    # ------------------------------------------------------------------ the broadcast
    def _bcast(self, tree):
        return multihost_utils.broadcast_one_to_all(tree, is_source=self.is_leader)

    def receive(self) -> tuple | None:
        """Follower: wait for the leader's next header; the program key, or None at STOP."""
        header = self._bcast(np.zeros(4, np.int32))
        self._flags = int(header[3])
        return self._decode(header)

    def share_inputs(self, key: tuple, args: tuple) -> tuple:
        """Make ``args`` identical on every process (called by ``ModelRunner._call`` in both roles).

        The leader broadcasts the header, then its host leaves packed into one byte buffer (one
        collective instead of one per leaf: ~10x faster); a follower (whose ``args`` hold a
        template) unpacks them by the template's shapes. Host leaves become replicated global arrays.
        """
        if self.stopped:
            raise RuntimeError("multihost: the engine was shut down (stop() was called)")
        t0 = time.perf_counter()
        _, template, treedef = self._fn_and_template(key)
        leaves, tdef = jax.tree.flatten(tuple(args[2:]))
        hist = self._sampling_hist(key, leaves, tdef)
        if self.is_leader:
            empty = hist is not None and any(leaves[hist] is h for h in self.runner._empty_hist.values())
            flags = _EMPTY_HIST if empty else 0
            leaves = [template[i] if empty and i == hist else np.asarray(x) for i, x in enumerate(leaves)]
            self._check(key, leaves, tdef, template, treedef)
            self._bcast(np.array([*self._encode(key), flags], np.int32))
        else:
            flags = self._flags
        skip = hist if flags & _EMPTY_HIST else None
        sent = [i for i in range(len(template)) if i != skip]
        buf = self._bcast(_pack([leaves[i] for i in sent]))
        host = [None] * len(template)
        for i, x in zip(sent, _unpack(buf, [template[i] for i in sent])):
            host[i] = self.globalize(x)
        if skip is not None:  # the all -1 history: globalized once per program
            if key not in self._empty_hist:
                self._empty_hist[key] = self.globalize(np.full_like(template[skip], -1))
            host[skip] = self._empty_hist[key]
        self.num_programs += 1
        self.share_s += time.perf_counter() - t0
        return (args[0], args[1], *jax.tree.unflatten(tdef, host))

    def _sampling_hist(self, key: tuple, leaves: list, tdef) -> int | None:
        """Index of SamplingMetadata.hist_ids among the flattened host leaves (step/decode)."""
        if key[0] == "lp":
            return None
        md = jax.tree.unflatten(tdef, list(range(len(leaves))))[-1]  # SamplingMetadata of indices
        return md.hist_ids

    def _check(self, key, leaves, tdef, template, treedef) -> None:
        """Leader, once per program: its host leaves match what followers will expect."""
        if key in self._checked:
            return
        got = [(x.shape, x.dtype) for x in leaves]
        want = [(x.shape, x.dtype) for x in template]
        if tdef != treedef or got != want:
            raise RuntimeError(f"multihost: host inputs of {key} differ from the follower template: "
                               f"{got} vs {want}")
        self._checked.add(key)

    def globalize(self, x: np.ndarray) -> jax.Array:
        """A host array (the same on every process) → a global array replicated over the mesh."""
        return jax.make_array_from_process_local_data(self._replicated, x)

    # ------------------------------------------------------------------ outputs
    def local_outputs(self, key: tuple, out: tuple) -> tuple:
        """Outputs the host reads become process-local arrays (KV pages and hidden states stay global)."""
        if key[0] == "step":
            kv, sampled, hidden = out
            return kv, jax.tree.map(self._local, sampled), hidden
        if key[0] == "decode":
            return (out[0], *jax.tree.map(self._local, tuple(out[1:])))
        return jax.tree.map(self._local, out)

    @staticmethod
    def _local(x: jax.Array):
        if x.is_fully_addressable:
            return x
        if x.sharding.is_fully_replicated:
            return x.addressable_data(0)  # lazy: no copy, no collective
        return multihost_utils.process_allgather(x, tiled=True)  # a collective: every process runs it

    # ------------------------------------------------------------------ shutdown
    def stop(self) -> None:
        """Leader: tell the followers to leave ``follower_loop`` (idempotent)."""
        if self.stopped or not self.is_leader:
            return
        self._bcast(np.array([STOP, 0, 0, 0], np.int32))
        self.stopped = True
        logger.info("multihost: followers stopped after %d programs", self.num_programs)


def follower_loop(runner: Any) -> int:
    """Run the leader's programs on this process until it sends STOP. Returns how many were run."""
    mh: Multihost = runner.multihost
    if mh is None or mh.is_leader:
        raise RuntimeError("follower_loop: only a follower process (process_id > 0) runs it")
    hidden = None  # the last step's hidden states: the input of the next prompt-logprobs program
    while (key := mh.receive()) is not None:
        fn, template, treedef = mh._fn_and_template(key)
        if key[0] == "lp" and hidden is None:
            raise RuntimeError("multihost: prompt logprobs requested before any step")
        host = jax.tree.unflatten(treedef, template)
        out = runner._call(key, fn, (runner.state, hidden if key[0] == "lp" else runner.kv_caches, *host))
        if key[0] == "step":
            runner.kv_caches, _, hidden = out
        elif key[0] == "decode":
            runner.kv_caches = out[0]
    mh.stopped = True
    logger.info("multihost: process %d stopped by the leader after %d programs", jax.process_index(),
                mh.num_programs)
    return mh.num_programs
