"""Decode speed of the llmkit engine against transformers and llama.cpp, measured in one run (issue 5, "Speed").

Batch-1 greedy decoding of SmolLM2-135M-Instruct, 128 new tokens (EOS ignored), torch threads = --threads:
- llmkit: float32, bfloat16, int8 and int4 weights (native one-call decode step, llmkit/infer/native.py, through
  the `generate` API; LLMKIT_NATIVE=0 measures the PyTorch fused path instead);
- transformers `generate` in float32 and bfloat16, on the same weights (the GGUF dequantised by llmkit and
  exported as a Hugging Face directory; `--hf-gguf` loads the GGUF with transformers' own reader instead);
- llama.cpp through llama-cpp-python on the very Q4_1 GGUF (llmkit's int4 re-quantises it losslessly).
Then batched throughput at 8 and 32 prompts, llmkit vs transformers (bfloat16, left padding).
Prints tokens/s and ratios. The machine may be shared: the load average is printed with the figures.

    .venv/bin/python bench/decode.py [--threads 2] [--new-tokens 128] [--skip-batched] [--skip-hf] [--skip-llamacpp]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmkit.infer.engine import generate  # noqa: E402
from llmkit.infer.fused import enable_fast_decode  # noqa: E402
from llmkit.infer.sampling import GenerationConfig  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."
TOPICS = ["the sea", "a mountain at dawn", "autumn leaves", "a busy city street at night", "coffee", "snow",
          "an old library full of dusty books", "the moon"]


CPU: list[float] = []  # process CPU seconds of the last timed call (all threads)


def timed(fn) -> float:
    t, c = time.perf_counter(), time.process_time()
    fn()
    CPU[:] = [time.process_time() - c]
    return time.perf_counter() - t


def llmkit_decode(model, tok, text: str, n: int) -> tuple[float, list[int]]:
    cfg = GenerationConfig(max_new_tokens=n, temperature=0, eos_token_id=[])
    generate(model, tok, text, cfg.updated(max_new_tokens=4), add_special_tokens=False)  # warm-up
    out = {}
    dt = timed(lambda: out.update(c=generate(model, tok, text, cfg, add_special_tokens=False)))
    return n / dt, out["c"].token_ids


def hf_decode(model, ids: list[int], n: int) -> tuple[float, list[int]]:
    x = torch.tensor([ids])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)
        out = {}
        dt = timed(lambda: out.update(y=model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)))
    return n / dt, out["y"][0, len(ids):].tolist()


LLAMA_SCRIPT = """
import json, sys, time
from llama_cpp import Llama
path, ids, n, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)
def run(k):
    out = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(t))
        if len(out) >= k:
            break
    return out
