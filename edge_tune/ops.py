"""Every edge_tune:: custom op: its schema, registered with its pure-PyTorch reference (op_references.py), the
fake (meta) kernel and the autograd rule.

The frozen weights never get a gradient, so backward returns the input gradient (and the bias gradient
for BitFit) only, and no op saves its activation input for backward: the weights it needs are frozen
buffers that are alive anyway. The compiled kernels of cpp_ext/ plug in behind the same op names.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .op_references import (  # the references, also reached as ops.<name>
    ACT_LEVELS,  # noqa: F401  (re-exported: the ONNX export)
    PACK_HEADER,
    add_lora_term,  # noqa: F401  (re-exported: the rank-r term model.py adds)
    attention_backward_ref,
    attention_packed_ref,
    attention_ref,
    empty_heads_last,
    encoder_layer_ref,
    gelu_backward_half_ref,
    half_saturated_ref,
    int4_embedding_ref,
    int4_linear_dynamic_ref,
    int4_linear_grad_input_ref,
    int4_linear_ref,
    int8_embedding_ref,
    int8_linear_dynamic_grad_input_ref,
    int8_linear_dynamic_packed_ref,
    int8_linear_dynamic_ref,
    int8_linear_grad_input_ref,
    int8_linear_ref,
    int8_pack_weight_ref,
    lora_linear_backward_ref,
    lora_linear_ref,
    lora_rows_ref,
    quantize_rows_ref,  # noqa: F401  (re-exported)
)

# ---- the ops ----
# Registered with the low-level torch.library.Library API on purpose: `torch.library.custom_op` wraps every
# kernel in torch._disable_dynamo, which imports torch._dynamo (and sympy, ~800 modules, ~57 MB RSS,
# measured) on the first call, a seventh of a 400 MB device budget.
_lib = torch.library.Library("edge_tune", "DEF")  # noqa: TOR901


SCHEMAS = {
    "int8_linear": ("(Tensor x, Tensor w_q, Tensor scale, Tensor? bias) -> Tensor", int8_linear_ref),
    "int8_linear_dynamic": (
        "(Tensor x, Tensor w_q, Tensor scale, Tensor? bias) -> Tensor",
        int8_linear_dynamic_ref,
    ),
    "int8_linear_dynamic_grad_input": (
        "(Tensor grad_out, Tensor w_q, Tensor scale) -> Tensor",
        int8_linear_dynamic_grad_input_ref,
    ),
    # inference passes over a weight packed once (model.prepack_linears)
    "int8_pack_weight": ("(Tensor w_q) -> (Tensor, Tensor)", int8_pack_weight_ref),
    "int8_linear_dynamic_packed": (
        "(Tensor x, Tensor w_q, Tensor packed, Tensor sums, Tensor scale, Tensor? bias) -> Tensor",
        int8_linear_dynamic_packed_ref,
    ),
    "lora_linear": (
        "(Tensor x, Tensor w_q, Tensor scale, Tensor? bias, Tensor A, Tensor B, float lora_scale) -> Tensor",
        lora_linear_ref,
    ),
    "int4_linear": ("(Tensor x, Tensor w_packed, Tensor scale, Tensor? bias) -> Tensor", int4_linear_ref),
    "int4_linear_dynamic": (
        "(Tensor x, Tensor w_packed, Tensor scale, Tensor? bias) -> Tensor",
        int4_linear_dynamic_ref,
    ),
    "int8_linear_grad_input": (
        "(Tensor grad_out, Tensor w_q, Tensor scale) -> Tensor",
        int8_linear_grad_input_ref,
    ),
    "int4_linear_grad_input": (
        "(Tensor grad_out, Tensor w_packed, Tensor scale) -> Tensor",
        int4_linear_grad_input_ref,
    ),
    "int8_embedding": ("(Tensor ids, Tensor w_q, Tensor scale) -> Tensor", int8_embedding_ref),
    "int4_embedding": ("(Tensor ids, Tensor w_packed, Tensor scale) -> Tensor", int4_embedding_ref),
    # lora_linear's backward (below) runs this for the rank-r term
    "lora_linear_backward": (
        "(Tensor grad, Tensor x, Tensor A, Tensor B, float lora_scale, Tensor(a!)? grad_x) -> (Tensor, Tensor)",
        lora_linear_backward_ref,
    ),
    # LoRA's term in inference-mode passes, each row its own patch's (model.QuantLinear.forward)
    "lora_rows": (
        "(Tensor y, Tensor x, Tensor A, Tensor Bt, Tensor row_patch, Tensor rank_offsets, Tensor scales) -> Tensor",
        lora_rows_ref,
    ),
    # self-attention (half_saved.attention; half_saved._AttentionHalfSaved owns the autograd and runs the backward)
    "attention": ("(Tensor q, Tensor k, Tensor v, Tensor key_mask) -> Tensor", attention_ref),
    "attention_packed": ("(Tensor q, Tensor k, Tensor v, Tensor offsets) -> Tensor", attention_packed_ref),
    "attention_backward": (
        "(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor key_mask) -> (Tensor, Tensor, Tensor)",
        attention_backward_ref,
    ),
    # a whole encoder layer's inference pass in one call (model.EncoderLayer: inference mode, int8 / int4)
    "encoder_layer": (
        "(Tensor x, Tensor mask, bool packed, int heads, Tensor[] linears, Tensor?[] lora, Tensor[] ln, "
        "float eps) -> Tensor",
        encoder_layer_ref,
    ),
    # the activations training keeps in fp16 (half_saved.py's functions, which own the autograd)
    "half_saturated": ("(Tensor x) -> Tensor", half_saturated_ref),
    "gelu_backward_half": ("(Tensor grad, Tensor h16) -> Tensor", gelu_backward_half_ref),
}
for _name, (_schema, _ref) in SCHEMAS.items():
    _lib.define(_name + _schema)
    _lib.impl(_name, _ref, "CompositeExplicitAutograd")

int8_linear = torch.ops.edge_tune.int8_linear.default
int4_linear = torch.ops.edge_tune.int4_linear.default
int4_linear_dynamic = torch.ops.edge_tune.int4_linear_dynamic.default
int8_linear_dynamic = torch.ops.edge_tune.int8_linear_dynamic.default
lora_linear = torch.ops.edge_tune.lora_linear.default
int8_linear_dynamic_grad_input = torch.ops.edge_tune.int8_linear_dynamic_grad_input.default
int8_pack_weight = torch.ops.edge_tune.int8_pack_weight.default
int8_linear_dynamic_packed = torch.ops.edge_tune.int8_linear_dynamic_packed.default
int8_linear_grad_input = torch.ops.edge_tune.int8_linear_grad_input.default
int4_linear_grad_input = torch.ops.edge_tune.int4_linear_grad_input.default
int8_embedding = torch.ops.edge_tune.int8_embedding.default
int4_embedding = torch.ops.edge_tune.int4_embedding.default
lora_linear_backward = torch.ops.edge_tune.lora_linear_backward.default
lora_rows = torch.ops.edge_tune.lora_rows.default
attention = torch.ops.edge_tune.attention.default
attention_packed = torch.ops.edge_tune.attention_packed.default
attention_backward = torch.ops.edge_tune.attention_backward.default
encoder_layer = torch.ops.edge_tune.encoder_layer.default
half_saturated = torch.ops.edge_tune.half_saturated.default
gelu_backward_half = torch.ops.edge_tune.gelu_backward_half.default


# ---- fake kernels (shapes only; used by torch.compile / export and opcheck) ----
@torch.library.register_fake("edge_tune::int8_linear", lib=_lib)
def _(x, w_q, scale, bias):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@torch.library.register_fake("edge_tune::int8_linear_dynamic", lib=_lib)
def _(x, w_q, scale, bias):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@torch.library.register_fake("edge_tune::int8_pack_weight", lib=_lib)
def _(w_q):
    # the packed bytes depend on the int8 cores this CPU runs (their block width): a size known at run time
    size = torch.library.get_ctx().new_dynamic_size()
    return w_q.new_empty((size,)), w_q.new_empty((PACK_HEADER + w_q.shape[0],), dtype=torch.int32)


@torch.library.register_fake("edge_tune::int8_linear_dynamic_packed", lib=_lib)
def _(x, w_q, packed, sums, scale, bias):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@torch.library.register_fake("edge_tune::int8_linear_dynamic_grad_input", lib=_lib)
def _(grad_out, w_q, scale):
    return grad_out.new_empty((*grad_out.shape[:-1], w_q.shape[1]))


@torch.library.register_fake("edge_tune::lora_linear", lib=_lib)
def _(x, w_q, scale, bias, A, B, lora_scale):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@torch.library.register_fake("edge_tune::int4_linear", lib=_lib)
def _(x, w_packed, scale, bias):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


@torch.library.register_fake("edge_tune::int4_linear_dynamic", lib=_lib)
def _(x, w_packed, scale, bias):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


@torch.library.register_fake("edge_tune::int8_linear_grad_input", lib=_lib)
def _(grad_out, w_q, scale):
    return grad_out.new_empty((*grad_out.shape[:-1], w_q.shape[1]))


@torch.library.register_fake("edge_tune::int4_linear_grad_input", lib=_lib)
def _(grad_out, w_packed, scale):
    return grad_out.new_empty((*grad_out.shape[:-1], w_packed.shape[1] * 2))


@torch.library.register_fake("edge_tune::int8_embedding", lib=_lib)
def _(ids, w_q, scale):
    return scale.new_empty((*ids.shape, w_q.shape[1]))


@torch.library.register_fake("edge_tune::int4_embedding", lib=_lib)
def _(ids, w_packed, scale):
    return torch.empty((*ids.shape, w_packed.shape[1] * 2), dtype=torch.float32, device=ids.device)


@torch.library.register_fake("edge_tune::lora_linear_backward", lib=_lib)
def _(grad, x, A, B, lora_scale, grad_x):
    return torch.empty_like(A), torch.empty_like(B)


@torch.library.register_fake("edge_tune::lora_rows", lib=_lib)
def _(y, x, A, Bt, row_patch, rank_offsets, scales):
    return y.new_empty(y.shape)  # contiguous, as the kernel's


@torch.library.register_fake("edge_tune::attention", lib=_lib)
def _(q, k, v, key_mask):
    return empty_heads_last(q)


@torch.library.register_fake("edge_tune::attention_packed", lib=_lib)
def _(q, k, v, offsets):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.register_fake("edge_tune::encoder_layer", lib=_lib)
def _(x, mask, packed, heads, linears, lora, ln, eps):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


@torch.library.register_fake("edge_tune::attention_backward", lib=_lib)
def _(grad, q, k, v, key_mask):
    return empty_heads_last(grad), empty_heads_last(grad), empty_heads_last(grad)


@torch.library.register_fake("edge_tune::half_saturated", lib=_lib)
def _(x):
    return torch.empty_like(x, dtype=torch.float16)


@torch.library.register_fake("edge_tune::gelu_backward_half", lib=_lib)
def _(grad, h16):
    return torch.empty_like(grad)


# ---- autograd: input and bias gradients only; the input x is not saved ----
def _setup_linear(ctx, inputs, output):
    _, w, scale, bias = inputs
    ctx.save_for_backward(w, scale)
    ctx.has_bias = bias is not None


def _linear_backward(grad_input_op):
    def backward(ctx, grad):
        w, scale = ctx.saved_tensors
        grad_x = grad_input_op(grad, w, scale) if ctx.needs_input_grad[0] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias

    return backward


# The dynamic int8 ops treat the activation rounding as identity in backward (straight-through), and compute
# the input gradient either in fp32 through the dequantized weight ("fp32") or with the gradient quantized
# per row like the activations ("int8"). EDGE_TUNE_DYNAMIC_GRAD picks; "auto" (the default) is int8 where
# the C++ kernels run and fp32 on the references (whose int8 product runs in fp64). README "Ops" gives the
# trade-off.
DYNAMIC_GRAD = os.environ.get("EDGE_TUNE_DYNAMIC_GRAD", "auto")


def dynamic_grad_input(grad_out: Tensor, w_q: Tensor, scale: Tensor) -> Tensor:
    """The input gradient of int8_linear_dynamic / lora_linear's base, as DYNAMIC_GRAD says."""
    from .kernels import load_kernels

    if DYNAMIC_GRAD == "int8" or (DYNAMIC_GRAD == "auto" and load_kernels()):
        return int8_linear_dynamic_grad_input(grad_out, w_q, scale)
    return int8_linear_grad_input(grad_out, w_q, scale)


