"""The end-to-end job behind `edge-tune train` and `demo`: profile -> caps -> data -> base -> train -> patch."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import load_base
from .data import load_task
from .errors import EdgeTuneError
from .methods import MethodSpec
from .patch import Manifest, save_patch
from .profiles import DeviceProfile, clamp_to_profile, load_profile
from .train import TrainConfig, TrainResult, set_threads, train

log = logging.getLogger("edge_tune")

# Per-method defaults that reach SST-2 dev >= 0.86 on the int8 base (see README "Benchmarks").
DEFAULT_LR = {"head": 2e-3, "bitfit": 2e-3, "lora": 1e-3}
DEFAULT_STEPS = {"head": 600, "bitfit": 1200, "lora": 1200}


@dataclass
class AdaptResult:
    patch_path: Path
    patch_bytes: int
    train: TrainResult
    profile: DeviceProfile
    seconds: float
    threads: int
    warnings: list[str]


def adapt(
    data: str,
    out: str | Path,
    method: str = "bitfit",
    profile: str | None = None,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: tuple[str, ...] = ("q", "v"),
    batch_size: int = 32,
    grad_accum: int = 1,
    seq_len: int = 64,
    steps: int | None = None,
    lr: float | None = None,
    eval_every: int = 100,
    patience: int = 5,
    seed: int = 0,
    precision: str | None = None,
    progress: bool | None = None,
) -> AdaptResult:
    """Train a `method` patch on `data` under device `profile` and write it to `out` (atomically)."""
    t0 = time.perf_counter()
    prof = load_profile(profile)
    spec_kwargs = {"rank": rank, "alpha": alpha, "targets": targets}
    MethodSpec(method, rank=max(rank, 1), targets=targets)  # validate the method before any heavy work
    used, warnings = clamp_to_profile(prof, batch_size=batch_size, rank=rank, seq_len=seq_len)
    if grad_accum < 1 or grad_accum > used["batch_size"]:
        raise EdgeTuneError(
            f"--grad-accum must be between 1 and the batch size ({used['batch_size']}), got {grad_accum}"
        )
    for w in warnings:
        log.warning("warning: %s", w)
    out = Path(out)
    if out.is_dir():
        raise EdgeTuneError(f"{out}: is a directory — give the patch a file name, e.g. {out / 'task.patch'}")
    if not out.parent.exists():
        raise EdgeTuneError(f"{out.parent}: folder does not exist — create it first")
    precision = precision or prof.precision
    if prof.backend == "cuda" and not torch.cuda.is_available():
        log.warning(
            "warning: profile %r asks for CUDA, which this machine lacks; training on the CPU", prof.name
        )
    threads = set_threads(prof)
    train_ds, dev_ds = load_task(data, seed=seed)
    base = load_base(precision=precision, num_labels=len(train_ds.label_names))
    r = used["rank"]
    spec = MethodSpec(method, rank=r, alpha=spec_kwargs["alpha"] or 2.0 * r, targets=targets)
    cfg = TrainConfig(
        method=spec,
        batch_size=used["batch_size"],
        grad_accum=grad_accum,
        seq_len=used["seq_len"],
        steps=steps or DEFAULT_STEPS[method],
        lr=lr or DEFAULT_LR[method],
        eval_every=eval_every,
        patience=patience,
        seed=seed,
    )
    log.info(
        "training %s on %s (%d train / %d dev) under %s: base %s %.1f MB, batch %d, seq %d tokens, %d threads, budget %d MB",
        method, data, len(train_ds), len(dev_ds), prof.name, precision, base.frozen_bytes() / 1e6,
        cfg.batch_size, cfg.seq_len, threads, prof.memory_budget_mb,
    )  # fmt: skip
    result = train(base, train_ds, dev_ds, cfg, progress)
    manifest = Manifest(
        method=method,
        hyper=spec.hyper(),
        label_names=train_ds.label_names,
        base_fingerprint=base.fingerprint,
        base_precision=precision,
        tensors_sha256="",
        task=Path(str(data)).stem if Path(str(data)).suffix else Path(str(data)).name,
        seq_len=cfg.seq_len,
        metrics={
            "dev_accuracy": round(result.dev_accuracy, 4),
            "steps": result.steps,
            "peak_rss_mb": round(result.peak_rss_mb, 1),
        },
    )
    nbytes = save_patch(out, result.tensors, manifest)
    return AdaptResult(out, nbytes, result, prof, time.perf_counter() - t0, threads, warnings)
