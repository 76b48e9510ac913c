"""Autograd functions that keep what backward needs in fp16: training's activations are most of its memory
past the weights, and gradients at fp16-rounded activations move far less than the int8 weights already
do. Each is exact in forward (the same bits as inference) and tested against torch's own backward."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor) -> Tensor:
    """Scaled dot-product attention. On CPU through ops.attention (cpp_ext/cpu_attention.cpp with the
    kernels), with autograd or without alike, so that training, inference and checkpointing's no-grad pass
    give the same bits; while training, through _AttentionHalfSaved."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    key_mask = attn_mask[:, 0, 0, :]  # (B, T)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _AttentionHalfSaved.apply(q, k, v, key_mask)
    return ops.attention(q, k, v, key_mask)


class _AttentionHalfSaved(torch.autograd.Function):
    """Self-attention that keeps only q, k and v for backward, in fp16. torch's SDPA keeps q, k, v, the output
    and the log-sum-exp in fp32 (4 x 384 floats a token and layer); this keeps 1.5 x 384, ~24 MB less at
    batch 16 x 64 tokens. ops.attention_backward recomputes the probabilities from q and k, and needs
    neither the output nor the log-sum-exp (so does its reference, with the kernels off). The gradients
    are those at the fp16-rounded q, k, v (relative error ~4e-4 against SDPA's), which moves them far less
    than the int8 weights already do. (Saving the output and log-sum-exp of torch's flash kernels instead of
    rerunning them, tried: the gradients came out 2-5x more sensitive to last-bit input changes, as a
    flipped fp16 rounding of q or k no longer matched the saved log-sum-exp.)"""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
        ctx.save_for_backward(ops.half_saturated(q), ops.half_saturated(k), ops.half_saturated(v), key_mask)
        return ops.attention(q, k, v, key_mask)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q16, k16, v16, key_mask = ctx.saved_tensors
        dq, dk, dv = ops.attention_backward(grad, q16, k16, v16, key_mask)
        return dq, dk, dv, None


def layer_norm(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    """`ln(x)`; while training, through _LayerNormHalfSaved."""
    if torch.is_grad_enabled() and (x.requires_grad or ln.weight.requires_grad or ln.bias.requires_grad):
        return _LayerNormHalfSaved.apply(x, ln.weight, ln.bias, ln.eps)
    return ln(x)


class _LayerNormHalfSaved(torch.autograd.Function):
    """LayerNorm that keeps its input for backward in fp16 (with its per-token mean and 1/std in fp32):
    384 bytes a token less per LayerNorm, ~9 MB over the encoder at batch 16 x 64 tokens. Backward is
    torch's own, at the fp16-rounded input."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        out, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], weight, bias, eps)
        ctx.save_for_backward(ops.half_saturated(x), mean, rstd, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x16, mean, rstd, weight, bias = ctx.saved_tensors
        x = x16.float()
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            grad, x, x.shape[-1:], mean, rstd, weight, bias, list(ctx.needs_input_grad[:3])
        )
        return dx, dw, db, None


def gelu(h: Tensor) -> Tensor:
    """Exact GELU; while training, through _GeluHalfSaved."""
    return _GeluHalfSaved.apply(h) if h.requires_grad and torch.is_grad_enabled() else F.gelu(h)


class _GeluHalfSaved(torch.autograd.Function):
    """Exact GELU that keeps its input for backward in fp16: the FFN hidden (1536 values a token) is the
    largest activation a layer saves, and half its bytes is ~18 MB at batch 16 x 64 tokens. The derivative
    is taken at the fp16-rounded input (relative error <= 2^-11 in x), which moves the gradient far less
    than the int8 weights already do."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        ctx.save_for_backward(ops.half_saturated(h))
        return F.gelu(h)  # torch's, as inference and checkpointing's no-grad pass: the same bits

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (h16,) = ctx.saved_tensors
        return ops.gelu_backward_half(grad, h16)


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear` for a trained fp32 weight (partial and full fine-tuning); while training, through
    _LinearHalfSaved."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearHalfSaved.apply(x, weight, bias)
    return F.linear(x, weight, bias)


# The last input saved in fp16 (weak references: input, its version, the fp16 copy): q, k and v take one
# input, which is saved once for the three, as torch's linear saves one fp32 tensor for them.
_last_half: tuple = (lambda: None, -1, lambda: None)


def _half_once(x: Tensor) -> Tensor:
    global _last_half
    ref, version, ref16 = _last_half
    x16 = ref16()
    if ref() is x and version == x._version and x16 is not None:
        return x16
    x16 = ops.half_saturated(x)
    _last_half = (weakref.ref(x), x._version, weakref.ref(x16))
    return x16


class _LinearHalfSaved(torch.autograd.Function):
    """fp32 linear that keeps its input for the weight gradient in fp16 (torch's keeps it in fp32): a
    trained layer's four inputs (384 for q, k and v together, 384, 384, 1536 values a token) cost half,
    ~33 MB less over the six layers of a full fine-tune at batch 16 x 64 tokens. The input gradient is exact; the weight gradient
    is the one at the fp16-rounded input."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(_half_once(x) if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x16, weight = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        dx = grad @ weight if ctx.needs_input_grad[0] else None
        dw = flat.T @ x16.reshape(-1, x16.shape[-1]).float() if ctx.needs_input_grad[1] else None
        db = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db
