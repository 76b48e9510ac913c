"""The runtime floor: peak RSS of a training process before it holds any data, model or batch, measured
once per machine and Python environment in a child process (edge_tune.floor_probe, which imports what
`edge-tune train` imports and runs tiny steps through every code path) and cached. The memory plan starts
from it."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from .rss import trim_resident_memory

FLOOR_CACHE_VERSION = 7


def _floor_cache_path() -> Path:
    root = os.environ.get("EDGE_TUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edge_tune"
    )
    return Path(root) / "runtime_floor.json"


def _floor_key() -> str:
    import platform

    import torch

    kernels = os.environ.get("EDGE_TUNE_KERNELS", "1")  # the compiled kernels' library is part of the floor
    return (f"v{FLOOR_CACHE_VERSION}|py{platform.python_version()}|torch{torch.__version__}|{platform.machine()}|"
            f"{sys.prefix}|kernels={kernels}")  # fmt: skip


def runtime_floor_mb(refresh: bool = False) -> float:
    """Peak RSS (MB) of the training phase of a fresh process with no work to do: interpreter, torch,
    edge_tune, the tokenizer, and the code pages a training and an evaluation step run, after
    trim_resident_memory has dropped the rest (train() trims before its first step). Measured in a subprocess
    that runs tiny training and evaluation steps through every code path, minus the tiny model; once per
    machine and Python environment (~5 s), cached in ~/.cache/edge_tune."""
    return _floor_values(refresh)["floor"]


def startup_peak_mb(refresh: bool = False) -> float:
    """Peak RSS (MB) of a fresh process once edge_tune's training path is imported and its kernels loaded,
    before any trimming: no training process peaks lower. Measured with runtime_floor_mb."""
    return _floor_values(refresh)["startup"]


def _floor_values(refresh: bool = False) -> dict[str, float]:
    path, key = _floor_cache_path(), _floor_key()
    if not refresh:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            v = json.loads(path.read_text())[key]
            return {"floor": float(v["floor"]), "startup": float(v["startup"])}
    import subprocess

    # A page this process maps too cannot be trimmed in the child (MADV_PAGEOUT skips shared pages): measured
    # from an untrimmed parent holding torch (pytest, say) the floor read 260 MB instead of 204.
    trim_resident_memory()
    p = subprocess.run([sys.executable, "-m", "edge_tune.floor_probe"], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)})  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"measuring the runtime floor failed: {p.stderr.strip()[-500:]}")
    value = json.loads(p.stdout.strip().splitlines()[-1])
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        old = {}
        with contextlib.suppress(OSError, ValueError):
            old = json.loads(path.read_text())
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**old, key: value}))
        os.replace(tmp, path)
    return value
