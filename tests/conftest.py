"""Shared fixtures: where ../shared/data lives, and small deterministic settings for a 2-core machine."""
from __future__ import annotations

import os
from pathlib import Path

import sys

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLMKIT_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Test files import small helper modules that sit beside them (adapt_ref, engine_util, serve_util, ...);
# with --import-mode=importlib (needed: several folders have a test_cli.py) their folders go on sys.path.
for _d in sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
    if str(_d) not in sys.path:
        sys.path.append(str(_d))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real public data sets); CI has it beside the clone."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
