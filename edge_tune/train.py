"""The training loop: AdamW on the delta parameters only, warmup + linear decay, gradient accumulation,
dev evaluation with early stopping, best-checkpoint keeping, peak RSS measured as it goes."""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .base import Base
from .data import Dataset, collate, encode, length_grouped_batches
from .memory import peak_rss_mb
from .methods import MethodSpec, apply_method
from .profiles import DeviceProfile

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
    weight_decay: float = 0.0
    eval_every: int = 100  # optimizer steps between dev evaluations
    patience: int = 5  # evaluations without improvement before stopping early
    dropout: float = 0.1  # on the pooled features, before the head
    seed: int = 0


@dataclass
class TrainResult:
    tensors: dict[str, torch.Tensor]  # the best trainable tensors (detached copies)
    dev_accuracy: float
    steps: int  # optimizer steps run
    best_step: int
    peak_rss_mb: float
    history: list[dict] = field(default_factory=list)


def set_threads(profile: DeviceProfile) -> int:
    """Use the profile's thread count, capped by the cores this machine has."""
    n = max(1, min(profile.threads, os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def accuracy(base: Base, ds: Dataset, seq_len: int = 128) -> float:
    tokens = encode(base.tokenizer, ds.texts, seq_len)
    probs = base.model.predict_proba([tokens[i] for i in range(len(tokens))])
    return (probs.argmax(-1) == torch.tensor(ds.labels)).float().mean().item()


def train(
    base: Base, train_ds: Dataset, dev_ds: Dataset, cfg: TrainConfig, progress: bool | None = None
) -> TrainResult:
    """Train `cfg.method`'s deltas on `train_ds`, keep the best dev checkpoint, leave the model holding it."""
    seed_everything(cfg.seed)
    model = base.model
    model.reset_head(len(train_ds.label_names), cfg.seed)
    params = apply_method(model, cfg.method, cfg.seed)
    model.dropout.p = cfg.dropout
    decay = [p for n, p in params.items() if p.ndim > 1]
    no_decay = [p for n, p in params.items() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    warm = max(1, int(cfg.steps * cfg.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm)))
    )
    ids = encode(base.tokenizer, train_ds.texts, cfg.seq_len)
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
    batches: list[list[int]] = []

    def next_rows() -> list[int]:
        if not batches:
            batches.extend(length_grouped_batches(ids.lengths(), cfg.batch_size, rng))
        return batches.pop()

    best = {"acc": -1.0, "step": 0, "tensors": {}}
    history, bad_evals, step = [], 0, 0
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(
        total=cfg.steps, disable=not show, desc=f"train {cfg.method.name}", unit="step", file=sys.stderr
    )
    model.train()
    for step in range(1, cfg.steps + 1):
        rows = next_rows()
        loss_sum = 0.0
        for s in range(0, len(rows), micro):
            part = rows[s : s + micro]
            logits = forward(*collate([ids[i] for i in part]))
            loss = F.cross_entropy(logits, labels[part], reduction="sum") / len(rows)
            loss.backward()
            loss_sum += loss.item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss_sum:.3f}", dev=f"{max(best['acc'], 0):.3f}", rss_mb=f"{peak_rss_mb():.0f}"
        )
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = accuracy(base, dev_ds, cfg.seq_len)
            history.append(
                {"step": step, "loss": loss_sum, "dev_accuracy": acc, "peak_rss_mb": peak_rss_mb()}
            )
            if acc > best["acc"]:
                best = {
                    "acc": acc,
                    "step": step,
                    "tensors": {n: p.detach().clone() for n, p in params.items()},
                }
                bad_evals = 0
            else:
                bad_evals += 1
                if bad_evals >= cfg.patience:
                    log.info("early stop at step %d: no dev improvement in %d evaluations", step, bad_evals)
                    break
    bar.close()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best["tensors"][n])
    model.eval()
    return TrainResult(best["tensors"], best["acc"], step, best["step"], peak_rss_mb(), history)
