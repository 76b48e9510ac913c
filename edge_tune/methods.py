"""Delta methods: which tensors train, and how LoRA factors attach. Each method's trainable-parameter rule
is one small function over parameter names; everything else (optimizer, patch contents) follows from it."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import EdgeTuneError
from .model import Classifier, QuantLinear

LORA_TARGETS = ("q", "k", "v", "o", "ff1", "ff2")  # attention q/k/v/output, FFN up/down


def head_trainable(name: str) -> bool:
    """head: the classifier only."""
    return name.startswith("head.")


def bitfit_trainable(name: str) -> bool:
    """BitFit: every bias (linear and LayerNorm), plus the head."""
    return name.endswith(".bias") or head_trainable(name)


def lora_trainable(name: str) -> bool:
    """LoRA: the low-rank factors A and B, plus the head."""
    return name.endswith((".lora_A", ".lora_B")) or head_trainable(name)


TRAINABLE: dict[str, Callable[[str], bool]] = {
    "head": head_trainable,
    "bitfit": bitfit_trainable,
    "lora": lora_trainable,
}


@dataclass(frozen=True)
class MethodSpec:
    """A method and its hyper-parameters (rank/alpha/targets matter to LoRA only)."""

    name: str
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        if self.name not in TRAINABLE:
            raise EdgeTuneError(f"unknown method {self.name!r} — use one of {', '.join(TRAINABLE)}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise EdgeTuneError(f"unknown LoRA target(s) {bad} — use some of {', '.join(LORA_TARGETS)}")
        if self.name == "lora" and self.rank < 1:
            raise EdgeTuneError(f"LoRA rank must be at least 1, got {self.rank}")

    def hyper(self) -> dict:
        if self.name != "lora":
            return {}
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def lora_linears(model: Classifier, targets: tuple[str, ...]) -> dict[str, QuantLinear]:
    """The targeted linears by module name, e.g. 'encoder.layers.0.q'."""
    return {
        f"encoder.layers.{i}.{t}": getattr(layer, t)
        for i, layer in enumerate(model.encoder.layers)
        for t in targets
    }


def attach_lora(model: Classifier, rank: int, alpha: float, targets: tuple[str, ...], seed: int = 0) -> None:
    """Give each targeted linear A (r, in) ~ Kaiming-uniform and B (out, r) = 0, so the untrained model
    equals the base exactly; the update is (alpha / r) * B @ A."""
    g = torch.Generator().manual_seed(seed)
    for lin in lora_linears(model, targets).values():
        bound = 1.0 / math.sqrt(lin.in_features)  # kaiming_uniform_(a=sqrt(5)) as in PEFT
        lin.lora_A = nn.Parameter(torch.rand(rank, lin.in_features, generator=g) * 2 * bound - bound)
        lin.lora_B = nn.Parameter(torch.zeros(lin.out_features, rank))
        lin.lora_scale = alpha / rank


def detach_lora(model: Classifier) -> None:
    for lin in lora_linears(model, LORA_TARGETS).values():
        lin.lora_A = lin.lora_B = None
        lin.lora_scale = 0.0


def apply_method(model: Classifier, spec: MethodSpec, seed: int = 0) -> dict[str, nn.Parameter]:
    """Prepare `model` for training `spec`: attach LoRA if asked, set requires_grad by the method's rule,
    and return the trainable parameters by name (what the optimizer steps and the patch stores)."""
    detach_lora(model)
    if spec.name == "lora":
        attach_lora(model, spec.rank, spec.alpha, spec.targets, seed)
    rule = TRAINABLE[spec.name]
    trainable = {}
    for name, p in model.named_parameters():
        p.requires_grad_(rule(name))
        if p.requires_grad:
            trainable[name] = p
    return trainable


_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(spec, labels): shapes}


def delta_shapes(model: Classifier, spec: MethodSpec, num_labels: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a `spec` patch holds for `model`, by the method's rule (no mutation).
    Cached per model: patch loading asks this on every load and the answer never changes."""
    cache = _SHAPES.setdefault(model, {})
    if (spec, num_labels) not in cache:
        cache[(spec, num_labels)] = _delta_shapes(model, spec, num_labels)
    return dict(cache[(spec, num_labels)])


def _delta_shapes(model: Classifier, spec: MethodSpec, num_labels: int) -> dict[str, tuple[int, ...]]:
    D = model.encoder.cfg.hidden_size
    names = {n: tuple(p.shape) for n, p in model.named_parameters() if not n.endswith((".lora_A", ".lora_B"))}
    names["head.weight"], names["head.bias"] = (num_labels, D), (num_labels,)
    if spec.name == "lora":
        for mod, lin in lora_linears(model, spec.targets).items():
            names[f"{mod}.lora_A"] = (spec.rank, lin.in_features)
            names[f"{mod}.lora_B"] = (lin.out_features, spec.rank)
    rule = TRAINABLE[spec.name]
    return {n: s for n, s in names.items() if rule(n)}
