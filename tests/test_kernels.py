"""The C++ kernels of cpp_ext/ against the references of op_references.py, across shapes, dtypes and gradients; the
quantized formats against fp32 by SQNR; and the fallback when no compiler works. Kernel tests skip (with
the reason) when the kernels are off: EDGE_TUNE_KERNELS=0 runs the whole suite on the references."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_tune import ops, quant
from edge_tune.kernels import KERNELS_ENV, fallback_reason, load_kernels

LOADED = load_kernels()
needs_kernels = pytest.mark.skipif(not LOADED, reason=f"C++ kernels off: {fallback_reason()}")


def test_every_op_runs_its_kernel_unless_the_run_asked_for_references():
    """The kernel tests skip when the kernels are off, so a failed build (no ninja, no compiler) or a lost
    registration would otherwise leave a green suite that tested nothing compiled: this one fails instead.
    `EDGE_TUNE_KERNELS=0` is the one way to run the suite on the references alone."""
    if os.environ.get(KERNELS_ENV, "1") == "0":
        pytest.skip(f"{KERNELS_ENV}=0: this run tests the references alone")
    assert LOADED, f"the C++ kernels did not load: {fallback_reason()}"
    # an op whose kernel did not register would silently run its reference (CompositeExplicitAutograd)
    missing = [
        n for n in ops.ALL_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"edge_tune::{n}", "CPU")
    ]
    assert not missing, f"no CPU kernel registered for {missing}"


SHAPES = [(384, 1536), (1536, 384), (64, 96), (32, 33)]  # (in K, out N): MiniLM's, small, odd N
ROWS = [0, 1, 3, 8, 17, 300]  # direct kernels (<= 16 rows; dynamic int8: <= 4) and GEMM paths, an empty batch


def _weights(k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return w, torch.randn(n, generator=g), quant.quantize_int8(w), quant.quantize_int4(w)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * math.log10(ref.pow(2).sum().item() / max((ref - approx).pow(2).sum().item(), 1e-30))


@needs_kernels
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_linear_kernels_match_references(k, n, m):
    w, b, (q8, s8), (q4, s4) = _weights(k, n)
    x = torch.randn(m, k)
    for bias in (b, None):
        torch.testing.assert_close(ops.int8_linear(x, q8, s8, bias), ops.int8_linear_ref(x, q8, s8, bias),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
        torch.testing.assert_close(ops.int4_linear(x, q4, s4, bias), ops.int4_linear_ref(x, q4, s4, bias),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    g = torch.randn(m, n)
    torch.testing.assert_close(ops.int8_linear_grad_input(g, q8, s8), g @ quant.dequantize_int8(q8, s8),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    torch.testing.assert_close(ops.int4_linear_grad_input(g, q4, s4), g @ quant.dequantize_int4(q4, s4),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


@needs_kernels
# k not a multiple of 4: the padded panel path; 70: the row sums' vector loop and its tail
@pytest.mark.parametrize(("k", "n"), SHAPES + [(30, 17), (70, 17)])
@pytest.mark.parametrize("m", ROWS)
def test_dynamic_int8_and_lora_kernels_match_references(k, n, m):
    """The integer part is exact, so only the float epilogue may differ (by rounding order)."""
    g = torch.Generator().manual_seed(5)
    b = torch.randn(n, generator=g)
    q8, s8 = quant.quantize_int8(torch.randn(n, k, generator=g))
    x = torch.randn(m, k, generator=g)
    A, B = torch.randn(8, k, generator=g) * 0.1, torch.randn(n, 8, generator=g) * 0.1
    gy = torch.randn(m, n, generator=g)
    torch.testing.assert_close(ops.int8_linear_dynamic_grad_input(gy, q8, s8),
                               ops.int8_linear_dynamic_grad_input_ref(gy, q8, s8), rtol=1e-5, atol=1e-4)  # fmt: skip
    for bias in (b, None):
        torch.testing.assert_close(ops.int8_linear_dynamic(x, q8, s8, bias),
                                   ops.int8_linear_dynamic_ref(x, q8, s8, bias), rtol=1e-5, atol=1e-4)  # fmt: skip
        torch.testing.assert_close(ops.lora_linear(x, q8, s8, bias, A, B, 2.0),
                                   ops.lora_linear_ref(x, q8, s8, bias, A, B, 2.0), rtol=1e-5, atol=1e-4)  # fmt: skip


@needs_kernels
# k a multiple of the int4 group (32); n 17: a part-filled panel strip; n 100: a part-filled block whose
# columns unpack 16 at a time and then one by one
@pytest.mark.parametrize(("k", "n"), [(384, 1536), (1536, 384), (64, 17), (288, 100)])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("folds", [True, False])
def test_int4_dynamic_kernel_equals_its_reference(k, n, m, folds):
    """Scales that fold into int8 (quantize_int4's) and scales that do not (the group path): the same
    integers, then the same fp32 operations in the same order: bit for bit, and a row's output does not
    depend on the batch it came in."""
    w, b, _, _ = _weights(k, n, seed=4)
    q4, s4 = quant.quantize_int4(w, fold=folds)
    assert (quant.int4_as_int8(q4, s4) is not None) == folds
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2
    if m >= 3:
        x[1, 7] = float("nan")  # that row comes out NaN, the others are untouched
        x[2] = 0.0
    for bias in (b, None):
        got = ops.int4_linear_dynamic(x, q4, s4, bias)
        torch.testing.assert_close(
            got, ops.int4_linear_dynamic_ref(x, q4, s4, bias), rtol=0, atol=0, equal_nan=True
        )
    if m > 3:
        pieces = torch.cat([ops.int4_linear_dynamic(x[i : i + 3], q4, s4, b) for i in range(0, m, 3)])
        torch.testing.assert_close(
            pieces, ops.int4_linear_dynamic(x, q4, s4, b), rtol=0, atol=0, equal_nan=True
        )


@needs_kernels
@pytest.mark.parametrize("m", [1, 4, 5, 40])  # the tiles (<= 4 rows) and the panels
def test_int4_weight_that_folds_runs_as_its_int8_weight(m):
    """quantize_int4's scales fold: the int4 op gives int8_linear_dynamic's bits on the folded int8 weight
    (a group scale of 0, m = 0, folds too); a negative, NaN or off-grid scale in one row does not fold."""
    g = torch.Generator().manual_seed(11)
    q4, s4 = quant.quantize_int4(torch.randn(100, 288, generator=g))
    s4[3, 2] = 0.0
    b, x = torch.randn(100, generator=g), torch.randn(m, 288, generator=g)
    w8, u = quant.int4_as_int8(q4, s4)
    assert torch.equal(w8.float() * u[:, None], quant.dequantize_int4(q4, s4))
    assert torch.equal(ops.int4_linear_dynamic(x, q4, s4, b), ops.int8_linear_dynamic(x, w8, u, b))
    for row, bad in (
        (5, -s4[5, 1]),
        (5, float("nan")),
        (5, s4[5, 1].float() * 1.01),
        (99, s4[99, 8].float() * 1.01),
    ):
        s_bad = s4.clone()  # row 5: among 8 columns tested at once; row 99: a block's last, tested alone
        s_bad[row, 1 if row == 5 else 8] = bad
        assert quant.int4_as_int8(q4, s_bad) is None
        torch.testing.assert_close(
            ops.int4_linear_dynamic(x, q4, s_bad, b),
            ops.int4_linear_dynamic_ref(x, q4, s_bad, b),
            rtol=0,
            atol=0,
            equal_nan=True,
        )


@needs_kernels
@pytest.mark.parametrize("m", [2, 9])
def test_int4_fold_of_a_long_row(m):
    """k = 8256 (258 groups): a column's multiples and a block's scales past the kernel's stack buffers."""
    g = torch.Generator().manual_seed(12)
    q4, s4 = quant.quantize_int4(torch.randn(40, 8256, generator=g))
    x, b = torch.randn(m, 8256, generator=g), torch.randn(40, generator=g)
    w8, u = quant.int4_as_int8(q4, s4)
    assert torch.equal(ops.int4_linear_dynamic(x, q4, s4, b), ops.int8_linear_dynamic(x, w8, u, b))


@needs_kernels
def test_dynamic_int8_rows_do_not_depend_on_their_batch():
    """Few-row and many-row paths share one epilogue (no FMA contraction): a sentence's logits are the same
    whichever batch served it, and equal the reference bit for bit."""
    g = torch.Generator().manual_seed(7)
    q8, s8 = quant.quantize_int8(torch.randn(1536, 384, generator=g))
    b = torch.randn(1536, generator=g)
    x = torch.randn(40, 384, generator=g)
    whole = ops.int8_linear_dynamic(x, q8, s8, b)
    for size in (3, 13):  # <= 4 rows: the two-column tiles; more: the packed panels
        pieces = torch.cat([ops.int8_linear_dynamic(x[i : i + size], q8, s8, b) for i in range(0, 40, size)])
        assert torch.equal(whole, pieces)
    assert torch.equal(whole, ops.int8_linear_dynamic_ref(x, q8, s8, b))


@needs_kernels
@pytest.mark.parametrize(("k", "n"), SHAPES + [(385, 40), (30, 7)])
def test_packed_weight_gives_the_per_call_packing_bits(k, n):
    """int8_linear_dynamic_packed over a weight packed once (int8_pack_weight) is int8_linear_dynamic bit for
    bit, on both paths (<= 4 rows: tiles with the stored row sums; more: the stored panels), at every
    thread count, and the reference's bits; the packing is ~the weight's size, the sums its row sums."""
    g = torch.Generator().manual_seed(k * n)
    q8, s8 = quant.quantize_int8(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g)
    packed, sums = ops.int8_pack_weight(q8)
    assert torch.equal(sums[ops.PACK_HEADER :], q8.sum(1, dtype=torch.int32))
    assert (
        q8.numel() <= packed.numel() < q8.numel() + 64 * ((k + 3) // 4 * 4)
    )  # one part-filled block at most
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            for m in ROWS + [5]:
                x = torch.randn(m, k, generator=g)
                y = ops.int8_linear_dynamic_packed(x, q8, packed, sums, s8, b)
                assert torch.equal(y, ops.int8_linear_dynamic(x, q8, s8, b))
                assert torch.equal(y, ops.int8_linear_dynamic_ref(x, q8, s8, b))
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_packed_weight_of_another_weight_or_the_reference_is_refused():
    """A packing is used only with the weight and the int8 cores it was made for: one from the reference
    (no layout), one of another shape, or a damaged header is an error, never a wrong result."""
    g = torch.Generator().manual_seed(1)
    q8, s8 = quant.quantize_int8(torch.randn(384, 384, generator=g))
    other, _ = quant.quantize_int8(torch.randn(384, 96, generator=g))
    x = torch.randn(8, 384, generator=g)
    good = ops.int8_pack_weight(q8)
    damaged = good[1].clone()
    damaged[1] += 1  # another ISA's
    for packed, sums in (ops.int8_pack_weight_ref(q8), ops.int8_pack_weight(other), (good[0], damaged),
                         (good[0][:-1], good[1]), (good[0], good[1][:-1])):  # fmt: skip
        with pytest.raises(RuntimeError, match="pack it again"):
            ops.int8_linear_dynamic_packed(x, q8, packed, sums, s8, None)


@needs_kernels
@pytest.mark.parametrize(("m", "k", "n"), [(1029, 385, 40), (700, 1536, 96), (24, 384, 1536), (9, 384, 384)])
def test_dynamic_int8_split_never_changes_a_result(m, k, n):
    """The GEMM's parallel split (row chunks where x outweighs the weight, column blocks otherwise, one
    thread for little work) moves only exact integer sums: every thread count gives the reference's bits,
    remainder rows and part-filled panels included; the input gradient too; and the int4 op on folding
    scales (its blocks unfolded per task, or once for the call where rows split in chunks; 4 rows: tiles)."""
    g = torch.Generator().manual_seed(m)
    w = torch.randn(n, k, generator=g)
    q8, s8 = quant.quantize_int8(w)
    q4, s4 = quant.quantize_int4(w) if k % quant.GROUP_SIZE == 0 else (None, None)
    b = torch.randn(n, generator=g)
    x, gy = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
    want = ops.int8_linear_dynamic_ref(x, q8, s8, b)
    want4 = [ops.int4_linear_dynamic_ref(r, q4, s4, b) for r in (x, x[:4])] if q4 is not None else []
    threads = torch.get_num_threads()
    try:
        runs = []
        for t in (1, 2, 3, 4):
            torch.set_num_threads(t)
            runs.append(
                (ops.int8_linear_dynamic(x, q8, s8, b), ops.int8_linear_dynamic_grad_input(gy, q8, s8))
            )
            for r, ref in zip((x, x[:4]), want4, strict=False):  # none where k is not a multiple of 32
                assert torch.equal(ops.int4_linear_dynamic(r, q4, s4, b), ref)
    finally:
        torch.set_num_threads(threads)
    for y, gx in runs:
        assert torch.equal(y, want)
        assert torch.equal(gx, runs[0][1])


@needs_kernels
def test_dynamic_int8_kernel_handles_scaled_and_strided_inputs():
    w, b, (q8, s8), _ = _weights(384, 96)
    # the kernel and the reference are the same integer product and epilogue: equal, at every scale (the
    # 1e-30 rows are all the bias at any tolerance, so only equality of the bits says anything there)
    for x in (torch.randn(40, 768)[:, ::2] * 1e4, torch.randn(3, 384) * 1e-30, torch.zeros(20, 384)):
        assert torch.equal(
            ops.int8_linear_dynamic(x, q8, s8, None), ops.int8_linear_dynamic_ref(x, q8, s8, None)
        )
        assert torch.equal(ops.int8_linear_dynamic(x, q8, s8, b), ops.int8_linear_dynamic_ref(x, q8, s8, b))
    tiny = torch.randn(3, 384) * 1e-30  # no bias: the output is the product itself, ~1e-30 a value
    y = ops.int8_linear_dynamic(tiny, q8, s8, None)
    ref = torch.nn.functional.linear(tiny.double() * 1e30, w.double())  # SQNR's sums at a scale fp64 holds
    assert y.abs().max() > 0 and sqnr_db(ref, y.double() * 1e30) >= 30


@needs_kernels
@pytest.mark.parametrize("m", [1, 5, 40])
def test_kernel_gradients_match_reference_autograd(m):
    w, b, (q8, s8), (q4, s4) = _weights(384, 1536, seed=1)
    for op, ref, args in (
        (ops.int8_linear, ops.int8_linear_ref, (q8, s8)),
        (ops.int4_linear, ops.int4_linear_ref, (q4, s4)),
    ):
        x = torch.randn(2, m, 384, generator=torch.Generator().manual_seed(m), requires_grad=True)
        bias = b.clone().requires_grad_(True)
        op(x, *args, bias).square().sum().backward()
        got = (x.grad.clone(), bias.grad.clone())
        x.grad = bias.grad = None
        ref(x, *args, bias).square().sum().backward()
        # fp32 sums of ~1500 terms in another order: the error scales with the gradient's magnitude
        for g, want in zip(got, (x.grad, bias.grad), strict=True):
            torch.testing.assert_close(g, want, rtol=1e-3, atol=1e-5 * want.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 7), (2, 1, 5)])
