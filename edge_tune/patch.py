"""Patches: the trained delta tensors in one safetensors file with a JSON manifest in its metadata.
Loading is a trust boundary: nothing is unpickled or executed, and every check passes before any model
tensor is touched. Serving many patches on one base is `bank.PatchBank`'s job."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from .base import Base
from .errors import PatchError
from .manifest import MANIFEST_KEY, STORED, Manifest, check_spec, digest, read_patch_file
from .methods import delta_shapes

__all__ = ["MANIFEST_KEY", "Manifest", "Patch", "load_patch", "save_patch", "save_tensors", "tensors_sha256"]

STORED_DTYPES = {k: getattr(torch, v) for k, v in STORED.items()}  # safetensors dtype name -> torch dtype


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """tensors_sha256 of a manifest, from the tensors it describes."""
    return digest(
        (n, t.dtype, t.shape, t.contiguous().view(torch.uint8).numpy() if t.numel() else b"")
        for n, t in tensors.items()
    )


def atomic_write(path: Path, data: bytes | Callable[[Path], None]) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part:
    temp file in the same folder, fsync, rename. `data` is bytes, or a function that writes the temp file
    (safetensors' save_file streams tensors to it: no copy of them in memory). On failure the temp file is
    removed."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                if callable(data):
                    data(tmp)
                else:
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PatchError(
            f"cannot write ({e.strerror or e})", path, "check the folder exists, is writable and has space"
        ) from None


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> int:
    """Write a safetensors file atomically, streaming the tensors (a 90 MB full fine-tune or a 300 MB
    checkpoint costs no second copy in memory); returns its size in bytes."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except Exception as e:  # safetensors reports I/O errors as its own type, "... (os error 28)"
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None

    atomic_write(path, write)
    return os.path.getsize(path)


def save_patch(
    path: str | Path, tensors: dict[str, Tensor], manifest: Manifest, dtype: torch.dtype = torch.float32
) -> int:
    """Write a patch atomically, its tensors stored as `dtype` (float32, or float16 for half the bytes);
    returns its size in bytes. `manifest.tensors_sha256` (over the stored bytes) is filled in here."""
    if dtype not in STORED_DTYPES.values():
        raise PatchError(f"patches store float32 or float16, not {dtype}")
    tensors = {n: t.detach().to("cpu", dtype).contiguous() for n, t in tensors.items()}
    manifest = Manifest(**{**asdict(manifest), "tensors_sha256": tensors_sha256(tensors)})
    return save_tensors(Path(path), tensors, {MANIFEST_KEY: json.dumps(asdict(manifest), sort_keys=True)})


@dataclass
class Patch:
    name: str
    manifest: Manifest
    tensors: dict[str, Tensor]
    path: str
    file_bytes: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def load_patch(
    path: str | Path, base: Base | None = None, max_rank: int | None = None, name: str | None = None
) -> Patch:
    """Read and validate a patch: size, header bounds, manifest schema, tensor names/shapes/dtypes for the
    method, sha256 of the tensor bytes, finite values, base fingerprint and rank cap (when given)."""
    path = Path(path)
    where = str(path)
    pf = read_patch_file(path)
    header, manifest = pf.header, pf.manifest
    spec = check_spec(manifest, where)
    # parse_header checked that the tensors tile the data region exactly: one copy of it, and each tensor
    # is a view into that copy.
    data = pf.data()
    stored = {}
    for n, i in header.tensors.items():
        dt = STORED_DTYPES[i.dtype]
        count = (i.end - i.begin) // dt.itemsize
        t = (
            torch.frombuffer(data, dtype=dt, count=count, offset=i.begin)
            if count
            else torch.empty(0, dtype=dt)
        )
        stored[n] = t.view(i.shape)
    # straight off the file's bytes (the same digest as tensors_sha256(stored), without a torch call per tensor)
    pf.check_digest(data, where)
    dtypes = {i.dtype for i in header.tensors.values()}
    whole = (
        [torch.frombuffer(data, dtype=STORED_DTYPES[d]) for d in dtypes] if len(dtypes) == 1 and data else []
    )
    if not all(torch.isfinite(t).all() for t in (whole or stored.values())):
        bad_name = next(n for n, t in stored.items() if not torch.isfinite(t).all())
        raise PatchError(f"tensor {bad_name!r} holds NaN or Inf", where, "refusing a broken patch")
    # compute is fp32: fp16-stored deltas are widened once, here
    tensors = {n: t if t.dtype == torch.float32 else t.float() for n, t in stored.items()}
    if max_rank is not None and "rank" in spec.method.hyper and spec.rank > max_rank:
        raise PatchError(f"LoRA rank {spec.rank} is above the profile's cap {max_rank}", where)
    if base is not None:
        if manifest.base_fingerprint != base.fingerprint:
            raise PatchError(
                f"made for base {manifest.base_fingerprint[:12]}, the loaded base is {base.fingerprint[:12]}",
                where,
                "train the patch on this base",
            )
        expected = delta_shapes(base.model, spec, len(manifest.label_names))
        missing = sorted(expected.keys() - tensors.keys())
        extra = sorted(tensors.keys() - expected.keys())
        wrong = [n for n in expected.keys() & tensors.keys() if tuple(tensors[n].shape) != expected[n]]
        if missing or extra or wrong:
            detail = "; ".join(
                f"{what}: {', '.join(ns[:3])}{'...' if len(ns) > 3 else ''}"
                for what, ns in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
                if ns
            )
            raise PatchError(f"tensors do not fit a {spec.name} patch for this base ({detail})", where)
    return Patch(name or manifest.task or path.stem, manifest, tensors, where, len(pf.blob))
