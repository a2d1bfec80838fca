"""The shipped demo models (jaxllm/demo_models) and their trainer (tools/train_demo_model.py).

- the resolver maps "demo" / "demo-draft" to the shipped directories;
- the shipped files match CHECKSUMS.sha256 and fit the 40 MB bf16 budget;
- transformers loads them, they are trained (low perplexity on Python-doc prose), and jaxllm's
  greedy continuation equals transformers' (float32);
- the trainer's JAX Llama equals transformers' LlamaForCausalLM on the checkpoint it exports.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxllm.demo_models import CHECKSUMS_FILE, DEMO_DIR, resolve_model_path
from tests.utils import check_logprobs_close, jaxllm_seqs

NAMES = ("demo", "demo-draft")
REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["The json module", "To read a file line by line,", "A list comprehension"]
MAX_TOKENS = 16
# Prose in the style of the training corpus, written for this test (not copied from it).
PROSE = ("The function returns a new list containing the items of the iterable. If the optional "
         "argument is given, it is used as the default value. This module provides functions "
         "for working with files and directories.")


def _trainer():
    spec = importlib.util.spec_from_file_location("train_demo_model", REPO / "tools" / "train_demo_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _hf_greedy(model_dir: str, prompts: list[list[int]], max_tokens: int, top_k: int = 5):
    """Greedy float32 generation with transformers: (token_ids, [{token_id: logprob}]) per prompt.

    Unlike ``tests.utils.hf_greedy`` this passes an explicit attention mask: that helper sets
    ``pad_token_id=0``, and the demo tokenizer's id 0 is <|bos|>, which HF would then mask out.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            # No EOS stop; raw logits (processed scores would be renormalized by logits processors).
            g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                               do_sample=False, output_logits=True, return_dict_in_generate=True,
                               eos_token_id=None, pad_token_id=model.config.pad_token_id)
        toks = g.sequences[0, x.shape[1]:].tolist()
        assert len(toks) == max_tokens
        lps = []
        for step, tok in zip(g.logits, toks):
            logp = torch.log_softmax(step[0].float(), -1)
            vals, idx = logp.topk(top_k)
            lps.append({**{int(k): float(v) for k, v in zip(idx, vals)}, tok: float(logp[tok])})
        out.append((toks, lps))
    return out


# ----------------------------------------------------------------------------- shipped files

def test_resolver_maps_shipped_names():
    for name in NAMES:
        path = Path(resolve_model_path(name))
        assert path == DEMO_DIR / name
        assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert resolve_model_path("/some/where/llama") == "/some/where/llama"
    assert resolve_model_path("demo2") == "demo2"
    with pytest.raises(ValueError, match="model"):
        resolve_model_path(None)


def test_checksums_match_shipped_files():
    listed = {}
    for line in CHECKSUMS_FILE.read_text().splitlines():
        digest, rel = line.split(maxsplit=1)
        listed[rel] = digest
    shipped = {p.relative_to(DEMO_DIR).as_posix() for name in NAMES
               for p in (DEMO_DIR / name).rglob("*") if p.is_file()}
    assert set(listed) == shipped, "CHECKSUMS.sha256 must list exactly the shipped files"
    for rel, digest in listed.items():
        assert hashlib.sha256((DEMO_DIR / rel).read_bytes()).hexdigest() == digest, rel


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [model_dir / "model.safetensors"]


