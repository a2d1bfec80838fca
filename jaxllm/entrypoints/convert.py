"""`jaxllm convert`: a Hugging Face checkpoint → an orbax checkpoint directory.

    jaxllm convert --model HF_DIR --output DIR [--dtype bfloat16]
    jaxllm generate --model DIR --load-format orbax -tp 4 "Hello"

The weights are loaded with the ordinary loader on one device (no mesh, so the ORIGINAL kv
heads are stored and the result restores at any tensor-parallel size), written with orbax
(see ``jaxllm.models.orbax_io``), and config.json (dtype set to the stored one), the generation
config and the tokenizer files are copied beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

from jaxllm.models import orbax_io

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "bfloat16", "float16", "float32")
# Weight files of the source are not copied (everything else at the top level is: tokenizer,
# generation config, chat template, README, ...).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf", ".ckpt")
_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _copy_side_files(src: str, dst: str) -> list[str]:
    copied = []
    for name in sorted(os.listdir(src)):
        full = os.path.join(src, name)
        if (not os.path.isfile(full) or name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_FILES
                or name == orbax_io.MARKER_FILE):
            continue
        shutil.copyfile(full, os.path.join(dst, name))
        copied.append(name)
    return copied


def _prepare_output(output: str, model_dir: str, overwrite: bool) -> None:
    if os.path.abspath(output) == os.path.abspath(model_dir):
        raise ValueError(f"output: must differ from the source checkpoint directory {model_dir!r}")
    if os.path.exists(output):
        if not os.path.isdir(output):
            raise ValueError(f"output: {output!r} exists and is not a directory")
        if os.listdir(output):
            if not overwrite:
                raise ValueError(f"output: {output!r} exists and is not empty (pass --overwrite to "
                                 f"replace it)")
            shutil.rmtree(output)
    os.makedirs(output, exist_ok=True)


def convert(model: str, output: str, *, dtype: str = "auto", load_format: str = "auto", seed: int = 0,
            overwrite: bool = False) -> dict:
    """Convert the checkpoint ``model`` (a directory or shipped name) into ``output``.

    Args:
        model: source Hugging Face checkpoint directory (or "demo", a preset, ...).
        output: new directory for the orbax checkpoint (must be empty unless ``overwrite``).
        dtype: dtype of the stored parameters; "auto" keeps the checkpoint's.
        load_format: "auto" (the safetensors weights) or "dummy" (random weights, for benchmarks).
        seed: seed of dummy weights.
        overwrite: replace a non-empty ``output``.

    Returns:
        The marker written to ``output/jaxllm_orbax.json``.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxllm.config import ModelConfig
    from jaxllm.engine.model_loading import resolve_model_path
    from jaxllm.models.hf_config import load_hf_config
    from jaxllm.models.loader import load_model

    if dtype not in _DTYPES:
        raise ValueError(f"dtype: must be one of {_DTYPES}, got {dtype!r}")
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format: convert reads 'auto' (safetensors) or 'dummy', got {load_format!r}")
    src = resolve_model_path(model)
    hf_config = load_hf_config(src)
    _prepare_output(output, src, overwrite)

    t0 = time.perf_counter()
    mc = ModelConfig(model=src, dtype=dtype, load_format=load_format, seed=seed)
    net = load_model(mc, hf_config)  # no mesh: original kv heads, one device
    t_load = time.perf_counter() - t0
    nbytes = orbax_io.save_params(net, os.path.join(output, orbax_io.PARAMS_DIR))
    t_save = time.perf_counter() - t0 - t_load

    copied = _copy_side_files(src, output)
    leaves = jax.tree.leaves(nnx.state(net, nnx.Param))
    param_dtype = jnp.dtype(leaves[0].dtype).name  # every parameter has the model's dtype
    with open(os.path.join(output, "config.json")) as f:
        cfg = json.load(f)
    cfg["dtype"] = param_dtype  # so dtype="auto" on the converted directory means the stored dtype
    cfg.pop("torch_dtype", None)
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)

    marker = {
        "format_version": orbax_io.FORMAT_VERSION,
        "dtype": param_dtype,
        "architecture": (getattr(hf_config, "architectures", None) or ["?"])[0],
        "num_key_value_heads": int(net.config.num_key_value_heads),
        "num_parameters": int(sum(x.size for x in leaves)),
        "source": os.path.abspath(src),
        "source_load_format": load_format,
        "copied_files": copied,
    }
    with open(os.path.join(output, orbax_io.MARKER_FILE), "w") as f:
        json.dump(marker, f, indent=2)
    logger.info("Converted %s → %s: load %.2fs, save %.2fs", src, output, t_load, t_save)
    print(f"[jaxllm] converted {src} → {output}: {marker['num_parameters'] / 1e6:.1f}M parameters "
          f"({nbytes / 2**20:.1f} MiB {param_dtype}), load {t_load:.1f}s, save {t_save:.1f}s",
          file=sys.stderr)
    return marker


def cmd_convert(args: argparse.Namespace) -> int:
    convert(args.model, args.output, dtype=args.dtype, load_format=args.load_format, seed=args.seed,
            overwrite=args.overwrite)
    return 0


def add_convert_args(subparsers) -> None:
    p = subparsers.add_parser("convert", help="write an orbax checkpoint (load it with --load-format orbax)")
    p.add_argument("--model", required=True, help="source Hugging Face checkpoint directory (or shipped name)")
    p.add_argument("--output", required=True, help="new directory for the orbax checkpoint")
    p.add_argument("--dtype", default="auto", choices=list(_DTYPES), help="dtype of the stored parameters")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="'dummy': random weights with the model's shapes (benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="seed of dummy weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.set_defaults(func=cmd_convert)
