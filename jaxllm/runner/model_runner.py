"""ModelRunner: host → device. Packs each SchedulerOutput and runs ONE jitted step.

``step(state, kv_caches[donated], input_ids, attn_md, logits_indices, prev_tokens, prev_rows, sampling_md)
    -> (kv_caches, (SamplerOutput, next_tokens), hidden)``

``dispatch`` packs and launches a step without waiting for it (JAX dispatch is asynchronous) and
returns a ``StepHandle``; ``collect`` reads its sampled ids back (the one device → host sync).
``execute`` is the two in a row. With async scheduling the engine dispatches step t+1 before it
collects step t: a token step t samples reaches step t+1 on device, through ``next_tokens``
(i32[S_max], the last token each row sampled) and the next step's ``prev_rows`` (see runner.batch).

The NNX graph is split from its state once (``nnx.split``) and the jitted function is pure in the
state, so the traced program does not carry Python module structure and tracing is cheap. The KV
cache is donated, so XLA updates it in place. Every (tokens, seqs) bucket is compiled at start-up;
``num_compilations`` counts the compiled specializations and must not grow afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxllm.config import EngineConfig
from jaxllm.core.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from jaxllm.layers.attention_metadata import AttentionMetadata
from jaxllm.layers.sampler import sample
from jaxllm.layers.sampling_metadata import SamplingMetadata
from jaxllm.runner import kv_cache as kvc
from jaxllm.runner import program_store
from jaxllm.runner.batch import MAX_BANNED, HostBatch, pack_batch
from jaxllm.runner.buckets import Bucket, make_buckets, pick_bucket

logger = logging.getLogger(__name__)

NUM_LOGPROBS = 20


def _take_prev(input_ids, prev_tokens, prev_rows):
    """input_ids [N] with the in-flight tokens of the previous step filled in (prev_rows >= 0)."""
    return jnp.where(prev_rows >= 0, prev_tokens[jnp.maximum(prev_rows, 0)], input_ids)


def _pad_rows(x, size: int):
    """[S] → [size] (zeros past S): next_tokens has one static shape whatever the bucket."""
    return jnp.zeros((size,), x.dtype).at[:x.shape[0]].set(x)


def _step_fn(graphdef, state, kv_caches, input_ids, attn_md, logits_indices, prev_tokens, prev_rows,
             sampling_md):
    model = nnx.merge(graphdef, state)
    input_ids = _take_prev(input_ids, prev_tokens, prev_rows)  # [T]
    kv_caches, hidden = model(kv_caches, input_ids, attn_md)   # hidden: [T, D]
    logits = model.compute_logits(hidden[logits_indices])       # [S, V]
    out = sample(logits, sampling_md, NUM_LOGPROBS)
    next_tokens = _pad_rows(out.token_ids, prev_tokens.shape[0])  # [S_max]
    return kv_caches, (out, next_tokens), hidden


def _multi_decode_fn(graphdef, block_size, num_steps, state, kv_caches, input_ids, positions, page_indices,
                     max_steps, num_seqs, prev_tokens, prev_rows, sampling_md):
    """``num_steps`` decode steps in one dispatch: each samples a token and feeds it back on device.

    input_ids / positions / max_steps / prev_rows: [S] (the last token of each sequence, or its row
    in prev_tokens if the previous step is still sampling it, its position, and how many of the
    steps it may take: a row past its max_steps writes no KV). Returns the sampled tokens, their
    logprobs and top-k as [num_steps, S, ...] arrays, and next_tokens [S_max] (each row's last).
    """
    model = nnx.merge(graphdef, state)
    S, P = page_indices.shape
    input_ids = _take_prev(input_ids, prev_tokens, prev_rows)
    rows = jnp.arange(S, dtype=jnp.int32)
    real = rows < num_seqs[0]
    cu_q_lens = jnp.minimum(jnp.arange(S + 1, dtype=jnp.int32), num_seqs[0])

    def body(k, carry):
        kv_caches, ids, toks, lps, top_ids, top_lps = carry
        pos = positions + k
        active = real & (k < max_steps)
        page = page_indices[rows, jnp.minimum(pos // block_size, P - 1)]
        md = AttentionMetadata(
            input_positions=pos, slot_mapping=jnp.where(active, page * block_size + pos % block_size, -1),
            kv_lens=jnp.where(real, jnp.minimum(pos + 1, P * block_size), 0), page_indices=page_indices,
            cu_q_lens=cu_q_lens, num_seqs=num_seqs)
        kv_caches, hidden = model(kv_caches, ids, md)                      # hidden: [S, D]
        out = sample(model.compute_logits(hidden), dataclasses.replace(sampling_md, steps=sampling_md.steps + k),
                     NUM_LOGPROBS)
        return (kv_caches, out.token_ids, toks.at[k].set(out.token_ids), lps.at[k].set(out.logprobs),
                top_ids.at[k].set(out.top_ids), top_lps.at[k].set(out.top_logprobs))

    init = (kv_caches, input_ids, jnp.zeros((num_steps, S), jnp.int32), jnp.zeros((num_steps, S), jnp.float32),
            jnp.zeros((num_steps, S, NUM_LOGPROBS), jnp.int32),
            jnp.zeros((num_steps, S, NUM_LOGPROBS), jnp.float32))
    kv_caches, _, toks, lps, top_ids, top_lps = jax.lax.fori_loop(0, num_steps, body, init)
    last = toks[jnp.clip(max_steps - 1, 0, num_steps - 1), rows]                    # [S]
    return kv_caches, toks, lps, top_ids, top_lps, _pad_rows(last, prev_tokens.shape[0])


def _arg_index(fn, name: str, bound: int) -> int:
    """Position of parameter ``name`` among ``fn``'s call arguments after ``bound`` partial ones."""
    return list(inspect.signature(fn).parameters).index(name) - bound


# Where prev_tokens sits in the programs' arguments (graphdef, and block_size/num_steps, are bound).
_STEP_PREV = _arg_index(_step_fn, "prev_tokens", 1)
_MULTI_PREV = _arg_index(_multi_decode_fn, "prev_tokens", 3)


def _prompt_logprobs_fn(graphdef, state, hidden, target_ids):
    """Logprob of each next prompt token and the top-k at every position: hidden [T, D]."""
    model = nnx.merge(graphdef, state)
    logp = jax.nn.log_softmax(model.compute_logits(hidden).astype(jnp.float32), axis=-1)  # [T, V]
    target = jnp.take_along_axis(logp, target_ids[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, NUM_LOGPROBS)
    return target, top_ids, top_lp


@dataclasses.dataclass
class StepHandle:
    """A dispatched step whose results may still be computing (see ``ModelRunner.dispatch``)."""
    so: SchedulerOutput
    hb: HostBatch
    outs: tuple                  # device outputs: (SamplerOutput, hidden) or the multi-step arrays
    next_tokens: jax.Array       # i32[S_max] the last token each row sampled (feeds the next step)
    rows: dict[str, int]         # request_id -> its row in next_tokens, for requests that sample
    pack_s: float = 0.0          # host time packing the batch
    dispatch_s: float = 0.0      # host time launching the program (argument transfer included)
    wait_s: float = 0.0          # set by collect: blocked on the device for the sampled ids
    readback_s: float = 0.0      # set by collect: the rest (logprobs, prompt logprobs, Python lists)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: nnx.Module, *, mesh=None, kv_sharding=None):
        self.config = config
        self.mesh = mesh
        sc, cc, mc = config.scheduler_config, config.cache_config, config.model_config
        self.block_size = cc.block_size
        self.max_model_len = mc.max_model_len
        self.pages_per_seq = math.ceil(self.max_model_len / self.block_size)
        self.buckets: list[Bucket] = make_buckets(sc.max_num_batched_tokens, sc.max_num_seqs)
        # next_tokens / prev_tokens: one static length for every bucket.
        self.max_rows = max(b.num_seqs for b in self.buckets)
        self._no_prev = np.zeros(self.max_rows, np.int32)
        self._prev_shardings: dict[tuple, object] = {}

        self.graphdef, self.state = nnx.split(model)
        self.hidden_size = model.config.hidden_size
        num_layers, num_kv_heads, head_dim = model.kv_cache_spec
        self.kv_dtype = model.dtype if hasattr(model, "dtype") else jnp.float32
        self._step = jax.jit(functools.partial(_step_fn, self.graphdef), donate_argnums=(1,))
        self._prompt_lp = jax.jit(functools.partial(_prompt_logprobs_fn, self.graphdef))
        self.num_decode_steps = sc.num_decode_steps
        self.decode_buckets = sorted({b.num_seqs for b in self.buckets})
        self._multi_decode = jax.jit(functools.partial(_multi_decode_fn, self.graphdef, self.block_size,
                                                       self.num_decode_steps), donate_argnums=(1,))

        self._reserve = self._activation_reserve(model)
        per_block = kvc.bytes_per_block(num_layers, num_kv_heads, head_dim, self.block_size, self.kv_dtype)
        divisor = 1
        if kv_sharding is not None and mesh is not None:
            divisor = dict(mesh.shape).get("model", 1)
        self.num_blocks = kvc.num_blocks_for(
            num_kv_blocks=cc.num_kv_blocks, per_block=per_block, device=jax.local_devices()[0],
            utilization=cc.gpu_memory_utilization, reserve_bytes=self._reserve,
            max_num_seqs=sc.max_num_seqs, max_model_len=self.max_model_len, block_size=self.block_size,
            divisor=divisor)
        # Multi-process (jaxllm/parallel/multihost.py): the leader's broadcast of each step's inputs
        # needs identical programs everywhere, so all processes agree on the fewest blocks any fits.
        self.multihost = None
        if jax.process_count() > 1:
            from jaxllm.parallel.multihost import Multihost, agree_min
            self.num_blocks = agree_min(self.num_blocks)
        # Allocated after precompile (see allocate_kv_caches): compiling first leaves XLA's autotuner
        # the memory the cache will take.
        self._kv_spec = (num_layers, self.num_blocks, self.block_size, num_kv_heads, head_dim)
        self._kv_sharding = kv_sharding
        self._per_block = per_block
        self.kv_caches: list[jax.Array] | None = None
        self._empty_hist: dict[int, jax.Array] = {}
        self._programs: dict[tuple, jax.stages.Compiled] = {}
        self._kv_abstract = [jax.ShapeDtypeStruct(
            (self.num_blocks, self.block_size, 2 * num_kv_heads, head_dim), self.kv_dtype,
            sharding=kv_sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0]))] * num_layers
        if jax.process_count() > 1:  # needs no KV cache: the follower loop reads it at each program
            self.multihost = Multihost(self)

    def allocate_kv_caches(self) -> None:
        """Allocate the KV pages (once; call after precompile)."""
        if self.kv_caches is not None:
            return
        num_layers, num_blocks, block_size, num_kv_heads, head_dim = self._kv_spec
        self.kv_caches = kvc.allocate_kv_caches(num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                                                self.kv_dtype, self._kv_sharding)
        per_block = self._per_block
        tokens = self.num_blocks * self.block_size
        logger.info("KV cache: %d blocks × %d tokens = %d tokens (%.2f GiB); max concurrency at "
                    "max_model_len=%d: %.2fx", self.num_blocks, self.block_size, tokens,
                    self.num_blocks * per_block / 2**30, self.max_model_len, tokens / self.max_model_len)

    # ---------------------------------------------------------------- sizing
    def _activation_reserve(self, model) -> int:
        """Rough upper bound of the step's temporaries: a few [T, D] / [T, I] buffers and [S, V] logits."""
        cfg = getattr(model, "config", None)
        sc = self.config.scheduler_config
        if cfg is None:
            return 1 << 30
        t = sc.max_num_batched_tokens
        s = min(t, sc.max_num_seqs)
        width = 4 * cfg.hidden_size + 3 * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
        return int(t * width * 4 + 3 * s * cfg.vocab_size * 4 + (256 << 20))

    # ---------------------------------------------------------------- compile
    @property
    def num_compilations(self) -> int:
        """Programs compiled so far: the precompiled ones plus any the jit wrappers compiled lazily
        (a precompiled engine never does; tests assert this number stays put after warm-up)."""
        return (len(self._programs) + self._step._cache_size() + self._prompt_lp._cache_size()
                + self._multi_decode._cache_size())

    def precompile(self, progress: bool = True) -> float:
        """Compile every program of every bucket. Returns the seconds taken.

        Tracing is Python (serial); XLA compilation releases the GIL, so the programs compile in
        parallel threads while the next one is traced. The runner then calls the compiled
        executables directly (no jit cache lookup on the hot path). The prompt-logprob programs take
        the step's hidden-state output and need its sharding: on one device it is known up front and
        they join the same batch; over a mesh they wait for the steps' compiled output shardings.
        """
        t0 = time.perf_counter()
        jobs = {("step", b): (self._step, self._step_args(self._empty_batch(b))) for b in self.buckets}
        if self.num_decode_steps > 1:
            for s in self.decode_buckets:
                hb = self._empty_batch(Bucket(s, s))
                jobs[("decode", s)] = (self._multi_decode, self._multi_args(hb, np.zeros(s, np.int32)))

        def lp_jobs(sharding_of) -> dict:
            out = {}
            for b in self.buckets:
                abstract = jax.ShapeDtypeStruct((b.num_tokens, self.hidden_size), self.kv_dtype,
                                                sharding=sharding_of(b))
                out[("lp", b.num_tokens)] = (self._prompt_lp, (self.state, abstract,
                                                               np.zeros(b.num_tokens, np.int32)))
            return out

        if self.mesh is None and jax.process_count() == 1:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            self._compile_jobs({**jobs, **lp_jobs(lambda b: device)}, "Compiling", progress)
        else:
            self._compile_jobs(jobs, "Compiling", progress)
            self._compile_jobs(lp_jobs(lambda b: self._programs[("step", b)].output_shardings[2]),
                               "Compiling prompt logprobs", progress)
        temp = max((p.memory_analysis().temp_size_in_bytes for p in self._programs.values()
                    if p.memory_analysis() is not None), default=0)
        if temp > self._reserve:
            logger.warning("the step needs %.2f GiB of temporaries, more than the %.2f GiB reserved beside "
                           "the KV cache; lower gpu_memory_utilization if steps run out of memory",
                           temp / 2**30, self._reserve / 2**30)
        return time.perf_counter() - t0

    def _compile_jobs(self, jobs: dict, desc: str, progress: bool) -> None:
        """Trace and lower each program (Python, serial) and hand it to a compile thread at once:
        XLA compiles (or reads the persistent cache) with the GIL released while the next program
        is traced, so a cold start overlaps tracing with compilation instead of adding them.

        With a persistent compilation cache directory (single device, one process), each compiled
        program is also kept serialized in ``<dir>/jaxllm-programs/``, keyed by what determines it:
        the traced jaxpr and its constants, the arguments' shapes, dtypes, shardings and donation,
        the model graph, the engine config, the jaxllm/pallas_kernels sources and the jax versions
        and devices. A warm start then only traces: lowering (where the Pallas kernels are generated,
        ~1 s per program on the H100) and XLA's own cache lookup are skipped.
        """
        import hashlib
        import pickle

        from jax.experimental import serialize_executable

        cache_dir = jax.config.jax_compilation_cache_dir
        # Stored programs are on by default on GPUs only, where they were measured (H100 warm start
        # 42 s -> 20 s). XLA:CPU executables reloaded in a new process can fail at run time
        # ("NOT_FOUND: Function wrapped_iota not found"), so CPUs (and TPUs, unmeasured) keep only
        # jax's persistent cache. JAXLLM_STORED_PROGRAMS=1 / 0 forces them on / off.
        force = os.environ.get("JAXLLM_STORED_PROGRAMS")
        wanted = force == "1" or (force != "0" and jax.default_backend() == "gpu")
        if not cache_dir or not wanted or self.mesh is not None or jax.process_count() > 1:
            cache_dir = None
        else:
            cache_dir = os.path.join(cache_dir, "jaxllm-programs")
            os.makedirs(cache_dir, exist_ok=True)
            store_limit = program_store.max_bytes()   # checked before any compiling
            if not hasattr(self, "_program_key_base"):
                import importlib.metadata
                import pallas_kernels
                import jaxllm
                h = hashlib.sha256()
                for pkg in (jaxllm, pallas_kernels):
                    root = os.path.dirname(pkg.__file__)
                    for d, _, files in sorted(os.walk(root)):
                        for f in sorted(x for x in files if x.endswith(".py")):
                            with open(os.path.join(d, f), "rb") as fh:
                                h.update(f.encode() + fh.read())
                versions = []
                for dist in ("jax", "jaxlib", "flax", "jax-triton", "triton"):
                    try:
                        versions.append((dist, importlib.metadata.version(dist)))
                    except importlib.metadata.PackageNotFoundError:
                        pass
                dev = jax.devices()[0]
                h.update(repr((versions, dev.platform, dev.device_kind, dev.client.platform_version,
                               jax.device_count(), os.environ.get("XLA_FLAGS"),
                               sorted(jax.config.values.items(), key=str),
                               repr(self.config), repr(self.graphdef))).encode())
                self._program_key_base = h.hexdigest()

        def program_key(traced, args) -> str:
            h = hashlib.sha256(self._program_key_base.encode())
            h.update(str(traced.jaxpr).encode())
            for c in traced.jaxpr.consts:
                h.update(np.asarray(c).tobytes())
            h.update(repr([(np.shape(x), str(getattr(x, "dtype", type(x))),
                            repr(getattr(x, "sharding", None))) for x in jax.tree.leaves(args)]).encode())
            h.update(repr([a.donated for a in jax.tree.leaves(traced.args_info)]).encode())
            return os.path.join(cache_dir, h.hexdigest() + ".pkl")

        def compile_and_store(lowered, path):
            compiled = lowered.compile()
            if path is not None:
                try:
                    blob = pickle.dumps(serialize_executable.serialize(compiled))
                    with open(path + ".tmp", "wb") as f:
                        f.write(blob)
                    os.replace(path + ".tmp", path)
                except Exception as e:  # noqa: BLE001 - a program that cannot be stored is just compiled
                    logger.debug("not storing program %s: %s", path, e)
            return compiled

        def load(path):
            try:
                program_store.touch(path)
                with open(path, "rb") as f:
                    # Single-device programs: load onto that device, not onto every visible one.
                    return serialize_executable.deserialize_and_load(
                        *pickle.load(f), execution_devices=[jax.devices()[0]])
            except Exception as e:  # noqa: BLE001 - a stale or broken entry is recompiled
                logger.warning("ignoring cached program %s (%s); compiling it", path, e)
                return None

        workers = max(1, min(len(jobs), os.cpu_count() or 1, 8))
        with ThreadPoolExecutor(workers) as pool, tqdm(total=len(jobs), desc=desc, disable=not progress,
                                                        leave=False) as bar:
            futures, paths = {}, {}
            with self._mesh_ctx():
                for key, (fn, args) in jobs.items():
                    traced = fn.trace(*args)
                    paths[key] = path = program_key(traced, args) if cache_dir else None
                    if path is not None and os.path.isfile(path):
                        futures[key] = pool.submit(load, path)
                    else:
                        futures[key] = pool.submit(compile_and_store, traced.lower(), path)
                    futures[key].add_done_callback(lambda _: bar.update(1))
            for key, fut in futures.items():
                prog = fut.result()
                if prog is None:  # the stored program failed to load: compile it and store it again
                    fn, args = jobs[key]
                    with self._mesh_ctx():
                        prog = compile_and_store(fn.trace(*args).lower(), paths[key])
                self._programs[key] = prog
        if cache_dir:
            program_store.prune(cache_dir, store_limit, keep=frozenset(p for p in paths.values() if p))

    def _empty_batch(self, bucket: Bucket) -> HostBatch:
        return pack_batch(SchedulerOutput(), bucket, self.block_size, self.pages_per_seq, self.max_model_len)

    # ---------------------------------------------------------------- step
    def _hist(self, hb: HostBatch) -> jax.Array:
        if hb.hist_ids is not None:
            return jnp.asarray(hb.hist_ids)
        s = hb.bucket.num_seqs
        if s not in self._empty_hist:
            self._empty_hist[s] = jnp.full((s, self.max_model_len), -1, jnp.int32)
        return self._empty_hist[s]

    def _sampling_md(self, hb: HostBatch) -> SamplingMetadata:
        return SamplingMetadata(
            temperature=hb.temperature, top_k=hb.top_k, top_p=hb.top_p, min_p=hb.min_p,
            presence_penalty=hb.presence_penalty, frequency_penalty=hb.frequency_penalty,
            repetition_penalty=hb.repetition_penalty, seeds=hb.seeds, steps=hb.steps,
            hist_ids=self._hist(hb), prompt_lens=hb.prompt_lens, banned_ids=hb.banned_ids,
            any_penalties=np.asarray(hb.hist_ids is not None),
            any_top_k_top_p=np.asarray(hb.any_top_k_top_p), any_logprobs=np.asarray(hb.any_logprobs))

    def _kv(self):
        return self.kv_caches if self.kv_caches is not None else self._kv_abstract

    def _step_args(self, hb: HostBatch, prev_tokens=None) -> tuple:
        attn_md = AttentionMetadata(
            input_positions=hb.positions, slot_mapping=hb.slot_mapping, kv_lens=hb.kv_lens,
            page_indices=hb.page_indices, cu_q_lens=hb.cu_q_lens,
            num_seqs=np.array([hb.num_seqs], np.int32))
        prev = self._prev_input(("step", hb.bucket), _STEP_PREV, prev_tokens)
        return (self.state, self._kv(), hb.input_ids, attn_md, hb.logits_indices, prev, hb.prev_rows,
                self._sampling_md(hb))

    def _multi_args(self, hb: HostBatch, max_steps: np.ndarray, prev_tokens=None) -> tuple:
        S = hb.bucket.num_seqs
        prev = self._prev_input(("decode", S), _MULTI_PREV, prev_tokens)
        return (self.state, self._kv(), hb.input_ids[:S], hb.positions[:S], hb.page_indices, max_steps,
                np.array([hb.num_seqs], np.int32), prev, hb.prev_rows[:S], self._sampling_md(hb))

    def _prev_input(self, key: tuple, index: int, prev_tokens):
        """The previous step's next_tokens (on device) as argument ``index`` of program ``key``, on
        the sharding that program was compiled for; zeros from the host when there is none."""
        if prev_tokens is None:
            return self._no_prev
        want = self._prev_shardings.get(key)
        if want is None:
            prog = self._programs.get(key)
            want = prog.input_shardings[0][index] if prog is not None else False
            self._prev_shardings[key] = want
        if want and not prev_tokens.sharding.is_equivalent_to(want, prev_tokens.ndim):
            prev_tokens = jax.device_put(prev_tokens, want)  # an on-device copy, no host sync
        return prev_tokens

    def _call(self, key, fn, args):
        """The precompiled program for ``key``, or the jit wrapper (compiles lazily) if none."""
        mh = self.multihost
        if mh is not None:  # several processes: the leader broadcasts args[2:] (parallel/multihost.py)
            args = mh.share_inputs(key, args)
        prog = self._programs.get(key)
        if prog is not None:
            out = prog(*args)
        else:
            with self._mesh_ctx():
                out = fn(*args)
        return out if mh is None else mh.local_outputs(key, out)

    def _run(self, hb: HostBatch, prev_tokens=None):
        self.kv_caches, (out, next_tokens), hidden = self._call(("step", hb.bucket), self._step,
                                                                self._step_args(hb, prev_tokens))
        return out, hidden, next_tokens

    def _run_multi(self, hb: HostBatch, max_steps: np.ndarray, prev_tokens=None):
        self.kv_caches, *outs, next_tokens = self._call(("decode", hb.bucket.num_seqs), self._multi_decode,
                                                        self._multi_args(hb, max_steps, prev_tokens))
        return outs, next_tokens

    def _mesh_ctx(self):
        """Run jitted code under the engine's mesh: attention layers read it to shard_map the kernel."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and return its sampled ids (``collect(dispatch(so))``)."""
        return self.collect(self.dispatch(so))

    def dispatch(self, so: SchedulerOutput, prev: StepHandle | None = None) -> StepHandle:
        """Pack ``so`` and launch its program; returns at once (the device may still be running it).

        Args:
          so: the step. Its chunks may end in a token that ``prev`` samples (async scheduling).
          prev: the step dispatched just before, when it is not collected yet.
        """
        t0 = time.perf_counter()
        prev_rows = prev.rows if prev is not None else None
        prev_tokens = prev.next_tokens if prev is not None else None
        if so.num_decode_steps > 1:  # several decode steps in one dispatch (every request decodes)
            S = next(s for s in self.decode_buckets if s >= len(so.scheduled))
            first = SchedulerOutput(
                scheduled=[ScheduledRequest(sr.request, sr.num_computed_tokens, 1, sr.block_ids)
                           for sr in so.scheduled],
                total_num_scheduled_tokens=len(so.scheduled))
            hb = pack_batch(first, Bucket(S, S), self.block_size, self.pages_per_seq, self.max_model_len,
                            prev_rows)
            max_steps = np.zeros(S, np.int32)
            max_steps[:len(so.scheduled)] = [sr.num_scheduled_tokens for sr in so.scheduled]
            t1 = time.perf_counter()
            outs, next_tokens = self._run_multi(hb, max_steps, prev_tokens)
            rows = {sr.request_id: i for i, sr in enumerate(so.scheduled)}
        else:
            bucket = pick_bucket(self.buckets, so.total_num_scheduled_tokens, len(so.scheduled))
            hb = pack_batch(so, bucket, self.block_size, self.pages_per_seq, self.max_model_len, prev_rows)
            t1 = time.perf_counter()
            out, hidden, next_tokens = self._run(hb, prev_tokens)
            outs = (out, hidden)
            rows = {sr.request_id: i for i, sr in enumerate(so.scheduled) if sr.samples}
        return StepHandle(so, hb, outs, next_tokens, rows, pack_s=t1 - t0,
                          dispatch_s=time.perf_counter() - t1)

    def collect(self, h: StepHandle) -> ModelRunnerOutput:
        """Wait for a dispatched step and read back its sampled ids (and logprobs if asked)."""
        if h.so.num_decode_steps > 1:
            return self._collect_multi(h)
        so, hb = h.so, h.hb
        out, hidden = h.outs
        t0 = time.perf_counter()
        token_ids = np.asarray(out.token_ids)  # the one device → host sync of a step
        t1 = time.perf_counter()
        result = ModelRunnerOutput()
        want_lp = [i for i, sr in enumerate(so.scheduled)
                   if sr.request_id in h.rows and sr.request.sampling_params.logprobs is not None]
        if want_lp:
            lp, top_ids, top_lp = jax.device_get((out.logprobs, out.top_ids, out.top_logprobs))
        for rid, i in h.rows.items():
            result.sampled_token_ids[rid] = [int(token_ids[i])]
        for i in want_lp:
            sr = so.scheduled[i]
            k = sr.request.sampling_params.logprobs
            d = {int(t): float(v) for t, v in zip(top_ids[i, :k], top_lp[i, :k])}
            d[int(token_ids[i])] = float(lp[i])
            result.logprobs[sr.request_id] = [d]
        self._prompt_logprobs(so, hidden, hb, result)
        h.wait_s, h.readback_s = t1 - t0, time.perf_counter() - t1
        return result

    def _collect_multi(self, h: StepHandle) -> ModelRunnerOutput:
        so = h.so
        toks, lps, top_ids, top_lps = h.outs
        t0 = time.perf_counter()
        toks = np.asarray(toks)  # [K, S]: the one device → host sync
        t1 = time.perf_counter()
        result = ModelRunnerOutput()
        want_lp = any(sr.request.sampling_params.logprobs is not None for sr in so.scheduled)
        if want_lp:
            lps, top_ids, top_lps = jax.device_get((lps, top_ids, top_lps))
        for i, sr in enumerate(so.scheduled):
            n = sr.num_scheduled_tokens
            result.sampled_token_ids[sr.request_id] = toks[:n, i].tolist()
            k = sr.request.sampling_params.logprobs
            if k is not None:
                entries = []
                for j in range(n):
                    d = {int(t): float(v) for t, v in zip(top_ids[j, i, :k], top_lps[j, i, :k])}
                    d[int(toks[j, i])] = float(lps[j, i])
                    entries.append(d)
                result.logprobs[sr.request_id] = entries
        h.wait_s, h.readback_s = t1 - t0, time.perf_counter() - t1
        return result

    def _prompt_logprobs(self, so: SchedulerOutput, hidden, hb: HostBatch, result: ModelRunnerOutput):
        """Logprobs of prompt tokens for requests that asked (OpenAI `echo` + `logprobs`).

        Position p's logits score prompt token p+1; the first prompt token has none (None)."""
        rows = [(i, sr) for i, sr in enumerate(so.scheduled)
                if sr.request.sampling_params.prompt_logprobs is not None
                and sr.num_computed_tokens < sr.request.num_prompt_tokens]
        if not rows:
            return
        targets = np.zeros(hb.bucket.num_tokens, np.int32)
        for i, sr in rows:
            req, start = sr.request, sr.num_computed_tokens
            end = min(start + sr.num_scheduled_tokens, req.num_prompt_tokens - 1)
            if end > start:
                off = hb.cu_q_lens[i]
                targets[off:off + end - start] = req.prompt_token_ids[start + 1:end + 1]
        tgt, top_ids, top_lp = jax.device_get(
            self._call(("lp", hb.bucket.num_tokens), self._prompt_lp, (self.state, hidden, targets)))
        for i, sr in rows:
            req, start = sr.request, sr.num_computed_tokens
            k = req.sampling_params.prompt_logprobs
            end = min(start + sr.num_scheduled_tokens, req.num_prompt_tokens - 1)
            entries: list[dict[int, float] | None] = [None] if start == 0 else []
            off = hb.cu_q_lens[i]
            for j in range(end - start):
                d = {int(t): float(v) for t, v in zip(top_ids[off + j, :k], top_lp[off + j, :k])}
                d[int(targets[off + j])] = float(tgt[off + j])
                entries.append(d)
            result.prompt_logprobs[sr.request_id] = entries
