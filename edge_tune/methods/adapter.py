"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): a small
down-projection, ReLU and up-projection added to a sublayer's output before its residual sum, and the
head. Houlsby placement adapts both sublayers (after attention's output projection and after the FFN);
Pfeiffer placement (Pfeiffer et al. 2021) the FFN only. The up-projection starts at zero, so the untrained
patch is the base exactly."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..model import Classifier, QuantLinear
from .core import Method, MethodSpec, at_least_one
from .head import head_trainable

PLACEMENTS = {"houlsby": ("o", "ff2"), "pfeiffer": ("ff2",)}  # the linears whose outputs are adapted
SLOTS = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")


def adapter_trainable(name: str, spec: MethodSpec | None = None) -> bool:
    """The adapters' projections and biases, plus the head."""
    return name.rpartition(".")[2] in SLOTS or head_trainable(name)


def _adapted(model: Classifier, placement: str) -> dict[str, QuantLinear]:
    return {f"encoder.layers.{i}.{t}": getattr(layer, t)
            for i, layer in enumerate(model.encoder.layers) for t in PLACEMENTS[placement]}  # fmt: skip


def adapter_check(spec: MethodSpec) -> list[str]:
    problems = at_least_one(spec, "adapter_size")
    if spec.placement not in PLACEMENTS:
        problems.append(f"unknown adapter placement {spec.placement!r} — use {' or '.join(PLACEMENTS)}")
    return problems


def attach_adapter(model: Classifier, spec: MethodSpec, seed: int = 0) -> None:
    """Down-projection Kaiming-uniform (as PEFT's LoRA A), up-projection and biases zero."""
    g = torch.Generator().manual_seed(seed)
    m = spec.adapter_size
    for lin in _adapted(model, spec.placement).values():
        bound = 1.0 / math.sqrt(lin.out_features)
        lin.adapter_down = nn.Parameter(torch.rand(m, lin.out_features, generator=g) * 2 * bound - bound)
        lin.adapter_down_bias = nn.Parameter(torch.zeros(m))
        lin.adapter_up = nn.Parameter(torch.zeros(lin.out_features, m))
        lin.adapter_up_bias = nn.Parameter(torch.zeros(lin.out_features))


def detach_adapter(model: Classifier) -> None:
    for lin in _adapted(model, "houlsby").values():
        for slot in SLOTS:
            setattr(lin, slot, None)


def adapter_shapes(model: Classifier, spec: MethodSpec) -> dict[str, tuple[int, ...]]:
    m, shapes = spec.adapter_size, {}
    for mod, lin in _adapted(model, spec.placement).items():
        n = lin.out_features
        shapes |= {f"{mod}.adapter_down": (m, n), f"{mod}.adapter_down_bias": (m,),
                   f"{mod}.adapter_up": (n, m), f"{mod}.adapter_up_bias": (n,)}  # fmt: skip
    return shapes


def adapter_saved_floats_per_token(cfg, spec: MethodSpec) -> int:
    """Each adapter keeps its input (the sublayer's output, fp32) and its ReLU output."""
    return len(PLACEMENTS[spec.placement]) * (cfg.hidden_size + spec.adapter_size)


METHOD = Method(
    name="adapter",
    summary="bottleneck adapters after attention and FFN (--adapter-size, --adapter-placement) and the head",
    trainable=adapter_trainable,
    # SST-2 dev, int8 base, batch 32, 300 steps, size 32 houlsby: lr 2e-3 0.8394, 5e-3 0.8555 (one run each)
    default_lr=5e-3,
    default_steps=1200,
    hyper=("adapter_size", "placement"),
    search=(("adapter_size", 8, 64),),
    check=adapter_check,
    slots=tuple(f".{s}" for s in SLOTS),
    attach=attach_adapter,
    detach=detach_adapter,
    slot_shapes=adapter_shapes,
    saved_floats_per_token=adapter_saved_floats_per_token,
    runs_on="the base's ops; the bottlenecks through torch's fp32 linear",
)

REGISTER = (METHOD,)
