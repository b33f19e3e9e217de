"""GGUF export/import round trips through our reader, the gguf package, transformers' GGUF loader and llama.cpp."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as RawTok
from tokenizers import decoders, models, pre_tokenizers, trainers

os.environ["HF_HUB_OFFLINE"] = "1"

import llmkit  # noqa: E402
from llmkit.interop.gguf_io import permute_qk, unpermute_qk, write_gguf  # noqa: E402
from llmkit.model.config import ModelConfig  # noqa: E402
from llmkit.model.transformer import Transformer  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402

TEXTS = ["Hello world, the model speaks.", "def f(x):\n    return x + 1\n", "Ünïcödé 🙂 and  spaces"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    raw = RawTok(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TEXTS * 30, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(raw, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TEMPLATE)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=128, rope_theta=10000.0, norm_eps=1e-5, family="llama",
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = Transformer(cfg).eval()
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tok)
    return model, tok, path


def test_permutation_inverts():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w) and not torch.equal(permute_qk(w, 4), w)


@torch.no_grad()
def test_roundtrip_through_our_reader(tiny):
    model, tok, path = tiny
    back, btok = llmkit.load(path)
    ids = torch.tensor([tok.encode(TEXTS[0])])
    assert torch.equal(back(ids), model(ids))
    assert all(btok.encode(t) == tok.encode(t) for t in TEXTS)
    assert btok.chat_template == TEMPLATE and btok.eos_token_id == tok.eos_token_id


def test_gguf_reader_sees_llama_layout(tiny):
    import gguf

    model, _, path = tiny
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "llama"
    t = {x.name: x for x in r.tensors}
    q = np.asarray(t["blk.0.attn_q.weight"].data)
    assert np.array_equal(q, permute_qk(model.layers[0].attn.q.weight.detach(), 4).numpy())
    assert "output.weight" in t and r.fields["llama.attention.head_count_kv"].contents() == 2


@torch.no_grad()
def test_transformers_loads_our_gguf(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, path = tiny
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    htok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        ids = tok.encode(text)
        assert htok.encode(text, add_special_tokens=False) == ids
        x = torch.tensor([ids])
        assert (hf(x).logits - model(x)).abs().max().item() < 1e-4
    chat = [{"role": "user", "content": "hi"}]
    assert htok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(chat)


def test_llama_cpp_loads_our_gguf(tiny):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok, path = tiny
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    ids = tok.encode(TEXTS[0])
    assert llm.tokenize(TEXTS[0].encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max().item() < 1e-3


def test_export_refuses_non_llama(tiny):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, norm="layernorm", pos="learned", activation="gelu")
    with pytest.raises(ValueError, match="llama architecture"):
        write_gguf("/nonexistent/x.gguf", Transformer(cfg))
    with pytest.raises(ValueError, match="no GLM block positions"):
        write_gguf("/nonexistent/x.gguf", Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                                                                  block_pos=True)))


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """A SentencePiece-style BPE (Metaspace, byte fallback) exported as llama.cpp's 'llama' tokenizer model."""
    raw = RawTok(models.BPE(byte_fallback=True, fuse_unk=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    raw.train_from_iterator(TEXTS * 30, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    tok = Tokenizer(raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", extra_config={"add_bos_token": True})
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64, family="llama")
    return tok, write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", Transformer(cfg).eval(), tok)


def test_sentencepiece_gguf_tokenizer_matches_transformers_and_llama_cpp(spm):
    from transformers import AutoTokenizer

    _, path = spm
    _, ours = llmkit.load(path)
    htok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = TEXTS + ["hello  world", " leading space", "日本語 bytes ✓", "return x+1"]
    for text in texts:
        assert ours.encode(text) == htok.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == htok.encode(text), text
        assert ours.decode(ours.encode(text)) == htok.decode(htok.encode(text, add_special_tokens=False))
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True) == ours.encode(text, add_special_tokens=True), text


@torch.no_grad()
def test_float16_gguf(tiny, tmp_path):
    model, tok, _ = tiny
    path = write_gguf(tmp_path / "h.gguf", model, tok, dtype="float16")
    back, _ = llmkit.load(path)
    half = Transformer(model.cfg).eval()
    half.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})  # what f16 storage keeps
    ids = torch.tensor([tok.encode(TEXTS[1])])
    assert torch.allclose(back(ids), half(ids), atol=1e-5)