def test_embedding_kernels_match_references(shape):
    _, _, (q8, s8), (q4, s4) = _weights(384, 1000)
    ids = torch.randint(0, 1000, shape)
    assert torch.equal(ops.int8_embedding(ids, q8, s8), ops.int8_embedding_ref(ids, q8, s8))
    assert torch.equal(ops.int4_embedding(ids, q4, s4), ops.int4_embedding_ref(ids, q4, s4))


@needs_kernels
@pytest.mark.parametrize(("k", "n"), [(384, 384), (1536, 384), (33, 17)])
@pytest.mark.parametrize("m", [0, 1, 63, 64, 65, 300])
@pytest.mark.parametrize("r", [1, 8, 16, 80])  # 80: above the one-pass kernel's rank limit (GEMMs)
def test_lora_kernels_match_references(k, n, m, r):
    """lora_linear, and the backward of its rank-r term in one pass over the rows (cpp_ext/cpu_lora.cpp)
    against the GEMM composition, only the float summation order differing."""
    g = torch.Generator().manual_seed(m + r)
    q8, s8 = quant.quantize_int8(torch.randn(n, k, generator=g))
    x, gy = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
    A, B = torch.randn(r, k, generator=g) * 0.1, torch.randn(n, r, generator=g) * 0.1
    torch.testing.assert_close(ops.lora_linear(x, q8, s8, None, A, B, 2.0),
                               ops.lora_linear_ref(x, q8, s8, None, A, B, 2.0), rtol=1e-5, atol=1e-4)  # fmt: skip
    base = torch.randn(m, k, generator=g)
    gx, gx_ref = base.clone(), base.clone()
    got = ops.lora_linear_backward(gy, x, A, B, 1.5, gx)
    want = ops.lora_linear_backward_ref(gy, x, A, B, 1.5, gx_ref)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))
    assert all(
        torch.equal(a, b) for a, b in zip(got, ops.lora_linear_backward(gy, x, A, B, 1.5, None), strict=True)
    )