def test_shipped_weights_are_bf16_tied_and_within_budget():
    from safetensors import safe_open

    total_bytes = 0
    for name in NAMES:
        model_dir = DEMO_DIR / name
        cfg = json.loads((model_dir / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
        assert cfg["max_position_embeddings"] == 2048
        names = set()
        for f in _weight_files(model_dir):
            assert f.stat().st_size < 16 * 2**20, f"{f.name}: shards stay under 16 MiB"
            with safe_open(str(f), framework="np") as st:
                for key in st.keys():
                    sl = st.get_slice(key)
                    assert sl.get_dtype() == "BF16", key
                    total_bytes += 2 * math.prod(sl.get_shape())
                    names.add(key)
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
        L = cfg["num_hidden_layers"]
        assert f"model.layers.{L - 1}.mlp.down_proj.weight" in names
        assert len(names) == 9 * L + 2  # 7 linears + 2 norms per layer, embedding, final norm
    assert total_bytes <= 40e6, f"both models take {total_bytes / 1e6:.1f} MB in bf16 (budget 40 MB)"


# ----------------------------------------------------------------------------- transformers

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model_path("demo"))


def test_tokenizer_special_tokens_and_chat_template(tokenizer):
    cfg = json.loads((DEMO_DIR / "demo" / "config.json").read_text())
    ids = tokenizer("Hello, wörld: `os.path`")["input_ids"]
    assert ids[0] == cfg["bos_token_id"] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id == cfg["eos_token_id"] and tokenizer.pad_token_id == cfg["pad_token_id"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello, wörld: `os.path`"
    assert len(tokenizer) == cfg["vocab_size"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is a tuple?"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|user|>\nWhat is a tuple?<|eos|>\n<|assistant|>\n"
    for name in NAMES:  # one tokenizer for both, so the draft can verify the main model's tokens
        assert (DEMO_DIR / name / "tokenizer.json").read_bytes() == \
            (DEMO_DIR / "demo" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_models_are_trained(name, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(PROSE)["input_ids"]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    # A random model scores ~ln(4096) = 8.3 nats; the trained ones reach ~2.7 on held-out docs.
    assert math.exp(loss) < 60, f"{name}: perplexity {math.exp(loss):.1f} on English prose"


@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers(name, tokenizer):
    from jaxllm import LLM, SamplingParams

    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    model_dir = resolve_model_path(name)
    want = _hf_greedy(model_dir, prompts, MAX_TOKENS)
    llm = LLM(name, dtype="float32", max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256,
              precompile=False, progress=False)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts  # the engine encodes text as HF does
    got = jaxllm_seqs(outs)
    check_logprobs_close(got, want, "jaxllm", "hf")
    for (ids, lps), (ref_ids, ref_lps), out in zip(got, want, outs):
        assert ids == ref_ids  # float32 on both sides: the same greedy continuation
        np.testing.assert_allclose([lp[t] for lp, t in zip(lps, ids)],
                                   [lp[t] for lp, t in zip(ref_lps, ref_ids)], atol=1e-3)
        assert out.outputs[0].text == tokenizer.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- the trainer

def test_trainer_model_equals_transformers_on_its_export(tmp_path):
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    tr = _trainer()
    spec = tr.ModelSpec(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=4096)
    params = tr.init_params(spec, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    # Non-trivial norms and larger weights, so that a wrong layout or RoPE convention shows.
    params = {k: v * 8 if v.ndim == 2 else v + jnp.asarray(rng.normal(0, 0.2, v.shape), jnp.float32)
              for k, v in params.items()}
    tr.save_hf_dir(params, spec, DEMO_DIR / "demo", tmp_path, {"name": "t"}, max_shard_bytes=1 << 17)
    assert (tmp_path / "model.safetensors.index.json").is_file()  # sharded at this size
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = rng.integers(0, spec.vocab_size, (2, 23))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    bf16 = {k: jnp.asarray(v).astype(jnp.bfloat16).astype(jnp.float32) for k, v in params.items()}
    got = np.asarray(tr.forward(bf16, jnp.asarray(tokens), spec, jnp.float32))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def test_trainer_corpus_cleaning_and_tokenizer():
    tr = _trainer()
    rst = (".. _json-mod:\n\n:mod:`json` --- JSON\n====================\n\n"
           ".. function:: dumps(obj, *, indent=None)\n\n   Serialize *obj* to a JSON formatted "
           ":class:`str` using :func:`~json.encoder.JSONEncoder`.\n\n   More text.\n")
    clean = tr.clean_rst(rst)
    assert ".. _json-mod:" not in clean and ":func:" not in clean and "`json.encoder.JSONEncoder`" in clean
    pairs = tr.api_chat_pairs(rst)
    assert len(pairs) == 1 and "`dumps`" in pairs[0][0] and "Serialize *obj*" in pairs[0][1]
    assert "More text" not in pairs[0][1]  # first paragraph only
    assert tr.split_of("library/json.rst.txt") == tr.split_of("library/json.rst.txt")

    fast = tr.build_tokenizer([clean * 3, "hello world " * 50], vocab_size=300)
    assert [fast.convert_tokens_to_ids(t) for t in tr.SPECIAL_TOKENS] == list(range(6))
    ids = fast("hello JSON")["input_ids"]
    assert ids[0] == 0 and fast.decode(ids, skip_special_tokens=True) == "hello JSON"
    with pytest.raises(ValueError, match="dropout"):
        tr.main(["train", "--data", "x", "--out", "y", "--dropout", "1.5"])
    with pytest.raises(ValueError, match="steps"):
        tr.main(["train", "--data", "x", "--out", "y", "--steps", "0"])
