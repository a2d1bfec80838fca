"""Train jaxllm's embedded demo models ("demo" ~17M params, "demo-draft" ~3M params).

Two sub-commands, so that the network-dependent part runs where a package registry is
reachable and the compute-heavy part runs on an accelerator that has no network:

  prepare  Read the reStructuredText sources of Python's documentation (Debian package
           ``python3.11-doc``, PSF License Version 2; code examples also 0BSD), clean them,
           split them by file into train / val / test, train a byte-level BPE tokenizer with
           ``tokenizers`` and write ``tokenizer/`` (HF files) plus ``{train,val,test}.npy``
           (uint16 token streams).

               apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
               python tools/train_demo_model.py prepare \
                   --sources /tmp/pydoc/usr/share/doc/python3.11-doc/html/_sources --out .demo_data

  train    Train the main model and the draft model (Llama architecture, written here in plain
           jnp + optax, independent of the engine) on the prepared streams, keep the parameters
           with the best val loss, report test perplexity, and write Hugging Face directories.

               python tools/train_demo_model.py train --data .demo_data --out /tmp/demo_out --seed 0

Everything random (init, batch order) derives from ``--seed``; the embedding lookup is a
one-hot matmul and attention is plain einsum so that no scatter-add atomics make GPU runs
differ. Sizes: both models in bf16 must fit in 40 MB together (see README_demo_section.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD) + ROLE_TOKENS  # ids 0..5 in this order
# One turn: "<|role|>\n{content}<|eos|>\n". The generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- prepare

_ROLE = re.compile(r":[a-zA-Z:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`~os.path.join` -> os.path.join
_DROP_LINE = re.compile(r"^\s*\.\. (_[^:]*:|index::|sectionauthor::|moduleauthor::|highlight::|"
                        r"testsetup::|testcleanup::|toctree::|seealso::|module::)")
_API = re.compile(r"^\.\. (function|method|class|exception|attribute|data|decorator)::\s+(.+)$")


def clean_rst(text: str) -> str:
    """Light clean-up of Sphinx markup: roles to plain names, housekeeping directives dropped."""
    out = []
    for line in text.splitlines():
        if _DROP_LINE.match(line) or line.strip().startswith(":synopsis:"):
            continue
        out.append(_ROLE.sub(lambda m: f"`{m.group(1)}`", line).rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def api_chat_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from ``.. function:: sig`` directives and their first paragraph."""
    lines, pairs = text.splitlines(), []
    for i, line in enumerate(lines):
        m = _API.match(line)
        if not m:
            continue
        sig = m.group(2).strip()
        name = sig.split("(")[0].strip()
        para, j = [], i + 1
        while j < len(lines) and (not lines[j].strip() or lines[j].lstrip().startswith(":")
                                  or _API.match(lines[j].strip())):
            j += 1
        while j < len(lines) and lines[j].startswith("   ") and lines[j].strip():
            para.append(lines[j].strip())
            j += 1
        answer = " ".join(para)
        if len(answer) >= 40 and not answer.startswith(".."):
            answer = _ROLE.sub(lambda m: f"`{m.group(1)}`", answer)
            kind = m.group(1)
            pairs.append((f"What does the Python {kind} `{name}` do?", f"`{sig}`: {answer}"))
    return pairs


def chat_text(question: str, answer: str) -> str:
    """The chat template rendered for one user turn and one assistant turn (without BOS)."""
    return f"<|user|>\n{question}{EOS}\n<|assistant|>\n{answer}"


