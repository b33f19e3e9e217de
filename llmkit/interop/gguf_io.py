"""GGUF in and out (llama.cpp's single-file format) (survey §4.2.4 deployment, §5.4 quantisation).

Implements:
- `read_gguf(path)` -> (ModelConfig, state dict, Tokenizer): metadata -> config for the llama (Llama, Mistral,
  SmolLM2) and qwen2 architectures, read by `gguf_reader.GGUFFile` (~40x faster than `gguf.GGUFReader` on a
  49k-token vocabulary); every tensor dequantised to float32 (F32/F16/BF16/Q8_0/Q4_0/Q4_1 in torch, K-quants and
  the rest with `gguf.quants.dequantize`); llama.cpp's q/k row permutation undone for llama; the tokenizer rebuilt from
  `tokenizer.ggml.*` the way transformers' GGUF loader does (byte-level BPE "gpt2" with the pre-tokenizer split
  named by `tokenizer.ggml.pre`; SentencePiece "llama" with merges from the scores), and the chat template;
- `write_gguf(path, model, tokenizer)`: llama-architecture GGUF (qwen2 when q/k/v carry biases) (float32 or float16 tensors, q/k permuted as
  llama.cpp's converter does, byte-level BPE tokenizer metadata) that the gguf reader, transformers and llama.cpp load.
Not covered: GGUF architectures other than llama/qwen2 on read (gemma's +1 norm storage, gpt2's fused qkv).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RawTokenizer

from ..model.config import ModelConfig
from ..tokenizer import Tokenizer
from . import LoadError
from .gguf_reader import GGUFFile

# llama.cpp's token types (llama.h: LLAMA_TOKEN_TYPE_*)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 2, 3, 4, 6
ARCHS = ("llama", "qwen2")

# pre-tokenizer splits for `tokenizer.ggml.pre`, as in transformers' gguf_tokenizer_mapping.py (llama.cpp's regexes)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {**{k: _LLAMA3_SPLIT for k in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")},
              **{k: _QWEN2_SPLIT for k in ("qwen2", "deepseek-r1-qwen", "megrez")}}


# ---------------------------------------------------------------------------------------------- reading
def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None]:
    f = GGUFFile(path)
    meta = f.meta
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise LoadError(f"{path}: GGUF architecture {arch!r} is not supported; llmkit reads {list(ARCHS)}")
    tok = gguf_tokenizer(meta) if "tokenizer.ggml.tokens" in meta else None
    names = {t.name for t in f.tensors}
    cfg = gguf_config(meta, arch, tie=("output.weight" not in names), tok=tok)
    sd = {}
    for t in f.tensors:
        sd[_llmkit_name(t.name, path)] = _tensor(f, t, cfg, arch)
    return cfg, sd, tok


def gguf_config(meta: dict, arch: str, tie: bool, tok: Tokenizer | None) -> ModelConfig:
    def g(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    d, h = int(g("embedding_length")), int(g("attention.head_count"))
    vocab = g("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    scaling = None
    if g("rope.scaling.type") in ("linear", "yarn"):
        scaling = {"type": g("rope.scaling.type"), "factor": float(g("rope.scaling.factor", 1.0)),
                   "original_max_position_embeddings": int(g("rope.scaling.original_context_length", 0)) or None}
    return ModelConfig(
        vocab_size=int(vocab), d_model=d, n_layers=int(g("block_count")), n_heads=h,
        n_kv_heads=int(g("attention.head_count_kv", h)), head_dim=int(g("attention.key_length", d // h)),
        d_ff=int(g("feed_forward_length")), max_seq_len=int(g("context_length", 2048)),
        norm="rmsnorm", norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)), pos="rope",
        rope_theta=float(g("rope.freq_base", 10000.0)), rope_scaling=scaling, activation="swiglu",
        sliding_window=None, qkv_bias=(arch == "qwen2"), tie_embeddings=tie,
        bos_token_id=tok.bos_token_id if tok else None, eos_token_id=tok.eos_token_id if tok else None,
        pad_token_id=tok.pad_token_id if tok else None, family=arch,
        extra={"source": "gguf", "general.name": meta.get("general.name")},
    )


_BLOCK = {"attn_norm": "attn_norm", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v", "attn_output": "attn.o",
          "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down"}
_TOP = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight"}


def _llmkit_name(name: str, path) -> str:
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
        return f"layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    raise LoadError(f"{path}: unexpected GGUF tensor {name!r} (llmkit maps {sorted(_TOP)} and blk.N.{{{','.join(_BLOCK)}}})")


def _tensor(f: GGUFFile, t, cfg: ModelConfig, arch: str) -> torch.Tensor:
    w = f.dequantize(t)
    if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
        heads = cfg.n_heads if "attn_q" in t.name else cfg.n_kv_heads
        w = unpermute_qk(w, heads)
    return w


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute`: rotate-half rows -> interleaved pairs per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def gguf_tokenizer(meta: dict) -> Tokenizer:
    """Rebuild the tokenizer a GGUF describes (what transformers' `convert_gguf_tokenizer` builds)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if kind == "gpt2":
        raw = _byte_level_bpe(tokens, list(meta.get("tokenizer.ggml.merges") or []), meta.get("tokenizer.ggml.pre"))
        alphabet = set(_bytes_to_unicode().values())
        control = [t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL and set(t) <= alphabet]
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        raw = _sentencepiece_bpe(tokens, list(meta.get("tokenizer.ggml.scores") or []),
                                 bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
        control = [t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default for SPM vocabularies
    else:
        raise LoadError(f"GGUF tokenizer type {kind!r} is not supported; llmkit reads 'gpt2' (byte-level BPE) and 'llama' (SPM)")
    raw.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    if user:
        raw.add_tokens(user)

    def tok_of(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and int(i) < len(tokens) else None

    bos = tok_of("bos_token_id")
    if add_bos and bos is not None:
        raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tokens.index(bos))])
    return Tokenizer(raw, bos_token=bos, eos_token=tok_of("eos_token_id"), pad_token=tok_of("padding_token_id"),
                     unk_token=tok_of("unknown_token_id"), chat_template=meta.get("tokenizer.chat_template"),
                     extra_config={"add_bos_token": add_bos})


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> RawTokenizer:
    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    # llama.cpp writes some tokens in plain text; the BPE model needs them in the byte alphabet
    vocab = {(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, continuing_subword_prefix="", end_of_word_suffix=""))
    split = PRE_SPLITS.get(pre or "")
    if split:
        raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # GPT-2's own regex (what transformers uses for "smollm", "gpt-2", "starcoder", ... )
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    return raw


def _sentencepiece_bpe(tokens: list[str], scores: list[float], add_prefix_space: bool) -> RawTokenizer:
    """SPM-BPE as a `tokenizers` BPE with byte fallback; merges recovered from the scores (transformers' generate_merges)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    # no unk_token on the model, as transformers' LlamaTokenizer: byte fallback spells anything unknown
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], fuse_unk=True, byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    raw.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if add_prefix_space else []))
    return raw


# ---------------------------------------------------------------------------------------------- writing
def write_gguf(path: str | Path, model, tokenizer: Tokenizer | None = None, dtype: str = "float32", name: str = "llmkit") -> Path:
    """Write a llama-architecture GGUF (RMSNorm, RoPE, SwiGLU; GQA and tied embeddings allowed), or qwen2 when
    the model has q/k/v biases."""
    import gguf

    cfg: ModelConfig = model.cfg
    _check_llama_like(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    arch = "qwen2" if cfg.qkv_bias else "llama"  # llama.cpp's qwen2 = llama + q/k/v biases, unpermuted q/k
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(name)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "float16" else gguf.LlamaFileType.ALL_F32)
    if tokenizer is not None:
        _write_tokenizer(w, tokenizer, cfg.vocab_size)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    inv = {v: k for k, v in _TOP.items()}
    for key, t in model.state_dict().items():
        t = t.detach().float().cpu()
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            sub, leaf = rest.rsplit(".", 1)
            gname = f"blk.{i}.{ {v: k for k, v in _BLOCK.items()}[sub] }.{leaf}"
            if sub in ("attn.q", "attn.k") and arch == "llama":
                t = permute_qk(t, cfg.n_heads if sub == "attn.q" else cfg.n_kv_heads)
        else:
            gname = inv[key]
        arr = t.numpy().astype(np_dtype if t.dim() >= 2 else np.float32)  # llama.cpp keeps 1-D norms in f32
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def _check_llama_like(cfg: ModelConfig) -> None:
    bad = []
    if cfg.arch != "decoder" or cfg.norm != "rmsnorm" or cfg.pos != "rope" or cfg.activation != "swiglu":
        bad.append("needs a decoder with rmsnorm, rope, swiglu")
    if cfg.attn_out_bias or cfg.mlp_bias or cfg.qk_norm or cfg.norm_offset or cfg.norm_position != "pre":
        bad.append("no biases except q/k/v (qwen2), no qk-norm, norm offset or sandwich norms")
    if cfg.n_experts or cfg.sliding_window or cfg.embed_scale or cfg.logit_softcap or cfg.attn_softcap or cfg.rope_scaling:
        bad.append("no MoE, sliding window, embedding scale, soft-capping or rope scaling")
    if cfg.block_pos:
        bad.append("no GLM block positions")
    if cfg.attn_scale is not None and abs(cfg.attn_scale - cfg.head_dim ** -0.5) > 1e-9 or cfg.rope_fraction != 1.0:
        bad.append("default attention scale and full rotary")
    if bad:
        raise ValueError(f"GGUF export writes the llama architecture, which {'; '.join(bad)}; export to HF (--to hf) instead")


def _write_tokenizer(w, tok: Tokenizer, vocab_size: int) -> None:
    """Tokens, types, special ids and template; byte-level BPE as llama.cpp's 'gpt2' model (with merges), SentencePiece-style
    BPE (Metaspace + byte fallback) as its 'llama' model (scores = -id, so that merges recovered from the scores follow
    the vocabulary's creation order, as in SPM-BPE vocabularies)."""
    import json

    spec = json.loads(tok.tok.to_str())
    model, pre = spec["model"], json.dumps(spec.get("pre_tokenizer"))
    spm = model.get("type") == "BPE" and model.get("byte_fallback") and "Metaspace" in pre
    if model.get("type") != "BPE" or not (spm or "ByteLevel" in pre):
        raise ValueError("GGUF export writes byte-level BPE (GPT-2 style) or SentencePiece-style BPE tokenizers; this one is "
                         f"{model.get('type')} with pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')}")
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(max(vocab_size, len(vocab)))]
    types = [TOKEN_USER_DEFINED] * len(tokens)  # llama.cpp marks padding rows as user-defined
    for t, i in vocab.items():
        tokens[i], types[i] = t, TOKEN_NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    if spm:
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = TOKEN_BYTE
        if tok.unk_token is not None:
            types[vocab[tok.unk_token]] = TOKEN_UNKNOWN
        w.add_tokenizer_model("llama")
        w.add_token_scores([-float(i) for i in range(len(tokens))])
        w.add_add_space_prefix('"prepend_scheme": "never"' not in pre)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    w.add_token_list(tokens)
    w.add_token_types(types)
    for name, adder in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id), ("unk", w.add_unk_token_id)):
        i = getattr(tok, f"{name}_token_id")
        if i is not None:
            adder(i)
    w.add_add_bos_token(bool(tok.extra_config.get("add_bos_token", False)))
    if tok.chat_template is not None and isinstance(tok.chat_template, str):
        w.add_chat_template(tok.chat_template)
