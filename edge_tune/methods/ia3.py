"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors that rescale the attention's keys and values and the FFN's intermediate
activation, placed as PEFT's IA3 places them on BERT (key and value outputs; the input of the FFN's down
projection), all starting at 1, plus the head. 2 x 384 + 1536 = 2304 values a layer."""

from __future__ import annotations

import torch
from torch import nn

from ..model import Classifier
from .core import Method, MethodSpec
from .head import head_trainable

OUT_SCALED = ("k", "v")  # their outputs are rescaled
IN_SCALED = ("ff2",)  # its input (the GELU output) is rescaled


def ia3_trainable(name: str, spec=None) -> bool:
    """The rescaling vectors, plus the head."""
    return name.endswith((".out_scale", ".in_scale")) or head_trainable(name, spec)


def _scaled(model: Classifier) -> dict[str, tuple[nn.Module, str, int]]:
    """Parameter name -> (linear, slot, length) of every IA3 vector."""
    found = {}
    for i, layer in enumerate(model.encoder.layers):
        for t in OUT_SCALED:
            lin = getattr(layer, t)
            found[f"encoder.layers.{i}.{t}.out_scale"] = (lin, "out_scale", lin.out_features)
        for t in IN_SCALED:
            lin = getattr(layer, t)
            found[f"encoder.layers.{i}.{t}.in_scale"] = (lin, "in_scale", lin.in_features)
    return found


def attach_ia3(model: Classifier, spec: MethodSpec, seed: int = 0) -> None:
    """Every vector starts at 1: the untrained model is the base exactly."""
    for lin, slot, n in _scaled(model).values():
        setattr(lin, slot, nn.Parameter(torch.ones(n)))


def detach_ia3(model: Classifier) -> None:
    for lin, slot, _ in _scaled(model).values():
        setattr(lin, slot, None)


def ia3_shapes(model: Classifier, spec: MethodSpec) -> dict[str, tuple[int, ...]]:
    return {name: (n,) for name, (_, _, n) in _scaled(model).items()}


def ia3_saved_floats_per_token(cfg, spec: MethodSpec) -> int:
    """Each rescaling keeps what it multiplies for its vector's gradient: k's and v's outputs and the FFN's
    intermediate activation, fp32."""
    return len(OUT_SCALED) * cfg.hidden_size + len(IN_SCALED) * cfg.intermediate_size


METHOD = Method(
    name="ia3",
    summary="vectors rescaling keys, values and the FFN's intermediate activation (IA3), and the head",
    trainable=ia3_trainable,
    # SST-2 dev, int8 base, batch 32, 300 steps: lr 5e-3 0.8337, 1e-2 0.8463 (stored fp16; one run each)
    default_lr=1e-2,
    default_steps=1200,
    slots=(".out_scale", ".in_scale"),
    attach=attach_ia3,
    detach=detach_ia3,
    slot_shapes=ia3_shapes,
    saved_floats_per_token=ia3_saved_floats_per_token,
)
REGISTER = (METHOD,)
