"""The end-to-end job behind `edge-tune train`, `plan` and `demo`: a RunRequest, planned on its profile
(plan_run: caps -> data -> memory plan), then base -> train -> patch (adapt)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import default_model_dir, load_base, read_config
from .data import Dataset, label_descriptions, load_task, take_per_class, token_rows
from .errors import BudgetError, EdgeTuneError, PatchError
from .memory import WORD_TABLE, MemoryPlan, dataset_bytes, plan_batch_size, plan_memory, with_tensor_cache
from .methods import MethodSpec, apply_method, get_method
from .patch import Manifest, save_patch
from .profiles import DeviceProfile, clamp_to_profile, load_profile
from .rss import apply_process_settings, peak_rss_mb, set_tensor_cache_slack, trim_resident_memory
from .tokens import encode, load_tokenizer
from .trainer import SCHEDULES, TrainConfig, TrainResult, accuracy, set_threads, train

log = logging.getLogger("edge_tune")


def default_lr(method: str, batch_size: int) -> float:
    """The learning rate a method trains with unless the user sets one (its own, at batch 32)."""
    m = get_method(method)
    return m.default_lr * min(1.0, batch_size / 32) if m.lr_scales_with_batch else m.default_lr


PATCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class RunRequest:
    """What a user asks of a training run: one field per `edge-tune train` flag (the same names), before
    the profile's caps and the memory plan have had their say. None means the method's or profile's default."""

    method: str = "bitfit"
    profile: str | None = None  # a shipped profile's name or a .toml path (None: the default profile)
    rank: int = 8  # LoRA rank r
    alpha: float | None = None  # LoRA alpha; the update is scaled by alpha / r (None: 2r)
    targets: tuple[str, ...] = ("q", "v")  # LoRA target linears
    batch_size: int = 32  # sentences per optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step (the plan may raise it)
    seq_len: int = 64  # tokens per sentence at most
    steps: int | None = None  # optimizer steps at most (None: the method's default_steps)
    lr: float | None = None  # peak learning rate (None: default_lr)
    eval_every: int = 100  # optimizer steps between dev evaluations
    patience: int = 5  # evaluations without improvement before stopping early
    seed: int = 0
    precision: str | None = None  # base precision fp32 | int8 | int4 (None: the profile's)
    checkpoint_every: int = 50  # optimizer steps between checkpoints to OUT.ckpt
    allow_shorter_seq: bool = False  # let the plan shorten sequences when nothing else fits
    patch_dtype: str = "fp16"  # how the deltas are stored: fp16 | fp32
    adapter_size: int = 32  # adapter bottleneck width
    adapter_placement: str = "houlsby"  # houlsby (after attention and FFN) | pfeiffer (after FFN)
    tokens: int = 16  # prompt / ptuning / prefix virtual tokens
    reparam: int = (
        128  # ptuning / prefix: hidden width of the MLP that makes them while training (prefix: 0 none)
    )
    layers: int = 2  # partial: the top layers trained
    warmup: float = 0.06  # fraction of the steps with a linear lr warmup
    schedule: str = "linear"  # lr after warmup: linear | cosine | exponential | constant
    weight_decay: float = 0.0
    layer_lr_decay: float = 1.0  # each layer down trains at this times the lr of the one above
    unfreeze_every: int = 0  # gradual unfreezing: one more layer, top-down, every N steps (0: off)
    head_init: str = "random"  # random | prototypes
    per_class: int | None = None  # labelled training examples a class at most (None: all)
    label_text: tuple[str, ...] = ()  # zeroshot: one description per label (default: the task's labels.tsv)
    threads: int | None = None  # compute threads at most (None: the profile's; never more than it allows)


@dataclass
class RunPlan:
    """How a request will run on its profile: the values used after the caps, and the memory plan."""

    request: RunRequest
    profile: DeviceProfile
    spec: MethodSpec  # the method with the rank actually used
    precision: str
    batch_size: int  # after the profile's cap
    seq_len: int  # after the profile's cap (the memory plan may shorten it further, if allowed)
    warnings: list[str]  # one per clamped request
    train_ds: Dataset
    dev_ds: Dataset
    asked: MemoryPlan  # the whole batch in one micro-batch, as asked
    memory: MemoryPlan | None  # what the run uses: the largest micro-batch that fits (None: nothing fits)
    notes: list[str]  # what the plan changed to fit
    refusal: BudgetError | None  # why nothing fits, where nothing does


