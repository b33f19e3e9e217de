"""Tokenizer wrapper: encode/decode, special tokens, chat templates rendered exactly as transformers renders them."""
from __future__ import annotations

import os

import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmkit.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = ["Hello world, this is a small corpus.", "def f(x):\n    return x * 2\n", "Ünïcödé — 日本語 🙂 text", "tabs\tand  spaces"] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A template that exercises what transformers' environment adds: trim/lstrip blocks, loopcontrols,
# the non-escaping tojson filter, raise_exception, special tokens as variables, tools, add_generation_prompt.
TEMPLATE = (
    "{{ bos_token }}{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n{% endif %}"
    "{% for message in messages %}\n"
    "  {% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}\n"
    "  {% if message['role'] == 'system' and loop.first %}{% continue %}{% endif %}\n"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(t, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TEMPLATE)


def test_special_ids_and_roundtrip(tok):
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>") and tok.pad_token_id == 0
    for text in CORPUS[:4]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "hi" and tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(tok.tok, eos_token="<nope>")


def test_save_load_and_transformers_agree(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert (back.bos_token, back.eos_token, back.pad_token, back.chat_template) == (
        tok.bos_token, tok.eos_token, tok.pad_token, tok.chat_template)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token_id == tok.eos_token_id and hf.pad_token_id == tok.pad_token_id
    for text in CORPUS[:4] + ["<|im_start|>user\nmixed<|im_end|>"]:
        assert hf.encode(text, add_special_tokens=False) == back.encode(text)

    tools = [{"type": "function", "function": {"name": "add", "description": "a <b> & 'c'", "parameters": {"x": "ünï"}}}]
    chats = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "skip me"}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."},
         {"role": "user", "content": "Ünï 日本 🙂", "name": None}],
    ]
    for chat in chats:
        for agp in (True, False):
            for tl in (None, tools):
                ours = back.apply_chat_template(chat, add_generation_prompt=agp, tools=tl)
                ref = hf.apply_chat_template(chat, add_generation_prompt=agp, tools=tl, tokenize=False)
                assert ours == ref
                ref_ids = hf.apply_chat_template(chat, add_generation_prompt=agp, tools=tl, tokenize=True, return_dict=False)
                assert back.apply_chat_template(chat, add_generation_prompt=agp, tools=tl, tokenize=True) == list(ref_ids)
    assert '"a <b> & \'c\'"' in back.apply_chat_template(chats[0], tools=tools)  # tojson does not HTML-escape


def test_chat_template_errors(tok):
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(tok.tok).apply_chat_template([{"role": "user", "content": "x"}])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    with pytest.raises(ValueError, match="tokenizer.json: not a valid"):
        Tokenizer.load(tmp_path)


def test_load_hf_style_config(tok, tmp_path):
    """transformers writes special tokens as AddedToken dicts and the template as chat_template.jinja."""
    import json

    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    back = Tokenizer.load(tmp_path / "tokenizer.json")
    assert back.eos_token_id == tok.eos_token_id and back.chat_template == TEMPLATE
