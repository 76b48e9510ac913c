"""The patch file's manifest schema and the checks that need no torch: reading the file within its size
cap, the safetensors header, the manifest's fields, the digest of the tensor bytes. `patch.load_patch`
adds the checks against a loaded base; the torch-free runtime (`runtime.py`) adds them against its graph."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import EdgeTuneError, PatchError
from .tensorfile import Header, parse_header

FORMAT = "edge_tune.patch"
FORMAT_VERSION = 1
MANIFEST_KEY = "edge_tune"
MAX_PATCH_BYTES = 256 * 1024 * 1024  # a full fine-tune stored fp32 is ~90 MB
STORED = {"F32": "float32", "F16": "float16"}  # the safetensors dtypes a patch may hold


@dataclass
class Prediction:
    """One answer of a patch bank (the torch one, `bank.PatchBank`, and the torch-free `runtime.PatchBank`)."""

    label: str
    probability: float  # of the predicted label
    patch: str  # the patch that computed this response


@dataclass(frozen=True)
class Manifest:
    """The patch manifest schema (the one place it is defined)."""

    method: str  # a registered method's name (methods.METHODS)
    hyper: dict  # the method's hyper-parameters (LoRA: rank, alpha, targets)
    label_names: list[str]
    base_fingerprint: str  # sha256 of the base weights this patch was trained on
    base_precision: str  # fp32 | int8 | int4 (informational: a patch applies to any precision of its base)
    tensors_sha256: str  # sha256 over the sorted (name, dtype, shape, bytes) of the tensors
    task: str = ""
    seq_len: int = 128  # tokens per text the patch was trained with
    metrics: dict = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def spec(self):
        """The method and its hyper-parameters (methods.MethodSpec; imports torch)."""
        from .methods import MethodSpec

        return MethodSpec.from_hyper(self.method, self.hyper)


_FIELD_TYPES = {"method": str, "hyper": dict, "label_names": list, "base_fingerprint": str, "base_precision": str,
                "tensors_sha256": str, "task": str, "seq_len": int, "metrics": dict, "format": str,
                "format_version": int}  # fmt: skip


def parse_manifest(meta: dict[str, str], where: str) -> Manifest:
    """The manifest from a patch file's metadata, its fields checked (not the method's hyper-parameters)."""
    if MANIFEST_KEY not in meta:
        raise PatchError("no edge_tune manifest in the file's metadata", where, "not an edge_tune patch")
    try:
        raw = json.loads(meta[MANIFEST_KEY])
    except json.JSONDecodeError:
        raise PatchError("manifest is not valid JSON", where, "file corrupt") from None
    if not isinstance(raw, dict):
        raise PatchError("manifest is not a JSON object", where, "file corrupt")
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise PatchError(
            f"format {raw.get('format')!r} v{raw.get('format_version')!r} is not {FORMAT} v{FORMAT_VERSION}",
            where,
            "re-export the patch with this edge_tune",
        )
    known = {f.name for f in fields(Manifest)}
    errors = [f"unknown key {k!r}" for k in sorted(raw.keys() - known)]
    errors += [f"missing key {k!r}" for k in ("method", "hyper", "label_names", "base_fingerprint",
                                              "base_precision", "tensors_sha256") if k not in raw]  # fmt: skip
    errors += [
        f"{k!r} should be {t.__name__}" for k, t in _FIELD_TYPES.items() if k in raw and type(raw[k]) is not t
    ]
    if not errors and (
        len(raw["label_names"]) < 2 or not all(isinstance(x, str) for x in raw["label_names"])
    ):
        errors.append("label_names must be at least two strings")
    if errors:
        raise PatchError("manifest invalid: " + "; ".join(errors), where, "re-export the patch")
    return Manifest(**raw)


def digest(items) -> str:
    """The manifest's tensors_sha256 over (name, dtype, shape, bytes) items, taken in name order; dtype is
    torch's name for it ("torch.float32"), whoever computes the digest."""
    h = hashlib.sha256()
    for name, dtype, shape, data in sorted(items, key=lambda it: it[0]):
        h.update(f"{name}|{dtype}|{tuple(shape)}|".encode())
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class PatchFile:
    """A patch file read and checked without torch: its bytes, header and manifest."""

    blob: bytes
    header: Header
    manifest: Manifest

    def data(self) -> bytearray:
        """A writable copy of the tensor bytes (each tensor a view into it)."""
        return bytearray(self.blob[self.header.data_start :])

    def check_digest(self, data: bytes | bytearray, where: str) -> None:
        view = memoryview(data)
        got = digest(
            (n, f"torch.{STORED[i.dtype]}", i.shape, view[i.begin : i.end])
            for n, i in self.header.tensors.items()
        )
        if got != self.manifest.tensors_sha256:
            raise PatchError(
                "tensor bytes do not match the manifest's sha256", where, "file corrupted in transit"
            )


def read_patch_file(path: str | Path) -> PatchFile:
    """Read a patch file: size cap, header bounds, manifest schema, F32/F16 tensors only."""
    path = Path(path)
    where = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_PATCH_BYTES:
            raise PatchError(
                f"{size >> 20} MB is larger than any patch ({MAX_PATCH_BYTES >> 20} MB)", where, "wrong file?"
            )
        blob = path.read_bytes()
    except FileNotFoundError:
        raise PatchError("no such patch file", where) from None
    except IsADirectoryError:
        raise PatchError("is a directory, not a patch file", where) from None
    except OSError as e:
        raise PatchError(f"cannot read ({e.strerror or e})", where) from None
    header = parse_header(blob, len(blob), where, PatchError)
    manifest = parse_manifest(header.metadata, where)
    bad = [(n, i.dtype) for n, i in header.tensors.items() if i.dtype not in STORED]
    if bad:
        raise PatchError(
            f"tensor {bad[0][0]!r} is {bad[0][1]}, patches hold F32 or F16 only",
            where,
            "file corrupt or foreign",
        )
    return PatchFile(blob, header, manifest)


def check_spec(manifest: Manifest, where: str):
    """The manifest's method spec, or a PatchError naming what is wrong with it (imports torch)."""
    try:
        return manifest.spec()
    except PatchError:
        raise
    except EdgeTuneError as e:  # an unknown method, a bad target: the patch's fault, so a PatchError
        raise PatchError(f"manifest invalid: {e.what}", where, "re-export the patch") from None
    except (KeyError, TypeError, ValueError) as e:
        raise PatchError(f"manifest hyper-parameters invalid ({e!r})", where) from None