def method_spec(req: RunRequest, rank: int, num_layers: int) -> MethodSpec:
    """The method and hyper-parameters a request asks for (`rank` after the profile's cap)."""
    return MethodSpec(req.method, rank=rank, alpha=req.alpha or 2.0 * rank, targets=req.targets,
                      adapter_size=req.adapter_size, placement=req.adapter_placement, tokens=req.tokens,
                      reparam=req.reparam, train_from=num_layers - req.layers)  # fmt: skip


def check_request(req: RunRequest) -> tuple[DeviceProfile, dict, list[str]]:
    """The request's profile, the sizes used under its caps and a warning per clamp; every bad value in one
    EdgeTuneError (one line)."""
    prof = load_profile(req.profile)
    num_layers = read_config(default_model_dir()).num_hidden_layers
    if not 1 <= req.layers <= num_layers:
        raise EdgeTuneError(
            f"--layers must be between 1 and the base's {num_layers} layers, got {req.layers}"
        )
    method_spec(req, max(req.rank, 1), num_layers)  # an unknown method or a bad hyper-parameter: one line
    used, warnings = clamp_to_profile(prof, batch_size=req.batch_size, rank=req.rank, seq_len=req.seq_len)
    problems = []
    if not 1 <= req.grad_accum <= used["batch_size"]:
        problems.append(
            f"--grad-accum must be between 1 and the batch size ({used['batch_size']}), got {req.grad_accum}"
        )
    checks = {"--steps": req.steps, "--eval-every": req.eval_every, "--patience": req.patience,
              "--checkpoint-every": req.checkpoint_every, "--threads": req.threads}  # fmt: skip
    problems += [f"{k} must be at least 1, got {v}" for k, v in checks.items() if v is not None and v < 1]
    if req.lr is not None and not (math.isfinite(req.lr) and req.lr > 0):
        problems.append(f"--lr must be a positive number, got {req.lr}")
    if not (math.isfinite(req.warmup) and 0 <= req.warmup < 1):
        problems.append(f"--warmup must be a fraction of the steps in [0, 1), got {req.warmup}")
    if req.schedule not in SCHEDULES:
        problems.append(f"--schedule must be one of {', '.join(SCHEDULES)}, got {req.schedule!r}")
    if req.head_init not in ("random", "prototypes"):
        problems.append(f"--head-init must be random or prototypes, got {req.head_init!r}")
    if not (math.isfinite(req.weight_decay) and req.weight_decay >= 0):
        problems.append(f"--weight-decay must be 0 or more, got {req.weight_decay}")
    if not (math.isfinite(req.layer_lr_decay) and 0 < req.layer_lr_decay <= 1):
        problems.append(f"--layer-lr-decay must be in (0, 1], got {req.layer_lr_decay}")
    if req.unfreeze_every < 0:
        problems.append(f"--unfreeze-every must be 0 (off) or more steps, got {req.unfreeze_every}")
    if req.per_class is not None and req.per_class < 1:
        problems.append(f"--per-class must be at least 1, got {req.per_class}")
    if req.patch_dtype not in PATCH_DTYPES:
        problems.append(f"--patch-dtype must be one of {', '.join(PATCH_DTYPES)}, got {req.patch_dtype!r}")
    if used["seq_len"] < 3:
        problems.append(f"--seq-len must be at least 3 tokens ([CLS] word [SEP]), got {used['seq_len']}")
    if problems:
        raise EdgeTuneError("; ".join(problems))
    return prof, used, warnings


