"""LoRA: low-rank factors A (r, in) and B (out, r) on the targeted linears, the update (alpha / r) B A, and
the head."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..model import Classifier, QuantLinear
from .core import Method, MethodSpec, at_least_one
from .head import head_trainable

LORA_TARGETS = ("q", "k", "v", "o", "ff1", "ff2")  # attention q/k/v/output, FFN up/down


def lora_trainable(name: str, spec=None) -> bool:
    """The low-rank factors A and B, plus the head."""
    return name.endswith((".lora_A", ".lora_B")) or head_trainable(name, spec)


def lora_linears(model: Classifier, targets: tuple[str, ...]) -> dict[str, QuantLinear]:
    """The targeted linears by module name, e.g. 'encoder.layers.0.q'."""
    return {
        f"encoder.layers.{i}.{t}": getattr(layer, t)
        for i, layer in enumerate(model.encoder.layers)
        for t in targets
    }


def attach_lora(model: Classifier, spec: MethodSpec, seed: int = 0) -> None:
    """Give each targeted linear A (r, in) ~ Kaiming-uniform and B (out, r) = 0, so the untrained model
    equals the base exactly; the update is (alpha / r) * B @ A."""
    g = torch.Generator().manual_seed(seed)
    for lin in lora_linears(model, spec.targets).values():
        bound = 1.0 / math.sqrt(lin.in_features)  # kaiming_uniform_(a=sqrt(5)) as in PEFT
        lin.lora_A = nn.Parameter(torch.rand(spec.rank, lin.in_features, generator=g) * 2 * bound - bound)
        lin.lora_B = nn.Parameter(torch.zeros(lin.out_features, spec.rank))
        lin.lora_scale = spec.alpha / spec.rank


def detach_lora(model: Classifier) -> None:
    for lin in lora_linears(model, LORA_TARGETS).values():
        lin.lora_A = lin.lora_B = None
        lin.lora_scale = 0.0


def lora_shapes(model: Classifier, spec: MethodSpec) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for mod, lin in lora_linears(model, spec.targets).items():
        shapes[f"{mod}.lora_A"] = (spec.rank, lin.in_features)
        shapes[f"{mod}.lora_B"] = (lin.out_features, spec.rank)
    return shapes


def lora_saved_floats_per_token(cfg, spec: MethodSpec) -> int:
    """Each adapted linear's input (the layer input once for q, k and v) and its rank-r projection."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    t = set(spec.targets)
    n = spec.rank * len(t)
    n += D if t & {"q", "k", "v"} else 0  # the layer input, shared by q, k and v
    return n + D * ("o" in t) + D * ("ff1" in t) + F * ("ff2" in t)


def lora_check(spec: MethodSpec) -> list[str]:
    bad = [t for t in spec.targets if t not in LORA_TARGETS]
    problems = [f"unknown LoRA target(s) {bad} — use some of {', '.join(LORA_TARGETS)}"] if bad else []
    if not spec.targets:
        problems.append("LoRA needs at least one target linear")
    return problems + [p.replace("lora rank", "LoRA rank") for p in at_least_one(spec, "rank")]


def lora_bank_settings(modules: dict[str, nn.Module], names: list[str], spec: MethodSpec) -> list:
    """Activating a LoRA patch sets each adapted linear's scale, alpha / r (0 when deactivated)."""
    return [(modules[n.removesuffix(".lora_A")], "lora_scale", spec.alpha / spec.rank, 0.0)
            for n in names if n.endswith(".lora_A")]  # fmt: skip


def lora_row_terms(modules: dict[str, nn.Module], tensors: dict, spec: MethodSpec) -> dict:
    """For a mixed-patch batch: {adapted linear: (A, B, alpha / r)} of one patch."""
    return {modules[k.removesuffix(".lora_A")]: (t, tensors[k.removesuffix("A") + "B"], spec.alpha / spec.rank)
            for k, t in tensors.items() if k.endswith(".lora_A")}  # fmt: skip


METHOD = Method(
    name="lora",
    summary="low-rank factors on the targeted linears (--rank, --alpha, --targets) and the head",
    trainable=lora_trainable,
    # SST-2 dev, int8 base, batch 32, 1200 steps, r8 on q,v: lr 2e-3 0.880; 5e-3 0.797 (unstable)
    default_lr=2e-3,
    default_steps=1200,
    hyper=("rank", "alpha", "targets"),
    search=(("rank", 2, 16), ("alpha", 4.0, 64.0)),
    check=lora_check,
    row_mixable=True,
    slots=(".lora_A", ".lora_B"),
    attach=attach_lora,
    detach=detach_lora,
    slot_shapes=lora_shapes,
    saved_floats_per_token=lora_saved_floats_per_token,
    bank_settings=lora_bank_settings,
    row_terms=lora_row_terms,
)
REGISTER = (METHOD,)
