"""Trainable-parameter rules, LoRA attachment, and the no-op property of an untrained LoRA."""

import pytest
import torch
from conftest import logits

from edge_tune.errors import EdgeTuneError
from edge_tune.methods import (
    MethodSpec,
    apply_method,
    bitfit_trainable,
    delta_shapes,
    head_trainable,
    lora_trainable,
)


def test_rules():
    assert head_trainable("head.weight") and not head_trainable("encoder.layers.0.q.bias")
    assert bitfit_trainable("encoder.layers.3.ln2.bias") and not bitfit_trainable(
        "encoder.layers.3.ln2.weight"
    )
    assert lora_trainable("encoder.layers.0.v.lora_B") and not lora_trainable("encoder.layers.0.v.bias")


@pytest.mark.parametrize("method", ["head", "bitfit", "lora"])
def test_apply_method_trains_exactly_the_rule(fresh_base, method):
    spec = MethodSpec(method, rank=4, targets=("q", "v"))
    trainable = apply_method(fresh_base.model, spec)
    assert set(trainable) == set(delta_shapes(fresh_base.model, spec, 2))
    assert all(p.requires_grad == (n in trainable) for n, p in fresh_base.model.named_parameters())


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
