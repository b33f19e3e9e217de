"""A fast GGUF v2/v3 reader (llama.cpp's single-file format; survey §4.2.4 deployment).

`gguf.GGUFReader` builds a numpy view per field part: on a model with a 49k-token vocabulary and 49k merges
it spends ~4 s of a 5 s load parsing metadata. This reader walks the same layout with `struct` over one
memory map (SmolLM2-135M's metadata: ~0.1 s) and dequantises tensors with vectorised torch code for the
common storage types (F32, F16, BF16, Q8_0, Q4_0, Q4_1), deferring to `gguf.quants.dequantize` for the rest
(K-quants, I-quants). The `gguf` package stays the reference: tests check metadata and tensors against it.

Layout (ggml/docs/gguf.md): "GGUF", version u32, tensor count u64, metadata count u64; metadata as
(string key, u32 type, value); tensor infos as (string name, u32 n_dims, u64 dims fastest-first, u32 ggml
type, u64 offset); tensor data from the next multiple of `general.alignment` (default 32). Strings are a u64
byte length + UTF-8 bytes; arrays a u32 item type + u64 count + items. Little-endian only.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import LoadError

MAGIC = b"GGUF"
# GGUF metadata value types -> struct format (8 = string, 9 = array)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
# ggml types dequantised here in torch, and the bytes of one 32-weight block of the quantised ones
# (ggml-common.h: block_q4_0 = fp16 d + 16 nibble bytes, block_q4_1 = fp16 d, m + 16, block_q8_0 = fp16 d + 32)
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: slowest dim first
    ggml_type: int
    data: np.ndarray  # the raw bytes (a read-only view of the memory map)


class GGUFFile:
    """Metadata (`.meta`: key -> int/float/bool/str/list) and tensors (`.tensors`) of a GGUF file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise LoadError(f"{self.path}: no such GGUF file")
        with open(self.path, "rb") as f:
            if f.read(4) != MAGIC:
                raise LoadError(f"{self.path}: not a GGUF file (the first bytes are not 'GGUF')")
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, IndexError) as e:
            raise LoadError(f"{self.path}: truncated or corrupt GGUF ({type(e).__name__}: {e}); "
                            "download or convert it again") from None

    def _parse(self) -> None:
        buf = self._buf
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise LoadError(f"{self.path}: GGUF version {version} (byte-swapped or v1); llmkit reads little-endian v2/v3")
        self._off = 24
        self.meta: dict = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.meta[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            ggml_type, offset = self._unpack("<IQ")
            infos.append((name, tuple(int(d) for d in reversed(dims)), ggml_type, offset))
        align = int(self.meta.get("general.alignment", 32))
        start = -(-self._off // align) * align
        raw = np.frombuffer(buf, dtype=np.uint8)
        self.tensors = []
        for name, shape, ggml_type, offset in infos:
            n = _n_bytes(shape, ggml_type, name, self.path)
            if start + offset + n > len(buf):
                raise LoadError(f"{self.path}: truncated GGUF, tensor {name} ends past the end of the file")
            self.tensors.append(TensorInfo(name, shape, ggml_type, raw[start + offset:start + offset + n]))

    def _unpack(self, fmt: str):
        out = struct.unpack_from(fmt, self._buf, self._off)
        self._off += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._buf, self._off)
        s = self._buf[self._off + 8:self._off + 8 + n]
        if len(s) != n:
            raise ValueError("string runs past the end of the file")
        self._off += 8 + n
        return s.decode("utf-8")

    def _value(self, vtype: int):
        if vtype == 8:
            return self._string()
        if vtype in _SCALAR:
            return self._unpack(_SCALAR[vtype])[0]
        if vtype != 9:
            raise ValueError(f"unknown GGUF value type {vtype}")
        item, count = self._unpack("<IQ")
        if item in _NUMPY:  # numeric arrays in one read
            arr = np.frombuffer(self._buf, dtype=_NUMPY[item], count=count, offset=self._off)
            self._off += arr.nbytes
            return arr.tolist()
        return [self._value(item) for _ in range(count)]

    def dequantize(self, t: TensorInfo) -> torch.Tensor:
        """The tensor as float32 [shape] (a fresh, writable copy)."""
        return dequantize(t.data, t.ggml_type, t.shape, f"{self.path}: tensor {t.name}")


def _n_bytes(shape: tuple[int, ...], ggml_type: int, name: str, path) -> int:
    import gguf

    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise LoadError(f"{path}: tensor {name} has unknown ggml type {ggml_type}") from None
    n = int(np.prod(shape, dtype=np.int64))
    if n % block:
        raise LoadError(f"{path}: tensor {name} has {n} elements, not a multiple of its {block}-weight blocks")
    return n // block * size


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """float32 tensor of `shape` from the raw bytes of one GGUF tensor."""
    if ggml_type in (F32, F16, BF16, Q4_0, Q4_1, Q8_0):
        b = torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # one copy: the memory map is read-only
        return dequantize_blocks(b, ggml_type).reshape(shape)
    import gguf

    try:
        arr = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(ggml_type))
    except NotImplementedError as e:
        raise LoadError(f"{what} has GGUF type {gguf.GGMLQuantizationType(ggml_type).name} which gguf cannot "
                        f"dequantise ({e})") from None
    return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)


def dequantize_blocks(b: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Flat float32 weights from the bytes `b` (uint8) of F32, F16, BF16, Q8_0 (w = d q), Q4_0 (w = d (q - 8))
    or Q4_1 (w = d q + m) data; d and m are float16 at the head of each 32-weight block."""
    if ggml_type == F32:
        return b.view(torch.float32)
    if ggml_type in (F16, BF16):
        return b.view(torch.float16 if ggml_type == F16 else torch.bfloat16).float()
    blocks = b.view(-1, _BLOCK_BYTES[ggml_type])
    head = 4 if ggml_type == Q4_1 else 2
    scales = blocks[:, :head].contiguous().view(torch.float16).float()  # d (and m for Q4_1)
    qs = blocks[:, head:]
    if ggml_type == Q8_0:
        q = qs.contiguous().view(torch.int8).float()
    else:  # low nibbles are weights 0..15 of the block, high nibbles 16..31
        qi = qs.to(torch.int16)
        q = torch.cat([qi & 15, qi >> 4], 1).float()
        if ggml_type == Q4_0:
            q -= 8
    w = q * scales[:, :1]
    if ggml_type == Q4_1:
        w += scales[:, 1:]
    return w.reshape(-1)
