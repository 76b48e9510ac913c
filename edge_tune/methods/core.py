"""The method protocol (`Method`), the request for one (`MethodSpec`), the registry and the functions every
method shares: attach a method to a model, and name the tensors its patch holds."""

from __future__ import annotations

import dataclasses
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


def _no_problems(spec: MethodSpec) -> list[str]:
    return []


def _as_trained(model: Classifier, spec: MethodSpec, tensors: dict) -> dict:
    return tensors


def _every_layer(cfg, spec: MethodSpec) -> int:
    return cfg.num_hidden_layers


def _none(*_) -> int:
    return 0


@dataclass(frozen=True)
class Method:
    """One delta method: everything the rest of the runtime needs to know about it."""

    name: str
    summary: str  # one line, for --help and the docs
    trainable: Callable[[str, MethodSpec], bool]  # the trainable-parameter rule, over parameter names
    default_lr: float  # at batch 32
    default_steps: int
    # how its passes run, for `edge-tune doctor`: which kernels serve it, where torch's own ops stand in
    runs_on: str = "the base's ops (int8 / int4 kernels where loaded)"
    # the MethodSpec fields it uses: stored in the patch manifest, validated there
    hyper: tuple[str, ...] = ()
    check: Callable[[MethodSpec], list[str]] = _no_problems  # one line per bad hyper-parameter
    # what a search (search.py) draws: (train flag / RunRequest field, low, high), log-uniform; int bounds
    # draw integers. The lr and the shared training options are drawn for every method.
    search: tuple[tuple[str, float, float], ...] = ()
    # the head (new, randomly initialised) trains at head's default lr, not this method's own (which suits
    # pretrained weights: partial, full)
    head_lr_default: bool = False
    lr_scales_with_batch: bool = False  # the default lr falls linearly with batches under 32
    # False: only the head trains; the encoder runs without autograd, saves nothing
    trains_encoder: bool = True
    # attached and untrained, it changes no logit (False: soft prompts, fp32 weight copies)
    starts_as_base: bool = True
    # trains fp32 copies of the base's weights (partial, full): the floor probe leaves it out
    dense: bool = False
    row_mixable: bool = False  # PatchBank can run its patches with others' in one pass, row by row
    slots: tuple[str, ...] = ()  # suffixes of the parameters it adds to the model (not the base's own)
    attach: Callable[[Classifier, MethodSpec, int], None] = _nothing  # add the slots, initialised (seed)
    detach: Callable[[Classifier], None] = _nothing  # remove them
    slot_shapes: Callable[[Classifier, MethodSpec], dict[str, tuple[int, ...]]] = _no_slots
    # the memory plan's term: fp32 values per token one encoder layer saves for backward beyond what a
    # trained encoder layer saves anyway (memory.saved_floats_per_token)
    saved_floats_per_token: Callable[[object, MethodSpec], int] = _no_saves
    saved_floats_per_sentence: Callable[[object, MethodSpec], int] = _no_saves  # the same, per sentence
    # what activating a patch sets besides re-pointing its tensors: (object, attribute, value, default)
    bank_settings: Callable[[dict[str, nn.Module], list[str], MethodSpec], list] = _no_settings
    # a mixed-patch batch's per-linear terms: {linear: (A, B, scale)} (lora), where row_mixable needs them
    row_terms: Callable[[dict[str, nn.Module], dict, MethodSpec], dict[QuantLinear, tuple]] | None = None
    # Methods that train a reparametrization (P-tuning's prompt encoder, prefix tuning's MLP) store its
    # output instead: `stored` is the rule over the patch's names (None: `trainable`), `fold` turns the
    # trained tensors into the stored ones and leaves the model holding them, `reparam_values` counts the
    # trained values the patch does not hold (for the memory plan).
    stored: Callable[[str, MethodSpec], bool] | None = None
    fold: Callable[[Classifier, MethodSpec, dict], dict] = _as_trained
    reparam_values: Callable[[object, MethodSpec], int] = _none
    extra_tokens: Callable[[MethodSpec], int] = _none  # tokens it adds to every sequence (soft prompts)
    trained_layers: Callable[[object, MethodSpec], int] = _every_layer  # top layers that save activations
    # Methods made without backprop (zero- and few-shot): fit(base, train_ds, spec, seed) sets the deltas.
    fit: Callable | None = None

    def stores(self, name: str, spec: MethodSpec) -> bool:
        """Whether a patch of this method holds tensor `name`."""
        return (self.stored or self.trainable)(name, spec)


