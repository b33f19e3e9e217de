"""One Transformer for every architecture of survey §4.2 (causal decoder, prefix decoder, encoder-decoder).

Read top to bottom: `Block` is one layer (pre / post / sandwich / parallel, DeepNorm residual scaling,
dense or MoE FFN, optional cross-attention); `Transformer` embeds, adds positions, runs the stack(s)
and projects to the vocabulary. Architecture variation is data in `ModelConfig`, never a subclass.

`model(input_ids)` -> logits [B, T, V]. Optional arguments used by the trainer and the engine:
positions [B, T], attn_mask [B, cache_len + T] (True = real token), cache (KVCache),
prefix_len [B] (bidirectional prefix), block_positions [B, T] (GLM's second position id, with `block_pos`: a token's
place inside the blank it fills, 0 elsewhere and when not given), encoder_input_ids / encoder_attn_mask
(encoder-decoder).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .attention import Attention, KVCache, build_mask
from .config import ModelConfig
from .layers import MLP, Rotary, T5Bias, alibi_bias, alibi_slopes, make_norm, sinusoidal_table
from .moe import MoE


def _autocast_input(h: torch.Tensor) -> torch.Tensor:
    """A pre-norm output feeds only matmuls: under autocast cast it once here, not once per consumer
    (q, k, v and gate, up would each cast the same float32 tensor; same values, fewer passes)."""
    dev = h.device.type
    if h.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return h.to(torch.get_autocast_dtype(dev))
    return h


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, cross: bool = False):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg)
        self.mlp_norm = None if cfg.parallel_block else make_norm(cfg)
        sandwich = cfg.norm_position == "sandwich"
        self.post_attn_norm = make_norm(cfg) if sandwich else None
        self.post_mlp_norm = make_norm(cfg) if sandwich else None
        self.cross_attn = Attention(cfg, layer, cross=True) if cross else None
        self.cross_norm = make_norm(cfg) if cross else None
        self.alpha = cfg.deepnorm_alpha
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, ctx: dict, delta: torch.Tensor | None = None):
        """Post-LN and parallel blocks return their output. Pre-norm blocks (sandwich included) take x + delta as
        their input and return (h, m) for the output h + m: each residual add is done by the norm that follows
        it (`Norm.add_forward`, one native pass each way for float32 RMSNorm on CPU, same values as the add),
        so the stack hands m on to the next block's first norm or to the final norm (`Transformer._finish`)."""
        attn_kw = dict(rope=ctx["rope"], mask=ctx["mask"], bias=ctx["bias"], cache=ctx["cache"], is_causal=ctx["is_causal"])
        if self.cfg.parallel_block:  # GPT-J / PaLM: both branches read the same normalised input
            h = _autocast_input(self.attn_norm(x))
            return x + self.drop(self.attn(h, **attn_kw)) + self.drop(self.mlp(h))
        if self.cfg.norm_position == "post":  # Post-LN: Norm(alpha*x + f(x)); alpha = 1 unless DeepNorm
            x = self.attn_norm(self.alpha * x + self.drop(self.attn(x, **attn_kw)))
            if self.cross_attn is not None:
                x = self.cross_norm(self.alpha * x + self._cross(x, ctx))
            return self.mlp_norm(self.alpha * x + self.drop(self.mlp(x)))
        h, n = self.attn_norm.add_forward(x, delta)
        a = self.attn(_autocast_input(n), **attn_kw)
        branch = self.drop(self.post_attn_norm(a) if self.post_attn_norm is not None else a)
        if self.cross_attn is not None:
            h, n = self.cross_norm.add_forward(h, branch)
            branch = self._cross(n, ctx)
        h, n = self.mlp_norm.add_forward(h, branch)
        m = self.mlp(_autocast_input(n))
        return h, self.drop(self.post_mlp_norm(m) if self.post_mlp_norm is not None else m)

    def _cross(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return self.drop(self.cross_attn(x, memory=ctx["memory"], mask=ctx["cross_mask"], cache=ctx["cache"]))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        encdec = cfg.arch == "encoder_decoder"
        self.embed = nn.Embedding(cfg.vocab_size, d)
        if cfg.pos == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, d)
            self.enc_pos_embed = nn.Embedding(cfg.max_seq_len, d) if encdec else None
        elif cfg.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, d), persistent=False)
        if cfg.block_pos:  # GLM (Du et al. 2022): intra-span positions, 0 for Part A and for ordinary text
            self.block_pos_embed = nn.Embedding(cfg.max_seq_len, d)
        if cfg.pos == "rope":
            self.rope_global = Rotary(cfg, cfg.rope_theta)
            local_base = cfg.rope_local_theta
            self.rope_local = Rotary(cfg.__class__(**{**cfg.to_dict(), "rope_scaling": None}), local_base) if local_base else None
        if cfg.pos == "alibi":
            self.register_buffer("alibi", alibi_slopes(cfg.n_heads), persistent=False)
        if cfg.pos == "t5":
            self.t5_bias = T5Bias(cfg, bidirectional=False)
            self.enc_t5_bias = T5Bias(cfg, bidirectional=True) if encdec else None
        self.layers = nn.ModuleList(Block(cfg, i, cross=encdec) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg) if cfg.has_final_norm else None
        if encdec:
            enc_cfg = ModelConfig(**{**cfg.to_dict(), "n_layers": cfg.n_encoder_layers, "layer_types": None,
                                     "sliding_window": None, "n_experts": 0})
            self.encoder = nn.ModuleList(Block(enc_cfg, i) for i in range(cfg.n_encoder_layers))
            self.enc_norm = make_norm(cfg) if cfg.has_final_norm else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        self.final_stage = True  # False on a pipeline stage that hands its hidden states on (llmkit.train.pipeline)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        std, cfg = self.cfg.init_std, self.cfg
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                s = std
                if name.endswith(("o.weight", "down.weight")):
                    s = std / math.sqrt(2 * cfg.n_layers)  # GPT-2: scale residual projections by 1/sqrt(2N)
                if cfg.deepnorm and name.endswith(("o.weight", "down.weight", "up.weight", "gate.weight", "v.weight")):
                    s = std * cfg.deepnorm_beta  # DeepNet init down-scaling
                nn.init.normal_(p, 0.0, s)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch, max_len, dtype=self.dtype, device=self.device)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE load-balancing losses of the last forward, times their coefficient."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE)]
        return self.cfg.moe_aux_loss_coef * sum(losses) if losses else torch.zeros((), device=self.device)

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor, pos_table: nn.Embedding | None,
               block_positions: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        if self.cfg.embed_grad_scale != 1.0:  # GLM-130B: shrink the embedding gradient by alpha
            a = self.cfg.embed_grad_scale
            x = x * a + x.detach() * (1 - a)
        if self.cfg.embed_scale is not None:
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        if self.cfg.pos == "learned":
            x = x + pos_table(positions)
        elif self.cfg.pos == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        if getattr(self, "block_pos_embed", None) is not None:  # (a pipeline's first stage holds it)
            blk = self.block_pos_embed
            x = x + (blk(block_positions) if block_positions is not None else blk.weight[0])
        return x

    def _rope(self, positions: torch.Tensor) -> dict:
        if self.cfg.pos != "rope":
            return {"global": None, "local": None}
        g = self.rope_global(positions)
        return {"global": g, "local": self.rope_local(positions) if self.rope_local is not None else g}

    # ------------------------------------------------------------------ encoder (encoder-decoder only)
    def encode(self, ids: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S = ids.shape
        slots = torch.arange(S, device=ids.device)
        positions = slots.expand(B, S)
        x = self._embed(ids, positions, getattr(self, "enc_pos_embed", None))
        mask = None if attn_mask is None else build_mask(slots, slots, causal=False, key_valid=attn_mask)
        bias = self.enc_t5_bias(positions[:1], positions[:1]) if self.cfg.pos == "t5" else None
        rope = self._rope(positions)["global"]
        ctx = dict(rope=rope, mask=mask, bias=bias, cache=None, is_causal=False)
        delta = None
        for blk in self.encoder:
            x, delta = self._block(blk, x, ctx, delta)
        return self._finish(x, delta, self.enc_norm)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        prefix_len: torch.Tensor | int | None = None,
        block_positions: torch.Tensor | None = None,
        encoder_input_ids: torch.Tensor | None = None,
        encoder_attn_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        return_hidden: bool = False,
        labels: torch.Tensor | None = None,
        z_loss: float = 0.0,
    ):
        """Logits [B, T, V]; with `return_hidden`, the final hidden states [B, T, d]; with `labels` (the targets of
        each position, -100 = no loss), the training loss as `(loss, metrics)` (`Transformer.loss`)."""
        cfg = self.cfg
        B, T = input_ids.shape[:2]  # (a later pipeline stage gets the previous stage's hidden states [B, T, d])
        dev = input_ids.device
        start = cache.length if cache is not None else 0
        slots = torch.arange(start, start + T, device=dev)
        k_slots = torch.arange(start + T, device=dev)
        if positions is None:
            positions = slots.expand(B, T)
        if isinstance(prefix_len, int):
            prefix_len = torch.full((B,), prefix_len, device=dev)
        if self.embed is not None:
            x = self._embed(input_ids, positions, getattr(self, "pos_embed", None), block_positions)
        else:
            x = input_ids

        bias = None
        if cfg.pos == "alibi":
            bias = alibi_bias(self.alibi, slots[None], k_slots[None])
        elif cfg.pos == "t5":
            bias = self.t5_bias(slots[None], k_slots[None])
        simple = attn_mask is None and prefix_len is None
        masks, causal_flags = {}, {}
        for kind in {cfg.layer_type(i) for i in range(cfg.n_layers)}:
            window = cfg.sliding_window if kind == "local" else None
            win_inactive = window is None or start + T <= window
            if simple and win_inactive and (start == 0 or T == 1):
                # fast paths: SDPA's own causal kernel for a fresh prompt; no mask for one new token
                masks[kind], causal_flags[kind] = None, (start == 0 and T > 1)
            else:
                masks[kind] = build_mask(slots, k_slots, prefix_len=prefix_len, window=window, key_valid=attn_mask)
                causal_flags[kind] = False
        if bias is not None and masks.get("global") is None and causal_flags.get("global"):
            masks["global"] = build_mask(slots, k_slots)  # an additive bias needs an explicit causal mask
            causal_flags["global"] = False
        rope = self._rope(positions)

        cross_mask = None
        if cfg.arch == "encoder_decoder":
            if cache is not None and cache.cross is None:
                cache.cross = [None] * cfg.n_layers
            need_memory = cache is None or cache.cross[0] is None
            if memory is None and need_memory:
                if encoder_input_ids is None:
                    raise ValueError("an encoder_decoder model needs encoder_input_ids (or memory)")
                memory = self.encode(encoder_input_ids, encoder_attn_mask)
            if encoder_attn_mask is not None:
                cross_mask = encoder_attn_mask[:, None, None, :].bool()

        delta = None
        for blk in self.layers:
            kind = cfg.layer_type(blk.layer)
            ctx = dict(rope=rope[kind], mask=masks[kind], bias=bias, cache=cache, is_causal=causal_flags[kind],
                       memory=memory, cross_mask=cross_mask)
            x, delta = self._block(blk, x, ctx, delta)
        if cache is not None:
            cache.length = start + T
        if not self.final_stage:
            return self._finish(x, delta, None)
        x = self._finish(x, delta, self.norm)
        if labels is not None:
            return self.loss(x, labels, z_loss)
        if return_hidden:
            return x
        return self.project(x)

    @torch.compiler.disable  # the chunked loop and its native kernels run eagerly (a graph break under compile)
    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> tuple[torch.Tensor, dict]:
        """(loss, metrics) of the final hidden states: the mean cross-entropy over labels != -100 plus the PaLM
        z-loss (`llmkit.train.objectives.cross_entropy`). With a plain head weight (`fused_head_weight`) the
        projection and the loss are fused chunk by chunk and the logits are never materialised
        (`llmkit.train.fused_loss`). It runs inside `forward` (`labels=`), so DDP's and FSDP2's hooks see the head
        used in the forward: under FSDP2 the head's weight is the gathered tensor there."""
        from ..train.objectives import cross_entropy

        w = self.fused_head_weight()
        if w is None:
            return cross_entropy(self.project(hidden), labels, z_loss)
        from ..train.fused_loss import linear_cross_entropy

        return linear_cross_entropy(hidden, w, labels, z_loss)

    def fused_head_weight(self) -> torch.Tensor | None:
        """The output weight when the projection can be fused with the loss: a plain `nn.Linear` head (or tied
        embedding) whose weight is an ordinary tensor, without a logit soft-cap. None for a LoRA or quantised
        head (its module must run), a head that is its own FSDP2 unit or a tensor-parallel DTensor."""
        if self.cfg.logit_softcap is not None:
            return None
        if self.lm_head is not None:
            w = self.lm_head.weight if type(self.lm_head) is nn.Linear else None
        else:
            w = self.embed.weight if type(self.embed) is nn.Embedding else None
        return w if type(w) in (torch.Tensor, nn.Parameter) else None

    def _block(self, blk: Block, x: torch.Tensor, ctx: dict, delta: torch.Tensor | None):
        """(residual stream, its pending branch) after one block (see `Block.forward`)."""
        if self.cfg.norm_position == "post" or self.cfg.parallel_block:
            return blk(x, ctx), None
        return blk(x, ctx, delta)

    @staticmethod
    def _finish(x: torch.Tensor, delta: torch.Tensor | None, norm) -> torch.Tensor:
        """A stack's output: its last residual add, then its final norm (one pass where `Norm.add_forward` fuses)."""
        if norm is not None:
            return norm.add_forward(x, delta)[1]
        return x if delta is None else x + delta

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden) if self.lm_head is not None else hidden @ self.embed.weight.t()
        if self.cfg.logit_softcap is not None:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)
        return logits