def split_of(rel_path: str) -> str:
    """Deterministic document-level split: ~90% train, ~5% val, ~5% test."""
    h = int(hashlib.sha1(rel_path.encode()).hexdigest(), 16) % 40
    return "val" if h in (0, 1) else "test" if h in (2, 3) else "train"


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # Encoding a plain prompt prepends <|bos|> (as Llama tokenizers do); chat templates carry it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, additional_special_tokens=list(ROLE_TOKENS),
                                   model_max_length=2048, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(fast, out_dir: Path) -> None:
    """HF tokenizer files with the chat template inside tokenizer_config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["add_bos_token"] = True
    # The generic class name and key that transformers 4.x and 5.x both read.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("extra_special_tokens", None)
    cfg["additional_special_tokens"] = list(ROLE_TOKENS)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    stm = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
           "additional_special_tokens": list(ROLE_TOKENS)}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")


def cmd_prepare(args) -> None:
    src, out = Path(args.sources), Path(args.out)
    files = sorted(src.rglob("*.txt"))
    if not files:
        raise ValueError(f"sources: no *.txt files under {src}")
    docs: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    n_pairs = 0
    for f in files:
        rel = f.relative_to(src).as_posix()
        raw = f.read_text(encoding="utf-8", errors="replace")
        split = split_of(rel)
        docs[split].append(clean_rst(raw))
        for q, a in api_chat_pairs(raw):
            docs[split].append(chat_text(q, a))
            n_pairs += 1
    fast = build_tokenizer(docs["train"], args.vocab_size)
    save_tokenizer(fast, out / "tokenizer")
    bos, eos = fast.convert_tokens_to_ids(BOS), fast.convert_tokens_to_ids(EOS)
    rng = np.random.default_rng(args.seed)
    stats = {"sources": str(src), "files": len(files), "chat_pairs": n_pairs,
             "vocab_size": len(fast), "corpus": "python3.11-doc reST sources (PSF-2.0; examples 0BSD)"}
    for split, texts in docs.items():
        order = rng.permutation(len(texts)) if split == "train" else np.arange(len(texts))
        enc = fast.backend_tokenizer.encode_batch([texts[i] for i in order], add_special_tokens=False)
        stream = np.concatenate([np.asarray([bos] + e.ids + [eos], np.uint16) for e in enc])
        np.save(out / f"{split}.npy", stream)
        stats[f"{split}_docs"], stats[f"{split}_tokens"] = len(texts), int(stream.size)
        stats[f"{split}_chars"] = sum(len(t) for t in texts)
    (out / "meta.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))


# ----------------------------------------------------------------------------- model

@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Llama hyper-parameters (HF LlamaConfig names)."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 64
    vocab_size: int = 4096
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def num_params(self) -> int:
        d, f, L, hd = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.head_dim
        attn = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        return self.vocab_size * d + L * (attn + 3 * d * f + 2 * d) + d


MAIN = ModelSpec(hidden_size=512, intermediate_size=1344, num_hidden_layers=5,
                 num_attention_heads=8, num_key_value_heads=4)
DRAFT = ModelSpec(hidden_size=256, intermediate_size=640, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2)
SMOKE_MAIN = ModelSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
SMOKE_DRAFT = ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def init_params(spec: ModelSpec, key) -> dict:
    """Parameters under HF names, Linear weights as [out, in] like torch."""
    import jax
    import jax.numpy as jnp

    d, f, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    nq, nkv, L = spec.num_attention_heads, spec.num_key_value_heads, spec.num_hidden_layers
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, d)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (nq * hd, d), p + "self_attn.k_proj.weight": (nkv * hd, d),
                       p + "self_attn.v_proj.weight": (nkv * hd, d), p + "self_attn.o_proj.weight": (d, nq * hd),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    keys = jax.random.split(key, len(shapes))
    params = {}
    for k, (name, shape) in zip(keys, sorted(shapes.items())):
        std = 0.02 / math.sqrt(2 * L) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        params[name] = std * jax.random.normal(k, shape, jnp.float32)
    for i in range(L):
        params[f"model.layers.{i}.input_layernorm.weight"] = jnp.ones((d,), jnp.float32)
        params[f"model.layers.{i}.post_attention_layernorm.weight"] = jnp.ones((d,), jnp.float32)
    params["model.norm.weight"] = jnp.ones((d,), jnp.float32)
    return params


def rms_norm(x, w, eps):
    import jax.numpy as jnp
    x32 = x.astype(jnp.float32)
    y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    return (w * y).astype(x.dtype)


def rope(x, positions, theta):
    """HF Llama rotary embedding (rotate_half convention). x: [B, T, N, H], positions: [T]."""
    import jax.numpy as jnp
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    ang = positions[:, None].astype(jnp.float32) * inv_freq[None, :]        # [T, H/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[None, :, None, :]          # [1, T, 1, H]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[None, :, None, :]
    x32 = x.astype(jnp.float32)
    rot = jnp.concatenate([-x32[..., h // 2:], x32[..., : h // 2]], -1)
    return (x32 * cos + rot * sin).astype(x.dtype)


def forward(params: dict, tokens, spec: ModelSpec, dtype, dropout_key=None, dropout: float = 0.0):
    """Logits of a Llama model. tokens: i32[B, T] -> f32[B, T, V].

    ``dropout`` (training only) drops residual-branch outputs; inference has none, as in HF Llama.
    """
    import jax
    import jax.numpy as jnp

    B, T = tokens.shape
    nq, nkv, hd = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    p = {k: v.astype(dtype) for k, v in params.items()}
    emb = p["model.embed_tokens.weight"]                                    # [V, D]
    # One-hot matmul instead of a gather: its gradient is a dot, not a scatter-add (deterministic).
    x = jax.nn.one_hot(tokens, spec.vocab_size, dtype=dtype) @ emb          # x: [B, T, D]
    pos = jnp.arange(T)
    mask = jnp.tril(jnp.ones((T, T), bool))                                 # [T, S]
    keys = iter(jax.random.split(dropout_key, 2 * spec.num_hidden_layers + 1)) if dropout_key is not None else None

    def drop(y):
        if keys is None or dropout == 0.0:
            return y
        keep = jax.random.bernoulli(next(keys), 1.0 - dropout, y.shape)
        return jnp.where(keep, y / (1.0 - dropout), 0).astype(y.dtype)

    x = drop(x)
    for i in range(spec.num_hidden_layers):
        pre = f"model.layers.{i}."
        h = rms_norm(x, p[pre + "input_layernorm.weight"], spec.rms_norm_eps)
        q = (h @ p[pre + "self_attn.q_proj.weight"].T).reshape(B, T, nq, hd)    # q: [B, T, N, H]
        k = (h @ p[pre + "self_attn.k_proj.weight"].T).reshape(B, T, nkv, hd)   # k: [B, T, K, H]
        v = (h @ p[pre + "self_attn.v_proj.weight"].T).reshape(B, T, nkv, hd)
        q, k = rope(q, pos, spec.rope_theta), rope(k, pos, spec.rope_theta)
        q = q.reshape(B, T, nkv, nq // nkv, hd)                                 # [B, T, K, G, H]
        s = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32) / math.sqrt(hd)
        s = jnp.where(mask, s, -1e30)
        a = jax.nn.softmax(s, axis=-1).astype(dtype)                            # [B, K, G, T, S]
        o = jnp.einsum("bkgts,bskh->btkgh", a, v).reshape(B, T, nq * hd)
        x = x + drop(o @ p[pre + "self_attn.o_proj.weight"].T)
        h = rms_norm(x, p[pre + "post_attention_layernorm.weight"], spec.rms_norm_eps)
        g = jax.nn.silu(h @ p[pre + "mlp.gate_proj.weight"].T) * (h @ p[pre + "mlp.up_proj.weight"].T)
        x = x + drop(g @ p[pre + "mlp.down_proj.weight"].T)
    x = rms_norm(x, p["model.norm.weight"], spec.rms_norm_eps)
    return (x @ emb.T).astype(jnp.float32)                                  # tied lm_head: [B, T, V]


def token_nll(params, batch, spec, dtype, key=None, dropout=0.0):
    """Mean next-token NLL. batch: i32[B, T+1]."""
    import optax
    logits = forward(params, batch[:, :-1], spec, dtype, key, dropout)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


# ----------------------------------------------------------------------------- training

def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping [N, seq_len + 1] windows (consecutive windows share one token)."""
    n = (stream.size - 1) // seq_len
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx].astype(np.int32)


