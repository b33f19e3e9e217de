"""Decoding strategies of survey §4.2.4 (checklist C13): the per-step "logits -> next token" part.

Implements, as plain functions on a batch of logits [B, V] (one row per sequence):
- `GenerationConfig`: the knobs, named as in transformers' `GenerationConfig` / the OpenAI API;
- penalties on the history: repetition penalty (CTRL, Keskar et al. 2019; the same rule as transformers'
  `RepetitionPenaltyLogitsProcessor`), OpenAI frequency / presence penalties, n-gram blocking;
- warpers, in transformers' order: temperature, top-k, top-p (nucleus, Holtzman et al. 2020), min-p
  (Nguyen et al. 2024), typical-p (Meister et al. 2022), epsilon and eta cutoffs (Hewitt et al. 2022);
- `sample_next`: greedy or sampled next tokens. Each row may carry its own config and generator, so a
  continuous batcher can mix requests with different sampling settings and seeds in one step.

Filtered tokens get -inf. Sampling uses the exponential race argmax(p / E), E ~ Exp(1), which draws
exactly from p (it is the Gumbel-max trick in probability space) and needs no cumulative sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import torch

NEG_INF = float("-inf")


@dataclass
class GenerationConfig:
    """Generation settings; names follow transformers' `GenerationConfig` and the OpenAI API.

    do_sample=None decides from the temperature: sample when temperature > 0, greedy when it is 0.
    top_k=0, top_p=1, min_p=0, typical_p=1, epsilon_cutoff=0, eta_cutoff=0 and penalties of 1 / 0 are off.
    stop: strings that end a sequence (not included in the returned text); eos_token_id: None means
    the tokenizer's EOS; a list stops on any of them.
    """

    max_new_tokens: int = 128
    do_sample: bool | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    stop: list[str] = field(default_factory=list)
    eos_token_id: int | list[int] | None = None
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False  # transformers: stop when the running beams cannot beat the finished ones

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0 (0 means greedy)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (0 < self.typical_p <= 1, "typical_p must be in (0, 1]"),
            (0 <= self.epsilon_cutoff < 1 and 0 <= self.eta_cutoff < 1, "epsilon_cutoff / eta_cutoff must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 turns it off)"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"GenerationConfig: {msg}")

    @property
    def sampling(self) -> bool:
        """True when tokens are drawn at random, False for greedy (argmax)."""
        if self.do_sample is None:
            return self.temperature > 0
        return bool(self.do_sample) and self.temperature > 0

    def eos_ids(self, tokenizer_eos: int | None = None) -> list[int]:
        e = self.eos_token_id if self.eos_token_id is not None else tokenizer_eos
        if e is None:
            return []
        return [int(x) for x in (e if isinstance(e, (list, tuple)) else [e])]

    def updated(self, **kw) -> "GenerationConfig":
        """A copy with some fields changed (unknown names raise, listing the valid ones)."""
        names = {f.name for f in fields(self)}
        bad = set(kw) - names
        if bad:
            raise TypeError(f"unknown generation option(s) {sorted(bad)}; valid: {sorted(names)}")
        return replace(self, **kw)


Configs = GenerationConfig | Sequence[GenerationConfig]


def _per_row(cfgs: Configs, B: int) -> list[GenerationConfig]:
    if isinstance(cfgs, GenerationConfig):
        return [cfgs] * B
    cfgs = list(cfgs)
    if len(cfgs) != B:
        raise ValueError(f"got {len(cfgs)} generation configs for a batch of {B} rows")
    return cfgs


def _column(rows: list[GenerationConfig], name: str, like: torch.Tensor) -> torch.Tensor | float:
    """One setting as a scalar when all rows agree (the common case), else a [B, 1] tensor."""
    vals = [float(getattr(c, name)) for c in rows]
    if all(v == vals[0] for v in vals):
        return vals[0]
    return torch.tensor(vals, dtype=like.dtype, device=like.device).unsqueeze(1)


def _active(x, off: float) -> bool:
    return bool((x != off).any()) if torch.is_tensor(x) else x != off


# --------------------------------------------------------------------------- history penalties
def token_counts(prev_tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] counts of each token in prev_tokens [B, T]; entries < 0 (padding) are ignored."""
    valid = prev_tokens >= 0
    idx = prev_tokens.clamp(0, vocab_size - 1)
    counts = torch.zeros(prev_tokens.shape[0], vocab_size, dtype=torch.int32, device=prev_tokens.device)
    return counts.scatter_add_(1, idx, valid.to(torch.int32))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """CTRL's rule: a seen token's logit is divided by `penalty` if positive, multiplied if negative."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def ban_repeated_ngrams(logits: torch.Tensor, prev_tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid any token that would complete an n-gram already present in prev_tokens (rows of [B, T]).

    Padding entries (< 0) never match a real token, so left padding cannot create a ban.
    """
    T = prev_tokens.shape[1]
    if n <= 0 or T < n:
        return logits
    windows = prev_tokens.unfold(1, n, 1)  # [B, T-n+1, n]
    prefix = prev_tokens[:, T - n + 1:] if n > 1 else prev_tokens[:, :0]
    match = (windows[..., :-1] == prefix.unsqueeze(1)).all(-1) & (windows[..., -1] >= 0)
    V = logits.shape[-1]
    banned = torch.zeros(logits.shape[0], V + 1, dtype=torch.bool, device=logits.device)
    banned.scatter_(1, torch.where(match, windows[..., -1].clamp(0, V), V), True)  # column V: a sink
    return logits.masked_fill(banned[:, :V], NEG_INF)


