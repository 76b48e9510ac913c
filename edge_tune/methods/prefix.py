"""Prefix tuning / P-tuning v2 (Li and Liang 2021; Liu et al. 2022, "deep prompt tuning"): P trained key and
value vectors in front of every layer's attention, which every token attends to, and the head. While
training, the prefixes can be made by a small MLP from P input vectors (Li and Liang's reparametrization,
which steadies training; `--reparam` its hidden width, 0 for none); the patch stores the prefixes it
produced, (2, P, D) a layer, and the MLP is folded away."""

from __future__ import annotations

import torch
from torch import nn

from ..model import Classifier
from .core import Method, MethodSpec, at_least_one, run_reparam
from .head import head_trainable
from .prompt import MAX_TOKENS, vocabulary_init


def prefix_stored(name: str, spec: MethodSpec | None = None) -> bool:
    """Every layer's prefix keys and values, plus the head."""
    return name.endswith(".prefix") or head_trainable(name)


def prefix_trainable(name: str, spec: MethodSpec) -> bool:
    """The prefix MLP's parameters (or the prefixes themselves without one), plus the head."""
    if spec.reparam:
        return name.startswith("encoder.prefix_encoder.") or head_trainable(name)
    return prefix_stored(name)


def prefix_check(spec: MethodSpec) -> list[str]:
    problems = at_least_one(spec, "tokens")
    if spec.tokens > MAX_TOKENS:
        problems.append(f"prefix tokens must be at most {MAX_TOKENS}, got {spec.tokens}")
    if spec.reparam < 0:
        problems.append(f"prefix reparam must be 0 (none) or a hidden width, got {spec.reparam}")
    return problems


def _initial_prefixes(model: Classifier, spec: MethodSpec, seed: int) -> torch.Tensor:
    """(L, 2, P, D): each layer's keys and values start as that layer's k and v projections of P random
    vocabulary embeddings (so they start where the layer's own keys and values live, not at noise)."""
    x = vocabulary_init(model, spec.tokens, seed)
    with torch.no_grad():
        return torch.stack([torch.stack([layer.k(x), layer.v(x)]) for layer in model.encoder.layers]).clone()


class PrefixEncoder(nn.Module):
    """Li and Liang's reparametrization: P input vectors -> Linear -> tanh -> Linear -> every layer's keys
    and values. The last layer starts at zero and its bias at the initial prefixes."""

    def __init__(self, init: torch.Tensor, hidden: int, seed: int):
        super().__init__()
        L, _, P, D = init.shape
        self.shape = init.shape
        g = torch.Generator().manual_seed(seed + 1)
        self.embedding = nn.Parameter(torch.randn(P, D, generator=g) * 0.02)
        self.down = nn.Linear(D, hidden)
        self.up = nn.Linear(hidden, L * 2 * D)
        with torch.no_grad():
            self.down.weight.copy_(torch.randn(hidden, D, generator=g) * D**-0.5)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()
        self.base = nn.Parameter(init.clone())

    def forward(self) -> torch.Tensor:
        L, _, P, D = self.shape
        delta = self.up(torch.tanh(self.down(self.embedding)))  # (P, L * 2 * D)
        return self.base + delta.view(P, L, 2, D).permute(1, 2, 0, 3)


def attach_prefix(model: Classifier, spec: MethodSpec, seed: int = 0) -> None:
    init = _initial_prefixes(model, spec, seed)
    if spec.reparam:
        model.encoder.prefix_encoder = PrefixEncoder(init, spec.reparam, seed)
        return
    for layer, p in zip(model.encoder.layers, init, strict=True):
        layer.prefix = nn.Parameter(p.clone())


def detach_prefix(model: Classifier) -> None:
    model.encoder.prefix_encoder = None
    for layer in model.encoder.layers:
        layer.prefix = None


def prefix_shapes(model: Classifier, spec: MethodSpec) -> dict[str, tuple[int, ...]]:
    D = model.encoder.cfg.hidden_size
    return {f"encoder.layers.{i}.prefix": (2, spec.tokens, D) for i in range(len(model.encoder.layers))}


def fold_prefix(model: Classifier, spec: MethodSpec, tensors: dict) -> dict:
    """The trained MLP -> the prefixes it produces, set on the layers; without one, nothing to fold."""
    enc = model.encoder
    if enc.prefix_encoder is None:
        return tensors
    prefixes, folded = run_reparam(enc.prefix_encoder, tensors, "encoder.prefix_encoder.")
    enc.prefix_encoder = None
    for i, (layer, p) in enumerate(zip(enc.layers, prefixes, strict=True)):
        layer.prefix = nn.Parameter(p.clone(), requires_grad=False)
        folded[f"encoder.layers.{i}.prefix"] = p.clone()
    return folded


def prefix_reparam_values(cfg, spec: MethodSpec) -> int:
    """Trained values beyond the stored prefixes': the MLP and its inputs (its base is the prefixes' size)."""
    if not spec.reparam:
        return 0
    D, P, h, L = cfg.hidden_size, spec.tokens, spec.reparam, cfg.num_hidden_layers
    return P * D + (D * h + h) + (h * L * 2 * D + L * 2 * D)


def prefix_saved_floats_per_sentence(cfg, spec: MethodSpec) -> int:
    """A layer's attention keeps q, k and v in fp16 over P more rows (the prefix, and q's zero padding)."""
    return 3 * cfg.hidden_size * spec.tokens // 2


METHOD = Method(
    name="prefix",
    summary="trained keys and values in front of every layer's attention (P-tuning v2; --tokens, --reparam) "
    "and the head",
    trainable=prefix_trainable,
    # SST-2 dev, int8 base, batch 32, 300 steps, 16 tokens, MLP 128: lr 1e-2 0.8177 (one run)
    default_lr=1e-2,
    default_steps=1200,
    hyper=("tokens", "reparam"),
    search=(("tokens", 4, 32),),
    check=prefix_check,
    starts_as_base=False,
    slots=(".prefix",),
    attach=attach_prefix,
    detach=detach_prefix,
    slot_shapes=prefix_shapes,
    stored=prefix_stored,
    fold=fold_prefix,
    reparam_values=prefix_reparam_values,
    saved_floats_per_sentence=prefix_saved_floats_per_sentence,
    runs_on="the base's ops; attention kernels with P zero query rows in front (they take q, k, v of one shape)",
)

REGISTER = (METHOD,)
