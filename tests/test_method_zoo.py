"""What is particular to the methods beyond head / BitFit / LoRA: prefix attention through the kernels,
folding a reparametrization away, partial training's reach, full fine-tuning's refusal, the heads made
without backprop, and the schedules (lr, layer-wise decay, gradual unfreezing)."""

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import SENTENCES, logits

from edge_tune.methods import MethodSpec, apply_method
from edge_tune.model import _attention_with_prefix
from edge_tune.trainer import TrainConfig, lr_factor, param_groups, unfreeze


@pytest.mark.parametrize("P", [1, 4, 16])
def test_prefix_attention_equals_attending_over_prefix_and_tokens(P):
    """Zero query rows in front (so the kernels take q, k, v of one shape) give exactly attention of the
    real queries over [prefix; tokens], padding masked, by torch's SDPA."""
    g = torch.Generator().manual_seed(P)
    B, T, D, H = 3, 11, 384, 12
    q, k, v = (torch.randn(B, T, D, generator=g) for _ in range(3))
    prefix = torch.randn(2, P, D, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 7:] = False  # a padded sentence
    mask[2, 2:] = False
    got = _attention_with_prefix(q, k, v, mask[:, None, None, :], prefix, H).transpose(1, 2).reshape(B, T, D)
    split = lambda t: t.view(B, -1, H, D // H).transpose(1, 2)  # noqa: E731
    kk, vv = (torch.cat([p.expand(B, P, D), t], 1) for p, t in ((prefix[0], k), (prefix[1], v)))
    keys = torch.cat([torch.ones(B, P, dtype=torch.bool), mask], 1)[:, None, None, :]
    want = F.scaled_dot_product_attention(split(q), split(kk), split(vv), attn_mask=keys)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(B, T, D), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "ptuning"])
def test_folding_the_reparametrization_keeps_every_logit(fresh_base, ids_mask, method):
    """After some (random) training of the MLP, folding it into the prefixes / prompt it produces changes no
    logit beyond float rounding, and the model no longer holds the MLP."""
    spec = MethodSpec(method, tokens=4, reparam=16)
    params = apply_method(fresh_base.model, spec, seed=0)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    before = logits(fresh_base, ids_mask)
    stored = spec.method.fold(fresh_base.model, spec, {n: p.detach().clone() for n, p in params.items()})
    enc = fresh_base.model.encoder
    assert enc.prompt_encoder is None and enc.prefix_encoder is None
    assert not any("encoder" in n and "_encoder." in n for n in stored)
    torch.testing.assert_close(logits(fresh_base, ids_mask), before, rtol=1e-5, atol=1e-5)


def test_partial_trains_only_the_top_layers_and_the_base_stays(fresh_base, ids_mask):
    """`partial` from layer 4: gradients reach layers 4-5 and the head only; the quantized weights (buffers)
    are untouched by a training step."""
    buffers = {n: b.clone() for n, b in fresh_base.model.named_buffers()}
    spec = MethodSpec("partial", train_from=4)
    params = apply_method(fresh_base.model, spec)
    assert {int(n.split(".")[2]) for n in params if n.startswith("encoder.layers.")} == {4, 5}
    assert not any(n.startswith(("encoder.word", "encoder.emb_ln")) for n in params)
    F.cross_entropy(fresh_base.model(*ids_mask), torch.tensor([int(y) for y, _ in SENTENCES])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in params.items() if "weight" in n)
    assert all(p.grad is None for n, p in fresh_base.model.named_parameters() if n not in params)
    assert all(torch.equal(b, buffers[n]) for n, b in fresh_base.model.named_buffers())