def _lora_rows_inputs(m, k, n, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = sum(ranks)
    x, y = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
    A, Bt = torch.randn(R, k, generator=g) * 0.2, torch.randn(R, n, generator=g) * 0.2
    row_patch = torch.randint(0, len(ranks), (m,), generator=g)
    offsets = torch.tensor([0, *ranks]).cumsum(0)
    scales = torch.rand(len(ranks), generator=g) * 4
    return y, x, A, Bt, row_patch, offsets, scales


@needs_kernels
@pytest.mark.parametrize(
    ("m", "k", "n"), [(300, 384, 384), (17, 384, 1536), (5, 37, 19), (1, 8, 8), (0, 384, 384)]
)
@pytest.mark.parametrize("ranks", [[8, 8, 8, 8], [8, 0, 16, 4], [3], [5, 70]])
def test_lora_rows_kernel_matches_its_reference(m, k, n, ranks):
    """A mixed-patch pass's LoRA terms (cpp_ext/cpu_lora.cpp), each row its own patch's ranks: odd sizes,
    ranks not a multiple of 8 or above 64, a patch with no term, no rows."""
    args = _lora_rows_inputs(m, k, n, ranks)
    got, want = ops.lora_rows(*args), ops.lora_rows_ref(*args)
    assert got.shape == want.shape == (m, n) and got.is_contiguous()
    torch.testing.assert_close(
        got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item() if m else 1.0)
    )
    no_terms = ops.lora_rows(*args[:5], torch.zeros(len(ranks) + 1, dtype=torch.long), args[6])
    assert torch.equal(no_terms, args[0])


