"""The harness end to end on a tiny llmkit model: manual scoring agreement, determinism, files, CLI."""
import json

import numpy as np
import pytest
import torch

from llmkit.eval.harness import EvalConfig, evaluate
from llmkit.eval.lm import LlmkitLM
from llmkit.eval.report import plot_scaling, table
from llmkit.eval.tasks import get_task, get_tasks


def test_mc_accuracy_equals_manual_logprob_argmax(tiny, shared_data):
    model, tok = tiny
    lm = LlmkitLM(model, tok)
    task = get_task("arc_easy", shared_data)[0]
    res, samples = evaluate(lm, [task], EvalConfig(limit=6, progress=False))
    accs = []
    for d, s in zip(task.docs()[:6], samples):
        lps = []
        for ctx, cont in task.requests(d):
            c, x = lm.encode_pair(ctx, cont)
            with torch.no_grad():
                lp = model(torch.tensor([c + x]))[0].log_softmax(-1)
            lps.append(sum(float(lp[len(c) - 1 + j, t]) for j, t in enumerate(x)))
        assert np.allclose(lps, s["logprobs"], atol=1e-4)
        accs.append(float(int(np.argmax(lps)) == d["gold"]))
    r = res["results"]["arc_easy"]
    assert r["metric"] == "acc" and r["n"] == 6 and r["value"] == pytest.approx(np.mean(accs))
    assert r["stderr"] == pytest.approx(np.std(accs, ddof=1) / np.sqrt(6)) or np.std(accs) == 0


MIX = "hellaswag,mmlu_anatomy,mmlu_virology,winogrande,truthfulqa_mc2,lambada,gsm8k,arithmetic:4"


def test_run_is_deterministic_and_covers_every_kind(tiny, shared_data):
    model, tok = tiny
    cfg = EvalConfig(limit=2, num_fewshot=1, progress=False, max_new_tokens=6)
    tasks = get_tasks(MIX, shared_data)
    a, sa = evaluate(LlmkitLM(model, tok), tasks, cfg)
    b, sb = evaluate(LlmkitLM(model, tok, batch_tokens=64), tasks, cfg)
    for t in a["results"]:
        assert a["results"][t]["value"] == pytest.approx(b["results"][t]["value"], abs=1e-9), t
    assert [s.get("prompt") for s in sa] == [s.get("prompt") for s in sb]
    assert a["results"]["truthfulqa_mc2"]["metric"] == "mc2" and 0 < a["results"]["truthfulqa_mc2"]["value"] < 1
    assert a["results"]["lambada"]["metrics"]["perplexity"]["value"] > 1
    g = a["groups"]["mmlu"]
    assert g["n"] == 4 and g["acc_macro"] == pytest.approx(np.mean([a["results"][f"mmlu_{s}"]["value"] for s in ("anatomy", "virology")]))
    # a 1-shot GSM8K prompt holds one train demo with its '####' answer, then the question
    p = next(s["prompt"] for s in sa if s["task"] == "gsm8k")
    assert p.count("Question:") == 2 and "####" in p and p.endswith("\nAnswer:")


def test_cot_and_self_consistency_prompts(tiny, shared_data):
    model, tok = tiny
    lm = LlmkitLM(model, tok)
    res, samples = evaluate(lm, get_tasks("gsm8k,arithmetic:3", shared_data),
                            EvalConfig(limit=2, cot=True, num_fewshot=2, self_consistency=3, progress=False,
                                       max_new_tokens=5))
    gsm = [s for s in samples if s["task"] == "gsm8k"]
    assert gsm[0]["prompt"].startswith("Q: There are 15 trees") and gsm[0]["prompt"].count("The answer is") == 2
    ar = [s for s in samples if s["task"] == "arithmetic"]
    assert ar[0]["prompt"].count("The answer is") == 2 and " = " in ar[0]["prompt"]
    res2, _ = evaluate(lm, get_tasks("gsm8k,arithmetic:3", shared_data),
                       EvalConfig(limit=2, cot=True, num_fewshot=2, self_consistency=3, progress=False, max_new_tokens=5))
    assert json.dumps(res["results"]) == json.dumps(res2["results"])


def test_perplexity_task(tiny, shared_data):
    model, tok = tiny
    res, samples = evaluate(LlmkitLM(model, tok, max_length=64), get_tasks("wikitext", shared_data),
                            EvalConfig(limit=1, progress=False))
    m = res["results"]["wikitext"]["metrics"]
    lp, n_bytes = samples[0]["logprob"], samples[0]["bytes"]
    assert m["bits_per_byte"]["value"] == pytest.approx(-lp / n_bytes / np.log(2))
    assert m["token_perplexity"]["value"] == pytest.approx(np.exp(-lp / samples[0]["tokens"]))


def test_cli_writes_results_samples_report_and_plot(tiny, shared_data, tmp_path, capsys):
    from llmkit.eval.cli import main
    from llmkit.interop.checkpoint import save_checkpoint

    model, tok = tiny
    ck1, ck2 = tmp_path / "m1", tmp_path / "m2"
    save_checkpoint(ck1, model, tok)
    from eval_util import tiny_model

    save_checkpoint(ck2, tiny_model(tok.vocab_size, seed=1, d_model=64), tok)
    out = tmp_path / "out"
    rc = main([str(ck1), str(ck2), "--tasks", "arc_easy,arithmetic:3", "--limit", "4", "--output", str(out),
               "--data-dir", str(shared_data), "--no-progress", "--max-new-tokens", "4"])
    assert rc == 0
    r = json.loads((out / "m1" / "results.json").read_text())
    for t in ("arc_easy", "arithmetic"):
        assert {"metric", "value", "stderr", "n"} <= set(r["results"][t])
    lines = (out / "m1" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 7 and {"prompt", "target", "task"} <= set(json.loads(lines[0]))
    assert (out / "m1" / "report.md").read_text().startswith("# Evaluation")
    assert "<table>" in (out / "m1" / "report.html").read_text()
    assert (out / "scaling.png").stat().st_size > 1000 and "| arc_easy | acc |" in (out / "table.md").read_text()
    assert main(["x", "--tasks", "nope", "--no-progress"]) == 2
    assert "unknown task" in capsys.readouterr().err