for _op, _grad in (
    (int8_linear, int8_linear_grad_input),
    (int8_linear_dynamic, dynamic_grad_input),
    (int4_linear, int4_linear_grad_input),
    # straight-through like the int8 dynamic op; the gradient in fp32 through the dequantized int4 weight
    (int4_linear_dynamic, int4_linear_grad_input),
):
    torch.library.register_autograd(_op, _linear_backward(_grad), setup_context=_setup_linear, lib=_lib)


def _setup_lora(ctx, inputs, output):
    x, w_q, scale, bias, A, B, lora_scale = inputs
    # x is saved here, unlike the frozen linears: the gradient of A needs it.
    ctx.save_for_backward(x, w_q, scale, A, B)
    ctx.has_bias, ctx.lora_scale = bias is not None, lora_scale


def _lora_backward(ctx, grad):
    x, w_q, scale, A, B = ctx.saved_tensors
    s, need = ctx.lora_scale, ctx.needs_input_grad
    grad_x = grad_bias = None
    if need[0]:
        grad_x = dynamic_grad_input(grad, w_q, scale).contiguous()
    # dA and dB, and the term's share of grad_x added into it in place: one op (one pass on CPU)
    grad_A, grad_B = lora_linear_backward(grad, x, A, B, s, grad_x)
    if ctx.has_bias and need[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, grad_bias, grad_A if need[4] else None, grad_B if need[5] else None, None


torch.library.register_autograd(lora_linear, _lora_backward, setup_context=_setup_lora, lib=_lib)

ALL_OPS = {
    "int8_linear": int8_linear,
    "int8_linear_dynamic": int8_linear_dynamic,
    "lora_linear": lora_linear,
    "int8_linear_dynamic_grad_input": int8_linear_dynamic_grad_input,
    "int8_pack_weight": int8_pack_weight,
    "int8_linear_dynamic_packed": int8_linear_dynamic_packed,
    "int4_linear": int4_linear,
    "int4_linear_dynamic": int4_linear_dynamic,
    "int8_linear_grad_input": int8_linear_grad_input,
    "int4_linear_grad_input": int4_linear_grad_input,
    "int8_embedding": int8_embedding,
    "int4_embedding": int4_embedding,
    "lora_linear_backward": lora_linear_backward,
    "lora_rows": lora_rows,
    "attention": attention,
    "attention_packed": attention_packed,
    "attention_backward": attention_backward,
    "encoder_layer": encoder_layer,
    "half_saturated": half_saturated,
    "gelu_backward_half": gelu_backward_half,
}

# Calling an op loads the kernels (kernels.py): until then each op's CPU slot holds a loader.
from .kernels import install_first_call_loaders  # noqa: E402

install_first_call_loaders(list(ALL_OPS))