@needs_kernels
def test_lora_rows_takes_rows_in_any_leading_shape():
    """y and x as (batch, tokens, features), as a padded pass hands them over: the kernel and the reference
    (which the model runs without a compiler) give y's shape and the 2-D call's values."""
    y, x, *rest = _lora_rows_inputs(12, 40, 24, [4, 8])
    flat_kernel, flat_ref = ops.lora_rows(y, x, *rest), ops.lora_rows_ref(y, x, *rest)
    for impl, flat in ((ops.lora_rows, flat_kernel), (ops.lora_rows_ref, flat_ref)):
        got = impl(y.reshape(3, 4, 24), x.reshape(3, 4, 40), *rest)
        assert got.shape == (3, 4, 24)
        assert torch.equal(got.reshape(12, 24), flat)


@needs_kernels
def test_lora_rows_gives_a_row_the_same_bits_whatever_its_neighbours_or_threads():
    """The sums of a row depend on the row alone: alone, in another order, or on other thread counts, each
    row's result is bit for bit the batch's (a sentence's answer does not depend on who shared its pass)."""
    y, x, A, Bt, row_patch, offsets, scales = _lora_rows_inputs(203, 384, 384, [8, 16, 4, 8])
    whole = ops.lora_rows(y, x, A, Bt, row_patch, offsets, scales)
    for i in (0, 1, 2, 57, 202):
        assert torch.equal(
            ops.lora_rows(y[i : i + 1], x[i : i + 1], A, Bt, row_patch[i : i + 1], offsets, scales),
            whole[i : i + 1],
        )
    perm = torch.randperm(203, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ops.lora_rows(y[perm], x[perm], A, Bt, row_patch[perm], offsets, scales), whole[perm])
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(ops.lora_rows(y, x, A, Bt, row_patch, offsets, scales), whole)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: (*a[:4], a[4] + 5, *a[5:]), "every row_patch must name one of the patches"),
        (lambda a: (*a[:4], a[4] - 1, *a[5:]), "every row_patch must name one of the patches"),
        (lambda a: (*a[:5], a[5].flip(0), a[6]), "rank_offsets must be"),
        (lambda a: (*a[:5], a[5][:-1], a[6]), "rank_offsets must be"),
        (lambda a: (*a[:5], a[5] * 2, a[6]), "rank_offsets must be .*within A's ranks"),
    ],
)
def test_lora_rows_refuses_rows_or_ranks_it_cannot_place(impl, change, message):
    if impl == "kernel" and not LOADED:
        pytest.skip(f"C++ kernels off: {fallback_reason()}")
    y, x, A, Bt, _, offsets, scales = _lora_rows_inputs(6, 16, 8, [8, 8])
    args = change((y, x, A, Bt, torch.tensor([0, 1, 0, 1, 1, 0]), offsets, scales))
    op = ops.lora_rows if impl == "kernel" else ops.lora_rows_ref
    with pytest.raises(RuntimeError, match=message):
        op(*args)


