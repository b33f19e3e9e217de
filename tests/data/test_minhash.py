"""MinHash-LSH (checklist B9): signatures equal datasketch's bit for bit, detection rates of planted
pairs match 1-(1-s^r)^b, union-find agrees with a plain DSU, near-copies of real text are found."""
from __future__ import annotations

import numpy as np
import pytest
import xxhash

from llmkit.data.document import WORD_RE
from llmkit.data.minhash import (Shingler, candidate_edges, detection_probability, near_duplicates,
                                 shingle_hash32_py, signatures, union_find)


def test_signatures_equal_datasketch(shared_data):
    from datasketch import MinHash

    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:30000]
    docs = [text[i: i + 3000] for i in range(0, 30000, 3000)]
    sh = Shingler(5)
    ours = signatures([sh(d) for d in docs], num_perm=128, seed=7)
    for d, sig in zip(docs, ours):
        wh = [xxhash.xxh64_intdigest(w.encode()) for w in WORD_RE.findall(d.lower())]
        shingles = [tuple(wh[i: i + 5]) for i in range(len(wh) - 4)]
        # datasketch hashes each shingle with our 32-bit shingle hash, then applies its own permutations
        m = MinHash(num_perm=128, seed=7, hashfunc=lambda s: shingle_hash32_py(s))
        m.update_batch(shingles)
        assert m.hashvalues.dtype == np.uint32
        np.testing.assert_array_equal(m.hashvalues, sig)


def test_shingles_short_docs_and_numpy_twin():
    sh = Shingler(5)
    assert len(sh("")) == 0
    assert len(sh("only three words")) == 1  # a doc shorter than n words is one shingle
    wh = [xxhash.xxh64_intdigest(w.encode()) for w in ["a", "b", "c", "d", "e", "f"]]
    assert sh("A b, c; d e f!").tolist() == [shingle_hash32_py(wh[0:5]), shingle_hash32_py(wh[1:6])]
    sig = signatures([sh(""), sh("x y z")], 16)
    assert (sig[0] == 0xFFFFFFFF).all() and not (sig[1] == 0xFFFFFFFF).all()


def _pairs_with_jaccard(rng, s, n_pairs, union=200):
    """Pairs of sets (A, B) of distinct 32-bit hashes with |A∩B| / |A∪B| = s exactly."""
    inter = round(s * union)
    a_only = (union - inter) // 2
    sets = []
    for _ in range(n_pairs):
        vals = rng.choice(1 << 32, size=union, replace=False).astype(np.uint32)
        common, rest = vals[:inter], vals[inter:]
        A, B = np.concatenate([common, rest[:a_only]]), np.concatenate([common, rest[a_only:]])
        assert len(np.intersect1d(A, B)) / len(np.union1d(A, B)) == inter / union
        sets += [A, B]
    return sets


@pytest.mark.parametrize("bands,rows", [(14, 8), (20, 5)])
def test_detection_rate_matches_theory(bands, rows):
    rng = np.random.default_rng(0)
    n_pairs = 600  # binomial sd <= 2.0 points, so +-5 points is a 2.5-sigma band
    for s in (0.9, 0.7, 0.5):
        sets = _pairs_with_jaccard(rng, s, n_pairs)
        sigs = signatures(sets, bands * rows, seed=1)
        u, v = candidate_edges(sigs, bands, rows)
        found = {(min(a, b), max(a, b)) for a, b in zip(u.tolist(), v.tolist())}
        rate = np.mean([(2 * i, 2 * i + 1) in found for i in range(n_pairs)])
        expected = detection_probability(s, bands, rows)
        assert abs(rate - expected) <= 0.05, (s, rate, expected)


def test_union_find_matches_python_dsu():
    rng = np.random.default_rng(1)
    n = 2000
    u, v = rng.integers(0, n, 1500), rng.integers(0, n, 1500)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(u.tolist(), v.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    expected = np.array([find(i) for i in range(n)])
    np.testing.assert_array_equal(union_find(n, u, v), expected)


def test_near_copies_of_real_text_removed_first_kept(shared_data):
    text = (shared_data / "tinystories" / "tinystories_val.txt").read_text()
    stories = [s.strip() for s in text.split("<|endoftext|>") if len(s.split()) > 120][:200]
    rng = np.random.default_rng(2)
    docs = list(stories)
    planted = []
    for i in range(0, 40):  # near-copies: 1% of words replaced -> Jaccard of 5-shingles ~0.9
        words = stories[i].split()
        for j in rng.choice(len(words), max(1, len(words) // 100), replace=False):
            words[j] = "zzz"
        planted.append(len(docs))
        docs.append(" ".join(words))
    sh = Shingler(5)
    dup = near_duplicates(signatures([sh(d) for d in docs], 112), 14, 8)
    jac = [len(set(sh(docs[p])) & set(sh(stories[i]))) / len(set(sh(docs[p])) | set(sh(stories[i])))
           for i, p in enumerate(planted)]
    expected = np.mean([detection_probability(j, 14, 8) for j in jac])
    assert dup[planted].mean() >= expected - 0.08 and expected > 0.8, (dup[planted].mean(), expected)
    assert not dup[:200].any()  # originals (first occurrences) all kept, no false positives
