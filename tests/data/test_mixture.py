"""Mixtures and curricula (llmkit.data.mixture): proportions by tokens (chi-square), temperature formula, caps and
epochs, curriculum switches at the token boundary, determinism, resume, rank slicing, `llmkit data mix`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from llmkit.data.mixture import MixtureLoader, MixtureSampler, Stage, main as mix_main, mixture_weights
from llmkit.data.shards import TokenDataset


def test_temperature_formula_and_t5_cap():
    n = np.array([1000.0, 100.0, 10.0])
    assert np.allclose(mixture_weights(n), n / n.sum())
    assert np.allclose(mixture_weights(n, temperature=2.0), np.sqrt(n) / np.sqrt(n).sum())
    assert np.allclose(mixture_weights(n, temperature=1e6), [1 / 3] * 3, atol=1e-4)  # T -> inf: uniform
    assert np.allclose(mixture_weights(n, size_cap=100), [100 / 210, 100 / 210, 10 / 210])  # T5 min(n_i, K)
    assert np.allclose(mixture_weights(n, weights=[1, 1, 2]), [0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match="temperature"):
        mixture_weights(n, temperature=0)


def _windows(n_units, length=10):
    return np.full(n_units, length)


def test_proportions_by_windows_chi_square():
    target = {"web": 0.5, "code": 0.3, "books": 0.2}
    s = MixtureSampler(list(target), [_windows(5000), _windows(300), _windows(2000)], weights=target, seed=1)
    counts = np.zeros(3)
    for _ in range(10_000):
        counts[s.next()[0]] += 1
    assert chisquare(counts, 10_000 * np.array(list(target.values()))).pvalue > 1e-3
    assert s.epochs()["code"] > 3  # the small source is up-sampled: repeated over several epochs


def test_proportions_are_by_tokens_not_documents():
    # source a has documents 10x longer than b; equal token weights -> b must be drawn ~10x more often
    rng = np.random.default_rng(0)
    a, b = rng.integers(50, 150, 3000), rng.integers(5, 15, 3000)
    s = MixtureSampler(["a", "b"], [a, b], weights={"a": 1, "b": 1}, seed=3)
    for _ in range(20_000):
        s.next()
    share = s.src_tokens / s.src_tokens.sum()
    assert abs(share[0] - 0.5) < 0.02
    assert 7 < s.src_units[1] / s.src_units[0] < 13


def test_caps_and_epochs_are_respected():
    s = MixtureSampler(["big", "small"], [_windows(1000), _windows(20)], weights={"big": 0.5, "small": 0.5},
                       max_epochs={"small": 2}, max_tokens={"big": 3000}, seed=0)
    drawn = {0: [], 1: []}
    while (d := s.next()) is not None:
        drawn[d[0]].append(d[1])
    assert s.src_tokens[1] == 2 * 20 * 10 and s.src_tokens[0] == 3000  # exactly at the caps, then exhausted
    small = drawn[1]
    assert sorted(small[:20]) == list(range(20)) and sorted(small[20:]) == list(range(20))  # each epoch a permutation
    assert small[:20] != small[20:]  # ...reshuffled per epoch
    assert len(set(drawn[0])) == len(drawn[0])  # down-sampled big source: no repeats


def test_curriculum_switches_at_the_token_boundary_and_resumes():
    stages = [Stage(2000, {"general": 1.0}), Stage(5000, {"general": 0.5, "code": 0.5}), Stage(None, {"code": 1.0})]
    mk = lambda: MixtureSampler(["general", "code"], [_windows(500), _windows(500)], stages=stages,  # noqa: E731
                                total_tokens=8000, seed=4)
    s = mk()
    seq = []
    while (d := s.next()) is not None:
        seq.append(d)
    assert len(seq) == 800
    src = np.array([d[0] for d in seq])
    assert (src[:200] == 0).all() and (src[500:] == 1).all()  # stage 1 ends at exactly 2000 tokens
    assert 0.35 < src[200:500].mean() < 0.65
    # restart in the middle of stage 2: the same continuation
    r = mk()
    for _ in range(350):
        r.next()
    st = json.loads(json.dumps(r.state_dict()))
    r2 = mk()
    r2.load_state_dict(st)
    assert [r2.next() for _ in range(450)] == seq[350:]


def _dataset(seed, n=4000, vocab=1000, eos=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(1, vocab, n).astype(np.uint16)
    toks[rng.choice(n, n // 50, replace=False)] = eos
    return TokenDataset(arrays=[toks], eos_id=eos)


def test_mixture_loader_resume_ranks_and_sources():
    srcs = {"a": _dataset(0), "b": _dataset(1, 1500)}
    kw = dict(weights={"a": 0.7, "b": 0.3}, batch_size=4, block_size=16, seed=9)
    lo = MixtureLoader(srcs, **kw)
    for _ in range(30):
        next(lo)
    state = lo.state_dict()
    lo2 = MixtureLoader(srcs, **kw)
    lo2.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(20):
        x, y = next(lo), next(lo2)
        assert all(torch.equal(x[k], y[k]) for k in x)
    # the rows come from the named source's windows
    b = next(MixtureLoader(srcs, **kw))
    for row, s in zip(b["input_ids"], b["source"]):
        ds = srcs["ab"[int(s)]]
        stream = torch.from_numpy(ds.tokens(0, len(ds)).astype(np.int64))
        hits = [w for w in range((len(ds) - 1) // 16) if torch.equal(stream[w * 16:w * 16 + 16], row)]
        assert hits
    # two ranks: disjoint halves of the single global draw sequence
    full = MixtureLoader(srcs, **{**kw, "batch_size": 8})
    r0 = MixtureLoader(srcs, **kw, rank=0, world_size=2)
    r1 = MixtureLoader(srcs, **kw, rank=1, world_size=2)
    for _ in range(5):
        f, a, c = next(full), next(r0), next(r1)
        assert torch.equal(torch.cat([a["input_ids"], c["input_ids"]]), f["input_ids"])


def _tokens_dir(tmp_path, name, docs, eos=0):
    from llmkit.artifacts import atomic_write_json

    d = tmp_path / name
    d.mkdir()
    flat = np.concatenate([np.append(x, eos) for x in docs]).astype("<u2")
    flat.tofile(d / "shard_00000.bin")
    starts = np.cumsum([0] + [len(x) + 1 for x in docs]).astype("<i8")
    starts.tofile(d / "shard_00000.idx")
    atomic_write_json(d / "tokens.json", {"dtype": "uint16", "eos_id": eos, "vocab_size": 1000,
                                          "shards": [{"file": "shard_00000.bin"}]})
    return d


def test_data_mix_cli_writes_dataset_and_spec(tmp_path, capsys):
    rng = np.random.default_rng(0)
    web = _tokens_dir(tmp_path, "web", [rng.integers(1, 500, rng.integers(20, 60)) for _ in range(400)])
    code = _tokens_dir(tmp_path, "code", [rng.integers(500, 1000, rng.integers(20, 60)) for _ in range(40)])
    out = tmp_path / "mixed"
    assert mix_main(["--source", f"web={web}:0.6", "--source", f"code={code}:0.4", "--out", str(out),
                     "--tokens", "20000", "--max-epochs", "code=2", "--seed", "1"]) == 0
    stats = json.loads(capsys.readouterr().out)
    ds = TokenDataset(out)
    assert len(ds) == stats["tokens"] >= 20000 and ds.n_docs == stats["docs"]
    code_tokens = stats["per_source"]["code"]["tokens"]
    assert stats["per_source"]["code"]["epochs"] <= 2.0 and code_tokens <= 2 * len(TokenDataset(code))
    # every written document is a whole document of one source (ids < 500 are web, >= 500 code)
    starts = np.append(ds.doc_starts, len(ds))
    n_code = 0
    for a, b in zip(starts[:-1], starts[1:]):
        doc = ds.tokens(int(a), int(b - a))
        assert doc[-1] == 0 and (doc[:-1] > 0).all()
        is_code = doc[0] >= 500
        assert ((doc[:-1] >= 500) == is_code).all()
        n_code += (b - a) if is_code else 0
    assert n_code == code_tokens
    spec = tmp_path / "mixture.json"
    assert mix_main(["--source", f"web={web}", "--source", f"code={code}", "--out", str(spec), "--spec-only",
                     "--temperature", "2", "--stages", '[{"until_tokens": 800, "weights": {"web": 1}}, '
                     '{"until_tokens": null, "weights": {"web": 1, "code": 1}}]']) == 0
    w = json.loads(spec.read_text())["resolved_weights"]
    assert w[0] == {"web": 1.0, "code": 0.0} and w[1] == {"web": 0.5, "code": 0.5}
    lo = MixtureLoader.from_spec(spec, batch_size=5, block_size=16)
    srcs = torch.cat([next(lo)["source"] for _ in range(10)])
    assert (srcs == 0).all()  # 10 batches x 5 windows x 16 tokens = 800: all inside stage 1
    assert (next(lo)["source"] == 1).any() or (next(lo)["source"] == 1).any()


def test_bad_mixture_input_errors():
    with pytest.raises(ValueError, match="unknown sources"):
        MixtureSampler(["a"], [_windows(3)], weights={"b": 1.0})
    with pytest.raises(ValueError, match="no data"):
        MixtureSampler(["a"], [np.zeros(0)])


def test_examples_proportional_cap_chi_square():
    # T5 / FLAN balancing: natural weights min(n_i, K); here K = 20k tokens caps the big source to the size of the middle one
    sizes = [20_000, 2_000, 500]  # windows of 10 tokens
    s = MixtureSampler(["a", "b", "c"], [_windows(n) for n in sizes], size_cap=20_000, temperature=1.0, seed=5)
    counts = np.zeros(3)
    for _ in range(10_000):
        counts[s.next()[0]] += 1
    want = np.minimum(np.array(sizes) * 10.0, 20_000)
    assert chisquare(counts, 10_000 * want / want.sum()).pvalue > 1e-3
    assert abs(counts[0] / 10_000 - 20 / 45) < 0.02  # capped 20k of 45k tokens; uncapped it would be 0.89
