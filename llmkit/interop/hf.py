"""Hugging Face model directories in and out (survey §4.2 architectures of Table 3; litgpt-style conversion module).

Implements, for the llama, mistral, qwen2, gemma, gemma2, gemma3 (text: gemma3_text) and gpt2 families:
- `hf_config_to_llmkit(hf)`: an HF config.json -> ModelConfig (qkv bias for qwen2; gemma's (1+w) RMSNorm,
  sqrt(d) embedding scale and tanh-GeGLU; gemma2's sandwich norms, attention / final-logit soft-caps,
  query_pre_attn_scalar and alternating sliding window; gemma3's QK-norm, sliding pattern, local RoPE base and
  global RoPE scaling; gpt2's learned positions, LayerNorm with biases, gelu_new, tied head);
- weight renaming both ways, with GPT-2's Conv1D ([in, out]) transposed and its fused c_attn split / joined;
- `load_hf(dir)`: config.json + model.safetensors or sharded `model.safetensors.index.json` (never pickles);
- `save_hf(dir, model, tokenizer)`: a directory `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..artifacts import atomic_write_bytes, atomic_write_json
from ..model.config import ConfigError, ModelConfig
from ..model.transformer import Transformer
from ..tokenizer import Tokenizer
from . import LoadError
from .checkpoint import build_model, read_safetensors, refuse_pickles

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "gpt2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}
GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu_tanh", "gelu_tanh": "geglu_tanh",
              "gelu": "geglu", "relu": "reglu"}
HF_ACT = {"swiglu": "silu", "geglu_tanh": "gelu_pytorch_tanh", "geglu": "gelu", "reglu": "relu"}


# ---------------------------------------------------------------------------------------------- config
def _rope(hf: dict, kind: str | None = None) -> tuple[float, dict | None]:
    """(theta, llmkit rope_scaling) from transformers 5 `rope_parameters` or the older rope_theta/rope_scaling keys."""
    params = hf.get("rope_parameters") or {}
    if kind and kind in params:
        params = params[kind]
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    sc = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not sc:
        return theta, None
    rtype = sc.get("rope_type", sc.get("type", "default"))
    if rtype == "default":
        return theta, None
    if rtype not in ("linear", "yarn", "llama3"):
        raise ConfigError(f"rope scaling {rtype!r} is not supported (llmkit has linear, yarn, llama3)")
    out = {k: v for k, v in sc.items() if k not in ("rope_type", "type", "rope_theta")}
    return theta, {"type": rtype, **out}


def _layer_types(hf: dict, n: int, default_pattern: int | None) -> list[str] | None:
    if hf.get("layer_types"):
        return ["local" if t == "sliding_attention" else "global" for t in hf["layer_types"]]
    if default_pattern:  # older gemma2 (2) / gemma3 (sliding_window_pattern, 6) configs: every k-th layer global
        return ["global" if (i + 1) % default_pattern == 0 else "local" for i in range(n)]
    return None


def hf_config_to_llmkit(hf: dict) -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        raise ConfigError(f"model_type {mt!r} is not supported; llmkit imports {list(FAMILIES)}")
    if mt == "gpt2":
        return _gpt2_config(hf)
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act not in GATED_ACTS:
        raise ConfigError(f"hidden activation {act!r} is not supported; llmkit has {sorted(GATED_ACTS)}")
    kw = dict(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=h,
              n_kv_heads=hf.get("num_key_value_heads") or h, head_dim=hf.get("head_dim") or d // h,
              d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
              norm_eps=hf.get("rms_norm_eps", 1e-6), pos="rope", activation=GATED_ACTS[act],
              qkv_bias=bool(hf.get("attention_bias", mt == "qwen2")), attn_out_bias=bool(hf.get("attention_bias", False)),
              mlp_bias=bool(hf.get("mlp_bias", False)), tie_embeddings=bool(hf.get("tie_word_embeddings", mt.startswith("gemma"))),
              bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
              family=mt)
    kw["rope_theta"], kw["rope_scaling"] = _rope(hf, "full_attention")
    window = hf.get("sliding_window")
    if mt == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if window:
        pattern = {"gemma2": 2, "gemma3_text": hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6}.get(mt)
        kw["layer_types"] = _layer_types(hf, kw["n_layers"], pattern)
        if kw["layer_types"] and "local" not in kw["layer_types"]:
            window, kw["layer_types"] = None, None
        kw["sliding_window"] = window
    if mt.startswith("gemma"):
        kw.update(norm_offset=1.0, embed_scale=math.sqrt(d))
    if mt in ("gemma2", "gemma3_text"):
        kw.update(norm_position="sandwich", attn_scale=float(hf.get("query_pre_attn_scalar") or kw["head_dim"]) ** -0.5,
                  attn_softcap=hf.get("attn_logit_softcapping"), logit_softcap=hf.get("final_logit_softcapping"))
    if mt == "gemma3_text":
        kw["qk_norm"] = True
        local = (hf.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta") or hf.get("rope_local_base_freq")
        kw["rope_local_theta"] = float(local) if local else None
    return ModelConfig(**kw)


def _gpt2_config(hf: dict) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    if act not in acts:
        raise ConfigError(f"gpt2 activation_function {act!r} is not supported; llmkit has {sorted(acts)}")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") or hf.get("scale_attn_weights") is False:
        raise ConfigError("gpt2 attention variants (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, "
                          "scale_attn_weights=false) are not supported")
    d = hf["n_embd"]
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                       d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"], norm="layernorm",
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), pos="learned", activation=acts[act], qkv_bias=True,
                       attn_out_bias=True, mlp_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                       bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), family="gpt2")


def llmkit_config_to_hf(cfg: ModelConfig) -> dict:
    fam = cfg.family if cfg.family in FAMILIES else ("gpt2" if cfg.pos == "learned" else "llama")
    common = dict(model_type=fam, architectures=[ARCHITECTURES[fam]], vocab_size=cfg.vocab_size,
                  tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                  pad_token_id=cfg.pad_token_id, dtype="float32")
    if fam == "gpt2":
        return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
                "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else cfg.activation}
    hf = {**common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
          "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
          "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
          "hidden_act": HF_ACT[cfg.activation], "hidden_activation": HF_ACT[cfg.activation]}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        sc = dict(cfg.rope_scaling)
        rope = {"rope_theta": cfg.rope_theta, "rope_type": sc.pop("type"), **sc}
    hf["rope_parameters"] = rope
    if fam in ("llama", "gemma", "gemma2", "gemma3_text"):
        hf["attention_bias"] = cfg.qkv_bias
    if fam == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    if cfg.sliding_window:
        hf["sliding_window"] = cfg.sliding_window
        if fam == "qwen2":
            hf["use_sliding_window"] = True
    if fam in ("qwen2", "gemma2", "gemma3_text"):  # (a mistral config with layer_types reads as Ministral)
        hf["layer_types"] = ["sliding_attention" if cfg.layer_type(i) == "local" else "full_attention" for i in range(cfg.n_layers)]
    if fam in ("gemma2", "gemma3_text"):
        scalar = (cfg.attn_scale or cfg.head_dim**-0.5) ** -2  # transformers' config wants an int when it is one
        hf.update(query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
                  attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.logit_softcap)
    if fam == "gemma3_text":
        hf["rope_parameters"] = {"full_attention": rope,
                                 "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}}
    return hf


# ---------------------------------------------------------------------------------------------- weights
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k",
          "self_attn.v_proj": "attn.v", "self_attn.o_proj": "attn.o", "self_attn.q_norm": "attn.q_norm",
          "self_attn.k_norm": "attn.k_norm", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down"}
# gemma2/3 have four norms per block; the others call the pre-MLP norm post_attention_layernorm
_SANDWICH = {"post_attention_layernorm": "post_attn_norm", "pre_feedforward_layernorm": "mlp_norm",
             "post_feedforward_layernorm": "post_mlp_norm"}
_PLAIN = {"post_attention_layernorm": "mlp_norm"}


def _layer_map(cfg: ModelConfig) -> dict[str, str]:
    return {**_LAYER, **(_SANDWICH if cfg.norm_position == "sandwich" else _PLAIN)}


def hf_to_llmkit_state(sd: dict[str, torch.Tensor], cfg: ModelConfig, source) -> dict[str, torch.Tensor]:
    if cfg.family == "gpt2":
        return _gpt2_in(sd, cfg)
    lm = _layer_map(cfg)
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = v
            continue
        k = k.removeprefix("model.")
        if k == "embed_tokens.weight":
            out["embed.weight"] = v
        elif k == "norm.weight":
            out["norm.weight"] = v
        elif k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            if mod not in lm:
                raise LoadError(f"{source}: unexpected tensor {k!r} for a {cfg.family} model")
            out[f"layers.{i}.{lm[mod]}.{leaf}"] = v
        elif k.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints saved; recomputed from the config
        else:
            raise LoadError(f"{source}: unexpected tensor {k!r} for a {cfg.family} model")
    return out


def llmkit_to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if cfg.family == "gpt2" or (cfg.family not in FAMILIES and cfg.pos == "learned"):
        return _gpt2_out(state, cfg)
    inv = {v: k for k, v in _layer_map(cfg).items()}
    out = {}
    for k, v in state.items():
        if k == "embed.weight":
            out["model.embed_tokens.weight"] = v
        elif k == "norm.weight":
            out["model.norm.weight"] = v
        elif k == "lm_head.weight":
            out[k] = v
        else:
            _, i, rest = k.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            out[f"model.layers.{i}.{inv[mod]}.{leaf}"] = v
    return out


_GPT2 = {"ln_1": "attn_norm", "ln_2": "mlp_norm", "attn.c_proj": "attn.o", "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2's Conv1D stores weight as [in, out]


def _gpt2_in(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("transformer.")
        if k == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[k] = v
        elif k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
            out[{"wte": "embed", "wpe": "pos_embed", "ln_f": "norm"}[k.split(".")[0]] + "." + k.split(".")[1]] = v
        elif k.startswith("h."):
            _, i, rest = k.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            if mod == "attn" and leaf in ("bias", "masked_bias"):
                continue  # causal-mask buffers of old checkpoints
            if mod in _CONV1D and leaf == "weight":
                v = v.t()
            if mod == "attn.c_attn":
                for name, part in zip("qkv", v.split(cfg.d_model, dim=0)):
                    out[f"layers.{i}.attn.{name}.{leaf}"] = part.contiguous()
                continue
            out[f"layers.{i}.{_GPT2.get(mod, mod)}.{leaf}"] = v.contiguous()
        else:
            out[k] = v  # left for build_model to report as unexpected
    return out


def _gpt2_out(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    inv = {v: k for k, v in _GPT2.items()}
    out = {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}.attn"
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([state[f"{p}.{n}.weight"] for n in "qkv"]).t().contiguous()
        out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat([state[f"{p}.{n}.bias"] for n in "qkv"])
    for k, v in state.items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            if mod in ("attn.q", "attn.k", "attn.v"):
                continue
            hmod = inv[mod]
            out[f"transformer.h.{i}.{hmod}.{leaf}"] = v.t().contiguous() if hmod in _CONV1D and leaf == "weight" else v
        else:
            name = {"embed": "wte", "pos_embed": "wpe", "norm": "ln_f", "lm_head": "lm_head"}[k.split(".")[0]]
            out[(f"transformer.{name}" if name != "lm_head" else name) + "." + k.split(".")[1]] = v
    return out


_NOT_ARCH = {"family", "extra", "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "init_std",
             "dropout", "embed_grad_scale", "moe_aux_loss_coef"}


def check_expressible(cfg: ModelConfig, hf: dict) -> None:
    """Refuse an export that transformers would read back as a different architecture (e.g. a llmkit-only option)."""
    back = hf_config_to_llmkit(hf)
    diff = []
    for f in cfg.to_dict():
        a, b = getattr(cfg, f), getattr(back, f)
        same = math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) and isinstance(b, float) else a == b
        if f not in _NOT_ARCH and not same:
            diff.append(f"{f}={a!r} (HF {hf['model_type']} gives {b!r})")
    if diff:
        raise ValueError(f"this model cannot be written as an HF {hf['model_type']} directory: {'; '.join(diff)}; "
                         "save it as a llmkit checkpoint instead (`llmkit convert SRC --to llmkit`)")


# ---------------------------------------------------------------------------------------------- directories
def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise LoadError(f"{index}: not a valid safetensors index ({e})") from None
        sd = {}
        for s in shards:
            sd.update(read_safetensors(directory / s))
        return sd
    if (directory / "model.safetensors").exists():
        return read_safetensors(directory / "model.safetensors")
    refuse_pickles(directory)


def load_hf(directory: str | Path, dtype=None, device="cpu") -> tuple[Transformer, Tokenizer | None]:
    d = Path(directory)
    try:
        cfg = hf_config_to_llmkit(json.loads((d / "config.json").read_text()))
    except (ConfigError, KeyError) as e:
        raise LoadError(f"{d / 'config.json'}: {e}") from None
    state = hf_to_llmkit_state(read_hf_weights(d), cfg, d)
    model = build_model(cfg, state, d, dtype, device)
    tok = Tokenizer.load(d) if (d / "tokenizer.json").exists() else None
    return model, tok


def save_hf(directory: str | Path, model: Transformer, tokenizer: Tokenizer | None = None) -> Path:
    """An HF directory (config.json, model.safetensors, tokenizer files) for AutoModelForCausalLM / AutoTokenizer."""
    from safetensors.torch import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    hf_cfg = llmkit_config_to_hf(model.cfg)
    check_expressible(model.cfg, hf_cfg)
    hf_cfg["dtype"] = str(model.dtype).removeprefix("torch.")
    state = {k: v.detach().contiguous().cpu() for k, v in llmkit_to_hf_state(model.state_dict(), model.cfg).items()}
    atomic_write_bytes(d / "model.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write_json(d / "config.json", hf_cfg)
    if tokenizer is not None:
        tokenizer.save(d)
    return d