_REGISTRY: dict[str, Method] = {}


def _registry() -> dict[str, Method]:
    """Every module of this package that defines `REGISTER` (a tuple of Methods) contributes them, modules
    in name order: adding a method is adding a file."""
    if not _REGISTRY:
        import importlib
        import pkgutil

        from .. import methods

        for info in sorted(pkgutil.iter_modules(methods.__path__), key=lambda i: i.name):
            module = importlib.import_module(f"{methods.__name__}.{info.name}")
            for m in getattr(module, "REGISTER", ()):
                if m.name in _REGISTRY:
                    raise EdgeTuneError(f"two methods named {m.name!r} ({info.name}.py and another module)")
                _REGISTRY[m.name] = m
    return _REGISTRY


class _Methods:
    """METHODS: the registry, read-only (modules in name order, each module's methods in its order)."""

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
    """A method and its hyper-parameters. Each method uses the fields it names in `Method.hyper` (those go
    in the patch manifest); the others keep their defaults and mean nothing to it."""

    name: str
    rank: int = 8  # lora: rank r of the factors
    alpha: float = 16.0  # lora: the update is scaled by alpha / r
    targets: tuple[str, ...] = ("q", "v")  # lora: the adapted linears
    adapter_size: int = 32  # adapter: bottleneck width
    placement: str = "houlsby"  # adapter: houlsby (after attention and FFN) | pfeiffer (after FFN only)
    tokens: int = 16  # prompt, ptuning, prefix: virtual tokens
    reparam: int = (
        128  # prefix, ptuning: hidden width of the MLP that makes them while training (prefix: 0 = none)
    )
    train_from: int = 4  # partial: layers from this index up train (0-based; `--layers k` sets L - k)

    def __post_init__(self):
        method = get_method(self.name)
        problems = method.check(self)
        if problems:
            raise EdgeTuneError("; ".join(problems))

    @property
    def method(self) -> Method:
        return METHODS[self.name]

    def hyper(self) -> dict:
        """The hyper-parameters the patch manifest stores (the method's own only)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in
                ((k, getattr(self, k)) for k in self.method.hyper)}  # fmt: skip

    @classmethod
    def from_hyper(cls, name: str, hyper: dict) -> MethodSpec:
        """The spec a manifest's method and hyper-parameters describe (KeyError / TypeError / ValueError /
        EdgeTuneError where they do not)."""
        method = get_method(name)
        kw = {}
        for k in method.hyper:
            kind = type(getattr(_DEFAULTS, k))
            v = hyper[k]
            if kind is tuple:
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise TypeError(f"{k} must be a list of names")
                kw[k] = tuple(v)
            elif kind is str:
                if not isinstance(v, str):
                    raise TypeError(f"{k} must be a string")
                kw[k] = v
            else:
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise TypeError(f"{k} must be a number")
                if kind is int and v != int(v):
                    raise ValueError(f"{k} must be a whole number")
                kw[k] = kind(v)
        return cls(name, **kw)


_DEFAULTS = MethodSpec.__new__(MethodSpec)  # the field defaults, without validation
for _f in dataclasses.fields(MethodSpec):
    object.__setattr__(_DEFAULTS, _f.name, _f.default)


def at_least_one(spec: MethodSpec, *fields: str) -> list[str]:
    """One line per field of `spec` below 1."""
    return [f"{spec.name} {f.replace('_', ' ')} must be at least 1, got {getattr(spec, f)}"
            for f in fields if getattr(spec, f) < 1]  # fmt: skip


def run_reparam(module: nn.Module, tensors: dict, prefix: str) -> tuple:
    """Fold a trained reparametrization: load `module`'s trained values from `tensors` (the names under
    `prefix`), run it without autograd; returns (its output, `tensors` less its own)."""
    import torch

    own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    with torch.no_grad():
        module.load_state_dict(own)
        out = module().detach().clone()
    return out, {k: v for k, v in tensors.items() if not k.startswith(prefix)}


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
        p.requires_grad_(rule(name, spec))
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
    return {n: s for n, s in names.items() if spec.method.stores(n, spec)}
