"""`llmkit VERB ...`: one verb per stage of the survey's lifecycle.

Each verb lives with its stage as a plain `main(argv) -> int` whose argparse help is its documentation;
this file only dispatches, importing a stage lazily so that `llmkit generate` never imports the data stack.
"""
from __future__ import annotations

import importlib
import sys

VERBS: dict[str, tuple[str, str]] = {
    # verb: (module:function, one-line help)
    "data": ("llmkit.data.cli:main", "clean, mix and tokenize pre-training data (survey §4.1)"),
    "tokenizer": ("llmkit.tokenizer.cli:main", "train or inspect a tokenizer (BPE, Unigram, WordPiece)"),
    "pretrain": ("llmkit.train.cli:main", "pre-train a model from a YAML recipe (survey §4.3)"),
    "scaling": ("llmkit.train.scaling_cli:main", "fit scaling laws on a ladder of runs (survey §2.1)"),
    "sft": ("llmkit.adapt.cli:sft_main", "instruction tuning (survey §5.1)"),
    "rm": ("llmkit.adapt.cli:rm_main", "reward-model training (survey §5.2)"),
    "dpo": ("llmkit.adapt.cli:dpo_main", "direct preference optimisation (survey §5.2)"),
    "ppo": ("llmkit.adapt.cli:ppo_main", "RLHF with PPO (survey §5.2)"),
    "grpo": ("llmkit.adapt.cli:grpo_main", "GRPO with verifiable rewards"),
    "quantize": ("llmkit.adapt.cli:quantize_main", "post-training quantization (survey §5.4)"),
    "eval": ("llmkit.eval.cli:main", "evaluate a model on benchmark tasks (survey §7)"),
    "generate": ("llmkit.infer.cli:generate_main", "generate text from a prompt"),
    "chat": ("llmkit.infer.cli:chat_main", "interactive streaming chat"),
    "serve": ("llmkit.infer.server:main", "OpenAI-compatible server with a web chat page"),
    "convert": ("llmkit.interop.cli:main", "convert between llmkit, Hugging Face and GGUF formats"),
    "demo": ("llmkit.demo:main", "run the end-to-end demo on embedded defaults"),
}


def usage() -> str:
    lines = ["usage: llmkit VERB [options]   (llmkit VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {v:<10} {h}" for v, (_, h) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"llmkit: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    target = VERBS[verb][0]
    mod_name, fn_name = target.split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        print(f"llmkit {verb}: this verb is not available in this build ({e})", file=sys.stderr)
        return 2
    return int(fn(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