def test_full_fine_tuning_is_refused_where_the_budget_cannot_hold_it(tsv):
    from edge_tune.run import RunRequest, plan_run

    run = plan_run(tsv, RunRequest(method="full", profile="raspberry-pi-zero-2w"))
    assert run.memory is None and run.refusal is not None
    assert "full on a int8 base cannot fit 400 MB" in str(run.refusal) and "needs" in str(run.refusal)
    fits = plan_run(tsv, RunRequest(method="full", profile="raspberry-pi-4-4gb"))
    assert fits.memory is not None and fits.memory.trainable_mb > 80  # 22 M fp32 values


def test_fewshot_head_is_the_nearest_prototype_by_cosine(fresh_base):
    """The prototype head's argmax is the class whose summed unit embeddings (plus its description's, as
    PRIOR_EXAMPLES examples) point nearest the input, computed independently."""
    from edge_tune.methods.shots import PRIOR_EXAMPLES, embed, prototype_head, set_head

    texts, labels = [s for _, s in SENTENCES], [int(y) for y, _ in SENTENCES]
    descriptions = ["a negative review", "a positive review"]
    e = F.normalize(embed(fresh_base, texts), dim=1)
    d = F.normalize(embed(fresh_base, descriptions), dim=1)
    for prior in (None, descriptions):
        set_head(fresh_base.model, *prototype_head(fresh_base, texts[:6], labels[:6], 2, descriptions=prior))
        sums = torch.stack([e[:6][torch.tensor(labels[:6]) == c].sum(0) for c in (0, 1)])
        protos = F.normalize(sums + (PRIOR_EXAMPLES * d if prior else 0), dim=1)
        torch.testing.assert_close(
            F.normalize(fresh_base.model.head.weight, dim=1), protos, atol=1e-5, rtol=0
        )
        with torch.no_grad():
            assert torch.equal(
                fresh_base.model.head(embed(fresh_base, texts)).argmax(1), (e @ protos.T).argmax(1)
            )


def test_fewshot_prior_skips_bare_label_numbers():
    from edge_tune.methods.shots import informative

    assert (
        not informative(["0", "1", "-1"])
        and informative(["negative", "positive"])
        and informative(["0", "bad"])
    )


def test_zeroshot_head_is_the_nearest_description_by_cosine(fresh_base):
    from edge_tune.methods.shots import description_head, embed, set_head

    descriptions = ["a negative review", "a positive review", "a review about food"]
    set_head(fresh_base.model, *description_head(fresh_base, descriptions))
    e, d = embed(fresh_base, [s for _, s in SENTENCES]), embed(fresh_base, descriptions)
    cosine = F.normalize(e, dim=1) @ F.normalize(d, dim=1).T
    with torch.no_grad():
        assert torch.equal(fresh_base.model.head(e).argmax(1), cosine.argmax(1))


