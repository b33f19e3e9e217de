"""Parallel layout and memory per rank of survey §4.3.2 (F7): choose DP x TP x PP plus ZeRO, and check it fits.

Implements:
- `validate_layout(cfg, world_size, dp, tp, pp, n_microbatches)`: refuses, with the numbers that break it, a
  layout whose degrees do not multiply to the world size, tensor parallelism that would split a head, a
  key/value head or the MLP width (llmkit's `distributed.apply_tp` shards whole heads, Megatron-LM style), MoE
  under TP (`apply_tp` refuses it), a pipeline with more stages than layers or fewer micro-batches than stages
  (it never fills), tied embeddings across pipeline stages (the embedding lives on the first stage and the
  head on the last), and encoder-decoder models or T5 position biases (one table for every layer) under a
  pipeline (`pipeline.make_stage` refuses them too);
- `estimate_memory(cfg, micro_batch=, seq_len=, ...)`: bytes per rank of the parameters, gradients, optimizer
  state and saved activations of one training micro-batch under llmkit's `Trainer`, and their total.

What is exact and what is approximate:
- parameters and gradients are float32 (the Trainer keeps float32 master weights and autocasts); optimizer
  state counts the tensors each optimizer of `llmkit.train.optim` creates: AdamW (torch's, fused) `exp_avg`,
  `exp_avg_sq` and a float32 scalar `step` per parameter; SGD a `momentum_buffer` (llmkit passes betas[0] as
  the momentum); Adafactor a float32 `step`, factored row/column second moments for matrices (O(n + m)),
  a full one for vectors, and `exp_avg` when beta1 > 0; Muon a `momentum_buffer` for hidden matrices and the
  AdamW trio for the rest. Shapes come from the model built on the meta device, so every architecture counts
  exactly. TP divides q/k/v/gate/up by rows and o/down by columns as `apply_tp` does (embeddings, norms, head
  and biases of o/down stay replicated); FSDP2 (shard="fsdp", ZeRO-3) keeps ceil(rows / dp) rows of every
  parameter, gradient and state on the largest rank. DDP (dp > 1, shard="none") adds its gradient-sized
  all-reduce buckets (`gradient_as_bucket_view=False`, torch's default and llmkit's) to `grads`. Not counted:
  FSDP2's transient all-gather and reduce-scatter buffers (about two blocks of full weights), the allocator's
  caching and fragmentation, the CUDA context, and temporaries of the forward and backward passes;
- activations are the bytes autograd saves for the backward in one forward of a micro-batch (plus the training
  loss), written term by term from what llmkit's model saves on each path (checked against the saved tensors
  of real forwards on the CPU in tests/train/test_memory.py: equal to the byte on torch 2.13). Per block, with
  N = micro_batch * seq_len, d the width, h / kv the query / key-value heads and f the MLP width on this rank
  (divided by tp), hd the head width, r its rotary dims and c the compute element size (4 for fp32, 2 under
  bf16/fp16 autocast):
    norms    2 * (4*N*d + 4*N*s)        each pre-norm saves its float32 input (the normalised rows through torch
                                        ops) and s row statistics (RMSNorm s = 1: rsqrt; LayerNorm s = 2)
                                        (+ 4*d with Gemma's (1 + w) offset); sandwich norms: 4 of them;
                                        a parallel block (GPT-J, PaLM): 1
             + 2 * c*N*d                its output as the q/k/v and gate/up matmuls read it (1 in a parallel
                                        block); Post-LN under autocast: q, k, v (and gate, up) cast their input
                                        apiece, + (2 + 1 for GLU) * c*N*d
    attention c*(2*N*h*hd + 2*N*kv*hd)  q, k, v and the output (the o projection's input)
             (+ QK-norm: N*(h + kv) * (4*hd + 4*s), the input c bytes for LayerNorm under autocast)
             + c*B*h*T*T                the probabilities, where the CPU training kernels keep them:
                                        float32 with the native kernels, bf16 autocast (`CausalAttention`),
                                        both only while B*h*T*T*c <= attention.MAX_SAVED_SCORE_BYTES, for plain
                                        causal attention
             or + 4*B*h*T (+ c*N*h*hd)  elsewhere (SDPA's flash kernel): the log-sum-exp, and on the CPU with
                                        RoPE outside the native kernel (autocast, partial rotation, QK-norm) a
                                        copy of the output (SDPA returns it head-major for the contiguous q of
                                        torch's RoPE); with a sliding window shorter than T, also the mask as
                                        c*T*T floats, and with ALiBi its biased mask, c*h*T*T
             soft-capped attention (Gemma 2, written out): 4*c*N*h*hd (q, k, v with every query head,
                                        and o) + 2*c*B*h*T*T (capped scores, probabilities; + 4*B*h*T*T with
                                        ALiBi under autocast) + T*T (its mask), instead of the above
    MLP      k*c*N*f                    k = 3 for float32 SwiGLU through the native kernel; GLU: 4 (gate, act,
                                        up, product), 3 with ReLU (it keeps its output, not its input);
                                        plain: 2 (up, act), 1 with ReLU
    autocast 2 * (block matmul weights) the bf16 copies of the weights (TP-local; under FSDP2 of the gathered
                                        weights), + RoPE's half-width bf16 cos/sin for q and k (4*B*T*hd bytes;
                                        whole-head rotation only)
  and once per forward: the token ids (8*N, int64), learned positions (8*T), the embedding scale (4), RoPE's
  float32 cos/sin (2 * 4*B*T*r, shared by all blocks in float32 or with partial rotation), the final norm, and
  the loss: the fused output projection + cross-entropy of `fused_loss`, inside the model's forward in every
  layout (plain, DDP, FSDP2, TP, a pipeline's last stage), keeps its float32 gradients w.r.t. the hidden states
  and the head (4*N*d + 4*V*d); a logit soft-cap takes the plain head instead: its input (c*N*d, and the bf16
  weight 2*V*d under autocast), the capped logits (c*N*V), their float32 log-softmax (4*N*V) and the labels (8*N).
  With activation checkpointing (`trainer.apply_activation_checkpointing`) a block keeps only its inputs (the
  float32 residual and, for pre-norm blocks, the pending branch, c bytes) and the shared arguments (RoPE tables,
  a windowed layer's boolean mask, ALiBi's float32 bias and causal mask), and the backward recomputes one block
  at a time: the largest block's activations are added as the peak. Pipeline stages (`llmkit.train.pipeline`)
  run 1F1B: stage s holds pp - s micro-batches in flight (Narayanan et al. 2021), so the first stage holds pp
  (GPipe would hold all m).
  The estimate describes llmkit's default path on the given `device` for causal-LM batches: on the CPU with the
  native float32 kernels built (`native=False` for LLMKIT_NATIVE=0 or no compiler), which is what the tests
  measure; on CUDA (no native kernels; SDPA flash attention in bf16/fp16 and memory-efficient attention in fp32,
  whose log-sum-exp is padded to 32 rows; its random-state scalars are left out) it is the same accounting, not
  measured here. It covers decoder-only models (prefix decoders included) with dense FFNs: pre-norm, Post-LN,
  DeepNorm, sandwich and parallel blocks, QK-norm, sliding windows, ALiBi, partial RoPE, Gemma's norm offset,
  embedding scale and soft-capping, GLM's block positions and embedding-gradient shrink. It refuses, with a
  ValueError rather than a guess, encoder-decoder models, MoE, dropout and T5 biases. `micro_batch` is the number of
  sequences per forward on one data-parallel rank.
"""
from __future__ import annotations

