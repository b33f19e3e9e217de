"""F7 layout validator and memory estimator: refusals, and bytes against tensors measured on a tiny model."""
import math
import re

import pytest
import torch

import llmkit.model.attention as attention
import llmkit.model.layers as layers
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.train.memory import estimate_memory, validate_layout
from llmkit.train.objectives import lm_loss
from llmkit.train.pipeline import make_stage
from llmkit.train.trainer import Trainer, apply_activation_checkpointing
from tests.train.conftest import DDPLike, loaders, tiny_cfg, tiny_model, train_cfg


# ---------------------------------------------------------------------------------------------- validator
@pytest.mark.parametrize("kw, world, msg", [
    (dict(dp=2, tp=2, pp=1), 8, "dp*tp*pp = 2*2*1 = 4 does not equal world_size=8"),
    (dict(dp=0, tp=1, pp=1), 0, "parallel degrees must be >= 1"),
    (dict(tp=3), 3, "n_heads=4 and n_kv_heads=4 divisible by tp=3"),
    (dict(pp=3), 3, "n_layers=2 < pp=3"),
])
def test_validator_refuses_degrees(kw, world, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        validate_layout(tiny_cfg(), world, **kw)


def test_validator_refuses_kv_heads_ffn_moe_tied_and_short_pipelines():
    with pytest.raises(ValueError, match=re.escape("n_heads=8 and n_kv_heads=2 divisible by tp=4")):
        validate_layout(tiny_cfg(n_heads=8, n_kv_heads=2), 4, tp=4)
    with pytest.raises(ValueError, match=re.escape("d_ff=90 divisible by tp=4")):
        validate_layout(tiny_cfg(d_ff=90), 4, tp=4)
    with pytest.raises(ValueError, match="tensor parallelism of MoE layers is not supported"):
        validate_layout(tiny_cfg(n_experts=4), 2, tp=2)
    with pytest.raises(ValueError, match=re.escape("tie_embeddings=True") + ".*pp=2"):
        validate_layout(tiny_cfg(tie_embeddings=True), 2, pp=2)
    with pytest.raises(ValueError, match=re.escape("pos=t5") + ".*pp=2"):
        validate_layout(tiny_cfg(pos="t5", tie_embeddings=False), 2, pp=2)
    with pytest.raises(ValueError, match="encoder-decoder"):
        validate_layout(tiny_cfg(arch="encoder_decoder", pos="t5", tie_embeddings=False), 2, pp=2)
    with pytest.raises(ValueError, match=re.escape("n_microbatches=3 < pp=4")):
        validate_layout(tiny_cfg(n_layers=4), 4, pp=4, n_microbatches=3)


def test_validator_accepts_valid_layouts():
    validate_layout(tiny_cfg(), 1)
    validate_layout(tiny_cfg(n_layers=4, n_heads=8, n_kv_heads=4, d_ff=96), 16, dp=2, tp=4, pp=2, n_microbatches=2)
    validate_layout(tiny_cfg(n_experts=4, tie_embeddings=True), 8, dp=8)  # MoE and tying are fine without TP / PP


# ---------------------------------------------------------------------------------------------- params / grads / state
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _one_real_step(optimizer: str, **model_kw):
    """Per parameter name: (shape, param bytes, grad bytes, [(state key, bytes, state shape)]) after one Trainer
    step of a tiny model (gradients read after the backward, state after the optimizer step)."""
    model = tiny_model(**model_kw)
    tr, _ = loaders(2, 16)
    t = Trainer(model, train_cfg(micro_batch_size=2, seq_len=16, optimizer=optimizer), tr)
    t.train_step([next(tr)])
    grads = {n: _nbytes(p.grad) for n, p in model.named_parameters()}
    t._clip()
    t._apply()
    out = {}
    for n, p in model.named_parameters():
        state = [(k, _nbytes(v), tuple(v.shape)) for k, v in t.optimizer.state[p].items() if torch.is_tensor(v)]
        assert state or optimizer == "sgd"  # every optimizer but momentum-free SGD keeps something
        out[n] = (tuple(p.shape), _nbytes(p), grads[n], state)
    return model.cfg, out


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor", "muon"])
def test_params_grads_optimizer_equal_measured_bytes(optimizer):
    cfg, m = _one_real_step(optimizer)
    est = estimate_memory(cfg, micro_batch=2, seq_len=16, optimizer=optimizer)
    assert est["params"] == sum(v[1] for v in m.values())
    assert est["grads"] == sum(v[2] for v in m.values())
    assert est["optimizer"] == sum(b for v in m.values() for _, b, _ in v[3])
    assert est["total"] == est["params"] + est["grads"] + est["optimizer"] + est["activations"]


# Megatron layout of llmkit.train.distributed.apply_tp, written from the module names it shards
_TP_ROWS = ("attn.q.", "attn.k.", "attn.v.", "mlp.gate.", "mlp.up.")
_TP_COLS = ("attn.o.weight", "mlp.down.weight")


def _tp_divisor(name: str, tp: int) -> int:
    inner = name.split(".", 2)[-1] if name.startswith("layers.") else ""
    return tp if inner.startswith(_TP_ROWS) or inner in _TP_COLS else 1


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_tensor_parallel_divides_the_sharded_matrices(optimizer):
    cfg, m = _one_real_step(optimizer)
    est = estimate_memory(cfg, micro_batch=2, seq_len=16, optimizer=optimizer, tp=2)
    assert est["params"] == sum(v[1] // _tp_divisor(n, 2) for n, v in m.items())
    assert est["grads"] == sum(v[2] // _tp_divisor(n, 2) for n, v in m.items())
    # AdamW's scalar `step` is per parameter, not sharded; the moments shard with their parameter
    assert est["optimizer"] == sum(b // (_tp_divisor(n, 2) if k != "step" else 1)
                                   for n, v in m.items() for k, b, _ in v[3])
    assert est["params"] < sum(v[1] for v in m.values())  # something was sharded


@pytest.mark.parametrize("optimizer, dp", [("adamw", 2), ("sgd", 2), ("adamw", 3)])
def test_fsdp_shards_rows_over_dp(optimizer, dp):
    """FSDP2 splits dim 0 in torch.chunk pieces: the largest rank holds ceil(rows / dp) rows of every tensor
    (dp=3 does not divide d_ff=88 or the 32-wide matrices)."""
    cfg, m = _one_real_step(optimizer)
    est = estimate_memory(cfg, micro_batch=2, seq_len=16, optimizer=optimizer, dp=dp, shard="fsdp")

    def shard(nbytes, shape):
        return nbytes if not shape else nbytes // shape[0] * math.ceil(shape[0] / dp)

    assert est["params"] == sum(shard(v[1], v[0]) for v in m.values())
    assert est["grads"] == sum(shard(v[2], v[0]) for v in m.values())
    assert est["optimizer"] == sum(shard(b, s) for v in m.values() for _, b, s in v[3])
    # DDP replicates everything and keeps gradient-sized all-reduce buckets besides the gradients
    ddp = estimate_memory(cfg, micro_batch=2, seq_len=16, optimizer=optimizer, dp=dp)
    assert ddp["params"] == sum(v[1] for v in m.values()) and ddp["grads"] == 2 * sum(v[2] for v in m.values())


def test_pipeline_reports_the_largest_stage():
    cfg, m = _one_real_step("adamw", n_layers=3, vocab_size=512)
    # 3 layers on 2 stages: layers 0, 1 and the embedding on stage 0; layer 2, the final norm and the head on stage 1
    first = sum(v[1] for n, v in m.items() if not n.startswith(("layers.2.", "norm.", "lm_head.")))
    last = sum(v[1] for v in m.values()) - first
    est = estimate_memory(cfg, micro_batch=2, seq_len=16, pp=2)
    assert est["params"] == max(first, last)
    with pytest.raises(ValueError, match="pp=4"):
        estimate_memory(cfg, micro_batch=2, seq_len=16, pp=4)
    with pytest.raises(ValueError, match="fsdp"):
        estimate_memory(tiny_cfg(), micro_batch=2, seq_len=16, dp=2, tp=2)


# ---------------------------------------------------------------------------------------------- activations
def _saved_bytes(cfg: ModelConfig, B: int, T: int, dtype=None, ckpt=False, wrapped=False, last_stage=False) -> int:
    """Unique storage bytes autograd saves for the backward in one forward + lm_loss (parameters excluded: they are
    counted as params). With activation checkpointing, torch's non-reentrant checkpoint saves the tensor inputs
    of each block through the same hooks, and keeps the rest of its arguments (the `ctx` dict: RoPE tables) for
    the recomputation: those are added from a wrapper around each checkpointed block. `last_stage`: the last of
    two pipeline stages (`make_stage`) on hidden states from the first, its loss computed in its forward as
    `PipelineDist` runs it."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    if last_stage:
        make_stage(model, 1, 2)
    if ckpt:
        apply_activation_checkpointing(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def add(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    if ckpt:
        for blk in model.layers:
            def fwd(x, ctx, *delta, _inner=blk.forward):
                args = [x, *delta] + [t for v in ctx.values() for t in (v if isinstance(v, tuple) else (v,))]
                for t in args:
                    if torch.is_tensor(t):
                        add(t)
                return _inner(x, ctx, *delta)

            blk.forward = fwd
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    batch = {"input_ids": ids, "labels": torch.randint(0, cfg.vocab_size, (B, T))}
    cast = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(add, lambda t: t), cast:
        if last_stage:  # the stage's input: the first stage's float32 hidden states, received as a leaf
            loss, _ = model(torch.randn(B, T, cfg.d_model, requires_grad=True), labels=batch["labels"])
            assert type(loss.grad_fn).__name__ == "LinearCrossEntropyBackward"  # the fused head: no logits kept
        else:
            lm_loss(DDPLike(model) if wrapped else model, batch)
    return sum(seen.values())


def _measured(cfg, B, T, dtype=None, ckpt=False, wrapped=False) -> int:
    """Saved bytes; with checkpointing, what the forward keeps plus the recompute of one block in the backward,
    measured as the saved bytes of n_layers blocks minus those of n_layers - 1 (no checkpointing)."""
    kept = _saved_bytes(cfg, B, T, dtype, ckpt, wrapped)
    if not ckpt:
        return kept
    fewer = ModelConfig(**{**cfg.to_dict(), "n_layers": cfg.n_layers - 1})
    return kept + _saved_bytes(cfg, B, T, dtype, False, wrapped) - _saved_bytes(fewer, B, T, dtype, False, wrapped)


def _native() -> bool:
    ext = layers.native_ext()
    if ext is not None and not ext.attention_available():
        pytest.skip("native kernels built without a BLAS sgemm: the attention takes another path")
    return ext is not None


def _gpt2(**kw):
    base = dict(vocab_size=96, d_model=48, n_layers=2, n_heads=4, max_seq_len=256, norm="layernorm",
                activation="gelu", pos="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True)
    return ModelConfig(**{**base, **kw})


CONFIGS = {  # (config, micro-batch, sequence length)
    "llama": (tiny_cfg(), 2, 16),
    "llama-gqa": (tiny_cfg(d_model=64, n_layers=3, n_heads=8, n_kv_heads=2), 3, 24),
    "gpt2": (_gpt2(), 2, 16),
    "gpt2-relu-untied": (_gpt2(d_model=64, activation="relu", tie_embeddings=False), 1, 40),
    "reglu-sinusoidal": (tiny_cfg(activation="reglu", pos="sinusoidal", norm="layernorm"), 2, 8),
    # QK-norm with GQA (Qwen3, OLMo 2)
    "qk-norm-gqa": (tiny_cfg(d_model=64, n_heads=8, n_kv_heads=2, qk_norm=True), 2, 24),
    # Gemma 2/3: sandwich norms with the (1 + w) offset, embedding scale, QK-norm, local and global layers
    "gemma-local-global": (tiny_cfg(norm_position="sandwich", norm_offset=1.0, embed_scale=4.0, qk_norm=True,
                                    activation="geglu", sliding_window=6, layer_types=["local", "global"]), 2, 16),
    # Gemma 2: attention and logit soft-capping (written-out attention, plain head), GQA, local and global layers
    "gemma2-softcap": (tiny_cfg(attn_softcap=50.0, logit_softcap=30.0, norm_position="sandwich", norm_offset=1.0,
                                embed_scale=4.0, activation="geglu", n_kv_heads=2, sliding_window=6,
                                layer_types=["local", "global"]), 2, 16),
    "gemma2-softcap-global": (tiny_cfg(attn_softcap=50.0, logit_softcap=30.0, n_kv_heads=2), 2, 16),
    # BLOOM: ALiBi, LayerNorm, GELU, biases
    "bloom-alibi": (_gpt2(pos="alibi", tie_embeddings=False), 2, 16),
    # GPT-NeoX / GPT-J: parallel block, partial rotary
    "neox-parallel": (tiny_cfg(parallel_block=True, rope_fraction=0.25, norm="layernorm", activation="gelu"), 3, 16),
    # GLM-130B: prefix decoder, Post-LN DeepNorm, GeGLU, embedding-gradient shrink, GLM's block positions
    "glm-post-deepnorm": (tiny_cfg(arch="prefix_decoder", norm_position="post", deepnorm=True, norm="layernorm",
                                   activation="geglu", embed_grad_scale=0.1, block_pos=True), 2, 16),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _check(name, dtype, ckpt=False, wrapped=False, native=None):
    cfg, B, T = CONFIGS[name]
    meas = _measured(cfg, B, T, DTYPES[dtype], ckpt, wrapped)
    est = estimate_memory(cfg, micro_batch=B, seq_len=T, dtype=dtype, activation_checkpointing=ckpt,
                          dp=2 if wrapped else 1, native=_native() if native is None else native)["activations"]
    # exact on torch 2.13, the pinned release; on others (`make compat`) a bound leaves room for torch to change a
    # kernel's saved tensors
    tol = 0.0 if torch.__version__.startswith("2.13.") else 0.10
    assert abs(est - meas) <= tol * meas, (name, dtype, ckpt, wrapped, est, meas)
    return est, meas


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_activations_match_saved_tensors(name, dtype):
    _check(name, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["llama", "llama-gqa", "gpt2", "bloom-alibi", "neox-parallel", "glm-post-deepnorm",
                                  "gemma2-softcap-global"])
def test_activation_checkpointing_keeps_block_inputs_plus_one_block(name, dtype):
    est, meas = _check(name, dtype, ckpt=True)
    full, _ = _check(name, dtype)
    assert est < full


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_wrapped_model_keeps_the_fused_head(dtype):
    """DDP (dp > 1) wraps the model, whose forward still fuses the head with the loss: nothing more is kept."""
    est, wrapped = _check("gpt2-relu-untied", dtype, wrapped=True)
    assert (est, wrapped) == _check("gpt2-relu-untied", dtype)
    _check("llama", dtype, wrapped=True)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["llama", "gpt2-relu-untied"])
def test_last_pipeline_stage_fuses_its_head(name, dtype):
    """The last pipeline stage computes its loss in its forward too: no logits are kept."""
    cfg, B, T = CONFIGS[name]
    meas = _saved_bytes(cfg, B, T, DTYPES[dtype], last_stage=True)
    est = estimate_memory(cfg, micro_batch=B, seq_len=T, dtype=dtype, pp=2, stage=1, native=_native())
    assert abs(est["activations"] - meas) <= 0.10 * meas, (est["activations"], meas)
    # stage 1 holds one micro-batch: its blocks, RoPE tables and the fused head, as in the whole model's plan
    whole = estimate_memory(cfg, micro_batch=B, seq_len=T, dtype=dtype, native=_native())["activations"]
    assert est["activations"] < whole
    with pytest.raises(ValueError, match="stage=2"):
        estimate_memory(cfg, micro_batch=B, seq_len=T, pp=2, stage=2)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activations_without_native_kernels(dtype, monkeypatch):
    monkeypatch.setattr(layers, "_NATIVE", [lambda: None])  # as LLMKIT_NATIVE=0
    for name in ("llama-gqa", "gpt2", "qk-norm-gqa", "gemma-local-global", "gemma2-softcap", "neox-parallel"):
        _check(name, dtype, native=False)
    _check("llama", dtype, ckpt=True, native=False)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activations_past_the_saved_score_limit(dtype, monkeypatch):
    """Above MAX_SAVED_SCORE_BYTES per layer the CPU kernels give way to SDPA's flash kernel (no T*T probabilities)."""
    cfg, B, T = CONFIGS["llama"]
    with_probs = estimate_memory(cfg, micro_batch=B, seq_len=T, dtype=dtype, native=_native())["activations"]
    monkeypatch.setattr(attention, "MAX_SAVED_SCORE_BYTES", 16)
    est, _ = _check("llama", dtype)
    _check("gpt2", dtype)
    if dtype == "bf16" or _native():  # the paths that keep the probabilities below the limit
        assert est < with_probs
    else:  # float32 without the native kernels takes SDPA at every size
        assert est == with_probs


def test_activation_scaling_and_parallel_division():
    cfg = tiny_cfg(n_layers=4)
    one = estimate_memory(cfg, micro_batch=2, seq_len=16, native=_native())["activations"]
    assert estimate_memory(cfg, micro_batch=4, seq_len=16, native=_native())["activations"] > 1.9 * one  # ~linear
    assert estimate_memory(cfg, micro_batch=2, seq_len=16, tp=2, native=_native())["activations"] < one
    # 1F1B: the first of 2 stages holds 2 micro-batches of its 2 layers (one block measured as 4 layers - 3 layers)
    block = _saved_bytes(cfg, 2, 16) - _saved_bytes(tiny_cfg(n_layers=3), 2, 16)
    two_stages = estimate_memory(cfg, micro_batch=2, seq_len=16, pp=2, native=_native())["activations"]
    assert 2 * 2 * block < two_stages < 2 * one
    on_gpu = estimate_memory(cfg, micro_batch=2, seq_len=16, dtype="bf16", device="cuda")["activations"]
    assert on_gpu < estimate_memory(cfg, micro_batch=2, seq_len=16, dtype="bf16")["activations"]  # no T*T kept


def test_unsupported_architectures_are_refused():
    for kw in (dict(dropout=0.1), dict(pos="t5"), dict(n_experts=4), dict(arch="encoder_decoder", pos="t5")):
        with pytest.raises(ValueError, match="activation model covers"):
            estimate_memory(tiny_cfg(**kw), micro_batch=1, seq_len=8)
    with pytest.raises(ValueError, match="shard='zero2' is unknown"):
        estimate_memory(tiny_cfg(), micro_batch=1, seq_len=8, shard="zero2")