def apply_penalties(logits: torch.Tensor, cfgs: Configs, prev_tokens: torch.Tensor | None) -> torch.Tensor:
    """Repetition / frequency / presence penalties and n-gram blocking (used by greedy and sampling)."""
    rows = _per_row(cfgs, logits.shape[0])
    if prev_tokens is None or prev_tokens.numel() == 0:
        return logits
    rep = _column(rows, "repetition_penalty", logits)
    freq = _column(rows, "frequency_penalty", logits)
    pres = _column(rows, "presence_penalty", logits)
    if _active(rep, 1.0) or _active(freq, 0.0) or _active(pres, 0.0):
        counts = token_counts(prev_tokens, logits.shape[-1])
        seen = counts > 0
        if _active(rep, 1.0):
            logits = apply_repetition_penalty(logits, seen, rep)
        if _active(freq, 0.0) or _active(pres, 0.0):  # OpenAI: logit -= count * freq + [count > 0] * presence
            logits = logits - counts.to(logits.dtype) * freq - seen.to(logits.dtype) * pres
    sizes = {c.no_repeat_ngram_size for c in rows}
    if sizes != {0}:
        if len(sizes) == 1:
            logits = ban_repeated_ngrams(logits, prev_tokens, sizes.pop())
        else:
            logits = torch.cat([ban_repeated_ngrams(logits[i:i + 1], prev_tokens[i:i + 1], c.no_repeat_ngram_size)
                                for i, c in enumerate(rows)])
    return logits


# --------------------------------------------------------------------------- warpers
def apply_top_k(logits: torch.Tensor, k) -> torch.Tensor:
    """Keep the k largest logits per row (k=0: keep all); k may be a [B, 1] tensor."""
    V = logits.shape[-1]
    if not torch.is_tensor(k):
        if k <= 0 or k >= V:
            return logits
        kth = torch.topk(logits, int(k), dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth, NEG_INF)
    k = torch.where(k <= 0, torch.full_like(k, V), k).clamp(max=V).long()
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values
    kth = sorted_logits.gather(1, k - 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, p) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to >= p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False  # always keep the most likely token
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the top token's probability."""
    probs = logits.softmax(-1)
    thresh = probs.amax(-1, keepdim=True) * min_p
    return logits.masked_fill(probs < thresh, NEG_INF)


