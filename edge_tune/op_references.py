"""The pure-PyTorch reference of every edge_tune:: op: the definition of its result, which its C++ and CUDA
kernels are tested against and which runs where no kernel is built (ops.py registers each under its op's
name, with the op's schema, fake kernel and autograd rule).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import quant


def int8_linear_ref(x: Tensor, w_q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x: (..., in) fp32; w_q: (out, in) int8; scale: (out,) fp32; bias: (out,) -> (..., out) fp32."""
    return torch.nn.functional.linear(x, quant.dequantize_int8(w_q, scale), bias)


ACT_LEVELS = 127  # dynamic activations: 7-bit unsigned with a zero point (int8_linear_dynamic)


def quantize_rows_ref(x2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x2: (M, K) fp32 -> (xu (M, K) in [0, 127] as fp32, row scale sx (M,), zero point zp (M,) as fp32).

    Per-token asymmetric quantization over a range that always holds 0 (so 0 is exact). 7 bits, not 8,
    because the u8 x s8 products of the x86 kernel (vpmaddubsw) are summed in pairs into int16 and
    2 * 127 * 127 < 2^15 never saturates (fbgemm's `reduce_range` does the same)."""
    lo = x2.amin(1).clamp(max=0) if x2.shape[1] else x2.new_zeros(x2.shape[0])
    hi = x2.amax(1).clamp(min=0) if x2.shape[1] else x2.new_zeros(x2.shape[0])
    sx = (hi - lo) / ACT_LEVELS
    sx = torch.where(sx > 0, sx, torch.ones_like(sx))
    zp = torch.round(-lo / sx)
    xu = (torch.round(x2 / sx[:, None]) + zp[:, None]).clamp(0, ACT_LEVELS)
    return xu, sx, zp


def int8_linear_dynamic_ref(x: Tensor, w_q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x: (..., in) fp32, quantized per token to int8 on the fly; int32-exact accumulation (done here in
    fp64); dequantize by row scale x column scale, add bias -> (..., out) fp32."""
    k = w_q.shape[1]
    x2 = x.reshape(-1, k)
    xu, sx, zp = quantize_rows_ref(x2.nan_to_num(0.0, 0.0, 0.0))
    acc = ((xu - zp[:, None]).double() @ w_q.double().t()).float()
    y = acc * sx[:, None] * scale[None, :]
    if bias is not None:
        y = y + bias
    bad = ~torch.isfinite(x2).all(1) if k else torch.zeros(x2.shape[0], dtype=torch.bool)
    y = y.masked_fill(bad[:, None], float("nan"))
    return y.reshape(*x.shape[:-1], w_q.shape[0])


PACK_HEADER = 5  # int8_pack_weight's sums start with: magic, int8 cores, block columns, out, in


def int8_pack_weight_ref(w_q: Tensor) -> tuple[Tensor, Tensor]:
    """w_q (out, in) int8 -> (packed, sums): the weight in the int8 kernels' panel layout, packed once for
    inference passes, and a header (PACK_HEADER int32: which layout) then w_q's row sums (out,) int32. The
    reference keeps no layout: no bytes, and a header no kernel accepts (magic 0)."""
    header = torch.tensor([0, -1, 0, w_q.shape[0], w_q.shape[1]], dtype=torch.int32, device=w_q.device)
    return w_q.new_empty(0), torch.cat([header, w_q.sum(1, dtype=torch.int32)])


def int8_linear_dynamic_packed_ref(
    x: Tensor, w_q: Tensor, packed: Tensor, sums: Tensor, scale: Tensor, bias: Tensor | None
) -> Tensor:
    """int8_linear_dynamic(x, w_q, scale, bias) with w_q also given packed (int8_pack_weight), bit for bit;
    inference only (no autograd)."""
    return int8_linear_dynamic_ref(x, w_q, scale, bias)


def int8_linear_dynamic_grad_input_ref(grad_out: Tensor, w_q: Tensor, scale: Tensor) -> Tensor:
    """grad_x = grad_out @ (scale * W) with grad_out * scale quantized per row like the activations (the
    scale lies along the reduction, so it is folded in before quantizing); int32-exact accumulation."""
    n = w_q.shape[0]
    g2 = (grad_out.reshape(-1, n) * scale).nan_to_num(0.0, 0.0, 0.0)
    xu, sx, zp = quantize_rows_ref(g2)
    gx = ((xu - zp[:, None]).double() @ w_q.double()).float() * sx[:, None]
    bad = (
        ~torch.isfinite(grad_out.reshape(-1, n) * scale).all(1)
        if n
        else torch.zeros(g2.shape[0], dtype=torch.bool)
    )
    gx = gx.masked_fill(bad[:, None], float("nan"))
    return gx.reshape(*grad_out.shape[:-1], w_q.shape[1])


def lora_linear_ref(
    x: Tensor, w_q: Tensor, scale: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, lora_scale: float
) -> Tensor:
    """int8_linear_dynamic(x, w_q, scale, bias) + lora_scale * (x @ A.T) @ B.T; A: (r, in), B: (out, r)."""
    return add_lora_term(int8_linear_dynamic_ref(x, w_q, scale, bias), x, A, B, lora_scale)


def add_lora_term(y: Tensor, x: Tensor, A: Tensor, B: Tensor, lora_scale: float) -> Tensor:
    """y + lora_scale * (x @ A.T) @ B.T as one addmm over the flattened rows. The rank-r term of training
    passes: lora_linear's kernel (cpp_ext/cpu_dynamic.cpp, the same addmm in place), its reference, the fp32
    and int4 bases all use it, so a row gets the same bits from each, given the same rows (BLAS's rounding
    may depend on the row count). Inference-mode passes use lora_rows, whose rounding does not."""
    k, n = x.shape[-1], y.shape[-1]
    return torch.addmm(y.reshape(-1, n), x.reshape(-1, k) @ A.t(), B.t(), alpha=lora_scale).view(y.shape)


def lora_rows_ref(
    y: Tensor, x: Tensor, A: Tensor, Bt: Tensor, row_patch: Tensor, rank_offsets: Tensor, scales: Tensor
) -> Tensor:
    """y + each row's own patch's LoRA term, for a pass whose rows belong to P patches: y (..., out), x
    (..., in) fp32 with N rows; A (R, in) and Bt (R, out) every patch's A and B^T stacked; row_patch (N,)
    each row's patch p, whose ranks are rank_offsets[p] to rank_offsets[p + 1] (P + 1,) and scale scales[p]
    (P,) -> y's shape."""
    shape, x, y = y.shape, x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    offsets, out = rank_offsets.tolist(), y.clone()
    if (
        len(offsets) != scales.shape[0] + 1
        or offsets != sorted(offsets)
        or not 0 <= offsets[0] <= offsets[-1] <= A.shape[0]
    ):
        raise RuntimeError(
            "lora_rows: rank_offsets must be (patches + 1,), non-decreasing, from 0, within A's ranks"
        )
    if row_patch.numel() and not 0 <= int(row_patch.min()) <= int(row_patch.max()) < scales.shape[0]:
        raise RuntimeError("lora_rows: every row_patch must name one of the patches")
    for p, (r0, r1) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        rows = (row_patch == p).nonzero().flatten()
        if rows.numel() and r1 > r0:
            out[rows] += (x[rows] @ A[r0:r1].t() * scales[p]) @ Bt[r0:r1]
    return out.reshape(shape)


def int4_linear_ref(x: Tensor, w_packed: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x: (..., in) fp32; w_packed: (out, in/2) uint8; scale: (out, in/group) fp16 -> (..., out) fp32."""
    return torch.nn.functional.linear(x, quant.dequantize_int4(w_packed, scale), bias)


def int4_linear_dynamic_ref(x: Tensor, w_packed: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x: (..., in) fp32, quantized per token like int8_linear_dynamic; w_packed / scale: int4 in groups
    (quant.py) -> (..., out) fp32. A weight whose group scales fold into int8 (quant.int4_as_int8: every
    weight quantize_int4 makes) is int8_linear_dynamic_ref of that int8 weight. Any other: per group, in
    order, the exact integer product of the 7-bit activations and the int4 values, times the group's scale,
    summed in fp32; less the zero point times the same sum over the groups' weight sums; times the row
    scale, plus bias. The C++ kernel computes the same operations in the same order, so the two agree bit
    for bit."""
    folded = quant.int4_as_int8(w_packed, scale)
    if folded is not None:
        return int8_linear_dynamic_ref(x, folded[0], folded[1], bias)
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    groups = scale.shape[1]
    size = k // groups if groups else 0
    x2 = x.reshape(-1, k)
    xu, sx, zp = quantize_rows_ref(x2.nan_to_num(0.0, 0.0, 0.0))
    q = quant.unpack_int4(w_packed).double()
    acc = x2.new_zeros(x2.shape[0], n)
    corr = x2.new_zeros(n)
    for g in range(groups):
        part = slice(g * size, (g + 1) * size)
        acc = acc + (xu[:, part].double() @ q[:, part].t()).float() * scale[:, g].float()[None, :]
        corr = corr + q[:, part].sum(1).float() * scale[:, g].float()
    y = (acc - zp[:, None].float() * corr[None, :]) * sx[:, None]
    if bias is not None:
        y = y + bias
    bad = ~torch.isfinite(x2).all(1) if k else torch.zeros(x2.shape[0], dtype=torch.bool)
    y = y.masked_fill(bad[:, None], float("nan"))
    return y.reshape(*x.shape[:-1], n)


def int8_embedding_ref(ids: Tensor, w_q: Tensor, scale: Tensor) -> Tensor:
    """ids: (...) int64; w_q: (vocab, dim) int8; scale: (vocab,) fp32 -> (..., dim) fp32."""
    return w_q[ids].float() * scale[ids][..., None]


def int4_embedding_ref(ids: Tensor, w_packed: Tensor, scale: Tensor) -> Tensor:
    """ids: (...) int64; w_packed: (vocab, dim/2) uint8; scale: (vocab, dim/group) fp16 -> (..., dim) fp32."""
    flat = ids.reshape(-1)
    rows = quant.dequantize_int4(w_packed[flat], scale[flat])
    return rows.reshape(*ids.shape, rows.shape[-1])


def lora_linear_backward_ref(
    grad: Tensor, x: Tensor, A: Tensor, B: Tensor, lora_scale: float, grad_x: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The LoRA term's gradients: returns (grad_A, grad_B) and adds the term's input gradient,
    s * (grad B) A, into `grad_x` (the base's input gradient, (..., in), contiguous) where given."""
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    gb = g2 @ B  # (M, r)
    if grad_x is not None:
        grad_x.view(-1, x2.shape[1]).add_(gb @ A, alpha=lora_scale)
    return lora_scale * (gb.t() @ x2), lora_scale * (g2.t() @ (x2 @ A.t()))


def empty_heads_last(t: Tensor) -> Tensor:
    """An empty fp32 (B, H, T, Dh) tensor like t, laid out (B, T, H, Dh): the layout the model's heads come
    from and go back to, which every attention op returns (kernels, references and fakes alike)."""
    B, H, T, Dh = t.shape
    return torch.empty((B, T, H, Dh), dtype=torch.float32, device=t.device).transpose(1, 2)


def _heads_last(t: Tensor) -> Tensor:
    return empty_heads_last(t).copy_(t)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """q, k, v: (B, H, T, Dh) fp32; key_mask: (B, T) bool, True for a real token -> (B, H, T, Dh):
    softmax(q k^T / sqrt(Dh), keys masked) v, torch's SDPA."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    return _heads_last(out)


def attention_packed_ref(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor) -> Tensor:
    """q, k, v: (N, H, Dh) fp32, sequences back to back (sequence s on rows offsets[s] to offsets[s + 1]) ->
    (N, H, Dh): attention_ref within each sequence, no padding (Encoder.forward's `packed`)."""
    bounds = offsets.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != q.shape[0] or bounds != sorted(bounds):
        raise RuntimeError("attention_packed: offsets must run from 0 to the tokens, never decreasing")
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for s0, s1 in zip(bounds[:-1], bounds[1:], strict=True):
        if s1 > s0:
            pair = [t[s0:s1].transpose(0, 1) for t in (q, k, v)]  # (H, T, Dh)
            out[s0:s1] = torch.nn.functional.scaled_dot_product_attention(*pair).transpose(0, 1)
    return out


def attention_backward_ref(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> tuple:
    """(dq, dk, dv) of attention_ref at q, k, v (fp32 or fp16, taken in fp32) for the output gradient grad,
    the probabilities recomputed: dS = P (dP - rowsum(P dP)) / sqrt(Dh)."""
    q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5
    s = (q @ k.transpose(-1, -2)).mul_(scale).masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    p = s.softmax(-1).nan_to_num_(0.0)  # a row with no real key: zeros, as SDPA gives
    dp = grad @ v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
    return _heads_last(ds @ k), _heads_last(ds.transpose(-1, -2) @ q), _heads_last(p.transpose(-1, -2) @ grad)


def half_saturated_ref(t: Tensor) -> Tensor:
    """fp16 copy of an activation kept for backward; clamped, so a huge value saturates instead of
    becoming inf (NaN stays NaN)."""
    return t.clamp(-65504.0, 65504.0).to(torch.float16)


def gelu_backward_half_ref(grad: Tensor, h16: Tensor) -> Tensor:
    """The input gradient of exact GELU, taken at the fp16 copy of its input."""
    return torch.ops.aten.gelu_backward(grad, h16.float())


def int8_linear_grad_input_ref(grad_out: Tensor, w_q: Tensor, scale: Tensor) -> Tensor:
    """grad_out: (..., out) -> grad_x (..., in) = grad_out @ dequant(W)."""
    return grad_out @ quant.dequantize_int8(w_q, scale)


def int4_linear_grad_input_ref(grad_out: Tensor, w_packed: Tensor, scale: Tensor) -> Tensor:
    return grad_out @ quant.dequantize_int4(w_packed, scale)


def encoder_layer_ref(
    x: Tensor,
    mask: Tensor,
    packed: bool,
    heads: int,
    linears: list[Tensor],
    lora: list[Tensor | None],
    ln: list[Tensor],
    eps: float,
) -> Tensor:
    """One encoder layer's inference pass, as model.EncoderLayer runs it without a prefix: x (B, T, D) with
    mask the key mask (B, T) bool, or `packed` x (N, D) with mask the sentences' offsets (B + 1,). linears:
    for q, k, v, o, ff1, ff2 in turn, w_q (int8, or uint8: int4 packed), its packing (int8_pack_weight's two
    tensors; empty ones for int4 or an unpacked int8 weight), scale and bias;
    lora: for each, lora_rows' A, Bt, row_patch, rank_offsets, scales, or five Nones; ln: ln1's weight and
    bias, then ln2's -> x's shape."""
    D = x.shape[-1]

    def linear(t: Tensor, i: int) -> Tensor:
        w_q, _, _, scale, bias = linears[5 * i : 5 * i + 5]
        gemm = int4_linear_dynamic_ref if w_q.dtype == torch.uint8 else int8_linear_dynamic_ref
        y = gemm(t, w_q, scale, bias)
        return y if lora[5 * i] is None else lora_rows_ref(y, t, *lora[5 * i : 5 * i + 5])

    if packed:
        split = lambda t: t.view(-1, heads, D // heads)  # noqa: E731
        a = attention_packed_ref(split(linear(x, 0)), split(linear(x, 1)), split(linear(x, 2)), mask)
        a = a.view(-1, D)
    else:
        B, T = x.shape[:2]
        split = lambda t: t.view(B, T, heads, D // heads).transpose(1, 2)  # noqa: E731
        a = attention_ref(split(linear(x, 0)), split(linear(x, 1)), split(linear(x, 2)), mask)
        a = a.transpose(1, 2).reshape(B, T, D)
    h = torch.nn.functional.layer_norm(x + linear(a, 3), (D,), ln[0], ln[1], eps)
    f = torch.nn.functional.gelu(linear(h, 4))
    return torch.nn.functional.layer_norm(h + linear(f, 5), (D,), ln[2], ln[3], eps)
