"""The llmkit tokenizer: a `tokenizers.Tokenizer` plus special tokens and a chat template (survey §4.1.3, §5.1).

Implements:
- `Tokenizer`: encode / decode on the HF `tokenizers` library (BPE, WordPiece, Unigram; byte-level or SPM);
  bos / eos / pad tokens by string, their ids looked up in the vocabulary;
- chat templates rendered with Jinja exactly as transformers renders them (same sandboxed environment,
  `trim_blocks`/`lstrip_blocks`, `loopcontrols`, the non-HTML-escaping `tojson`, `raise_exception`,
  `strftime_now`, the special tokens passed as template variables, None-valued message keys dropped);
- save / load as `tokenizer.json` + `tokenizer_config.json`, a directory that
  `transformers.AutoTokenizer.from_pretrained` loads as a `PreTrainedTokenizerFast`.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import tokenizers

from ..artifacts import atomic_write_json, atomic_write_text

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        extra_config: dict | None = None,
    ):
        self.tok = tok
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        self.extra_config = dict(extra_config or {})  # other tokenizer_config.json keys, kept on save
        for name in SPECIAL_NAMES:
            t = getattr(self, name)
            if t is not None and tok.token_to_id(t) is None:
                raise ValueError(f"{name}={t!r} is not in the vocabulary; add it as a special token first")

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {n: getattr(self, n) for n in SPECIAL_NAMES if getattr(self, n) is not None}

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.encode(text, add_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: list[dict] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` (dicts with role/content) with the chat template, as transformers does.

        `tokenize=True` returns the token ids of the rendered text (no extra special tokens: the
        template already writes them, as in transformers).
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template=... or set tokenizer.chat_template")
        if isinstance(template, dict):  # named templates ({"default": ..., "tool_use": ...}) as in tokenizer_config
            template = template.get("tool_use" if tools and "tool_use" in template else "default")
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation; pass at least one message")
        # transformers drops keys whose value is None (OpenAI returns content=None on tool calls)
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        text = _compile(template).render(
            messages=chat, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs},
        )
        return self.encode(text) if tokenize else text

    # ------------------------------------------------------------------ io
    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (loads in transformers.AutoTokenizer)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "tokenizer.json", self.tok.to_str())
        cfg = {**self.extra_config, "tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens_map}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        cfg.setdefault("model_max_length", int(1e30))
        cfg.setdefault("clean_up_tokenization_spaces", False)
        atomic_write_json(d / "tokenizer_config.json", cfg)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """A directory holding tokenizer.json (+ tokenizer_config.json, chat_template.jinja), or a tokenizer.json file."""
        p = Path(path)
        d = p if p.is_dir() else p.parent
        tj = p / "tokenizer.json" if p.is_dir() else p
        if not tj.exists():
            raise FileNotFoundError(f"{tj}: no tokenizer.json; train one with `llmkit tokenizer` or point at a model dir")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on malformed json
            raise ValueError(f"{tj}: not a valid tokenizers JSON file ({e})") from None
        cfg = {}
        if (d / "tokenizer_config.json").exists():
            cfg = json.loads((d / "tokenizer_config.json").read_text())
        if cfg.get("chat_template") is None and (d / "chat_template.jinja").exists():
            cfg["chat_template"] = (d / "chat_template.jinja").read_text()
        special = {n: _token_str(cfg.pop(n, None)) for n in SPECIAL_NAMES}
        special = {n: t for n, t in special.items() if t is not None and tok.token_to_id(t) is not None}
        template = cfg.pop("chat_template", None)
        if isinstance(template, list):  # [{"name": ..., "template": ...}] form of tokenizer_config.json
            template = {t["name"]: t["template"] for t in template}
        for k in ("tokenizer_class", "added_tokens_decoder"):
            cfg.pop(k, None)
        return cls(tok, chat_template=template, extra_config=cfg, **special)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, chat_template={self.chat_template is not None})"


def _token_str(t: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts {"content": ...}."""
    if isinstance(t, dict):
        return t.get("content")
    return t


@lru_cache(maxsize=16)
def _compile(template: str):
    """The Jinja environment of transformers' `_cached_compile_jinja_template` (chat_template_utils.py)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant spans for masks; rendering just emits the body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)
