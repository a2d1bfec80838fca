"""jaxllm/core stays pure Python: no module in it imports jax or flax (directly)."""

import ast
import pathlib

CORE = pathlib.Path(__file__).resolve().parents[2] / "jaxllm" / "core"


def test_core_never_imports_jax():
    offenders = []
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("jax", "jaxlib", "flax")]
    assert len(list(CORE.glob("*.py"))) >= 5 and offenders == []
