"""The end-to-end job behind `edge-tune train` and `demo`: profile -> caps -> data -> base -> train -> patch."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import default_model_dir, load_base, read_config
from .data import load_task
from .errors import EdgeTuneError, PatchError
from .memory import dataset_bytes, plan_batch_size
from .methods import MethodSpec
from .patch import Manifest, save_patch
from .profiles import DeviceProfile, clamp_to_profile, load_profile
from .rss import apply_process_settings, set_tensor_cache_slack, trim_resident_memory
from .train import TrainConfig, TrainResult, accuracy, set_threads, train

log = logging.getLogger("edge_tune")

# Per-method defaults, the best measured (SST-2 dev, int8 base, batch 32, 1200 steps, grad-norm clip 1.0):
# LoRA r8 q,v lr 2e-3: 0.880; lr 5e-3: 0.797 (unstable); BitFit lr 1e-2: 0.860.
DEFAULT_LR = {"head": 2e-3, "bitfit": 1e-2, "lora": 2e-3}
# BitFit's lr falls with the batch below 32 (linear scaling): at the pi-zero cap of 16, with dynamic int8
# activations, lr 5e-3 gave 0.8452 and 1e-2 gave 0.8280 (SST-2 dev, 1200 steps).
LR_SCALES_WITH_BATCH = {"bitfit"}


def default_lr(method: str, batch_size: int) -> float:
    """The learning rate a method trains with unless the user sets one."""
    lr = DEFAULT_LR[method]
    return lr * min(1.0, batch_size / 32) if method in LR_SCALES_WITH_BATCH else lr


PATCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
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
    resume: bool = False,
    checkpoint_every: int = 50,
    allow_shorter_seq: bool = False,
    patch_dtype: str = "fp16",
) -> AdaptResult:
    """Train a `method` patch on `data` under device `profile` and write it to `out` (atomically).
    Deltas are stored as `patch_dtype` (fp16: half the bytes; the reported accuracy is the stored patch's).
    The memory plan picks the micro-batch (with accumulation), activation checkpointing and evaluation
    batch that fit the profile's budget, and shortens sequences only if `allow_shorter_seq`.
    The run checkpoints to `<out>.ckpt` every `checkpoint_every` steps; `resume` continues from there.
    Holds an exclusive lock on `out` for the whole run, so a second writer fails fast."""
    t0 = time.perf_counter()
    apply_process_settings()
    prof = load_profile(profile)
    MethodSpec(method, rank=max(rank, 1), targets=targets)  # validate the method before any heavy work
    used, warnings = clamp_to_profile(prof, batch_size=batch_size, rank=rank, seq_len=seq_len)
    problems = [
        f"--grad-accum must be between 1 and the batch size ({used['batch_size']}), got {grad_accum}"
        for _ in [0]
        if not 1 <= grad_accum <= used["batch_size"]
    ]
    checks = {
        "--steps": steps,
        "--eval-every": eval_every,
        "--patience": patience,
        "--checkpoint-every": checkpoint_every,
    }
    problems += [f"{k} must be at least 1, got {v}" for k, v in checks.items() if v is not None and v < 1]
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        problems.append(f"--lr must be a positive number, got {lr}")
    if patch_dtype not in PATCH_DTYPES:
        problems.append(f"--patch-dtype must be one of {', '.join(PATCH_DTYPES)}, got {patch_dtype!r}")
    if used["seq_len"] < 3:
        problems.append(f"--seq-len must be at least 3 tokens ([CLS] word [SEP]), got {used['seq_len']}")
    if problems:
        raise EdgeTuneError("; ".join(problems))
    for w in warnings:
        log.warning("warning: %s", w)
    out = Path(out)
    if out.is_dir():
        raise EdgeTuneError("is a directory", out, f"give the patch a file name, e.g. {out / 'task.patch'}")
    if not out.parent.exists():
        raise EdgeTuneError("folder does not exist", out.parent, "create it first")
    precision = precision or prof.precision
    if prof.backend == "cuda" and not torch.cuda.is_available():
        log.warning(
            "warning: profile %r asks for CUDA, which this machine lacks; training on the CPU", prof.name
        )
    with output_lock(out):
        return _adapt_locked(data, out, method, prof, precision, used, warnings, t0, alpha=alpha, targets=targets,
                             grad_accum=grad_accum, steps=steps, lr=lr, eval_every=eval_every, patience=patience,
                             seed=seed, progress=progress, resume=resume, checkpoint_every=checkpoint_every,
                             allow_shorter_seq=allow_shorter_seq, patch_dtype=patch_dtype)  # fmt: skip


@contextlib.contextmanager
def output_lock(out: Path):
    """An exclusive, non-blocking lock beside `out` (flock: released by the kernel even on kill -9)."""
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a folder we cannot write (/proc, read-only, no permission): say so in one line
            raise PatchError(f"cannot write beside the patch ({e.strerror or e})", out,
                             "pick an --out in a folder you can write") from None  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EdgeTuneError(
                "another edge-tune run is writing this patch", out, "wait for it or pick another --out"
            ) from None
        # The holder unlinks the lock file on exit; a lock won on that unlinked file guards nothing.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _data_bytes(train_ds, dev_ds, seq_len: int) -> int:
    """What the loaded datasets hold once tokenized (~4.5 characters a token, [CLS] and [SEP] added)."""
    texts = train_ds.texts + dev_ds.texts
    tokens = sum(min(seq_len, len(t) // 4 + 3) for t in texts)
    return dataset_bytes(len(texts), sum(map(len, texts)), tokens)


def _adapt_locked(data, out, method, prof, precision, used, warnings, t0, *, alpha, targets, grad_accum, steps,
                  lr, eval_every, patience, seed, progress, resume, checkpoint_every,
                  allow_shorter_seq, patch_dtype) -> AdaptResult:  # fmt: skip
    threads = set_threads(prof)
    trim_resident_memory()  # the imports' unused code pages: data and base then load under the training floor
    train_ds, dev_ds = load_task(data, seed=seed)
    r = used["rank"]
    spec = MethodSpec(method, rank=r, alpha=alpha or 2.0 * r, targets=targets)
    # The plan comes before the base is loaded: a run that cannot fit is refused before any heavy work.
    model_cfg = read_config(default_model_dir())
    plan, notes = plan_batch_size(
        model_cfg, spec, precision, prof.memory_budget_mb, used["batch_size"], used["seq_len"],
        micro_batch=-(-used["batch_size"] // grad_accum), data_bytes=_data_bytes(train_ds, dev_ds, used["seq_len"]),
        num_labels=len(train_ds.label_names), allow_shorter_seq=allow_shorter_seq,
    )  # fmt: skip
    # the headroom the plan spends on speed (memory.with_tensor_cache)
    set_tensor_cache_slack(plan.tensor_cache_mb)
    log.info("memory plan for %s under %s:\n%s", method, prof.name, plan.table(prof.memory_budget_mb))
    for n in notes:
        log.warning("%s", n)
    base = load_base(precision=precision, num_labels=len(train_ds.label_names))
    cfg = TrainConfig(
        method=spec,
        batch_size=used["batch_size"],
        grad_accum=plan.grad_accum,
        seq_len=plan.seq_len,
        steps=DEFAULT_STEPS[method] if steps is None else steps,
        lr=default_lr(method, used["batch_size"]) if lr is None else lr,
        eval_every=eval_every,
        patience=patience,
        seed=seed,
        checkpointing=plan.checkpointing,
        eval_batch_size=plan.eval_batch,
        memory_budget_mb=prof.memory_budget_mb,
    )
    log.info(
        "training %s on %s (%d train / %d dev) under %s: base %s %.1f MB, batch %d (micro %d), seq %d tokens, "
        "%d threads, budget %d MB",
        method, data, len(train_ds), len(dev_ds), prof.name, precision, base.frozen_bytes() / 1e6,
        cfg.batch_size, plan.micro_batch, cfg.seq_len, threads, prof.memory_budget_mb,
    )  # fmt: skip
    ckpt = out.parent / f"{out.name}.ckpt"
    result = train(base, train_ds, dev_ds, cfg, progress, ckpt, resume, checkpoint_every)
    if result.stop_reason:
        log.warning("warning: %s", result.stop_reason)
    dtype = PATCH_DTYPES[patch_dtype]
    if dtype != torch.float32:
        # Report the accuracy of the patch as stored: round the deltas in the model and evaluate again.
        trained_acc = result.dev_accuracy
        with torch.no_grad():
            for n, p in base.model.named_parameters():
                if n in result.tensors:
                    p.copy_(p.to(dtype).float())
                    result.tensors[n] = p.detach().clone()
        result.dev_accuracy = accuracy(base, dev_ds, cfg.seq_len, cfg.eval_batch_size)
        log.info(
            "dev accuracy %.4f in fp32, %.4f as stored in %s", trained_acc, result.dev_accuracy, patch_dtype
        )
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
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "peak_rss_mb": round(result.peak_rss_mb, 1),
        },
    )
    nbytes = save_patch(out, result.tensors, manifest, dtype=dtype)
    ckpt.unlink(missing_ok=True)  # the patch is complete; the checkpoint has served
    return AdaptResult(out, nbytes, result, prof, time.perf_counter() - t0, threads, warnings)
