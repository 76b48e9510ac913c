"""edge_tune: adapt a quantized, frozen transformer on the device it runs on, and ship tiny patches.

Importing the package imports nothing heavy: each public name loads its module (and torch, and the
edge_tune:: ops) on first use, so `edge_tune.runtime`, the torch-free serving path, stays torch-free. It
changes nothing process-wide. The compiled kernels load on an op's first call (or load_base); the process
settings a training or serving process wants (rss.apply_process_settings) are applied by adapt, train,
PatchBank and the CLI."""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_WHERE = {
    "PatchBank": "bank", "Prediction": "manifest", "Base": "base", "load_base": "base", "BudgetError": "errors",
    "DataError": "errors", "EdgeTuneError": "errors", "PatchError": "errors", "ProfileError": "errors",
    "MethodSpec": "methods", "Manifest": "manifest", "Patch": "patch", "load_patch": "patch",
    "save_patch": "patch", "DeviceProfile": "profiles", "load_profile": "profiles", "AdaptResult": "run",
    "RunPlan": "run", "RunRequest": "run", "adapt": "run", "plan_run": "run", "TuneRequest": "search_space",
    "TuneResult": "search", "tune": "search", "TrainConfig": "trainer", "TrainResult": "trainer",
    "train": "trainer",
}  # fmt: skip
__all__ = sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'edge_tune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
