"""`llmkit tokenizer train|info|encode` (survey §4.1.2 tokenization).

    llmkit tokenizer train data/*.jsonl.zst --out tok --type bpe --vocab-size 32000 --chat-template chatml
    llmkit tokenizer info tok [--text FILE]      # vocabulary, special tokens, bytes per token on FILE
    llmkit tokenizer encode tok "some text"      # ids and pieces
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .train import CHAT_TEMPLATES, DEFAULT_PRETOKENIZER, bytes_per_token, iter_documents, train_tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmkit tokenizer", description="train or inspect a tokenizer")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train BPE / Unigram / WordPiece on text or jsonl(.gz/.zst) files")
    t.add_argument("inputs", nargs="+", help="text files, jsonl(.gz/.zst) with a text field, folders")
    t.add_argument("--out", required=True, help="output directory (tokenizer.json, tokenizer_config.json, manifest)")
    t.add_argument("--type", default="bpe", choices=["bpe", "unigram", "wordpiece"])
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--pretokenizer", choices=["gpt2", "llama3", "metaspace", "bert"],
                   help=f"default per type: {DEFAULT_PRETOKENIZER}")
    t.add_argument("--special-tokens", nargs="*", default=[], help="extra special tokens (single ids)")
    t.add_argument("--chat-template", default="chatml",
                   help=f"{', '.join(CHAT_TEMPLATES)}, none, or a Jinja file")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--separator", help="split text files into documents on this string, e.g. '<|endoftext|>'")
    t.add_argument("--heldout", nargs="*", help="files to measure bytes/token on (default: 2%% of the input)")
    i = sub.add_parser("info", help="vocabulary, special tokens and bytes per token")
    i.add_argument("tokenizer")
    i.add_argument("--text", nargs="*", default=[], help="files to measure bytes per token on")
    i.add_argument("--separator")
    e = sub.add_parser("encode", help="print the ids and pieces of a text")
    e.add_argument("tokenizer")
    e.add_argument("text")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "train":
        t0 = time.perf_counter()
        tok = train_tokenizer(args.inputs, args.out, args.vocab_size, args.type, pretokenizer=args.pretokenizer,
                              special_tokens=args.special_tokens, chat_template=args.chat_template,
                              min_frequency=args.min_frequency, separator=args.separator, heldout=args.heldout,
                              command=["llmkit", "tokenizer", *argv])
        print(json.dumps({**tok.stats, "seconds": round(time.perf_counter() - t0, 2), "out": args.out}))
        return 0
    from . import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    if args.cmd == "info":
        info = {"vocab_size": tok.vocab_size, **tok.special_tokens_map, "chat_template": tok.chat_template is not None}
        if args.text:
            info["bytes_per_token"] = round(bytes_per_token(tok, list(iter_documents(args.text, args.separator))), 4)
        print(json.dumps(info))
        return 0
    ids = tok.encode(args.text)
    print(json.dumps({"ids": ids, "pieces": [tok.id_to_token(i) for i in ids]}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
