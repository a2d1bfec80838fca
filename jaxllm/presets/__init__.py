"""Model presets: the published config.json shapes of public models, for benchmarks with random
weights (``load_format="dummy"``) where no checkpoint can be downloaded.

``resolve_preset("llama-3.1-8b")`` materialises ``<cache>/presets/llama-3.1-8b/config.json`` and
returns that directory, so a preset loads through the same path as any checkpoint directory.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources

PRESETS = ("llama-3.1-8b", "llama-3.1-70b", "llama-3.2-1b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen3-8b")


def preset_config_path(name: str) -> str:
    return str(resources.files(__package__).joinpath(f"{name}.json"))


def resolve_preset(model: str) -> str:
    """Return a directory holding the preset's config.json, or ``model`` unchanged if not a preset."""
    if model not in PRESETS or os.path.isdir(model):
        return model
    base = os.environ.get("JAXLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxllm")
    out = os.path.join(base, "presets", model)
    os.makedirs(out, exist_ok=True)
    shutil.copyfile(preset_config_path(model), os.path.join(out, "config.json"))
    return out