@needs_kernels
def test_lora_backward_does_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(0)
    x, gy = torch.randn(300, 384, generator=g), torch.randn(300, 384, generator=g)
    A, B = torch.randn(8, 384, generator=g), torch.randn(384, 8, generator=g)
    threads = torch.get_num_threads()
    try:
        runs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            runs.append(ops.lora_linear_backward(gy, x, A, B, 2.0, None))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run, strict=True))


def _attention_inputs(B, T, H, Dh, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        q, k, v = (torch.randn(B, H, T, Dh, generator=g) * 2 for _ in range(3))
    else:  # as the encoder splits heads: (B, T, H * Dh) viewed and transposed
        q, k, v = (torch.randn(B, T, H, Dh, generator=g).mul(2).transpose(1, 2) for _ in range(3))
    keys = torch.ones(B, T, dtype=torch.bool)
    keys[B // 2 : B // 2 + 1, (T + 1) // 2 :] = False  # a padded sequence (none when B = 0)
    return q, k, v, keys, torch.randn(B, H, T, Dh, generator=g)


@needs_kernels
@pytest.mark.parametrize("layout", ["contiguous", "heads-transposed"])
@pytest.mark.parametrize(("B", "T", "H", "Dh"), [(16, 64, 12, 32), (2, 9, 12, 32), (3, 13, 2, 20), (1, 1, 1, 8),
                                                 (2, 130, 3, 64), (0, 5, 2, 8)])  # fmt: skip
def test_attention_kernels_match_references(B, T, H, Dh, layout):
    """cpp_ext/cpu_attention.cpp against SDPA: output and gradients within float rounding (its own exp,
    ~1 ulp; summation orders), for fp32 and fp16 saved inputs, odd sizes padded inside."""
    q, k, v, keys, g = _attention_inputs(B, T, H, Dh, layout)
    out = ops.attention(q, k, v, keys)
    torch.testing.assert_close(out, ops.attention_ref(q, k, v, keys), rtol=1e-5, atol=1e-5)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()  # (B, T, H, Dh) memory: free reshape
    for saved in (q, q.half()):
        qs, ks, vs = (t.to(saved.dtype) for t in (q, k, v))
        got, want = (
            ops.attention_backward(g, qs, ks, vs, keys),
            ops.attention_backward_ref(g, qs, ks, vs, keys),
        )
        for a, b in zip(got, want, strict=True):
            top = b.abs().amax().item() if b.numel() else 1.0
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, top))


