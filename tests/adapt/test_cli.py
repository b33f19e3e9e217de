"""`llmkit sft|rm|dpo|ppo|grpo|quantize` end to end on a tiny checkpoint: resumable runs, outputs, manifests."""
import json

import pytest
import torch
import yaml

from llmkit.adapt import cli
from llmkit.adapt.quantize_cli import load_quantized
from llmkit.adapt.quantize_cli import main as quantize_main
from llmkit.adapt.rewards import arithmetic_problems

COMMON_TRAIN = {"micro_batch_size": 4, "seq_len": 64, "lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0,
                "log_every": 1, "progress": False, "tensorboard": False, "device": "cpu"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny llmkit checkpoint with a ChatML BPE tokenizer trained on arithmetic text."""
    from llmkit.interop.checkpoint import save_checkpoint
    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer
    from llmkit.tokenizer.train import train_tokenizer

    texts = [p["question"] + " " + p["solution"] for p in arithmetic_problems(300, seed=5)]
    tok = train_tokenizer(texts, None, vocab_size=300, chat_template="chatml", min_frequency=1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d = tmp_path_factory.mktemp("base") / "ckpt"
    save_checkpoint(d, Transformer(cfg), tok)
    return d


def _recipe(tmp_path, name, base, **sections):
    train = {**COMMON_TRAIN, **sections.pop("train", {})}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"base": str(base), "train": train, **sections}))
    return str(p)


def test_sft_lora_resume_and_outputs(tmp_path, base):
    import llmkit
    from llmkit.artifacts import verify_manifest

    r = _recipe(tmp_path, "sft", base, data={"kind": "arithmetic", "n": 64, "max_len": 48, "packed": True, "val_fraction": 0.1},
                peft={"kind": "lora", "r": 4, "alpha": 8, "targets": ["q", "v", "up"]}, train={"max_steps": 3, "ckpt_every": 2})
    out = tmp_path / "run"
    assert cli.sft_main(["--config", r, "--out", str(out)]) == 0
    assert cli.sft_main(["--config", r, "--out", str(out)]) == 2  # refuses to overwrite without --resume
    assert cli.sft_main(["--config", r, "--out", str(out), "--resume", "train.max_steps=5"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if "loss" in x and "event" not in x][-1] == 5
    assert (out / "report.html").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
    man = json.loads((out / "final" / "manifest.json").read_text())
    assert man["parents"][0]["path"] == str(base) and man["config"]["peft"]["r"] == 4
    verify_manifest(out / "final")
    model, tok = llmkit.load(out / "final")
    assert model.cfg.vocab_size == tok.vocab_size


@pytest.mark.slow
def test_rm_dpo_grpo_ppo_quantize_run(tmp_path, base, shared_data):
    hh = str(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz")
    r = _recipe(tmp_path, "rm", base, data={"kind": "hh_rlhf", "paths": [hh], "limit": 40, "max_len": 48},
                train={"max_steps": 2})
    assert cli.rm_main(["--config", r, "--out", str(tmp_path / "rm")]) == 0
    assert (tmp_path / "rm" / "final" / "reward_head.safetensors").exists()
    assert "val_pair_acc" in json.loads((tmp_path / "rm" / "summary.json").read_text())
    r = _recipe(tmp_path, "dpo", base, data={"kind": "arithmetic", "n": 32, "max_len": 48}, method={"beta": 0.1},
                train={"max_steps": 2})
    assert cli.dpo_main(["--config", r, "--out", str(tmp_path / "dpo")]) == 0
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - 0.6931) < 1e-3  # step 1: policy = reference
    r = _recipe(tmp_path, "grpo", base, data={"kind": "arithmetic", "n": 16},
                method={"group": 4, "prompts_per_step": 2, "max_new_tokens": 6}, train={"max_steps": 2})
    assert cli.grpo_main(["--config", r, "--out", str(tmp_path / "grpo")]) == 0
    r = _recipe(tmp_path, "ppo", tmp_path / "rm" / "final", data={"kind": "arithmetic", "n": 16},
                method={"rollout_batch": 8, "ppo_epochs": 1, "max_new_tokens": 6, "reward": str(tmp_path / "rm" / "final")},
                train={"max_steps": 2})
    assert cli.ppo_main(["--config", r, "--out", str(tmp_path / "ppo")]) == 0
    rec = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"pg_loss", "vf_loss", "score", "kl"} <= set(rec)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(p["question"] + " " + p["solution"] for p in arithmetic_problems(200, seed=9)))
    q = tmp_path / "q.yaml"
    q.write_text(yaml.safe_dump({"base": str(base), "method": {"kind": "gptq", "bits": 4, "group_size": 8},
                                 "data": {"path": str(text), "seq_len": 32, "calib_batches": 4, "eval_batches": 4}}))
    assert quantize_main(["--config", str(q), "--out", str(tmp_path / "q")]) == 0
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    model, _ = load_quantized(tmp_path / "q" / "final")
    from llmkit.adapt.quantize_cli import perplexity
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    assert perplexity(model, [ids]) > 0 and rep["ppl_quantized"] > 0


def test_recipe_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("base: x\nbogus: 1\n")
    assert cli.sft_main(["--config", str(p)]) == 2
    assert cli.sft_main(["--config", "no-such-recipe"]) == 2


def test_demo_hook_runs(tmp_path, base, capsys):
    import llmkit
    from llmkit.adapt import demo

    model, tok = llmkit.load(base)
    out = demo.run(model, tok, tmp_path / "demo", sft_steps=3, grpo_steps=1, budget_s=60)
    assert out[0] is model
    text = capsys.readouterr().out
    assert "before: exact-match accuracy" in text and "after SFT" in text and "adaptation: held-out accuracy" in text