import math
import re

import torch

from ..model import attention as _attention
from ..model.config import ModelConfig
from ..model.layers import activation_base
from .config import DTYPES, OPTIMIZERS
from .optim import is_embedding
from .pipeline import split_layers

SHARDS = ("none", "fsdp")
DEVICES = ("cpu", "cuda")
KEYS = ("params", "grads", "optimizer", "activations", "total")
F32 = 4  # master weights, gradients and optimizer states are float32


# ---------------------------------------------------------------------------------------------- layout
def validate_layout(cfg: ModelConfig, world_size: int, dp: int = 1, tp: int = 1, pp: int = 1,
                    n_microbatches: int | None = None) -> None:
    """Raise ValueError, naming the numbers, when the DP x TP x PP layout cannot run `cfg` on `world_size` ranks."""
    if min(dp, tp, pp) < 1 or world_size < 1:
        raise ValueError(f"parallel degrees must be >= 1: got world_size={world_size}, dp={dp}, tp={tp}, pp={pp}")
    if dp * tp * pp != world_size:
        raise ValueError(f"dp*tp*pp = {dp}*{tp}*{pp} = {dp * tp * pp} does not equal world_size={world_size}")
    if tp > 1:
        if cfg.n_experts:
            raise ValueError("tensor parallelism of MoE layers is not supported; use fsdp or ddp")
        if cfg.n_heads % tp or cfg.n_kv_heads % tp:
            raise ValueError(f"tensor parallelism needs n_heads={cfg.n_heads} and n_kv_heads={cfg.n_kv_heads} "
                             f"divisible by tp={tp}")
        if cfg.d_ff % tp:
            raise ValueError(f"tensor parallelism needs the MLP width d_ff={cfg.d_ff} divisible by tp={tp}")
    if pp > 1:
        if cfg.n_layers < pp:
            raise ValueError(f"pipeline parallelism needs a layer per stage: n_layers={cfg.n_layers} < pp={pp}")
        if cfg.tie_embeddings:
            raise ValueError(f"tie_embeddings=True shares the embedding (first stage) with the output head (last "
                             f"stage); untie them or use pp=1 (got pp={pp})")
        if cfg.arch == "encoder_decoder":
            raise ValueError(f"pipeline parallelism takes decoder-only models; this one is encoder-decoder (got pp={pp})")
        if cfg.pos == "t5":
            raise ValueError(f"pos=t5: one relative-position bias table serves every layer, so stages would each train "
                             f"a copy; use rope or alibi, or pp=1 (got pp={pp})")
    if n_microbatches is not None and n_microbatches < pp:
        raise ValueError(f"n_microbatches={n_microbatches} < pp={pp}: the pipeline would never fill (every stage "
                         f"needs a micro-batch in flight)")