@needs_kernels
def test_attention_rows_do_not_depend_on_the_batch_and_fully_masked_sequences_give_zeros():
    q, k, v, keys, g = _attention_inputs(6, 24, 4, 32, "heads-transposed")
    out, grads = ops.attention(q, k, v, keys), ops.attention_backward(g, q, k, v, keys)
    for i in (0, 3, 5):  # each sequence alone: the same bits
        one = slice(i, i + 1)
        assert torch.equal(ops.attention(q[one], k[one], v[one], keys[one]), out[one])
        alone = ops.attention_backward(g[one], q[one], k[one], v[one], keys[one])
        assert all(torch.equal(a, b[one]) for a, b in zip(alone, grads, strict=True))
    keys[2] = False  # no real key at all: zeros, as SDPA gives
    torch.testing.assert_close(
        ops.attention(q, k, v, keys), ops.attention_ref(q, k, v, keys), rtol=1e-5, atol=1e-5
    )
    assert (ops.attention(q, k, v, keys)[2] == 0).all()
    assert all((t[2] == 0).all() for t in ops.attention_backward(g, q, k, v, keys))


@needs_kernels
@pytest.mark.parametrize(("lengths", "H", "Dh"), [([26, 9, 41, 1, 17], 12, 32), ([3, 0, 130], 3, 64), ([5], 2, 20),
                                                  ([], 4, 8)])  # fmt: skip
def test_packed_attention_kernel_matches_its_reference_and_the_padded_op(lengths, H, Dh):
    """attention_packed (sequences back to back, as the encoder's packed inference pass holds them) against
    its reference within float rounding, and bit for bit what the padded op gives each sequence in a batch
    padded to the longest: its padding adds only zeros."""
    g = torch.Generator().manual_seed(0)
    N, D = sum(lengths), H * Dh
    q, k, v = (torch.randn(N, D, generator=g).mul(2).view(N, H, Dh) for _ in range(3))  # the encoder's views
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    out = ops.attention_packed(q, k, v, offsets)
    assert out.shape == (N, H, Dh) and out.is_contiguous()
    torch.testing.assert_close(out, ops.attention_packed_ref(q, k, v, offsets), rtol=1e-5, atol=1e-5)
    if not lengths:
        return
    B, T = len(lengths), max(lengths)
    keys = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    slots = keys.flatten().nonzero().squeeze(1)
    padded = [
        t.new_zeros(B * T, H, Dh).index_copy_(0, slots, t).view(B, T, H, Dh).transpose(1, 2)
        for t in (q, k, v)
    ]
    want = ops.attention(*padded, keys).transpose(1, 2).reshape(B * T, H, Dh)[slots]
    assert torch.equal(out, want)


@needs_kernels
@pytest.mark.parametrize(
    ("B", "T", "D", "F", "heads"), [(1, 13, 384, 1536, 12), (3, 9, 64, 96, 4), (2, 1, 32, 64, 2)]
)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("weights", ["int8 packed", "int8", "int4"])
def test_encoder_layer_kernel_matches_its_reference_on_any_thread_count(B, T, D, F, heads, packed, weights):
    """cpp_ext/cpu_encoder_layer.cpp, one layer's inference pass in one call, against its reference within
    float rounding: padded or packed, sentences of different lengths, LoRA by row on three linears, int8
    weights packed or not, int4 weights; and bit for bit the same on 1, 2 and 3 threads."""
    # imported here: a subprocess below imports this file as tests.test_kernels, where test_ops is not found
    from test_ops import encoder_layer_args

    lengths = [T - i * T // (B + 1) for i in range(B)]
    args = encoder_layer_args(B, T, D, F, heads, packed, lora=(0, 2, 5), lengths=lengths,
                              pack_weights=weights == "int8 packed", precision=weights.split()[0])  # fmt: skip
    got = ops.encoder_layer(*args)
    want = ops.encoder_layer_ref(*args)
    assert got.shape == args[0].shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(ops.encoder_layer(*args), got)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("change", "message"),
    [(lambda a: a[4].pop(), "linears must hold 30"), (lambda a: a[5].append(None), "lora must hold 30"),
     (lambda a: a[6].pop(), "ln must hold"), (lambda a: a.__setitem__(3, 5), "5 heads do not divide")],
)  # fmt: skip
@needs_kernels
def test_encoder_layer_kernel_refuses_arguments_it_cannot_place(change, message):
    from test_ops import encoder_layer_args

    args = list(encoder_layer_args())
    change(args)
    with pytest.raises(RuntimeError, match=message):
        ops.encoder_layer(*args)


def test_packed_attention_refuses_offsets_that_do_not_cover_the_tokens():
    q = torch.zeros(6, 2, 8)
    for bad in ([0, 4], [1, 6], [0, 4, 3, 6]):
        with pytest.raises(RuntimeError, match="offsets"):
            ops.attention_packed(q, q, q, torch.tensor(bad))