def plan_run(data: str | Path, req: RunRequest, *, checkpointing: bool = False) -> RunPlan:
    """Plan `req` on `data` before any model is loaded: the one planner behind `edge-tune train` and
    `edge-tune plan`. `asked` is the batch in one micro-batch (with `checkpointing` as given); `memory` is
    what training runs: the largest micro-batch that fits the budget (with accumulation, then
    checkpointing, then, if allowed, shorter sequences), or None with the `refusal`, naming the smallest
    budget that would fit."""
    prof, used, warnings = check_request(req)
    train_ds, dev_ds = load_task(data, seed=req.seed)
    if req.per_class is not None:
        train_ds = take_per_class(train_ds, req.per_class, req.seed)
    if req.label_text and len(req.label_text) != len(train_ds.label_names):
        raise EdgeTuneError(f"{len(req.label_text)} label descriptions for {len(train_ds.label_names)} labels "
                            f"({', '.join(train_ds.label_names)})", None, "give one --label-text per label")  # fmt: skip
    model_cfg = read_config(default_model_dir())
    spec = method_spec(req, used["rank"], model_cfg.num_hidden_layers)
    precision = req.precision or prof.precision
    batch, seq = used["batch_size"], used["seq_len"]
    data_bytes = _data_bytes(train_ds, dev_ds, seq)
    labels = len(train_ds.label_names)
    rows = None
    if spec.method.trainable(WORD_TABLE, spec):  # its optimizer state is per row the data touches
        rows = len(token_rows(encode(load_tokenizer(default_model_dir()), train_ds.texts, seq)))
    asked = plan_memory(model_cfg, spec, precision, batch, seq, checkpointing=checkpointing,
                        eval_batch=min(64, max(16, batch)), num_labels=labels, data_bytes=data_bytes,
                        table_rows=rows)  # fmt: skip
    if asked.fits(prof.memory_budget_mb):
        asked = with_tensor_cache(asked, prof.memory_budget_mb)  # spare budget buys tensor-cache slack
    memory, notes, refusal = None, [], None
    try:
        memory, notes = plan_batch_size(
            model_cfg, spec, precision, prof.memory_budget_mb, batch, seq, micro_batch=-(-batch // req.grad_accum),
            data_bytes=data_bytes, num_labels=labels, allow_shorter_seq=req.allow_shorter_seq, table_rows=rows,
        )  # fmt: skip
    except BudgetError as e:
        refusal = e
    return RunPlan(
        req, prof, spec, precision, batch, seq, warnings, train_ds, dev_ds, asked, memory, notes, refusal
    )


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
    data: str | Path,
    out: str | Path,
    request: RunRequest | None = None,
    *,
    progress: bool | None = None,
    resume: bool = False,
    on_eval: Callable[[int, float], bool] | None = None,
    **fields,
) -> AdaptResult:
    """Train a patch on `data` as `request` asks (or RunRequest's defaults with `fields` set: `adapt("sst2",
    "sst2.patch", method="lora")`) under its device profile, and write it to `out` atomically. Deltas are
    stored as `patch_dtype` (fp16: half the bytes; the reported accuracy is the stored patch's). The memory
    plan (plan_run) picks the micro-batch (with accumulation), activation checkpointing and evaluation batch
    that fit the profile's budget. The run checkpoints to `<out>.ckpt` every `checkpoint_every` steps;
    `resume` continues from there. `on_eval(step, dev_accuracy)` is called after each evaluation; True
    stops the run there (a search's pruner). Holds an exclusive lock on `out` for the whole run, so a
    second writer fails fast."""
    t0 = time.perf_counter()
    req = dataclasses.replace(request or RunRequest(), **fields)
    apply_process_settings()
    prof, _, warnings = check_request(req)  # bad values fail before anything heavy or any file
    for w in warnings:
        log.warning("warning: %s", w)
    out = Path(out)
    if out.is_dir():
        raise EdgeTuneError("is a directory", out, f"give the patch a file name, e.g. {out / 'task.patch'}")
    if not out.parent.exists():
        raise EdgeTuneError("folder does not exist", out.parent, "create it first")
    if prof.backend == "cuda" and not torch.cuda.is_available():
        log.warning(
            "warning: profile %r asks for CUDA, which this machine lacks; training on the CPU", prof.name
        )
    with output_lock(out):
        return _adapt_locked(data, out, req, prof, progress, resume, t0, on_eval)


@contextlib.contextmanager
def output_lock(out: Path):
    """An exclusive, non-blocking lock beside `out` (flock: released by the kernel even on kill -9). The lock
    file a killed run leaves blocks no one, and the next run on `out` removes it with the temp files a kill
    left mid-write."""
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
    # Holding the lock, no one else writes this patch or its checkpoint: a temp file of theirs (atomic_write's
    # `.NAME.tmp-PID-TID`) is what a killed run left mid-write. Cleared, so a kill leaves nothing behind.
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.ckpt.tmp-*")]:
        with contextlib.suppress(OSError):
            stale.unlink()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _fit(base, data, train_ds: Dataset, dev_ds: Dataset, spec: MethodSpec, cfg: TrainConfig,
         label_text: tuple[str, ...]) -> TrainResult:  # fmt: skip
    """A method made without backprop (Method.fit): its head from the base's embeddings, then evaluated."""
    descriptions = list(label_text) or label_descriptions(data, train_ds.label_names)
    base.model.reset_head(len(train_ds.label_names), cfg.seed)
    params = apply_method(base.model, spec, cfg.seed)
    spec.method.fit(base, train_ds, spec, cfg.seq_len, descriptions)
    acc = accuracy(base, dev_ds, cfg.seq_len, cfg.eval_batch_size)
    tensors = {n: p.detach().clone() for n, p in params.items()}
    return TrainResult(tensors, acc, 0, 0, peak_rss_mb(), [{"step": 0, "dev_accuracy": acc}])


