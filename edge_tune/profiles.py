"""Device profiles: caps on memory, threads, batch, rank and sequence length, read from TOML."""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from .errors import ProfileError
from .resources import profiles_dir

SCHEMA_VERSION = 1
PROFILES_DIR = Path(os.environ.get("EDGE_TUNE_PROFILES_DIR") or profiles_dir())
DEFAULT_PROFILE = "raspberry-pi-4-4gb"
PRECISIONS = ("fp32", "int8", "int4")
BACKENDS = ("cpu", "cuda")
DEPLOYS = ("torch", "onnxruntime", "executorch")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    schema_version: int
    description: str
    memory_budget_mb: int  # peak RSS allowed for the whole training process
    threads: int
    max_batch_size: int
    max_rank: int
    max_seq_len: int  # tokens, [CLS] and [SEP] included
    precision: str  # frozen base weights: fp32 | int8 | int4
    backend: str  # cpu | cuda
    # `edge-tune serve`: how long a request may wait for others to share its pass, and that pass's rows
    serve_window_ms: float = 5.0
    serve_max_batch: int = 64
    # the runtime the device serves with: torch (edge_tune.bank), onnxruntime (edge-tune export --format onnx,
    # edge_tune.runtime) or executorch
    deploy: str = "torch"


def _check_values(p: dict) -> list[str]:
    errors = []
    if p["schema_version"] != SCHEMA_VERSION:
        errors.append(f"schema_version is {p['schema_version']!r}, this edge_tune reads {SCHEMA_VERSION}")
    for key in ("memory_budget_mb", "threads", "max_batch_size", "max_rank", "max_seq_len"):
        v = p[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            errors.append(f"{key} must be a positive integer, got {v!r}")
    if "serve_max_batch" in p and not (isinstance(p["serve_max_batch"], int) and p["serve_max_batch"] >= 1):
        errors.append(f"serve_max_batch must be a positive integer, got {p['serve_max_batch']!r}")
    w = p.get("serve_window_ms", 0.0)
    if not (isinstance(w, int | float) and not isinstance(w, bool) and 0 <= w <= 1000):
        errors.append(f"serve_window_ms must be a number of ms in [0, 1000], got {w!r}")
    if isinstance(p["max_seq_len"], int) and p["max_seq_len"] > 512:
        errors.append(f"max_seq_len must be at most 512 (the model's positions), got {p['max_seq_len']}")
    if p["precision"] not in PRECISIONS:
        errors.append(f"precision must be one of {', '.join(PRECISIONS)}, got {p['precision']!r}")
    if p.get("deploy", "torch") not in DEPLOYS:
        errors.append(f"deploy must be one of {', '.join(DEPLOYS)}, got {p['deploy']!r}")
    if p["backend"] not in BACKENDS:
        errors.append(f"backend must be one of {', '.join(BACKENDS)}, got {p['backend']!r}")
    for key in ("name", "description"):
        if not isinstance(p[key], str):
            errors.append(f"{key} must be a string, got {p[key]!r}")
    return errors


def parse_profile(text: str, where: str) -> DeviceProfile:
    """Parse and validate a profile's TOML text; all problems are reported together in one line."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"not valid TOML ({e})", where, "fix the syntax") from None
    known = [f.name for f in fields(DeviceProfile)]
    errors = []
    for k in sorted(raw.keys() - set(known)):
        near = difflib.get_close_matches(k, known, n=1)
        errors.append(f"unknown key {k!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    optional = {f.name for f in fields(DeviceProfile) if f.default is not MISSING}
    errors += [f"missing key {k!r}" for k in known if k not in raw and k not in optional]
    if not errors:
        errors = _check_values(raw)
    if errors:
        raise ProfileError("; ".join(errors), where)
    return DeviceProfile(**{k: raw[k] for k in known if k in raw})


def load_profile(name_or_path: str | os.PathLike | None = None) -> DeviceProfile:
    """Load a shipped profile by name (see `edge-tune profiles`) or any profile TOML by path."""
    name_or_path = str(name_or_path or DEFAULT_PROFILE)
    path = Path(name_or_path)
    if not (name_or_path.endswith(".toml") or path.is_file()):
        path = PROFILES_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            names = list_profile_names()
            near = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ProfileError(f"unknown profile {name_or_path!r} — {hint}known: {', '.join(names)}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read profile ({e.__class__.__name__}: {e})", path) from None
    return parse_profile(text, str(path))


def list_profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def clamp_to_profile(
    profile: DeviceProfile, *, batch_size: int, rank: int, seq_len: int
) -> tuple[dict, list[str]]:
    """Clamp requested sizes to the profile's caps; returns the values used and one warning per clamp."""
    caps = {"batch_size": profile.max_batch_size, "rank": profile.max_rank, "seq_len": profile.max_seq_len}
    asked = {"batch_size": batch_size, "rank": rank, "seq_len": seq_len}
    used, warnings = {}, []
    for key, value in asked.items():
        if value < 1:
            raise ProfileError(f"{key} must be at least 1, got {value}")
        used[key] = min(value, caps[key])
        if value > caps[key]:
            warnings.append(f"{key} {value} is above profile {profile.name!r}'s cap; using {caps[key]}")
    return used, warnings