def _half_saved_check(h: torch.Tensor, g: torch.Tensor) -> None:
    """The fp16-saved activation ops against their references: the saturating conversion bit-exact, GELU's
    gradient within 2e-6 (A&S erf and a Cephes exp against torch's own; measured <= 1e-6 over N(0, 3^2))."""
    h16 = ops.half_saturated(h)
    torch.testing.assert_close(h16, ops.half_saturated_ref(h), rtol=0, atol=0, equal_nan=True)
    assert h16.dtype == torch.float16 and h16.shape == h.shape
    d = ops.gelu_backward_half(g, h16)
    torch.testing.assert_close(d, ops.gelu_backward_half_ref(g, h16), rtol=1e-6, atol=2e-6, equal_nan=True)


@needs_kernels
@pytest.mark.parametrize("shape", [(16, 64, 1536), (1, 1536), (3, 7), (13,), (0, 1536), (2, 0)])
def test_half_saved_kernels_match_references(shape):
    gen = torch.Generator().manual_seed(len(shape))
    h = torch.randn(shape, generator=gen) * 3
    _half_saved_check(h, torch.randn(shape, generator=gen))
    strided = h.transpose(0, -1) if h.dim() > 1 else h
    _half_saved_check(strided, torch.randn(strided.shape, generator=gen))


@needs_kernels
def test_half_saved_kernels_on_extreme_inputs_and_rows_independent_of_the_batch():
    # beyond fp16's range, its rounding edge (65519 rounds down, 65520 up), NaN, signed zero, subnormals
    h = torch.tensor([float("nan"), 1e6, -1e6, 7e4, -7e4, 65519.0, 65520.0, 0.0, -0.0, 1e-30, 3e-6, -10.0,
                      10.0, 5.5, float("inf"), -float("inf"), 2.0, 1.0])  # fmt: skip
    for n in (len(h), 8, 7):  # whole vectors and tails
        _half_saved_check(h[:n], torch.ones(n))
    h16 = ops.half_saturated(h)
    assert h16.isfinite().sum() == len(h) - 1 and h16[0].isnan()  # saturates; NaN stays NaN
    assert ops.gelu_backward_half(torch.ones(1), h16[:1]).isnan().all()
    x = torch.randn(37, 19) * 3
    g = torch.randn(37, 19)
    h16 = ops.half_saturated(x)
    for rows in (1, 5, 36):  # the same values give the same bits wherever they sit
        assert torch.equal(
            ops.gelu_backward_half(g[:rows], h16[:rows]), ops.gelu_backward_half(g, h16)[:rows]
        )


@needs_kernels
def test_half_saved_scalar_path_matches_references():
    """The path for CPUs without AVX2 + F16C (and for ARM), forced on x86 with EDGE_TUNE_HALF_SAVED_SCALAR."""
    code = (
        "import torch, tests.test_kernels as t; torch.manual_seed(0); h = torch.randn(5, 1531) * 3;"
        "h[0, :4] = torch.tensor([float('nan'), 1e6, -7e4, 65520.0]); t._half_saved_check(h, torch.randn(5, 1531));"
        "print(torch.ops.edge_tune.half_saved_isa())"
    )
    env = {**os.environ, "EDGE_TUNE_HALF_SAVED_SCALAR": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert p.stdout.strip() == "scalar", p.stderr[-500:]  # checked, and by the scalar path
    vector = "avx2+f16c" if {"avx2", "fma", "f16c"} <= _cpu_flags() else "scalar"
    assert (
        torch.ops.edge_tune.half_saved_isa() == vector
    )  # this process runs the other one where there is one


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split())


@pytest.mark.parametrize(("k", "n"), SHAPES[:3])
def test_quantized_linears_sqnr_against_fp32(k, n):
    """Thresholds: int8 per-row >= 35 dB, dynamic int8 >= 30 dB, int4 group-32 >= 17 dB, dynamic int4 >= 16 dB
    (Gaussian weights and inputs)."""
    w, b, (q8, s8), (q4, s4) = _weights(k, n, seed=2)
    x = torch.randn(64, k)
    ref = torch.nn.functional.linear(x, w, b)
    assert sqnr_db(ref, ops.int8_linear(x, q8, s8, b)) >= 35
    assert sqnr_db(ref, ops.int4_linear(x, q4, s4, b)) >= 17
    # dynamic: 7-bit per-token activations on top of the int8 weights cost a few dB (measured 36-39)
    assert sqnr_db(ref, ops.int8_linear_dynamic(x, q8, s8, b)) >= 30
    # the int4 weights' error dominates; the 7-bit activations take off under a dB
    assert sqnr_db(ref, ops.int4_linear_dynamic(x, q4, s4, b)) >= 16


def test_no_compiler_falls_back_with_one_line(tmp_path):
    code = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
