"""lm-evaluation-harness interop (survey §7.3.1: the reference harness everyone quotes).

Implements:
- `LlmkitEvalModel`, registered in lm-eval as model type "llmkit" (`lm_eval --model llmkit --model_args
  pretrained=smollm2-135m-instruct`), or built around any `llmkit.eval.lm.LM` (`LlmkitEvalModel(lm=...)`), so
  lm-eval's whole task catalogue runs on llmkit models through our batched, context-cached scorer;
- `write_local_tasks(data_dir, out_dir)`: lm-eval task YAMLs pointing at the SAME local files our tasks read
  (HellaSwag's 6-line text is rewritten to a jsonl in `out_dir` first; lm-eval has no reader for it), with the
  same prompt templates, so the two harnesses can be compared item by item offline.
lm-eval is optional: importing this module without it raises an ImportError that says how to install it.
"""
from __future__ import annotations

import json
from pathlib import Path

try:
    from lm_eval.api.model import LM as _LMEvalLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only where lm-eval is missing
    raise ImportError("lm-eval interop needs lm-evaluation-harness: pip install lm-eval") from e

from .lm import LM


@register_model("llmkit")
class LlmkitEvalModel(_LMEvalLM):
    def __init__(self, pretrained: str | None = None, lm: LM | None = None, batch_tokens: int | None = None,
                 max_length: int | None = None, dtype: str = "float32", **_ignored):
        super().__init__()
        if lm is None:
            if pretrained is None:
                raise ValueError("model_args needs pretrained=<llmkit.load spec>, e.g. pretrained=smollm2-135m-instruct")
            from .cli import build_lm

            lm = build_lm(pretrained, int(batch_tokens) if batch_tokens else None,
                          int(max_length) if max_length else None, str(dtype))
        self.lm = lm

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self.lm.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return [lp for lp, _ in self.lm.loglikelihood_rolling([r.args[0] for r in requests])]

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:  # lm-eval requests carry their own stop strings and lengths
            ctx, kw = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            out += self.lm.generate([ctx], max_new_tokens=int(kw.get("max_gen_toks", 256)), temperature=temp,
                                    stop=until)
        return out


def _yaml(d: dict) -> str:
    # JSON is valid YAML; it spares a PyYAML round trip of the Jinja templates
    return json.dumps(d, indent=1, ensure_ascii=False) + "\n"


def _mc(name: str, path: Path, fmt: str, text: str, choice: str, target: str, description: str = "") -> dict:
    d = {"task": name, "dataset_path": fmt, "dataset_kwargs": {"data_files": {"test": str(path)}},
         "test_split": "test", "output_type": "multiple_choice", "doc_to_text": text, "doc_to_choice": choice,
         "doc_to_target": target, "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    if description:
        d["description"] = description
    return d


def write_local_tasks(data_dir: str | Path, out_dir: str | Path,
                      tasks: tuple[str, ...] = ("hellaswag", "arc_easy", "arc_challenge", "mmlu_anatomy")) -> list[str]:
    """Write lm-eval task configs named `local_<task>` (hellaswag, arc_easy, arc_challenge, mmlu_<subject>)."""
    data, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for t in tasks:
        c = _local_config(t, data, out)
        (out / f"{c['task']}.yaml").write_text(_yaml(c))
        names.append(c["task"])
    return names


def _local_config(task: str, data: Path, out: Path) -> dict:
    if task == "hellaswag":
        from .tasks.mc import read_hellaswag_txt

        hs = out / "hellaswag_local.jsonl"
        if not hs.exists():
            docs = read_hellaswag_txt(data / "hellaswag" / "hellaswag_val_full.txt.bz2")
            hs.write_text("".join(json.dumps(d) + "\n" for d in docs))
        return _mc("local_hellaswag", hs, "json", "{{query}}", "{{choices}}", "{{gold}}")
    if task in ("arc_easy", "arc_challenge"):
        return _mc(f"local_{task}", data / "arc" / f"{task}.jsonl", "json", "{{query}}\nAnswer:", "{{choices}}", "{{gold}}")
    if task.startswith("mmlu_"):
        s = task[len("mmlu_"):]
        text = "{{question.strip()}}\nA. {{choice0}}\nB. {{choice1}}\nC. {{choice2}}\nD. {{choice3}}\nAnswer:"
        return _mc(f"local_{task}", data / "mmlu" / "test" / f"{s}_test.csv", "csv", text, '{{["A", "B", "C", "D"]}}',
                   "{{answer}}", f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n")
    raise ValueError(f"no local lm-eval config for {task!r}; supported: hellaswag, arc_easy, arc_challenge, mmlu_<subject>")


def run_lm_eval(model, tasks: list[str], include_path: str | Path, limit: int | None = None, **kw) -> dict:
    """lm_eval.simple_evaluate on `model` (an lm-eval LM or an LlmkitEvalModel) over local task configs."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_path), include_defaults=False)  # our configs only: skips indexing ~10k YAMLs
    return simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=tm, bootstrap_iters=0,
                           log_samples=True, **kw)
