"""The method protocol (`Method`), the request for one (`MethodSpec`), the registry and the functions every
method shares: attach a method to a model, and name the tensors its patch holds."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import EdgeTuneError
from ..model import Classifier, QuantLinear


def _nothing(*_) -> None:
    return None


def _no_slots(model: Classifier, spec: MethodSpec) -> dict[str, tuple[int, ...]]:
    return {}


def _no_saves(cfg, spec: MethodSpec) -> int:
    return 0


def _no_settings(modules: dict[str, nn.Module], names: list[str], spec: MethodSpec) -> list:
    return []


@dataclass(frozen=True)
class Method:
    """One delta method: everything the rest of the runtime needs to know about it."""

    name: str
    summary: str  # one line, for --help and the docs
    trainable: Callable[[str], bool]  # the trainable-parameter rule, over parameter names
    default_lr: float  # at batch 32
    default_steps: int
    hyper: tuple[
        str, ...
    ] = ()  # the MethodSpec fields it uses: stored in the patch manifest, validated there
    lr_scales_with_batch: bool = False  # the default lr falls linearly with batches under 32
    trains_encoder: bool = (
        True  # False: only the head trains; the encoder runs without autograd, saves nothing
    )
    row_mixable: bool = False  # PatchBank can run its patches with others' in one pass, row by row
    slots: tuple[str, ...] = ()  # suffixes of the parameters it adds to the model (not the base's own)
    attach: Callable[[Classifier, MethodSpec, int], None] = _nothing  # add the slots, initialised (seed)
    detach: Callable[[Classifier], None] = _nothing  # remove them
    slot_shapes: Callable[[Classifier, MethodSpec], dict[str, tuple[int, ...]]] = _no_slots
    # the memory plan's term: fp32 values per token one encoder layer saves for backward beyond what a
    # trained encoder layer saves anyway (memory.saved_floats_per_token)
    saved_floats_per_token: Callable[[object, MethodSpec], int] = _no_saves
    # what activating a patch sets besides re-pointing its tensors: (object, attribute, value, default)
    bank_settings: Callable[[dict[str, nn.Module], list[str], MethodSpec], list] = _no_settings
    # a mixed-patch batch's per-linear terms: {linear: (A, B, scale)} (lora), where row_mixable needs them
    row_terms: Callable[[dict[str, nn.Module], dict, MethodSpec], dict[QuantLinear, tuple]] | None = None


_REGISTRY: dict[str, Method] = {}


def _registry() -> dict[str, Method]:
    if not _REGISTRY:
        from . import bitfit, head, ia3, lora

        _REGISTRY.update({m.name: m for m in (head.METHOD, bitfit.METHOD, lora.METHOD, ia3.METHOD)})
    return _REGISTRY


class _Methods:
    """METHODS: the registry, read-only, in the order the methods are listed in --help."""

    def __getitem__(self, name: str) -> Method:
        return _registry()[name]

    def __iter__(self):
        return iter(_registry())

    def __contains__(self, name: object) -> bool:
        return name in _registry()

    def __len__(self) -> int:
        return len(_registry())

    def values(self):
        return _registry().values()


METHODS = _Methods()


def get_method(name: str) -> Method:
    """The registered method `name`, or a one-line EdgeTuneError naming the ones there are."""
    if name not in METHODS:
        raise EdgeTuneError(f"unknown method {name!r} — use one of {', '.join(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class MethodSpec:
    """A method and its hyper-parameters (rank / alpha / targets matter to the methods that name them in
    `Method.hyper`: LoRA)."""

    name: str
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        method = get_method(self.name)
        from .lora import LORA_TARGETS

        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise EdgeTuneError(f"unknown LoRA target(s) {bad} — use some of {', '.join(LORA_TARGETS)}")
        if "rank" in method.hyper and self.rank < 1:
            raise EdgeTuneError(f"LoRA rank must be at least 1, got {self.rank}")

    @property
    def method(self) -> Method:
        return METHODS[self.name]

    def hyper(self) -> dict:
        """The hyper-parameters the patch manifest stores (the method's own only)."""
        values = {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}
        return {k: values[k] for k in self.method.hyper}

    @classmethod
    def from_hyper(cls, name: str, hyper: dict) -> MethodSpec:
        """The spec a manifest's method and hyper-parameters describe (KeyError / TypeError / ValueError /
        EdgeTuneError where they do not)."""
        method = get_method(name)
        kw = {}
        if "rank" in method.hyper:
            kw["rank"] = int(hyper["rank"])
        if "alpha" in method.hyper:
            kw["alpha"] = float(hyper["alpha"])
        if "targets" in method.hyper:
            kw["targets"] = tuple(hyper["targets"])
        return cls(name, **kw)


def detach_all(model: Classifier) -> None:
    """Remove every method's slots: the bare base with its own biases, LayerNorms and head."""
    for m in METHODS.values():
        m.detach(model)


def apply_method(model: Classifier, spec: MethodSpec, seed: int = 0) -> dict[str, nn.Parameter]:
    """Prepare `model` for training `spec`: its slots attached (and any other method's removed),
    requires_grad set by its rule; returns the trainable parameters by name (what the optimizer steps and the
    patch stores)."""
    detach_all(model)
    spec.method.attach(model, spec, seed)
    rule = spec.method.trainable
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
    slots = tuple(s for m in METHODS.values() for s in m.slots)
    names = {n: tuple(p.shape) for n, p in model.named_parameters() if not (slots and n.endswith(slots))}
    names["head.weight"], names["head.bias"] = (num_labels, D), (num_labels,)
    names |= spec.method.slot_shapes(model, spec)
    return {n: s for n, s in names.items() if spec.method.trainable(n)}
