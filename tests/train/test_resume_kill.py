"""E5: `llmkit pretrain` killed with SIGKILL mid-run, then `--resume`: losses bit-identical to an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

RECIPE = """
model: {{vocab_size: auto, d_model: 32, n_layers: 2, n_heads: 4, max_seq_len: 64}}
data: {{kind: text, path: {text}, val_fraction: 0.1, tokenizer: char}}
train: {{max_steps: 40, micro_batch_size: 4, batch_size: 8, seq_len: 32, lr: 3.0e-3, warmup_steps: 4,
        ckpt_every: 3, keep_last: 2, log_every: 1, eval_every: 10, eval_batches: 2, progress: false,
        tensorboard: false, seed: 7}}
"""


def _cmd(recipe, out, *extra):
    return [sys.executable, "-m", "llmkit", "pretrain", "--config", str(recipe), "--out", str(out), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _losses(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r], [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise(tmp_path):
    import json as _json_module  # the stdlib's own source is the corpus

    text = tmp_path / "corpus.txt"
    text.write_text(Path(_json_module.__file__).with_name("decoder.py").read_text() * 3)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE.format(text=text))
    ref = tmp_path / "ref"
    subprocess.run(_cmd(recipe, ref), check=True, env=_env(), cwd=REPO, capture_output=True, timeout=300)

    run = tmp_path / "killed"
    for kills in range(2):  # kill it twice at different moments, resuming in between
        proc = subprocess.Popen(_cmd(recipe, run, *(["--resume"] if kills else [])), env=_env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = 8 + 14 * kills  # wait until this many steps are logged, then kill without warning
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            m = run / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= target:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = subprocess.run(_cmd(recipe, run, "--resume"), env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _losses(run) == _losses(ref)  # every train and val loss, bit for bit
    assert len(_losses(ref)[0]) == 40
    assert (run / "report.html").exists() and (run / "loss_curve.png").exists()


def test_resume_requires_existing_run(tmp_path):
    r = subprocess.run(_cmd("shakespeare-char", tmp_path / "none", "--resume"), env=_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr
