"""Continuous batching (batcher.py): concurrent rows give the one-at-a-time results and really share steps."""
import threading
import time

import pytest
import torch

from llmkit.infer.batcher import Batcher, Request
from llmkit.infer.sampling import GenerationConfig
from llmkit.model import ModelConfig, Transformer
from serve_util import one_torch_thread  # noqa: F401  (autouse fixture)

V = 97


def make_model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512, **kw)).eval()


@torch.no_grad()
def reference_greedy(m, prompt, n, eos=()):
    """Full recomputation, no cache, batch 1: the plainest possible greedy decode."""
    ids = list(prompt)
    for _ in range(n):
        t = int(m(torch.tensor([ids]))[0, -1].argmax())
        ids.append(t)
        if t in eos:
            break
    return ids[len(prompt):]


def run(batcher, jobs, gap=0.0, timeout=60):
    """Submit (prompt, GenerationConfig) jobs `gap` seconds apart; returns [(tokens, finish_reason)]."""
    outs = [[[], None] for _ in jobs]
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(tok, reason):
            if tok is not None:
                outs[i][0].append(tok)
            if reason is not None:
                outs[i][1] = reason
                done.release()
        return emit

    reqs = []
    for i, (p, cfg) in enumerate(jobs):
        reqs.append(batcher.submit(Request(p, cfg, emitter(i))))
        if gap:
            time.sleep(gap)
    for _ in jobs:
        assert done.acquire(timeout=timeout), "a request never finished"
    return outs, reqs


def random_jobs(n, seed=1, max_new=(1, 60)):
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for _ in range(n):
        P = int(torch.randint(1, 40, (1,), generator=g))
        prompt = torch.randint(0, V, (P,), generator=g).tolist()
        jobs.append((prompt, GenerationConfig(max_new_tokens=int(torch.randint(*max_new, (1,), generator=g)), temperature=0)))
    return jobs


@pytest.mark.parametrize("variant", [{}, {"pos": "alibi", "norm": "layernorm"}, {"sliding_window": 8}])
def test_concurrent_greedy_equals_one_at_a_time_and_shares_steps(variant):
    m = make_model(**variant)
    jobs = random_jobs(16)
    b = Batcher(m, max_batch=8).start()
    try:
        outs, _ = run(b, jobs, gap=0.003)  # staggered: requests join a batch that is already decoding
    finally:
        b.stop()
    for (prompt, cfg), (toks, reason) in zip(jobs, outs):
        assert toks == reference_greedy(m, prompt, cfg.max_new_tokens)
        assert reason == "length"
    st = b.stats
    # rows really shared decode steps: far fewer steps than tokens, and most steps carried > 1 row
    assert st["max_rows"] > 1 and st["batched_steps"] > st["steps"] // 2
    assert st["row_steps"] > 2 * st["steps"]
    seq = Batcher(m, max_batch=1).start()  # one at a time through the same engine
    try:
        outs1, _ = run(seq, jobs[:4])
    finally:
        seq.stop()
    assert [o[0] for o in outs1] == [o[0] for o in outs[:4]]
    assert seq.stats["batched_steps"] == 0


def test_eos_finishes_a_row_and_is_not_emitted():
    m = make_model()
    prompt = [5, 6, 7]
    ref = reference_greedy(m, prompt, 30)
    eos = ref[4]  # pretend the 5th greedy token is end-of-turn
    b = Batcher(m, eos_token_ids=[eos]).start()
    try:
        outs, _ = run(b, [(prompt, GenerationConfig(max_new_tokens=30, temperature=0))])
    finally:
        b.stop()
    toks, reason = outs[0]
    assert reason == "stop" and toks == ref[: ref.index(eos)]


def test_cancel_frees_the_row_and_serving_continues():
    m = make_model()
    b = Batcher(m, max_batch=2).start()
    try:
        got = []
        req = b.submit(Request([1, 2, 3], GenerationConfig(max_new_tokens=400, temperature=0),
                               lambda t, r: got.append(r) if r else None))
        while req.generated < 3:
            time.sleep(0.001)
        req.cancel()
        t0 = time.time()
        while not got and time.time() - t0 < 10:
            time.sleep(0.005)
        assert got == ["cancelled"] and req.generated < 400
        outs, _ = run(b, random_jobs(3, seed=5))
        assert all(r == "length" for _, r in outs)
        assert b.stats["cancelled"] == 1 and b.running == 0
    finally:
        b.stop()


def test_seeded_sampling_does_not_depend_on_batch_neighbours():
    m = make_model()
    cfg = GenerationConfig(max_new_tokens=25, temperature=1.0, top_p=0.9, seed=1234)
    b = Batcher(m, max_batch=8).start()
    try:
        alone, _ = run(b, [([3, 1, 4], cfg)])
        crowd, _ = run(b, random_jobs(5, seed=9) + [([3, 1, 4], cfg)] + random_jobs(2, seed=10), gap=0.002)
        other_seed, _ = run(b, [([3, 1, 4], GenerationConfig(max_new_tokens=25, temperature=1.0, top_p=0.9, seed=99))])
    finally:
        b.stop()
    assert alone[0][0] == crowd[5][0]
    assert alone[0][0] != other_seed[0][0]


def test_context_limit_ends_rows_with_length():
    m = make_model()
    b = Batcher(m, max_context=20).start()
    try:
        outs, _ = run(b, [(list(range(15)), GenerationConfig(max_new_tokens=100, temperature=0))])
    finally:
        b.stop()
    assert outs[0][1] == "length" and len(outs[0][0]) == 20 - 15
    assert outs[0][0] == reference_greedy(m, list(range(15)), 5)


def test_cache_compaction_and_growth_keep_results_exact():
    """A long row pins old slots while many short rows come and go: the time axis shifts and grows."""
    m = make_model()
    long_job = ([7] * 5, GenerationConfig(max_new_tokens=200, temperature=0))
    jobs = [long_job] + random_jobs(20, seed=3, max_new=(1, 12))
    b = Batcher(m, max_batch=4).start()
    try:
        outs, _ = run(b, jobs, gap=0.01)
    finally:
        b.stop()
    for (prompt, cfg), (toks, _) in zip(jobs, outs):
        assert toks == reference_greedy(m, prompt, cfg.max_new_tokens)


def test_prompts_arriving_together_are_prefilled_together_and_exact():
    m = make_model()
    jobs = random_jobs(12, seed=4, max_new=(1, 20))
    b = Batcher(m, max_batch=16)
    outs = [[[], None] for _ in jobs]
    done = threading.Semaphore(0)
    for i, (p, cfg) in enumerate(jobs):
        def emit(tok, reason, i=i):
            if tok is not None:
                outs[i][0].append(tok)
            if reason is not None:
                done.release()
        b.submit(Request(p, cfg, emit))  # queued before the loop starts: all join in one admission round
    b.start()
    try:
        for _ in jobs:
            assert done.acquire(timeout=60)
    finally:
        b.stop()
    for (prompt, cfg), (toks, _) in zip(jobs, outs):
        assert toks == reference_greedy(m, prompt, cfg.max_new_tokens)
    assert b.stats["prefills"] == 12 and b.stats["prefill_forwards"] == 1 and b.stats["steps"] < sum(c.max_new_tokens for _, c in jobs) / 2
