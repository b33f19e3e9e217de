"""`llmkit pretrain` recipes and CLI: overrides, clear errors, run directory contents, checkpoints that load."""
import json
from pathlib import Path

import pytest
import torch

from llmkit.train import checkpoint as ckpt
from llmkit.train.cli import main
from llmkit.train.config import apply_overrides, load_recipe

RECIPE = """
model: {{vocab_size: auto, d_model: 32, n_layers: 2, n_heads: 4, max_seq_len: 64}}
data: {{kind: text, path: {text}, val_fraction: 0.1, tokenizer: char}}
train: {{max_steps: 12, micro_batch_size: 4, seq_len: 32, lr: 3.0e-3, warmup_steps: 2, log_every: 2,
        eval_every: 6, eval_batches: 2, sample_every: 6, sample_tokens: 16, ckpt_every: 6, progress: false}}
"""


@pytest.mark.parametrize("name", ["demo", "shakespeare-char", "gpt2-124m", "llama-1b"])
def test_shipped_recipes_are_valid(name):
    r = load_recipe(name)
    r.train_config()
    if r.model.get("vocab_size") != "auto":
        r.model_config()


def test_overrides_address_sections():
    d = apply_overrides({"train": {"lr": 1.0}}, ["lr=3e-4", "model.n_layers=6", "train.betas=[0.9, 0.99]",
                                                 "data.path=x.txt", "train.compile=true"])
    assert d["train"] == {"lr": 3e-4, "betas": [0.9, 0.99], "compile": True}
    assert d["model"] == {"n_layers": 6} and d["data"] == {"path": "x.txt"}
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["lr"])


def test_bad_recipes_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {optimizer: lion}\n")
    with pytest.raises(ValueError, match="choose one of"):
        load_recipe(bad)
    bad.write_text("trian: {}\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown recipe sections"):
        load_recipe(bad)
    with pytest.raises(FileNotFoundError, match="shipped"):
        load_recipe("no-such-recipe")
    assert main(["--config", str(bad)]) == 2


def test_pretrain_cli_run_directory(tmp_path, capsys):
    import json as stdlib_json

    text = tmp_path / "corpus.txt"
    text.write_text(Path(stdlib_json.__file__).with_name("encoder.py").read_text() * 2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(text=text))
    out = tmp_path / "run"
    assert main(["--config", str(recipe), "--out", str(out), "train.max_steps=12"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]
    assert all(k in steps[0] for k in ("step", "loss", "tokens_per_s", "lr", "wall_time", "mfu"))
    vals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in vals] == [6, 12] and vals[0].get("sample")
    for f in ("loss_curve.png", "report.html", "recipe.json"):
        assert (out / f).stat().st_size > 0
    assert list((out / "tb").iterdir())  # TensorBoard events
    # a second run into the same directory must be explicit
    assert main(["--config", str(recipe), "--out", str(out)]) == 2
    # the checkpoint loads with the llmkit checkpoint reader and predicts like the trained model
    from llmkit.interop.checkpoint import load_checkpoint

    last = ckpt.latest_checkpoint(out / "checkpoints")
    model, tok = load_checkpoint(last)
    assert tok is not None and tok.decode(tok.encode("def f(x):")) == "def f(x):"
    state = ckpt.load_checkpoint(last)
    assert state["trainer_state"]["step"] == 12 and state["trainer_state"]["data"]["step"] > 0
    x = torch.tensor([tok.encode("import json")])
    ref = model(x)
    assert torch.isfinite(ref).all() and json.loads((last / "manifest.json").read_text())["kind"] == "checkpoint"


@pytest.mark.slow
def test_demo_hook_small(tmp_path, capsys):
    from llmkit.train.demo import run, stdlib_corpus

    corpus = stdlib_corpus(100_000)  # the Python standard library's own sources, never ../shared
    assert sum(map(len, corpus)) >= 80_000 and any("def " in t for t in corpus)
    out = run(tmp_path / "demo", corpus_texts=corpus,
              overrides=["train.max_steps=6", "train.eval_every=3", "train.sample_every=3", "train.log_every=2",
                         "train.progress=false", "train.micro_batch_size=4", "data.tokenizer_vocab=400"])
    text = capsys.readouterr().out
    assert "sample" in text and (out / "loss_curve.png").exists() and (out / "report.html").exists()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 6 and any("val_loss" in r for r in recs)


@pytest.mark.parametrize("extra, msg", [("arch: encoder_decoder, pos: t5, tie_embeddings: false",
                                         "encoder-decoder model is refused"),
                                        ("tie_embeddings: true", "tied input/output embeddings")])
def test_pipeline_refusals_reach_the_user_plainly(tmp_path, extra, msg):
    """What a layout refuses (here `pipeline.make_stage` on the last of 2 stages) ends `llmkit pretrain` with the
    refusal itself, not a traceback: `build_run` turns the Trainer's ValueError into SystemExit."""
    from llmkit.train.cli import build_run
    from llmkit.train.pipeline import make_stage

    class TwoStages:  # the Trainer's pipeline test is `pipeline_step`; `wrap` cuts the stage as PipelineDist does
        pipeline_step, rank, world_size, device = None, 1, 2, torch.device("cpu")

        def wrap(self, model):
            return make_stage(model, 1, 2)

    text = tmp_path / "c.txt"
    text.write_text("to be or not to be " * 200)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(text=text).replace("max_seq_len: 64}", f"max_seq_len: 64, {extra}}}"))
    with pytest.raises(SystemExit, match="llmkit pretrain: .*" + msg):
        build_run(load_recipe(str(recipe)), tmp_path / "run", dist=TwoStages())


def test_pretrain_cli_glm_blank_infilling(tmp_path):
    """`data.objective: glm` with `model.block_pos: true`, short blanks mixed with [gMASK] rows: the vocabulary grows
    by the special ids ([MASK], [START], [END], [gMASK] among them), the batches carry 2D positions, validation and
    samples run, and the checkpoint loads as a model that reads block positions."""
    from llmkit.interop.checkpoint import load_checkpoint

    text = tmp_path / "c.txt"
    text.write_text("to be or not to be, that is the question " * 200)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(text=text).replace("max_seq_len: 64}", "max_seq_len: 64, block_pos: true}")
                      .replace("tokenizer: char}", "tokenizer: char, objective: glm, n_sentinels: 8,\n"
                                                                   "       glm_gmask_prob: 0.3}"))
    out = tmp_path / "run"
    assert main(["--config", str(recipe), "--out", str(out)]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [r["step"] for r in recs if "val_loss" in r] == [6, 12]
    model, tok = load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))
    assert model.cfg.block_pos and model.cfg.vocab_size == tok.vocab_size + 3 + 8