def evaluate(eval_fn, params, wins: np.ndarray, batch_size: int) -> float:
    """Mean token NLL over all windows (the last partial batch is padded and masked out)."""
    total, count = 0.0, 0
    for s in range(0, len(wins), batch_size):
        chunk = wins[s: s + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, 0)])
        per_seq = np.asarray(eval_fn(params, chunk))[:n]
        total, count = total + float(per_seq.sum()), count + n
    return total / count


def train_one(name: str, spec: ModelSpec, data: dict, args, seed: int) -> tuple[dict, dict]:
    """Train one model; returns (best params in f32, metrics)."""
    import jax
    import jax.numpy as jnp
    import optax

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    steps = args.steps if name == "demo" else args.draft_steps
    dropout = args.dropout if name == "demo" else args.draft_dropout
    decay_mask = lambda p: {k: v.ndim == 2 for k, v in p.items()}  # no decay on norm weights
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(args.warmup, steps // 10 + 1),
                                               steps, args.lr * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask))
    params = init_params(spec, jax.random.PRNGKey(seed))
    opt_state = opt.init(params)

    drop_key = jax.random.PRNGKey(seed + 1000)

    @jax.jit
    def step(params, opt_state, batch, it):
        key = jax.random.fold_in(drop_key, it)
        loss, grads = jax.value_and_grad(token_nll)(params, batch, spec, dtype, key, dropout)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def eval_fn(params, batch):  # per-sequence mean NLL: [B]
        import optax as ox
        logits = forward(params, batch[:, :-1], spec, dtype)
        return ox.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(-1)

    train = data["train"]
    val_w = windows(data["val"], args.seq_len)
    test_w = windows(data["test"], args.seq_len)
    rng = np.random.default_rng(seed)
    n_params = sum(int(v.size) for v in params.values())
    print(f"[{name}] params={n_params:,} (spec {spec.num_params():,}) steps={steps} "
          f"batch={args.batch_size}x{args.seq_len}", flush=True)
    best, last = (float("inf"), None, -1), 0
    curve, t0, loss_acc = [], time.time(), []
    for it in range(1, steps + 1):
        if time.time() - t0 > args.max_train_seconds and not loss_acc:
            print(f"[{name}] stopped by --max-train-seconds at step {it - 1}", flush=True)
            break
        starts = rng.integers(0, train.size - args.seq_len - 1, args.batch_size)
        batch = train[starts[:, None] + np.arange(args.seq_len + 1)[None, :]].astype(np.int32)
        params, opt_state, loss = step(params, opt_state, batch, it)
        loss_acc.append(loss)
        last = it
        if it % args.eval_every == 0 or it == steps or time.time() - t0 > args.max_train_seconds:
            tl = float(np.mean(jax.device_get(loss_acc)))
            loss_acc = []
            vl = evaluate(eval_fn, params, val_w, args.eval_batch_size)
            curve.append({"step": it, "train_loss": round(tl, 4), "val_loss": round(vl, 4),
                          "seconds": round(time.time() - t0, 1)})
            print(f"[{name}] step {it:5d} train {tl:.4f} val {vl:.4f} ppl {math.exp(vl):8.2f} "
                  f"t={time.time() - t0:6.1f}s", flush=True)
            if vl < best[0]:
                best = (vl, jax.device_get(params), it)
    val_loss, best_params, best_step = best
    test_loss = evaluate(eval_fn, best_params, test_w, args.eval_batch_size)
    metrics = {"name": name, "params": n_params, "steps": steps, "weight_decay": args.weight_decay, "steps_run": last, "best_step": best_step,
               "val_loss": val_loss, "val_ppl": math.exp(val_loss), "test_loss": test_loss,
               "test_ppl": math.exp(test_loss), "test_tokens": int(test_w.size - len(test_w)),
               "train_seconds": round(time.time() - t0, 1), "curve": curve,
               "spec": dataclasses.asdict(spec), "seed": seed, "lr": args.lr,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "dropout": dropout}
    print(f"[{name}] best step {best_step}: val ppl {math.exp(val_loss):.2f}, "
          f"test ppl {math.exp(test_loss):.2f}", flush=True)
    return best_params, metrics