from edge_tune import ops, quant
from edge_tune.kernels import load_kernels
ok = load_kernels()
w = torch.randn(64, 64); q, s = quant.quantize_int8(w); x = torch.randn(3, 64)
assert torch.equal(ops.int8_linear(x, q, s, None), ops.int8_linear_ref(x, q, s, None))
print("loaded" if ok else "fallback")
"""
    env = {**os.environ, "CXX": "false", "TORCH_EXTENSIONS_DIR": str(tmp_path), "EDGE_TUNE_KERNELS": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "fallback"
    lines = [ln for ln in p.stderr.splitlines() if "C++ kernels unavailable" in ln]
    assert len(lines) == 1 and "using the PyTorch reference ops" in lines[0] and "Traceback" not in p.stderr


def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Compile-only check of cpp_ext/cuda_kernels.cu (no GPU needed). A CPU-only torch lacks one generated
    CUDA header, which is stubbed here; with CUDA torch the real one is used."""
    import shutil

    import torch.utils.cpp_extension as ce

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in ce.include_paths()] + [f"-I{tmp_path / 'stub'}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    src = Path(__file__).resolve().parent.parent / "cpp_ext" / "cuda_kernels.cu"
    p = subprocess.run([nvcc, "-c", str(src), "-o", str(tmp_path / "k.o"), "-std=c++17", abi,
                        "--expt-relaxed-constexpr", *includes], capture_output=True, text=True, timeout=600)  # fmt: skip
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert p.returncode == 0 and (tmp_path / "k.o").is_file(), "\n".join(errors[:10]) or p.stderr[-2000:]


INT8_ISAS = ("scalar", "avx2", "avx512-vnni", "neon", "neon-dotprod")  # cpp_ext/int8_panels.h, isa_name


@needs_kernels
def test_every_int8_isa_gives_the_same_outputs(tmp_path):
    """The dynamic ops' integer cores are picked per CPU (int8_panels.h: vpdpbusd with AVX-512 VNNI, else
    AVX2 vpmaddubsw; sdot or smull on ARM; a scalar twin), and EDGE_TUNE_INT8_ISA forces any the CPU has.
    With 7-bit activations none saturates, so every path must give bit-identical outputs, through the op."""
    code = (
        "import sys, torch\n"
        "from edge_tune import ops, quant\n"
        "from edge_tune.kernels import load_kernels\n"
        "assert load_kernels()\n"
        "g = torch.Generator().manual_seed(3)\n"
        "q8, s8 = quant.quantize_int8(torch.randn(96, 385, generator=g))\n"
        "b = torch.randn(96, generator=g)\n"
        "xs = [torch.randn(m, 385, generator=g) * 3 for m in (1, 3, 5, 40)]\n"
        # signed zeros, an all-zero row, a row with inf and one with NaN (those two come out NaN)
        "xs.append(torch.where(xs[3] > 1, -0.0, xs[3]))\n"
        "xs[-1][5] = 0.0; xs[-1][7, 100] = float('inf'); xs[-1][9, 384] = float('nan')\n"
        "out = [ops.int8_linear_dynamic(x, q8, s8, b) for x in xs]\n"
        "packed = ops.int8_pack_weight(q8)\n"  # each ISA's own layout
        "out += [ops.int8_linear_dynamic_packed(x, q8, *packed, s8, b) for x in xs]\n"
        "out.append(ops.int8_linear_dynamic_grad_input(torch.randn(40, 96, generator=g), q8, s8))\n"
        # 40 outputs: a last panel of 8 columns (VNNI's are 32 wide); no bias (+0 on every path)
        "q40, s40 = quant.quantize_int8(torch.randn(40, 385, generator=g))\n"
        "out += [ops.int8_linear_dynamic_packed(x, q40, *ops.int8_pack_weight(q40), s40, None) for x in xs]\n"
        "out += [ops.int8_linear_dynamic(x, q40, s40, None) for x in xs]\n"
        "q4, s4 = quant.quantize_int4(torch.randn(96, 384, generator=g))\n"
        "out += [ops.int4_linear_dynamic(x[:, :384], q4, s4, b) for x in xs]\n"  # folds into int8
        "q4, s4 = quant.quantize_int4(torch.randn(96, 384, generator=g), fold=False)\n"  # the group panels
        "assert quant.int4_as_int8(q4, s4) is None\n"
        "out += [ops.int4_linear_dynamic(x[:, :384], q4, s4, b) for x in xs]\n"
        "torch.save((torch.ops.edge_tune.int8_isa(), out), sys.argv[1])\n"
    )
    results = {}
    for isa in INT8_ISAS:
        path = tmp_path / f"{isa}.pt"
        env = {**os.environ, "EDGE_TUNE_INT8_ISA": isa}
        subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True, capture_output=True)
        picked, out = torch.load(path)
        if picked == isa:  # else the CPU lacks it and the best one ran
            results[isa] = out
    assert "scalar" in results  # every CPU has it
    if len(results) < 2:
        pytest.skip("this CPU has no vector int8 cores to compare with the scalar ones")
    first, *others = results.values()
    for out in others:
        for a, b in zip(first, out, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
