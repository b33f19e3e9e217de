"""lm-evaluation-harness interop: lm-eval tasks run on llmkit models; llmkit agrees with lm-eval's own HF backend."""
import os

import numpy as np
import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmkit.eval.harness import EvalConfig, evaluate  # noqa: E402
from llmkit.eval.lm import LlmkitLM  # noqa: E402
from llmkit.eval.lm_eval_adapter import LlmkitEvalModel, run_lm_eval, write_local_tasks  # noqa: E402
from llmkit.eval.tasks import get_tasks  # noqa: E402


def _per_item(res, task):
    out = []
    for s in sorted(res["samples"][task], key=lambda s: s["doc_id"]):
        out.append(([tuple(a) for a in s["arguments"]], [r[0] for r in s["filtered_resps"]], s["acc"], s["acc_norm"]))
    return out


def test_lm_eval_task_runs_on_a_llmkit_model(tiny, shared_data, tmp_path):
    from lm_eval.api.registry import get_model

    assert get_model("llmkit") is LlmkitEvalModel
    model, tok = tiny
    lm = LlmkitLM(model, tok)
    names = write_local_tasks(shared_data, tmp_path, tasks=("arc_easy", "mmlu_anatomy"))
    ref = run_lm_eval(LlmkitEvalModel(lm=lm), names, tmp_path, limit=5)
    ours, samples = evaluate(lm, get_tasks("arc_easy,mmlu_anatomy", shared_data), EvalConfig(limit=5, progress=False))
    for ours_name, theirs in (("arc_easy", "local_arc_easy"), ("mmlu_anatomy", "local_mmlu_anatomy")):
        items = _per_item(ref, theirs)
        mine = [s for s in samples if s["task"] == ours_name]
        for (args, lps, acc, acc_norm), s in zip(items, mine):
            assert [a[0] for a in args] == [s["prompt"]] * len(args)  # the same prompt strings in both harnesses
            assert [a[1] for a in args] == s["choices"]
            assert np.allclose(lps, s["logprobs"], atol=1e-5)
            assert (acc, acc_norm) == (s["acc"], s["acc_norm"])
        assert ref["results"][theirs]["acc,none"] == pytest.approx(ours["results"][ours_name]["value"])


@pytest.mark.slow
def test_smollm2_agrees_with_lm_eval_hf_backend_per_item(shared_data, tmp_path):
    """llmkit's own GGUF loader + scorer vs lm-eval HFLM on transformers' GGUF loader: same chosen answers.
    Small n for CI; bench/eval.py runs the >= 500-item comparison."""
    import llmkit
    from lm_eval.models.huggingface import HFLM
    from llmkit.interop.loading import resolve_alias

    gguf = resolve_alias("smollm2-135m-instruct")
    n = int(os.environ.get("LLMKIT_AGREE_N", "6"))
    tasks = ("hellaswag", "arc_easy", "mmlu_anatomy", "mmlu_astronomy")
    names = write_local_tasks(shared_data, tmp_path, tasks=tasks)
    hf = HFLM(pretrained=str(gguf.parent), gguf_file=gguf.name, dtype="float32", batch_size=8, device="cpu")
    ref = run_lm_eval(hf, names, tmp_path, limit=n)
    model, tok = llmkit.load("smollm2-135m-instruct")
    ours, samples = evaluate(LlmkitLM(model, tok), get_tasks(",".join(tasks), shared_data),
                             EvalConfig(limit=n, progress=False))
    for t in tasks:
        items = _per_item(ref, f"local_{t}")
        mine = [s for s in samples if s["task"] == t]
        assert len(items) == len(mine) == n
        for (args, lps, acc, acc_norm), s in zip(items, mine):
            assert [a[0] for a in args] == [s["prompt"]] * len(args)
            assert np.allclose(lps, s["logprobs"], atol=2e-2), (t, lps, s["logprobs"])
            assert int(np.argmax(lps)) == s["pred"] and (acc, acc_norm) == (s["acc"], s["acc_norm"])
