"""Reading safetensors files by hand: a bounds-checked header parser and row-range reads with plain file
I/O (no mmap, so reading a 90 MB checkpoint never maps 90 MB into the process's resident set). The header
parser needs no torch (the torch-free runtime validates patches with it); TensorReader returns tensors.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}
(+ optional "__metadata__": {str: str}), then the tensor bytes, offsets relative to the end of the header.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeTuneError

# safetensors dtype name -> (torch dtype name, bytes per value)
DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
MAX_HEADER_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offset from the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # byte offset of the data section in the file
    data_bytes: int  # length of the data section


def parse_header(blob_head: bytes, file_size: int, where: str, error=EdgeTuneError) -> Header:
    """Validate a safetensors header from the file's first bytes (at least 8 + header length of them)."""
    if file_size < 8 or len(blob_head) < 8:
        raise error(
            f"file is {file_size} bytes, too short for a safetensors header", where, "file truncated?"
        )
    (n,) = struct.unpack("<Q", blob_head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise error(f"header claims {n} bytes but the file has {file_size}", where, "truncated or corrupt")
    if len(blob_head) < 8 + n:
        raise ValueError("caller must pass the whole header")
    try:
        raw = json.loads(blob_head[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"header is not valid JSON ({e.__class__.__name__})", where, "file corrupt") from None
    if not isinstance(raw, dict):
        raise error("header is not a JSON object", where, "file corrupt")
    meta = raw.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise error("__metadata__ must map strings to strings", where, "file corrupt")
    data_bytes = file_size - 8 - n
    tensors, spans = {}, []
    for name, info in raw.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = (
                dtype in DTYPES
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(begin, int)
                and isinstance(end, int)
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise error(f"header entry for {name!r} is malformed", where, "file corrupt")
        expected = math.prod(shape) * DTYPES[dtype][1]  # Python ints: no overflow on absurd shapes
        if not (0 <= begin <= end <= data_bytes) or end - begin != expected:
            raise error(
                f"tensor {name!r} lies outside the file or has the wrong size",
                where,
                "file truncated or corrupt",
            )
        tensors[name] = TensorInfo(dtype, shape, begin, end)
        spans.append((begin, end))
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise error("tensor data overlaps or leaves gaps", where, "file corrupt")
        pos = end
    if pos != data_bytes:
        raise error(
            f"{data_bytes - pos} unexpected bytes after the tensors", where, "file corrupt or appended to"
        )
    return Header(tensors, meta, 8 + n, data_bytes)


def read_header(path: Path, error=EdgeTuneError) -> Header:
    """Parse the header of a safetensors file on disk without reading its tensor data."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= MAX_HEADER_BYTES and 8 + n <= size:
                    head += f.read(n)
    except OSError as e:
        raise error(f"cannot read ({e.strerror or e})", path) from None
    return parse_header(head, size, str(path), error)


class TensorReader:
    """Reads tensors, or row ranges of them, from a safetensors file with plain reads, hashing what it reads
    so that a whole-file pass yields a fingerprint at no extra I/O."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header = read_header(self.path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        self.hasher = hashlib.sha256()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.header.tensors[name].shape

    def read_rows(self, name: str, start: int = 0, stop: int | None = None):
        """Rows [start, stop) of tensor `name` as a new torch tensor (dim 0 sliced)."""
        import torch

        info = self.header.tensors[name]
        dtype = getattr(torch, DTYPES[info.dtype][0])
        rows = info.shape[0] if info.shape else 1
        stop = rows if stop is None else stop
        row_bytes = info.nbytes // max(rows, 1)
        self._file.seek(self.header.data_start + info.begin + start * row_bytes)
        buf = bytearray((stop - start) * row_bytes)
        if self._file.readinto(buf) != len(buf):
            raise EdgeTuneError(f"tensor {name!r} is cut short", self.path, "file truncated")
        self.hasher.update(buf)
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return t.reshape((stop - start, *info.shape[1:]) if info.shape else ())
