"""The demo models shipped inside the package (issue 7).

``demo`` is a 16.4M-parameter Llama (5 layers, d=512, GQA 8q/4kv heads) and ``demo-draft`` a
3.1M-parameter Llama (3 layers, d=256) with the same 4096-token byte-level BPE tokenizer, both
trained by ``tools/train_demo_model.py`` on the reStructuredText sources of Python 3.11's
documentation (PSF License). They are Hugging Face ``LlamaForCausalLM`` directories in bf16,
so transformers loads them too. See README ("Demo model") for the training command and results.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
SHIPPED = {"demo": DEMO_DIR / "demo", "demo-draft": DEMO_DIR / "demo-draft"}
CHECKSUMS_FILE = DEMO_DIR / "CHECKSUMS.sha256"


def resolve_model_path(name: str) -> str:
    """Map a shipped model name to its directory; return any other name or path unchanged.

    Args:
      name: "demo", "demo-draft", or a path to a Hugging Face checkpoint directory.

    Returns:
      The directory of the shipped model for "demo" / "demo-draft", else ``name`` itself.
    """
    if not isinstance(name, str):
        raise ValueError(f"model: must be a str (a shipped name {sorted(SHIPPED)} or a path), "
                         f"got {type(name).__name__}")
    path = SHIPPED.get(name)
    return str(path) if path is not None else name
