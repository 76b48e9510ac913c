"""The method registry: every method's rule, attachment and no-op start; LoRA's specifics."""

import dataclasses
import json

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
    """The trainable parameters are the method's rule; folded, they are exactly what its patch holds (by
    name and shape), and the model is left holding them."""
    spec = MethodSpec(method, rank=4, targets=("q", "v"))
    trainable = apply_method(fresh_base.model, spec)
    assert trainable and all(spec.method.trainable(n, spec) for n in trainable)
    assert all(p.requires_grad == (n in trainable) for n, p in fresh_base.model.named_parameters())
    stored = spec.method.fold(fresh_base.model, spec, {n: p.detach().clone() for n, p in trainable.items()})
    assert {n: tuple(t.shape) for n, t in stored.items()} == delta_shapes(fresh_base.model, spec, 2)
    live = dict(fresh_base.model.named_parameters())
    assert all(torch.equal(live[n], t) for n, t in stored.items())
    if spec.method.stored is None:
        assert set(stored) == set(trainable)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_starts_as_the_base_and_detaches_cleanly(fresh_base, ids_mask, method):
    """Attached and untrained, a method changes no logit (soft prompts and fp32 weight copies: nearly none);
    another method's attach removes its slots."""
    before = logits(fresh_base, ids_mask)
    names = {n for n, _ in fresh_base.model.named_parameters()}
    apply_method(fresh_base.model, MethodSpec(method, rank=4, targets=("q", "k", "v", "o", "ff1", "ff2")))
    after = logits(fresh_base, ids_mask)
    if METHODS[method].starts_as_base:
        assert torch.equal(after, before)
    elif METHODS[method].extra_tokens(MethodSpec(method)) or method == "prefix":
        assert not torch.equal(after, before)  # the prompts are attended to from the start
    else:  # the fp32 weights are the dequantized int8 ones: only activation rounding differs
        torch.testing.assert_close(after, before, atol=0.05, rtol=0)
    apply_method(fresh_base.model, MethodSpec("head"))
    assert {n for n, _ in fresh_base.model.named_parameters()} == names
    assert fresh_base.model.encoder.prompt_encoder is None and fresh_base.model.encoder.prefix_encoder is None
    assert torch.equal(logits(fresh_base, ids_mask), before)


SPEC_FIELDS = {f.name for f in dataclasses.fields(MethodSpec)} - {"name"}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_declares_what_the_runtime_asks(method):
    m = METHODS[method]
    assert m.name == method and m.summary
    assert (m.default_lr > 0 and m.default_steps >= 1) or m.fit is not None
    assert set(m.hyper) <= SPEC_FIELDS
    spec = MethodSpec(method, rank=4, alpha=8.0, targets=("q",), adapter_size=8, placement="pfeiffer", tokens=4,
                      reparam=16, train_from=3)  # fmt: skip
    assert MethodSpec.from_hyper(method, spec.hyper()).hyper() == spec.hyper()  # the manifest round trip
    assert json.loads(json.dumps(spec.hyper())) == spec.hyper()


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
    with pytest.raises(EdgeTuneError, match="unknown adapter placement 'middle'"):
        MethodSpec("adapter", placement="middle")
    with pytest.raises(EdgeTuneError, match="adapter size must be at least 1"):
        MethodSpec("adapter", adapter_size=0)
    with pytest.raises(EdgeTuneError, match="tokens must be at most 128"):
        MethodSpec("prompt", tokens=500)
    with pytest.raises(EdgeTuneError, match="ptuning reparam must be at least 1"):
        MethodSpec("ptuning", reparam=0)
    MethodSpec("bitfit", targets=("qq",))  # not LoRA: its targets mean nothing to BitFit


TOY = '''"""LayerNorm tuning: every LayerNorm's gain and bias, and the head."""

from edge_tune.methods.core import Method
from edge_tune.methods.head import head_trainable


def ln_trainable(name, spec=None):
    return ".ln" in name or "emb_ln" in name or head_trainable(name)


REGISTER = (Method(name="lntune", summary="LayerNorm gains and biases, and the head", trainable=ln_trainable,
                   default_lr=1e-2, default_steps=300),)
'''


def test_a_new_method_is_one_file(tmp_path, monkeypatch, base_int8, ids_mask):
    """A toy method written as one module in the package's folder is found by the registry and runs through
    the planner, training and a bank swap with no other edit."""
    import copy

    from edge_tune import methods
    from edge_tune.bank import PatchBank
    from edge_tune.memory import plan_memory
    from edge_tune.methods import core
    from edge_tune.patch import Manifest, save_patch

    (tmp_path / "lntune.py").write_text(TOY)
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    monkeypatch.setattr(core, "_REGISTRY", {})
    assert "lntune" in METHODS and MethodSpec("lntune").method.summary.startswith("LayerNorm")
    spec = MethodSpec("lntune")
    b = copy.deepcopy(base_int8)
    params = apply_method(b.model, spec)
    assert set(params) == set(delta_shapes(b.model, spec, 2)) and len(params) == 2 * 13 + 2
    plan = plan_memory(b.config, spec, "int8", 16, 64)
    assert plan.trainable_mb > 0 and plan.activations_mb > 0
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01)
    tensors = {n: p.detach().clone() for n, p in params.items()}
    m = Manifest("lntune", spec.hyper(), ["0", "1"], b.fingerprint, "int8", "", task="toy", seq_len=64)
    save_patch(tmp_path / "toy.patch", tensors, m)
    bank = PatchBank(copy.deepcopy(base_int8))
    bank.activate(bank.load(tmp_path / "toy.patch"))
    assert torch.equal(logits(bank.base, ids_mask), logits(b, ids_mask))
