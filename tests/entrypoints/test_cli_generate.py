"""`jaxllm generate`: prompts as arguments and from a JSON-lines file, --json, --chat, --stream, errors."""

import json

from jaxllm.entrypoints.cli import main

ENGINE = ["--dtype", "float32", "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--num-kv-blocks", "40"]


def test_generate_json_and_prompts_file(tiny_llama_dir, tmp_path, capsys):
    pf = tmp_path / "p.jsonl"
    pf.write_text(json.dumps({"prompt": "Hello world", "max_tokens": 3}) + "\n" + json.dumps("The quick") + "\n")
    rc = main(["generate", "--model", tiny_llama_dir, *ENGINE, "--prompts-file", str(pf), "fox jumps",
               "--max-tokens", "5", "--json", "--ignore-eos"])
    assert rc == 0
    cap = capsys.readouterr()
    rows = [json.loads(line) for line in cap.out.splitlines()]
    assert [r["prompt"] for r in rows] == ["fox jumps", "Hello world", "The quick"]
    assert [len(r["outputs"][0]["token_ids"]) for r in rows] == [5, 3, 5]
    assert "output tok/s" in cap.err and "start-up" in cap.err


def test_generate_chat_stream(tiny_llama_dir, capsys):
    rc = main(["generate", "--model", tiny_llama_dir, *ENGINE, "--chat", "--stream", "Hi there",
               "--max-tokens", "4", "--ignore-eos"])
    assert rc == 0
    assert capsys.readouterr().out.strip() != ""


def test_generate_errors_are_one_clear_line(tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path / "missing"), "x"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "model" in err and "missing" in err and "Traceback" not in err


def test_cli_process_loads_config_and_tokenizer_without_torch(tiny_llama_dir):
    """The console script keeps torch (seconds of import on a CUDA machine) out of its process,
    and the config and tokenizer it loads are the same as with torch."""
    import subprocess
    import sys

    code = (
        "import sys, json\n"
        "from jaxllm.entrypoints.cli import _transformers_without_torch\n"
        "_transformers_without_torch()\n"
        "from jaxllm.engine.model_loading import load_tokenizer\n"
        "from jaxllm.models.hf_config import model_args\n"
        "from transformers import AutoConfig\n"
        f"path = {tiny_llama_dir!r}\n"
        "args = model_args(AutoConfig.from_pretrained(path), use_sliding_window=False)\n"
        "ids = load_tokenizer(path)('Hello world').input_ids\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'args': repr(args), 'ids': ids}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["torch"] is False
    from transformers import AutoConfig

    from jaxllm.engine.model_loading import load_tokenizer
    from jaxllm.models.hf_config import model_args
    assert got["args"] == repr(model_args(AutoConfig.from_pretrained(tiny_llama_dir), use_sliding_window=False))
    assert got["ids"] == load_tokenizer(tiny_llama_dir)("Hello world").input_ids
