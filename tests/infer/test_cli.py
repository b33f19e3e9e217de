"""`llmkit generate` and `llmkit chat` on a tiny checkpoint (saved with the interop writer, loaded by llmkit.load)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from engine_util import single_thread, tiny_model, tiny_tokenizer  # noqa: F401 (autouse fixture)

from llmkit.infer import cli
from llmkit.interop.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_ckpt")
    save_checkpoint(d, tiny_model("llama_gqa"), tiny_tokenizer())
    return str(d)


def test_generate_json_is_reproducible(ckpt, capsys):
    args = [ckpt, "--prompt", "The quick", "--prompt", "héllo", "--max-new-tokens", "8", "--temperature", "0.9",
            "--seed", "3", "--json"]
    assert cli.generate_main(args) == 0
    first = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(first) == 2 and all(r["completion_tokens"] <= 8 for r in first)
    cli.generate_main(args)
    assert [json.loads(x)["text"] for x in capsys.readouterr().out.splitlines()] == [r["text"] for r in first]


def test_generate_streams_chat_and_quantised(ckpt, capsys):
    for extra in ([], ["--chat", "--system", "be brief"], ["--quantize", "int8"], ["--dtype", "bfloat16"]):
        assert cli.generate_main([ckpt, "--prompt", "Hello", "--max-new-tokens", "5", *extra]) == 0
        assert capsys.readouterr().out.endswith("\n")


def test_chat_multi_turn_reset_quit(ckpt, capsys, monkeypatch):
    seen: list[str] = []
    real = cli.generate

    def recording(model, tok, prompt, *a, **kw):  # the real engine, recording the rendered conversation
        seen.append(prompt)
        return real(model, tok, prompt, *a, **kw)

    monkeypatch.setattr(cli, "generate", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nand again\n/reset\nfresh start\n/quit\nnever read\n"))
    assert cli.chat_main([ckpt, "--max-new-tokens", "4", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "[conversation reset]" in out and len(seen) == 3
    assert "hello there" in seen[1] and "and again" in seen[1] and seen[1].count("<|im_start|>assistant") == 2
    assert "hello there" not in seen[2] and "fresh start" in seen[2]


def test_chat_through_a_pipe(ckpt):
    r = subprocess.run([sys.executable, "-m", "llmkit", "chat", ckpt, "--max-new-tokens", "3", "--temperature", "0"],
                       input="hi\n/reset\nbye\n", capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") >= 3 and "[conversation reset]" in r.stdout


def test_chat_demo_streams_turns_and_reports_speed():
    import io as _io

    from llmkit.infer.demo import run_chat_demo

    buf = _io.StringIO()
    res = run_chat_demo(tiny_model("llama_gqa"), tiny_tokenizer(), max_new_tokens=4, out=buf)
    text = buf.getvalue()
    assert text.count("user>") == 3 and "tokens/s" in text
    assert len(res["turns"]) == 3 and res["decode_tok_per_s"] > 0
    assert all(t in text for t in res["turns"])
