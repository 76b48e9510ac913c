"""Every edge_tune:: op: opcheck, reference agreement and gradients (input and bias only)."""

import pytest
import torch

from edge_tune import ops, quant


def _linear_inputs(precision, m=5, n_in=64, n_out=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) * 0.1
    buf = quant.quantize(w, precision)
    x = torch.randn(m, n_in, generator=g, requires_grad=True)
    b = torch.randn(n_out, generator=g, requires_grad=True)
    return x, buf["w_q"], buf["scale"], b


def encoder_layer_args(B=2, T=5, D=32, F=64, heads=2, packed=False, lora=(0, 2), lengths=None, seed=0,
                       pack_weights=True, precision="int8"):  # fmt: skip
    """ops.encoder_layer's arguments for a random layer: x padded (B, T, D) with its key mask, or `packed`
    (the real tokens of sentences of `lengths`, default all T, back to back) with the offsets; int8 weights
    (packed with int8_pack_weight unless not `pack_weights`: then empty packings) or int4 ones (D and F
    multiples of 32); a LoRA term (rank 4, two patches by row) on the linears numbered in `lora` (q, k, v,
    o, ff1, ff2 = 0..5)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [T] * B
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    if packed:
        x = torch.randn(sum(lengths), D, generator=g)
        mask_arg = torch.tensor([0, *lengths]).cumsum(0)
    else:
        x, mask_arg = torch.randn(B, T, D, generator=g), mask
    rows = x.numel() // D
    linears, terms = [], []
    for i, (o, k) in enumerate([(D, D)] * 4 + [(F, D), (D, F)]):
        q = quant.quantize(torch.randn(o, k, generator=g) * 0.3, precision)
        packing = (ops.int8_pack_weight(q["w_q"]) if pack_weights and precision == "int8"
                   else (torch.empty(0, dtype=torch.int8), torch.empty(0, dtype=torch.int32)))  # fmt: skip
        linears += [q["w_q"], *packing, q["scale"], torch.randn(o, generator=g)]
        if i in lora:
            terms += [torch.randn(8, k, generator=g) * 0.2, torch.randn(8, o, generator=g) * 0.2,
                      torch.randint(0, 2, (rows,), generator=g), torch.tensor([0, 4, 8]), torch.tensor([1.5, 0.5])]  # fmt: skip
        else:
            terms += [None] * 5
    ln = [1 + 0.1 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g)] * 2
    return x, mask_arg, packed, heads, linears, terms, ln, 1e-12


def _op_samples():
    x8, w8, s8, b8 = _linear_inputs("int8")
    x4, w4, s4, b4 = _linear_inputs("int4")
    ids = torch.tensor([[0, 3, 5], [47, 1, 0]])
    e8 = quant.quantize(torch.randn(48, 64), "int8")
    e4 = quant.quantize(torch.randn(48, 64), "int4")
    g = torch.randn(5, 48)
    qkv = [torch.randn(2, 5, 3, 8).transpose(1, 2) for _ in range(3)]  # (B, H, T, Dh), heads-transposed
    keys = torch.tensor([[True] * 5, [True, True, True, False, False]])
    A = torch.randn(4, 64, requires_grad=True)
    B = torch.randn(48, 4, requires_grad=True)
    return {
        "int8_linear": [(x8, w8, s8, b8), (x8.detach()[:1], w8, s8, None)],
        "int8_linear_dynamic": [(x8, w8, s8, b8), (x8.detach()[:0], w8, s8, None)],
        "lora_linear": [(x8, w8, s8, b8, A, B, 2.0), (x8.detach()[:1], w8, s8, None, A, B, 0.5)],
        "int4_linear": [(x4, w4, s4, b4), (x4.detach()[:0], w4, s4, None)],
        "int4_linear_dynamic": [(x4, w4, s4, b4), (x4.detach()[:0], w4, s4, None)],
        "int8_linear_grad_input": [(g, w8, s8)],
        "int8_linear_dynamic_grad_input": [(g, w8, s8), (g[:0], w8, s8)],
        "int8_pack_weight": [(w8,), (w8[:0],)],
        "int8_linear_dynamic_packed": [
            (x8.detach(), w8, *ops.int8_pack_weight(w8), s8, b8.detach()),
            (x8.detach()[:0], w8, *ops.int8_pack_weight(w8), s8, None),
        ],
        "int4_linear_grad_input": [(g, w4, s4)],
        "int8_embedding": [(ids, e8["w_q"], e8["scale"])],
        "int4_embedding": [(ids, e4["w_q"], e4["scale"])],
        "lora_linear_backward": [
            (g, x8.detach(), A.detach(), B.detach(), 2.0, torch.randn(5, 64)),
            (g[:0], x8.detach()[:0], A.detach(), B.detach(), 0.5, None),
        ],  # fmt: skip
        "lora_rows": [
            (
                g,
                x8.detach(),
                A.detach(),
                B.detach().t().contiguous(),
                torch.tensor([1, 0, 1, 1, 0]),
                torch.tensor([0, 4, 4]),
                torch.tensor([2.0, 0.5]),
            ),
            (
                g[:0],
                x8.detach()[:0],
                A.detach(),
                B.detach().t(),
                torch.tensor([], dtype=torch.long),
                torch.tensor([0, 2, 4]),
                torch.tensor([2.0, 0.5]),
            ),
        ],  # fmt: skip
        "attention": [(qkv[0], qkv[1], qkv[2], keys), (qkv[0][:0], qkv[1][:0], qkv[2][:0], keys[:0])],
        "attention_packed": [
            (*(torch.randn(7, 3, 8) for _ in range(3)), torch.tensor([0, 3, 7])),
            (*(torch.randn(0, 3, 8) for _ in range(3)), torch.tensor([0])),
        ],
        "attention_backward": [
            (torch.randn(2, 3, 5, 8), *qkv, keys),
            (torch.randn(2, 3, 5, 8), *(t.half() for t in qkv), keys),
        ],  # fmt: skip
        "half_saturated": [(torch.randn(5, 48) * 1e5,), (torch.randn(0, 7),)],
        "gelu_backward_half": [(g, ops.half_saturated(torch.randn(5, 48)))],
        "encoder_layer": [
            encoder_layer_args(),
            encoder_layer_args(packed=True, lengths=[3, 5], lora=(1,), precision="int4"),
        ],
    }


def test_every_op_has_an_opcheck_sample():
    assert set(_op_samples()) == set(ops.ALL_OPS)


@pytest.mark.parametrize("name", sorted(ops.ALL_OPS))
def test_opcheck(name):
    for args in _op_samples()[name]:
        torch.library.opcheck(ops.ALL_OPS[name], args)


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(1, 64), (2, 7, 64), (0, 64)])
def test_linear_grads_match_dequantized_reference(precision, shape):
    x, w_q, scale, b = _linear_inputs(precision, m=1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    op = ops.int8_linear if precision == "int8" else ops.int4_linear
    w = quant.dequantize_int8(w_q, scale) if precision == "int8" else quant.dequantize_int4(w_q, scale)
    y = op(x, w_q, scale, b)
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y2 = torch.nn.functional.linear(x2, w, b2)
    torch.testing.assert_close(y, y2)
    gy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), gy)
    gx2, gb2 = torch.autograd.grad(y2, (x2, b2), gy)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gb, gb2)


def test_frozen_linear_saves_no_activation():
    """The op's autograd keeps only the (already resident) quantized weight and scale, not the input."""
    x, w_q, scale, b = _linear_inputs("int8", m=32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.int8_linear(x, w_q, scale, b)
    assert saved and all(t.data_ptr() in (w_q.data_ptr(), scale.data_ptr()) for t in saved)


def test_dynamic_int8_reference_is_per_token_7bit_with_exact_zero():
    x = torch.tensor([[0.0, 1.0, -2.0, 0.5], [3.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    xu, sx, zp = ops.quantize_rows_ref(x)
    assert xu.min() >= 0 and xu.max() <= ops.ACT_LEVELS
    torch.testing.assert_close((xu - zp[:, None]) * sx[:, None], x, atol=sx.max().item() / 2, rtol=0)
    assert torch.all(((xu - zp[:, None]) * sx[:, None])[x == 0] == 0)  # zeros stay exact (padding, GELU)


def test_dynamic_int8_marks_rows_with_non_finite_inputs():
    x, w_q, scale, b = _linear_inputs("int8", m=3)
    x = x.detach().clone()
    x[1, 5] = float("inf")
    y = ops.int8_linear_dynamic(x, w_q, scale, b)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("shape", [(1, 64), (2, 7, 64), (0, 64)])
@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_lora_linear_grads_match_plain_autograd(shape, mode, monkeypatch):
    monkeypatch.setattr(ops, "DYNAMIC_GRAD", mode)
    x, w_q, scale, b = _linear_inputs("int8", m=1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), requires_grad=True)
    A = torch.randn(4, 64, requires_grad=True)
    B = torch.randn(48, 4, requires_grad=True)
    y = ops.lora_linear(x, w_q, scale, b, A, B, 1.5)
    leaves = [t.detach().clone().requires_grad_() for t in (x, b, A, B)]
    x2, b2, A2, B2 = leaves
    w = quant.dequantize_int8(w_q, scale)
    # straight-through: the forward is the quantized one, the gradients those of x @ W.T + b + s * x A^T B^T
    y2 = (
        ops.int8_linear_dynamic_ref(x2.detach(), w_q, scale, None) + b2 + (x2 @ w.t() - (x2 @ w.t()).detach())
    )
    y2 = y2 + 1.5 * (x2 @ A2.t()) @ B2.t()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, b, A, B), gy)
    want = list(torch.autograd.grad(y2, leaves, gy))
    if mode == "int8":  # the base's part of grad_x through the quantized gradient, the LoRA part as above
        g2 = gy.reshape(-1, 48)
        base = ops.int8_linear_dynamic_grad_input_ref(g2, w_q, scale) + 1.5 * (g2 @ B.detach()) @ A.detach()
        want[0] = base.reshape(x.shape)
    for g1, g2 in zip(got, want, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)


def test_dynamic_int8_backward_modes(monkeypatch):
    """fp32 mode: grad_x = grad @ dequant(W); int8 mode: the quantized-gradient op (its reference)."""
    x, w_q, scale, b = _linear_inputs("int8", m=6)
    gy = torch.randn(6, 48)
    for mode, want in (
        ("fp32", gy @ quant.dequantize_int8(w_q, scale)),
        ("int8", ops.int8_linear_dynamic_grad_input_ref(gy, w_q, scale)),
    ):
        monkeypatch.setattr(ops, "DYNAMIC_GRAD", mode)
        (gx,) = torch.autograd.grad(ops.int8_linear_dynamic(x, w_q, scale, b), (x,), gy)
        torch.testing.assert_close(gx, want, rtol=1e-4, atol=1e-4)
