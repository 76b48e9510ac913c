"""Partial and full fine-tuning. `partial` trains the top layers (`--layers k`) in fp32 while the layers
below stay quantized and frozen: those layers' linears get an fp32 copy of their weight (`weight_full`,
which replaces the quantized one), and their biases and LayerNorms train too; the patch holds those layers
(weights fp16 by default) and its manifest says from which layer. `full` trains every weight: all layers,
the word embeddings and the embeddings' LayerNorm (position and token-type embeddings stay frozen). Both
can unfreeze gradually (trainer.TrainConfig.unfreeze_every)."""

from __future__ import annotations

from torch import nn

from ..model import Classifier, QuantLinear, layer_of
from ..quant import dequantize
from .core import Method, MethodSpec
from .head import head_trainable

LINEARS = ("q", "k", "v", "o", "ff1", "ff2")


def partial_trainable(name: str, spec: MethodSpec) -> bool:
    """Everything in the layers from `spec.train_from` up (fp32 weights, biases, LayerNorms), and the head."""
    i = layer_of(name)
    return (i is not None and i >= spec.train_from) or head_trainable(name)


def full_trainable(name: str, spec: MethodSpec | None = None) -> bool:
    """Every parameter: layers, word embeddings, the embeddings' LayerNorm, the head."""
    return True


def _dense(buffers_of: nn.Module) -> nn.Parameter:
    buffers = dict(buffers_of.named_buffers())
    w = dequantize(buffers).float()
    # A quantized base's dequantized weight is a new tensor already: a clone would only add a transient
    # copy (47 MB for the word table); an fp32 base's is the frozen buffer itself, which must not train.
    if any(w.data_ptr() == b.data_ptr() for b in buffers.values()):
        w = w.clone()
    return nn.Parameter(w)


def _linears(model: Classifier, first: int) -> dict[str, QuantLinear]:
    return {f"encoder.layers.{i}.{t}": getattr(layer, t)
            for i, layer in enumerate(model.encoder.layers) if i >= first for t in LINEARS}  # fmt: skip


def attach_partial(model: Classifier, spec: MethodSpec, seed: int = 0) -> None:
    for lin in _linears(model, spec.train_from).values():
        lin.weight_full = _dense(lin)


def attach_full(model: Classifier, spec: MethodSpec, seed: int = 0) -> None:
    for lin in _linears(model, 0).values():
        lin.weight_full = _dense(lin)
    model.encoder.word.weight_full = _dense(model.encoder.word)


def detach_dense(model: Classifier) -> None:
    for lin in _linears(model, 0).values():
        lin.weight_full = None
    model.encoder.word.weight_full = None


def partial_shapes(model: Classifier, spec: MethodSpec) -> dict[str, tuple[int, ...]]:
    return {f"{n}.weight_full": (lin.out_features, lin.in_features)
            for n, lin in _linears(model, spec.train_from).items()}  # fmt: skip


def full_shapes(model: Classifier, spec: MethodSpec) -> dict[str, tuple[int, ...]]:
    cfg = model.encoder.cfg
    shapes = {
        f"{n}.weight_full": (lin.out_features, lin.in_features) for n, lin in _linears(model, 0).items()
    }
    return shapes | {"encoder.word.weight_full": (cfg.vocab_size, cfg.hidden_size)}


def partial_check(spec: MethodSpec) -> list[str]:
    return (
        []
        if spec.train_from >= 0
        else [f"partial: the first trained layer must be 0 or more, got {spec.train_from}"]
    )


def dense_saved_floats_per_token(cfg, spec: MethodSpec) -> int:
    """A trained layer's fp32 linears keep their inputs for the weight gradients, in fp16
    (half_saved.dense_linear): the layer input (q, k and v share it), the attention output, the FFN input
    and the GELU output."""
    return (3 * cfg.hidden_size + cfg.intermediate_size) // 2


PARTIAL = Method(
    name="partial",
    summary="the top layers trained in fp32 (--layers k), the rest quantized and frozen, and the head",
    trainable=partial_trainable,
    # SST-2 dev, int8 base, batch 32, 300 steps, top 2 layers: lr 5e-5 (head 2e-3) 0.8234 (one run)
    default_lr=5e-5,
    default_steps=1200,
    head_lr_default=True,
    hyper=("train_from",),
    search=(("layers", 1, 4),),
    check=partial_check,
    starts_as_base=False,
    dense=True,
    slots=(".weight_full",),
    attach=attach_partial,
    detach=detach_dense,
    slot_shapes=partial_shapes,
    saved_floats_per_token=dense_saved_floats_per_token,
    trained_layers=lambda cfg, spec: max(0, cfg.num_hidden_layers - spec.train_from),
    runs_on="the frozen layers on the base's ops; the trained layers' linears through torch's fp32 linear (MKL)",
)

FULL = Method(
    name="full",
    summary="every weight trained in fp32 (fine-tuning), and the head",
    trainable=full_trainable,
    default_lr=5e-5,
    default_steps=1200,
    head_lr_default=True,
    starts_as_base=False,
    dense=True,
    slots=(".weight_full",),
    attach=attach_full,
    detach=detach_dense,
    slot_shapes=full_shapes,
    saved_floats_per_token=dense_saved_floats_per_token,
    runs_on="every linear and the embeddings through torch's fp32 ops (MKL); attention and LayerNorm kernels stay",
)

REGISTER = (PARTIAL, FULL)