# ----------------------------------------------------------------------------- export

def hf_config(spec: ModelSpec, tok_dir: Path) -> dict:
    tcfg = json.loads((tok_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tcfg["added_tokens"]}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim, "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps, "rope_theta": spec.rope_theta, "rope_scaling": None,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD],
        "torch_dtype": "bfloat16", "dtype": "bfloat16",
    }


def save_hf_dir(params: dict, spec: ModelSpec, tok_dir: Path, out_dir: Path, metrics: dict,
                max_shard_bytes: int) -> None:
    """Write a Hugging Face LlamaForCausalLM directory (bf16 safetensors, sharded if large)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(spec, tok_dir)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
           "pad_token_id": cfg["pad_token_id"], "do_sample": False, "max_new_tokens": 128}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / f, out_dir / f)
    tensors = {k: np.asarray(v, np.float32).astype(ml_dtypes.bfloat16) for k, v in sorted(params.items())}
    shards, cur, cur_bytes = [], {}, 0
    for k, v in tensors.items():
        if cur and cur_bytes + v.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k], cur_bytes = v, cur_bytes + v.nbytes
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / fname), metadata=meta)
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    slim = {k: v for k, v in metrics.items() if k != "curve"}
    (out_dir / "training_metrics.json").write_text(json.dumps(slim, indent=2) + "\n")


def cmd_train(args) -> None:
    import jax

    data_dir, out = Path(args.data), Path(args.out)
    data = {s: np.load(data_dir / f"{s}.npy") for s in ("train", "val", "test")}
    print(f"devices: {jax.devices()}  train/val/test tokens: "
          f"{data['train'].size:,}/{data['val'].size:,}/{data['test'].size:,}", flush=True)
    specs = {"demo": SMOKE_MAIN if args.smoke else MAIN, "demo-draft": SMOKE_DRAFT if args.smoke else DRAFT}
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    unknown = set(args.models.split(",")) - set(specs)
    if unknown:
        raise ValueError(f"models: must be a subset of {sorted(specs)}, got {sorted(unknown)}")
    t_all, summary = time.time(), {}
    for i, (name, spec) in enumerate(specs.items()):
        if name not in args.models.split(","):
            continue
        spec = dataclasses.replace(spec, vocab_size=vocab)
        params, metrics = train_one(name, spec, data, args, args.seed + i)
        save_hf_dir(params, spec, data_dir / "tokenizer", out / name, metrics, args.max_shard_mb << 20)
        summary[name] = metrics
    total_bytes = sum(m["params"] * 2 for m in summary.values())
    specs = {k: v for k, v in specs.items() if k in summary}
    summary["total_bf16_bytes"] = total_bytes
    summary["total_seconds"] = round(time.time() - t_all, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n=== summary ===")
    for name in specs:
        m = summary[name]
        c = " ".join(f"{p['step']}:{p['train_loss']:.2f}/{p['val_loss']:.2f}" for p in m["curve"])
        print(f"{name}: {m['params']:,} params, best step {m['best_step']}/{m['steps']}, "
              f"val ppl {m['val_ppl']:.2f}, test ppl {m['test_ppl']:.2f}, {m['train_seconds']}s")
        print(f"  curve step:train/val {c}")
    print(f"both models bf16: {total_bytes / 1e6:.1f} MB; total {summary['total_seconds']}s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="clean corpus, train tokenizer, tokenize (needs no accelerator)")
    p.add_argument("--sources", required=True, help="folder of *.rst.txt files (html/_sources)")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train", help="train demo + demo-draft and write HF directories")
    t.add_argument("--data", required=True, help="output folder of `prepare`")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    # Defaults = the shipped models' settings (chosen on val loss in device runs 1-2, notes/demo_model.md).
    t.add_argument("--steps", type=int, default=2000, help="main model optimizer steps")
    t.add_argument("--draft-steps", type=int, default=2500)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--eval-batch-size", type=int, default=32)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--dropout", type=float, default=0.25, help="main model residual dropout (training)")
    t.add_argument("--draft-dropout", type=float, default=0.1)
    t.add_argument("--max-train-seconds", type=float, default=1e9,
                   help="safety stop per model (the run then reports fewer steps than --steps)")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--models", default="demo,demo-draft", help="comma-separated subset to train")
    t.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    t.add_argument("--max-shard-mb", type=int, default=15, help="safetensors shard size limit (MiB)")
    t.add_argument("--smoke", action="store_true", help="tiny models, for a CPU check of the script")
    args = ap.parse_args(argv)
    for field in ("steps", "draft_steps", "batch_size", "seq_len", "eval_every", "vocab_size"):
        if getattr(args, field, 1) < 1:
            raise ValueError(f"{field}: must be >= 1, got {getattr(args, field)}")
    for field in ("dropout", "draft_dropout"):
        if not 0.0 <= getattr(args, field, 0.0) < 1.0:
            raise ValueError(f"{field}: must be in [0, 1), got {getattr(args, field)}")
    {"prepare": cmd_prepare, "train": cmd_train}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
