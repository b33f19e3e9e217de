"""Reuse the tiny model/tokenizer fixtures of tests/eval."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_eval_conftest", Path(__file__).parents[1] / "eval" / "conftest.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
tiny = _mod.tiny
tiny_tokenizer, tiny_model = _mod.tiny_tokenizer, _mod.tiny_model
