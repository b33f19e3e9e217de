"""Pipeline configuration: stage registry, presets, the default pipeline, tag-then-filter (survey §4.1).

Implements:
- `STAGES`: every stage type by name; `build_stages(config)` turns a config (YAML/dict) into stage
  objects, expanding presets (`{preset: gopher | c4 | fineweb}`);
- `DEFAULT_CONFIG`: what `llmkit data clean` runs without a config -- language ID (English, 0.65),
  Gopher repetition + quality, C4, PII redaction, exact + MinHash dedup;
- `segments(stages)`: the per-document runs of stages between global (dedup) barriers -- the runner
  executes one parallel pass per segment;
- `refilter(doc, stages)`: "tag, then filter": re-judge the scores stored by a `mode: tag` run with
  new thresholds, without recomputing anything.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .decontam import Decontaminate
from .dedup import ExactDedup, LineDedup, MinHashDedup, SentenceSpanDedup
from .document import Document
from .filters import PRESETS, C4Paragraph, C4Quality, FineWebQuality, GopherQuality, GopherRepetition
from .keywords import BoilerplateLines, KeywordFilter
from .langid import LanguageID
from .pii import PIIRedaction
from .quality import Perplexity, QualityClassifier
from .stage import GlobalStage, Stage

STAGES: dict[str, type[Stage]] = {cls.type: cls for cls in (
    LanguageID, GopherQuality, GopherRepetition, C4Quality, C4Paragraph, FineWebQuality, KeywordFilter,
    BoilerplateLines, PIIRedaction, QualityClassifier, Perplexity, Decontaminate,
    ExactDedup, LineDedup, SentenceSpanDedup, MinHashDedup)}

DEFAULT_CONFIG = {
    "stages": [
        {"type": "langid", "languages": ["en"], "threshold": 0.65},
        {"preset": "gopher"},
        {"preset": "c4"},
        {"type": "pii", "policy": "replace"},
        {"type": "exact_dedup"},
        {"type": "minhash_dedup", "ngram": 5, "bands": 14, "rows": 8},
    ],
    "docs_per_shard": 1000,
    "max_doc_bytes": 5_000_000,
}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """YAML file (or the default) plus `key=value` overrides, e.g. `stages.0.threshold=0.5`."""
    if path is None:
        cfg = copy.deepcopy(DEFAULT_CONFIG)
    else:
        cfg = yaml.safe_load(Path(path).read_text())
        if not isinstance(cfg, dict) or "stages" not in cfg:
            raise ValueError(f"{path}: a pipeline config is a mapping with a `stages:` list")
        cfg = {**{k: v for k, v in DEFAULT_CONFIG.items() if k != "stages"}, **cfg}
    for ov in overrides:
        key, _, val = ov.partition("=")
        node, parts = cfg, key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = yaml.safe_load(val)
        else:
            node[last] = yaml.safe_load(val)
    return cfg


def expand(stage_cfgs: list[dict]) -> list[dict]:
    out = []
    for sc in stage_cfgs:
        if "preset" in sc:
            name = sc["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
            shared = {k: v for k, v in sc.items() if k != "preset"}
            out += [{**p, **shared} for p in PRESETS[name]]
        else:
            out.append(dict(sc))
    names: dict[str, int] = {}
    for sc in out:  # unique names: a second c4_quality becomes c4_quality_2
        base = sc.get("name") or sc.get("type")
        names[base] = names.get(base, 0) + 1
        sc.setdefault("name", base if names[base] == 1 else f"{base}_{names[base]}")
    return out


def build_stages(config: dict) -> list[Stage]:
    stages = []
    for sc in expand(config["stages"]):
        sc = dict(sc)
        kind = sc.pop("type", None)
        if kind not in STAGES:
            raise ValueError(f"unknown stage type {kind!r}; types: {sorted(STAGES)}")
        if "mode" not in sc and config.get("mode"):
            sc["mode"] = config["mode"]
        stages.append(STAGES[kind](**sc))
    return stages


def segments(stages: list[Stage]) -> list[tuple[list[Stage], GlobalStage | None]]:
    """[(per-doc stages, global stage that ends the segment or None)], in order."""
    out, cur = [], []
    for st in stages:
        if isinstance(st, GlobalStage):
            out.append((cur, st))
            cur = []
        else:
            cur.append(st)
    out.append((cur, None))
    return out


def run_map(doc: Document, stages: list[Stage]) -> Document | None:
    for st in stages:
        doc = st(doc)
        if doc is None:
            return None
    return doc


def refilter(doc: Document, stages: list[Stage]) -> str | None:
    """The first stage whose (new) thresholds reject the stored scores of a tagged document."""
    attrs = doc.metadata.get("attrs", {})
    for st in stages:
        scores = attrs.get(st.name)
        if scores is not None and (reason := _rejudge(st, scores)) is not None:
            return f"{st.name}:{reason}"
    return None


def _rejudge(st: Stage, scores: dict) -> str | None:
    """New thresholds on stored scores; stages that stored only a verdict (dedup, edits) keep it."""
    if isinstance(st, GlobalStage):
        return scores.get("reason")
    try:
        return st.judge(scores)
    except (KeyError, TypeError):
        return scores.get("reason")
