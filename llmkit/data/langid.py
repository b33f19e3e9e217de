"""Language identification (survey §4.1.2, language-based filtering).

Implements `LanguageID`: an offline back-end (`langid`, whose model ships inside the package, with
normalised probabilities) or fastText when `fasttext_model` names a local lid.176-style file (never
downloaded). It writes `language` and `language_score` into metadata (later stages use the language
for stop words and word splitting) and drops documents whose top language is not in `languages` or
whose score is below `threshold` (0.65: the datatrove/FineWeb default; CCNet uses 0.5).
Only the first `max_chars` characters are classified: the verdict is stable long before that and
the cost of langid grows with length.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from ..artifacts import atomic_write_bytes
from .document import Document
from .stage import Stage

_MODEL = None
CACHE = Path(os.environ.get("LLMKIT_CACHE", Path.home() / ".cache" / "llmkit"))


def _langid_arrays() -> dict:
    """langid.py's embedded naive-Bayes model as plain arrays, cached as .npz after the first load
    (the package's own loader spends ~10 s in bz2 + unpickling on every start)."""
    import langid

    path = CACHE / f"langid-{getattr(langid, '__version__', '1.1.6')}.npz"
    if not path.exists():
        from langid.langid import LanguageIdentifier, model

        li = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        states = np.array(sorted(li.tk_output), np.int64)
        outs = [np.array(li.tk_output[s], np.int64) for s in states]
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, ptc=li.nb_ptc, pc=li.nb_pc, classes=np.array(li.nb_classes), nextmove=np.array(li.tk_nextmove, np.int64),
                 out_states=states, out_lens=np.array([len(o) for o in outs]), out_flat=np.concatenate(outs))
        atomic_write_bytes(path, buf.getvalue())
    with np.load(path, allow_pickle=False) as z:
        m = {k: z[k] for k in z.files}
    m["nextmove"] = m["nextmove"].tolist()
    # state -> feature indices as a dense (n_states, n_feats) incidence to turn state counts into features
    n_states = len(m["nextmove"]) // 256 + 1
    rows = np.repeat(m["out_states"], m["out_lens"])
    m["state_rows"], m["state_cols"], m["n_states"] = rows, m["out_flat"], n_states
    return m


def _model() -> dict:
    global _MODEL
    if _MODEL is None:
        _MODEL = _langid_arrays()
        _MODEL["nextmove_np"] = np.array(_MODEL["nextmove"], np.int64)
        # CSR map state -> its output features (state_rows is sorted by state)
        _MODEL["state_ptr"] = np.searchsorted(_MODEL["state_rows"], np.arange(_MODEL["n_states"] + 1))
        _MODEL["state_out"] = _MODEL["state_cols"]
        _MODEL["ptc64"] = _MODEL["ptc"].astype(np.float64)
    return _MODEL


def langid_classify(text: str) -> tuple[str, float]:
    """langid.py's classifier: same byte n-gram features, same naive Bayes, normalised probability."""
    return langid_classify_batch([text])[0]


_BATCH = 256  # texts per vectorised block: a (~2000 x 256) int64 state matrix


def langid_classify_batch(texts: list[str]) -> list[tuple[str, float]]:
    """The classifier for many texts at once: the byte automaton steps all texts together (one numpy
    operation per byte position), features and class scores are matrix products for the block."""
    m = _model()
    out: list[tuple[str, float]] = []
    for start in range(0, len(texts), _BATCH):
        out += _classify_block(m, [t.encode("utf-8") for t in texts[start: start + _BATCH]])
    return out


def _classify_block(m: dict, data: list[bytes]) -> list[tuple[str, float]]:
    n = len(data)
    lens = np.array([len(b) for b in data])
    width = max(int(lens.max()), 1)
    buf = np.zeros((width, n), np.int64)  # time-major: each step reads one contiguous row
    for i, b in enumerate(data):
        buf[: len(b), i] = np.frombuffer(b, np.uint8)
    nm, state = m["nextmove_np"], np.zeros(n, np.int64)
    seen = np.empty((width, n), np.int64)
    for t in range(width):
        state = nm[(state << 8) + buf[t]]
        seen[t] = state
    return [_decide(m, seen[: lens[i], i]) for i in range(n)]


def _decide(m: dict, seen: np.ndarray) -> tuple[str, float]:
    """Naive Bayes on the sparse feature vector: only the states a text visited are touched."""
    states, counts = np.unique(seen, return_counts=True)
    starts, ends = m["state_ptr"][states], m["state_ptr"][states + 1]
    n_out = ends - starts
    if n_out.sum() == 0:
        pd = m["pc"].astype(np.float64)
    else:  # concatenated ranges [start, end) of the visited states' outputs
        idx = np.repeat(starts - np.concatenate([[0], np.cumsum(n_out)[:-1]]), n_out) + np.arange(n_out.sum())
        pd = np.repeat(counts, n_out).astype(np.float64) @ m["ptc64"][m["state_out"][idx]] + m["pc"]
    best = int(pd.argmax())
    # langid's norm_probs for the best class: 1 / sum_j exp(pd_j - pd_best) (no overflow: all <= 0)
    return str(m["classes"][best]), float(1 / np.exp(pd - pd[best]).sum())


class LanguageID(Stage):
    """Language ID (langid offline, fastText with a model path); keeps `languages` at score >= threshold."""

    type = "langid"
    histogram_keys = ("language_score",)

    def __init__(self, languages: list[str] | None = ("en",), threshold: float = 0.65, backend: str = "langid",
                 fasttext_model: str | None = None, max_chars: int = 2000, **kw):
        super().__init__(**kw)
        self.languages = set(languages) if languages else None
        self.threshold, self.max_chars = threshold, max_chars
        self.backend = "fasttext" if fasttext_model else backend
        if self.backend == "fasttext":
            try:
                import fasttext
            except ImportError as e:
                raise ImportError("langid stage: fasttext_model given but the `fasttext` package is missing; "
                                  "pip install fasttext-wheel, or drop fasttext_model to use langid") from e
            self._ft = fasttext.load_model(fasttext_model)
        elif self.backend != "langid":
            raise ValueError(f"langid stage: unknown backend {backend!r}; use 'langid' or give fasttext_model")

    def run_batch(self, docs: list[Document]) -> list[Document]:
        """Classify the whole batch at once (vectorised langid), then judge each document."""
        if self.backend == "langid" and len(docs) > 1:
            self._cache = dict(zip(map(id, docs), langid_classify_batch([d.text[: self.max_chars] for d in docs])))
        try:
            return super().run_batch(docs)
        finally:
            self._cache = {}

    def classify(self, text: str) -> tuple[str, float]:
        text = text[: self.max_chars]
        if self.backend == "fasttext":
            labels, probs = self._ft.predict(text.replace("\n", " "), k=1)
            return labels[0].replace("__label__", ""), float(probs[0])
        return langid_classify(text)

    def measure(self, doc: Document) -> dict:
        cached = getattr(self, "_cache", {}).get(id(doc))
        lang, score = cached if cached is not None else self.classify(doc.text)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        return {"language": lang, "language_score": score}

    def judge(self, s: dict) -> str | None:
        if self.languages is not None and s["language"] not in self.languages:
            return "langid_other_language"
        if s["language_score"] < self.threshold:
            return "langid_low_score"
        return None