run(4)
t, c = time.perf_counter(), time.process_time()
out = run(n)
print(json.dumps({"rate": n / (time.perf_counter() - t), "cpu": time.process_time() - c, "tokens": out}))
"""


def llamacpp_runner(path: str, ids: list[int], n: int, threads: int):
    """llama.cpp in a child process: a llama-cpp-python build using instructions the CPU (or VM) lacks dies
    with SIGILL, and that must not take the whole benchmark with it."""
    import subprocess

    import llama_cpp  # noqa: F401  (ImportError when not installed)

    def measure():
        r = subprocess.run([sys.executable, "-c", LLAMA_SCRIPT, path, json.dumps(ids), str(n), str(threads)],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"llama-cpp-python exited with {r.returncode}"
                               + (" (SIGILL: its libggml-cpu uses instructions this CPU/VM does not enable, e.g. "
                                  "AMX; rebuild it with CMAKE_ARGS=-DGGML_NATIVE=OFF)" if r.returncode == -4 else "")
                               + f": {r.stderr.strip()[-300:]}")
        d = json.loads(r.stdout.strip().splitlines()[-1])
        CPU[:] = [d["cpu"]]
        return d["rate"], d["tokens"]

    return measure


def batched(model_fn, k: int, n: int) -> float:
    model_fn(k, 2)  # warm-up
    return k * n / timed(lambda: model_fn(k, n))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-new-tokens", type=int, default=32)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--skip-batched", action="store_true")
    p.add_argument("--hf-gguf", action="store_true", help="load transformers from the GGUF (slow) instead of an export")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best round of each engine counts")
    p.add_argument("--json-out", help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import llmkit
    from llmkit.interop.loading import resolve_alias

    gguf = str(resolve_alias("smollm2-135m-instruct"))
    load0 = os.getloadavg()[0]
    base, tok = llmkit.load(gguf)
    base.eval()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = tok.encode(text)
    n = a.new_tokens
    res: dict[str, float] = {}
    toks: dict[str, list[int]] = {}
    print(f"SmolLM2-135M-Instruct, prompt {len(ids)} tokens, {n} new tokens, threads={a.threads}, "
          f"load average {load0:.1f} (2-core machine shared with other jobs)", flush=True)
    from llmkit.infer.native import load_extension

    ext = load_extension()
    print("  batch-1 steps: " + (f"native C++ step (AVX-512 {ext.avx512()}, VNNI {ext.vnni()})" if ext else
                                 "PyTorch ops (native kernels unavailable)"), flush=True)
    runners, models, hf = {}, {}, {}
    for mode in ("float32", "bfloat16", "int8", "int4"):
        m = copy.deepcopy(base)
        if mode == "bfloat16":
            m.to(torch.bfloat16)
        enable_fast_decode(m, mode if mode.startswith("int") else None)
        models[mode] = m
        runners[f"llmkit {mode}"] = (lambda m=m, k=f"llmkit {mode}": llmkit_decode(m, tok, text, n))
    if not a.skip_hf:
        import transformers

        with tempfile.TemporaryDirectory() as d:
            if a.hf_gguf:
                src = dict(pretrained_model_name_or_path=str(Path(gguf).parent), gguf_file=Path(gguf).name)
            else:
                from llmkit.interop.hf import save_hf

                save_hf(d, base, tok)
                src = dict(pretrained_model_name_or_path=d)
            for mode, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                hf[mode] = transformers.AutoModelForCausalLM.from_pretrained(**src, dtype=dt).eval()
                runners[f"transformers {mode}"] = (lambda m=hf[mode]: hf_decode(m, ids, n))
    if not a.skip_llamacpp:
        try:
            runners["llama.cpp Q4_1"] = llamacpp_runner(gguf, ids, n, a.threads)
        except ImportError:
            print("  llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python)")
    # rounds interleave the engines, so a burst of load from other jobs hits them alike; best round counts
    for r in range(a.rounds):
        for name, run in list(runners.items()):
            try:
                rate, out = run()
            except RuntimeError as e:
                print(f"  {name}: failed, dropped from the comparison: {e}", flush=True)
                del runners[name]
                continue
            cpu = CPU[0] / n
            if rate > res.get(name, 0):
                res[name], toks[name] = rate, out
                res[f"{name} [tok per cpu-s]"] = 1 / cpu
            print(f"  round {r}  {name:<22} {rate:7.1f} tok/s  ({1 / cpu:6.1f} tok per CPU-second)", flush=True)
    if "transformers float32" in toks:
        same = sum(x == y for x, y in zip(toks["llmkit float32"], toks["transformers float32"]))
        print(f"  greedy agreement llmkit vs transformers (float32): {same}/{n} tokens", flush=True)
    if not a.skip_batched:
        prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write a haiku about {t}."}],
                                           add_generation_prompt=True) for t in TOPICS * 4]
        bn = a.batch_new_tokens

        def ours(mode):
            return lambda k, new: generate(models[mode], tok, prompts[:k],
                                           GenerationConfig(max_new_tokens=new, temperature=0, eos_token_id=[]),
                                           add_special_tokens=False)

        def theirs(k, new):
            enc = [tok.encode(x) for x in prompts[:k]]
            P = max(map(len, enc))
            x = torch.tensor([[0] * (P - len(e)) + e for e in enc])
            mask = torch.tensor([[0] * (P - len(e)) + [1] * len(e) for e in enc])
            with torch.inference_mode():
                hf["bfloat16"].generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                        do_sample=False, pad_token_id=0, eos_token_id=None)

        for k in (8, 32):
            for mode in ("bfloat16", "int4"):
                res[f"batch {k} llmkit {mode}"] = batched(ours(mode), k, bn)
                print(f"  batch {k:>2} llmkit {mode:<9} {res[f'batch {k} llmkit {mode}']:7.1f} tok/s", flush=True)
            if hf:
                res[f"batch {k} transformers bfloat16"] = batched(theirs, k, bn)
                print(f"  batch {k:>2} transformers bfloat16 {res[f'batch {k} transformers bfloat16']:7.1f} tok/s",
                      flush=True)
    print("\nratios")
    ratios = {}
    pairs = [("llmkit bfloat16", "transformers bfloat16"), ("llmkit float32", "transformers float32"),
             ("llmkit int4", "llama.cpp Q4_1"), ("llmkit int8", "llama.cpp Q4_1"),
             ("batch 8 llmkit bfloat16", "batch 8 transformers bfloat16"),
             ("batch 32 llmkit bfloat16", "batch 32 transformers bfloat16"),
             ("batch 32 llmkit int4", "batch 32 transformers bfloat16")]
    for x, y in pairs:
        if x in res and y in res:
            ratios[f"{x} / {y}"] = res[x] / res[y]
            line = f"  {x} / {y}: {res[x] / res[y]:.2f}x"
            cx, cy = f"{x} [tok per cpu-s]", f"{y} [tok per cpu-s]"
            if cx in res and cy in res:  # per CPU-second: less sensitive to time lost waiting for a core
                ratios[f"{cx} / {cy}"] = res[cx] / res[cy]
                line += f"   (per CPU-second {res[cx] / res[cy]:.2f}x)"
            print(line)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"tok_per_s": res, "ratios": ratios, "threads": a.threads}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
