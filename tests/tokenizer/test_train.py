"""Tokenizer training (llmkit.tokenizer.train): lossless byte-level BPE, transformers loads it with identical ids,
special tokens are single ids, bytes/token reported and rising with the vocabulary, Unigram and WordPiece."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmkit.artifacts import verify_manifest  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402
from llmkit.tokenizer.cli import main as cli_main  # noqa: E402
from llmkit.tokenizer.train import train_tokenizer  # noqa: E402

UNICODE = [
    "Hello  world!\n\n\tTabs, double  spaces and trailing space ",
    "ünïcödé — “quotes” — 日本語のテキスト — 한국어 — العربية — emoji 🙂👍🏽 — math ∑x² ≤ ∞",
    "code: def f(x):\n    return x**2  # comment\r\nwindows line end\u00a0nbsp\u200bzwsp",
    "numbers 1234567890 3.14159 -42 1e-9",
    "",
]


@pytest.fixture(scope="module")
def corpus(shared_data):
    shakespeare = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:200_000]
    stories = (shared_data / "tinystories" / "tinystories_val.txt").read_text().split("<|endoftext|>")[:300]
    return [shakespeare] + [s.strip() for s in stories]


@pytest.fixture(scope="module")
def bpe_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    train_tokenizer(corpus, out, 800, "bpe")
    return out


@pytest.mark.parametrize("pre", ["gpt2", "llama3"])
def test_byte_level_bpe_round_trips_exactly(corpus, pre):
    tok = train_tokenizer(corpus, None, 600, "bpe", pretokenizer=pre)
    for text in UNICODE + corpus[1:20]:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.tok.get_vocab_size() == 600


def test_llama3_pretokenizer_groups_digits_by_three(corpus):
    tok = train_tokenizer(corpus[:50], None, 400, "bpe", pretokenizer="llama3")
    pieces = [p for p, _ in tok.tok.pre_tokenizer.pre_tokenize_str("year 12345 I'LL")]
    # Llama-3: numbers split into runs of <= 3 digits, case-insensitive contractions ('LL); Ġ is the byte-level space
    assert pieces == ["year", "Ġ", "123", "45", "ĠI", "'LL"]
    gpt2 = train_tokenizer(corpus[:50], None, 400, "bpe", pretokenizer="gpt2")
    assert [p for p, _ in gpt2.tok.pre_tokenizer.pre_tokenize_str("year 12345")] == ["year", "Ġ12345"]


def test_transformers_loads_it_with_identical_ids(bpe_dir, corpus):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ours = Tokenizer.load(bpe_dir)
    hf = AutoTokenizer.from_pretrained(str(bpe_dir))
    assert isinstance(hf, PreTrainedTokenizerFast)
    texts = UNICODE + corpus[1:30] + ["<|im_start|>user\nhi<|im_end|><|endoftext|>"]
    for t in texts:
        assert hf.encode(t, add_special_tokens=False) == ours.encode(t)
        assert hf.decode(hf.encode(t, add_special_tokens=False)) == t
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == ours.eos_token_id
    assert hf.pad_token_id == ours.pad_token_id != hf.eos_token_id
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(msgs) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


def test_special_tokens_are_single_ids(corpus, tmp_path):
    tok = train_tokenizer(corpus[:50], tmp_path, 500, "bpe", special_tokens=["<tool_call>", "<|fim_middle|>"])
    for s in ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<|fim_middle|>"]:
        ids = tok.encode(f"a{s}b")
        assert len(tok.encode(s)) == 1 and tok.encode(s)[0] in ids, s
        assert tok.encode(s)[0] < 10  # specials take the first ids (stable across vocab sizes)
    assert tok.decode(tok.encode("x<|im_end|>y")) == "xy"  # skipped when decoding by default


def test_bytes_per_token_reported_and_rises_with_vocab(corpus, tmp_path):
    bpt = []
    for v in (300, 600, 1200):
        tok = train_tokenizer(corpus, tmp_path / str(v), v, "bpe")
        m = json.loads((tmp_path / str(v) / "manifest.json").read_text())
        assert m["kind"] == "tokenizer" and m["stats"]["bytes_per_token"] == tok.stats["bytes_per_token"]
        assert tok.stats["heldout_bytes"] > 1000
        bpt.append(tok.stats["bytes_per_token"])
    assert 1.0 < bpt[0] < bpt[1] < bpt[2]


def test_training_is_deterministic(corpus, tmp_path):
    train_tokenizer(corpus, tmp_path / "a", 700, "bpe")
    train_tokenizer(corpus, tmp_path / "b", 700, "bpe")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("kind", ["unigram", "wordpiece"])
def test_unigram_and_wordpiece_load_in_transformers(corpus, tmp_path, kind):
    from transformers import AutoTokenizer

    docs = corpus[1:150]
    tok = train_tokenizer(docs, tmp_path, 500, kind)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for t in docs[:20] + ["Once upon a time, Spot said: hello!"]:
        assert hf.encode(t, add_special_tokens=False) == tok.encode(t)
        if kind == "unigram":  # no normaliser: lossless on text whose characters are in the vocabulary
            assert tok.decode(tok.encode(t)) == t
    if kind == "wordpiece":  # BERT layout: [CLS] text [SEP] with add_special_tokens
        ids = hf.encode("hello")
        assert ids[0] == hf.cls_token_id or ids[0] == tok.bos_token_id
        assert ids[-1] == tok.eos_token_id
    assert 1.5 < tok.stats["bytes_per_token"] < 8


def test_cli_train_on_jsonl_zst(shared_data, tmp_path, capsys):
    import zstandard

    stories = (shared_data / "tinystories" / "tinystories_val.txt").read_text().split("<|endoftext|>")[:200]
    lines = "".join(json.dumps({"id": i, "text": s.strip(), "source": "ts"}) + "\n" for i, s in enumerate(stories))
    src = tmp_path / "part-0.jsonl.zst"
    src.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    out = tmp_path / "tok"
    rc = cli_main(["train", str(src), "--out", str(out), "--type", "bpe", "--vocab-size", "500",
                   "--pretokenizer", "llama3", "--chat-template", "llama3", "--special-tokens", "<|fim|>"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bytes_per_token"] > 1.5 and report["vocab_size"] == 500
    assert verify_manifest(out) == []
    tok = Tokenizer.load(out)
    assert tok.token_to_id("<|eot_id|>") is not None and tok.token_to_id("<|fim|>") is not None
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).startswith(
        "<|endoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")
    assert cli_main(["info", str(out), "--text", str(src)]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 500


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab-size"):
        train_tokenizer(["some text here"], None, 100, "bpe")
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer([], None, 500, "bpe")
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        train_tokenizer(["x"], None, 500, "wordpiecez")
    with pytest.raises(ValueError, match="chat template"):
        train_tokenizer(["x y"], None, 500, "bpe", chat_template="nope")
