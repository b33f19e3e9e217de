"""The stage contract shared by every cleaning block (survey §4.1.2), and per-stage statistics.

Implements:
- `Stage`: a named, configurable block. Document filters split into `measure(doc) -> dict` (scores,
  kept as attributes) and `judge(scores) -> reason | None` (thresholds only), which is what makes
  "tag, then filter" possible: in `tag` mode scores are stored in `metadata["attrs"][stage]` and
  nothing is dropped, so `llmkit data filter` can re-judge with new thresholds without a re-run.
  Editing stages (line removal, PII) override `apply` instead.
- `GlobalStage`: a cross-document stage (dedup). Workers compute `keys(doc)` in parallel; one
  `decide(keys)` pass sees every key in global order; `apply_decision` acts on each document.
- `StageStats`: in / out / removed-by-reason, counters, score samples for histograms and a few
  removed examples per reason (for report.html); mergeable across shards.
"""
from __future__ import annotations

from typing import Any

from .document import Document

MAX_SCORE_SAMPLES = 4000  # per stage and score name per shard: enough for a histogram
MAX_EXAMPLES = 3          # removed examples kept per reason per shard


class StageStats:
    def __init__(self) -> None:
        self.n_in = 0
        self.n_out = 0
        self.removed: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        self.scores: dict[str, list[float]] = {}
        self.examples: dict[str, list[dict]] = {}

    def remove(self, reason: str, doc: Document) -> None:
        self.removed[reason] = self.removed.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append({"id": doc.id, "text": doc.text[:500]})

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def score(self, name: str, value: float) -> None:
        s = self.scores.setdefault(name, [])
        if len(s) < MAX_SCORE_SAMPLES:
            s.append(round(float(value), 4))

    def to_dict(self) -> dict:
        return {"in": self.n_in, "out": self.n_out, "removed": self.removed, "counters": self.counters,
                "scores": self.scores, "examples": self.examples}

    @staticmethod
    def merge(dicts: list[dict]) -> dict:
        out = {"in": 0, "out": 0, "removed": {}, "counters": {}, "scores": {}, "examples": {}}
        for d in dicts:
            out["in"] += d["in"]
            out["out"] += d["out"]
            for key in ("removed", "counters"):
                for k, v in d[key].items():
                    out[key][k] = out[key].get(k, 0) + v
            for k, v in d["scores"].items():
                out["scores"].setdefault(k, []).extend(v)
            for k, v in d["examples"].items():
                ex = out["examples"].setdefault(k, [])
                ex.extend(v[: max(0, MAX_EXAMPLES - len(ex))])
        for k, v in out["scores"].items():
            out["scores"][k] = v[: MAX_SCORE_SAMPLES * 4]
        return out


class Stage:
    """A per-document stage. Subclasses set `type`, take options as keyword arguments."""

    type = "stage"
    is_global = False
    histogram_keys: tuple[str, ...] = ()  # scores worth a histogram in the report

    def __init__(self, name: str | None = None, mode: str = "filter", **options: Any) -> None:
        if mode not in ("filter", "tag"):
            raise ValueError(f"stage {self.type}: mode must be 'filter' or 'tag', not {mode!r}")
        if options:
            raise ValueError(f"stage {self.type}: unknown options {sorted(options)}; see `llmkit data clean --help-stages`")
        self.name = name or self.type
        self.mode = mode
        self.stats = StageStats()
        self.removed_sink: list | None = None  # the runner's exclusion writer sets a list here

    def _removed(self, reason: str, doc: Document) -> None:
        self.stats.remove(reason, doc)
        if self.removed_sink is not None:
            self.removed_sink.append({**doc.to_record(), "removed_by": self.name, "reason": reason})

    def measure(self, doc: Document) -> dict:
        return {}

    def judge(self, scores: dict) -> str | None:
        return None

    def apply(self, doc: Document) -> str | None:
        """Return a removal reason, or None to keep (the doc may be edited in place)."""
        scores = self.measure(doc)
        for k in self.histogram_keys:
            if k in scores:
                self.stats.score(k, scores[k])
        reason = self.judge(scores)
        if self.mode == "tag":
            attrs = doc.metadata.setdefault("attrs", {})
            attrs[self.name] = {**scores, "reason": reason}
            return None
        return reason

    def __call__(self, doc: Document) -> Document | None:
        self.stats.n_in += 1
        reason = self.apply(doc)
        if reason is not None:
            self._removed(reason, doc)
            return None
        self.stats.n_out += 1
        return doc


    def run_batch(self, docs: list[Document]) -> list[Document]:
        """The survivors of a batch, in order (stages that vectorise across documents override this)."""
        return [d for d in map(self, docs) if d is not None]


class GlobalStage(Stage):
    """A cross-document stage: keys in parallel, one global decision, then apply per document."""

    is_global = True

    def keys(self, doc: Document) -> Any:
        raise NotImplementedError

    def keys_batch(self, docs: list[Document]) -> list:
        """Keys for a batch (stages that vectorise across documents override this)."""
        return [self.keys(d) for d in docs]

    def decide(self, keys: list) -> list:
        """One decision per document, in global order (None = keep unchanged)."""
        raise NotImplementedError

    def apply_decision(self, doc: Document, decision: Any) -> str | None:
        """Default: a decision is a removal reason."""
        return decision

    def run_decided(self, doc: Document, decision: Any) -> Document | None:
        self.stats.n_in += 1
        reason = self.apply_decision(doc, decision)
        if reason is not None and self.mode == "tag":
            doc.metadata.setdefault("attrs", {})[self.name] = {"reason": reason}
            reason = None
        if reason is not None:
            self._removed(reason, doc)
            return None
        self.stats.n_out += 1
        return doc
