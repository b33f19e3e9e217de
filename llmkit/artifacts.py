"""Artifact directories in open formats (DESIGN.md): atomic writes, content hashes, manifest.json lineage.

Every artifact (dataset, tokens, tokenizer, checkpoint, run, eval) is a directory with a
`manifest.json` naming its kind, its parents (by content hash), the exact config, the code version
and the command, so anything can be traced back to raw data and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_version() -> str:
    """git describe of the llmkit checkout when there is one, else the package version."""
    from . import __version__

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5,
        )
        if out.returncode == 0:
            return f"{__version__}+{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def artifact_hash(directory: str | Path) -> str:
    """Content hash of an artifact: the hash of its manifest's file table (or of all its files)."""
    directory = Path(directory)
    m = directory / MANIFEST
    if m.exists():
        files = json.loads(m.read_text()).get("files", {})
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(directory).as_posix().encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def write_manifest(
    directory: str | Path,
    kind: str,
    *,
    parents: list[str | Path | dict] | None = None,
    config: Any = None,
    command: list[str] | None = None,
    extra: dict | None = None,
) -> dict:
    """Hash every file of `directory` and write its manifest.json atomically; returns the manifest."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): file_sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    parent_refs = []
    for par in parents or []:
        if isinstance(par, dict):
            parent_refs.append(par)
        else:
            par = Path(par)
            parent_refs.append({"path": str(par), "sha256": artifact_hash(par) if par.is_dir() else file_sha256(par)})
    manifest = {
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "command": command if command is not None else sys.argv,
        "config": config,
        "parents": parent_refs,
        "files": files,
        **(extra or {}),
    }
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def verify_manifest(directory: str | Path) -> list[str]:
    """Files whose sha256 differs from (or are missing against) the manifest; [] when intact."""
    directory = Path(directory)
    m = json.loads((directory / MANIFEST).read_text())
    bad = []
    for name, digest in m.get("files", {}).items():
        p = directory / name
        if not p.exists() or file_sha256(p) != digest:
            bad.append(name)
    return bad