def apply_typical(logits: torch.Tensor, mass) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy, up to `mass`."""
    logp = logits.log_softmax(-1)
    p = logp.exp()
    ent = -(logp * p).nansum(-1, keepdim=True)
    shifted = (-logp - ent).abs()
    sorted_shift, order = torch.sort(shifted, dim=-1)
    cum = logits.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cum < mass).sum(1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    drop_sorted = sorted_shift > sorted_shift.gather(1, last)
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def apply_eta_epsilon(logits: torch.Tensor, epsilon, eta) -> torch.Tensor:
    """Truncation sampling: drop p < epsilon; eta uses min(eta, sqrt(eta) * exp(-entropy)). Keeps the top token."""
    logp = logits.log_softmax(-1)
    p = logp.exp()
    drop = torch.zeros_like(p, dtype=torch.bool)
    if _active(epsilon, 0.0):
        drop |= p < epsilon
    if _active(eta, 0.0):
        ent = -(torch.where(p > 0, logp * p, torch.zeros_like(p))).sum(-1, keepdim=True)
        eta_t = torch.as_tensor(eta, dtype=p.dtype, device=p.device)
        drop |= p < torch.minimum(eta_t, eta_t.sqrt() * torch.exp(-ent))
    drop &= logits < logits.amax(-1, keepdim=True)
    return logits.masked_fill(drop, NEG_INF)


def warp(logits: torch.Tensor, cfgs: Configs) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p, typical-p, epsilon/eta (transformers' order). Returns float32."""
    rows = _per_row(cfgs, logits.shape[0])
    logits = logits.float()
    t = _column(rows, "temperature", logits)
    if torch.is_tensor(t):
        logits = logits / t.clamp(min=1e-5)  # greedy rows are handled by argmax, any finite t is fine
    elif t not in (0.0, 1.0):
        logits = logits / t
    k = _column(rows, "top_k", logits)
    if _active(k, 0.0):
        logits = apply_top_k(logits, k)
    p = _column(rows, "top_p", logits)
    if _active(p, 1.0):
        logits = apply_top_p(logits, p)
    mp = _column(rows, "min_p", logits)
    if _active(mp, 0.0):
        logits = apply_min_p(logits, mp)
    typ = _column(rows, "typical_p", logits)
    if _active(typ, 1.0):
        logits = apply_typical(logits, typ)
    eps, eta = _column(rows, "epsilon_cutoff", logits), _column(rows, "eta_cutoff", logits)
    if _active(eps, 0.0) or _active(eta, 0.0):
        logits = apply_eta_epsilon(logits, eps, eta)
    return logits


# --------------------------------------------------------------------------- choosing the token
def make_generator(seed: int | None, device="cpu") -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


Generators = torch.Generator | Sequence[torch.Generator | None] | None


def draw(probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """One token per row from probs [B, V] (exponential race); a list gives each row its own generator."""
    if generator is None or isinstance(generator, torch.Generator):
        e = torch.empty_like(probs).exponential_(generator=generator)
    else:
        e = torch.empty_like(probs)
        for i, g in enumerate(generator):
            e[i].exponential_(generator=g)
    e.clamp_(min=torch.finfo(e.dtype).tiny)  # 0/0 would be NaN, and argmax takes NaN for the maximum
    return (probs / e).argmax(-1)


def sample_next(
    logits: torch.Tensor,
    cfg: Configs,
    generator: Generators = None,
    prev_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next tokens [B] from logits [B, V].

    cfg: one GenerationConfig or one per row. generator: None, one torch.Generator, or one per row.
    prev_tokens: [B, T] tokens so far (prompt + generated), entries < 0 are padding; needed by the penalties.
    Greedy rows take the argmax after the penalties (transformers does not warp greedy search either).
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_next expects logits [B, V], got shape {tuple(logits.shape)}")
    rows = _per_row(cfg, logits.shape[0])
    logits = apply_penalties(logits.float(), rows, prev_tokens)
    greedy = [not c.sampling for c in rows]
    if all(greedy):
        return logits.argmax(-1)
    probs = warp(logits, rows).softmax(-1)
    tokens = draw(probs, generator)
    if any(greedy):
        mask = torch.tensor(greedy, device=logits.device)
        tokens = torch.where(mask, logits.argmax(-1), tokens)
    return tokens


def next_token_probs(logits: torch.Tensor, cfg: Configs, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution `sample_next` draws from, [B, V] float32 (one-hot at the argmax for greedy rows).

    Speculative sampling needs these exact probabilities for both draft and target.
    """
    rows = _per_row(cfg, logits.shape[0])
    logits = apply_penalties(logits.float(), rows, prev_tokens)
    probs = warp(logits, rows).softmax(-1)
    for i, c in enumerate(rows):
        if not c.sampling:
            probs[i] = torch.nn.functional.one_hot(logits[i].argmax(), logits.shape[-1]).float()
    return probs


def log_softmax_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the unwarped distribution, [B]; for logprobs in APIs and beam scores."""
    return logits.float().log_softmax(-1).gather(-1, tokens.view(-1, 1)).squeeze(-1)


__all__ = [
    "GenerationConfig", "sample_next", "next_token_probs", "warp", "apply_penalties", "apply_top_k", "apply_top_p",
    "apply_min_p", "apply_typical", "apply_eta_epsilon", "apply_repetition_penalty", "ban_repeated_ngrams",
    "token_counts", "make_generator", "draw", "log_softmax_of",
]