def _data_bytes(train_ds, dev_ds, seq_len: int) -> int:
    """What the loaded datasets hold once tokenized (~4.5 characters a token, [CLS] and [SEP] added)."""
    texts = train_ds.texts + dev_ds.texts
    tokens = sum(min(seq_len, len(t) // 4 + 3) for t in texts)
    return dataset_bytes(len(texts), sum(map(len, texts)), tokens)


def _adapt_locked(data, out: Path, req: RunRequest, prof: DeviceProfile, progress, resume: bool,
                  t0: float, on_eval=None) -> AdaptResult:  # fmt: skip
    threads = set_threads(prof, req.threads)
    trim_resident_memory()  # the imports' unused code pages: data and base then load under the training floor
    # The plan comes before the base is loaded: a run that cannot fit is refused before any heavy work.
    run = plan_run(data, req)
    if run.memory is None:
        raise run.refusal
    plan, method = run.memory, req.method
    set_tensor_cache_slack(
        plan.tensor_cache_mb
    )  # the headroom the plan spends on speed (memory.with_tensor_cache)
    log.info(
        "memory plan for %s under %s:\n%s", method, run.profile.name, plan.table(run.profile.memory_budget_mb)
    )
    for n in run.notes:
        log.warning("%s", n)
    train_ds, dev_ds = run.train_ds, run.dev_ds
    base = load_base(precision=run.precision, num_labels=len(train_ds.label_names))
    cfg = TrainConfig(
        method=run.spec,
        batch_size=run.batch_size,
        grad_accum=plan.grad_accum,
        seq_len=plan.seq_len,
        steps=run.spec.method.default_steps if req.steps is None else req.steps,
        lr=default_lr(method, run.batch_size) if req.lr is None else req.lr,
        eval_every=req.eval_every,
        patience=req.patience,
        seed=req.seed,
        warmup=req.warmup,
        schedule=req.schedule,
        weight_decay=req.weight_decay,
        layer_lr_decay=req.layer_lr_decay,
        head_lr=default_lr("head", run.batch_size) if run.spec.method.head_lr_default else None,
        unfreeze_every=req.unfreeze_every,
        head_init=req.head_init,
        checkpointing=plan.checkpointing,
        eval_batch_size=plan.eval_batch,
        memory_budget_mb=run.profile.memory_budget_mb,
    )
    log.info(
        "training %s on %s (%d train / %d dev) under %s: base %s %.1f MB, batch %d (micro %d), seq %d tokens, "
        "%d threads, budget %d MB",
        method, data, len(train_ds), len(dev_ds), run.profile.name, run.precision, base.frozen_bytes() / 1e6,
        cfg.batch_size, plan.micro_batch, cfg.seq_len, threads, run.profile.memory_budget_mb,
    )  # fmt: skip
    ckpt = out.parent / f"{out.name}.ckpt"
    if run.spec.method.fit is not None:
        result = _fit(base, data, train_ds, dev_ds, run.spec, cfg, req.label_text)
    else:
        result = train(base, train_ds, dev_ds, cfg, progress, ckpt, resume, req.checkpoint_every, on_eval)
    if result.stop_reason:
        log.warning("warning: %s", result.stop_reason)
    dtype = PATCH_DTYPES[req.patch_dtype]
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
            "dev accuracy %.4f in fp32, %.4f as stored in %s",
            trained_acc,
            result.dev_accuracy,
            req.patch_dtype,
        )
    manifest = Manifest(
        method=method,
        hyper=run.spec.hyper(),
        label_names=train_ds.label_names,
        base_fingerprint=base.fingerprint,
        base_precision=run.precision,
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
    return AdaptResult(out, nbytes, result, run.profile, time.perf_counter() - t0, threads, run.warnings)