def test_lr_schedules():
    total, warmup = 100, 0.1
    for s in ("linear", "cosine", "exponential", "constant"):
        f = [lr_factor(i, total, warmup, s) for i in range(total)]
        assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0), s  # linear warmup over 10 steps
        assert all(a >= b - 1e-12 for a, b in zip(f[9:], f[10:], strict=False)), s  # never rises after warmup
    assert lr_factor(99, total, warmup, "linear") == pytest.approx(1 / 90)
    assert lr_factor(99, total, warmup, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(99, total, warmup, "exponential") == pytest.approx(0.01)
    assert lr_factor(54, total, warmup, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(99, total, warmup, "constant") == 1.0


def test_layer_lr_decay_and_gradual_unfreezing(fresh_base):
    spec = MethodSpec("full")
    params = apply_method(fresh_base.model, spec)
    cfg = TrainConfig(spec, lr=1e-4, head_lr=2e-3, layer_lr_decay=0.5, weight_decay=0.01)
    scales = {}
    for g in param_groups(params, cfg, 6):
        for p in g["params"]:
            scales[next(n for n, q in params.items() if q is p)] = (g["scale"], g["weight_decay"])
    assert scales["head.weight"] == (20.0, 0.01) and scales["head.bias"] == (20.0, 0.0)
    assert scales["encoder.layers.5.q.weight_full"] == (1.0, 0.01)
    assert scales["encoder.layers.0.q.bias"] == (0.5**5, 0.0)
    assert scales["encoder.word.weight_full"] == (0.5**6, 0.01)
    training = {}
    for step in (0, 9, 10, 55, 60):
        unfreeze(params, step, 10, 6)
        training[step] = {n.split(".")[2] if n.startswith("encoder.layers.") else n.split(".")[1]
                          for n, p in params.items() if p.requires_grad and n.startswith("encoder.")}  # fmt: skip
    assert training[0] == training[9] == {"5"} and training[10] == {"4", "5"}
    assert training[55] == {"0", "1", "2", "3", "4", "5"}
    assert training[60] == training[55] | {"word", "emb_ln"}
    assert all(p.requires_grad for n, p in params.items() if n.startswith("head."))


def test_gradual_unfreezing_run_moves_lower_layers_only_once_unfrozen(fresh_base, tiny_ds):
    from edge_tune.trainer import train

    before = {n: p.detach().clone() for n, p in fresh_base.model.named_parameters()}
    spec = MethodSpec("partial", train_from=3)
    cfg = TrainConfig(spec, batch_size=8, steps=2, lr=1e-3, eval_every=2, unfreeze_every=2)
    r = train(fresh_base, tiny_ds, tiny_ds, cfg, progress=False)
    moved = {n for n, t in r.tensors.items() if n in before and not torch.equal(t, before[n])}
    assert any(n.startswith("encoder.layers.5.") for n in moved)  # the top layer trained from step 0
    assert not any(n.startswith(("encoder.layers.3.", "encoder.layers.4.")) for n in moved)  # still frozen


def test_cli_rejects_bad_method_flags_in_one_line(tsv, tmp_path):
    for flags, says in (
        (["--method", "adapter", "--adapter-placement", "middle"], "unknown adapter placement 'middle'"),
        (["--method", "prompt", "--tokens", "0"], "prompt tokens must be at least 1"),
        (["--method", "partial", "--layers", "9"], "--layers must be between 1 and the base's 6 layers"),
        (["--method", "lora", "--schedule", "wavy"], "--schedule must be one of linear, cosine"),
        (["--method", "zeroshot", "--label-text", "bad"], "1 label descriptions for 2 labels"),
    ):
        p = subprocess.run([sys.executable, "-m", "edge_tune.cli", "train", "--data", str(tsv), "--out",
                            str(tmp_path / "x.patch"), *flags], capture_output=True, text=True)  # fmt: skip
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_partial_patch_loads_onto_a_bank_without_reloading_the_base(base_int8, tmp_path, ids_mask):
    """A partial patch (whole fp32 layers) activates by re-pointing the layers' weight slots: no base
    reload, and deactivating gives the quantized base's logits back."""
    from edge_tune.bank import PatchBank
    from edge_tune.patch import Manifest, save_patch

    b = copy.deepcopy(base_int8)
    spec = MethodSpec("partial", train_from=5)
    params = apply_method(b.model, spec)
    tensors = {n: p.detach().clone() for n, p in params.items()}
    m = Manifest("partial", spec.hyper(), ["0", "1"], b.fingerprint, "int8", "", task="p", seq_len=64)
    save_patch(tmp_path / "p.patch", tensors, m, dtype=torch.float32)
    bank = PatchBank(copy.deepcopy(base_int8))
    bare = logits(bank.base, ids_mask)
    encoder = bank.base.model.encoder
    bank.activate(bank.load(tmp_path / "p.patch"))
    assert bank.base.model.encoder is encoder and encoder.layers[5].q.weight_full is not None
    torch.testing.assert_close(logits(bank.base, ids_mask), logits(b, ids_mask), rtol=0, atol=0)
    bank.deactivate()
    assert torch.equal(logits(bank.base, ids_mask), bare)
