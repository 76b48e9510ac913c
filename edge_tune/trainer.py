"""The training loop: AdamW on the delta parameters only, warmup + linear decay, gradient accumulation,
dev evaluation with early stopping, best-checkpoint keeping, peak RSS measured as it goes."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .base import Base
from .checkpoint import LoopState, load_checkpoint, save_checkpoint
from .data import Dataset, collate, length_grouped_batches, per_class_rows, token_rows
from .errors import EdgeTuneError
from .methods import MethodSpec, apply_method
from .model import layer_of
from .optim import AdamW, clip_grad_norm
from .profiles import DeviceProfile
from .rss import apply_process_settings, peak_rss_mb, trim_resident_memory
from .tokens import encode

log = logging.getLogger("edge_tune")


@dataclass(frozen=True)
class TrainConfig:
    method: MethodSpec
    batch_size: int = 32  # sentences per optimizer step (micro-batch x grad_accum)
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 64  # tokens per sentence at most
    steps: int = 1000  # optimizer steps at most
    lr: float = 1e-3
    warmup: float = 0.06  # fraction of steps
    schedule: str = "linear"  # after warmup: linear (to 0) | cosine (to 0) | exponential (to 1%) | constant
    weight_decay: float = 0.0  # decoupled (AdamW), on matrices only
    layer_lr_decay: float = 1.0  # encoder layer i trains at lr x decay^(L-1-i), embeddings at decay^L
    head_lr: float | None = None  # the head's (new parameters') lr; None: lr
    unfreeze_every: int = 0  # gradual unfreezing: one more layer, top-down, every N steps (0: all at once)
    head_init: str = "random"  # random | prototypes (of up to 256 training sentences a class)
    max_grad_norm: float | None = 1.0  # clip the global gradient norm of the deltas (None: no clipping)
    eval_every: int = 100  # optimizer steps between dev evaluations
    patience: int = 5  # evaluations without improvement before stopping early
    dropout: float = 0.1  # on the pooled features, before the head
    checkpointing: bool = False  # recompute each layer's activations in backward instead of keeping them
    eval_batch_size: int = 64  # sentences per inference batch during evaluation
    memory_budget_mb: float | None = None  # the watchdog stops training cleanly if peak RSS crosses this
    seed: int = 0


@dataclass
class TrainResult:
    tensors: dict[str, torch.Tensor]  # the best trainable tensors (detached copies)
    dev_accuracy: float
    steps: int  # optimizer steps run
    best_step: int
    peak_rss_mb: float
    history: list[dict] = field(default_factory=list)
    stop_reason: str = ""  # why it ended before cfg.steps, if it did
    # wall time of each optimizer step, evals excluded
    step_seconds: list[float] = field(default_factory=list)
    trained_values: int = 0  # values the optimizer stepped (a folded reparametrization's included)


def set_threads(profile: DeviceProfile, cap: int | None = None) -> int:
    """Use the profile's thread count (or `cap`, when lower), at most the cores this machine has."""
    n = max(1, min(profile.threads, cap or profile.threads, os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def accuracy(base: Base, ds: Dataset, seq_len: int = 128, batch_size: int = 64) -> float:
    tokens = encode(base.tokenizer, ds.texts, seq_len)
    probs = base.model.predict_proba([tokens[i] for i in range(len(tokens))], batch_size)
    return (probs.argmax(-1) == torch.tensor(ds.labels)).float().mean().item()


MAX_NONFINITE_IN_A_ROW = 3
PROGRESS_SECONDS = 30.0  # between progress lines when stderr is not a terminal


class ProgressLines:
    """The progress bar's stand-in off a terminal: one line on stderr at the first step, then every
    PROGRESS_SECONDS and at the last step (step, loss, last dev accuracy, steps/s, time left)."""

    def __init__(self, name: str, start: int, total: int):
        self.name, self.start, self.total = name, start, total
        self.t0 = self.last = time.monotonic()

    def step(self, step: int, loss: float, dev: float | None) -> None:
        now = time.monotonic()
        if step != self.start + 1 and step != self.total and now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        left = (self.total - step) / rate if rate > 0 else 0.0
        dev_txt = f"{dev:.4f}" if dev is not None else "-"
        print(f"train {self.name}: step {step}/{self.total}, loss {loss:.4f}, dev {dev_txt}, {rate:.2f} steps/s, "
              f"{left / 60:.1f} min left", file=sys.stderr, flush=True)  # fmt: skip


SCHEDULES = ("linear", "cosine", "exponential", "constant")


def lr_factor(step: int, total: int, warmup: float, schedule: str = "linear") -> float:
    """Linear warmup over `warmup` x `total` steps, then `schedule` over the rest (step counts from 0):
    linear and cosine decay to 0, exponential to 1% of the peak, constant stays at it."""
    warm = max(1, int(total * warmup))
    if step + 1 < warm:
        return (step + 1) / warm
    t = min(1.0, (step + 1 - warm) / max(1, total - warm))  # 0 at the end of warmup, 1 at the last step
    if schedule == "linear":
        return min(1.0, max(0.0, (total - step) / max(1, total - warm)))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "exponential":
        return 0.01**t
    return 1.0


def param_groups(params: dict[str, torch.nn.Parameter], cfg: TrainConfig, num_layers: int) -> list[dict]:
    """AdamW groups: matrices decay, vectors do not; each group has an lr `scale` (layer-wise decay: the
    pretrained layers train slower the deeper they are; the head at head_lr)."""
    groups: dict[tuple, dict] = {}
    for n, p in params.items():
        i = layer_of(n)
        if n.startswith("head."):
            scale = (cfg.head_lr or cfg.lr) / cfg.lr
        elif i is not None:
            scale = cfg.layer_lr_decay ** (num_layers - 1 - i)
        elif n.startswith(("encoder.word.", "encoder.emb_ln.")):
            scale = cfg.layer_lr_decay**num_layers
        else:
            scale = 1.0
        wd = cfg.weight_decay if p.ndim > 1 else 0.0
        groups.setdefault((scale, wd), {"params": [], "scale": scale, "weight_decay": wd})["params"].append(p)
    return list(groups.values())


def unfreeze(params: dict[str, torch.nn.Parameter], step: int, every: int, num_layers: int) -> None:
    """Gradual unfreezing: before step `every`, only the top layer (and the head and anything outside the
    layers) trains; one more layer joins every `every` steps, top-down; the embeddings join last."""
    if not every:
        return
    lowest = num_layers - 1 - step // every  # the lowest layer training at this step
    for n, p in params.items():
        i = layer_of(n)
        if i is not None:
            p.requires_grad_(i >= lowest)
        elif n.startswith(("encoder.word.", "encoder.emb_ln.")):
            p.requires_grad_(lowest < 0)


def _identity(base: Base, train_ds: Dataset, dev_ds: Dataset, cfg: TrainConfig) -> dict:
    """What must match for a checkpoint to continue this run."""
    h = hashlib.sha256()
    for t, y in zip(train_ds.texts, train_ds.labels, strict=True):
        h.update(f"{y}\t{t}\n".encode())
    return {
        "config": json.loads(json.dumps(asdict(cfg))),
        "base_fingerprint": base.fingerprint,
        "base_precision": base.precision,
        "train_sha256": h.hexdigest(),
        "dev_rows": len(dev_ds),
        "threads": torch.get_num_threads(),
    }


def train(
    base: Base,
    train_ds: Dataset,
    dev_ds: Dataset,
    cfg: TrainConfig,
    progress: bool | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 50,
    on_eval: Callable[[int, float], bool] | None = None,
) -> TrainResult:
    """Train `cfg.method`'s deltas on `train_ds`, keep the best dev checkpoint, leave the model holding it.
    With `checkpoint`, the full state is saved there atomically every `checkpoint_every` steps, and with
    `resume` a run continues from it and ends bit-identical to an uninterrupted run (same threads).
    Before the first step it trims the process's code pages (rss.trim_resident_memory)."""
    apply_process_settings()
    seed_everything(cfg.seed)
    model = base.model
    model.reset_head(len(train_ds.label_names), cfg.seed)
    params = apply_method(model, cfg.method, cfg.seed)
    model.dropout.p = cfg.dropout
    model.encoder.checkpointing = cfg.checkpointing
    num_layers = len(model.encoder.layers)
    if cfg.head_init == "prototypes":
        from .methods.shots import prototype_head, set_head

        rows = per_class_rows(train_ds.labels, 256, cfg.seed)
        set_head(model, *prototype_head(base, [train_ds.texts[i] for i in rows], [train_ds.labels[i] for i in rows],
                                        len(train_ds.label_names), cfg.seq_len))  # fmt: skip
    opt = AdamW(param_groups(params, cfg, num_layers), lr=cfg.lr)
    ids = encode(base.tokenizer, train_ds.texts, cfg.seq_len)
    word = model.encoder.word.weight_full
    if word is not None and word.requires_grad:
        # A trained word table gets sparse gradients: AdamW keeps moments for the rows the data can touch
        # (its token ids and the padding id), 11.6 k of 30.5 k rows for SST-2.
        opt.rows_hint[word] = torch.from_numpy(token_rows(ids))
    labels = torch.tensor(train_ds.labels)
    micro = -(-cfg.batch_size // cfg.grad_accum)
    # With only the head trainable, the encoder runs without autograd: no activations kept, no backward.
    encoder_frozen = all(n.startswith("head.") for n in params)

    def forward(x, mask):
        if not encoder_frozen:
            return model(x, mask)
        with torch.no_grad():
            feats = model.pool(x, mask)
        return model.head(model.dropout(feats))

    rng = random.Random(cfg.seed)
    state, best = LoopState(), {}
    identity = _identity(base, train_ds, dev_ds, cfg)
    if resume and checkpoint is not None and checkpoint.is_file():
        state, best = load_checkpoint(checkpoint, identity, params, opt, rng)
        log.info("resumed from %s at step %d/%d", checkpoint, state.step, cfg.steps)
    elif resume:
        log.info("no checkpoint at %s; starting from step 0", checkpoint)

    # Loading and tokenizing are done: drop the code pages only they ran (rss.trim_resident_memory), so the
    # training steps' peak is the floor the plan counts (floor.runtime_floor_mb), not the imports' leftovers.
    trim_resident_memory()
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not show, desc=f"train {cfg.method.name}",
               unit="step", file=sys.stderr)  # fmt: skip
    # Off a terminal (a pipe, a log file, CI) a bar prints nothing useful: a line every PROGRESS_SECONDS.
    lines = ProgressLines(cfg.method.name, state.step, cfg.steps) if progress is None and not show else None
    stop_reason, step_seconds = "", []
    model.train()
    while state.step < cfg.steps:
        if not state.batches:
            state.batches = length_grouped_batches(ids.lengths(), cfg.batch_size, rng)
        rows = state.batches.pop()
        t_step = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * g["scale"] * lr_factor(state.step, cfg.steps, cfg.warmup, cfg.schedule)
        unfreeze(params, state.step, cfg.unfreeze_every, num_layers)
        loss_sum = 0.0
        # Every micro-batch is padded to the whole batch's length: with dynamic int8 activations a different
        # padded length can move attention's last bit and flip a rounding, and accumulation must give the
        # big batch's result up to the order of the gradient sums.
        padded = max(len(ids[i]) for i in rows)
        for s in range(0, len(rows), micro):
            part = rows[s : s + micro]
            logits = forward(*collate([ids[i] for i in part], length=padded))
            loss = F.cross_entropy(logits, labels[part], reduction="sum") / len(rows)
            loss.backward()
            loss_sum += loss.item()
        grads = [p for p in params.values() if p.grad is not None]
        norm = clip_grad_norm(grads, cfg.max_grad_norm or math.inf) if grads else torch.zeros(())
        finite = math.isfinite(loss_sum) and bool(torch.isfinite(norm))
        if finite:
            opt.step()
            state.nonfinite_in_a_row = 0
        else:
            state.nonfinite_in_a_row += 1
            log.warning("warning: non-finite loss or gradient at step %d; step skipped", state.step + 1)
        opt.zero_grad(set_to_none=True)
        state.step += 1
        step_seconds.append(time.perf_counter() - t_step)
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss_sum:.3f}", dev=f"{max(state.best_acc, 0):.3f}", rss_mb=f"{peak_rss_mb():.0f}"
        )
        if lines is not None:
            lines.step(state.step, loss_sum, state.history[-1]["dev_accuracy"] if state.history else None)
        if state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            stop_reason = (f"{state.nonfinite_in_a_row} non-finite steps in a row at step {state.step}; rolled back "
                           "to the best checkpoint — lower --lr")  # fmt: skip
            break
        over_budget = cfg.memory_budget_mb is not None and peak_rss_mb() > cfg.memory_budget_mb
        if over_budget:
            stop_reason = (f"memory watchdog: peak RSS {peak_rss_mb():.0f} MB crossed the {cfg.memory_budget_mb:.0f} MB "
                           f"budget at step {state.step}; stopped, keeping the best patch so far")  # fmt: skip
        if over_budget or state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            acc = accuracy(base, dev_ds, cfg.seq_len, cfg.eval_batch_size)
            state.history.append(
                {"step": state.step, "loss": loss_sum, "dev_accuracy": acc, "peak_rss_mb": peak_rss_mb()}
            )
            if acc > state.best_acc:
                state.best_acc, state.best_step, state.bad_evals = acc, state.step, 0
                best = {n: p.detach().clone() for n, p in params.items()}
            else:
                state.bad_evals += 1
                if state.bad_evals >= cfg.patience and not over_budget:
                    stop_reason = f"early stop at step {state.step}: no dev improvement in {state.bad_evals} evaluations"
                    log.info("%s", stop_reason)
                    break
            if on_eval is not None and on_eval(
                state.step, acc
            ):  # a search's pruner (search.py) stops the run
                stop_reason = f"stopped at step {state.step} by the caller (dev accuracy {acc:.4f})"
                break
            if over_budget:
                break
        if checkpoint is not None and state.step % checkpoint_every == 0 and state.step < cfg.steps:
            save_checkpoint(checkpoint, identity, state, params, best, opt, rng)
    bar.close()
    opt.state.clear()  # the moments are done with: free them before the best copy is restored and folded
    if not best:
        raise EdgeTuneError(f"training produced no usable delta ({stop_reason or 'no evaluation ran'})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best[n])
            p.requires_grad_(True)
    # Methods that train a reparametrization store what it produces (the model then holds that too).
    stored = cfg.method.method.fold(model, cfg.method, best)
    model.eval()
    return TrainResult(
        stored,
        state.best_acc,
        state.step,
        state.best_step,
        peak_rss_mb(),
        state.history,
        stop_reason,
        step_seconds,
        sum(p.numel() for p in params.values()),
    )
