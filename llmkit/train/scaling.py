"""Predictable scaling (survey §2.1 "KM scaling law" and "Chinchilla scaling law", §4.3 predictable scaling).

Implements:
- exact FLOP counts of a `ModelConfig` per token and per run: every matmul of the forward pass
  (2 * in * out per token) plus the attention score and value products over the keys each query really
  sees (causal triangle, sliding windows), backward = 2x forward (Kaplan et al. 2020, Appendix; the
  common 6ND is the same count without the attention term);
- fits of the two laws of the survey on a ladder of runs (N non-embedding... see `params_for_law`):
  Kaplan et al.  L(N, D) = [(N_c / N)^(a_N / a_D) + D_c / D]^a_D
  Hoffmann et al. L(N, D) = E + A / N^alpha + B / D^beta, fitted as in Chinchilla's Approach 3:
  Huber loss (delta = 1e-3) on log-loss residuals with L-BFGS from a grid of initialisations;
- the compute-optimal allocation for a budget C = k * N * D (Chinchilla's closed form
  N_opt = G (C/k)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta))) and loss prediction;
- a plot of the fit (loss against compute, one curve per model size).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch

from ..model.config import ModelConfig


# ---------------------------------------------------------------------------------------- FLOPs
def _block_weights(cfg: ModelConfig) -> tuple[int, int]:
    """Matmul weights of one attention (q, k, v, o) and of one dense MLP."""
    d, hd, h, kv, f = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff
    return d * hd * (h + 2 * kv) + h * hd * d, d * f * (3 if cfg.is_glu else 2)


def encoder_side_params(cfg: ModelConfig) -> int:
    """Of `matmul_params`, the weights an encoder-decoder runs per *encoder* position: the encoder's blocks and
    every cross-attention's key/value projections (0 for a decoder-only model)."""
    if cfg.arch != "encoder_decoder":
        return 0
    attn, mlp = _block_weights(cfg)
    return cfg.n_encoder_layers * (attn + mlp) + cfg.n_layers * 2 * cfg.d_model * cfg.head_dim * cfg.n_kv_heads


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every Linear plus the output projection (not the
    embedding lookup, not norms or biases). MoE counts only the k experts a token is routed to."""
    d = cfg.d_model
    attn, mlp = _block_weights(cfg)
    total = 0
    for i in range(cfg.n_layers):
        ffn = (mlp * cfg.moe_top_k + d * cfg.n_experts) if cfg.is_moe_layer(i) else mlp
        total += attn + ffn
    if cfg.arch == "encoder_decoder":
        total += cfg.n_layers * attn + cfg.n_encoder_layers * (attn + mlp)
    return total + d * cfg.vocab_size


def attention_pairs(seq_len: int, window: int | None = None, causal: bool = True) -> int:
    """Number of (query, key) pairs one sequence computes."""
    if not causal:
        return seq_len * seq_len
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


def forward_flops(cfg: ModelConfig, seq_len: int, causal_exact: bool = True) -> int:
    """FLOPs of one forward pass over one sequence of `seq_len` tokens.

    causal_exact=True counts only the key positions each query attends to; False counts the full
    T x T products, as a dense kernel (or torch's FLOP counter on explicit matmuls) does.
    """
    flops = 2 * matmul_params(cfg) * seq_len
    per_pair = 2 * 2 * cfg.n_heads * cfg.head_dim  # q.k and p.v, one multiply-add each
    for i in range(cfg.n_layers):
        window = cfg.sliding_window if cfg.layer_type(i) == "local" else None
        flops += per_pair * attention_pairs(seq_len, window, causal=causal_exact)
    return flops


def training_flops(cfg: ModelConfig, tokens: int, seq_len: int) -> float:
    """Forward + backward (2x forward) FLOPs to train on `tokens` tokens in sequences of `seq_len`."""
    return 3.0 * forward_flops(cfg, seq_len) * tokens / seq_len


def params_for_law(cfg: ModelConfig) -> int:
    """N for the scaling laws: non-embedding parameters (Kaplan et al.)."""
    return cfg.num_params(include_embeddings=False)


# ---------------------------------------------------------------------------------------- laws
@dataclass
class Chinchilla:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N, D):
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def compute_optimal(self, C: float, k: float = 6.0) -> tuple[float, float]:
        """(N_opt, D_opt) minimising loss under C = k N D (Hoffmann et al. 2022, eq. 4)."""
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        a, b = self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)
        n = G * (C / k) ** a
        d = (1.0 / G) * (C / k) ** b
        return n, d


@dataclass
class Kaplan:
    Nc: float
    Dc: float
    alpha_N: float
    alpha_D: float

    def loss(self, N, D):
        return ((self.Nc / N) ** (self.alpha_N / self.alpha_D) + self.Dc / D) ** self.alpha_D


def _huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    a = x.abs()
    return torch.where(a <= delta, 0.5 * x**2, delta * (a - 0.5 * delta))


def _lbfgs(params: torch.Tensor, objective, steps: int = 200) -> float:
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        v = objective(params)
        v.backward()
        return v

    opt.step(closure)
    with torch.no_grad():
        v = objective(params).item()
    return v if math.isfinite(v) else float("inf")


def _grid_then_lbfgs(objective, axes: list[list[float]], keep: int = 4) -> torch.Tensor:
    """Score every grid point (cheap, no gradients), then run L-BFGS from the `keep` best ones."""
    points = torch.tensor(list(itertools.product(*axes)), dtype=torch.float64)
    with torch.no_grad():
        scores = objective(points)
    scores = torch.nan_to_num(scores, nan=float("inf"))
    best, best_p = float("inf"), None
    for i in scores.argsort()[:keep].tolist():
        p = points[i].clone().requires_grad_(True)
        v = _lbfgs(p, objective)
        if v < best:
            best, best_p = v, p.detach().clone()
    return best_p


def fit_chinchilla(N, D, L, delta: float = 1e-3) -> Chinchilla:
    """Chinchilla Approach 3: minimise sum Huber(LSE(a - alpha log N, b - beta log D, e) - log L)."""
    lN, lD, lL = (torch.tensor(list(v), dtype=torch.float64).log() for v in (N, D, L))

    def objective(p):  # p [..., 5] -> [...]: the grid is scored in one batched call
        a, b, e, al, be = (p[..., i : i + 1] for i in range(5))
        pred = torch.logsumexp(torch.stack(torch.broadcast_tensors(a - al * lN, b - be * lD, e + 0 * lN)), 0)
        return _huber(pred - lL, delta).sum(-1)

    best_p = _grid_then_lbfgs(objective, [[0.0, 3.0, 6.0, 9.0, 12.0], [0.0, 3.0, 6.0, 9.0, 12.0],
                                          [-1.0, -0.5, 0.0, 0.5, 1.0], [0.1, 0.3, 0.5, 0.8], [0.1, 0.3, 0.5, 0.8]])
    a, b, e, al, be = best_p.tolist()
    return Chinchilla(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=al, beta=be)


def fit_kaplan(N, D, L, delta: float = 1e-3) -> Kaplan:
    """Kaplan et al. eq. 1.5, fitted on log loss with the same Huber objective."""
    lN, lD, lL = (torch.tensor(list(v), dtype=torch.float64).log() for v in (N, D, L))

    def objective(p):
        lnc, ldc, an, ad = (p[..., i : i + 1] for i in range(4))
        inner = torch.logsumexp(torch.stack(torch.broadcast_tensors((an / ad) * (lnc - lN), ldc - lD)), 0)
        return _huber(ad * inner - lL, delta).sum(-1)

    best_p = _grid_then_lbfgs(objective, [[5.0, 10.0, 15.0, 20.0, 25.0], [5.0, 10.0, 15.0, 20.0, 25.0],
                                          [0.03, 0.07, 0.15, 0.3, 0.6], [0.03, 0.07, 0.15, 0.3, 0.6]])
    lnc, ldc, an, ad = best_p.tolist()
    return Kaplan(Nc=math.exp(lnc), Dc=math.exp(ldc), alpha_N=an, alpha_D=ad)


def fit_report(runs: list[dict]) -> tuple[dict, Chinchilla, Kaplan]:
    """Fit both laws to runs [{"N", "D", "loss", "flops"}]: (report of parameters and residuals, laws)."""
    N, D, L = [r["N"] for r in runs], [r["D"] for r in runs], [r["loss"] for r in runs]
    ch, ka = fit_chinchilla(N, D, L), fit_kaplan(N, D, L)
    resid = lambda law: max(abs(law.loss(n, d) / l - 1) for n, d, l in zip(N, D, L))  # noqa: E731
    report = {"chinchilla": asdict(ch), "kaplan": asdict(ka),
              "max_rel_residual": {"chinchilla": resid(ch), "kaplan": resid(ka)}}
    return report, ch, ka


def plot_fit(runs: list[dict], law: Chinchilla, path: str, predicted: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in sorted({r["N"] for r in runs}):
        rs = sorted((r for r in runs if r["N"] == n), key=lambda r: r["flops"])
        ax.scatter([r["flops"] for r in rs], [r["loss"] for r in rs], s=14)
        ds = [rs[0]["D"] * (rs[-1]["D"] / rs[0]["D"]) ** (i / 20) for i in range(21)] if len(rs) > 1 else [rs[0]["D"]]
        ax.plot([r["flops"] / r["D"] * d for r in rs[:1] for d in ds], [law.loss(n, d) for d in ds], lw=1,
                label=f"N={n/1e3:.0f}K")
    if predicted:
        ax.scatter([predicted["flops"]], [predicted["measured"]], marker="*", s=120, c="k", label="held-out run")
        ax.scatter([predicted["flops"]], [predicted["predicted"]], marker="x", s=80, c="r", label="prediction")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
