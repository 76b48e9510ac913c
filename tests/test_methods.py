"""The method registry: every method's rule, attachment and no-op start; LoRA's specifics."""

import pytest
import torch
from conftest import logits

from edge_tune.errors import EdgeTuneError
from edge_tune.methods import METHODS, MethodSpec, apply_method, delta_shapes
from edge_tune.methods.bitfit import bitfit_trainable
from edge_tune.methods.head import head_trainable
from edge_tune.methods.lora import lora_trainable


def test_rules():
    assert head_trainable("head.weight") and not head_trainable("encoder.layers.0.q.bias")
    assert bitfit_trainable("encoder.layers.3.ln2.bias") and not bitfit_trainable(
        "encoder.layers.3.ln2.weight"
    )
    assert lora_trainable("encoder.layers.0.v.lora_B") and not lora_trainable("encoder.layers.0.v.bias")


@pytest.mark.parametrize("method", list(METHODS))
def test_apply_method_trains_exactly_the_rule(fresh_base, method):
    spec = MethodSpec(method, rank=4, targets=("q", "v"))
    trainable = apply_method(fresh_base.model, spec)
    assert trainable and set(trainable) == set(delta_shapes(fresh_base.model, spec, 2))
    assert all(p.requires_grad == (n in trainable) for n, p in fresh_base.model.named_parameters())
    assert {n: tuple(p.shape) for n, p in trainable.items()} == delta_shapes(fresh_base.model, spec, 2)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_starts_as_the_base_and_detaches_cleanly(fresh_base, ids_mask, method):
    """Attached and untrained, a method changes no logit; another method's attach removes its slots."""
    before = logits(fresh_base, ids_mask)
    names = {n for n, _ in fresh_base.model.named_parameters()}
    apply_method(fresh_base.model, MethodSpec(method, rank=4, targets=("q", "k", "v", "o", "ff1", "ff2")))
    assert torch.equal(logits(fresh_base, ids_mask), before)
    apply_method(fresh_base.model, MethodSpec("head"))
    assert {n for n, _ in fresh_base.model.named_parameters()} == names


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_declares_what_the_runtime_asks(method):
    m = METHODS[method]
    assert m.name == method and m.summary and m.default_lr > 0 and m.default_steps >= 1
    assert set(m.hyper) <= {"rank", "alpha", "targets"}  # MethodSpec's fields
    spec = MethodSpec(method, rank=4, alpha=8.0, targets=("q",))
    assert MethodSpec.from_hyper(method, spec.hyper()).hyper() == spec.hyper()  # the manifest round trip


def test_bitfit_counts(fresh_base):
    t = apply_method(fresh_base.model, MethodSpec("bitfit"))
    # 6 layers x (q,k,v,o: 384 + ff1: 1536 + ff2: 384 + 2 LayerNorm: 768) + embedding LayerNorm 384 + head 384*2+2
    assert sum(p.numel() for p in t.values()) == 6 * (4 * 384 + 1536 + 384 + 768) + 384 + 770


def test_untrained_lora_leaves_logits_unchanged(fresh_base, ids_mask):
    before = logits(fresh_base, ids_mask)
    apply_method(fresh_base.model, MethodSpec("lora", rank=8, targets=("q", "k", "v", "o", "ff1", "ff2")))
    assert fresh_base.model.encoder.layers[0].q.lora_A.abs().sum() > 0  # A is random, B is zero
    assert torch.equal(logits(fresh_base, ids_mask), before)


def test_bad_specs():
    with pytest.raises(EdgeTuneError, match="unknown method 'dora'"):
        MethodSpec("dora")
    with pytest.raises(EdgeTuneError, match="unknown LoRA target"):
        MethodSpec("lora", targets=("qq",))
    with pytest.raises(EdgeTuneError, match="rank must be at least 1"):
        MethodSpec("lora", rank=0)
