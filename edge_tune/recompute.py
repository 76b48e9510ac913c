"""Activation checkpointing per encoder layer (Encoder.checkpointing, for small memory budgets): a layer keeps
only its input and runs again during backward."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Recompute(torch.autograd.Function):
    """Activation checkpointing for one layer: keep only its input, run it again during backward
    (~1/3 more compute). Not torch.utils.checkpoint: that imports torch._dynamo on first use (~57 MB RSS).
    The layers hold no dropout, so the recomputation is exact. `anchor` requires grad so that backward
    reaches this node even when the layer input does not (LoRA on a frozen embedding)."""

    @staticmethod
    def forward(ctx, layer: nn.Module, x: Tensor, attn_mask: Tensor, anchor: Tensor, prefix: Tensor | None,
                packing):  # fmt: skip
        ctx.layer, ctx.packing = layer, packing  # index tensors that nothing writes to
        ctx.save_for_backward(x, attn_mask, prefix)
        with torch.no_grad():
            return layer(x, attn_mask, prefix, packing)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, attn_mask, prefix = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[1])
        if prefix is not None:  # a reparametrized prefix: its gradient goes back through the return
            prefix = prefix.detach().requires_grad_(ctx.needs_input_grad[4])
        with torch.enable_grad():
            root = (ctx.layer(x, attn_mask, prefix, ctx.packing) * grad).sum()
        # Gradients reach the layer's trainable parameters' .grad here, the input's through the return.
        # A scalar root, not backward(y, grad): handing autograd an explicit gradient imports sympy
        # (~30 MB). d(sum(y * grad))/dy is exactly `grad`.
        if root.requires_grad:  # False only when nothing in or before this layer trains
            root.backward()
        grad_x = x.grad if ctx.needs_input_grad[1] else None
        return None, grad_x, None, None, prefix.grad if ctx.needs_input_grad[4] else None, None


ANCHOR = torch.zeros((), requires_grad=True)
