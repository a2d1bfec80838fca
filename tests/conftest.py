"""Shared fixtures: tiny random Hugging Face checkpoints, one per architecture.

Each fixture is session-scoped and returns a directory holding what a real checkpoint holds:
config.json, model.safetensors, generation_config.json, and a tiny byte-level BPE tokenizer
(tokenizer.json, tokenizer_config.json with a chat template) whose bos/eos ids match the config.

    def test_x(tiny_llama_dir): LLM(model=tiny_llama_dir, ...)

``TINY_CHECKPOINTS`` names every fixture; ``make_tiny_checkpoint(kind, dir)`` builds one anywhere.
"""

from __future__ import annotations

import os

import pytest

VOCAB_SIZE = 384          # model vocab; the tokenizer uses <= this many ids
TOKENIZER_VOCAB = 320     # 256 bytes + 3 specials + ~60 merges
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny tokenizer for jaxllm tests.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Continuous batching schedules tokens, not phases.",
    "1 2 3 4 5 6 7 8 9 10 the and of to in is that it for on with as",
] * 20

_COMMON = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rms_norm_eps=1e-6, rope_theta=10000.0, dtype="float32",
)

# kind → (config class name, extra config kwargs)
TINY_SPECS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, attention_bias=False, mlp_bias=False)),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                       head_dim=32)),
    "mistral": ("MistralConfig", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=False, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, attention_bias=False)),
}
TINY_CHECKPOINTS = {kind: f"tiny_{kind}_dir" for kind in TINY_SPECS}


def make_tiny_tokenizer(out_dir: str):
    """Train a byte-level BPE on a built-in text and save it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(out_dir, save_jinja_files=False)  # chat_template inside tokenizer_config.json
    return fast


def make_tiny_checkpoint(kind: str, out_dir: str, seed: int = 0, **overrides) -> str:
    """Save a tiny random float32 HF model of ``kind`` (a TINY_SPECS key) plus tokenizer."""
    import torch
    import transformers

    cls_name, extra = TINY_SPECS[kind]
    os.makedirs(out_dir, exist_ok=True)
    tok = make_tiny_tokenizer(out_dir)
    cfg_cls = getattr(transformers, cls_name)
    config = cfg_cls(**{**_COMMON, **extra, **overrides}, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF's init has zero biases and unit norms: make them all matter.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, max_new_tokens=32)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _fixture(kind: str):
    @pytest.fixture(scope="session", name=TINY_CHECKPOINTS[kind])
    def _dir(tmp_path_factory) -> str:
        return make_tiny_checkpoint(kind, str(tmp_path_factory.mktemp(f"tiny_{kind}")))
    return _dir


tiny_llama_dir = _fixture("llama")
tiny_llama_tied_dir = _fixture("llama_tied")
tiny_mistral_dir = _fixture("mistral")
tiny_qwen2_dir = _fixture("qwen2")
tiny_qwen3_dir = _fixture("qwen3")
