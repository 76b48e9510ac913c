"""Weight formats: round trips, error bounds, and SQNR of quantized layers against fp32."""

import pytest
import torch

from edge_tune import quant
from edge_tune.model import QuantEmbedding, QuantLinear


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean())).item()


def test_int4_pack_unpack_round_trip_every_value():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # (3, 32)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(q)), q)
    assert quant.pack_int4(q).shape == (3, 16) and quant.pack_int4(q).dtype == torch.uint8


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (7, 64)])
def test_int8_error_within_half_a_step(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (shape[0],)
    assert ((quant.dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-7).all()


def test_int4_error_within_half_a_step_and_scales_fold():
    """Within half a step except where a group's lower multiple clips its extreme (here never past a step);
    each group's squared error no more than at the multiple of u above amax / 7; every row folds into int8."""
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    packed, s = quant.quantize_int4(w)
    step = s.float().repeat_interleave(quant.GROUP_SIZE, dim=1)
    q, err = quant.unpack_int4(packed), (quant.dequantize_int4(packed, s) - w).abs()
    inside = (q > -8) & (q < 7)
    assert (err[inside] <= step[inside] / 2 + 1e-7).all() and (err <= step + 1e-7).all()
    w8, u = quant.int4_as_int8(packed, s)
    assert torch.equal(w8.float() * u[:, None], quant.dequantize_int4(packed, s))
    m = s.float() / u[:, None]
    assert (m == m.round()).all() and m.amax(1).eq(16).all() and m.amin() >= 1
    g = w.reshape(96, -1, quant.GROUP_SIZE)
    ceil_s = torch.ceil(g.abs().amax(2) / 7 / u[:, None]).clamp(1, 16) * u[:, None]
    ceil_err = ((g / ceil_s[..., None]).round().clamp(-8, 7) * ceil_s[..., None] - g).pow(2).sum(2)
    assert (err.pow(2).reshape(96, -1, quant.GROUP_SIZE).sum(2) <= ceil_err * (1 + 1e-5) + 1e-12).all()


def test_int4_scales_of_all_zero_and_tiny_rows_fold():
    w = torch.cat([torch.zeros(2, 64), torch.randn(2, 64) * 1e-9, torch.randn(2, 64) * 1e3])
    packed, s = quant.quantize_int4(w)
    assert quant.int4_as_int8(packed, s) is not None
    assert (quant.dequantize_int4(packed, s)[:2] == 0).all()


def test_int4_rejects_bad_group():
    with pytest.raises(ValueError, match="divisible"):
        quant.quantize_int4(torch.zeros(4, 30))


# Thresholds: int8 per-row keeps ~40 dB on Gaussian weights, int4 group-32 ~20 dB; we require 35 and 17.
@pytest.mark.parametrize(("precision", "min_db"), [("int8", 35.0), ("int4", 17.0)])
@pytest.mark.parametrize(("n_in", "n_out", "m"), [(384, 1536, 64), (1536, 384, 1), (64, 10, 3)])
def test_quant_linear_matches_fp32(precision, min_db, n_in, n_out, m):
    g = torch.Generator().manual_seed(2)
    w, b, x = (
        torch.randn(n_out, n_in, generator=g) * 0.05,
        torch.randn(n_out, generator=g),
        torch.randn(m, n_in, generator=g),
    )
    ref = torch.nn.functional.linear(x, w, b)
    lin = QuantLinear(quant.quantize(w, precision), b, precision)
    assert sqnr_db(ref, lin(x)) >= min_db


@pytest.mark.parametrize(("precision", "min_db"), [("int8", 35.0), ("int4", 17.0)])
def test_quant_embedding_matches_fp32(precision, min_db):
    g = torch.Generator().manual_seed(3)
    table = torch.randn(1000, 64, generator=g)
    ids = torch.randint(0, 1000, (4, 9), generator=g)
    emb = QuantEmbedding(quant.quantize(table, precision), precision)
    assert sqnr_db(table[ids], emb(ids)) >= min_db


def test_real_base_sizes(base_int8):
    from edge_tune.base import load_base

    assert base_int8.frozen_bytes() <= 25e6
    assert load_base(precision="int4").frozen_bytes() <= 15e6
    # Frozen weights are buffers, never Parameters: the only encoder Parameters are biases and LayerNorm gains.
    params = [n for n, _ in base_int8.model.encoder.named_parameters()]
    assert params and all(n.endswith(".bias") or "ln" in n.split(".")[-2] for n in params)
    assert {n.split(".")[-1] for n, _ in base_int8.model.encoder.named_buffers()} >= {"w_q", "scale"}