# ---------------------------------------------------------------------------------------------- parameters
_COLWISE = re.compile(r"^layers\.\d+\.(attn\.(q|k|v)|mlp\.(gate|up))\.(weight|bias)$")
_ROWWISE = re.compile(r"^layers\.\d+\.(attn\.o|mlp\.down)\.weight$")


def _param_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter, from the model built on the meta device (no memory, exact shapes)."""
    from ..model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _tp_local(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape one TP rank holds (`distributed.apply_tp`: q/k/v, gate/up by rows; o, down by columns)."""
    if tp == 1:
        return shape
    if _COLWISE.match(name):
        return (shape[0] // tp, *shape[1:])
    if _ROWWISE.match(name):
        return (shape[0], shape[1] // tp)
    return shape


def _fsdp_local(shape: tuple[int, ...], dp: int) -> tuple[int, ...]:
    """FSDP2 shards dim 0 in torch.chunk pieces: the largest rank holds ceil(rows / dp) rows."""
    if dp == 1 or not shape:
        return shape
    return (-(-shape[0] // dp), *shape[1:])


def _stage_of(name: str, layer_stage: list[int], pp: int) -> int:
    m = re.match(r"^layers\.(\d+)\.", name)
    if m:
        return layer_stage[int(m.group(1))]
    if name.startswith(("norm.", "lm_head.")):
        return pp - 1
    return 0  # embeddings, positions (and any encoder) on the first stage


def _optimizer_bytes(name: str, shape: tuple[int, ...], optimizer: str, beta1: float) -> int:
    numel = math.prod(shape)
    if optimizer == "adamw":
        return 2 * F32 * numel + F32  # exp_avg, exp_avg_sq, step (a float32 scalar tensor)
    if optimizer == "sgd":
        return F32 * numel if beta1 else 0  # momentum_buffer
    if optimizer == "adafactor":
        if len(shape) >= 2:
            second = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]  # row and column factors
        else:
            second = numel
        return F32 + F32 * second + (F32 * numel if beta1 else 0)
    # muon: hidden matrices keep a momentum buffer; embeddings, head, norms and biases run AdamW
    if len(shape) >= 2 and not is_embedding(name) and not name.startswith("lm_head"):
        return F32 * numel
    return 2 * F32 * numel + F32


def _layer_stages(n_layers: int, pp: int) -> list[int]:
    """Stage of each layer, as `pipeline.split_layers` assigns them."""
    return [s for s, r in enumerate(split_layers(n_layers, pp)) for _ in r]


# ---------------------------------------------------------------------------------------------- activations
def _check_supported(cfg: ModelConfig) -> None:
    unsupported = {
        "arch": cfg.arch == "encoder_decoder", "n_experts": bool(cfg.n_experts), "dropout": cfg.dropout > 0,
        "pos": cfg.pos == "t5",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"estimate_memory's activation model covers decoder-only models with dense FFNs, no dropout "
                         f"or T5 biases; this config sets {bad}")


class _Act:
    """Saved-activation bytes of one micro-batch on one rank (see the module docstring for every term)."""

    def __init__(self, cfg: ModelConfig, B: int, T: int, dtype: str, device: str, native: bool, tp: int):
        self.cfg, self.B, self.T, self.N = cfg, B, T, B * T
        self.dtype, self.c = dtype, (4 if dtype == "fp32" else 2)
        self.autocast = dtype != "fp32"
        self.cpu = device == "cpu"
        self.native_f32 = self.cpu and native and dtype == "fp32"
        self.h, self.kv, self.f = cfg.n_heads // tp, cfg.n_kv_heads // tp, cfg.d_ff // tp
        self.hd, self.d, self.V = cfg.head_dim, cfg.d_model, cfg.vocab_size
        self.stats = 1 if cfg.norm == "rmsnorm" else 2
        self.rope = cfg.pos == "rope"
        self.rot = int(cfg.head_dim * cfg.rope_fraction) if self.rope else 0  # rotary dims of a head
        # RoPE through the native kernel: float32, whole heads, q and k straight from their projections
        self.native_rope = self.native_f32 and cfg.rope_fraction == 1.0 and not cfg.qk_norm
        # under autocast a whole-head rotation casts the first halves of cos/sin per block; a partial one keeps
        # the float32 tables
        self.rope_halves = self.autocast and self.rope and self.rot == cfg.head_dim

    def _probs_kept(self) -> bool:
        """Whether attention keeps the [B, h, T, T] probabilities: the CPU training kernels (`use_causal_attention`,
        `use_native_attention`) within attention.MAX_SAVED_SCORE_BYTES."""
        if not self.cpu or not (self.native_f32 or self.dtype == "bf16"):
            return False
        return self.B * self.h * self.T * self.T * self.c <= _attention.MAX_SAVED_SCORE_BYTES

    def _windowed(self, layer: int) -> bool:
        """Whether layer's attention takes an explicit mask: a sliding window shorter than the sequence."""
        return self.cfg.layer_type(layer) == "local" and self.T > self.cfg.sliding_window

    def block(self, layer: int = 0) -> int:
        cfg = self.cfg
        N, d, c, B, T, h, kv, hd, f = self.N, self.d, self.c, self.B, self.T, self.h, self.kv, self.hd, self.f
        one_norm = F32 * N * d + F32 * N * self.stats + (F32 * d if cfg.norm_offset else 0)
        if cfg.parallel_block:  # one norm feeds both branches, cast once
            norms = one_norm + c * N * d
        else:
            norms = 2 * one_norm + 2 * c * N * d
            if cfg.norm_position == "sandwich":  # the norms after each branch save their float32 inputs too
                norms += 2 * one_norm
            if cfg.norm_position == "post" and self.autocast:  # no single cast: q, k, v (and gate, up) cast apiece
                norms += (2 + (1 if cfg.is_glu else 0)) * c * N * d
        attn = c * (2 * N * h * hd + 2 * N * kv * hd)
        biased = cfg.pos == "alibi"
        if cfg.attn_softcap is not None:  # the written-out attention: q, k and v with every query head (GQA
            # repeats k and v), the capped scores and the probabilities, and its causal or window mask (~mask);
            # an ALiBi bias (float32) makes the probabilities float32, cast back to c for the product with v
            scores = 2 * c + (F32 if biased and self.autocast else 0)
            attn = c * 4 * N * h * hd + scores * B * h * T * T + T * T
        elif not (masked := self._windowed(layer) or biased) and self._probs_kept():
            attn += c * B * h * T * T
        else:  # SDPA: its float32 log-sum-exp (on CUDA the memory-efficient kernel, for fp32 and for any explicit
            # mask, pads it to 32 rows) and an explicit float mask: a window shorter than T, or ALiBi's biased mask
            rows = -(-T // 32) * 32 if (not self.cpu and (masked or not self.autocast)) else T
            attn += F32 * B * h * rows + (c * (h if biased else 1) * T * T if masked else 0)
            if self.cpu and self.rope and not self.native_rope:
                attn += c * N * h * hd  # CPU SDPA answers a contiguous q (torch's RoPE) head-major: o copies it
        if cfg.qk_norm:  # the q and k norms' inputs (float32, but LayerNorm under autocast keeps c) and row statistics
            x_bytes = c if (self.autocast and cfg.norm == "layernorm") else F32
            attn += N * (h + kv) * (x_bytes * hd + F32 * self.stats) + (2 * F32 * hd if cfg.norm_offset else 0)
        base = activation_base(cfg.activation)
        if cfg.is_glu:
            k = 3 if (self.native_f32 and base == "silu") or base == "relu" else 4
        else:
            k = 1 if base == "relu" else 2
        mlp = k * c * N * f
        extra = 0
        if self.autocast:
            w = d * (h + 2 * kv) * hd + h * hd * d + (3 if cfg.is_glu else 2) * d * f
            extra += 2 * w
            if self.rope_halves:
                extra += 4 * B * T * (self.rot // 2) * 2  # cos/sin halves cast for q and for k
        return norms + attn + mlp + extra

    def rope_tables(self) -> int:
        """RoPE's float32 cos/sin [B, 1, T, r] (r: the rotary dims), shared by every block."""
        return 2 * F32 * self.B * self.T * self.rot

    def embed_terms(self) -> int:
        return 8 * self.N + (8 * self.T if self.cfg.pos == "learned" else 0) + (F32 if self.cfg.embed_scale else 0)

    def head_terms(self) -> int:
        N, d, V, c = self.N, self.d, self.V, self.c
        out = 0
        if self.cfg.has_final_norm:
            out = F32 * N * d + F32 * N * self.stats + (F32 * d if self.cfg.norm_offset else 0)
        if self.cfg.logit_softcap is not None:  # the plain head: its input (and bf16 weight), the capped logits,
            # the float32 log-softmax, the int64 labels and the cap as a scalar
            return out + c * N * d + (2 * V * d if self.autocast else 0) + c * N * V + F32 * N * V + 8 * N + F32
        return out + F32 * N * d + F32 * V * d  # fused_loss: d loss/d hidden and d loss/d head weight

    def ctx_tensors(self, layers: list[int]) -> int:
        """What checkpointed blocks keep of their shared arguments besides RoPE's tables: the boolean masks of
        windowed layers, ALiBi's float32 bias for all local heads and its causal mask."""
        out = self.T * self.T if any(self._windowed(i) for i in layers) else 0
        if self.cfg.pos == "alibi":
            out += F32 * self.h * self.T * self.T + (0 if all(self._windowed(i) for i in layers) else self.T * self.T)
        return out

    def block_inputs(self, first: bool) -> int:
        """What a checkpointed block keeps: the float32 residual and, after the first pre-norm block, the pending
        branch (post-norm and parallel blocks hand on their whole output)."""
        pending = not first and not self.cfg.parallel_block and self.cfg.norm_position != "post"
        return F32 * self.N * self.d + (self.c * self.N * self.d if pending else 0)


def estimate_memory(cfg: ModelConfig, *, micro_batch: int, seq_len: int, dtype: str = "fp32",
                    optimizer: str = "adamw", dp: int = 1, tp: int = 1, pp: int = 1, shard: str = "none",
                    activation_checkpointing: bool = False, device: str = "cpu", native: bool = True,
                    beta1: float = 0.9, stage: int | None = None) -> dict:
    """Bytes on the largest rank: {'params', 'grads', 'optimizer', 'activations', 'total'} (see the module docstring).

    dtype: the Trainer's autocast dtype (fp32 | bf16 | fp16); optimizer: TrainConfig.optimizer; beta1:
    TrainConfig.betas[0] (SGD momentum, Adafactor's first moment); shard: "none" (replicated, DDP) or "fsdp"
    (FSDP2 / ZeRO-3 over dp); device: "cpu" or "cuda"; native: llmkit's native float32 CPU kernels are built
    and on (the default). With pp > 1 the largest pipeline stage is reported, or pipeline stage `stage` when given."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; choose one of {list(DTYPES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is unknown; choose one of {list(OPTIMIZERS)}")
    if shard not in SHARDS:
        raise ValueError(f"shard={shard!r} is unknown; choose one of {list(SHARDS)}")
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is unknown; choose one of {list(DEVICES)}")
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch and seq_len must be >= 1, got {micro_batch} and {seq_len}")
    validate_layout(cfg, dp * tp * pp, dp, tp, pp)
    if tp > 1 and dp > 1 and shard == "none":
        raise ValueError("llmkit composes tensor parallelism with FSDP only (strategy fsdp+tp): use shard='fsdp'")
    _check_supported(cfg)

    layer_stage = _layer_stages(cfg.n_layers, pp)
    stages = [dict.fromkeys(KEYS, 0) for _ in range(pp)]
    for name, shape in _param_shapes(cfg):
        local = _tp_local(name, shape, tp)
        if shard == "fsdp":
            local = _fsdp_local(local, dp)
        st = stages[_stage_of(name, layer_stage, pp)]
        st["params"] += F32 * math.prod(local)
        st["grads"] += F32 * math.prod(local)
        st["optimizer"] += _optimizer_bytes(name, local, optimizer, beta1)
    if dp > 1 and shard == "none":  # DDP's all-reduce buckets hold another copy of the gradients
        for st in stages:
            st["grads"] *= 2

    if stage is not None and not 0 <= stage < pp:
        raise ValueError(f"stage={stage} is not one of the {pp} pipeline stages")
    act = _Act(cfg, micro_batch, seq_len, dtype, device, native, tp)
    for s, st in enumerate(stages):
        layers = [i for i, ls in enumerate(layer_stage) if ls == s]
        outside = (act.embed_terms() if s == 0 else 0) + (act.head_terms() if s == pp - 1 else 0)
        if activation_checkpointing:
            kept = outside + act.rope_tables() + act.ctx_tensors(layers) + sum(act.block_inputs(i == 0) for i in layers)
            peak = max(act.block(i) for i in layers)  # the block being recomputed in the backward
        else:
            shared = act.rope_tables() if not act.rope_halves else 0  # bf16 casts halves per block instead
            kept = outside + shared + sum(act.block(i) for i in layers)
            peak = 0
        st["activations"] = (pp - s) * kept + peak  # 1F1B: stage s holds pp - s micro-batches
        st["total"] = st["params"] + st["grads"] + st["optimizer"] + st["activations"]
    return stages[stage] if stage is not None else max(stages, key=lambda st: st["total"])
